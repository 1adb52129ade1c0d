//! A soak of the message path across nodes: two gateway processes on one Postgres database and one
//! Redis, steady chat traffic between them for a minute, longer than every timer on the path (the
//! pub/sub keepalive every 10 s, the relay's and the worker's rounds, the read-mark flushes).
//! It asserts what a timer's bug shows as, not only loss: pub/sub and command reconnects,
//! deadlocks and retried writes, the outbox drained, and the latency of cross-node delivery.
//!
//! `SOAK_SECS` shortens or lengthens it for a local run (CI runs the default, 60 s).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::nodes::{Node, setup_room, token};
use common::{redis_url, say, scratch_database, unique_prefix};
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const ROOMS: usize = 20;
const USERS_PER_ROOM: usize = 4;
/// Messages per second over all rooms.
const RATE: u64 = 100;
/// Cross-node delivery p99 the soak must stay under on this machine (debug build, everything on
/// two cores).
const P99_BOUND: Duration = Duration::from_millis(50);

type Sink = SplitSink<common::Ws, WsMessage>;

/// What one socket saw.
#[derive(Default)]
struct Seen {
    /// (seq, content, when) of every message push, in arrival order.
    messages: Vec<(i64, String, Instant)>,
    acks: usize,
    errors: Vec<Value>,
}

struct Socket {
    node: usize,
    room: String,
    sink: tokio::sync::Mutex<Sink>,
    seen: Arc<Mutex<Seen>>,
}

async fn open_socket(addr: std::net::SocketAddr, node: usize, user: &str, room: &str) -> Socket {
    let url = format!(
        "ws://{addr}/ws?token={}",
        token(user, chat_gateway::auth::Role::User)
    );
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(url),
    )
    .await
    .expect("connect in time")
    .expect("connect");
    let (mut sink, mut stream) = ws.split();
    let join = json!({"type": "join", "id": "join", "room": room});
    sink.send(WsMessage::text(join.to_string())).await.unwrap();
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("join reply in time")
            .expect("socket open")
            .unwrap();
        if let WsMessage::Text(t) = frame {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == "join" {
                assert_eq!(v["type"], "result", "{v}");
                break;
            }
        }
    }
    let seen = Arc::new(Mutex::new(Seen::default()));
    {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                let WsMessage::Text(t) = frame else { continue };
                let at = Instant::now();
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                let mut seen = seen.lock().unwrap();
                match v["type"].as_str() {
                    Some("message") => seen.messages.push((
                        v["message"]["seq"].as_i64().unwrap(),
                        v["message"]["content"].as_str().unwrap().to_string(),
                        at,
                    )),
                    Some("result") if v["id"].as_str().is_some_and(|id| id.starts_with('s')) => {
                        seen.acks += 1
                    }
                    Some("error") => seen.errors.push(v),
                    _ => {}
                }
            }
        });
    }
    Socket {
        node,
        room: room.to_string(),
        sink: tokio::sync::Mutex::new(sink),
        seen,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_of_cross_node_traffic_without_reconnects_deadlocks_or_stalls() {
    let Some(redis) = redis_url().await else {
        return;
    };
    let Some(db) = scratch_database().await else {
        return;
    };
    let soak = Duration::from_secs(
        std::env::var("SOAK_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let data = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    // Default timers: the pub/sub keepalive (10 s) must fire several times within the soak.
    let nodes = vec![
        Node::start(&db, &redis, &prefix, data.path(), false).await,
        Node::start(&db, &redis, &prefix, data.path(), false).await,
    ];

    // Every user holds a socket on each node (two tabs), in a room of four.
    let mut sockets: Vec<Arc<Socket>> = Vec::new();
    let mut members: HashMap<String, Vec<usize>> = HashMap::new();
    for r in 0..ROOMS {
        let room = format!("soak-{r}");
        let users: Vec<String> = (0..USERS_PER_ROOM).map(|u| format!("u{r}-{u}")).collect();
        let names: Vec<&str> = users.iter().map(String::as_str).collect();
        setup_room(nodes[0].addr, &room, &names).await;
        for user in &users {
            for (n, node) in nodes.iter().enumerate() {
                members.entry(room.clone()).or_default().push(sockets.len());
                sockets.push(Arc::new(open_socket(node.addr, n, user, &room).await));
            }
        }
    }
    let sockets = Arc::new(sockets);
    // content -> (sent at, the sender's node)
    let sent: Arc<Mutex<HashMap<String, (Instant, usize)>>> = Default::default();

    // Read marks every second from every socket: the same (room, user) from both nodes, so the
    // nodes' workers write overlapping memberships (and rooms) all along. Spread over the second
    // as real clients' marks are (each marks when it has read), not all at one instant: a burst
    // of 160 marks, each a receipt pushed to 8 sockets, would measure this test's own client
    // parsing 1,280 frames at once on the machine's two cores, not the gateway.
    let marking = {
        let sockets = sockets.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1) / sockets.len() as u32);
            for round in 0.. {
                every.tick().await;
                let i = round % sockets.len();
                let socket = &sockets[i];
                let last = socket.seen.lock().unwrap().messages.last().map(|m| m.0);
                if let Some(seq) = last {
                    let frame = json!({"type": "mark_read", "id": format!("m{round}"), "room": socket.room, "seq": seq});
                    let _ = socket
                        .sink
                        .lock()
                        .await
                        .send(WsMessage::text(frame.to_string()))
                        .await;
                }
            }
        })
    };

    let started = Instant::now();
    let total = RATE * soak.as_secs();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    for i in 0..total as usize {
        tick.tick().await;
        let room = i % ROOMS;
        let member = (i / ROOMS) % (USERS_PER_ROOM * 2);
        let socket = &sockets[members[&format!("soak-{room}")][member]];
        let content = format!("soak message {i}");
        let frame = json!({"type": "send", "id": format!("s{i}"), "room": socket.room, "content": content, "clientMsgId": format!("c{i}")});
        sent.lock()
            .unwrap()
            .insert(content, (Instant::now(), socket.node));
        socket
            .sink
            .lock()
            .await
            .send(WsMessage::text(frame.to_string()))
            .await
            .unwrap();
    }
    let sending = started.elapsed();
    marking.abort();

    // Every socket receives every message of its room: wait for the last ones to arrive.
    let per_room = total as usize / ROOMS;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let behind = sockets
            .iter()
            .filter(|s| s.seen.lock().unwrap().messages.len() < per_room)
            .count();
        if behind == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{behind} sockets never received every message of their room"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let sent = std::mem::take(&mut *sent.lock().unwrap());
    let mut cross_node = Vec::new();
    let mut same_node = Vec::new();
    for socket in sockets.iter() {
        let seen = socket.seen.lock().unwrap();
        assert!(seen.errors.is_empty(), "errors: {:?}", seen.errors);
        let seqs: Vec<i64> = seen.messages.iter().map(|m| m.0).collect();
        assert_eq!(
            seqs,
            (1..=per_room as i64).collect::<Vec<_>>(),
            "every message of {} once, in order",
            socket.room
        );
        for (_, content, at) in &seen.messages {
            let (when, node) = sent[content];
            let latency = at.saturating_duration_since(when);
            if node == socket.node {
                same_node.push(latency);
            } else {
                cross_node.push(latency);
            }
        }
    }
    let acks: usize = sockets.iter().map(|s| s.seen.lock().unwrap().acks).sum();
    assert_eq!(acks, total as usize, "every send acknowledged");
    cross_node.sort();
    same_node.sort();
    let (p50, p99, max) = (
        percentile(&cross_node, 0.50),
        percentile(&cross_node, 0.99),
        *cross_node.last().unwrap(),
    );
    say(&format!(
        "soak: {total} messages over {sending:.1?} across 2 nodes, {} cross-node deliveries: p50 {p50:.1?}, p99 {p99:.1?}, max {max:.1?}; same node p99 {:.1?}",
        cross_node.len(),
        percentile(&same_node, 0.99),
    ));

    // Counters: a connection that drops and comes back loses nothing, and shows only here.
    for (n, node) in nodes.iter().enumerate() {
        for connection in ["pubsub", "commands", "presence"] {
            let key = format!("chat_redis_reconnects_total{{connection=\"{connection}\"}}");
            assert_eq!(node.metric(&key).await, 0.0, "node {n}: {key}");
        }
        for reason in ["deadlock", "serialization"] {
            let key = format!("chat_store_retries_total{{reason=\"{reason}\"}}");
            assert_eq!(node.metric(&key).await, 0.0, "node {n}: {key}");
        }
        assert_eq!(node.metric("chat_store_outages_total").await, 0.0);
        let complaints = node.log_lines("redis pub/sub");
        assert!(complaints.is_empty(), "node {n} logged: {complaints:?}");
    }
    assert!(
        p99 < P99_BOUND,
        "cross-node delivery p99 {p99:?} (bound {P99_BOUND:?}; max {max:?})"
    );

    // The side effects caught up: the outbox is empty and every room's lastMessageAt is its last
    // message's; and Postgres saw no deadlock at all.
    let pool = db.pool().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (outbox, stale): (i64, i64) = sqlx::query_as(
            r#"SELECT (SELECT COUNT(*) FROM "ChatOutbox"),
                      (SELECT COUNT(*) FROM "ChatRoom" r WHERE r."lastMessageAt" IS DISTINCT FROM
                         (SELECT MAX("createdAt") FROM "ChatMessage" m WHERE m."roomId" = r.id))"#,
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if outbox == 0 && stale == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "side effects behind: {outbox} outbox rows, {stale} rooms' lastMessageAt stale"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadlocks: i64 = sqlx::query_scalar(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(deadlocks, 0, "Postgres detected deadlocks");
    drop(nodes);
    drop(db);
}
