//! The shared Redis connection of one gateway node: an auto-reconnecting multiplexed connection
//! for commands, the client (for the pub/sub connection and dedicated connections), and the key
//! prefix every key and channel carries. Commands on the shared connection are bounded by
//! `redis.command_timeout_ms`.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::ExposeSecret;

use crate::config::RedisSettings;

#[derive(Clone)]
pub struct RedisConn {
    pub client: redis::Client,
    /// Multiplexed, reconnects by itself; cheap to clone (one TCP connection per node). Never
    /// send a blocking command on it: it would hold up every other command of the node.
    pub conn: ConnectionManager,
    pub prefix: String,
    /// Bound on every command through [`RedisConn::bounded`], reconnection time included.
    timeout: Duration,
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

impl RedisConn {
    pub async fn connect(settings: &RedisSettings) -> anyhow::Result<Self> {
        let client = redis::Client::open(settings.url.expose_secret())
            .map_err(|e| anyhow::anyhow!("invalid configuration: redis.url: {e}"))?;
        let timeout = Duration::from_millis(settings.command_timeout_ms.max(1));
        let conn = manager(&client, Some(timeout)).await?;
        Ok(Self {
            client,
            conn,
            prefix: settings.key_prefix.clone(),
            timeout,
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

    /// Runs a command, failing after `redis.command_timeout_ms`. The connection manager's own
    /// response timeout does not cover the time it spends reconnecting, which while Redis is down
    /// would hold a send for seconds.
    pub async fn bounded<T>(
        &self,
        command: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> redis::RedisResult<T> {
        match tokio::time::timeout(self.timeout, command).await {
            Ok(result) => result,
            Err(_) => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "redis command timed out",
            ))),
        }
    }

    /// PING, for readiness.
    pub async fn ping(&self) -> bool {
        let mut conn = self.conn.clone();
        self.bounded(redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .is_ok()
    }
}
