//! Gateways on a Redis Cluster (3 primaries + 3 replicas, `.ci/redis-cluster start`): rooms spread
//! over every shard, a primary killed with SIGKILL mid-traffic, and a busy room's slot migrated to
//! another shard mid-traffic. Every acknowledged message must reach every receiver on the other
//! node exactly once and in order, history must hold it, and the gateways must recover without a
//! restart. The rest of the Redis behaviour (cache, limits, presence, queue) is tests/redis.rs,
//! which `.ci/run` runs a second time against this cluster.
//!
//! `TEST_REDIS_CLUSTER` names the cluster (default: the ports of `.ci/redis-cluster`). Without one
//! the suite says it skipped; under `CI=true` it fails.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    DataDir, TestApp, reachable_redis, redis_settings, redis_target_conn, say, unique_prefix,
};
use serde_json::Value;
use tokio::sync::RwLock;

/// Tests that kill or reshard take this for writing; the others share it, so no test runs while
/// a shard is away.
static FAULTS: RwLock<()> = RwLock::const_new(());

async fn cluster_url() -> Option<String> {
    let url = std::env::var("TEST_REDIS_CLUSTER").unwrap_or_else(|_| {
        "redis+cluster://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003".to_string()
    });
    reachable_redis(
        url,
        "Start one with `.ci/redis-cluster start` or set TEST_REDIS_CLUSTER to run the Redis \
         Cluster suite.",
    )
    .await
}

/// For a test that kills, freezes or reshards: the cluster, its nodes' ports, and the lock that
/// keeps every other test of the suite away until it is whole again.
async fn exclusive_cluster()
-> Option<(String, Vec<u16>, tokio::sync::RwLockWriteGuard<'static, ()>)> {
    let url = cluster_url().await?;
    let guard = FAULTS.write().await;
    let ports = all_ports(&url).await;
    wait_healthy(&ports, Duration::from_secs(30)).await;
    Some((url, ports, guard))
}

/// Gateway nodes in this process sharing one SQLite file and the cluster.
struct Nodes {
    nodes: Vec<TestApp>,
    prefix: String,
    _dir: tempfile::TempDir,
}

async fn nodes(url: &str, n: usize) -> Nodes {
    nodes_with(url, n, |_| {}).await
}

async fn nodes_with(
    url: &str,
    n: usize,
    configure: impl Fn(&mut chat_gateway::config::Settings),
) -> Nodes {
    let prefix = unique_prefix();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for _ in 0..n {
        let mut settings = redis_settings(url, &prefix);
        settings.rate_limit.enabled = false;
        configure(&mut settings);
        nodes.push(TestApp::start(settings, DataDir::Borrowed(dir.path().to_path_buf())).await);
    }
    Nodes {
        nodes,
        prefix,
        _dir: dir,
    }
}

/// A primary of the cluster: its node id, port and slot ranges.
#[derive(Debug, Clone)]
struct Primary {
    id: String,
    port: u16,
    slots: Vec<(u16, u16)>,
}

/// The primaries as a healthy node sees them (CLUSTER NODES).
async fn primaries(ports: &[u16]) -> Vec<Primary> {
    for port in ports {
        let Ok(text) = node_cmd::<String>(*port, redis::cmd("CLUSTER").arg("NODES")).await else {
            continue;
        };
        return text
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                let flags = fields.get(2)?;
                if !flags.contains("master") || flags.contains("fail") {
                    return None;
                }
                let port = fields[1].split(['@', ':']).nth(1)?.parse().ok()?;
                let slots = fields[8..]
                    .iter()
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|range| match range.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => range.parse().ok().map(|s| (s, s)),
                    })
                    .collect();
                Some(Primary {
                    id: fields[0].to_string(),
                    port,
                    slots,
                })
            })
            .filter(|p: &Primary| !p.slots.is_empty())
            .collect();
    }
    panic!("no cluster node answered CLUSTER NODES");
}

fn owner(primaries: &[Primary], slot: u16) -> &Primary {
    primaries
        .iter()
        .find(|p| p.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
        .unwrap_or_else(|| panic!("no primary owns slot {slot}: {primaries:?}"))
}

/// The slot of a room's keys and channel (its hash tag is the room id).
async fn slot(url: &str, room: &str) -> u16 {
    let mut conn = redis_target_conn(url).await.unwrap();
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(format!("{{{room}}}"))
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// A command to one node of the cluster, by port.
async fn node_cmd<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connect timed out")))??;
    tokio::time::timeout(Duration::from_secs(5), cmd.query_async(&mut conn))
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "command timed out")))?
}

/// The ports of every node (primaries and replicas) a seed knows.
async fn all_ports(url: &str) -> Vec<u16> {
    let mut conn = redis_target_conn(url).await.unwrap();
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut conn)
        .await
        .unwrap();
    text.lines()
        .filter_map(|l| l.split(' ').nth(1)?.split(['@', ':']).nth(1)?.parse().ok())
        .collect()
}

/// Waits until every node answers and agrees the cluster is whole: state ok, 3 primaries with
/// slots, 3 connected replicas.
async fn wait_healthy(ports: &[u16], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let mut healthy = true;
        for port in ports {
            let info = node_cmd::<String>(*port, redis::cmd("CLUSTER").arg("INFO")).await;
            let nodes = node_cmd::<String>(*port, redis::cmd("CLUSTER").arg("NODES")).await;
            let replication =
                node_cmd::<String>(*port, redis::cmd("INFO").arg("replication")).await;
            let ok = match (info, nodes, replication) {
                (Ok(info), Ok(nodes), Ok(replication)) => {
                    info.contains("cluster_state:ok")
                        // A replica that never synced cannot be promoted.
                        && (replication.contains("role:master")
                            || replication.contains("master_link_status:up"))
                        && nodes
                            .lines()
                            .filter(|l| l.contains("slave") && l.contains(" connected"))
                            .count()
                            == 3
                        && !nodes.contains("fail")
                }
                _ => false,
            };
            healthy &= ok;
        }
        if healthy {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the Redis Cluster did not become whole again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What one receiver saw: (seq, sent at, received at) per message, in arrival order, times in
/// microseconds since the traffic began.
type Seen = Arc<Mutex<Vec<(i64, u64, u64)>>>;

/// Traffic through `rooms`: a sender on node 0 and a receiver on node 1 per room, so every
/// message crosses Redis. Sends one message per room every `every` until `stop`; returns, per
/// room, the acknowledged seqs and what the receiver saw.
struct Traffic {
    started: Instant,
    acked: HashMap<String, Arc<Mutex<Vec<i64>>>>,
    seen: HashMap<String, Seen>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    senders: Vec<tokio::task::JoinHandle<()>>,
    receivers: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    async fn start(n: &Nodes, rooms: &[String], every: Duration) -> Traffic {
        let started = Instant::now();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut traffic = Traffic {
            started,
            acked: HashMap::new(),
            seen: HashMap::new(),
            stop: stop.clone(),
            senders: Vec::new(),
            receivers: Vec::new(),
        };
        for room in rooms {
            let (sender, receiver) = (format!("s-{room}"), format!("r-{room}"));
            n.nodes[0].room(room, &[&sender, &receiver]).await;
            let mut receiver = n.nodes[1].client(&receiver).await;
            receiver.join(room, None).await;
            let mut sender = n.nodes[0].client(&sender).await;
            let acked = Arc::new(Mutex::new(Vec::new()));
            let seen: Seen = Arc::new(Mutex::new(Vec::new()));
            traffic.acked.insert(room.clone(), acked.clone());
            traffic.seen.insert(room.clone(), seen.clone());
            let (room_s, stop_s) = (room.clone(), stop.clone());
            traffic.senders.push(tokio::spawn(async move {
                while !stop_s.load(std::sync::atomic::Ordering::Relaxed) {
                    let at = started.elapsed().as_micros() as u64;
                    let message = sender.send_ok(&room_s, &at.to_string()).await;
                    acked.lock().unwrap().push(message["seq"].as_i64().unwrap());
                    tokio::time::sleep(every).await;
                }
            }));
            let room_r = room.clone();
            traffic.receivers.push(tokio::spawn(async move {
                loop {
                    let Ok(push) =
                        tokio::time::timeout(Duration::from_millis(300), receiver.next_push())
                            .await
                    else {
                        continue;
                    };
                    if push["type"] != "message" {
                        continue;
                    }
                    assert_eq!(push["room"], room_r.as_str(), "{push}");
                    let message: &Value = &push["message"];
                    let sent: u64 = message["content"].as_str().unwrap().parse().unwrap();
                    seen.lock().unwrap().push((
                        message["seq"].as_i64().unwrap(),
                        sent,
                        started.elapsed().as_micros() as u64,
                    ));
                }
            }));
        }
        traffic
    }

    fn elapsed_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Stops sending, waits (bounded) until every receiver has every acknowledged message, and
    /// asserts each got exactly the acknowledged seqs, once, in order.
    async fn finish(self) -> HashMap<String, Vec<(i64, u64, u64)>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for sender in self.senders {
            sender.await.expect("a sender failed");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let complete = self.acked.iter().all(|(room, acked)| {
                let last = acked.lock().unwrap().last().copied().unwrap_or(0);
                let seen = self.seen[room].lock().unwrap();
                seen.last().map_or(last == 0, |(seq, ..)| *seq >= last)
            });
            if complete || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Anything still on its way (a duplicate) shows up in this quiet time.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for receiver in &self.receivers {
            receiver.abort();
        }
        let mut out = HashMap::new();
        for (room, acked) in &self.acked {
            let acked = acked.lock().unwrap().clone();
            let seen = self.seen[room].lock().unwrap().clone();
            let seqs: Vec<i64> = seen.iter().map(|(seq, ..)| *seq).collect();
            assert!(!acked.is_empty(), "{room}: nothing was acknowledged");
            assert_eq!(
                acked,
                (1..=acked.len() as i64).collect::<Vec<_>>(),
                "{room}: acked"
            );
            assert_eq!(
                seqs, acked,
                "{room}: every acknowledged message, exactly once, in order"
            );
            out.insert(room.clone(), seen);
        }
        out
    }
}

/// Every acknowledged message is in the newest page of history, read on the receiving node.
async fn assert_history_complete(n: &Nodes, delivered: &HashMap<String, Vec<(i64, u64, u64)>>) {
    for (room, seen) in delivered {
        let mut reader = n.nodes[1].client(&format!("r-{room}")).await;
        let last = seen.last().unwrap().0;
        let reply = reader.history(room, None, Some(100)).await;
        common::assert_latest_page_holds(&reply, last, room);
    }
}

/// Per room: the time from `since` (µs) until every later message crossed in under `bound`.
fn recovery(
    delivered: &HashMap<String, Vec<(i64, u64, u64)>>,
    rooms: &[String],
    since: u64,
    bound: Duration,
) -> Duration {
    let bound = bound.as_micros() as u64;
    let last_slow = rooms
        .iter()
        .flat_map(|room| delivered[room].iter())
        .filter(|(_, sent, received)| received.saturating_sub(*sent) > bound && *received > since)
        .map(|(_, _, received)| *received)
        .max()
        .unwrap_or(since);
    Duration::from_micros(last_slow - since)
}

fn latency_p99(delivered: &HashMap<String, Vec<(i64, u64, u64)>>) -> Duration {
    let mut all: Vec<u64> = delivered
        .values()
        .flatten()
        .map(|(_, sent, received)| received.saturating_sub(*sent))
        .collect();
    all.sort_unstable();
    Duration::from_micros(all[(all.len() * 99 / 100).min(all.len() - 1)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_spread_over_every_shard_and_cross_nodes_once_in_order() {
    let Some(url) = cluster_url().await else {
        return;
    };
    let _shared = FAULTS.read().await;
    let n = nodes(&url, 2).await;
    let rooms: Vec<String> = (0..24).map(|i| format!("room-{i}")).collect();
    let ports = all_ports(&url).await;
    let primaries = primaries(&ports).await;
    let mut shards = std::collections::HashSet::new();
    for room in &rooms {
        shards.insert(owner(&primaries, slot(&url, room).await).port);
    }
    assert!(
        shards.len() >= 3,
        "the rooms landed on {} shards only",
        shards.len()
    );
    let traffic = Traffic::start(&n, &rooms, Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Each room's channel is a sharded channel on its own shard, with the two nodes subscribed.
    let mut conn = redis_target_conn(&url).await.unwrap();
    for room in &rooms {
        let channel = format!("{}chat:room:{{{room}}}", n.prefix);
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(&channel)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(counts[0].1, 1, "{channel}: the receiving node subscribed");
    }
    let delivered = traffic.finish().await;
    assert_history_complete(&n, &delivered).await;
    let total: usize = delivered.values().map(Vec::len).sum();
    say(&format!(
        "redis cluster: {} rooms on {} shards, {total} messages across nodes, p99 {:?}",
        rooms.len(),
        shards.len(),
        latency_p99(&delivered)
    ));
    for node in &n.nodes {
        assert_eq!(
            node.metric("chat_redis_reconnects_total{connection=\"pubsub\"}")
                .await,
            0.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_mid_traffic_loses_nothing_and_the_gateways_resubscribe() {
    let Some((url, ports, _exclusive)) = exclusive_cluster().await else {
        return;
    };
    let n = nodes(&url, 2).await;
    let rooms: Vec<String> = (0..12).map(|i| format!("fo-{i}")).collect();
    let before = primaries(&ports).await;
    let mut by_shard: HashMap<u16, Vec<String>> = HashMap::new();
    for room in &rooms {
        let port = owner(&before, slot(&url, room).await).port;
        by_shard.entry(port).or_default().push(room.clone());
    }
    // The victim: the primary with the most of these rooms, none of the seeds' first.
    let (&victim, affected) = by_shard
        .iter()
        .max_by_key(|(port, rooms)| (rooms.len(), u16::MAX - **port))
        .unwrap();
    let affected = affected.clone();
    let info: String = node_cmd(victim, redis::cmd("INFO").arg("server"))
        .await
        .unwrap();
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap()
            .trim()
            .to_string()
    };
    let (pid, config) = (field("process_id"), field("config_file"));

    let traffic = Traffic::start(&n, &rooms, Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = traffic.elapsed_us();
    let status = std::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill -9 {pid}");
    // Its replica is promoted after cluster-node-timeout (2 s); traffic goes on throughout.
    let deadline = Instant::now() + Duration::from_secs(30);
    let promoted = loop {
        let ports_alive: Vec<u16> = ports.iter().copied().filter(|p| *p != victim).collect();
        let now = primaries(&ports_alive).await;
        if now.len() == 3 && now.iter().all(|p| p.port != victim) {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "no replica was promoted: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let promoted_at = traffic.elapsed_us();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let delivered = traffic.finish().await;
    assert_history_complete(&n, &delivered).await;
    let recovered = recovery(&delivered, &affected, killed_at, Duration::from_millis(250));
    say(&format!(
        "redis cluster failover: primary :{victim} killed, replica promoted after {:?} \
         ({promoted:?}); cross-node delivery of its {} rooms back under 250 ms after {recovered:?}",
        Duration::from_micros(promoted_at - killed_at),
        affected.len()
    ));
    assert!(
        recovered < Duration::from_secs(20),
        "took {recovered:?} to recover"
    );
    // Without a restart: the gateways are the same processes, their pub/sub is up.
    for node in &n.nodes {
        let ready: Value = node
            .http
            .get(node.url("/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(ready["redis"], "ok", "{ready}");
    }
    // The killed node comes back as a replica: the cluster is whole for the next test.
    let status = std::process::Command::new("redis-server")
        .arg(&config)
        .status()
        .unwrap();
    assert!(status.success(), "redis-server {config}");
    wait_healthy(&ports, Duration::from_secs(60)).await;
}

/// Moves one slot and its keys from one primary to another, as `redis-cli --cluster reshard`
/// does: IMPORTING on the target, MIGRATING on the source, MIGRATE the keys in batches, then
/// every primary is told the new owner.
async fn move_slot(slot: u16, from: &Primary, to: &Primary, primaries: &[Primary]) {
    let setslot = |port: u16, state: &'static str, id: String| async move {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
        node_cmd::<()>(port, &cmd).await.unwrap();
    };
    setslot(to.port, "IMPORTING", from.id.clone()).await;
    setslot(from.port, "MIGRATING", to.id.clone()).await;
    loop {
        let mut list = redis::cmd("CLUSTER");
        list.arg("GETKEYSINSLOT").arg(slot).arg(100);
        let keys: Vec<String> = node_cmd(from.port, &list).await.unwrap();
        if keys.is_empty() {
            break;
        }
        let mut migrate = redis::cmd("MIGRATE");
        migrate
            .arg("127.0.0.1")
            .arg(to.port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys);
        node_cmd::<()>(from.port, &migrate).await.unwrap();
    }
    // The two owners first, then the others.
    setslot(to.port, "NODE", to.id.clone()).await;
    setslot(from.port, "NODE", to.id.clone()).await;
    for other in primaries
        .iter()
        .filter(|p| p.id != from.id && p.id != to.id)
    {
        setslot(other.port, "NODE", to.id.clone()).await;
    }
}

/// The process id of one node, from INFO.
async fn pid_of(port: u16) -> String {
    let info: String = node_cmd(port, redis::cmd("INFO").arg("server"))
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .unwrap()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_is_noticed_by_the_keepalive_and_nothing_is_lost() {
    // A primary that stops answering without closing its connections (SIGSTOP: a hung host, a
    // half-open connection) for less than the cluster's node timeout, so no failover happens:
    // only the gateways' own pings can tell, and the connection they rebuild must carry every
    // room again.
    let Some((url, ports, _exclusive)) = exclusive_cluster().await else {
        return;
    };
    let n = nodes_with(&url, 2, |s| s.redis.pubsub_keepalive_ms = 200).await;
    let rooms: Vec<String> = (0..6).map(|i| format!("frozen-{i}")).collect();
    let before = primaries(&ports).await;
    let victim = owner(&before, slot(&url, &rooms[0]).await).port;
    let pid = pid_of(victim).await;
    let traffic = Traffic::start(&n, &rooms, Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let frozen_at = traffic.elapsed_us();
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    signal("-CONT");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let delivered = traffic.finish().await;
    assert_history_complete(&n, &delivered).await;
    let recovered = recovery(&delivered, &rooms, frozen_at, Duration::from_millis(250));
    let mut reconnects = 0.0;
    for node in &n.nodes {
        reconnects += node
            .metric("chat_redis_reconnects_total{connection=\"pubsub\"}")
            .await;
    }
    say(&format!(
        "redis cluster: primary :{victim} frozen for 1.2 s; the gateways' pub/sub was \
         rebuilt ({reconnects} reconnects counted); delivery under 250 ms again {recovered:?} after \
         the freeze began"
    ));
    assert!(
        reconnects >= 1.0,
        "no gateway noticed the frozen primary's silence"
    );
    assert!(
        recovered < Duration::from_secs(10),
        "took {recovered:?} to recover"
    );
    wait_healthy(&ports, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_rooms_slot_migrated_mid_traffic_loses_nothing() {
    let Some((url, ports, _exclusive)) = exclusive_cluster().await else {
        return;
    };
    let n = nodes(&url, 2).await;
    let busy = format!("busy-{}", uuid::Uuid::new_v4().simple());
    let rooms = vec![busy.clone()];
    let slot = slot(&url, &busy).await;
    let before = primaries(&ports).await;
    let source = owner(&before, slot).clone();
    let target = before.iter().find(|p| p.id != source.id).unwrap().clone();

    let traffic = Traffic::start(&n, &rooms, Duration::from_millis(10)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let moved_at = traffic.elapsed_us();
    move_slot(slot, &source, &target, &before).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The room's channel now lives on the target, with both nodes subscribed there.
    let channel = format!("{}chat:room:{{{busy}}}", n.prefix);
    let counts: Vec<(String, i64)> = node_cmd(
        target.port,
        redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(&channel),
    )
    .await
    .unwrap();
    assert_eq!(
        counts[0].1, 1,
        "the receiving node followed the slot to its new owner"
    );
    let delivered = traffic.finish().await;
    assert_history_complete(&n, &delivered).await;
    let recovered = recovery(&delivered, &rooms, moved_at, Duration::from_millis(250));
    say(&format!(
        "redis cluster migration: slot {slot} of a room at 100 msgs/s moved :{} -> :{}; {} \
         messages, p99 {:?}, slow (> 250 ms) until {recovered:?} after the move began",
        source.port,
        target.port,
        delivered[&busy].len(),
        latency_p99(&delivered)
    ));
    // Move it back, so the cluster keeps its even layout for other suites.
    move_slot(slot, &target, &source, &before).await;
    wait_healthy(&ports, Duration::from_secs(30)).await;
}
