//! Several gateway nodes sharing one Redis (and one database) act as one: fan-out across nodes,
//! a shared history cache, cluster-wide rate limits, backend events, the durable job queue.
//! Nodes here are gateways in this process on their own ports sharing a SQLite file; the
//! process-level cluster tests (separate binaries, kill -9) run on Postgres.
//!
//! With `TEST_REDIS_URL=redis+cluster://…` the same suite runs against a Redis Cluster (`.ci/run`
//! runs it both ways): sharded channels, hash-tagged keys. The tests that restart a Redis of their
//! own run in the single-server pass only; tests/redis_cluster.rs kills and migrates shards.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::faults::{OwnRedis, own_redis};
use common::{
    DataDir, TestApp, WAIT, assert_latest_page_holds, is_cluster, redis_settings,
    redis_target_conn, redis_url, seqs, tag, unique_prefix, until_ready,
};
use serde_json::json;

struct Cluster {
    nodes: Vec<TestApp>,
    prefix: String,
    url: String,
    _dir: tempfile::TempDir,
}

async fn cluster(
    n: usize,
    configure: impl Fn(&mut chat_gateway::config::Settings),
) -> Option<Cluster> {
    let url = redis_url().await?;
    let prefix = unique_prefix();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for _ in 0..n {
        let mut settings = redis_settings(&url, &prefix);
        configure(&mut settings);
        nodes.push(TestApp::start(settings, DataDir::Borrowed(dir.path().to_path_buf())).await);
    }
    Some(Cluster {
        nodes,
        prefix,
        url,
        _dir: dir,
    })
}

async fn redis_conn(url: &str) -> chat_gateway::redis_conn::Conn {
    redis_target_conn(url).await.unwrap()
}

/// Subscribers of a room channel: PUBSUB NUMSUB, or SHARDNUMSUB on a cluster.
async fn subscribers(url: &str, channel: &str) -> i64 {
    let mut conn = redis_conn(url).await;
    let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
        .arg(if is_cluster(url) {
            "SHARDNUMSUB"
        } else {
            "NUMSUB"
        })
        .arg(channel)
        .query_async(&mut conn)
        .await
        .unwrap();
    counts[0].1
}

/// The tests that restart a Redis of their own need nothing of `TEST_REDIS_URL`: they run once,
/// in the single-server pass.
fn cluster_pass() -> bool {
    std::env::var("TEST_REDIS_URL").is_ok_and(|url| is_cluster(&url))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_reach_members_on_every_node_once_and_in_order() {
    let Some(c) = cluster(3, |_| {}).await else {
        return;
    };
    let (a, b, n3) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);
    a.room("r", &["alice", "bob", "carol", "dave"]).await;
    let mut alice = a.client("alice").await;
    let mut bob = b.client("bob").await;
    let mut carol = n3.client("carol").await;
    let mut dave = a.client("dave").await;
    for client in [&mut alice, &mut bob, &mut carol, &mut dave] {
        client.join("r", None).await;
    }
    // Senders on two nodes at once.
    let mut bob_sender = b.client("bob").await;
    for i in 0..20 {
        if i % 2 == 0 {
            alice.send_ok("r", &format!("a{i}")).await;
        } else {
            bob_sender.send_ok("r", &format!("b{i}")).await;
        }
    }
    for client in [&mut alice, &mut bob, &mut carol, &mut dave] {
        let mut got = Vec::new();
        for _ in 0..20 {
            got.push(client.expect_message("r").await);
        }
        assert_eq!(seqs(&got), (1..=20).collect::<Vec<_>>());
        client.expect_silence(Duration::from_millis(200)).await;
    }
    // Only nodes with members of the room subscribe to it.
    let channel = format!("{}chat:room:{}", c.prefix, tag(&c.url, "r"));
    assert_eq!(subscribers(&c.url, &channel).await, 3);
    carol.close().await;
    let deadline = Instant::now() + WAIT;
    loop {
        if subscribers(&c.url, &channel).await == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node without members kept its subscription"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_for_the_cluster() {
    let Some(c) = cluster(3, |s| s.rate_limit.enabled = true).await else {
        return;
    };
    c.nodes[0].room("r", &["alice"]).await;
    let mut on_a = c.nodes[0].client("alice").await;
    let mut on_b = c.nodes[1].client("alice").await;
    let mut accepted = 0;
    let started = Instant::now();
    for i in 0..4 {
        for client in [&mut on_a, &mut on_b] {
            let reply = client
                .send("r", &format!("{i}"), &uuid::Uuid::new_v4().to_string())
                .await;
            if reply["type"] == "result" {
                accepted += 1;
            } else {
                assert_eq!(reply["error"]["code"], "rate_limited");
            }
        }
    }
    let (status, _) = c.nodes[2].rest_send("alice", "r", "over REST", None).await;
    if status == 201 {
        accepted += 1;
    } else {
        assert_eq!(status, 429);
    }
    // One burst of 5 for the whole cluster (per-node limits would let 9 through), plus what the
    // bucket refilled (3/s) while this slow debug-build loop ran.
    let refilled = (started.elapsed().as_millis() / 333) as usize;
    assert!(
        (5..=5 + refilled).contains(&accepted),
        "{accepted} accepted in {:?}: the limit is not cluster-wide",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_cache_is_shared_and_kept_current_on_every_node() {
    let Some(c) = cluster(2, |_| {}).await else {
        return;
    };
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    a.room("r", &["alice"]).await;
    let mut alice_a = a.client("alice").await;
    let mut alice_b = b.client("alice").await;
    alice_a.send_ok("r", "one").await;
    let first = alice_b.history("r", None, None).await;
    assert_eq!(first["result"]["messages"].as_array().unwrap().len(), 1);
    // The room's newest messages are in Redis: a list of entries, which reaches the room's start;
    // and the header earlier versions read.
    let mut conn = redis_conn(&c.url).await;
    let header: String = redis::cmd("GET")
        .arg(format!("{}messages:{}:last", c.prefix, tag(&c.url, "r")))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(header, "1 1");
    let list = format!("{}messages:{}:list", c.prefix, tag(&c.url, "r"));
    let entries: Vec<String> = redis::cmd("LRANGE")
        .arg(&list)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[0], "start");
    assert!(entries[1].starts_with(r#"1 {"seq":1,"#), "{entries:?}");
    // Served from the cache on the other node.
    let again = alice_a.history("r", None, None).await;
    assert_eq!(again["result"], first["result"]);
    assert_eq!(
        a.metric("chat_history_requests_total{cache=\"hit\"}").await,
        1.0
    );
    // A send on one node appends to the shared tail before its ack: the other node serves the
    // message from the cache.
    alice_a.send_ok("r", "two").await;
    let last: String = redis::cmd("LINDEX")
        .arg(&list)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(last.starts_with(r#"2+ {"seq":2,"#), "{last}");
    let after = alice_b.history("r", None, None).await;
    assert_eq!(
        seqs(after["result"]["messages"].as_array().unwrap()),
        vec![1, 2]
    );
    assert_eq!(
        b.metric("chat_history_requests_total{cache=\"hit\"}").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sending_to_one_room_never_serve_a_page_missing_an_acknowledged_message() {
    let Some(c) = cluster(2, |_| {}).await else {
        return;
    };
    let users = ["alice", "bob", "carol", "dave"];
    c.nodes[0].room("r", &users).await;
    let mut tasks = Vec::new();
    for (i, user) in users.into_iter().enumerate() {
        // Each sender reads on the node it did not send through.
        let mut sender = c.nodes[i % 2].client(user).await;
        let mut reader = c.nodes[(i + 1) % 2].client(user).await;
        tasks.push(tokio::spawn(async move {
            for n in 0..25 {
                let seq = sender.send_ok("r", &format!("{user} {n}")).await["seq"]
                    .as_i64()
                    .unwrap();
                let reply = reader.history("r", None, Some(50)).await;
                assert_latest_page_holds(&reply, seq, user);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut hits = 0.0;
    for node in &c.nodes {
        hits += node
            .metric("chat_history_requests_total{cache=\"hit\"}")
            .await;
    }
    assert!(hits > 0.0, "the reads never reached the shared cache");
    // Whatever the interleaving, the shared tail is absent or a gap-free run ending at 100.
    let mut conn = redis_conn(&c.url).await;
    let tail: Option<String> = redis::cmd("GET")
        .arg(format!("{}messages:{}:tail", c.prefix, tag(&c.url, "r")))
        .query_async(&mut conn)
        .await
        .unwrap();
    if let Some(tail) = tail {
        let lines: Vec<i64> = tail
            .lines()
            .skip(1)
            .map(|l| l.split_once(' ').unwrap().0.parse().unwrap())
            .collect();
        assert_eq!(lines, (50..=100).collect::<Vec<_>>(), "{tail}");
    }
}

#[tokio::test]
async fn appends_out_of_order_are_served_in_order_never_with_a_hole_and_a_stale_fill_is_refused() {
    use chat_gateway::cache::redis::RedisHistoryCache;
    use chat_gateway::cache::{HistoryCache, Latest, Tail};
    use chat_gateway::protocol::MessageJson;
    let Some(url) = redis_url().await else {
        return;
    };
    let settings = redis_settings(&url, &unique_prefix());
    let conn =
        chat_gateway::redis_conn::RedisConn::connect(&settings.redis, "test", Default::default())
            .await
            .unwrap();
    let cache = RedisHistoryCache::new(conn, Duration::from_secs(60), 10);
    let message = |seq: i64| MessageJson {
        seq,
        json: format!(r#"{{"seq":{seq}}}"#).into(),
    };
    let tail = |seqs: std::ops::RangeInclusive<i64>| Tail {
        messages: seqs.map(message).collect(),
        complete: true,
    };
    async fn latest(cache: &RedisHistoryCache) -> Option<Vec<i64>> {
        match cache.latest("r", 5).await {
            Latest::Hit { page, .. } => {
                let page: serde_json::Value = serde_json::from_str(&page).unwrap();
                Some(seqs(page["messages"].as_array().unwrap()))
            }
            Latest::Miss(_) => None,
        }
    }
    // A miss, then message 3 is appended (on another node) before the read of 1..=2 is stored.
    let Latest::Miss(token) = cache.latest("r", 5).await else {
        panic!("empty cache hit")
    };
    cache.append("r", &message(3)).await;
    cache.fill(token, tail(1..=2)).await;
    assert_eq!(
        latest(&cache).await,
        None,
        "a read older than message 3 was stored"
    );
    let Latest::Miss(token) = cache.latest("r", 5).await else {
        unreachable!()
    };
    cache.fill(token, tail(1..=3)).await;
    cache.append("r", &message(4)).await;
    cache.append("r", &message(4)).await;
    assert_eq!(latest(&cache).await, Some(vec![1, 2, 3, 4]));
    // 6 lands before 5 (two nodes): while 5 is missing the tail is not served, then it is, in
    // order.
    cache.append("r", &message(6)).await;
    assert_eq!(latest(&cache).await, None, "served without message 5");
    cache.append("r", &message(5)).await;
    assert_eq!(latest(&cache).await, Some(vec![2, 3, 4, 5, 6]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_publishes_an_ephemeral_event_with_a_plain_redis_client() {
    let Some(c) = cluster(2, |_| {}).await else {
        return;
    };
    c.nodes[0].room("r", &["alice", "bob"]).await;
    let mut alice = c.nodes[0].client("alice").await;
    let mut bob = c.nodes[1].client("bob").await;
    alice.join("r", None).await;
    bob.join("r", None).await;
    let event = json!({"type": "event", "room": "r", "event": {"kind": "announcement", "text": "deploy at 5"}});
    let mut conn = redis_conn(&c.url).await;
    // On a cluster, the sharded form (proto-docs/redis.md).
    let publish = if is_cluster(&c.url) {
        "SPUBLISH"
    } else {
        "PUBLISH"
    };
    let receivers: i64 = redis::cmd(publish)
        .arg(format!("{}chat:room:{}", c.prefix, tag(&c.url, "r")))
        .arg(event.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(receivers, 2, "both nodes are subscribed");
    for client in [&mut alice, &mut bob] {
        assert_eq!(client.next_push().await, event, "pushed as published");
    }
    // Ephemeral: not in history, no sequence consumed.
    let page = alice.history("r", None, None).await;
    assert!(page["result"]["messages"].as_array().unwrap().is_empty());
    assert_eq!(alice.send_ok("r", "first stored").await["seq"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_through_the_stream_and_failing_webhooks_end_in_the_dead_letter_stream() {
    // A webhook receiver that records calls and fails for room "bad".
    let calls = Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let recorded = calls.clone();
    let hook = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let recorded = recorded.clone();
            async move {
                let bad = body["roomId"] == "bad";
                recorded.lock().unwrap().push(body);
                if bad {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    axum::http::StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await });

    let Some(c) = cluster(1, |s| {
        s.queue.webhook_url = hook_url.clone();
        s.queue.max_attempts = 2;
    })
    .await
    else {
        return;
    };
    let node = &c.nodes[0];
    node.room("good", &["alice"]).await;
    node.room("bad", &["alice"]).await;
    let mut alice = node.client("alice").await;
    let sent = alice.send_ok("good", "notify me").await;
    alice.send_ok("bad", "this hook fails").await;

    let mut conn = redis_conn(&c.url).await;
    let dead_key = format!("{}{}:dead", c.prefix, tag(&c.url, "chat:jobs"));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let dead: i64 = redis::cmd("XLEN")
            .arg(&dead_key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if dead == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the failing job never reached the dead-letter stream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = calls.lock().unwrap().clone();
    let good: Vec<_> = calls.iter().filter(|c| c["roomId"] == "good").collect();
    assert_eq!(good.len(), 1, "delivered once");
    assert_eq!(good[0]["messageId"], sent["id"]);
    assert_eq!(good[0]["type"], "message.created");
    assert_eq!(
        calls.iter().filter(|c| c["roomId"] == "bad").count(),
        2,
        "max_attempts = 2"
    );
    assert_eq!(node.metric("chat_jobs_total{outcome=\"dead\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_includes_redis() {
    let Some(c) = cluster(1, |_| {}).await else {
        return;
    };
    // Ready once the pub/sub subscription is up (moments after start).
    let deadline = Instant::now() + WAIT;
    loop {
        let r = c.nodes[0]
            .http
            .get(c.nodes[0].url("/readyz"))
            .send()
            .await
            .unwrap();
        let ready: serde_json::Value = r.json().await.unwrap();
        if ready["ready"] == true {
            assert_eq!(ready, json!({"ready": true, "store": "ok", "redis": "ok"}));
            break;
        }
        assert_eq!(ready["redis"], "unreachable", "{ready}");
        assert!(Instant::now() < deadline, "never ready: {ready}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_nothing_acknowledged() {
    if cluster_pass() {
        eprintln!("runs in the single-server pass (a Redis of its own)");
        return;
    }
    let Some(mut redis) = own_redis(None).await else {
        return;
    };
    let url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let mut settings = redis_settings(&url, &prefix);
        settings.redis.command_timeout_ms = 200;
        nodes.push(TestApp::start(settings, DataDir::Borrowed(dir.path().to_path_buf())).await);
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    until_ready(b.addr, true).await;
    a.room("r", &["alice", "bob"]).await;
    let mut alice = a.client("alice").await;
    let mut bob = b.client("bob").await;
    bob.join("r", None).await;
    for i in 1..=5 {
        alice.send_ok("r", &format!("before {i}")).await;
    }
    for seq in 1..=5 {
        assert_eq!(bob.expect_message("r").await["seq"], seq);
    }

    redis.stop();
    until_ready(b.addr, false).await;
    // Sends still succeed: the store is the source of truth, Redis only carries them.
    for i in 6..=10 {
        alice.send_ok("r", &format!("during {i}")).await;
    }
    let _restarted = OwnRedis::start(Some(redis.port)).expect("restart redis-server");
    until_ready(b.addr, true).await;
    // The node resubscribed and caught bob up from the store; live traffic follows.
    alice.send_ok("r", "after").await;
    let mut got = Vec::new();
    for _ in 6..=11 {
        got.push(bob.expect_message("r").await["seq"].as_i64().unwrap());
    }
    assert_eq!(
        got,
        (6..=11).collect::<Vec<_>>(),
        "every acknowledged message, once, in order"
    );
    bob.expect_silence(Duration::from_millis(300)).await;
}

/// Waits until `chat_presence_backlog` reads `backlog`.
async fn wait_presence_backlog(node: &TestApp, backlog: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = node.metric("chat_presence_backlog").await;
        if now == backlog {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "presence backlog stayed at {now}, not {backlog}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_changed_while_redis_is_down_waits_once_per_user_and_is_recorded_when_it_is_back()
{
    if cluster_pass() {
        eprintln!("runs in the single-server pass (a Redis of its own)");
        return;
    }
    let Some(mut redis) = own_redis(None).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut settings = redis_settings(&redis.url(), &unique_prefix());
    settings.redis.command_timeout_ms = 200;
    let node = TestApp::start(settings, DataDir::Borrowed(dir.path().to_path_buf())).await;
    until_ready(node.addr, true).await;
    node.room("r", &["alice", "bob"]).await;
    let mut bob = node.client("bob").await;
    bob.join("r", None).await;
    // Bob's arrival is recorded (it follows his join by a few milliseconds) before Redis stops.
    let deadline = Instant::now() + WAIT;
    loop {
        let page = bob.request(json!({"type": "presence", "room": "r"})).await;
        if page["result"]["online"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "bob never showed online: {page}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_presence_backlog(&node, 0.0).await;

    redis.stop();
    until_ready(node.addr, false).await;
    // Alice's connection flaps while presence cannot be recorded: a hundred transitions of one
    // user in one room.
    for _ in 0..50 {
        let mut tab = node.client("alice").await;
        tab.join("r", None).await;
        tab.close().await;
    }
    let mut alice = node.client("alice").await;
    alice.join("r", None).await;
    // One change waits for her (the latest), retried about once a second; while a retry is out
    // the gauge reads 0.
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        seen.push(node.metric("chat_presence_backlog").await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let most = seen.iter().copied().fold(0.0, f64::max);
    assert_eq!(
        most, 1.0,
        "one change waits, however often she came and went: {seen:?}"
    );

    let _restarted = OwnRedis::start(Some(redis.port)).expect("restart redis-server");
    until_ready(node.addr, true).await;
    // Her latest change, the arrival, is recorded now. (The restarted Redis forgot what was
    // recorded before, bob's arrival among it; only changes made since are known again.)
    let deadline = Instant::now() + WAIT;
    loop {
        let page = bob.request(json!({"type": "presence", "room": "r"})).await;
        assert_eq!(page["type"], "result", "{page}");
        let online = page["result"]["users"]
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["userId"] == "alice");
        if online {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice never came back online: {page}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_presence_backlog(&node, 0.0).await;
    alice.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_event_was_lost_still_reaches_every_node() {
    use chat_gateway::store::{NewMessage, Store, sqlite::SqliteStore};
    let Some(c) = cluster(2, |_| {}).await else {
        return;
    };
    c.nodes[0].room("r", &["alice", "bob"]).await;
    let mut bob = c.nodes[1].client("bob").await;
    bob.join("r", None).await;
    // A node committed this message and died before publishing it: only the store and its
    // outbox row know about it. Nobody sends anything after it.
    let store = SqliteStore::open(&c._dir.path().join("chat.db"), 1)
        .await
        .unwrap();
    store
        .insert_message(NewMessage {
            id: "orphan".into(),
            room_id: "r".into(),
            sender_id: "alice".into(),
            sender_name: Some("alice".into()),
            sender_avatar_url: None,
            content: "never published".into(),
            created_at: chrono::Utc::now(),
            client_msg_id: None,
            reply: None,
        })
        .await
        .unwrap();
    store.close().await;
    // A relay (on any node) picks the outbox row up and announces the room's head; bob's node
    // reads the message from the store.
    let m = bob.expect_message("r").await;
    assert_eq!(
        (m["seq"].as_i64(), m["content"].as_str()),
        (Some(1), Some("never published"))
    );
    bob.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_crosses_nodes_is_not_echoed_and_ends_on_send() {
    let Some(c) = cluster(2, |s| s.signals.typing_timeout_ms = 800).await else {
        return;
    };
    c.nodes[0].room("r", &["alice", "bob"]).await;
    let mut alice = c.nodes[0].client("alice").await;
    let mut alice_tab = c.nodes[0].client("alice").await;
    let mut bob = c.nodes[1].client("bob").await;
    for client in [&mut alice, &mut alice_tab, &mut bob] {
        client.join("r", None).await;
    }
    let reply = alice
        .request(json!({"type": "typing", "room": "r", "typing": true}))
        .await;
    assert_eq!(reply["type"], "result");
    let push = bob.next_push().await;
    assert_eq!(
        push,
        json!({"type": "typing", "room": "r", "userId": "alice", "name": "alice name", "typing": true, "expiresInMs": 800})
    );
    // Sending ends it.
    alice.send_ok("r", "done typing").await;
    let (first, second) = (bob.next_push().await, bob.next_push().await);
    let (stop, message) = if first["type"] == "typing" {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(
        (stop["type"].as_str(), stop["typing"].as_bool()),
        (Some("typing"), Some(false))
    );
    assert_eq!(message["message"]["content"], "done typing");
    // Not echoed to the typer's own sockets: alice's other tab only sees the message.
    assert_eq!(
        alice_tab.expect_message("r").await["content"],
        "done typing"
    );
    alice_tab.expect_silence(Duration::from_millis(200)).await;
    // A typer that goes quiet: the server ends the signal after the timeout.
    alice
        .request(json!({"type": "typing", "room": "r", "typing": true}))
        .await;
    assert_eq!(bob.next_push().await["typing"], true);
    let started = Instant::now();
    assert_eq!(bob.next_push().await["typing"], false);
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "ended by the timeout"
    );
    // Typing in a room not joined on this socket is refused.
    let e = bob
        .request(json!({"type": "typing", "room": "elsewhere", "typing": true}))
        .await;
    assert_eq!(e["error"]["code"], "not_joined");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_receipts_reach_the_room_on_every_node() {
    let Some(c) = cluster(2, |_| {}).await else {
        return;
    };
    c.nodes[0].room("r", &["alice", "bob", "carol"]).await;
    let mut alice = c.nodes[0].client("alice").await;
    let mut bob = c.nodes[1].client("bob").await;
    let mut carol = c.nodes[0].client("carol").await;
    for client in [&mut alice, &mut bob, &mut carol] {
        client.join("r", None).await;
    }
    alice.send_ok("r", "hello").await;
    for client in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(client.expect_message("r").await["seq"], 1);
    }
    let reply = bob
        .request(json!({"type": "mark_read", "room": "r", "seq": 1}))
        .await;
    assert_eq!(reply["result"], json!({"room": "r", "seq": 1}));
    // Through Redis to the other node's sockets, and to the reader's own node.
    let receipt = json!({"type": "read", "room": "r", "userId": "bob", "seq": 1});
    assert_eq!(alice.next_push().await, receipt);
    assert_eq!(carol.next_push().await, receipt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pub_sub_keepalive_keeps_a_subscribed_connection() {
    // Keepalive pings every 200 ms: ten of them while a room is subscribed (a subscribed
    // connection answers PING differently from a plain one).
    let Some(c) = cluster(2, |s| s.redis.pubsub_keepalive_ms = 200).await else {
        return;
    };
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    a.room("r", &["alice", "bob"]).await;
    let mut alice = a.client("alice").await;
    let mut bob = b.client("bob").await;
    bob.join("r", None).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    for node in [a, b] {
        assert_eq!(
            node.metric("chat_redis_reconnects_total{connection=\"pubsub\"}")
                .await,
            0.0,
            "the subscription was dropped and re-made"
        );
    }
    let m = alice.send_ok("r", "still subscribed").await;
    assert_eq!(bob.expect_message("r").await["seq"], m["seq"]);
}
