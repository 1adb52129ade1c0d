//! Fan-out of one message to 1,000 local subscribers: the room registry's delivery (what the
//! in-process broker calls for every stored message) into 1,000 sockets' real outbound queues.
//!
//! Each subscriber is what a WebSocket connection puts in a room: a `ConnShared` with its bounded
//! `Outbox`, joined through `attach` and `go_live`. Its writer is a task parked on the queue like
//! the connection's writer, minus the socket: it takes what is queued and drops it. The runtime is
//! a current-thread one, as the gateway's is when pinned to one core, so pushing a frame to an
//! idle socket also wakes (schedules) its writer, as in production.
//!
//! - `fanout_1000/deliver`: the registry call alone (hub lookup, hub lock, 1,000 queue pushes and
//!   writer wake-ups); the writers drain between iterations, outside the measurement.
//! - `fanout_1000/deliver_and_drain`: the same plus the 1,000 writers running until each has taken
//!   its frame: the CPU one message costs this node, less the socket writes.
//!
//! Throughput is in deliveries (subscribers): criterion's time divided by 1,000 is the cost per
//! subscriber.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use chat_gateway::broker::{EventSink, Published, RoomEvent};
use chat_gateway::config::Settings;
use chat_gateway::membership::MembershipCache;
use chat_gateway::metrics::Metrics;
use chat_gateway::rooms::{Closer, ConnShared, RoomRegistry, outbox};
use chat_gateway::store::sqlite::SqliteStore;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::runtime::Runtime;

const SUBSCRIBERS: u64 = 1_000;
const ROOM: &str = "general";
/// As the connection's writer takes frames (`transport::WRITE_BATCH`).
const WRITE_BATCH: usize = 64;

/// One room on one node with `SUBSCRIBERS` live sockets.
struct Room {
    registry: Arc<RoomRegistry>,
    metrics: Arc<Metrics>,
    /// The `message` frame every delivery carries (encoded once, as `publish_frame` does), and
    /// its sender's profile.
    frame: Utf8Bytes,
    profile: Box<str>,
    /// The last sequence delivered.
    seq: i64,
    /// Frames the writers have taken, all together.
    taken: Arc<AtomicU64>,
    /// Kept so the store's file outlives the registry.
    _data: tempfile::TempDir,
}

impl Room {
    async fn new(settings: &Settings) -> Room {
        let data = tempfile::tempdir().expect("a temporary directory");
        // The registry reads the store only to fill sequence gaps; these deliveries have none.
        let store = SqliteStore::open(&data.path().join("chat.db"), 1)
            .await
            .expect("SQLite store");
        store.migrate().await.expect("migrations");
        let metrics = Arc::new(Metrics::new());
        let registry = RoomRegistry::new(
            Arc::new(store),
            Arc::new(MembershipCache::new(Duration::from_secs(60))),
            metrics.clone(),
            Duration::from_millis(250),
            settings.limits.outbound_queue + settings.limits.catch_up_limit as usize,
            settings.limits.resume_buffer,
        );
        let hub = registry.hub(ROOM);
        registry.initialize(&hub, 0);
        let taken = Arc::new(AtomicU64::new(0));
        for id in 0..SUBSCRIBERS {
            let (out, queued) = outbox(settings.limits.outbound_queue, Arc::new(Closer::new()));
            let conn = Arc::new(ConnShared::new(id, format!("user-{id}"), None, out));
            let taken = taken.clone();
            tokio::spawn(async move {
                while queued.next().await.is_some() {
                    let mut n = 1;
                    while n < WRITE_BATCH && queued.try_next().is_some() {
                        n += 1;
                    }
                    queued.taken();
                    taken.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
            let attached = registry.attach(&hub, &conn, None).expect("the hub is open");
            assert_eq!(attached.delivered, 0);
            registry.go_live(&hub, &conn, Duration::from_secs(1)).await;
        }
        let published = chat_gateway::wire::publish_frame(&common::message(ROOM, 1));
        let mut room = Room {
            registry,
            metrics,
            frame: published.frame.clone(),
            profile: published.profile.clone(),
            seq: 0,
            taken,
            _data: data,
        };
        // Every writer parked on its queue, and one message checks that every socket gets it.
        room.drained().await;
        room.deliver();
        room.drained().await;
        assert_eq!(room.metrics.messages_delivered.get(), SUBSCRIBERS);
        room
    }

    /// Hands the next message to the registry as the in-process broker does.
    fn deliver(&mut self) {
        self.seq += 1;
        // The same sender each time: the room tells its sockets the profile once.
        let published = Arc::new(Published::new(self.seq, self.frame.clone(), &self.profile));
        self.registry.deliver(ROOM, RoomEvent::Message(published));
    }

    /// Lets the writers run until every delivered frame has been taken.
    async fn drained(&self) {
        let expected = self.seq as u64 * SUBSCRIBERS;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.taken.load(Ordering::Relaxed) < expected {
            assert!(
                Instant::now() < deadline,
                "a subscriber did not get its frame"
            );
            tokio::task::yield_now().await;
        }
    }
}

fn fanout(c: &mut Criterion) {
    let settings = Settings::defaults();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut room = rt.block_on(Room::new(&settings));

    let mut group = c.benchmark_group("fanout_1000");
    group.throughput(Throughput::Elements(SUBSCRIBERS));
    group.bench_function("deliver", |b| {
        b.iter_custom(|iters| run(&rt, &mut room, iters, false))
    });
    group.bench_function("deliver_and_drain", |b| {
        b.iter_custom(|iters| run(&rt, &mut room, iters, true))
    });
    group.finish();

    let delivered = room.metrics.messages_delivered.get();
    assert_eq!(
        delivered,
        room.seq as u64 * SUBSCRIBERS,
        "no delivery was lost"
    );
}

/// Delivers `iters` messages; times the delivery alone, or the delivery and the drain.
fn run(rt: &Runtime, room: &mut Room, iters: u64, with_drain: bool) -> Duration {
    rt.block_on(async {
        let mut measured = Duration::ZERO;
        for _ in 0..iters {
            let started = Instant::now();
            room.deliver();
            if with_drain {
                room.drained().await;
                measured += started.elapsed();
            } else {
                measured += started.elapsed();
                room.drained().await;
            }
        }
        measured
    })
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = fanout
}
criterion_main!(benches);
