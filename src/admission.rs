//! Admission of new connections: the sockets that are connected come first.
//!
//! A socket that is already connected costs little per message; a new one costs an HTTP upgrade,
//! a token check and usually a join, which together are worth dozens of messages, and a socket
//! that goes away costs its cleanup. When thousands of clients come back at once (a network
//! blip, another node restarting), doing all of that as it arrives would queue it on the runtime
//! ahead of the messages of the sockets that stayed, and their latency would grow with the size
//! of the storm. Two things keep the churn to a bounded share of the node, and nothing is refused:
//!
//! - **Pace** ([`PacedListener`]): new connections are accepted, and their requests read (parsed,
//!   upgraded, authenticated), at most `server.accept_rate` a second, in bursts of at most
//!   `server.accept_burst`, in arrival order.
//! - **Turns** (`ChatService::churn`): upgrades, joins and disconnect cleanups take a turn each,
//!   at most `server.churn_concurrency` at once; the others wait, parked, first come first served.
//! - **A lane of its own** ([`ChurnLane`]): all of that runs on a runtime of its own, one thread
//!   with its own task queue (`server.churn_nice` can also lower its priority). Pace and turns
//!   bound how much churn there is; the lane keeps what there is from queueing ahead of connected
//!   sockets. On one runtime, a task that is woken waits for every task woken before it: the 10,000 cleanups
//!   of a storm's disconnects, or the joins of its returns, held the acknowledgement of every
//!   message sent meanwhile for 40-120 ms. Connected sockets still read their peer's goodbye on
//!   the main runtime (a few microseconds each); everything after it moves to the lane.
//!
//! What the lane must not do is own what connected sockets use: a socket answers on the runtime
//! that registered it. Upgraded sockets therefore move to the main runtime at their first read
//! or write there ([`PacedStream`]), and the stores open every connection at start, on the main
//! runtime, and keep it. The SQLite store's writer connection has a thread of its own
//! ([`crate::dedicated::spawn`]).

use std::cell::Cell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::serve::Listener;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::{Instant, Sleep};

/// A pace of `rate` a second with bursts of `burst` (GCRA by virtual scheduling): each caller
/// reserves the next free start time and waits for it. Hand-written because a limiter that
/// answers "not yet, try at t" (governor's) would wake every waiter at each free slot, and a
/// storm is thousands of waiters; here each caller is woken once, at its own time.
pub struct Pace {
    /// Time between two starts at the sustained rate.
    interval: Duration,
    /// How far ahead of the sustained rate a burst may start: `(burst - 1) * interval`.
    tolerance: Duration,
    /// The theoretical arrival time of the next caller.
    next: Instant,
}

impl Pace {
    /// `None` when `rate` is 0 (unpaced).
    pub fn new(rate: u32, burst: u32) -> Option<Self> {
        (rate > 0).then(|| {
            let interval = Duration::from_secs(1) / rate;
            Self {
                interval,
                tolerance: interval * burst.saturating_sub(1),
                next: Instant::now(),
            }
        })
    }

    /// Reserves the caller's start time: now, or later when callers came faster than the pace.
    pub fn reserve(&mut self) -> Instant {
        let now = Instant::now();
        let start = now.max(self.next.checked_sub(self.tolerance).unwrap_or(now));
        self.next = self.next.max(now) + self.interval;
        start
    }
}

/// A TCP listener that paces new connections twice at `server.accept_rate`: it takes them from
/// the kernel's listen queue at that pace (the queue, `server.listen_backlog` deep, holds the
/// others for free), and it reads each one's HTTP request no sooner than its turn at that pace,
/// counted from when the request arrived. The second pace spreads requests that arrive in a
/// bunch long after their connects (clients that were slow to send them). Sets `TCP_NODELAY`.
pub struct PacedListener {
    inner: TcpListener,
    /// `None`: unpaced (`server.accept_rate = 0`).
    accepts: Option<Pace>,
    reads: Option<Arc<Mutex<Pace>>>,
    metrics: PaceMetrics,
}

/// What the pacing counts: connections read later than their request arrived, and those
/// waiting for their turn now.
#[derive(Clone, Default)]
pub struct PaceMetrics {
    pub paced: Counter,
    pub waiting: Gauge,
}

impl PacedListener {
    pub fn new(inner: TcpListener, rate: u32, burst: u32, metrics: PaceMetrics) -> Self {
        Self {
            inner,
            accepts: Pace::new(rate, burst),
            reads: Pace::new(rate, burst).map(|pace| Arc::new(Mutex::new(pace))),
            metrics,
        }
    }
}

impl Listener for PacedListener {
    type Io = PacedStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        if let Some(pace) = &mut self.accepts {
            tokio::time::sleep_until(pace.reserve()).await;
        }
        // Retries and logs accept errors (out of file descriptors and the like) itself.
        let (tcp, addr) = Listener::accept(&mut self.inner).await;
        // Small frames (acks, pushes) go out at once: with Nagle's algorithm a reply written
        // while the client's delayed ACK of the previous one is pending waits up to 40 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set on an accepted socket");
        }
        let turn = match &self.reads {
            Some(pace) => ReadTurn::Unasked(pace.clone(), self.metrics.clone()),
            None => ReadTurn::Taken,
        };
        let stream = PacedStream {
            tcp: Some(tcp),
            turn,
            on_churn: on_churn_lane(),
        };
        (stream, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection that is not read before its turn.
///
/// Accepted on the churn lane, it moves to the runtime of the first task outside the lane that
/// reads or writes it (the connection's, once upgraded): its readiness is then reported by that
/// runtime, not by the lane's thread, which is busy with churn when connected sockets need it.
pub struct PacedStream {
    /// `None` only when moving to another runtime failed (every later use fails too).
    tcp: Option<TcpStream>,
    turn: ReadTurn,
    /// Registered with the churn lane's runtime.
    on_churn: bool,
}

impl PacedStream {
    /// The socket, registered with the runtime of the calling task.
    fn tcp(&mut self) -> std::io::Result<&mut TcpStream> {
        settle(&mut self.tcp, &mut self.on_churn)
    }
}

/// Moves `tcp` to the calling task's runtime if it is still registered with the churn lane's
/// and the caller is not on the lane.
fn settle<'a>(
    tcp: &'a mut Option<TcpStream>,
    on_churn: &mut bool,
) -> std::io::Result<&'a mut TcpStream> {
    if *on_churn && !on_churn_lane() {
        *on_churn = false;
        *tcp = tcp
            .take()
            .map(|tcp| TcpStream::from_std(tcp.into_std()?))
            .transpose()?;
    }
    tcp.as_mut().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            "the socket could not move to the connection's runtime",
        )
    })
}

/// `Poll::Ready(Err(_))` out of a failed `io::Result`.
macro_rules! ready_io {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Poll::Ready(Err(e)),
        }
    };
}

enum ReadTurn {
    /// Nothing arrived yet: the turn is asked for when the request arrives.
    Unasked(Arc<Mutex<Pace>>, PaceMetrics),
    /// Waiting for the turn, counted in `waiting` until the wait ends or the connection does.
    Waiting {
        sleep: Pin<Box<Sleep>>,
        _waiting: Counted,
    },
    Taken,
}

/// One count in a gauge, taken back when dropped.
struct Counted(Gauge);

impl Counted {
    fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl AsyncRead for PacedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            let tcp = ready_io!(settle(&mut this.tcp, &mut this.on_churn));
            match &mut this.turn {
                ReadTurn::Taken => return Pin::new(tcp).poll_read(cx, buf),
                ReadTurn::Unasked(pace, metrics) => {
                    // A failed readiness check is the read's failure too: read now and see it.
                    if ready!(tcp.poll_read_ready(cx)).is_err() {
                        this.turn = ReadTurn::Taken;
                        continue;
                    }
                    let start = pace.lock().unwrap().reserve();
                    this.turn = if start > Instant::now() {
                        metrics.paced.inc();
                        ReadTurn::Waiting {
                            sleep: Box::pin(tokio::time::sleep_until(start)),
                            _waiting: Counted::new(&metrics.waiting),
                        }
                    } else {
                        ReadTurn::Taken
                    };
                }
                ReadTurn::Waiting { sleep, .. } => {
                    ready!(sleep.as_mut().poll(cx));
                    this.turn = ReadTurn::Taken;
                }
            }
        }
    }
}

impl AsyncWrite for PacedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(ready_io!(self.tcp())).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(ready_io!(self.tcp())).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // As `TcpStream`'s (a socket takes `writev`).
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(ready_io!(self.tcp())).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(ready_io!(self.tcp())).poll_shutdown(cx)
    }
}

/// Binds a listener with a listen queue of `backlog` connections (tokio's own `bind` asks for
/// 1,024, which a reconnect storm overflows: the overflow comes back only with the clients' SYN
/// retransmits, one and three seconds later).
pub fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted gateway can bind while old sockets are in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

thread_local! {
    /// Set on the churn lane's threads.
    static ON_CHURN_LANE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the caller runs on the churn lane.
fn on_churn_lane() -> bool {
    ON_CHURN_LANE.with(Cell::get)
}

/// The churn lane: a runtime of its own, on one thread, for the work of sockets that come and
/// go. It accepts and paces new connections, serves HTTP (upgrades, REST, metrics), and runs
/// joins, disconnect cleanups and presence recording; a socket, once upgraded, is read and
/// written on the main runtime. The two runtimes' threads share the cores as the kernel sees fit
/// (equally at `server.churn_nice` = 0): a task of a connected socket waits for the main
/// runtime's queue only, never for the churn's.
///
/// A positive `churn_nice` makes the kernel run the lane after the other threads too. In the
/// storm benchmark that made no measurable difference (the separate queue is what counts), and a
/// lane held back keeps what it uses (a pooled database connection) while it waits; hence 0.
pub struct ChurnLane {
    handle: tokio::runtime::Handle,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl ChurnLane {
    /// Starts the lane's runtime; its thread runs at `nice` (0: as the others; 1..=19: after
    /// them, as `nice(1)` does). Where the thread's priority cannot be set (not Linux, or not
    /// allowed), the lane still runs, at the default priority, and says so in the log.
    pub fn start(nice: i32) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("churn")
            .on_thread_start(move || {
                ON_CHURN_LANE.with(|c| c.set(true));
                lower_priority(nice);
            })
            .enable_all()
            .build()?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Mutex::new(Some(runtime)),
        })
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Runs `task` on the lane and waits for it. A panic in it is resumed in the caller.
    pub async fn run<F>(&self, task: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.handle.spawn(task).await {
            Ok(output) => output,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled: only when the lane shut down, after the server stopped.
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops the lane's runtime without waiting for its tasks (callable from async code).
    pub fn shutdown(&self) {
        if let Some(runtime) = self.runtime.lock().unwrap().take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for ChurnLane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(target_os = "linux")]
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: setpriority on the calling thread's id has no memory effects.
    let tid = unsafe { libc::gettid() };
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
        tracing::warn!(
            nice,
            error = %std::io::Error::last_os_error(),
            "could not lower the churn lane's priority; it runs at the default"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority(nice: i32) {
    if nice != 0 {
        tracing::warn!(
            nice,
            "thread priorities are set on Linux only; the churn lane runs at the default"
        );
    }
}
