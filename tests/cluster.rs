//! A real cluster: three processes of the built `chat-gateway` binary on their own ports, sharing
//! one Postgres database and one Redis. Messages cross nodes exactly once and in order; a node
//! killed with SIGKILL mid-traffic loses no acknowledged message; the rate limit holds for the
//! cluster. Needs Postgres and Redis (skipped with a plain message without them, failing under
//! CI=true).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::nodes::{Node, WebhookReceiver, client, gateway_binary, setup_room, token};
use common::{SECRET, ScratchDb, redis_url, scratch_database, unique_prefix};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

struct Cluster {
    nodes: Vec<Node>,
    db: ScratchDb,
    _data: tempfile::TempDir,
}

async fn cluster(n: usize) -> Option<Cluster> {
    cluster_with(n, false, &[]).await
}

async fn cluster_with(n: usize, rate_limits: bool, env: &[(&str, &str)]) -> Option<Cluster> {
    let redis = redis_url().await?;
    let db = scratch_database().await?;
    let data = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(Node::start_with(&db, &redis, &prefix, data.path(), rate_limits, env).await);
    }
    Some(Cluster {
        nodes,
        db,
        _data: data,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_deliver_every_message_once_and_in_order() {
    let Some(c) = cluster(3).await else { return };
    setup_room(c.nodes[0].addr, "r", &["a", "b", "c"]).await;
    let mut on_b = client(c.nodes[1].addr, "b").await;
    let mut on_c = client(c.nodes[2].addr, "c").await;
    on_b.join("r", None).await;
    on_c.join("r", None).await;
    let mut on_a = client(c.nodes[0].addr, "a").await;
    for i in 1..=30 {
        on_a.send_ok("r", &format!("m{i}")).await;
    }
    for receiver in [&mut on_b, &mut on_c] {
        let mut got = Vec::new();
        for _ in 1..=30 {
            got.push(receiver.expect_message("r").await["seq"].as_i64().unwrap());
        }
        assert_eq!(got, (1..=30).collect::<Vec<_>>());
        receiver.expect_silence(Duration::from_millis(300)).await;
    }
    drop(c.db);
}

/// Reads a room's pushes, following the cluster: when its node dies it reconnects to the next one
/// and resumes from the last sequence it saw. Returns every message it was shown, in order, as
/// (seq, content).
async fn follow(
    nodes: Vec<SocketAddr>,
    user: &str,
    room: &str,
    until_seq: tokio::sync::watch::Receiver<i64>,
) -> Vec<(i64, String)> {
    let mut seen: Vec<(i64, String)> = Vec::new();
    let mut node = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    'reconnect: loop {
        assert!(Instant::now() < deadline, "{user} never caught up");
        let since = seen.last().map(|(s, _)| *s);
        let token = token(user, chat_gateway::auth::Role::User);
        let url = format!("ws://{}/ws?token={token}", nodes[node]);
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_tungstenite::connect_async(url),
        )
        .await
        else {
            node = (node + 1) % nodes.len();
            continue;
        };
        let mut join = json!({"type": "join", "id": "j", "room": room});
        if let Some(s) = since {
            join["since"] = json!(s);
        }
        use futures::SinkExt;
        if ws.send(WsMessage::text(join.to_string())).await.is_err() {
            node = (node + 1) % nodes.len();
            continue;
        }
        loop {
            let target = *until_seq.borrow();
            if target > 0 && seen.last().is_some_and(|(s, _)| *s >= target) {
                return seen;
            }
            match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(WsMessage::Text(t)))) => {
                    let frame: Value = serde_json::from_str(t.as_str()).unwrap();
                    if frame["type"] == "message" {
                        let m = &frame["message"];
                        seen.push((
                            m["seq"].as_i64().unwrap(),
                            m["content"].as_str().unwrap().to_string(),
                        ));
                    }
                }
                Ok(Some(Ok(_))) => {}
                Ok(None | Some(Err(_))) => {
                    node = (node + 1) % nodes.len();
                    continue 'reconnect;
                }
            }
        }
    }
}

/// Sends `count` messages, following the cluster like `follow`; a send whose ack was lost with its
/// node is retried elsewhere with the same clientMsgId. Returns the acknowledged (seq, message
/// id, content)s.
async fn send_all(
    nodes: Vec<SocketAddr>,
    user: &str,
    room: &str,
    count: usize,
) -> Vec<(i64, String, String)> {
    let mut acked = Vec::new();
    let mut node = 0;
    let mut next = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while next < count {
        assert!(
            Instant::now() < deadline,
            "{user} could not send everything"
        );
        let token = token(user, chat_gateway::auth::Role::User);
        let url = format!("ws://{}/ws?token={token}", nodes[node]);
        let Ok(Ok((mut ws, _))) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio_tungstenite::connect_async(url),
        )
        .await
        else {
            node = (node + 1) % nodes.len();
            continue;
        };
        use futures::SinkExt;
        while next < count {
            let id = format!("{user}-{next}");
            let frame =
                json!({"type": "send", "id": id, "room": room, "content": id, "clientMsgId": id});
            if ws.send(WsMessage::text(frame.to_string())).await.is_err() {
                break;
            }
            let reply = loop {
                match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                    Ok(Some(Ok(WsMessage::Text(t)))) => {
                        let v: Value = serde_json::from_str(t.as_str()).unwrap();
                        if v["id"] == id.as_str() {
                            break Some(v);
                        }
                    }
                    Ok(Some(Ok(_))) => {}
                    _ => break None,
                }
            };
            let Some(reply) = reply else { break };
            if reply["type"] != "result" {
                // `unavailable` while the cluster settles: retry the same clientMsgId.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let m = &reply["result"]["message"];
            acked.push((
                m["seq"].as_i64().unwrap(),
                m["id"].as_str().unwrap().to_string(),
                id.clone(),
            ));
            next += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        node = (node + 1) % nodes.len();
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_traffic_loses_no_acknowledged_message() {
    // Side effects the dead node took and never did are queued again when their outbox lease
    // ends: 5 s here instead of the default minute, so the test sees it happen.
    let hook = WebhookReceiver::start(Duration::ZERO).await;
    let env = [
        ("CHAT_GATEWAY__QUEUE__REDELIVER_AFTER_MS", "5000"),
        ("CHAT_GATEWAY__QUEUE__WEBHOOK_URL", hook.url.as_str()),
    ];
    let Some(mut c) = cluster_with(3, false, &env).await else {
        return;
    };
    let addrs: Vec<SocketAddr> = c.nodes.iter().map(|n| n.addr).collect();
    setup_room(addrs[0], "r", &["r1", "r2", "s1", "s2"]).await;
    let (done_tx, done_rx) = tokio::sync::watch::channel(0i64);
    // Receivers and one sender start on node A (the one that dies); another sender on node C.
    let r1 = tokio::spawn(follow(addrs.clone(), "r1", "r", done_rx.clone()));
    let r2 = tokio::spawn(follow(addrs.clone(), "r2", "r", done_rx.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s1 = tokio::spawn(send_all(addrs.clone(), "s1", "r", 150));
    let s2 = tokio::spawn(send_all(vec![addrs[2], addrs[1]], "s2", "r", 150));
    tokio::time::sleep(Duration::from_millis(400)).await;
    c.nodes[0].kill();

    let mut acked = s1.await.unwrap();
    acked.extend(s2.await.unwrap());
    assert_eq!(acked.len(), 300);
    let ids: HashSet<String> = acked.iter().map(|(_, id, _)| id.clone()).collect();
    assert_eq!(ids.len(), 300, "a retried send created no second message");
    let max = acked.iter().map(|(s, _, _)| *s).max().unwrap();
    assert_eq!(
        max, 300,
        "the sequence has no gap: 300 messages, seqs 1..=300"
    );
    done_tx.send(max).unwrap();
    let expected: BTreeMap<i64, String> = acked
        .into_iter()
        .map(|(seq, _, content)| (seq, content))
        .collect();
    for receiver in [r1, r2] {
        let seen = receiver.await.unwrap();
        let seqs: Vec<i64> = seen.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=300).collect::<Vec<_>>(),
            "every message once, in order, across the failover"
        );
        for (seq, content) in &seen {
            assert_eq!(&expected[seq], content);
        }
    }
    // No side effect was lost with the node: every stored message reached the webhook (those the
    // dead node had taken are queued again when their lease ends), every outbox row is done and
    // deleted, and the room's lastMessageAt is the last message's time.
    let pool = c.db.pool().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (outbox, behind): (i64, bool) = sqlx::query_as(
            r#"SELECT (SELECT COUNT(*) FROM "ChatOutbox"),
                      (SELECT "lastMessageAt" IS DISTINCT FROM (SELECT MAX("createdAt") FROM "ChatMessage" WHERE "roomId" = 'r')
                       FROM "ChatRoom" WHERE id = 'r')"#,
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        let missing = ids
            .iter()
            .filter(|id| !hook.distinct().contains(id.as_str()))
            .count();
        if outbox == 0 && !behind && missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "side effects lost: {missing} webhooks, {outbox} outbox rows left, lastMessageAt behind: {behind}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(c.db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_worker_process_performs_the_side_effects() {
    let Some(redis) = redis_url().await else {
        return;
    };
    let Some(db) = scratch_database().await else {
        return;
    };
    let hook = WebhookReceiver::start(Duration::ZERO).await;
    let data = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let mut gateway = Node::start_with(
        &db,
        &redis,
        &prefix,
        data.path(),
        false,
        &[
            ("CHAT_GATEWAY__QUEUE__RUN_WORKER", "false"),
            ("CHAT_GATEWAY__QUEUE__WEBHOOK_URL", &hook.url),
        ],
    )
    .await;
    setup_room(gateway.addr, "r", &["alice"]).await;
    let mut alice = client(gateway.addr, "alice").await;
    let sent = alice.send_ok("r", "side effects elsewhere").await;
    // Nobody performs jobs yet: they wait in the stream.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        hook.distinct().is_empty(),
        "the gateway must not run the worker"
    );
    let mut worker = Command::new(gateway_binary())
        .arg("worker")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("REDIS_URL", &redis)
        .env("CHAT_GATEWAY__REDIS__KEY_PREFIX", &prefix)
        .env("CHAT_GATEWAY__QUEUE__WEBHOOK_URL", &hook.url)
        .env("JWT_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !hook.distinct().contains(sent["id"].as_str().unwrap()) {
        assert!(
            Instant::now() < deadline,
            "the worker process did not perform the job"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = worker.kill();
    let _ = worker.wait();
    gateway.kill();
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_across_processes() {
    let Some(c) = cluster_with(3, true, &[]).await else {
        return;
    };
    let addrs: Vec<SocketAddr> = c.nodes.iter().map(|n| n.addr).collect();
    setup_room(addrs[0], "r", &["alice"]).await;
    let mut on_a = client(addrs[0], "alice").await;
    let mut on_b = client(addrs[1], "alice").await;
    let mut accepted = 0;
    let started = Instant::now();
    for i in 0..4 {
        for socket in [&mut on_a, &mut on_b] {
            let reply = socket
                .send("r", &format!("{i}"), &uuid::Uuid::new_v4().to_string())
                .await;
            match reply["type"].as_str() {
                Some("result") => accepted += 1,
                _ => {
                    assert_eq!(reply["error"]["code"], "rate_limited", "{reply}");
                    // Never "retry in 0 ms": a client that obeys it would spin.
                    let hint = reply["error"]["retryAfterMs"].as_u64().unwrap_or(0);
                    assert!(hint >= 1, "{reply}");
                }
            }
        }
    }
    let r = reqwest::Client::new()
        .post(format!("http://{}/api/chat/rooms/r/messages", addrs[2]))
        .bearer_auth(token("alice", chat_gateway::auth::Role::User))
        .json(&json!({"content": "over REST"}))
        .send()
        .await
        .unwrap();
    match r.status().as_u16() {
        201 => accepted += 1,
        status => assert_eq!(status, 429),
    }
    // One burst of 5 for the whole cluster (per-node limits would let 9 through), plus what the
    // bucket refilled (3/s) while this slow debug-build loop ran.
    let refilled = (started.elapsed().as_millis() / 333) as usize;
    assert!(
        (5..=5 + refilled).contains(&accepted),
        "{accepted} accepted in {:?}: the limit is not cluster-wide",
        started.elapsed()
    );
    drop(c.db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_of_a_killed_node_go_offline_within_the_lease() {
    let Some(redis) = redis_url().await else {
        return;
    };
    let Some(db) = scratch_database().await else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let lease = [("CHAT_GATEWAY__SIGNALS__PRESENCE_LEASE_MS", "1500")];
    let mut a = Node::start_with(&db, &redis, &prefix, data.path(), false, &lease).await;
    let b = Node::start_with(&db, &redis, &prefix, data.path(), false, &lease).await;
    setup_room(a.addr, "r", &["alice", "bob"]).await;
    let mut tab1 = client(a.addr, "alice").await;
    let mut tab2 = client(a.addr, "alice").await;
    tab1.join("r", None).await;
    tab2.join("r", None).await;
    let mut bob = client(b.addr, "bob").await;
    bob.join("r", None).await;
    // A join is recorded in presence just after its reply (each node records its presence
    // changes in batches), so a request right after the join may not count it yet.
    let asked = Instant::now();
    let page = loop {
        let page = bob.request(json!({"type": "presence", "room": "r"})).await;
        if page["result"]["online"] == 2 || asked.elapsed() > Duration::from_secs(5) {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        page["result"]["online"], 2,
        "alice (two tabs) and bob: {page}"
    );

    a.kill();
    let killed = Instant::now();
    let gone = loop {
        let push = bob.next_push_any().await;
        if push["type"] == "presence" && push["left"] == json!(["alice"]) {
            break push;
        }
    };
    assert_eq!(gone["online"], 1);
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "offline {:?} after the kill",
        killed.elapsed()
    );
    let page = bob.request(json!({"type": "presence", "room": "r"})).await;
    assert_eq!(
        page["result"]["users"],
        json!([{"userId": "bob", "name": "bob"}])
    );
    drop(b);
    drop(db);
}
