//! The shared Redis connection of one gateway node: an auto-reconnecting multiplexed connection
//! for commands, the client (for the pub/sub connection and dedicated connections), and the key
//! prefix every key and channel carries. Commands on the shared connection are bounded by
//! `redis.command_timeout_ms`, and fail at once while Redis is known down (see [`Health`]): a
//! send during a Redis outage skips the cache append and the publish instead of waiting for them.
//!
//! Two topologies, chosen by `redis.url`: one Redis (`redis://`), or a Redis Cluster
//! (`redis+cluster://host:port,host:port`, the seed nodes). On a cluster the command connection is
//! the `redis` crate's cluster connection (one multiplexed connection per node, slots followed
//! through `MOVED`/`ASK` and topology refreshes), and every key that one script or transaction
//! touches together carries the same hash tag ([`RedisConn::tag`]): `{roomId}` for a room's keys,
//! `{userId}` for a user's.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, Value};
use secrecy::ExposeSecret;

use crate::config::RedisSettings;
use crate::health::Health;

/// Where the node's Redis lives: one server, or a cluster known by its seed nodes.
#[derive(Clone, Debug)]
pub enum Topology {
    Single(redis::Client),
    /// Seed node URLs (`redis://[user:password@]host:port`); the rest is discovered.
    Cluster(Vec<String>),
}

impl Topology {
    /// Parses `redis.url`: `redis://…` (one server) or `redis+cluster://[user:password@]h:p,h:p`.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let Some(rest) = url.strip_prefix("redis+cluster://") else {
            let client = redis::Client::open(url)
                .map_err(|e| anyhow::anyhow!("invalid configuration: redis.url: {e}"))?;
            return Ok(Self::Single(client));
        };
        let (auth, hosts) = match rest.rsplit_once('@') {
            Some((auth, hosts)) => (format!("{auth}@"), hosts),
            None => (String::new(), rest),
        };
        let hosts = hosts.trim_end_matches('/');
        let seeds: Vec<String> = hosts
            .split(',')
            .filter(|h| !h.is_empty())
            .map(|host| format!("redis://{auth}{host}"))
            .collect();
        if seeds.is_empty() {
            anyhow::bail!(
                "invalid configuration: redis.url: redis+cluster:// needs at least one host:port"
            );
        }
        for seed in &seeds {
            redis::Client::open(seed.as_str())
                .map_err(|e| anyhow::anyhow!("invalid configuration: redis.url: {e}"))?;
        }
        Ok(Self::Cluster(seeds))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// A cluster client's builder for these seeds (`None` timeout: no response timeout).
    pub fn cluster_client(
        seeds: &[String],
        response_timeout: Option<Duration>,
    ) -> redis::cluster::ClusterClientBuilder {
        let mut builder = ClusterClient::builder(seeds.to_vec())
            .connection_timeout(Duration::from_secs(2))
            .retries(3)
            .min_retry_wait(50)
            .max_retry_wait(500);
        if let Some(timeout) = response_timeout {
            builder = builder.response_timeout(timeout);
        }
        builder
    }
}

/// A multiplexed command connection to one Redis or to a cluster; both reconnect by themselves
/// and are cheap to clone.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// PING every server this connection needs (every primary of a cluster).
    async fn ping(&mut self) -> redis::RedisResult<()> {
        match self {
            Self::Single(c) => redis::cmd("PING")
                .query_async::<String>(c)
                .await
                .map(|_| ()),
            Self::Cluster(c) => {
                c.route_command(
                    redis::cmd("PING"),
                    RoutingInfo::MultiNode((
                        MultipleNodeRoutingInfo::AllMasters,
                        Some(ResponsePolicy::AllSucceeded),
                    )),
                )
                .await?;
                // The PING reaches the primaries the connection holds; the cluster's own view
                // says whether a primary that owns slots is failing or unreachable.
                let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(c).await?;
                match nodes.lines().find(|line| primary_down(line)) {
                    Some(line) => Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "a primary of the cluster is down",
                        line.to_string(),
                    ))),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Whether a line of CLUSTER NODES is a primary that owns slots and is failing or disconnected
/// (`id addr flags primary ping pong epoch link slots…`).
fn primary_down(line: &str) -> bool {
    let fields: Vec<&str> = line.split(' ').collect();
    fields.len() > 8
        && fields[2].contains("master")
        && (fields[2].contains("fail") || fields[7] != "connected")
}

#[derive(Clone)]
pub struct RedisConn {
    pub topology: Topology,
    /// Multiplexed, reconnects by itself; cheap to clone (one TCP connection per server). Never
    /// send a blocking command on it: it would hold up every other command of the node.
    pub conn: Conn,
    pub prefix: String,
    /// Bound on every command through [`RedisConn::bounded`], reconnection time included.
    timeout: Duration,
    /// Whether Redis answers on this connection; [`RedisConn::bounded`] fails at once while not.
    pub health: Arc<Health>,
}

/// A command connection to `topology` (`None`: no response timeout).
pub async fn connection(
    topology: &Topology,
    response_timeout: Option<Duration>,
) -> anyhow::Result<Conn> {
    let seeds = match topology {
        Topology::Single(client) => {
            return Ok(Conn::Single(manager(client, response_timeout).await?));
        }
        Topology::Cluster(seeds) => seeds,
    };
    let client = Topology::cluster_client(seeds, response_timeout)
        .build()
        .map_err(|e| anyhow::anyhow!("invalid configuration: redis.url: {e}"))?;
    let conn = tokio::time::timeout(Duration::from_secs(10), client.get_async_connection())
        .await
        .map_err(|_| anyhow::anyhow!("redis.url: no answer from the Redis Cluster within 10 s"))?
        .map_err(|e| anyhow::anyhow!("redis.url: cannot connect to the Redis Cluster: {e}"))?;
    Ok(Conn::Cluster(conn))
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
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                )
        )
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
        let topology = Topology::parse(settings.url.expose_secret())?;
        let timeout = Duration::from_millis(settings.command_timeout_ms.max(1));
        let conn = connection(&topology, Some(timeout)).await?;
        let probe_conn = conn.clone();
        let health = Health::new(
            name,
            lost,
            Box::new(move || {
                let mut conn = probe_conn.clone();
                Box::pin(async move {
                    // The PING also makes the connection reconnect when it is gone; on a
                    // cluster every primary must answer (a failover in progress is an outage).
                    let answer = conn.ping();
                    matches!(tokio::time::timeout(timeout, answer).await, Ok(Ok(())))
                })
            }),
        );
        Ok(Self {
            topology,
            conn,
            prefix: settings.key_prefix.clone(),
            timeout,
            health,
        })
    }

    /// A connection of its own, for blocking commands (XREADGROUP BLOCK). No response timeout:
    /// a blocking read legitimately waits for its BLOCK time.
    /// On a cluster, answers are bounded at 10 s (blocking reads block for less).
    pub async fn dedicated(&self) -> anyhow::Result<Conn> {
        let timeout = self
            .topology
            .is_cluster()
            .then_some(Duration::from_secs(10));
        connection(&self.topology, timeout).await
    }

    pub fn is_cluster(&self) -> bool {
        self.topology.is_cluster()
    }

    /// A key or channel name with this node's prefix.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The part of a key that decides its slot: `{id}` on a cluster, so that every key holding
    /// `tag(id)` lives on one shard and one script may touch them together; `id` as is on one
    /// Redis, whose key names stay what they always were.
    pub fn tag<'a>(&self, id: &'a str) -> Cow<'a, str> {
        if self.is_cluster() {
            Cow::Owned(format!("{{{id}}}"))
        } else {
            Cow::Borrowed(id)
        }
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
        self.bounded(async move { conn.ping().await }).await.is_ok()
    }
}
