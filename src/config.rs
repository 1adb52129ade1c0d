//! Typed settings: `config/default.toml` (compiled in) -> an optional file -> environment.
//!
//! Environment variables: `CHAT_GATEWAY__<SECTION>__<KEY>` for every key, plus the short names
//! operators expect (`BIND_ADDR`, `DATABASE_URL`, `REDIS_URL`, `JWT_SECRET`,
//! `JWT_PUBLIC_KEY_FILE`, `LOG_FORMAT`). Secrets are wrapped in [`SecretString`] so that a
//! `{:?}` of the settings never prints them. Invalid settings fail start-up with one line that
//! names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

const DEFAULTS: &str = include_str!("../config/default.toml");

/// Most sends in one SQLite transaction (`database.write_batch`). The rows travel as one JSON
/// parameter, so this bounds the transaction's size and time, not a parameter count.
const MAX_WRITE_BATCH: usize = 4096;

/// Environment prefix for every key, e.g. `CHAT_GATEWAY__LIMITS__OUTBOUND_QUEUE`.
pub const ENV_PREFIX: &str = "CHAT_GATEWAY";

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub auth: AuthSettings,
    pub limits: Limits,
    pub heartbeat: HeartbeatSettings,
    pub signals: SignalSettings,
    pub rate_limit: RateLimitSettings,
    pub cache: CacheSettings,
    pub queue: QueueSettings,
    pub log: LogSettings,
    /// Fault injection for tests that run the gateway in-process. Never read from a file or the
    /// environment: a deployed gateway has none.
    #[serde(skip)]
    pub faults: Faults,
}

/// Test seams (see [`Settings::faults`]).
#[derive(Clone, Default)]
pub struct Faults {
    /// Called with every text frame a socket receives, before it is handled: a test panics here
    /// to prove that a connection's cleanup does not depend on its handler returning.
    pub before_frame: Option<FrameHook>,
}

pub type FrameHook = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("before_frame", &self.before_frame.is_some())
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    pub bind_addr: SocketAddr,
    pub max_connections: usize,
    pub shutdown_grace_secs: u64,
    pub data_dir: PathBuf,
    pub listen_backlog: u32,
    pub accept_rate: u32,
    pub accept_burst: u32,
    pub churn_concurrency: usize,
    /// The churn lane's thread priority (`nice`, 0..=19): see `admission::ChurnLane`.
    pub churn_nice: i32,
    /// Browser origins allowed besides the gateway's own; empty: the mode's default. See
    /// `origins`, which parses and applies them.
    pub allowed_origins: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    pub url: SecretString,
    pub migrate_on_start: bool,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
    pub busy_timeout_ms: u64,
    pub write_batch: usize,
    pub write_queue: usize,
    pub write_interval_ms: u64,
    pub checkpoint_interval_ms: u64,
    pub wal_limit_mb: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RedisSettings {
    pub url: SecretString,
    pub key_prefix: String,
    pub command_timeout_ms: u64,
    pub pubsub_keepalive_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    ES256,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AuthSettings {
    pub algorithm: JwtAlgorithm,
    pub jwt_secret: SecretString,
    pub public_key_file: PathBuf,
    pub issuer: String,
    pub audience: String,
    pub leeway_secs: u64,
    pub auth_timeout_ms: u64,
    pub expiry_warning_secs: u64,
    pub membership_ttl_secs: u64,
    pub dev_open_rooms: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_content_chars: usize,
    pub max_rooms_per_connection: usize,
    pub max_connections_per_user: usize,
    pub outbound_queue: usize,
    pub catch_up_limit: u32,
    pub resume_buffer: usize,
    pub history_default_limit: u32,
    pub history_max_limit: u32,
    pub max_client_msg_id_bytes: usize,
    /// How long after its send a message may be edited (0: always).
    pub edit_window_secs: u64,
    /// Most distinct reaction keys one message holds.
    pub max_reaction_keys: usize,
    pub ws_read_buffer_bytes: usize,
    pub ws_write_buffer_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct HeartbeatSettings {
    pub interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SignalSettings {
    pub typing_timeout_ms: u64,
    pub typing_refresh_ms: u64,
    pub read_flush_ms: u64,
    pub read_receipts: bool,
    pub read_receipts_max_members: i64,
    pub max_rooms_listed: u32,
    pub presence_lease_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RateLimitSettings {
    pub enabled: bool,
    pub user_per_second: u32,
    pub user_burst: u32,
    pub room_per_second: u32,
    pub room_burst: u32,
    /// Reactions (add and remove) per user, across nodes.
    pub reaction_per_second: u32,
    pub reaction_burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CacheSettings {
    pub history_ttl_ms: u64,
    pub max_bytes: u64,
    /// Replaced by `max_bytes`; read only to refuse it with a note (see `validate`).
    #[serde(default)]
    pub max_pages: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct QueueSettings {
    pub capacity: usize,
    pub batch: usize,
    pub max_attempts: u32,
    pub run_worker: bool,
    pub webhook_url: String,
    pub redeliver_after_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

/// A configuration error, phrased as one line that names the offending key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

/// Short environment names and the key each one sets.
const SHORT_ENV: &[(&str, &str)] = &[
    ("BIND_ADDR", "server.bind_addr"),
    ("DATABASE_URL", "database.url"),
    ("REDIS_URL", "redis.url"),
    ("JWT_SECRET", "auth.jwt_secret"),
    ("JWT_PUBLIC_KEY_FILE", "auth.public_key_file"),
    ("LOG_FORMAT", "log.format"),
];

/// The `CHAT_GATEWAY__<SECTION>__<KEY>` variables. A list is written comma-separated
/// (`CHAT_GATEWAY__SERVER__ALLOWED_ORIGINS=https://a.example.com,https://b.example.com`).
fn environment() -> Environment {
    Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .list_separator(",")
        .with_list_parse_key("server.allowed_origins")
}

impl Settings {
    /// Defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(File::from(path).required(true));
        }
        builder = builder.add_source(environment());
        for (var, key) in SHORT_ENV {
            if let Ok(value) = std::env::var(var) {
                builder = builder
                    .set_override(*key, value)
                    .map_err(|e| ConfigError(e.to_string()))?;
            }
        }
        Self::build(builder)
    }

    /// The compiled-in defaults alone, with no file and no environment (tests start here).
    pub fn defaults() -> Self {
        Self::build(Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml)))
            .expect("config/default.toml is valid")
    }

    fn build(
        builder: config::ConfigBuilder<config::builder::DefaultState>,
    ) -> Result<Self, ConfigError> {
        let settings: Settings = builder
            .build()
            .and_then(Config::try_deserialize)
            .map_err(|e| ConfigError(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what serde cannot: ranges and combinations. Each failure names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        let l = &self.limits;
        if self.server.max_connections == 0 {
            return fail("server.max_connections", "must be at least 1");
        }
        if self.server.churn_concurrency == 0 {
            return fail("server.churn_concurrency", "must be at least 1");
        }
        if !(0..=19).contains(&self.server.churn_nice) {
            return fail("server.churn_nice", "must be 0..=19");
        }
        if self.server.listen_backlog == 0 {
            return fail("server.listen_backlog", "must be at least 1");
        }
        crate::origins::OriginPolicy::from_settings(self)?;
        if self.server.accept_rate > 0 && self.server.accept_burst == 0 {
            return fail(
                "server.accept_burst",
                "must be at least 1 when accept_rate is set",
            );
        }
        if l.max_frame_bytes < 1024 {
            return fail("limits.max_frame_bytes", "must be at least 1024");
        }
        if l.max_reaction_keys == 0 {
            return fail("limits.max_reaction_keys", "must be at least 1");
        }
        if l.max_content_chars == 0 {
            return fail("limits.max_content_chars", "must be at least 1");
        }
        if l.outbound_queue < 8 {
            return fail("limits.outbound_queue", "must be at least 8");
        }
        if l.max_rooms_per_connection == 0 {
            return fail("limits.max_rooms_per_connection", "must be at least 1");
        }
        if l.max_connections_per_user == 0 {
            return fail("limits.max_connections_per_user", "must be at least 1");
        }
        if l.history_max_limit == 0 || l.history_default_limit == 0 {
            return fail("limits.history_default_limit", "limits must be at least 1");
        }
        if l.history_default_limit > l.history_max_limit {
            return fail(
                "limits.history_default_limit",
                "must not exceed limits.history_max_limit",
            );
        }
        if self.signals.presence_lease_ms < 300 {
            return fail("signals.presence_lease_ms", "must be at least 300");
        }
        if self.signals.typing_timeout_ms < 100 {
            return fail("signals.typing_timeout_ms", "must be at least 100");
        }
        if self.signals.typing_refresh_ms >= self.signals.typing_timeout_ms {
            return fail(
                "signals.typing_refresh_ms",
                "must be below signals.typing_timeout_ms",
            );
        }
        if self.heartbeat.interval_ms < 10 {
            return fail("heartbeat.interval_ms", "must be at least 10");
        }
        let r = &self.rate_limit;
        if r.enabled {
            for (key, v) in [
                ("rate_limit.user_per_second", r.user_per_second),
                ("rate_limit.user_burst", r.user_burst),
                ("rate_limit.room_per_second", r.room_per_second),
                ("rate_limit.room_burst", r.room_burst),
                ("rate_limit.reaction_per_second", r.reaction_per_second),
                ("rate_limit.reaction_burst", r.reaction_burst),
            ] {
                if v == 0 {
                    return fail(
                        key,
                        "must be at least 1 (or set rate_limit.enabled = false)",
                    );
                }
            }
        }
        if self.cache.max_pages.is_some() {
            return fail(
                "cache.max_pages",
                "was replaced by cache.max_bytes (the in-process history cache is bounded in \
                 bytes, 64 MiB by default); remove cache.max_pages",
            );
        }
        if self.cache.history_ttl_ms < 10 {
            return fail("cache.history_ttl_ms", "must be at least 10");
        }
        if self.cache.max_bytes < 1 << 20 {
            return fail("cache.max_bytes", "must be at least 1048576 (1 MiB)");
        }
        if self.queue.capacity == 0 || self.queue.batch == 0 {
            return fail("queue.capacity", "capacity and batch must be at least 1");
        }
        let redis = self.redis.url.expose_secret();
        let cluster = redis.starts_with("redis+cluster://");
        if !(redis.is_empty()
            || redis.starts_with("redis://")
            || redis.starts_with("rediss://")
            || cluster)
        {
            return fail(
                "redis.url",
                "must be empty (in-process), a redis:// URL, or redis+cluster://host:port,host:port",
            );
        }
        if cluster && self.redis.key_prefix.contains(['{', '}']) {
            return fail(
                "redis.key_prefix",
                "must not contain { or } on a Redis Cluster (braces are the keys' hash tags)",
            );
        }
        let hook = &self.queue.webhook_url;
        if !(hook.is_empty() || hook.starts_with("http://") || hook.starts_with("https://")) {
            return fail("queue.webhook_url", "must be empty or an http(s):// URL");
        }
        if self.redis.pubsub_keepalive_ms < 100 {
            return fail("redis.pubsub_keepalive_ms", "must be at least 100");
        }
        if self.queue.redeliver_after_ms < 1000 {
            return fail("queue.redeliver_after_ms", "must be at least 1000");
        }
        if self.queue.max_attempts == 0 {
            return fail("queue.max_attempts", "must be at least 1");
        }
        if self.database.acquire_timeout_ms == 0 {
            return fail("database.acquire_timeout_ms", "must be at least 1");
        }
        if self.database.busy_timeout_ms == 0 {
            return fail("database.busy_timeout_ms", "must be at least 1");
        }
        if !(1..=MAX_WRITE_BATCH).contains(&self.database.write_batch) {
            return fail(
                "database.write_batch",
                &format!("must be 1..={MAX_WRITE_BATCH}"),
            );
        }
        if self.database.write_queue == 0 {
            return fail("database.write_queue", "must be at least 1");
        }
        if !(10..=60_000).contains(&self.database.checkpoint_interval_ms) {
            return fail(
                "database.checkpoint_interval_ms",
                "must be between 10 and 60000",
            );
        }
        if !(1..=1_048_576).contains(&self.database.wal_limit_mb) {
            return fail("database.wal_limit_mb", "must be between 1 and 1048576");
        }
        if self.database.write_interval_ms > 1000 {
            return fail("database.write_interval_ms", "must be at most 1000");
        }
        let url = self.database.url.expose_secret();
        if !(url.is_empty() || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return fail(
                "database.url",
                "must be empty (embedded SQLite) or a postgres:// URL",
            );
        }
        let a = &self.auth;
        let has_secret = !a.jwt_secret.expose_secret().is_empty();
        let has_key_file = !a.public_key_file.as_os_str().is_empty();
        match a.algorithm {
            JwtAlgorithm::HS256 => {
                if has_key_file {
                    return fail(
                        "auth.public_key_file",
                        "is for RS256/ES256; set auth.algorithm accordingly or use auth.jwt_secret",
                    );
                }
                if has_secret && a.jwt_secret.expose_secret().len() < 32 {
                    return fail("auth.jwt_secret", "must be at least 32 bytes");
                }
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                if has_secret {
                    return fail(
                        "auth.jwt_secret",
                        "is for HS256; RS256/ES256 use auth.public_key_file",
                    );
                }
                if !has_key_file {
                    return fail("auth.public_key_file", "is required for RS256/ES256");
                }
            }
        }
        Ok(())
    }

    /// True when no signing key is configured: the server makes its own secret and may mint tokens.
    pub fn dev_mode(&self) -> bool {
        self.auth.jwt_secret.expose_secret().is_empty()
            && self.auth.public_key_file.as_os_str().is_empty()
    }

    /// Whether stored messages have side effects to perform (a webhook): only then do sends
    /// write outbox rows for the worker. Every node of a cluster must agree.
    pub fn side_effects(&self) -> bool {
        !self.queue.webhook_url.is_empty()
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.server.data_dir.join("chat.db")
    }
}

impl Limits {
    /// Messages kept in a room's cached history tail: the largest page, and one more to tell
    /// whether an older message exists.
    pub fn history_tail_len(&self) -> usize {
        self.history_max_limit as usize + 1
    }
}

impl HeartbeatSettings {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_in_dev_mode() {
        let s = Settings::defaults();
        assert!(s.dev_mode());
        assert_eq!(s.limits.max_content_chars, 2000);
        assert_eq!(s.rate_limit.user_burst, 5);
    }

    #[test]
    fn secrets_do_not_print() {
        let mut s = Settings::defaults();
        s.auth.jwt_secret = SecretString::from("super-secret-value-that-must-not-leak!!");
        assert!(!format!("{s:?}").contains("super-secret"));
    }

    #[test]
    fn the_replaced_max_pages_is_refused_with_its_successor_named() {
        let mut s = Settings::defaults();
        s.cache.max_pages = Some(100_000);
        let err = s.validate().unwrap_err().to_string();
        assert!(
            err.contains("cache.max_pages") && err.contains("cache.max_bytes"),
            "{err}"
        );
    }

    #[test]
    fn allowed_origins_come_from_the_environment_as_a_comma_separated_list() {
        let load = |value: &str| {
            let env = [("CHAT_GATEWAY__SERVER__ALLOWED_ORIGINS", value)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Settings::build(
                Config::builder()
                    .add_source(File::from_str(DEFAULTS, FileFormat::Toml))
                    .add_source(environment().source(Some(env))),
            )
        };
        let s = load("https://app.example.com, https://*.example.com:8443").unwrap();
        assert_eq!(
            s.server.allowed_origins,
            ["https://app.example.com", " https://*.example.com:8443"]
        );
        assert_eq!(
            load("https://app.example.com")
                .unwrap()
                .server
                .allowed_origins,
            ["https://app.example.com"]
        );
        let err = load("https://app.example.com/").unwrap_err().to_string();
        assert!(err.contains("server.allowed_origins"), "{err}");
        assert!(Settings::defaults().server.allowed_origins.is_empty());
    }

    #[test]
    fn invalid_value_names_the_key() {
        let mut s = Settings::defaults();
        s.limits.outbound_queue = 1;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("limits.outbound_queue"), "{err}");
    }
}
