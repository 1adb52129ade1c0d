//! Prometheus metrics, one registry per running gateway (so tests in one process do not share).
//! Exposed at `GET /metrics` in the text format. docs/operations.md says what to watch.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::StoreMetrics;

type Labels = Vec<(&'static str, &'static str)>;

pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: Gauge,
    /// WebSocket connections accepted since start (a client that reconnects counts again).
    pub connections_opened: Counter,
    /// Closes initiated by the server, by reason.
    pub closes: Family<Labels, Counter>,
    /// WebSocket upgrades answered with an HTTP error instead, by reason: `origin` (403, a page
    /// from an origin not allowed), `connection_limit` and `draining` (503).
    pub upgrades_refused: Family<Labels, Counter>,
    /// Rooms with at least one local member.
    pub rooms_active: Gauge,
    /// Messages accepted and stored (duplicates by clientMsgId not counted), by door.
    pub messages_received: Family<Labels, Counter>,
    /// Changes of messages stored (edits, deletions, reactions, moderation), by kind.
    pub messages_changed: Family<Labels, Counter>,
    /// Message pushes queued to sockets (one per receiving socket).
    pub messages_delivered: Counter,
    /// Send latency from request to ack, seconds.
    pub send_duration: Histogram,
    /// History requests by cache result: `history_requests{cache="hit"}` and `{cache="miss"}`,
    /// resolved once (no label lookup per request).
    pub history_hits: Counter,
    pub history_misses: Counter,
    /// Cached newest messages of a room re-read from the store ahead of their expiry.
    pub history_refreshes: Counter,
    /// Sends refused by a rate limit, by scope.
    pub rate_limited: Family<Labels, Counter>,
    /// Side-effect jobs: enqueued, done, failed, dropped (queue full).
    pub jobs: Family<Labels, Counter>,
    /// Error replies and REST errors, by code.
    pub errors: Family<Labels, Counter>,
    /// Jobs queued and not yet taken by a worker (the Redis group's lag, or the in-process
    /// channel's length).
    pub queue_waiting: Gauge,
    /// Jobs taken by a worker and not yet acknowledged (Redis queue).
    pub queue_pending: Gauge,
    /// Read positions written to the store (one per member and room per batch).
    pub read_marks_written: Counter,
    /// Presence changes of this node's sockets not yet recorded by the presence task.
    pub presence_backlog: Gauge,
    /// Resuming joins by where their missed messages came from: `resumes{from="memory"}` (the
    /// room's recent messages) and `{from="store"}`.
    pub resumes_from_memory: Counter,
    pub resumes_from_store: Counter,
    /// New connections read later than they were accepted (`server.accept_rate`), and those
    /// waiting for their turn now.
    pub pace: crate::admission::PaceMetrics,
    /// Times a Redis connection was lost (and reconnected), by connection: `pubsub` (the
    /// subscription), `commands` (the shared command connection), `presence` (its own).
    pub redis_reconnects: Family<Labels, Counter>,
    /// Connection tasks that panicked (their cleanup ran all the same).
    pub connection_panics: Counter,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chat");
        let connections = Gauge::default();
        let connections_opened = Counter::default();
        let closes = Family::<Labels, Counter>::default();
        let upgrades_refused = Family::<Labels, Counter>::default();
        // Present at 0 from the start, so that an alert on their rate has a series to watch.
        for reason in ["origin", "connection_limit", "draining"] {
            let _ = upgrades_refused.get_or_create(&vec![("reason", reason)]);
        }
        registry.register(
            "upgrades_refused",
            "WebSocket upgrades refused with an HTTP error, by reason",
            upgrades_refused.clone(),
        );
        let rooms_active = Gauge::default();
        let messages_received = Family::<Labels, Counter>::default();
        let messages_changed = Family::<Labels, Counter>::default();
        let messages_delivered = Counter::default();
        let send_duration = Histogram::new(exponential_buckets(0.000_25, 2.0, 16));
        let history_requests = Family::<Labels, Counter>::default();
        let history_hits = history_requests
            .get_or_create(&vec![("cache", "hit")])
            .clone();
        let history_misses = history_requests
            .get_or_create(&vec![("cache", "miss")])
            .clone();
        let history_refreshes = Counter::default();
        let rate_limited = Family::<Labels, Counter>::default();
        let jobs = Family::<Labels, Counter>::default();
        let errors = Family::<Labels, Counter>::default();
        let queue_waiting = Gauge::default();
        let queue_pending = Gauge::default();
        let read_marks_written = Counter::default();
        let presence_backlog = Gauge::default();
        let pace = crate::admission::PaceMetrics::default();
        let redis_reconnects = Family::<Labels, Counter>::default();
        registry.register(
            "redis_reconnects",
            "Times a Redis connection was lost and reconnected, by connection",
            redis_reconnects.clone(),
        );
        let connection_panics = Counter::default();
        registry.register(
            "connection_panics",
            "Connection tasks that panicked; their cleanup ran all the same",
            connection_panics.clone(),
        );
        registry.register(
            "connections_paced",
            "New connections read later than accepted, at server.accept_rate",
            pace.paced.clone(),
        );
        registry.register(
            "connections_waiting",
            "New connections waiting for their turn to be read (server.accept_rate)",
            pace.waiting.clone(),
        );
        let resumes = Family::<Labels, Counter>::default();
        let resumes_from_memory = resumes.get_or_create(&vec![("from", "memory")]).clone();
        let resumes_from_store = resumes.get_or_create(&vec![("from", "store")]).clone();
        registry.register(
            "resumes",
            "Resuming joins by where the missed messages came from",
            resumes,
        );
        registry.register(
            "presence_backlog",
            "Presence changes waiting to be recorded",
            presence_backlog.clone(),
        );
        registry.register(
            "read_marks_written",
            "Read positions written to the store",
            read_marks_written.clone(),
        );
        registry.register(
            "queue_waiting",
            "Jobs waiting for a worker",
            queue_waiting.clone(),
        );
        registry.register(
            "queue_pending",
            "Jobs taken, not yet acknowledged",
            queue_pending.clone(),
        );
        registry.register(
            "connections",
            "Open WebSocket connections",
            connections.clone(),
        );
        registry.register(
            "connections_opened",
            "WebSocket connections accepted",
            connections_opened.clone(),
        );
        registry.register(
            "closes",
            "Server-initiated closes by reason",
            closes.clone(),
        );
        registry.register(
            "rooms_active",
            "Rooms with local members",
            rooms_active.clone(),
        );
        registry.register(
            "messages_received",
            "Messages stored",
            messages_received.clone(),
        );
        registry.register(
            "messages_changed",
            "Changes of stored messages (edit, delete, reaction, moderation), by kind",
            messages_changed.clone(),
        );
        registry.register(
            "messages_delivered",
            "Message pushes queued to sockets",
            messages_delivered.clone(),
        );
        registry.register(
            "send_duration_seconds",
            "Send to ack latency",
            send_duration.clone(),
        );
        registry.register(
            "history_requests",
            "History requests by cache result",
            history_requests.clone(),
        );
        registry.register(
            "history_refreshes",
            "Latest history pages re-read from the store ahead of their expiry",
            history_refreshes.clone(),
        );
        registry.register(
            "rate_limited",
            "Sends refused by a rate limit",
            rate_limited.clone(),
        );
        registry.register("jobs", "Side-effect jobs by outcome", jobs.clone());
        registry.register(
            "errors",
            "Errors returned to clients by code",
            errors.clone(),
        );
        Self {
            registry,
            connections,
            connections_opened,
            closes,
            upgrades_refused,
            rooms_active,
            messages_received,
            messages_changed,
            messages_delivered,
            send_duration,
            history_hits,
            history_misses,
            history_refreshes,
            rate_limited,
            jobs,
            errors,
            queue_waiting,
            queue_pending,
            read_marks_written,
            presence_backlog,
            pace,
            resumes_from_memory,
            resumes_from_store,
            redis_reconnects,
            connection_panics,
        }
    }

    /// The reconnect counter of one Redis connection.
    pub fn redis_reconnects(&self, connection: &'static str) -> Counter {
        self.redis_reconnects
            .get_or_create(&vec![("connection", connection)])
            .clone()
    }

    /// Adds the store's own counters to the registry.
    pub fn register_store(&mut self, store: &StoreMetrics) {
        let store = match store {
            StoreMetrics::Postgres(pg) => {
                self.registry.register(
                    "store_outages",
                    "Times the database was found unreachable (operations then fail at once until it answers)",
                    pg.outages.clone(),
                );
                self.registry.register(
                    "store_retries",
                    "Writes run again after Postgres made them a deadlock victim or they lost a serialization race",
                    pg.retries.clone(),
                );
                self.registry.register(
                    "store_send_batch_size",
                    "Sends written per Postgres group commit",
                    pg.send_batch_size.clone(),
                );
                self.registry.register(
                    "store_change_batch_size",
                    "Message changes written per Postgres group commit",
                    pg.change_batch_size.clone(),
                );
                self.registry.register(
                    "store_change_batch_races",
                    "Change batches written again one change at a time because another node changed one of their messages first",
                    pg.change_batch_races.clone(),
                );
                return;
            }
            StoreMetrics::Sqlite(sqlite) => sqlite,
        };
        self.registry.register(
            "store_write_statements",
            "Statements run on the SQLite writer connection, BEGIN and COMMIT included",
            store.write_statements.clone(),
        );
        self.registry.register(
            "store_send_batch_size",
            "Sends written per SQLite group commit",
            store.send_batch_size.clone(),
        );
        self.registry.register(
            "store_change_batch_size",
            "Message changes written per SQLite group commit",
            store.change_batch_size.clone(),
        );
        self.registry.register(
            "store_sends_waiting",
            "Sends queued for the SQLite writer, not yet in a batch",
            store.sends_waiting.clone(),
        );
        self.registry.register(
            "store_wal_frames_pending",
            "SQLite WAL frames not yet checkpointed into the database file",
            store.wal_frames_pending.clone(),
        );
        self.registry.register(
            "store_checkpoints",
            "SQLite checkpoints run by the background checkpointer",
            store.checkpoints.clone(),
        );
        self.registry.register(
            "store_wal_bytes",
            "Bytes in the SQLite WAL since it last restarted from its beginning",
            store.wal_bytes.clone(),
        );
        self.registry.register(
            "store_wal_restarts",
            "Times the SQLite WAL was made to restart from its beginning",
            store.wal_restarts.clone(),
        );
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    pub fn close(&self, reason: &'static str) {
        self.closes.get_or_create(&vec![("reason", reason)]).inc();
    }

    pub fn upgrade_refused(&self, reason: &'static str) {
        self.upgrades_refused
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    pub fn error(&self, code: &'static str) {
        self.errors.get_or_create(&vec![("code", code)]).inc();
    }

    pub fn job(&self, outcome: &'static str, n: u64) {
        self.jobs
            .get_or_create(&vec![("outcome", outcome)])
            .inc_by(n);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
