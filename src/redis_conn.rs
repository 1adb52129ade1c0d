//! The shared Redis connection of one gateway node: an auto-reconnecting multiplexed connection
//! for commands, the client (for the pub/sub connection and dedicated connections), and the key
//! prefix every key and channel carries. Commands on the shared connection are bounded by
//! `redis.command_timeout_ms`, and fail at once while Redis is known down (see [`Health`]): a
//! send during a Redis outage skips the cache append and the publish instead of waiting for them.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;

use crate::config::RedisSettings;
use crate::health::Health;

#[derive(Clone)]
pub struct RedisConn {
    pub client: redis::Client,
    /// Multiplexed, reconnects by itself; cheap to clone (one TCP connection per node). Never
    /// send a blocking command on it: it would hold up every other command of the node.
    pub conn: ConnectionManager,
    pub prefix: String,
    /// Bound on every command through [`RedisConn::bounded`], reconnection time included.
    timeout: Duration,
    /// Whether Redis answers on this connection; [`RedisConn::bounded`] fails at once while not.
    pub health: Arc<Health>,
}

async fn manager(
    client: &redis::Client,
    response_timeout: Option<Duration>,
) -> anyhow::Result<ConnectionManager> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(response_timeout)
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_max_delay(Duration::from_secs(2));
    tokio::time::timeout(
        Duration::from_secs(10),
        ConnectionManager::new_with_config(client.clone(), config),
    )
    .await
    .map_err(|_| anyhow::anyhow!("redis.url: no answer from Redis within 10 s"))?
    .map_err(|e| anyhow::anyhow!("redis.url: cannot connect to Redis: {e}"))
}

/// A failure that says Redis cannot be reached on this connection (refused, reset, timed out,
/// still loading its data after a restart), as opposed to an answer it gave (a script error).
fn unreachable(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_timeout()
        || matches!(e.kind(), ErrorKind::Server(ServerErrorKind::BusyLoading))
}

fn timed_out() -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "redis command timed out"))
}

impl RedisConn {
    /// Connects (Redis must answer now). `name` labels the connection in logs; `lost` counts the
    /// times it was found unreachable.
    pub async fn connect(
        settings: &RedisSettings,
        name: &'static str,
        lost: Counter,
    ) -> anyhow::Result<Self> {
        let client = redis::Client::open(settings.url.expose_secret())
            .map_err(|e| anyhow::anyhow!("invalid configuration: redis.url: {e}"))?;
        let timeout = Duration::from_millis(settings.command_timeout_ms.max(1));
        let conn = manager(&client, Some(timeout)).await?;
        let probe_conn = conn.clone();
        let health = Health::new(
            name,
            lost,
            Box::new(move || {
                let mut conn = probe_conn.clone();
                Box::pin(async move {
                    // The PING also makes the manager reconnect when its connection is gone.
                    let ping = redis::cmd("PING");
                    let answer = ping.query_async::<String>(&mut conn);
                    matches!(tokio::time::timeout(timeout, answer).await, Ok(Ok(_)))
                })
            }),
        );
        Ok(Self {
            client,
            conn,
            prefix: settings.key_prefix.clone(),
            timeout,
            health,
        })
    }

    /// A connection of its own, for blocking commands (XREADGROUP BLOCK). No response timeout:
    /// a blocking read legitimately waits for its BLOCK time.
    pub async fn dedicated(&self) -> anyhow::Result<ConnectionManager> {
        manager(&self.client, None).await
    }

    /// A key or channel name with this node's prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Runs a command, failing after `redis.command_timeout_ms`, and at once while Redis is known
    /// down. The connection manager's own response timeout does not cover the time it spends
    /// reconnecting, which while Redis is down would hold a send for seconds; a command that
    /// finds Redis unreachable marks it down for every caller until the probe hears it again.
    pub async fn bounded<T>(
        &self,
        command: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        if !self.health.is_up() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "redis is unreachable (waiting for it to answer again)",
            )));
        }
        let result = match tokio::time::timeout(self.timeout, command).await {
            Ok(result) => result,
            Err(_) => Err(timed_out()),
        };
        if let Err(e) = &result
            && unreachable(e)
        {
            self.health.trip(e);
        }
        result
    }

    /// Logs a failed command: at `warn`, or at `debug` while Redis is known down (the loss was
    /// logged once, and every send would otherwise log it again).
    pub fn log_failure(&self, what: &str, e: &redis::RedisError) {
        if self.health.is_up() {
            tracing::warn!(error = %e, "{what}");
        } else {
            tracing::debug!(error = %e, "{what}");
        }
    }

    /// PING, for readiness: false at once while Redis is known down.
    pub async fn ping(&self) -> bool {
        let mut conn = self.conn.clone();
        self.bounded(redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .is_ok()
    }
}
