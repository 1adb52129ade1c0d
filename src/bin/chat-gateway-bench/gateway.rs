//! The gateway seen from outside: its nodes, the users' and the SERVICE token, rooms and members
//! set up through the management API, and what the gateway, Postgres and Redis spent over a run
//! (CPU and RSS from /proc, counters from /metrics and Postgres' statistics), which the
//! `Observer` prints.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use anyhow::{Context, bail};
use chat_gateway::auth::{Role, TokenMinter, claims_for};
use futures::StreamExt;
use secrecy::SecretString;
use serde_json::json;
use tokio::net::TcpSocket;

use crate::Common;

// ---------------------------------------------------------------------------------------------
// Setup through the management API

pub(crate) struct Gateway {
    /// The first node's base URL: setup and the scenarios' HTTP requests go there.
    pub(crate) base: String,
    /// Every node: its base URL and socket address.
    nodes: Vec<(String, SocketAddr)>,
    pub(crate) http: reqwest::Client,
    minter: TokenMinter,
    service_token: String,
    run_id: String,
    source_addrs: u8,
}

impl Gateway {
    pub(crate) fn new(common: &Common) -> anyhow::Result<Self> {
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
    pub(crate) fn node_addr(&self, n: usize) -> SocketAddr {
        self.nodes[n % self.nodes.len()].1
    }

    pub(crate) fn room_id(&self, i: usize) -> String {
        format!("{}-room-{i}", self.run_id)
    }

    pub(crate) fn user_id(&self, i: usize) -> String {
        format!("{}-user-{i}", self.run_id)
    }

    /// The storm's probe sockets' users.
    pub(crate) fn probe_id(&self, i: usize) -> String {
        format!("{}-probe-{i}", self.run_id)
    }

    pub(crate) fn token(&self, user: &str) -> String {
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
    pub(crate) async fn setup(&self, rooms: &[(String, Vec<String>)]) -> anyhow::Result<()> {
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

    pub(crate) async fn tcp(&self, n: usize) -> std::io::Result<tokio::net::TcpStream> {
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
// The server, seen from outside

#[derive(Clone, Copy)]
pub(crate) struct ProcSample {
    pub(crate) cpu_secs: f64,
    pub(crate) rss_kib: u64,
}

pub(crate) fn proc_sample(pid: u32) -> anyhow::Result<ProcSample> {
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

/// Counters read from the gateway's /metrics for the statements-per-message line: messages
/// stored (`chat_messages_received_total`, every door), changes stored
/// (`chat_messages_changed_total`, every kind) and, on the SQLite store, the store's write
/// statements (`chat_store_write_statements_total`, BEGIN and COMMIT included).
async fn store_counters(http: &reqwest::Client, base: &str) -> Stored {
    let mut stored = Stored::default();
    let Ok(r) = http.get(format!("{base}/metrics")).send().await else {
        return stored;
    };
    let text = r.text().await.unwrap_or_default();
    for line in text.lines() {
        let value = || -> f64 {
            line.rsplit_once(' ')
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0.0)
        };
        if line.starts_with("chat_messages_received_total") {
            stored.messages += value();
        } else if line.starts_with("chat_messages_changed_total") {
            stored.changes += value();
        } else if line.starts_with("chat_store_write_statements_total") {
            stored.statements = Some(stored.statements.unwrap_or(0.0) + value());
        }
    }
    stored
}

/// What the store took in, from the gateways' /metrics.
#[derive(Clone, Copy, Default)]
struct Stored {
    messages: f64,
    changes: f64,
    /// The SQLite store's write statements (absent on Postgres).
    statements: Option<f64>,
}

impl Stored {
    /// Messages and changes stored: what the per-stored lines divide by.
    fn events(&self) -> f64 {
        self.messages + self.changes
    }

    /// What the per-stored lines count, in words.
    fn unit(&self) -> &'static str {
        match (self.messages > 0.0, self.changes > 0.0) {
            (_, false) => "message",
            (false, true) => "change",
            (true, true) => "message or change",
        }
    }

    fn since(&self, before: &Stored) -> Stored {
        Stored {
            messages: self.messages - before.messages,
            changes: self.changes - before.changes,
            statements: self.statements.zip(before.statements).map(|(a, b)| a - b),
        }
    }
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

/// Messages and changes stored (every node) and the SQLite store's write statements (the first
/// node).
async fn all_store_counters(gw: &Gateway) -> Stored {
    Stored {
        messages: nodes_metric(gw, "chat_messages_received_total").await,
        changes: nodes_metric(gw, "chat_messages_changed_total").await,
        statements: store_counters(&gw.http, &gw.base).await.statements,
    }
}

/// The gateway's backlog of presence changes, from /metrics (absent on gateways without it).
pub(crate) async fn presence_backlog(http: &reqwest::Client, base: &str) -> Option<f64> {
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

pub(crate) struct Observer {
    /// The gateway processes and their samples at the start.
    servers: Vec<(u32, ProcSample)>,
    postgres: Option<(u32, f64)>,
    redis: Vec<(u32, f64)>,
    cache_before: (f64, f64),
    store_before: Stored,
    reconnects_before: f64,
    pg: Option<(PgCounter, Option<f64>)>,
    pub(crate) started: Instant,
}

impl Observer {
    pub(crate) async fn start(gw: &Gateway, common: &Common) -> Self {
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
                .iter()
                .filter_map(|p| Some((*p, proc_sample(*p).ok()?.cpu_secs)))
                .collect(),
            cache_before: cache_counters(&gw.http, &gw.base).await,
            store_before: all_store_counters(gw).await,
            reconnects_before: nodes_metric(gw, "chat_redis_reconnects_total").await,
            pg,
            started: Instant::now(),
        }
    }

    /// Database statements per message (or change) stored during the run, when there were any;
    /// returns what was stored.
    async fn statements(&self, gw: &Gateway) -> Stored {
        let stored = all_store_counters(gw).await.since(&self.store_before);
        let (n, unit) = (stored.events(), stored.unit());
        if n <= 0.0 {
            return stored;
        }
        let what = match (stored.messages, stored.changes) {
            (m, c) if c <= 0.0 => format!("{m:.0} messages"),
            (m, c) if m <= 0.0 => format!("{c:.0} changes"),
            (m, c) => format!("{m:.0} messages and {c:.0} changes"),
        };
        if let Some(statements) = stored.statements {
            println!(
                "store statements       {statements:.0} write statements (gateway's count) for {what} stored: {:.2} per {unit}",
                statements / n
            );
        }
        if let Some((counter, Some(before))) = &self.pg
            && let Some(after) = counter.count().await
        {
            println!(
                "database statements    {:.0} {} for {what} stored: {:.2} per {unit} (whole database, every client)",
                after - before,
                counter.what(),
                (after - before) / n
            );
        }
        stored
    }

    /// Prints the server-side lines; returns the gateways' CPU seconds spent, when known.
    pub(crate) async fn finish(&self, gw: &Gateway) -> Option<f64> {
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
            if stored.events() > 0.0 {
                format!(
                    ", {:.1} us per {} stored",
                    cpu * 1e6 / stored.events(),
                    stored.unit()
                )
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
        let mut redis_total = 0.0;
        for (pid, before) in &self.redis {
            let Ok(after) = proc_sample(*pid) else {
                continue;
            };
            let cpu = after.cpu_secs - before;
            redis_total += cpu;
            println!(
                "redis {pid:<16} cpu={cpu:.2}s ({:.0}% of a core){}",
                100.0 * cpu / wall,
                per_message(cpu)
            );
        }
        if self.redis.len() > 1 {
            println!(
                "redis, all nodes       cpu={redis_total:.2}s ({:.0}% of a core){}",
                100.0 * redis_total / wall,
                per_message(redis_total)
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
