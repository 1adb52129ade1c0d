//! `chat-gateway-bench`: a load generator that speaks the gateway's real protocol over real
//! sockets and prints a report. Loopback only, bounded in connections, rate and time.
//!
//! Each scenario mirrors a k6 script or a target of docs/BENCHMARKS.md; `--help` explains them.
//! Rooms and memberships are set up through the management API with a SERVICE token minted from
//! `--jwt-secret` (the gateway must run with the same `JWT_SECRET`), users' tokens likewise.
//!
//! # Layout
//!
//! - This file: the command line (`Cli`, the `Common` options, a `Scenario` each), the hard
//!   limits, and `main`, which checks them and runs one scenario on one thread.
//! - [`gateway`]: the gateway seen from outside: its nodes, tokens, room setup through the
//!   management API, and what it (and Postgres and Redis) spent over a run, reported by the
//!   `Observer`.
//! - [`client`]: one WebSocket client (connect, auth, join, the measured phase) and connecting
//!   thousands of them.
//! - [`report`]: what the clients record (`Stats`, `Counters`), open-loop pacing, and the
//!   report's latency and error lines.
//! - Scenarios, a module each: [`seed`] (REST), [`rooms`] (`chat` and `fanout`), [`changes`]
//!   (edits and reactions in `chat`'s rooms), [`idle`], [`history`], [`storm`] (the presence
//!   reconnect storm, in submodules of its own).
//!
//! Scenarios call `gateway`, `client` and `report`; those never call a scenario.

mod changes;
mod client;
mod gateway;
mod history;
mod idle;
mod report;
mod rooms;
mod seed;
mod storm;

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use clap::{Args, Parser, Subcommand};

use crate::changes::changes;
use crate::client::raise_nofile;
use crate::gateway::Gateway;
use crate::history::history;
use crate::idle::idle;
use crate::rooms::{chat, fanout};
use crate::seed::seed;
use crate::storm::{StormOptions, storm};

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
  changes  `chat`'s rooms, where after one message per member the load is changes: edits of \
the members' own messages and reactions toggled on the rooms' newest messages, at a total rate \
R; every member receives every change as a `change` push\n\
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
    /// The Redis server's process id: report its CPU per message stored, from /proc. For a Redis
    /// Cluster, the ids of its nodes comma-separated (each one's share, and their sum).
    #[arg(long, global = true, value_delimiter = ',')]
    redis_pid: Vec<u32>,
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
    /// `chat`'s rooms, changes instead of sends: edits of own messages and reactions.
    Changes {
        /// Users, each holding one socket.
        #[arg(long, default_value_t = 1000)]
        users: usize,
        /// Members per room (every member's socket joins its room).
        #[arg(long, default_value_t = 10)]
        room_size: usize,
        /// Total changes per second, spread round-robin over all users.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Percent of the changes that are edits (the rest are reactions, added or removed).
        #[arg(long, default_value_t = 25)]
        edit_percent: u32,
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let common = cli.common.clone();
    if common.duration == 0 || common.duration > MAX_DURATION_SECS {
        bail!("--duration must be 1..={MAX_DURATION_SECS} seconds");
    }
    let sockets = match &cli.scenario {
        Scenario::Seed { .. } => 0,
        Scenario::Chat { users, .. } | Scenario::Changes { users, .. } => *users,
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
        | Scenario::Changes { rate, .. }
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
            Scenario::Changes { users, room_size, rate, edit_percent } => changes(gw, &common, users, room_size, rate, edit_percent).await,
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
