//! Faults while chat traffic flows, on real gateway processes sharing Postgres and Redis: Redis
//! stopped and started again empty, sends while Redis is down, Postgres going away and coming
//! back. Each test produces a row of the failure table in docs/operations.md and prints the
//! times it measured.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::faults::{CuttableProxy, OwnRedis, own_redis, postgres_addr};
use common::nodes::{Node, WebhookReceiver, client, setup_room};
use common::{
    TestApp, redis_settings, say, scratch_database, seqs, unique_prefix, until_ready, with_host,
};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// One fault at a time: each test measures latency while a dependency is away, and the gateways
/// of two faulted clusters on the machine's two cores would measure each other instead.
static ONE_FAULT_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_mid_traffic_forgets_no_side_effect() {
    let _alone = ONE_FAULT_AT_A_TIME.lock().await;
    let Some(mut redis) = own_redis(None).await else {
        return;
    };
    let Some(db) = scratch_database().await else {
        return;
    };
    // A slow webhook: jobs pile up in the Redis stream, which the restart then empties.
    let hook = WebhookReceiver::start(Duration::from_millis(300)).await;
    let data = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let env = [("CHAT_GATEWAY__QUEUE__WEBHOOK_URL", hook.url.as_str())];
    let nodes = [
        Node::start_with(&db, &redis.url(), &prefix, data.path(), false, &env).await,
        Node::start_with(&db, &redis.url(), &prefix, data.path(), false, &env).await,
    ];
    setup_room(nodes[0].addr, "r", &["alice", "bob"]).await;

    // Senders on both nodes, one message every 10 ms each, through the whole fault.
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for (n, user) in [(0, "alice"), (1, "bob")] {
        let (addr, stop) = (nodes[n].addr, stop.clone());
        senders.push(tokio::spawn(async move {
            let mut c = client(addr, user).await;
            let mut acked = 0;
            while !stop.load(Ordering::Relaxed) {
                c.send_ok("r", &format!("{user} {acked}")).await;
                acked += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _restarted = OwnRedis::start(Some(redis.port)).expect("restart redis-server, empty");
    let restarted = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = 0;
    for sender in senders {
        acked += sender.await.unwrap();
    }

    // Every stored message reaches the webhook at least once.
    let pool = db.pool().await;
    let stored: HashSet<String> = sqlx::query_scalar(r#"SELECT id FROM "ChatMessage""#)
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        stored.len(),
        acked,
        "every acknowledged send is stored once"
    );
    let deadline = Instant::now() + Duration::from_secs(45);
    let missing = loop {
        let missing = stored.difference(&hook.distinct()).count();
        if missing == 0 || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    say(&format!(
        "redis restarted empty: {acked} messages stored, {} webhook calls, {missing} missing, all done {:.1?} after the restart",
        hook.received.lock().unwrap().len(),
        restarted.elapsed(),
    ));
    assert_eq!(missing, 0, "side effects forgotten with Redis");
    // A worker deletes its batch's rows once the whole batch is done.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let outbox: i64 = sqlx::query_scalar(r#"SELECT COUNT(*) FROM "ChatOutbox""#)
            .fetch_one(&pool)
            .await
            .unwrap();
        if outbox == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{outbox} outbox rows of done jobs stay"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(nodes);
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_during_a_redis_outage_are_acked_at_once_and_other_nodes_catch_up() {
    let _alone = ONE_FAULT_AT_A_TIME.lock().await;
    let Some(mut redis) = own_redis(None).await else {
        return;
    };
    let Some(db) = scratch_database().await else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    // The default `redis.command_timeout_ms` (1 s): what a send would wait for, per command.
    let a = Node::start(&db, &redis.url(), &prefix, data.path(), false).await;
    let b = Node::start(&db, &redis.url(), &prefix, data.path(), false).await;
    setup_room(a.addr, "r", &["alice", "bob"]).await;
    let mut alice = client(a.addr, "alice").await;
    let mut bob = client(b.addr, "bob").await;
    bob.join("r", None).await;
    for i in 1..=5 {
        alice.send_ok("r", &format!("before {i}")).await;
    }
    for seq in 1..=5 {
        assert_eq!(bob.expect_message("r").await["seq"], seq);
    }

    redis.stop();
    let stopped = Instant::now();
    let not_ready = until_ready(a.addr, false).await;
    // One send at a time, as a person sends, for two seconds: each answered at once.
    let mut acks = Vec::new();
    for i in 6..=45 {
        let sent = Instant::now();
        let m = alice.send_ok("r", &format!("during {i}")).await;
        acks.push(sent.elapsed());
        assert_eq!(m["seq"], i);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    acks.sort();
    let (p50, p90, max) = (
        percentile(&acks, 0.5),
        percentile(&acks, 0.9),
        acks[acks.len() - 1],
    );
    let _restarted = OwnRedis::start(Some(redis.port)).expect("restart redis-server");
    let back = Instant::now();
    let ready = until_ready(a.addr, true).await;
    until_ready(b.addr, true).await;
    // Bob's node resubscribed and read what it missed from the store, in order, once.
    let mut got = Vec::new();
    for _ in 6..=45 {
        got.push(bob.expect_message("r").await);
    }
    let caught_up = back.elapsed();
    assert_eq!(seqs(&got), (6..=45).collect::<Vec<_>>());
    alice.send_ok("r", "after").await;
    assert_eq!(bob.expect_message("r").await["seq"], 46);
    bob.expect_silence(Duration::from_millis(300)).await;
    say(&format!(
        "redis down: /readyz 503 after {not_ready:.1?}; 40 sends acked p50 {p50:.1?}, p90 {p90:.1?}, slowest {max:.1?} (outage {:.1?}); \
         after the restart ready in {ready:.1?}, the other node's socket caught up in {caught_up:.1?}",
        back.duration_since(stopped)
    ));
    // A send that waited on the dead Redis takes the command timeout (1 s); one slow commit or
    // scheduling stall on a busy machine does not. So: no send near the timeout, and nine in ten
    // answered at once.
    assert!(
        max < Duration::from_millis(500),
        "a send waited on a dead Redis: slowest ack {max:?}"
    );
    assert!(
        p90 < Duration::from_millis(50),
        "sends waited on a dead Redis: p90 {p90:?}"
    );
    let reconnects = a
        .metric("chat_redis_reconnects_total{connection=\"commands\"}")
        .await;
    assert!(
        reconnects >= 1.0,
        "the command connection's loss is counted"
    );
    drop((a, b));
    drop(db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_is_away_sends_fail_promptly_readiness_says_so_and_it_recovers() {
    let _alone = ONE_FAULT_AT_A_TIME.lock().await;
    let Some(redis) = common::redis_url().await else {
        return;
    };
    let Some(db) = scratch_database().await else {
        return;
    };
    let proxy = CuttableProxy::start(postgres_addr(&db.url).await).await;
    // Default pool settings: `database.acquire_timeout_ms` is 3 s, what a send would wait for.
    let mut settings = redis_settings(&redis, &unique_prefix());
    settings.database.url = secrecy::SecretString::from(with_host(&db.url, proxy.addr));
    let app = TestApp::start(
        settings,
        common::DataDir::Owned(tempfile::tempdir().unwrap()),
    )
    .await;
    app.room("r", &["alice", "bob"]).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    bob.join("r", None).await;
    assert_eq!(alice.send_ok("r", "before").await["seq"], 1);
    assert_eq!(bob.expect_message("r").await["seq"], 1);

    proxy.cut();
    let cut = Instant::now();
    // Every send is answered, promptly, with the retriable `unavailable`; none hangs.
    let mut answers = Vec::new();
    for i in 0..20 {
        let sent = Instant::now();
        let reply = alice.send("r", "during", &format!("c{i}")).await;
        answers.push(sent.elapsed());
        assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
    }
    answers.sort();
    let worst_send = *answers.last().unwrap();
    // Readiness says so, within 500 ms, every time it is asked.
    let mut probes = Vec::new();
    for _ in 0..5 {
        let asked = Instant::now();
        let r = app.http.get(app.url("/readyz")).send().await.unwrap();
        probes.push(asked.elapsed());
        assert_eq!(r.status(), 503);
    }
    let worst_probe = probes.into_iter().max().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let outage = cut.elapsed();
    proxy.restore();
    let restored = Instant::now();
    until_ready(app.addr, true).await;
    let ready_after = restored.elapsed();
    // The retry of a refused send is stored once, and delivered.
    let reply = loop {
        let reply = alice.send("r", "during", "c0").await;
        if reply["type"] == "result" {
            break reply;
        }
        assert!(
            restored.elapsed() < Duration::from_secs(10),
            "never recovered: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(reply["result"]["message"]["seq"], 2);
    assert_eq!(bob.expect_message("r").await["seq"], 2);
    say(&format!(
        "postgres away {outage:.1?}: 20 sends answered `unavailable` within {worst_send:.1?} (p50 {:.1?}); \
         /readyz 503 within {worst_probe:.1?}; ready {ready_after:.1?} after it came back",
        percentile(&answers, 0.5)
    ));
    assert!(
        worst_send < Duration::from_millis(500),
        "a send hung: {worst_send:?}"
    );
    assert!(
        worst_probe < Duration::from_millis(500),
        "readiness hung: {worst_probe:?}"
    );
    assert_eq!(app.metric("chat_store_outages_total").await, 1.0);
}
