//! `chat-gateway-bench`: a load generator that speaks the gateway's real protocol over real
//! sockets and prints a report. Loopback only, bounded in connections, rate and time.
//!
//! Each scenario mirrors a k6 script or a target of docs/BENCHMARKS.md; `--help` explains them.
//! Rooms and memberships are set up through the management API with a SERVICE token minted from
//! `--jwt-secret` (the gateway must run with the same `JWT_SECRET`), users' tokens likewise.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chat_gateway::auth::{Role, TokenMinter, claims_for};
use clap::{Args, Parser, Subcommand};
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpSocket;
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Hard bounds, whatever the options say.
const MAX_SOCKETS: usize = 20_000;
const MAX_DURATION_SECS: u64 = 600;
const MAX_RATE: f64 = 200_000.0;

#[derive(Parser)]
#[command(
    name = "chat-gateway-bench",
    about = "Load generator for chat-gateway: real sockets, real protocol, loopback only",
    long_about = "Load generator for chat-gateway. It speaks the real protocol (REST and \
WebSocket) to a gateway on this machine, knows every message it sent, and prints a report: \
throughput, latency p50/p95/p99/max, errors, lost and duplicated messages, the server's CPU \
seconds and RSS (with --server-pid), the history cache hit ratio (from /metrics) and database \
statements per stored message (the SQLite store's own count from /metrics; on Postgres from \
pg_stat_statements with --database-url).\n\n\
Run the gateway with JWT_SECRET set to the --jwt-secret given here (tokens and the SERVICE \
token for room setup are minted from it) and, except for `seed`, with rate limits off \
(CHAT_GATEWAY__RATE_LIMIT__ENABLED=false): the scenarios send far above the default per-room \
limit of 10 msgs/s.\n\n\
Scenarios (each mirrors a k6 script or a benchmark target):\n\
  seed     the k6 HTTP scenario (k6/chat-load-test.js) at its 100-user stage: each user loops \
GET latest history page, POST a message, pause --think-ms\n\
  chat     the k6 WebSocket scenario (k6/ws-chat.js): N users with one socket each, in rooms \
of K members, sending at a total rate R; every member receives every message of its room\n\
  fanout   few rooms with many receivers each and one sender socket per room at a steady rate\n\
  idle     many authenticated, idle sockets; reports server RSS per connection\n\
  history  history reads over WebSocket at a fixed rate: hot pages (latest page of a few rooms, \
cache hits) and cold pages (random `before` in filled rooms, misses)\n\
  storm    the presence reconnect storm (chat signals): N clients in rooms of K, plus probe \
sockets in every room that stay connected and send R msgs/s to each other; after --duration \
seconds of baseline every client drops its socket at once and reconnects at once (auth, join \
with `since`, as the SDK does). Reports message latency at the probes per phase (baseline; storm \
= from the drop until the last client is back; after), the storm/baseline p99 ratio against the \
2x requirement, reconnect time, presence pushes per socket, gateway CPU, RSS and presence \
backlog, and lost or duplicated messages at every socket (across the reconnect)\n\n\
Every scenario creates rooms of its own (named after --run-id), so runs do not interfere."
)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Args, Clone)]
struct Common {
    /// Gateway base URL; must be a loopback address. Several nodes of one cluster as a
    /// comma-separated list: rooms are set up through the first, and socket i connects to node
    /// i mod n (`chat` and `fanout` spread every room's members, senders included, over them).
    #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The gateway's HS256 secret (JWT_SECRET), used to mint users' and the SERVICE token.
    #[arg(long, global = true, env = "JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// The gateway's process id: report its CPU seconds and RSS (from /proc) over the run. For
    /// several nodes, their ids comma-separated (the CPU is summed; the idle and storm scenarios
    /// read the first).
    #[arg(long, global = true, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Postgres' postmaster process id: report the CPU its processes (the postmaster and its
    /// backends) spent per message stored, from /proc.
    #[arg(long, global = true)]
    postgres_pid: Option<u32>,
    /// The Redis server's process id: report its CPU per message stored, from /proc.
    #[arg(long, global = true)]
    redis_pid: Option<u32>,
    /// Seconds of measured load (after setup and connection); at most 600.
    #[arg(long, global = true, default_value_t = 10)]
    duration: u64,
    /// After the load stops, wait at most this long for outstanding replies and pushes (ms).
    #[arg(long, global = true, default_value_t = 5000)]
    drain_ms: u64,
    /// Prefix of room and user ids (default: `b<unix seconds>`), so runs never share rooms.
    #[arg(long, global = true)]
    run_id: Option<String>,
    /// Local source addresses 127.0.0.1 ..= 127.0.0.N for sockets, when one address runs out of
    /// ephemeral ports.
    #[arg(long, global = true, default_value_t = 1)]
    source_addrs: u8,
    /// Exit with an error when anything went wrong: error replies, lost or duplicated messages,
    /// requests the generator could not issue in time (for CI smoke runs).
    #[arg(long, global = true)]
    fail_on_errors: bool,
    /// Most WebSocket handshakes (connect + auth + join) in flight at once.
    #[arg(long, global = true, default_value_t = 256)]
    connect_concurrency: usize,
    /// The gateway's Postgres database (loopback): report database statements per stored
    /// message from `pg_stat_statements` (or transactions from `pg_stat_database` when that
    /// extension is not installed). On SQLite the gateway's own statement counter is read.
    #[arg(
        long,
        global = true,
        env = "BENCH_DATABASE_URL",
        hide_env_values = true
    )]
    database_url: Option<String>,
}

#[derive(Subcommand)]
enum Scenario {
    /// The k6 HTTP scenario at 100 users: GET history then POST send per iteration.
    Seed {
        /// Concurrent users (k6 virtual users).
        #[arg(long, default_value_t = 100)]
        users: usize,
        /// Rooms the users are spread over (user i uses room i % rooms). With the default rate
        /// limits keep users/rooms x (1000 / think-ms) under 10 msgs/s per room.
        #[arg(long, default_value_t = 10)]
        rooms: usize,
        /// Pause after each iteration (k6's sleep), in milliseconds.
        #[arg(long, default_value_t = 1000)]
        think_ms: u64,
        /// History page size requested.
        #[arg(long, default_value_t = 30)]
        limit: u32,
    },
    /// N users, one socket each, rooms of K members, total send rate R msgs/s.
    Chat {
        /// Users, each holding one socket.
        #[arg(long, default_value_t = 1000)]
        users: usize,
        /// Members per room (every member's socket joins its room).
        #[arg(long, default_value_t = 50)]
        room_size: usize,
        /// Total messages per second, spread round-robin over all users.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
    },
    /// Rooms with many receivers each and one sender socket per room.
    Fanout {
        /// Rooms.
        #[arg(long, default_value_t = 1)]
        rooms: usize,
        /// Receiving sockets per room (the sender's socket joins too and is not counted here).
        #[arg(long, default_value_t = 1000)]
        receivers: usize,
        /// Total messages per second over all rooms.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
    },
    /// Many authenticated idle sockets; server RSS per connection.
    Idle {
        /// Sockets to open and authenticate.
        #[arg(long, default_value_t = 10_000)]
        sockets: usize,
    },
    /// History reads at a fixed rate over WebSocket: hot pages and cold pages.
    History {
        /// Rooms read hot: their latest page, again and again (cache hits).
        #[arg(long, default_value_t = 10)]
        hot_rooms: usize,
        /// Rooms filled with --fill messages each and read cold: random `before` (misses).
        #[arg(long, default_value_t = 4)]
        cold_rooms: usize,
        /// Messages written into each room before reading.
        #[arg(long, default_value_t = 2000)]
        fill: usize,
        /// Reads per second in total.
        #[arg(long, default_value_t = 5000.0)]
        rate: f64,
        /// Fraction of the reads that are cold (0..=1).
        #[arg(long, default_value_t = 0.1)]
        cold_fraction: f64,
        /// Reader sockets (requests are pipelined round-robin over them).
        #[arg(long, default_value_t = 32)]
        sockets: usize,
        /// History page size requested.
        #[arg(long, default_value_t = 30)]
        limit: u32,
    },
    /// Presence reconnect storm: every client drops its socket at once and reconnects at once,
    /// while probe sockets that stay connected measure message latency.
    Storm {
        /// Clients that drop and reconnect, one socket (and user) each.
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        /// Clients per room (the room's probes come on top).
        #[arg(long, default_value_t = 50)]
        room_size: usize,
        /// Probe sockets per room (at least 2): connected the whole run, they send the measured
        /// messages and receive each other's.
        #[arg(long, default_value_t = 2)]
        probes: usize,
        /// Messages per second in total, sent by the probes round-robin over the rooms.
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Seconds of the same load after the last client is back (--duration is the baseline).
        #[arg(long, default_value_t = 5)]
        settle: u64,
        /// Reconnect handshakes (connect + auth + join) in flight at once; default: all clients.
        #[arg(long)]
        reconnect_concurrency: Option<usize>,
        /// Clients not back this many seconds after the drop count as errors.
        #[arg(long, default_value_t = 120)]
        storm_timeout: u64,
        /// Also list every probe message from a second before the drop on whose delivery took
        /// longer than this (ms), with its ack and where the ack's time went.
        #[arg(long)]
        slow_ms: Option<f64>,
    },
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// Everything the connections record, behind one lock (the generator runs on one thread, so the
/// lock is never contended; it is there because tokio tasks must be `Send`).
struct Stats {
    delivery: Histogram<u64>,
    ack: Histogram<u64>,
    hot: Histogram<u64>,
    cold: Histogram<u64>,
    http_history: Histogram<u64>,
    http_send: Histogram<u64>,
    /// Messages acknowledged per room (room index -> count).
    acked: HashMap<usize, u64>,
    errors: HashMap<String, u64>,
}

fn histogram() -> Histogram<u64> {
    // Microseconds, 1 us .. 60 s, 3 significant figures.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

impl Stats {
    fn new() -> Self {
        Self {
            delivery: histogram(),
            ack: histogram(),
            hot: histogram(),
            cold: histogram(),
            http_history: histogram(),
            http_send: histogram(),
            acked: HashMap::new(),
            errors: HashMap::new(),
        }
    }

    fn error(&mut self, what: impl Into<String>) {
        *self.errors.entry(what.into()).or_default() += 1;
    }
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

#[derive(Default)]
struct Counters {
    /// Pushes of new messages received (seq above the last seen in that room on that socket).
    delivered: AtomicU64,
    /// Pushes at or below the last seq seen: duplicates (or reordering, which the contract
    /// forbids as much).
    duplicates: AtomicU64,
    sent: AtomicU64,
    /// Replies received for requests sent (results and errors).
    replies: AtomicU64,
    requests: AtomicU64,
}

type Shared = Arc<(Mutex<Stats>, Counters)>;

// ---------------------------------------------------------------------------------------------
// The server, seen from outside

#[derive(Clone, Copy)]
struct ProcSample {
    cpu_secs: f64,
    rss_kib: u64,
}

fn proc_sample(pid: u32) -> anyhow::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(ProcSample {
        cpu_secs: (utime + stime) / ticks,
        rss_kib,
    })
}

/// Counters read from the gateway's /metrics for the statements-per-message line: messages
/// stored (`chat_messages_received_total`, every door) and, on the SQLite store, the store's
/// write statements (`chat_store_write_statements_total`, BEGIN and COMMIT included).
async fn store_counters(http: &reqwest::Client, base: &str) -> (f64, Option<f64>) {
    let Ok(r) = http.get(format!("{base}/metrics")).send().await else {
        return (0.0, None);
    };
    let text = r.text().await.unwrap_or_default();
    let mut messages = 0.0;
    let mut statements = None;
    for line in text.lines() {
        let value = || -> f64 {
            line.rsplit_once(' ')
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0.0)
        };
        if line.starts_with("chat_messages_received_total") {
            messages += value();
        } else if line.starts_with("chat_store_write_statements_total") {
            statements = Some(statements.unwrap_or(0.0) + value());
        }
    }
    (messages, statements)
}

/// What Postgres counted: statements from `pg_stat_statements` when installed in the
/// database, else committed and rolled back transactions from `pg_stat_database`.
struct PgCounter {
    pool: sqlx::PgPool,
    statements: bool,
}

impl PgCounter {
    async fn connect(url: &str) -> anyhow::Result<Self> {
        let host = url
            .split_once('@')
            .map(|(_, rest)| rest)
            .unwrap_or(url)
            .trim_start_matches("postgres://")
            .trim_start_matches("postgresql://");
        if !(host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]"))
        {
            bail!("--database-url must point at a loopback server");
        }
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .context("connecting to --database-url")?;
        let statements = sqlx::query("SELECT 1 FROM pg_stat_statements LIMIT 1")
            .execute(&pool)
            .await
            .is_ok();
        Ok(Self { pool, statements })
    }

    fn what(&self) -> &'static str {
        if self.statements {
            "statements (pg_stat_statements)"
        } else {
            "transactions (pg_stat_database; install pg_stat_statements to count statements)"
        }
    }

    async fn count(&self) -> Option<f64> {
        let q = if self.statements {
            "SELECT coalesce(sum(calls), 0)::float8 FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        } else {
            "SELECT (xact_commit + xact_rollback)::float8 FROM pg_stat_database \
             WHERE datname = current_database()"
        };
        // The cumulative statistics are a snapshot per transaction: clear it to see fresh ones.
        let _ = sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&self.pool)
            .await;
        sqlx::query_scalar::<_, f64>(q)
            .fetch_one(&self.pool)
            .await
            .ok()
    }
}

/// The history cache's hit and miss counters from /metrics.
async fn cache_counters(http: &reqwest::Client, base: &str) -> (f64, f64) {
    let Ok(r) = http.get(format!("{base}/metrics")).send().await else {
        return (0.0, 0.0);
    };
    let text = r.text().await.unwrap_or_default();
    let mut hit = 0.0;
    let mut miss = 0.0;
    for line in text.lines() {
        if !line.starts_with("chat_history_requests_total{") {
            continue;
        }
        let value: f64 = line
            .rsplit_once(' ')
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0);
        if line.contains("cache=\"hit\"") {
            hit += value;
        } else if line.contains("cache=\"miss\"") {
            miss += value;
        }
    }
    (hit, miss)
}

/// Raises the open-file limit to the hard limit; returns the new soft limit.
fn raise_nofile() -> libc::rlim_t {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                return wanted.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

// ---------------------------------------------------------------------------------------------
// Setup through the management API

struct Gateway {
    /// The first node's base URL: setup and the scenarios' HTTP requests go there.
    base: String,
    /// Every node: its base URL and socket address.
    nodes: Vec<(String, SocketAddr)>,
    http: reqwest::Client,
    minter: TokenMinter,
    service_token: String,
    run_id: String,
    source_addrs: u8,
}

impl Gateway {
    fn new(common: &Common) -> anyhow::Result<Self> {
        let mut nodes = Vec::new();
        for url in common.url.split(',') {
            let base = url.trim().trim_end_matches('/').to_string();
            let hostport = base
                .strip_prefix("http://")
                .context("--url must be http://<loopback address>:<port>")?;
            let addr: SocketAddr = hostport
                .replace("localhost", "127.0.0.1")
                .parse()
                .context("--url must name an IP address and port, like http://127.0.0.1:8080")?;
            if !addr.ip().is_loopback() {
                bail!("refusing {addr}: the load generator only targets loopback addresses");
            }
            nodes.push((base, addr));
        }
        let base = nodes[0].0.clone();
        let secret = common
            .jwt_secret
            .clone()
            .context("--jwt-secret (or JWT_SECRET) is required: the gateway's HS256 secret")?;
        let minter = TokenMinter::hs256(&SecretString::from(secret));
        let service_token = minter.mint(&claims_for("bench-service", None, Role::Service, 7200));
        let run_id = common.run_id.clone().unwrap_or_else(|| {
            format!(
                "b{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            )
        });
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1024)
            .build()?;
        Ok(Self {
            base,
            nodes,
            http,
            minter,
            service_token,
            run_id,
            source_addrs: common.source_addrs.max(1),
        })
    }

    /// The node socket `n` connects to.
    fn node_addr(&self, n: usize) -> SocketAddr {
        self.nodes[n % self.nodes.len()].1
    }

    fn room_id(&self, i: usize) -> String {
        format!("{}-room-{i}", self.run_id)
    }

    fn user_id(&self, i: usize) -> String {
        format!("{}-user-{i}", self.run_id)
    }

    /// The storm's probe sockets' users.
    fn probe_id(&self, i: usize) -> String {
        format!("{}-probe-{i}", self.run_id)
    }

    fn token(&self, user: &str) -> String {
        self.minter
            .mint(&claims_for(user, Some(user), Role::User, 7200))
    }

    async fn create_room(&self, room: &str) -> anyhow::Result<()> {
        let r = self
            .http
            .post(format!("{}/api/chat/rooms", self.base))
            .bearer_auth(&self.service_token)
            .json(&json!({"id": room, "name": room}))
            .send()
            .await?;
        if r.status() != 201 && r.status() != 409 {
            bail!("creating room {room}: {} {}", r.status(), r.text().await?);
        }
        Ok(())
    }

    /// Creates the rooms and adds the members, `concurrency` requests at a time.
    async fn setup(&self, rooms: &[(String, Vec<String>)]) -> anyhow::Result<()> {
        for (room, _) in rooms {
            self.create_room(room).await?;
        }
        let puts: Vec<(String, String)> = rooms
            .iter()
            .flat_map(|(room, members)| members.iter().map(|m| (room.clone(), m.clone())))
            .collect();
        let results: Vec<anyhow::Result<()>> = futures::stream::iter(puts)
            .map(|(room, user)| async move {
                let r = self
                    .http
                    .put(format!(
                        "{}/api/chat/rooms/{room}/members/{user}",
                        self.base
                    ))
                    .bearer_auth(&self.service_token)
                    .send()
                    .await?;
                if !r.status().is_success() {
                    bail!("adding {user} to {room}: {}", r.status());
                }
                Ok(())
            })
            .buffer_unordered(32)
            .collect()
            .await;
        results.into_iter().collect()
    }

    async fn tcp(&self, n: usize) -> std::io::Result<tokio::net::TcpStream> {
        let socket = TcpSocket::new_v4()?;
        if self.source_addrs > 1 {
            let last = (n % self.source_addrs as usize) as u8 + 1;
            socket.bind(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)),
                0,
            ))?;
        }
        let stream = socket.connect(self.node_addr(n)).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

// ---------------------------------------------------------------------------------------------
// One WebSocket client

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// What the generator asks a connection to do.
enum Cmd {
    Send {
        room: usize,
    },
    History {
        room: usize,
        before: Option<i64>,
        cold: bool,
    },
    Close,
}

#[derive(Clone, Copy)]
enum Pending {
    Send { room: usize, at: Instant },
    History { at: Instant, cold: bool },
    Other,
}

/// A server frame, read only as far as the report needs.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default, borrow)]
    message: Option<PushMessage<'a>>,
    /// Presence pushes: the room's online count (storm).
    #[serde(default)]
    online: Option<u64>,
    #[serde(default, borrow)]
    result: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct PushMessage<'a> {
    #[serde(rename = "roomId", borrow)]
    room_id: std::borrow::Cow<'a, str>,
    seq: i64,
    #[serde(borrow)]
    content: std::borrow::Cow<'a, str>,
}

/// What one read of a generator socket gave: a text frame, something to skip (pings, pongs,
/// binary), or the end of the socket, with why.
enum Read {
    Text(tokio_tungstenite::tungstenite::Utf8Bytes),
    Skip,
    Ended(String),
}

fn read_text(msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>) -> Read {
    match msg {
        Some(Ok(Message::Text(text))) => Read::Text(text),
        Some(Ok(Message::Close(frame))) => Read::Ended(format!("closed by server: {frame:?}")),
        Some(Ok(_)) => Read::Skip,
        Some(Err(e)) => Read::Ended(format!("socket read: {e}")),
        None => Read::Ended("socket closed by server".into()),
    }
}

/// A connected, authenticated client with its rooms joined.
struct Client {
    ws: Ws,
    next_id: u64,
}

fn ws_config() -> WebSocketConfig {
    // Small buffers: thousands of sockets live in this one process.
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
}

impl Client {
    /// Connects, authenticates with a first `auth` frame and joins `rooms`, waiting for each
    /// reply (pushes cannot arrive before the joins complete since nothing is sent yet).
    async fn connect(
        gw: &Gateway,
        n: usize,
        token: &str,
        rooms: &[String],
    ) -> anyhow::Result<Self> {
        let stream = gw.tcp(n).await.context("connect")?;
        let url = format!("ws://{}/ws", gw.node_addr(n));
        let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config()))
            .await
            .context("websocket handshake")?;
        let mut client = Client { ws, next_id: 1 };
        client
            .call(json!({"type": "auth", "token": token}))
            .await
            .context("auth")?;
        for room in rooms {
            client
                .call(json!({"type": "join", "room": room}))
                .await
                .with_context(|| format!("join {room}"))?;
        }
        Ok(client)
    }

    /// Sends one request and waits for its reply (setup only: no pushes expected meanwhile).
    async fn call(&mut self, mut frame: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let id = self.next_id;
        self.next_id += 1;
        frame["id"] = json!(id);
        self.ws.send(Message::text(frame.to_string())).await?;
        let deadline = Duration::from_secs(30);
        loop {
            let msg = tokio::time::timeout(deadline, self.ws.next())
                .await
                .context("no reply within 30 s")?
                .context("socket closed")??;
            let Message::Text(text) = msg else { continue };
            let reply: serde_json::Value = serde_json::from_str(&text)?;
            if reply["id"] == json!(id) {
                if reply["type"] == "error" {
                    bail!("{}", reply["error"]);
                }
                return Ok(reply["result"].clone());
            }
        }
    }

    /// The measured phase: carry out commands, read replies and pushes until told to close.
    async fn run(
        mut self,
        rooms: Arc<Vec<String>>,
        epoch: Instant,
        mut cmds: mpsc::Receiver<Cmd>,
        shared: Shared,
        user: usize,
        limit: u32,
    ) {
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        let mut last_seq: HashMap<String, i64> = HashMap::new();
        let mut counter = 0u64;
        loop {
            tokio::select! {
                cmd = cmds.recv() => {
                    let Some(cmd) = cmd else { break };
                    let id = self.next_id;
                    self.next_id += 1;
                    let at = Instant::now();
                    let frame = match cmd {
                        Cmd::Close => break,
                        Cmd::Send { room } => {
                            counter += 1;
                            pending.insert(id, Pending::Send { room, at });
                            shared.1.sent.fetch_add(1, Ordering::Relaxed);
                            // The send time (us since the run's epoch) travels in the content, so
                            // every receiver can measure delivery latency.
                            let t = at.duration_since(epoch).as_micros();
                            json!({"type": "send", "id": id, "room": rooms[room],
                                   "content": format!("t={t} u={user} n={counter}"),
                                   "clientMsgId": format!("u{user}-{counter}")})
                        }
                        Cmd::History { room, before, cold } => {
                            pending.insert(id, Pending::History { at, cold });
                            let mut f = json!({"type": "history", "id": id, "room": rooms[room],
                                               "limit": limit});
                            if let Some(b) = before {
                                f["before"] = json!(b);
                            }
                            f
                        }
                    };
                    shared.1.requests.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = self.ws.send(Message::text(frame.to_string())).await {
                        shared.0.lock().unwrap().error(format!("socket write: {e}"));
                        break;
                    }
                }
                msg = self.ws.next() => {
                    let text = match read_text(msg) {
                        Read::Text(text) => text,
                        Read::Skip => continue,
                        Read::Ended(why) => {
                            shared.0.lock().unwrap().error(why);
                            break;
                        }
                    };
                    let now = Instant::now();
                    let frame: Frame = match serde_json::from_str(&text) {
                        Ok(f) => f,
                        Err(e) => {
                            shared.0.lock().unwrap().error(format!("unparsable frame: {e}"));
                            continue;
                        }
                    };
                    match frame.kind {
                        "message" => {
                            let Some(m) = frame.message else { continue };
                            if !last_seq.contains_key(&*m.room_id) {
                                last_seq.insert(m.room_id.to_string(), 0);
                            }
                            let last = last_seq.get_mut(&*m.room_id).expect("inserted above");
                            if m.seq <= *last {
                                shared.1.duplicates.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            *last = m.seq;
                            shared.1.delivered.fetch_add(1, Ordering::Relaxed);
                            let sent_at = m
                                .content
                                .strip_prefix("t=")
                                .and_then(|r| r.split(' ').next())
                                .and_then(|t| t.parse::<u64>().ok());
                            if let Some(t) = sent_at {
                                let since = now.duration_since(epoch).as_micros() as u64;
                                let mut s = shared.0.lock().unwrap();
                                s.delivery.saturating_record(since.saturating_sub(t).max(1));
                            }
                        }
                        "result" | "error" => {
                            shared.1.replies.fetch_add(1, Ordering::Relaxed);
                            let p = frame
                                .id
                                .and_then(|id| pending.remove(&id))
                                .unwrap_or(Pending::Other);
                            let mut s = shared.0.lock().unwrap();
                            if frame.kind == "error" {
                                let code = frame
                                    .error
                                    .as_ref()
                                    .and_then(|e| e["code"].as_str())
                                    .unwrap_or("?")
                                    .to_string();
                                s.error(format!("error reply: {code}"));
                                continue;
                            }
                            match p {
                                Pending::Send { room, at } => {
                                    record(&mut s.ack, now - at);
                                    *s.acked.entry(room).or_default() += 1;
                                }
                                Pending::History { at, cold } => {
                                    let h = if cold { &mut s.cold } else { &mut s.hot };
                                    record(h, now - at);
                                }
                                Pending::Other => {}
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        let _ = self.ws.close(None).await;
    }
}

/// Connects `users` clients (`rooms_of(i)` gives the room indexes user i joins), at most
/// `concurrency` handshakes at a time. Returns the clients in user order.
async fn connect_all(
    gw: &Arc<Gateway>,
    users: usize,
    room_names: &Arc<Vec<String>>,
    rooms_of: impl Fn(usize) -> Vec<usize>,
    user_of: impl Fn(usize) -> String,
    concurrency: usize,
) -> anyhow::Result<Vec<Client>> {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let done = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::with_capacity(users);
    for i in 0..users {
        let gw = gw.clone();
        let gate = gate.clone();
        let done = done.clone();
        let joins: Vec<String> = rooms_of(i)
            .into_iter()
            .map(|r| room_names[r].clone())
            .collect();
        let token = gw.token(&user_of(i));
        handles.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.expect("semaphore open");
            let c = Client::connect(&gw, i, &token, &joins).await;
            done.fetch_add(1, Ordering::Relaxed);
            c
        }));
    }
    let mut clients = Vec::with_capacity(users);
    for (i, h) in handles.into_iter().enumerate() {
        let c = h.await?.with_context(|| format!("socket {i} of {users}"))?;
        clients.push(c);
    }
    Ok(clients)
}

// ---------------------------------------------------------------------------------------------
// Pacing and the report

/// Calls `f(k)` for k = 0, 1, 2, ... at `rate` per second for `duration` (ticks of 1 ms, each
/// issuing what is due, so high rates are exact on average and not limited by timer resolution).
async fn paced(rate: f64, duration: Duration, mut f: impl FnMut(u64)) -> u64 {
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut issued = 0u64;
    loop {
        tick.tick().await;
        let elapsed = start.elapsed().min(duration);
        let due = (elapsed.as_secs_f64() * rate) as u64;
        while issued < due {
            f(issued);
            issued += 1;
        }
        if elapsed >= duration {
            return issued;
        }
    }
}

fn line(name: &str, h: &Histogram<u64>) {
    if h.is_empty() {
        return;
    }
    let ms = |v: u64| v as f64 / 1000.0;
    println!(
        "{name:<22} n={:<9} p50={:.3}ms p95={:.3}ms p99={:.3}ms max={:.3}ms",
        h.len(),
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.95)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
    );
}

struct Observer {
    /// The gateway processes and their samples at the start.
    servers: Vec<(u32, ProcSample)>,
    postgres: Option<(u32, f64)>,
    redis: Option<(u32, f64)>,
    cache_before: (f64, f64),
    store_before: (f64, Option<f64>),
    reconnects_before: f64,
    pg: Option<(PgCounter, Option<f64>)>,
    started: Instant,
}

/// CPU seconds of a process and its children: those alive (summed from /proc) and those it
/// has waited for. Postgres runs a process per connection under the postmaster.
fn tree_cpu(pid: u32) -> Option<f64> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // Fields after the command name: 0 state, 1 ppid, 11 utime, 12 stime, 13 cutime, 14 cstime.
    let fields = |pid: &str| -> Option<Vec<f64>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = stat.rsplit_once(')')?.1;
        Some(
            rest.split_whitespace()
                .map(|f| f.parse().unwrap_or(0.0))
                .collect(),
        )
    };
    let own = fields(&pid.to_string())?;
    let mut total = own[11] + own[12] + own[13] + own[14];
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(child) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if let Some(f) = fields(child)
            && f.get(1).copied() == Some(pid as f64)
        {
            total += f[11] + f[12];
        }
    }
    Some(total / ticks)
}

/// Sums a counter (all its label sets) over every node's /metrics.
async fn nodes_metric(gw: &Gateway, name: &str) -> f64 {
    let mut total = 0.0;
    for (base, _) in &gw.nodes {
        let Ok(r) = gw.http.get(format!("{base}/metrics")).send().await else {
            continue;
        };
        let text = r.text().await.unwrap_or_default();
        total += text
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum::<f64>();
    }
    total
}

/// Messages stored (every node) and the SQLite store's write statements (the first node).
async fn all_store_counters(gw: &Gateway) -> (f64, Option<f64>) {
    let (_, statements) = store_counters(&gw.http, &gw.base).await;
    (
        nodes_metric(gw, "chat_messages_received_total").await,
        statements,
    )
}

impl Observer {
    async fn start(gw: &Gateway, common: &Common) -> Self {
        let pg = match &common.database_url {
            Some(url) => match PgCounter::connect(url).await {
                Ok(counter) => {
                    let before = counter.count().await;
                    Some((counter, before))
                }
                Err(e) => {
                    eprintln!("database statements not counted: {e:#}");
                    None
                }
            },
            None => None,
        };
        Self {
            servers: common
                .server_pid
                .iter()
                .filter_map(|p| Some((*p, proc_sample(*p).ok()?)))
                .collect(),
            postgres: common.postgres_pid.and_then(|p| Some((p, tree_cpu(p)?))),
            redis: common
                .redis_pid
                .and_then(|p| Some((p, proc_sample(p).ok()?.cpu_secs))),
            cache_before: cache_counters(&gw.http, &gw.base).await,
            store_before: all_store_counters(gw).await,
            reconnects_before: nodes_metric(gw, "chat_redis_reconnects_total").await,
            pg,
            started: Instant::now(),
        }
    }

    /// Database statements per message stored during the run, when there were any; returns the
    /// messages stored.
    async fn statements(&self, gw: &Gateway) -> f64 {
        let (messages, statements) = all_store_counters(gw).await;
        let stored = messages - self.store_before.0;
        if stored <= 0.0 {
            return 0.0;
        }
        if let (Some(after), Some(before)) = (statements, self.store_before.1) {
            println!(
                "store statements       {:.0} write statements (gateway's count) for {stored:.0} messages stored: {:.2} per message",
                after - before,
                (after - before) / stored
            );
        }
        if let Some((counter, Some(before))) = &self.pg
            && let Some(after) = counter.count().await
        {
            println!(
                "database statements    {:.0} {} for {stored:.0} messages stored: {:.2} per message (whole database, every client)",
                after - before,
                counter.what(),
                (after - before) / stored
            );
        }
        stored
    }

    /// Prints the server-side lines; returns the gateways' CPU seconds spent, when known.
    async fn finish(&self, gw: &Gateway) -> Option<f64> {
        let wall = self.started.elapsed().as_secs_f64();
        let stored = self.statements(gw).await;
        let (hit, miss) = cache_counters(&gw.http, &gw.base).await;
        let (dh, dm) = (hit - self.cache_before.0, miss - self.cache_before.1);
        if dh + dm > 0.0 {
            println!(
                "history cache          hits={dh} misses={dm} hit_ratio={:.1}%",
                100.0 * dh / (dh + dm)
            );
        }
        if gw.nodes.len() > 1 || self.reconnects_before > 0.0 {
            let reconnects = nodes_metric(gw, "chat_redis_reconnects_total").await;
            println!(
                "redis reconnects       {:.0} (chat_redis_reconnects_total, every node)",
                reconnects - self.reconnects_before
            );
        }
        let per_message = |cpu: f64| {
            if stored > 0.0 {
                format!(", {:.1} us per message stored", cpu * 1e6 / stored)
            } else {
                String::new()
            }
        };
        if let Some((pid, before)) = self.postgres
            && let Some(after) = tree_cpu(pid)
        {
            let cpu = after - before;
            println!(
                "postgres               cpu={cpu:.2}s ({:.0}% of a core){}",
                100.0 * cpu / wall,
                per_message(cpu)
            );
        }
        if let Some((pid, before)) = self.redis
            && let Ok(after) = proc_sample(pid)
        {
            let cpu = after.cpu_secs - before;
            println!(
                "redis                  cpu={cpu:.2}s ({:.0}% of a core){}",
                100.0 * cpu / wall,
                per_message(cpu)
            );
        }
        if self.servers.is_empty() {
            return None;
        }
        let mut total = 0.0;
        for (pid, before) in &self.servers {
            let after = proc_sample(*pid).ok()?;
            let cpu = after.cpu_secs - before.cpu_secs;
            total += cpu;
            println!(
                "server {pid:<15} cpu={cpu:.2}s over {wall:.1}s ({:.0}% of a core) rss={} KiB (was {} KiB)",
                100.0 * cpu / wall,
                after.rss_kib,
                before.rss_kib
            );
        }
        Some(total)
    }
}

fn print_errors(stats: &Stats) -> u64 {
    let total: u64 = stats.errors.values().sum();
    println!("errors                 {total}");
    let mut errors: Vec<_> = stats.errors.iter().collect();
    errors.sort();
    for (what, n) in errors {
        println!("  {n:>8}  {what}");
    }
    total
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// Starts each connected client's measured phase (`Client::run`, client i as user i), each with a
/// command queue of `queue` entries; returns the queues' senders and the tasks.
fn start_clients(
    clients: Vec<Client>,
    rooms: &Arc<Vec<String>>,
    epoch: Instant,
    shared: &Shared,
    queue: usize,
    limit: u32,
) -> (Vec<mpsc::Sender<Cmd>>, Vec<tokio::task::JoinHandle<()>>) {
    clients
        .into_iter()
        .enumerate()
        .map(|(u, client)| {
            let (tx, rx) = mpsc::channel(queue);
            let task = tokio::spawn(client.run(rooms.clone(), epoch, rx, shared.clone(), u, limit));
            (tx, task)
        })
        .unzip()
}

/// Rooms of WebSocket members with senders: `chat` and `fanout` share it.
struct RoomLoad {
    /// (room index, sender user index) per send, round-robin.
    senders: Vec<(usize, usize)>,
    /// Sockets joined per room: deliveries expected per acknowledged message.
    members_per_room: Vec<u64>,
}

async fn run_rooms(
    gw: Arc<Gateway>,
    common: &Common,
    users: usize,
    room_of: Vec<usize>,
    rooms: usize,
    load: RoomLoad,
    rate: f64,
) -> anyhow::Result<u64> {
    let room_names: Arc<Vec<String>> = Arc::new((0..rooms).map(|r| gw.room_id(r)).collect());
    let members: Vec<(String, Vec<String>)> = (0..rooms)
        .map(|r| {
            let m = (0..users)
                .filter(|u| room_of[*u] == r)
                .map(|u| gw.user_id(u))
                .collect();
            (room_names[r].clone(), m)
        })
        .collect();
    let t = Instant::now();
    gw.setup(&members).await?;
    println!(
        "setup                  {rooms} rooms, {users} members in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let clients = connect_all(
        &gw,
        users,
        &room_names,
        |u| vec![room_of[u]],
        |u| gw.user_id(u),
        common.connect_concurrency,
    )
    .await?;
    println!(
        "connected              {users} sockets (auth + join) in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let shared: Shared = Arc::new((Mutex::new(Stats::new()), Counters::default()));
    let epoch = Instant::now();
    let (txs, tasks) = start_clients(clients, &room_names, epoch, &shared, 1024, 30);
    let observer = Observer::start(&gw, common).await;
    let duration = Duration::from_secs(common.duration);
    let mut overflow = 0u64;
    let issued = paced(rate, duration, |k| {
        let (room, user) = load.senders[(k % load.senders.len() as u64) as usize];
        if txs[user].try_send(Cmd::Send { room }).is_err() {
            overflow += 1;
        }
    })
    .await;
    let load_secs = observer.started.elapsed().as_secs_f64();
    // Drain: until every acknowledged message reached every member, or the drain time is up.
    let drain_until = Instant::now() + Duration::from_millis(common.drain_ms);
    let expected = || {
        let s = shared.0.lock().unwrap();
        s.acked
            .iter()
            .map(|(room, n)| n * load.members_per_room[*room])
            .sum::<u64>()
    };
    while Instant::now() < drain_until {
        let c = &shared.1;
        // Every scheduled command taken up by its connection, every request answered, every
        // acknowledged message delivered to every member.
        let requests = c.requests.load(Ordering::Relaxed);
        if requests >= issued - overflow
            && c.replies.load(Ordering::Relaxed) >= requests
            && c.delivered.load(Ordering::Relaxed) >= expected()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = observer.finish(&gw).await;
    for tx in &txs {
        let _ = tx.try_send(Cmd::Close);
    }
    drop(txs);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }

    let c = &shared.1;
    let stats = shared.0.lock().unwrap();
    let sent = c.sent.load(Ordering::Relaxed);
    let acked: u64 = stats.acked.values().sum();
    let delivered = c.delivered.load(Ordering::Relaxed);
    let expected = stats
        .acked
        .iter()
        .map(|(room, n)| n * load.members_per_room[*room])
        .sum::<u64>();
    println!(
        "sent                   {sent} ({:.0} msgs/s; {issued} scheduled, {overflow} dropped: generator backlog)",
        sent as f64 / load_secs
    );
    println!(
        "acknowledged           {acked} ({:.0} msgs/s)",
        acked as f64 / load_secs
    );
    println!(
        "delivered              {delivered} of {expected} expected ({:.0}/s)",
        delivered as f64 / load_secs
    );
    let lost = expected.saturating_sub(delivered);
    let unanswered = c
        .requests
        .load(Ordering::Relaxed)
        .saturating_sub(c.replies.load(Ordering::Relaxed));
    let duplicates = c.duplicates.load(Ordering::Relaxed);
    println!("lost                   {lost} (acknowledged, not delivered to every member)");
    println!("unanswered sends       {unanswered}");
    println!("duplicates             {duplicates}");
    line("send ack latency", &stats.ack);
    line("delivery latency", &stats.delivery);
    let errors = print_errors(&stats);
    if let Some(cpu) = cpu
        && delivered > 0
    {
        println!(
            "server cpu per delivery {:.2} us (per message {:.1} us)",
            cpu * 1e6 / delivered as f64,
            cpu * 1e6 / acked.max(1) as f64
        );
    }
    Ok(errors + lost + unanswered + duplicates + overflow)
}

async fn chat(
    gw: Arc<Gateway>,
    common: &Common,
    users: usize,
    room_size: usize,
    rate: f64,
) -> anyhow::Result<u64> {
    let room_size = room_size.clamp(1, users.max(1));
    let rooms = users.div_ceil(room_size);
    let room_of: Vec<usize> = (0..users).map(|u| u / room_size).collect();
    let members_per_room = (0..rooms)
        .map(|r| room_of.iter().filter(|x| **x == r).count() as u64)
        .collect();
    // Round-robin over rooms first, then over each room's members, so every room gets the same
    // share of the rate and every user sends.
    let senders = (0..users)
        .map(|k| {
            let room = k % rooms;
            let first = room * room_size;
            let size = room_size.min(users - first);
            (room, first + (k / rooms) % size)
        })
        .collect();
    println!(
        "scenario               chat: {users} users, rooms of {room_size} ({rooms} rooms), {rate} msgs/s for {}s",
        common.duration
    );
    let load = RoomLoad {
        senders,
        members_per_room,
    };
    run_rooms(gw, common, users, room_of, rooms, load, rate).await
}

async fn fanout(
    gw: Arc<Gateway>,
    common: &Common,
    rooms: usize,
    receivers: usize,
    rate: f64,
) -> anyhow::Result<u64> {
    let rooms = rooms.max(1);
    // Per room: `receivers` receivers and one sender (who has joined too and receives its own).
    let per_room = receivers + 1;
    let users = rooms * per_room;
    let room_of: Vec<usize> = (0..users).map(|u| u / per_room).collect();
    let members_per_room = vec![per_room as u64; rooms];
    let senders = (0..rooms).map(|r| (r, r * per_room)).collect();
    println!(
        "scenario               fanout: {rooms} rooms x {receivers} receivers (+1 sender each), {rate} msgs/s for {}s",
        common.duration
    );
    let load = RoomLoad {
        senders,
        members_per_room,
    };
    run_rooms(gw, common, users, room_of, rooms, load, rate).await
}

async fn idle(gw: Arc<Gateway>, common: &Common, sockets: usize) -> anyhow::Result<u64> {
    let limit = raise_nofile();
    println!(
        "scenario               idle: {sockets} authenticated sockets (open-file limit here {limit})"
    );
    if (sockets as u64) + 64 > limit {
        bail!("{sockets} sockets need a higher open-file limit than {limit} (ulimit -n)");
    }
    let before = common.server_pid.first().and_then(|p| proc_sample(*p).ok());
    let t = Instant::now();
    let no_rooms: Arc<Vec<String>> = Arc::new(Vec::new());
    let user = gw.user_id(0);
    // Authenticated sockets need distinct users past the per-user limit (10 per node).
    let clients = connect_all(
        &gw,
        sockets,
        &no_rooms,
        |_| Vec::new(),
        |u| format!("{user}-{u}"),
        common.connect_concurrency,
    )
    .await?;
    let connect_secs = t.elapsed().as_secs_f64();
    println!(
        "connected              {} sockets in {connect_secs:.1}s ({:.0}/s)",
        clients.len(),
        clients.len() as f64 / connect_secs
    );
    // Each socket gets a reader, so the server's heartbeat pings are answered and a close by the
    // server is counted.
    let closed = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let closed = closed.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        msg = c.ws.next() => match msg {
                            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                                closed.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            Some(Ok(_)) => {}
                        },
                    }
                }
                let _ = c.ws.close(None).await;
            })
        })
        .collect();
    // Let the server settle (allocator, timers), sample, then hold for the rest of the duration.
    tokio::time::sleep(Duration::from_secs(common.duration.min(5))).await;
    let during = common.server_pid.first().and_then(|p| proc_sample(*p).ok());
    tokio::time::sleep(Duration::from_secs(common.duration.saturating_sub(5))).await;
    let closed = closed.load(Ordering::Relaxed);
    let alive = sockets - closed;
    println!("still open             {alive} of {sockets}");
    if let (Some(b), Some(d)) = (before, during) {
        let per = (d.rss_kib.saturating_sub(b.rss_kib)) as f64 * 1024.0 / sockets as f64;
        println!(
            "server rss             {} KiB before, {} KiB with the sockets: {:.2} KiB per connection ({per:.0} bytes)",
            b.rss_kib,
            d.rss_kib,
            per / 1024.0
        );
    }
    stop.cancel();
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }
    println!("errors                 {closed}");
    Ok(closed as u64)
}

#[allow(clippy::too_many_arguments)]
async fn history(
    gw: Arc<Gateway>,
    common: &Common,
    hot_rooms: usize,
    cold_rooms: usize,
    fill: usize,
    rate: f64,
    cold_fraction: f64,
    sockets: usize,
    limit: u32,
) -> anyhow::Result<u64> {
    let hot_rooms = hot_rooms.max(1);
    let rooms = hot_rooms + cold_rooms;
    let sockets = sockets.max(1);
    println!(
        "scenario               history: {hot_rooms} hot rooms, {cold_rooms} cold rooms of {fill} messages, {rate} reads/s ({:.0}% cold), {sockets} sockets, limit {limit}",
        cold_fraction * 100.0
    );
    let room_names: Arc<Vec<String>> = Arc::new((0..rooms).map(|r| gw.room_id(r)).collect());
    let readers: Vec<String> = (0..sockets).map(|u| gw.user_id(u)).collect();
    let members: Vec<(String, Vec<String>)> = room_names
        .iter()
        .map(|r| (r.clone(), readers.clone()))
        .collect();
    gw.setup(&members).await?;
    // Fill every room (hot ones too, so their page is full) over one socket per room, pipelined.
    let t = Instant::now();
    let fills: Vec<anyhow::Result<()>> = futures::stream::iter(0..rooms)
        .map(|r| {
            let gw = gw.clone();
            let room = room_names[r].clone();
            let token = gw.token(&readers[r % sockets]);
            let n = if r < hot_rooms {
                (limit as usize).min(fill)
            } else {
                fill
            };
            async move { fill_room(&gw, r, &token, &room, n).await }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    fills.into_iter().collect::<anyhow::Result<()>>()?;
    println!(
        "filled                 {rooms} rooms in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let clients = connect_all(
        &gw,
        sockets,
        &room_names,
        |_| Vec::new(),
        |u| gw.user_id(u),
        common.connect_concurrency,
    )
    .await?;
    let shared: Shared = Arc::new((Mutex::new(Stats::new()), Counters::default()));
    let epoch = Instant::now();
    let (txs, tasks) = start_clients(clients, &room_names, epoch, &shared, 4096, limit);
    let observer = Observer::start(&gw, common).await;
    let mut overflow = 0u64;
    let mut rng_state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_random = move || {
        // xorshift64*: cheap, reproducible page choice.
        rng_state ^= rng_state >> 12;
        rng_state ^= rng_state << 25;
        rng_state ^= rng_state >> 27;
        rng_state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let cold_every = if cold_fraction > 0.0 && cold_rooms > 0 {
        (1.0 / cold_fraction.min(1.0)).round().max(1.0) as u64
    } else {
        0
    };
    let issued = paced(rate, Duration::from_secs(common.duration), |k| {
        let cmd = if cold_every > 0 && k % cold_every == 0 {
            let room = hot_rooms + (next_random() % cold_rooms as u64) as usize;
            let before = limit as u64
                + 1
                + next_random() % (fill as u64).saturating_sub(limit as u64).max(1);
            Cmd::History {
                room,
                before: Some(before as i64),
                cold: true,
            }
        } else {
            Cmd::History {
                room: (k % hot_rooms as u64) as usize,
                before: None,
                cold: false,
            }
        };
        if txs[(k % sockets as u64) as usize].try_send(cmd).is_err() {
            overflow += 1;
        }
    })
    .await;
    let load_secs = observer.started.elapsed().as_secs_f64();
    let drain_until = Instant::now() + Duration::from_millis(common.drain_ms);
    while Instant::now() < drain_until
        && (shared.1.requests.load(Ordering::Relaxed) < issued - overflow
            || shared.1.replies.load(Ordering::Relaxed) < shared.1.requests.load(Ordering::Relaxed))
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    observer.finish(&gw).await;
    for tx in &txs {
        let _ = tx.try_send(Cmd::Close);
    }
    drop(txs);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let stats = shared.0.lock().unwrap();
    let replies = shared.1.replies.load(Ordering::Relaxed);
    println!(
        "reads                  {replies} replies ({:.0}/s; {issued} scheduled, {overflow} dropped: generator backlog)",
        replies as f64 / load_secs
    );
    line("hot page latency", &stats.hot);
    line("cold page latency", &stats.cold);
    let errors = print_errors(&stats);
    Ok(errors
        + overflow
        + shared
            .1
            .requests
            .load(Ordering::Relaxed)
            .saturating_sub(replies))
}

/// Writes `n` messages into `room` over one socket, pipelined in windows of 64.
async fn fill_room(
    gw: &Gateway,
    k: usize,
    token: &str,
    room: &str,
    n: usize,
) -> anyhow::Result<()> {
    let mut c = Client::connect(gw, k, token, &[]).await?;
    let mut sent = 0usize;
    while sent < n {
        let window = (n - sent).min(64);
        let first = c.next_id;
        for i in 0..window {
            let id = c.next_id;
            c.next_id += 1;
            let f = json!({"type": "send", "id": id, "room": room,
                           "content": format!("fill {}", sent + i), "clientMsgId": format!("fill-{}", sent + i)});
            c.ws.feed(Message::text(f.to_string())).await?;
        }
        c.ws.flush().await?;
        let mut got = 0usize;
        while got < window {
            let msg = tokio::time::timeout(Duration::from_secs(30), c.ws.next())
                .await
                .context("fill: no reply within 30 s")?
                .context("fill: socket closed")??;
            let Message::Text(text) = msg else { continue };
            let v: serde_json::Value = serde_json::from_str(&text)?;
            if v["type"] == "error" {
                bail!("fill {room}: {}", v["error"]);
            }
            if v["type"] == "result" && v["id"].as_u64().is_some_and(|id| id >= first) {
                got += 1;
            }
        }
        sent += window;
    }
    let _ = c.ws.close(None).await;
    Ok(())
}

async fn seed(
    gw: Arc<Gateway>,
    common: &Common,
    users: usize,
    rooms: usize,
    think_ms: u64,
    limit: u32,
) -> anyhow::Result<u64> {
    let rooms = rooms.clamp(1, users.max(1));
    println!(
        "scenario               seed: {users} users over {rooms} rooms, GET history + POST send, {think_ms} ms pause, {}s",
        common.duration
    );
    let room_names: Vec<String> = (0..rooms).map(|r| gw.room_id(r)).collect();
    let members: Vec<(String, Vec<String>)> = (0..rooms)
        .map(|r| {
            let m = (0..users)
                .filter(|u| u % rooms == r)
                .map(|u| gw.user_id(u))
                .collect();
            (room_names[r].clone(), m)
        })
        .collect();
    gw.setup(&members).await?;
    let shared: Shared = Arc::new((Mutex::new(Stats::new()), Counters::default()));
    let observer = Observer::start(&gw, common).await;
    let deadline = Instant::now() + Duration::from_secs(common.duration);
    let iterations = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for u in 0..users {
        let gw = gw.clone();
        let shared = shared.clone();
        let iterations = iterations.clone();
        let url = format!(
            "{}/api/chat/rooms/{}/messages",
            gw.base,
            room_names[u % rooms]
        );
        let token = gw.token(&gw.user_id(u));
        // Spread the users' first iterations over one pause, as a ramp would.
        let offset = Duration::from_millis(think_ms * u as u64 / users.max(1) as u64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = gw
                    .http
                    .get(format!("{url}?limit={limit}"))
                    .bearer_auth(&token)
                    .send()
                    .await;
                let ok = match r {
                    Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                    Ok(r) => {
                        shared
                            .0
                            .lock()
                            .unwrap()
                            .error(format!("history HTTP {}", r.status()));
                        false
                    }
                    Err(e) => {
                        shared.0.lock().unwrap().error(format!("history: {e}"));
                        false
                    }
                };
                if ok {
                    record(&mut shared.0.lock().unwrap().http_history, t.elapsed());
                }
                let t = Instant::now();
                let body =
                    json!({"content": format!("load {u}/{n}"), "clientMsgId": format!("s{u}-{n}")});
                let r = gw
                    .http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await;
                shared.1.sent.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok(r) if r.status() == 201 => {
                        let _ = r.bytes().await;
                        let mut s = shared.0.lock().unwrap();
                        record(&mut s.http_send, t.elapsed());
                        *s.acked.entry(0).or_default() += 1;
                    }
                    Ok(r) => shared
                        .0
                        .lock()
                        .unwrap()
                        .error(format!("send HTTP {}", r.status())),
                    Err(e) => shared.0.lock().unwrap().error(format!("send: {e}")),
                }
                n += 1;
                iterations.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(think_ms)).await;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let secs = observer.started.elapsed().as_secs_f64();
    observer.finish(&gw).await;
    let stats = shared.0.lock().unwrap();
    let its = iterations.load(Ordering::Relaxed);
    let requests = its * 2;
    println!(
        "iterations             {its} ({:.0}/s, {:.0} requests/s)",
        its as f64 / secs,
        requests as f64 / secs
    );
    line("GET history", &stats.http_history);
    line("POST send", &stats.http_send);
    let errors = print_errors(&stats);
    println!(
        "error rate             {:.3}%",
        100.0 * errors as f64 / requests.max(1) as f64
    );
    Ok(errors)
}

// ---------------------------------------------------------------------------------------------
// The presence reconnect storm

/// What the storm scenario is asked to do (see `Scenario::Storm`).
struct StormOptions {
    clients: usize,
    room_size: usize,
    probes: usize,
    rate: f64,
    settle: u64,
    reconnect_concurrency: usize,
    storm_timeout: u64,
    slow_ms: Option<f64>,
}

/// The storm's phases, by the time a message was sent (or a push received).
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    /// Connecting, and the presence pushes of the first joins settling: not measured.
    Warmup,
    Baseline,
    Storm,
    After,
}

const PHASES: [Phase; 3] = [Phase::Baseline, Phase::Storm, Phase::After];

impl Phase {
    fn label(self) -> &'static str {
        match self {
            Phase::Warmup => "warmup",
            Phase::Baseline => "baseline",
            Phase::Storm => "storm",
            Phase::After => "after",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Phase boundaries in microseconds since the run's epoch (`u64::MAX` until reached): the start
/// of the measured load, the moment the clients dropped their sockets, and the moment the last of
/// them was back in its room.
struct Phases {
    started: AtomicU64,
    dropped: AtomicU64,
    back: AtomicU64,
}

impl Phases {
    fn new() -> Self {
        Self {
            started: AtomicU64::new(u64::MAX),
            dropped: AtomicU64::new(u64::MAX),
            back: AtomicU64::new(u64::MAX),
        }
    }

    fn of(&self, t: u64) -> Phase {
        if t < self.started.load(Ordering::Relaxed) {
            Phase::Warmup
        } else if t < self.dropped.load(Ordering::Relaxed) {
            Phase::Baseline
        } else if t <= self.back.load(Ordering::Relaxed) {
            Phase::Storm
        } else {
            Phase::After
        }
    }
}

fn micros_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

/// Counters both sides of the generator (members, probes) add to while the run goes on, so the
/// drain knows when every acknowledged message reached every socket of its room.
struct StormCounters {
    /// Messages acknowledged, per room.
    acked: Vec<AtomicU64>,
    /// New messages received by any socket (members and probes).
    delivered: AtomicU64,
    requests: AtomicU64,
    replies: AtomicU64,
    /// Clients back in their room after the drop.
    back: AtomicUsize,
    /// Answers to the final presence requests.
    presence_answers: AtomicUsize,
}

/// One delivery: when the message was sent and how long it took, in microseconds.
type Sample = (u64, u64);

/// The send time and sender carried in a probe message's content (`t=<us> p=<probe> n=<k>`).
fn probe_stamp(content: &str) -> Option<(u64, usize)> {
    let mut parts = content.split(' ');
    let t = parts.next()?.strip_prefix("t=")?.parse().ok()?;
    let p = parts.next()?.strip_prefix("p=")?.parse().ok()?;
    Some((t, p))
}

/// Connects, authenticates and joins one room with `since`; returns the client, the join's
/// `head` and whether the server asked for a reload (more missed than it replays).
async fn join_one(
    gw: &Gateway,
    n: usize,
    token: &str,
    room: &str,
    since: Option<i64>,
) -> anyhow::Result<(Client, i64, bool)> {
    let mut c = Client::connect(gw, n, token, &[]).await?;
    let mut frame = json!({"type": "join", "room": room});
    if let Some(since) = since {
        frame["since"] = json!(since);
    }
    let result = c
        .call(frame)
        .await
        .with_context(|| format!("join {room}"))?;
    let head = result["head"].as_i64().unwrap_or(0);
    Ok((c, head, result["reload"] == json!(true)))
}

/// What one storm client saw.
#[derive(Default)]
struct MemberReport {
    /// Deliveries of probe messages (live, or replayed on resume after the reconnect).
    samples: Vec<Sample>,
    delivered: u64,
    duplicates: u64,
    /// Presence pushes received, by the phase they arrived in.
    presence: [u32; 4],
    /// When the client was back in its room (join answered), us since the epoch.
    back_at: Option<u64>,
    /// Reconnect attempts that failed (and were retried).
    retries: u32,
    errors: Vec<String>,
}

/// Everything a storm client needs besides its socket.
struct MemberCtx {
    gw: Arc<Gateway>,
    n: usize,
    user: String,
    room: String,
    epoch: Instant,
    phases: Arc<Phases>,
    counters: Arc<StormCounters>,
    /// Cancelled when every client drops its socket.
    drop: tokio_util::sync::CancellationToken,
    /// Cancelled at the end of the run.
    stop: tokio_util::sync::CancellationToken,
    /// Reconnect handshakes in flight.
    gate: Arc<Semaphore>,
    /// Reconnects give up this long after the drop.
    storm_timeout: Duration,
}

impl MemberCtx {
    /// Reads pushes until `until` completes (true) or the socket ends (false).
    async fn read(
        &self,
        c: &mut Client,
        last_seq: &mut i64,
        report: &mut MemberReport,
        until: impl std::future::Future<Output = ()>,
    ) -> bool {
        tokio::pin!(until);
        loop {
            let msg = tokio::select! {
                biased;
                _ = &mut until => return true,
                msg = c.ws.next() => msg,
            };
            let text = match read_text(msg) {
                Read::Text(text) => text,
                Read::Skip => continue,
                Read::Ended(why) => {
                    report.errors.push(why);
                    return false;
                }
            };
            let now = micros_since(self.epoch);
            let Ok(frame) = serde_json::from_str::<Frame>(&text) else {
                report.errors.push("unparsable frame".into());
                continue;
            };
            match frame.kind {
                "message" => {
                    let Some(m) = frame.message else { continue };
                    if m.seq <= *last_seq {
                        report.duplicates += 1;
                        continue;
                    }
                    *last_seq = m.seq;
                    report.delivered += 1;
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    if let Some((t, _)) = probe_stamp(&m.content) {
                        report.samples.push((t, now.saturating_sub(t).max(1)));
                    }
                }
                "presence" => report.presence[self.phases.of(now).index()] += 1,
                _ => {}
            }
        }
    }

    async fn run(self, mut c: Client, mut last_seq: i64) -> MemberReport {
        let mut report = MemberReport::default();
        let token = self.gw.token(&self.user);
        if !self
            .read(&mut c, &mut last_seq, &mut report, self.drop.cancelled())
            .await
        {
            self.stop.cancelled().await;
            return report;
        }
        // Dropped without a close frame, as a network blip or a crashed tab would.
        drop(c);
        let give_up = Instant::now() + self.storm_timeout;
        let mut c = loop {
            let permit = self.gate.acquire().await.expect("semaphore open");
            let joined = join_one(&self.gw, self.n, &token, &self.room, Some(last_seq)).await;
            drop(permit);
            match joined {
                Ok((c, _, reload)) => {
                    if reload {
                        report
                            .errors
                            .push("join asked for a reload: more missed than replayed".into());
                    }
                    break c;
                }
                Err(e) => {
                    report.retries += 1;
                    if Instant::now() > give_up {
                        report.errors.push(format!("not back: {e:#}"));
                        self.stop.cancelled().await;
                        return report;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        report.back_at = Some(micros_since(self.epoch));
        self.counters.back.fetch_add(1, Ordering::Relaxed);
        if self
            .read(&mut c, &mut last_seq, &mut report, self.stop.cancelled())
            .await
        {
            let _ = c.ws.close(None).await;
        }
        report
    }
}

/// Commands for a probe socket.
enum ProbeCmd {
    Send,
    /// Ask the room's presence (the final check).
    Presence,
    Close,
}

#[derive(Clone, Copy)]
enum ProbePending {
    Send { at: Instant, t: u64, wall_ms: i64 },
    Presence,
}

/// What one probe saw.
#[derive(Default)]
struct ProbeReport {
    /// Deliveries of the other probes' messages.
    samples: Vec<Sample>,
    /// Send acknowledgements: (sent, latency).
    acks: Vec<Sample>,
    /// (sent, ms from send to the gateway's createdAt stamp, ms from that stamp to the ack).
    split: Vec<(u64, i64, i64)>,
    duplicates: u64,
    /// Presence pushes received, by the phase they arrived in.
    presence: [u32; 4],
    /// The last presence push: when (us since the epoch) and the count it carried.
    last_presence: Option<(u64, u64)>,
    /// The room's online count from the final presence request.
    final_online: Option<u64>,
    errors: Vec<String>,
}

/// One server-side sample: us since the epoch, CPU seconds and RSS (KiB) of the gateway and of
/// this generator, and the presence backlog from /metrics.
#[derive(Clone, Copy, Default)]
struct Sampled {
    t: u64,
    server: Option<ProcSample>,
    generator: Option<ProcSample>,
    backlog: Option<f64>,
}

/// The probe side's results.
struct ProbeSide {
    probes: Vec<ProbeReport>,
    samples: Vec<Sampled>,
    issued: u64,
    overflow: u64,
}

/// How the main thread steers the probe thread.
struct ProbeControl {
    /// Answered once every probe is connected and joined.
    ready: tokio::sync::oneshot::Sender<anyhow::Result<()>>,
    /// Start sending.
    go: tokio::sync::oneshot::Receiver<()>,
    /// What every time in the run is measured from.
    epoch: Instant,
    stop_sending: tokio_util::sync::CancellationToken,
    /// Ask each room's presence, then close.
    check: tokio::sync::oneshot::Receiver<()>,
    phases: Arc<Phases>,
    counters: Arc<StormCounters>,
    server_pid: Option<u32>,
}

/// A probe: connected the whole run, sends its share of the messages, receives the others'.
#[allow(clippy::too_many_arguments)]
async fn probe_task(
    mut c: Client,
    me: usize,
    room: usize,
    room_name: String,
    epoch: Instant,
    mut cmds: mpsc::Receiver<ProbeCmd>,
    phases: Arc<Phases>,
    counters: Arc<StormCounters>,
) -> ProbeReport {
    let mut report = ProbeReport::default();
    let mut pending: HashMap<u64, ProbePending> = HashMap::new();
    let mut last_seq = 0i64;
    let mut counter = 0u64;
    loop {
        tokio::select! {
            cmd = cmds.recv() => {
                let id = c.next_id;
                c.next_id += 1;
                let frame = match cmd {
                    None | Some(ProbeCmd::Close) => break,
                    Some(ProbeCmd::Send) => {
                        counter += 1;
                        let at = Instant::now();
                        let t = at.duration_since(epoch).as_micros() as u64;
                        let wall_ms = chrono::Utc::now().timestamp_millis();
                        pending.insert(id, ProbePending::Send { at, t, wall_ms });
                        json!({"type": "send", "id": id, "room": room_name,
                               "content": format!("t={t} p={me} n={counter}"),
                               "clientMsgId": format!("p{me}-{counter}")})
                    }
                    Some(ProbeCmd::Presence) => {
                        pending.insert(id, ProbePending::Presence);
                        json!({"type": "presence", "id": id, "room": room_name, "limit": 1})
                    }
                };
                counters.requests.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = c.ws.send(Message::text(frame.to_string())).await {
                    report.errors.push(format!("socket write: {e}"));
                    break;
                }
            }
            msg = c.ws.next() => {
                let text = match read_text(msg) {
                    Read::Text(text) => text,
                    Read::Skip => continue,
                    Read::Ended(why) => {
                        report.errors.push(format!("probe {why}"));
                        break;
                    }
                };
                let now = Instant::now();
                let now_us = now.duration_since(epoch).as_micros() as u64;
                let Ok(frame) = serde_json::from_str::<Frame>(&text) else {
                    report.errors.push("unparsable frame".into());
                    continue;
                };
                match frame.kind {
                    "message" => {
                        let Some(m) = frame.message else { continue };
                        if m.seq <= last_seq {
                            report.duplicates += 1;
                            continue;
                        }
                        last_seq = m.seq;
                        counters.delivered.fetch_add(1, Ordering::Relaxed);
                        if let Some((t, sender)) = probe_stamp(&m.content)
                            && sender != me
                        {
                            report.samples.push((t, now_us.saturating_sub(t).max(1)));
                        }
                    }
                    "presence" => {
                        report.presence[phases.of(now_us).index()] += 1;
                        if let Some(online) = frame.online {
                            report.last_presence = Some((now_us, online));
                        }
                    }
                    "result" | "error" => {
                        counters.replies.fetch_add(1, Ordering::Relaxed);
                        let Some(p) = frame.id.and_then(|id| pending.remove(&id)) else {
                            continue;
                        };
                        if frame.kind == "error" {
                            let code = frame
                                .error
                                .as_ref()
                                .and_then(|e| e["code"].as_str())
                                .unwrap_or("?")
                                .to_string();
                            report.errors.push(format!("error reply: {code}"));
                            continue;
                        }
                        match p {
                            ProbePending::Send { at, t, wall_ms } => {
                                report.acks.push((t, (now - at).as_micros() as u64));
                                // Where the time went: until the gateway stamped the message
                                // (createdAt, ms), and from there to the ack.
                                let created = frame
                                    .result
                                    .and_then(|r| serde_json::from_str::<serde_json::Value>(r.get()).ok())
                                    .and_then(|r| r["message"]["createdAt"].as_str().and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok()))
                                    .map(|c| c.timestamp_millis());
                                if let Some(created) = created {
                                    let acked = chrono::Utc::now().timestamp_millis();
                                    report.split.push((t, created - wall_ms, acked - created));
                                }
                                counters.acked[room].fetch_add(1, Ordering::Relaxed);
                            }
                            ProbePending::Presence => {
                                counters.presence_answers.fetch_add(1, Ordering::Relaxed);
                                report.final_online = frame
                                    .result
                                    .and_then(|r| serde_json::from_str::<serde_json::Value>(r.get()).ok())
                                    .and_then(|r| r["online"].as_u64());
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    let _ = c.ws.close(None).await;
    report
}

/// The gateway's backlog of presence changes, from /metrics (absent on gateways without it).
async fn presence_backlog(http: &reqwest::Client, base: &str) -> Option<f64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("chat_presence_backlog "))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs the probes (and the server sampler) on a thread and runtime of their own, so that the
/// storm's thousands of handshakes in the generator's main runtime do not delay their clocks.
fn spawn_probes(
    gw: Arc<Gateway>,
    room_names: Arc<Vec<String>>,
    probes: usize,
    rate: f64,
    concurrency: usize,
    ctl: ProbeControl,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<ProbeSide>>> {
    let thread = std::thread::Builder::new()
        .name("probes".into())
        .spawn(move || {
            // The probes measure the gateway: their thread goes ahead of the generator's own
            // reconnect storm on this core (where allowed; an unprivileged run keeps the default).
            // SAFETY: setpriority on the calling thread's id has no memory effects.
            let raised = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -15) };
            if raised != 0 {
                eprintln!("probes: could not raise the probe thread's priority (nice -15); the generator's own churn may delay the probes");
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(run_probes(gw, room_names, probes, rate, concurrency, ctl))
        })?;
    Ok(thread)
}

async fn run_probes(
    gw: Arc<Gateway>,
    room_names: Arc<Vec<String>>,
    per_room: usize,
    rate: f64,
    concurrency: usize,
    ctl: ProbeControl,
) -> anyhow::Result<ProbeSide> {
    let rooms = room_names.len();
    let total = rooms * per_room;
    // Probe p is probe p % per_room of room p / per_room.
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let connects: Vec<_> = (0..total)
        .map(|p| {
            let gw = gw.clone();
            let gate = gate.clone();
            let room = room_names[p / per_room].clone();
            tokio::spawn(async move {
                let _permit = gate.acquire().await.expect("semaphore open");
                let token = gw.token(&gw.probe_id(p));
                join_one(&gw, p, &token, &room, None).await
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(total);
    for (p, h) in connects.into_iter().enumerate() {
        match h.await.context("probe task")? {
            Ok((c, _, _)) => clients.push(c),
            Err(e) => {
                let e = e.context(format!("probe {p} of {total}"));
                let _ = ctl.ready.send(Err(anyhow::anyhow!("{e:#}")));
                bail!("probes not connected");
            }
        }
    }
    let epoch = ctl.epoch;
    let mut txs = Vec::with_capacity(total);
    let mut tasks = Vec::with_capacity(total);
    for (p, c) in clients.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel(1024);
        txs.push(tx);
        let room = p / per_room;
        tasks.push(tokio::spawn(probe_task(
            c,
            p,
            room,
            room_names[room].clone(),
            epoch,
            rx,
            ctl.phases.clone(),
            ctl.counters.clone(),
        )));
    }
    let _ = ctl.ready.send(Ok(()));
    if ctl.go.await.is_err() {
        bail!("the run ended before it started");
    }

    // The sampler: gateway and generator CPU/RSS every 100 ms, the presence backlog every 200 ms.
    let samples = Arc::new(Mutex::new(Vec::<Sampled>::new()));
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let samples = samples.clone();
        let sampling = sampling.clone();
        let pid = ctl.server_pid;
        let base = gw.base.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let me = std::process::id();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut k = 0u64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = sampling.cancelled() => return,
                }
                let backlog = if k.is_multiple_of(2) {
                    presence_backlog(&http, &base).await
                } else {
                    None
                };
                k += 1;
                samples.lock().unwrap().push(Sampled {
                    t: micros_since(epoch),
                    server: pid.and_then(|p| proc_sample(p).ok()),
                    generator: proc_sample(me).ok(),
                    backlog,
                });
            }
        })
    };

    let mut overflow = 0u64;
    let mut issued = 0u64;
    {
        // Round-robin over rooms first, then over each room's probes.
        let send = paced(rate, Duration::from_secs(3600), |k| {
            issued = k + 1;
            let room = (k % rooms as u64) as usize;
            let j = ((k / rooms as u64) % per_room as u64) as usize;
            if txs[room * per_room + j].try_send(ProbeCmd::Send).is_err() {
                overflow += 1;
            }
        });
        tokio::select! {
            _ = send => {}
            _ = ctl.stop_sending.cancelled() => {}
        }
    }
    // Until the main thread has drained; then one presence request per room.
    let _ = ctl.check.await;
    for room in 0..rooms {
        let _ = txs[room * per_room].try_send(ProbeCmd::Presence);
    }
    let asked = Instant::now();
    while Instant::now() < asked + Duration::from_secs(10)
        && ctl.counters.presence_answers.load(Ordering::Relaxed) < rooms
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sampling.cancel();
    let _ = sampler.await;
    for tx in &txs {
        let _ = tx.try_send(ProbeCmd::Close);
    }
    drop(txs);
    let mut probes = Vec::with_capacity(total);
    for t in tasks {
        probes.push(t.await.context("probe task")?);
    }
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    Ok(ProbeSide {
        probes,
        samples,
        issued,
        overflow,
    })
}

fn histogram_of(samples: impl Iterator<Item = u64>) -> Histogram<u64> {
    let mut h = histogram();
    for v in samples {
        h.saturating_record(v.max(1));
    }
    h
}

/// CPU (% of a core) and the highest RSS (KiB) between two moments, from the samples.
fn usage_between(
    samples: &[Sampled],
    from: u64,
    to: u64,
    of: impl Fn(&Sampled) -> Option<ProcSample>,
) -> Option<(f64, u64)> {
    let within: Vec<(u64, ProcSample)> = samples
        .iter()
        .filter(|s| s.t >= from && s.t <= to)
        .filter_map(|s| of(s).map(|p| (s.t, p)))
        .collect();
    let (first, last) = (within.first()?, within.last()?);
    let secs = (last.0 - first.0) as f64 / 1e6;
    let cpu = if secs > 0.0 {
        100.0 * (last.1.cpu_secs - first.1.cpu_secs) / secs
    } else {
        0.0
    };
    let rss = within.iter().map(|(_, p)| p.rss_kib).max().unwrap_or(0);
    Some((cpu, rss))
}

/// The storm step by step (a quarter of a second, or longer so that it fits in 40 lines): from a
/// second before the drop to two seconds after the last client is back.
fn print_timeline(probes: &ProbeSide, clients: &[MemberReport], dropped: u64, back: u64, end: u64) {
    let mut from = dropped.saturating_sub(1_000_000);
    let until = (back + 2_000_000).min(end);
    let step = (until.saturating_sub(from) / 40)
        .max(250_000)
        .div_ceil(250_000)
        * 250_000;
    println!(
        "timeline               from the drop, per {} ms: clients back (total); probe messages sent, their delivery p50 and max; gateway and generator CPU; presence backlog; median split of the send ack (ms until the gateway's createdAt stamp + ms from it to the ack)",
        step / 1000
    );
    let mut backs: Vec<u64> = clients.iter().filter_map(|c| c.back_at).collect();
    backs.sort_unstable();
    while from < until {
        let to = from + step;
        let h = histogram_of(
            probes
                .probes
                .iter()
                .flat_map(|p| p.samples.iter())
                .filter(|(t, _)| (from..to).contains(t))
                .map(|(_, l)| *l),
        );
        let in_step: Vec<&Sampled> = probes
            .samples
            .iter()
            .filter(|s| s.t >= from && s.t <= to)
            .collect();
        let cpu = match (
            in_step.first().and_then(|s| s.server),
            in_step.last().and_then(|s| s.server),
            in_step.first().zip(in_step.last()),
        ) {
            (Some(a), Some(b), Some((sa, sb))) if sb.t > sa.t => format!(
                "{:>4.0}%",
                100.0 * (b.cpu_secs - a.cpu_secs) / ((sb.t - sa.t) as f64 / 1e6)
            ),
            _ => "    -".into(),
        };
        let backlog = in_step
            .iter()
            .filter_map(|s| s.backlog)
            .fold(None, |m: Option<f64>, b| Some(m.map_or(b, |m| m.max(b))))
            .map_or("-".into(), |b| format!("{b:.0}"));
        let ms = |v: u64| v as f64 / 1000.0;
        let (p50, max) = if h.is_empty() {
            ("-".to_string(), "-".to_string())
        } else {
            (
                format!("{:.1}", ms(h.value_at_quantile(0.5))),
                format!("{:.1}", ms(h.max())),
            )
        };
        let mut split: Vec<(i64, i64)> = probes
            .probes
            .iter()
            .flat_map(|p| p.split.iter())
            .filter(|(t, _, _)| (from..to).contains(t))
            .map(|(_, a, b)| (*a, *b))
            .collect();
        split.sort_unstable();
        let split = split
            .get(split.len() / 2)
            .map_or("-".into(), |(a, b)| format!("{a}+{b}"));
        let gen_cpu = match (in_step.first(), in_step.last()) {
            (Some(sa), Some(sb)) if sb.t > sa.t => match (sa.generator, sb.generator) {
                (Some(a), Some(b)) => format!(
                    "{:>4.0}%",
                    100.0 * (b.cpu_secs - a.cpu_secs) / ((sb.t - sa.t) as f64 / 1e6)
                ),
                _ => "    -".into(),
            },
            _ => "    -".into(),
        };
        println!(
            "  {:>+6.2}s  back {:>6}  sent {:>4}  p50 {:>8}ms  max {:>8}ms  cpu {cpu}  gen {gen_cpu}  backlog {backlog}  split {split}",
            (from as f64 - dropped as f64) / 1e6,
            backs.partition_point(|b| *b < to),
            h.len(),
            p50,
            max,
        );
        from = to;
    }
}

/// Every probe message sent from a second before the drop on that took longer than `slow_ms` to
/// deliver: when, its delivery and ack latency, and the ack's split (ms until the gateway's
/// createdAt stamp + ms from it to the ack). A stall shows as a staircase of messages released
/// together; the split tells a late read (first part) from a late write or fan-out (second).
fn print_slow(probes: &ProbeSide, dropped: u64, slow_ms: f64) {
    let mut acks: HashMap<u64, u64> = HashMap::new();
    let mut splits: HashMap<u64, (i64, i64)> = HashMap::new();
    for p in &probes.probes {
        acks.extend(p.acks.iter().copied());
        splits.extend(p.split.iter().map(|(t, a, b)| (*t, (*a, *b))));
    }
    let from = dropped.saturating_sub(1_000_000);
    let mut slow: Vec<(u64, u64)> = probes
        .probes
        .iter()
        .flat_map(|p| p.samples.iter().copied())
        .filter(|(t, l)| *t >= from && *l as f64 > slow_ms * 1000.0)
        .collect();
    slow.sort_unstable();
    println!(
        "slow messages          {} delivered in over {slow_ms} ms (from 1 s before the drop)",
        slow.len()
    );
    for (t, l) in slow {
        let split = splits
            .get(&t)
            .map_or("-".into(), |(a, b)| format!("{a}+{b}"));
        println!(
            "  {:>+8.4}s  delivery {:>7.1}ms  ack {:>7.1}ms  split {split}",
            (t as f64 - dropped as f64) / 1e6,
            l as f64 / 1000.0,
            acks.get(&t).copied().unwrap_or(0) as f64 / 1000.0,
        );
    }
}

async fn storm(gw: Arc<Gateway>, common: &Common, o: StormOptions) -> anyhow::Result<u64> {
    let limit = raise_nofile();
    let room_size = o.room_size.clamp(1, o.clients.max(1));
    let rooms = o.clients.div_ceil(room_size);
    let per_room = o.probes.max(2);
    let sockets = o.clients + rooms * per_room;
    println!(
        "scenario               storm: {} clients in rooms of {room_size} ({rooms} rooms) + {per_room} probes per room, {} msgs/s from the probes; baseline {}s, drop all, reconnect all ({} handshakes at once), {}s after",
        o.clients, o.rate, common.duration, o.reconnect_concurrency, o.settle
    );
    if (sockets as u64) + 64 > limit {
        bail!("{sockets} sockets need a higher open-file limit than {limit} (ulimit -n)");
    }
    let room_of = |u: usize| u / room_size;
    let room_names: Arc<Vec<String>> = Arc::new((0..rooms).map(|r| gw.room_id(r)).collect());
    let members: Vec<(String, Vec<String>)> = (0..rooms)
        .map(|r| {
            let mut m: Vec<String> = (r * room_size..((r + 1) * room_size).min(o.clients))
                .map(|u| gw.user_id(u))
                .collect();
            m.extend((r * per_room..(r + 1) * per_room).map(|p| gw.probe_id(p)));
            (room_names[r].clone(), m)
        })
        .collect();
    let sockets_in_room: Vec<u64> = members.iter().map(|(_, m)| m.len() as u64).collect();
    let t = Instant::now();
    gw.setup(&members).await?;
    println!(
        "setup                  {rooms} rooms, {sockets} members in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let phases = Arc::new(Phases::new());
    let counters = Arc::new(StormCounters {
        acked: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
        delivered: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        replies: AtomicU64::new(0),
        back: AtomicUsize::new(0),
        presence_answers: AtomicUsize::new(0),
    });
    let epoch = Instant::now();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel();
    let (check_tx, check_rx) = tokio::sync::oneshot::channel();
    let stop_sending = tokio_util::sync::CancellationToken::new();
    let t = Instant::now();
    let probe_thread = spawn_probes(
        gw.clone(),
        room_names.clone(),
        per_room,
        o.rate,
        common.connect_concurrency,
        ProbeControl {
            ready: ready_tx,
            go: go_rx,
            epoch,
            stop_sending: stop_sending.clone(),
            check: check_rx,
            phases: phases.clone(),
            counters: counters.clone(),
            server_pid: common.server_pid.first().copied(),
        },
    )?;
    ready_rx.await.context("probe thread")??;

    let gate = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let connects: Vec<_> = (0..o.clients)
        .map(|u| {
            let gw = gw.clone();
            let gate = gate.clone();
            let room = room_names[room_of(u)].clone();
            tokio::spawn(async move {
                let _permit = gate.acquire().await.expect("semaphore open");
                let token = gw.token(&gw.user_id(u));
                join_one(&gw, u, &token, &room, None).await
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(o.clients);
    for (u, h) in connects.into_iter().enumerate() {
        let (c, head, _) = h
            .await?
            .with_context(|| format!("client {u} of {}", o.clients))?;
        clients.push((c, head));
    }
    println!(
        "connected              {} clients + {} probes (auth + join) in {:.1}s",
        o.clients,
        rooms * per_room,
        t.elapsed().as_secs_f64()
    );
    let drop_all = tokio_util::sync::CancellationToken::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let reconnect_gate = Arc::new(Semaphore::new(o.reconnect_concurrency.max(1)));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(u, (c, head))| {
            let ctx = MemberCtx {
                gw: gw.clone(),
                n: u,
                user: gw.user_id(u),
                room: room_names[room_of(u)].clone(),
                epoch,
                phases: phases.clone(),
                counters: counters.clone(),
                drop: drop_all.clone(),
                stop: stop.clone(),
                gate: reconnect_gate.clone(),
                storm_timeout: Duration::from_secs(o.storm_timeout),
            };
            tokio::spawn(ctx.run(c, head))
        })
        .collect();
    // Let the presence of the first joins settle (pushes are at most one per room per second, and
    // the gateway's backlog of presence changes, where it tells, is empty).
    let quiet_from = Instant::now();
    while quiet_from.elapsed() < Duration::from_secs(30)
        && presence_backlog(&gw.http, &gw.base)
            .await
            .is_some_and(|b| b > 0.0)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Phase 1: everyone connected.
    phases.started.store(micros_since(epoch), Ordering::Relaxed);
    let _ = go_tx.send(());
    tokio::time::sleep(Duration::from_secs(common.duration)).await;
    // Phase 2: every client drops its socket at once and reconnects at once.
    phases.dropped.store(micros_since(epoch), Ordering::Relaxed);

    drop_all.cancel();
    let storm_until = Instant::now() + Duration::from_secs(o.storm_timeout);
    while counters.back.load(Ordering::Relaxed) < o.clients && Instant::now() < storm_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    phases.back.store(micros_since(epoch), Ordering::Relaxed);
    // Phase 3: the same load for a while after everyone is back.
    tokio::time::sleep(Duration::from_secs(o.settle)).await;
    let end = micros_since(epoch);
    stop_sending.cancel();

    // Drain: every send answered and every acknowledged message at every socket of its room.
    let expected = || {
        counters
            .acked
            .iter()
            .zip(&sockets_in_room)
            .map(|(a, n)| a.load(Ordering::Relaxed) * n)
            .sum::<u64>()
    };
    let drain_until = Instant::now() + Duration::from_millis(common.drain_ms);
    tokio::time::sleep(Duration::from_millis(50)).await;
    while Instant::now() < drain_until
        && (counters.replies.load(Ordering::Relaxed) < counters.requests.load(Ordering::Relaxed)
            || counters.delivered.load(Ordering::Relaxed) < expected())
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unanswered = counters
        .requests
        .load(Ordering::Relaxed)
        .saturating_sub(counters.replies.load(Ordering::Relaxed));
    let _ = check_tx.send(());
    let probe_side = tokio::task::spawn_blocking(move || probe_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the probe thread panicked"))??;
    stop.cancel();
    let mut reports = Vec::with_capacity(tasks.len());
    for t in tasks {
        reports.push(t.await?);
    }

    // The report.
    let started = phases.started.load(Ordering::Relaxed);
    let dropped = phases.dropped.load(Ordering::Relaxed);
    let back_all = phases.back.load(Ordering::Relaxed);
    let secs = |us: u64| us as f64 / 1e6;
    let backs: Vec<u64> = reports.iter().filter_map(|r| r.back_at).collect();
    let not_back = o.clients - backs.len();
    let retries: u64 = reports.iter().map(|r| r.retries as u64).sum();
    if let (Some(first), Some(last)) = (backs.iter().min(), backs.iter().max()) {
        println!(
            "back                   {} of {} clients; first {:.2}s, last {:.2}s after the drop: reconnect time (first to last back) {:.2}s; {retries} failed attempts retried",
            backs.len(),
            o.clients,
            secs(first - dropped),
            secs(last - dropped),
            secs(last - first)
        );
    }
    println!(
        "phases                 baseline {:.1}s, storm {:.1}s (drop to last back), after {:.1}s",
        secs(dropped - started),
        secs(back_all.saturating_sub(dropped)),
        secs(end.saturating_sub(back_all))
    );
    let probe_samples = || probe_side.probes.iter().flat_map(|p| p.samples.iter());
    let mut p99 = [0u64; 4];
    for phase in PHASES {
        let h = histogram_of(
            probe_samples()
                .filter(|(t, _)| phases.of(*t) == phase)
                .map(|(_, l)| *l),
        );
        if !h.is_empty() {
            p99[phase.index()] = h.value_at_quantile(0.99);
        }
        line(&format!("probe latency {}", phase.label()), &h);
    }
    let (base_p99, storm_p99) = (p99[Phase::Baseline.index()], p99[Phase::Storm.index()]);
    let ratio = storm_p99 as f64 / base_p99.max(1) as f64;
    println!(
        "storm p99 / baseline   {:.2}x ({:.1} ms / {:.1} ms): requirement <= 2x {}",
        ratio,
        storm_p99 as f64 / 1000.0,
        base_p99 as f64 / 1000.0,
        if ratio <= 2.0 { "met" } else { "MISSED" }
    );
    let acks = || probe_side.probes.iter().flat_map(|p| p.acks.iter());
    for phase in PHASES {
        let h = histogram_of(
            acks()
                .filter(|(t, _)| phases.of(*t) == phase)
                .map(|(_, l)| *l),
        );
        line(&format!("send ack {}", phase.label()), &h);
    }
    for phase in PHASES {
        let h = histogram_of(
            reports
                .iter()
                .flat_map(|r| r.samples.iter())
                .filter(|(t, _)| phases.of(*t) == phase)
                .map(|(_, l)| *l),
        );
        line(&format!("client latency {}", phase.label()), &h);
    }
    println!("                       (clients: live, or replayed on resume after the reconnect)");

    print_timeline(&probe_side, &reports, dropped, back_all, end);
    if let Some(slow_ms) = o.slow_ms {
        print_slow(&probe_side, dropped, slow_ms);
    }

    let storm_secs = secs(end.saturating_sub(dropped)).max(1e-6);
    let probe_pushes: Vec<u32> = probe_side
        .probes
        .iter()
        .map(|p| p.presence[2] + p.presence[3])
        .collect();
    let client_pushes: Vec<u32> = reports
        .iter()
        .map(|r| r.presence[2] + r.presence[3])
        .collect();
    let mean = |v: &[u32]| v.iter().map(|x| *x as f64).sum::<f64>() / v.len().max(1) as f64;
    let max = |v: &[u32]| v.iter().copied().max().unwrap_or(0);
    println!(
        "presence pushes        from the drop to the end ({storm_secs:.1}s): per probe mean {:.1}, max {} ({:.2}/s); per client (after its reconnect) mean {:.1}, max {}; baseline per probe {:.1}",
        mean(&probe_pushes),
        max(&probe_pushes),
        mean(&probe_pushes) / storm_secs,
        mean(&client_pushes),
        max(&client_pushes),
        mean(
            &probe_side
                .probes
                .iter()
                .map(|p| p.presence[1])
                .collect::<Vec<_>>()
        )
    );
    // Presence must end where it started: everyone online in every room.
    let mut wrong_rooms = 0u64;
    let mut last_push = 0u64;
    for (probes, want) in probe_side.probes.chunks(per_room).zip(&sockets_in_room) {
        // The first probe of each room asked the room's presence at the end.
        if probes[0].final_online != Some(*want) {
            wrong_rooms += 1;
        }
        for p in probes {
            if let Some((at, _)) = p.last_presence {
                last_push = last_push.max(at);
            }
        }
    }
    println!(
        "presence settled       {} of {rooms} rooms report everyone online at the end; last presence push {:+.2}s from the last client back",
        rooms as u64 - wrong_rooms,
        (last_push as f64 - back_all as f64) / 1e6
    );
    let bounds = [(started, dropped), (dropped, back_all), (back_all, end)];
    let usage = |of: fn(&Sampled) -> Option<ProcSample>| {
        bounds
            .iter()
            .zip(PHASES)
            .map(
                |((from, to), phase)| match usage_between(&probe_side.samples, *from, *to, of) {
                    Some((cpu, rss)) => {
                        format!("{} {cpu:.0}% max rss {} MiB", phase.label(), rss / 1024)
                    }
                    None => format!("{} -", phase.label()),
                },
            )
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !common.server_pid.is_empty() {
        println!("server                 {}", usage(|s| s.server));
    }
    println!("generator              {}", usage(|s| s.generator));
    let backlog: Vec<String> = bounds
        .iter()
        .zip(PHASES)
        .map(|((from, to), phase)| {
            let max = probe_side
                .samples
                .iter()
                .filter(|s| s.t >= *from && s.t <= *to)
                .filter_map(|s| s.backlog)
                .fold(None, |m: Option<f64>, b| Some(m.map_or(b, |m| m.max(b))));
            match max {
                Some(b) => format!("{} max {b:.0}", phase.label()),
                None => format!("{} -", phase.label()),
            }
        })
        .collect();
    println!(
        "presence backlog       {} (chat_presence_backlog, sampled every 200 ms)",
        backlog.join(", ")
    );

    let acked: u64 = counters
        .acked
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .sum();
    let delivered = counters.delivered.load(Ordering::Relaxed);
    let expected = expected();
    let duplicates = reports.iter().map(|r| r.duplicates).sum::<u64>()
        + probe_side.probes.iter().map(|p| p.duplicates).sum::<u64>();
    let lost = expected.saturating_sub(delivered);
    println!(
        "sent                   {} ({} dropped: generator backlog); acknowledged {acked}",
        probe_side.issued, probe_side.overflow
    );
    println!("delivered              {delivered} of {expected} expected (clients and probes)");
    println!(
        "lost                   {lost} (acknowledged, not delivered to every socket of its room)"
    );
    println!("unanswered requests    {unanswered}");
    println!("duplicates             {duplicates}");
    let mut errors: HashMap<String, u64> = HashMap::new();
    for e in reports
        .iter()
        .flat_map(|r| r.errors.iter())
        .chain(probe_side.probes.iter().flat_map(|p| p.errors.iter()))
    {
        *errors.entry(e.clone()).or_default() += 1;
    }
    let stats = Stats {
        errors,
        ..Stats::new()
    };
    let errors = print_errors(&stats);
    Ok(errors
        + lost
        + duplicates
        + unanswered
        + probe_side.overflow
        + not_back as u64
        + wrong_rooms)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let common = cli.common.clone();
    if common.duration == 0 || common.duration > MAX_DURATION_SECS {
        bail!("--duration must be 1..={MAX_DURATION_SECS} seconds");
    }
    let sockets = match &cli.scenario {
        Scenario::Seed { .. } => 0,
        Scenario::Chat { users, .. } => *users,
        Scenario::Fanout {
            rooms, receivers, ..
        } => rooms * (receivers + 1),
        Scenario::Idle { sockets } => *sockets,
        Scenario::History { sockets, .. } => *sockets,
        Scenario::Storm {
            clients,
            room_size,
            probes,
            ..
        } => clients + clients.div_ceil((*room_size).max(1)) * (*probes).max(2),
    };
    if sockets > MAX_SOCKETS {
        bail!("{sockets} sockets: at most {MAX_SOCKETS}");
    }
    let rate = match &cli.scenario {
        Scenario::Chat { rate, .. }
        | Scenario::Fanout { rate, .. }
        | Scenario::History { rate, .. }
        | Scenario::Storm { rate, .. } => *rate,
        _ => 1.0,
    };
    if !(rate > 0.0 && rate <= MAX_RATE) {
        bail!("--rate must be in (0, {MAX_RATE}]");
    }
    raise_nofile();
    // One thread: the generator is pinned to one core in benchmarks (taskset -c 1).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let gw = Arc::new(Gateway::new(&common)?);
        let started = Instant::now();
        let result = match cli.scenario {
            Scenario::Seed { users, rooms, think_ms, limit } => seed(gw, &common, users, rooms, think_ms, limit).await,
            Scenario::Chat { users, room_size, rate } => chat(gw, &common, users, room_size, rate).await,
            Scenario::Fanout { rooms, receivers, rate } => fanout(gw, &common, rooms, receivers, rate).await,
            Scenario::Idle { sockets } => idle(gw, &common, sockets).await,
            Scenario::History { hot_rooms, cold_rooms, fill, rate, cold_fraction, sockets, limit } => {
                history(gw, &common, hot_rooms, cold_rooms, fill, rate, cold_fraction, sockets, limit).await
            }
            Scenario::Storm { clients, room_size, probes, rate, settle, reconnect_concurrency, storm_timeout, slow_ms } => {
                let reconnect_concurrency = reconnect_concurrency.unwrap_or(clients).max(1);
                let options = StormOptions { clients, room_size, probes, rate, settle, reconnect_concurrency, storm_timeout, slow_ms };
                storm(gw, &common, options).await
            }
        };
        println!("wall time              {:.1}s", started.elapsed().as_secs_f64());
        let problems = result?;
        if common.fail_on_errors && problems > 0 {
            bail!("{problems} errors, lost or duplicated messages, or unsent requests (--fail-on-errors)");
        }
        Ok(())
    })
}
