//! chat-gateway: a realtime chat gateway. Browser clients hold one multiplexed WebSocket each;
//! the gateway authorizes them, keeps rooms in memory, persists every message with a gap-free
//! per-room sequence, and delivers each room's messages in order, exactly once per socket.
//!
//! # Layout
//!
//! - [`config`]: typed settings (defaults -> file -> env); owns every limit.
//! - [`telemetry`]: logging setup. [`metrics`]: Prometheus registry of one running gateway.
//! - [`protocol`]: the wire contract (mirrors `proto-docs/protocol.md`): frames, codes, the
//!   message objects of both doors; it knows nothing of the store.
//! - [`wire`]: stored rows as each door shows them (the service's edge): the socket's message
//!   object, the REST one, the shared push.
//! - [`auth`]: JWT verification (algorithm pinned by config) and dev-mode minting.
//! - [`error`]: the service error type and its mapping to HTTP and protocol codes.
//! - [`service`]: every chat operation and rule, once; both doors call it.
//! - [`transport`]: one WebSocket connection (reader task, writer task, heartbeat).
//! - [`http`]: routes (WebSocket upgrade, REST fallback, management API, health, metrics).
//! - [`origins`]: which browser origins may use both doors (`server.allowed_origins`): the
//!   upgrade's 403, CORS for the REST routes pages call.
//! - [`rooms`]: the room registry and per-room sequencer (in-order, exactly-once delivery).
//! - [`membership`]: cached membership answers.
//! - [`health`]: the known health of a dependency (the store, a Redis connection): fail fast
//!   while it is down, probe it in the background.
//! - Backing parts, each a trait with its in-process implementation:
//!   [`store`] (SQLite, or Postgres with `DATABASE_URL`), [`broker`] (fan-out), [`cache`]
//!   (history: each room's newest messages, older pages), [`queue`] (side-effect jobs + worker),
//!   [`ratelimit`] (send limits).
//!
//! Calls go one way: `http`/`transport` -> `service` -> (`rooms`, backing parts). `rooms` reads
//! the `store` only to fill sequence gaps. Nothing calls back into `service`.

/// A map key that lookups can borrow instead of allocating: declares `trait KeyParts` with
/// `parts()` for the owned key and for its borrowed form, and makes both hash and compare through
/// `parts`, so `map.get(&borrowed as &dyn KeyParts)` finds the owned entry.
macro_rules! borrowed_key {
    ($key:ty, $borrowed:ty => $parts:ty, |$k:ident| $owned_parts:expr) => {
        trait KeyParts {
            fn parts(&self) -> $parts;
        }

        impl KeyParts for $key {
            fn parts(&self) -> $parts {
                let $k = self;
                $owned_parts
            }
        }

        impl KeyParts for $borrowed {
            fn parts(&self) -> $parts {
                *self
            }
        }

        impl<'a> std::borrow::Borrow<dyn KeyParts + 'a> for $key {
            fn borrow(&self) -> &(dyn KeyParts + 'a) {
                self
            }
        }

        impl std::hash::Hash for dyn KeyParts + '_ {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                std::hash::Hash::hash(&self.parts(), state)
            }
        }

        impl PartialEq for dyn KeyParts + '_ {
            fn eq(&self, other: &Self) -> bool {
                self.parts() == other.parts()
            }
        }

        impl Eq for dyn KeyParts + '_ {}

        impl std::hash::Hash for $key {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                std::hash::Hash::hash(&self.parts(), state)
            }
        }

        impl PartialEq for $key {
            fn eq(&self, other: &Self) -> bool {
                self.parts() == other.parts()
            }
        }

        impl Eq for $key {}
    };
}

pub mod admission;
pub mod auth;
pub mod broker;
pub mod cache;
pub mod config;
pub mod dedicated;
pub mod error;
pub mod health;
pub mod http;
pub mod membership;
pub mod metrics;
pub mod origins;
pub mod presence;
pub mod protocol;
pub mod queue;
pub mod ratelimit;
pub mod redis_conn;
pub mod rooms;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod transport;
pub mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Authenticator, TokenMinter};
use crate::broker::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::cache::MemoryHistoryCache;
use crate::cache::redis::RedisHistoryCache;
use crate::config::Settings;
use crate::membership::MembershipCache;
use crate::metrics::Metrics;
use crate::queue::redis::RedisJobQueue;
use crate::queue::{MemoryJobQueue, OutboxRelay, Worker};
use crate::ratelimit::redis::RedisRateLimiter;
use crate::ratelimit::{MemoryRateLimiter, RateLimiter, Unlimited};
use crate::rooms::RoomRegistry;
use crate::service::ChatService;
use crate::store::postgres::PgStore;
use crate::store::sqlite::{SqliteOptions, SqliteStore};
use crate::transport::UserConnections;

/// How long a sequence gap may stay open before the registry reads it from the store.
const GAP_FILL_AFTER: Duration = Duration::from_millis(250);

/// How often, with Redis, a node compares its rooms with their heads in the store (see
/// `RoomRegistry::check_heads`).
const HEAD_CHECK: Duration = Duration::from_secs(2);

/// Shortest time between two outbox drains (see `OutboxRelay::pace`): at most 100 claims a second
/// under load, each covering what was stored since the last.
const RELAY_PACE: Duration = Duration::from_millis(10);

/// Server-wide state shared by every connection and route.
pub struct App {
    pub service: Arc<ChatService>,
    /// Cancelled on SIGTERM/SIGINT (or the caller's shutdown future): stop accepting, drain.
    pub shutdown: CancellationToken,
    /// One permit per open WebSocket; taken before the upgrade (`server.max_connections`).
    pub conn_slots: Arc<Semaphore>,
    pub user_connections: UserConnections,
    pub next_conn_id: AtomicU64,
    /// Every WebSocket connection task, so shutdown can wait for them to close.
    pub tracker: TaskTracker,
    /// The Redis connections and broker, when configured (for readiness).
    pub redis: Option<RedisParts>,
    /// Where connections come and go: accepts, HTTP, upgrades, joins, cleanups.
    pub churn: admission::ChurnLane,
    /// The runtime the gateway was started on: connected sockets are read and written there.
    pub main: tokio::runtime::Handle,
    /// The browser origins allowed on the upgrade and the REST routes pages call.
    pub origins: Arc<origins::OriginPolicy>,
}

/// Stops the churn lane when dropped.
struct LaneGuard(Arc<App>);

impl Drop for LaneGuard {
    fn drop(&mut self) {
        self.0.churn.shutdown();
    }
}

/// Background tasks owned by a running gateway.
struct Background {
    store: Arc<dyn store::Store>,
    relay: JoinHandle<()>,
    relay_stop: CancellationToken,
    /// None when the worker runs apart (`queue.run_worker = false`).
    worker: Option<JoinHandle<()>>,
    worker_stop: CancellationToken,
}

/// Opens the store and applies migrations (the `migrate` subcommand and start-up): Postgres when
/// `database.url` is set, else the embedded SQLite file.
pub async fn open_store(
    settings: &Settings,
    migrate: bool,
) -> anyhow::Result<Arc<dyn store::Store>> {
    let url = settings.database.url.expose_secret();
    if !url.is_empty() {
        let db = &settings.database;
        let store = PgStore::connect(
            url,
            db.max_connections,
            Duration::from_millis(db.acquire_timeout_ms),
        )
        .await
        .context("connecting to PostgreSQL (database.url)")?
        .with_outbox(settings.side_effects())
        .with_write_interval(Duration::from_millis(db.write_interval_ms));
        if migrate {
            store.migrate().await?;
        }
        return Ok(Arc::new(store));
    }
    let path = settings.sqlite_path();
    let db = &settings.database;
    let options = SqliteOptions {
        readers: db.max_connections,
        busy_timeout: Duration::from_millis(db.busy_timeout_ms),
        write_batch: db.write_batch,
        write_queue: db.write_queue,
        write_interval: Duration::from_millis(db.write_interval_ms),
        checkpoint_interval: Duration::from_millis(db.checkpoint_interval_ms),
        wal_limit_bytes: db.wal_limit_mb << 20,
        outbox: settings.side_effects(),
    };
    let store = SqliteStore::open_with(&path, &options)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    if migrate {
        store.migrate().await?;
    }
    Ok(Arc::new(store))
}

/// The Redis-backed parts, when `redis.url` is set.
pub struct RedisParts {
    /// The node's shared command connection.
    pub conn: redis_conn::RedisConn,
    /// The presence's own (see `build`).
    pub presence: redis_conn::RedisConn,
    pub broker: Arc<RedisBroker>,
}

/// The broker, cache, queue and limiter: in-process, or Redis-backed when `redis` is given.
struct Backing {
    broker: Arc<dyn broker::Broker>,
    cache: Arc<dyn cache::HistoryCache>,
    announcer: Arc<dyn broker::Announcer>,
    queue: Arc<dyn queue::JobQueue>,
    limiter: Arc<dyn RateLimiter>,
    presence: Arc<dyn presence::Presence>,
    /// The Redis presence, whose janitor keeps this node's lease and reaps dead nodes.
    redis_presence: Option<Arc<presence::RedisPresence>>,
    redis: Option<RedisParts>,
    /// The receiving end of the in-process queue, for the in-process worker.
    memory_jobs: Option<tokio::sync::mpsc::Receiver<queue::Job>>,
}

/// `redis`: the node's shared connection, and the presence's own (see `build`).
fn backing(
    settings: &Settings,
    redis: Option<(redis_conn::RedisConn, redis_conn::RedisConn)>,
    registry: &Arc<RoomRegistry>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Backing {
    let sink: Arc<dyn broker::EventSink> = Arc::new(registry.clone());
    let history_ttl = Duration::from_millis(settings.cache.history_ttl_ms);
    let tail_len = settings.limits.history_tail_len();
    let enabled = settings.rate_limit.enabled;
    match redis {
        None => {
            let (memory_queue, jobs) = MemoryJobQueue::new(settings.queue.capacity);
            let broker: Arc<dyn broker::Broker> = Arc::new(MemoryBroker::new(sink));
            let cache: Arc<dyn cache::HistoryCache> = Arc::new(MemoryHistoryCache::new(
                history_ttl,
                settings.cache.max_bytes,
                tail_len,
            ));
            Backing {
                announcer: Arc::new(broker::Apart {
                    cache: cache.clone(),
                    broker: broker.clone(),
                }),
                broker,
                cache,
                queue: Arc::new(memory_queue),
                limiter: if enabled {
                    Arc::new(MemoryRateLimiter::new(&settings.rate_limit))
                } else {
                    Arc::new(Unlimited)
                },
                presence: Arc::new(presence::MemoryPresence::default()),
                redis_presence: None,
                redis: None,
                memory_jobs: Some(jobs),
            }
        }
        Some((conn, presence_conn)) => {
            let redis_cache = Arc::new(RedisHistoryCache::new(conn.clone(), history_ttl, tail_len));
            let cache: Arc<dyn cache::HistoryCache> = redis_cache.clone();
            let resync: broker::redis::Resync = if conn.is_cluster() {
                // A re-subscription on a cluster may follow a failover, whose new primary can
                // miss the last cache appends of the old one (replication is asynchronous): the
                // room's tail goes too, and its next read comes from the store.
                let (registry, cache) = (registry.clone(), cache.clone());
                Arc::new(move |room: Option<&str>| {
                    let rooms = match room {
                        Some(room) => vec![room.to_string()],
                        None => registry.room_ids(),
                    };
                    let (registry, cache) = (registry.clone(), cache.clone());
                    tokio::spawn(async move {
                        for room in rooms {
                            cache.forget(&room).await;
                            registry.resync_room(&room);
                        }
                    });
                })
            } else {
                let registry = registry.clone();
                Arc::new(move |room: Option<&str>| match room {
                    Some(room) => registry.resync_room(room),
                    None => registry.resync_all(),
                })
            };
            // Publishes were skipped while the command connection was down: rooms whose last
            // messages went unannounced catch up from the store when it is back.
            {
                let resync = resync.clone();
                conn.health.on_recovered(move || resync(None));
            }
            let broker = RedisBroker::start(
                conn.clone(),
                sink,
                resync,
                Duration::from_millis(settings.redis.pubsub_keepalive_ms),
                metrics.redis_reconnects("pubsub"),
                shutdown.clone(),
            );
            let lease = Duration::from_millis(settings.signals.presence_lease_ms);
            let redis_presence =
                Arc::new(presence::RedisPresence::new(presence_conn.clone(), lease));
            Backing {
                announcer: Arc::new(broker::redis::RedisAnnouncer {
                    cache: redis_cache,
                    broker: broker.clone(),
                }),
                presence: redis_presence.clone(),
                redis_presence: Some(redis_presence),
                broker: broker.clone(),
                cache,
                queue: Arc::new(RedisJobQueue::new(conn.clone())),
                limiter: if enabled {
                    Arc::new(RedisRateLimiter::new(conn.clone(), &settings.rate_limit))
                } else {
                    Arc::new(Unlimited)
                },
                redis: Some(RedisParts {
                    conn,
                    presence: presence_conn,
                    broker,
                }),
                memory_jobs: None,
            }
        }
    }
}

async fn build(settings: Settings) -> anyhow::Result<(Arc<App>, Background)> {
    let mut metrics = Metrics::new();
    let store = open_store(&settings, settings.database.migrate_on_start).await?;
    let redis = if settings.redis.url.expose_secret().is_empty() {
        None
    } else {
        // Presence records the node's arrivals and departures, thousands at once in a reconnect
        // storm, in pipelines of scripts: on a connection of its own, so that the commands of
        // messages (history cache, publish, rate limits) do not queue behind them.
        let shared = redis_conn::RedisConn::connect(
            &settings.redis,
            "redis (commands)",
            metrics.redis_reconnects("commands"),
        )
        .await?;
        let presence = redis_conn::RedisConn::connect(
            &settings.redis,
            "redis (presence)",
            metrics.redis_reconnects("presence"),
        )
        .await?;
        Some((shared, presence))
    };
    let dev_secret = if settings.dev_mode() {
        let secret = auth::load_or_create_dev_secret(&settings.server.data_dir)?;
        tracing::warn!(
            "DEV MODE: no JWT key configured. Tokens are signed with a generated secret in {} and \
             can be minted by anyone with `chat-gateway token` or POST /dev/token. Set JWT_SECRET \
             (or JWT_PUBLIC_KEY_FILE) before exposing this server.",
            settings.server.data_dir.display()
        );
        Some(secret)
    } else {
        None
    };
    let authenticator = Authenticator::new(&settings.auth, dev_secret.as_ref())?;
    let origins = Arc::new(origins::OriginPolicy::from_settings(&settings)?);
    tracing::info!("browser origins allowed: {origins}");
    let dev_minter = dev_secret.as_ref().map(TokenMinter::hs256);

    if let Some(counted) = store.metrics() {
        metrics.register_store(&counted);
    }
    let metrics = Arc::new(metrics);
    let membership = Arc::new(MembershipCache::new(Duration::from_secs(
        settings.auth.membership_ttl_secs,
    )));
    let dyn_store: Arc<dyn store::Store> = store.clone();
    let registry = RoomRegistry::new(
        dyn_store.clone(),
        membership.clone(),
        metrics.clone(),
        GAP_FILL_AFTER,
        settings.limits.outbound_queue + settings.limits.catch_up_limit as usize,
        settings.limits.resume_buffer,
    );
    // Stops the background tasks that have nothing to drain (subscriber, sweeps).
    let shutdown = CancellationToken::new();
    let Backing {
        broker,
        cache,
        announcer,
        queue,
        limiter,
        presence,
        redis_presence,
        redis: redis_parts,
        memory_jobs,
    } = backing(&settings, redis, &registry, &metrics, &shutdown);
    let presence_changes = Arc::new(presence::PresenceChanges::new(
        metrics.presence_backlog.clone(),
    ));
    registry.set_presence_changes(presence_changes.clone());
    {
        let broker = Arc::downgrade(&broker);
        registry.set_unsubscriber(move |room| {
            if let Some(broker) = broker.upgrade() {
                tokio::spawn(async move { broker.unsubscribe(&room).await });
            }
        });
    }
    if memory_jobs.is_some() {
        // A fresh in-process queue holds nothing: rows an earlier process handed to its queue
        // and never did are queued again now, not after their lease.
        let released = dyn_store.outbox_release_all().await?;
        if released > 0 {
            tracing::info!(
                released,
                "queueing again the side effects the last run did not do"
            );
        }
    }
    let outbox_wake = Arc::new(tokio::sync::Notify::new());
    let relay_stop = CancellationToken::new();
    let relay = tokio::spawn(
        OutboxRelay {
            store: dyn_store.clone(),
            queue: queue.clone(),
            metrics: metrics.clone(),
            wake: outbox_wake.clone(),
            batch: settings.queue.batch as u32,
            poll: Duration::from_secs(1),
            lease: Duration::from_millis(settings.queue.redeliver_after_ms),
            pace: RELAY_PACE,
        }
        .run(relay_stop.clone()),
    );
    let worker_stop = CancellationToken::new();
    let worker = new_worker(&settings, dyn_store.clone(), metrics.clone());
    let worker = match (memory_jobs, &redis_parts) {
        (Some(jobs), _) => Some(tokio::spawn(worker.run(jobs, worker_stop.clone()))),
        (None, Some(parts)) if settings.queue.run_worker => {
            Some(tokio::spawn(queue::redis::run_worker(
                worker,
                parts.conn.clone(),
                metrics.clone(),
                worker_stop.clone(),
            )))
        }
        _ => None,
    };
    {
        let limiter = limiter.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = every.tick() => limiter.sweep(),
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }

    let read_flush = Duration::from_millis(settings.signals.read_flush_ms.max(1));
    let max_connections = settings.server.max_connections;
    let churn_concurrency = settings.server.churn_concurrency;
    let churn_nice = settings.server.churn_nice;
    let service = Arc::new(ChatService {
        settings,
        store: dyn_store,
        broker,
        cache,
        announcer,
        outbox_wake,
        queue,
        presence,
        read_marks: Default::default(),
        room_sizes: moka::sync::Cache::builder()
            .time_to_live(Duration::from_secs(60))
            .max_capacity(100_000)
            .build(),
        limiter,
        registry,
        membership,
        metrics,
        authenticator,
        dev_minter,
        churn: Arc::new(Semaphore::new(churn_concurrency)),
    });
    let app = Arc::new(App {
        service,
        shutdown,
        conn_slots: Arc::new(Semaphore::new(max_connections)),
        user_connections: UserConnections::default(),
        next_conn_id: AtomicU64::new(1),
        tracker: TaskTracker::new(),
        redis: redis_parts,
        churn: admission::ChurnLane::start(churn_nice)
            .context("starting the churn lane's runtime")?,
        main: tokio::runtime::Handle::current(),
        origins,
    });
    // Presence changes come from joins and cleanups: churn, recorded on its lane.
    app.churn
        .handle()
        .spawn(app.service.clone().run_presence(presence_changes));
    if let Some(redis_presence) = redis_presence {
        let service = app.service.clone();
        let stop = app.shutdown.clone();
        tokio::spawn(async move {
            let runtime = tokio::runtime::Handle::current();
            let on_gone = move |room: String, user: String, online: u64| {
                let service = service.clone();
                runtime.spawn(async move {
                    let diff = broker::PresenceDiff {
                        online,
                        joined: Vec::new(),
                        left: vec![user],
                    };
                    service.publish_presence(&room, diff).await;
                });
            };
            redis_presence.run_janitor(on_gone, stop).await;
        });
    }
    if app.redis.is_some() {
        let registry = app.service.registry.clone();
        let stop = app.shutdown.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(HEAD_CHECK);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => registry.check_heads().await,
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
    {
        // Queues the coalesced read marks; the final flush happens in `run` at shutdown.
        let service = app.service.clone();
        let shutdown = app.shutdown.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(read_flush);
            loop {
                tokio::select! {
                    _ = every.tick() => service.flush_read_marks().await,
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }
    Ok((
        app,
        Background {
            store,
            relay,
            relay_stop,
            worker,
            worker_stop,
        },
    ))
}

fn new_worker(settings: &Settings, store: Arc<dyn store::Store>, metrics: Arc<Metrics>) -> Worker {
    let hook = &settings.queue.webhook_url;
    Worker {
        store,
        metrics,
        batch: settings.queue.batch,
        max_attempts: settings.queue.max_attempts,
        webhook: (!hook.is_empty()).then(|| queue::Webhook::new(hook.clone())),
        redeliver_after: Duration::from_millis(settings.queue.redeliver_after_ms),
    }
}

/// `chat-gateway worker`: relays the outbox and performs jobs from the Redis queue, without
/// serving sockets, until `shutdown` completes.
pub async fn run_worker(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if settings.redis.url.expose_secret().is_empty() {
        anyhow::bail!(
            "invalid configuration: redis.url: `worker` runs apart from the gateway only with a Redis queue"
        );
    }
    let store = open_store(&settings, settings.database.migrate_on_start).await?;
    let mut metrics = Metrics::new();
    let conn = redis_conn::RedisConn::connect(
        &settings.redis,
        "redis (commands)",
        metrics.redis_reconnects("commands"),
    )
    .await?;
    if let Some(counted) = store.metrics() {
        metrics.register_store(&counted);
    }
    let metrics = Arc::new(metrics);
    let dyn_store: Arc<dyn store::Store> = store.clone();
    let stop = CancellationToken::new();
    let relay = tokio::spawn(
        OutboxRelay {
            store: dyn_store.clone(),
            queue: Arc::new(RedisJobQueue::new(conn.clone())),
            metrics: metrics.clone(),
            wake: Arc::new(tokio::sync::Notify::new()),
            batch: settings.queue.batch as u32,
            poll: Duration::from_millis(500),
            lease: Duration::from_millis(settings.queue.redeliver_after_ms),
            pace: RELAY_PACE,
        }
        .run(stop.clone()),
    );
    let worker = tokio::spawn(queue::redis::run_worker(
        new_worker(&settings, dyn_store, metrics.clone()),
        conn,
        metrics,
        stop.clone(),
    ));
    tracing::info!("worker running");
    shutdown.await;
    stop.cancel();
    let _ = tokio::join!(relay, worker);
    store.close().await;
    Ok(())
}

/// Runs the gateway on `listener` until `shutdown` completes, then drains: stops accepting, lets
/// every socket finish its in-flight request and close with 1012, flushes queued jobs, closes the
/// store. Returns when all of that is done (or `server.shutdown_grace_secs` passed).
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let grace = Duration::from_secs(settings.server.shutdown_grace_secs);
    let addr: SocketAddr = listener.local_addr()?;
    if settings.dev_mode() && !addr.ip().is_loopback() {
        anyhow::bail!(
            "invalid configuration: server.bind_addr: in dev mode (no JWT key configured) anyone can \
             mint tokens, so the gateway listens on loopback only; set JWT_SECRET or \
             JWT_PUBLIC_KEY_FILE to listen on {addr}"
        );
    }
    let (app, background) = build(settings).await?;
    // However `run` ends (returned, failed, or its future dropped), the churn lane's thread ends.
    let _lane = LaneGuard(app.clone());
    tracing::info!(%addr, "chat-gateway listening");
    {
        let token = app.shutdown.clone();
        tokio::spawn(async move {
            shutdown.await;
            token.cancel();
        });
    }
    // Accepted, paced and served on the churn lane (the listener moves to its runtime).
    let listener = listener.into_std()?;
    let serve = {
        let app = app.clone();
        async move {
            let router = http::router(app.clone());
            let server = &app.service.settings.server;
            let listener = admission::PacedListener::new(
                TcpListener::from_std(listener)?,
                server.accept_rate,
                server.accept_burst,
                app.service.metrics.pace.clone(),
            );
            axum::serve(listener, router)
                .with_graceful_shutdown(app.shutdown.clone().cancelled_owned())
                .await
        }
    };
    app.churn.run(serve).await?;
    tracing::info!("draining sockets");
    app.tracker.close();
    if tokio::time::timeout(grace, app.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some sockets did not close within the grace period");
    }
    app.service.flush_read_marks().await;
    background.relay_stop.cancel();
    let _ = tokio::time::timeout(grace, background.relay).await;
    background.worker_stop.cancel();
    if let Some(worker) = background.worker {
        let _ = tokio::time::timeout(grace, worker).await;
    }
    background.store.close().await;
    tracing::info!("stopped");
    Ok(())
}
