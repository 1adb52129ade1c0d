//! Group commit on the embedded SQLite store: sends that wait for the writer together are written
//! in one transaction, and each sender still gets exactly its own outcome.
//!
//! To make a batch happen on purpose, a test takes the database's write lock from a connection of
//! its own (as another process sharing the file would): the writer's first batch then waits for
//! it, and the sends made meanwhile queue up and form the next batch. The store's metrics say
//! when a batch was taken (`chat_store_send_batch_size_count`) and how many sends are queued
//! (`chat_store_sends_waiting`), so no test sleeps and hopes.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Client, TestApp, WAIT};
use serde_json::{Value, json};
use sqlx::Connection;

/// The gateway's SQLite file, write-locked by a transaction of this test's own.
struct WriteLock {
    conn: sqlx::SqliteConnection,
}

impl WriteLock {
    async fn take(app: &TestApp) -> Self {
        let path = app.data_dir.path().join("chat.db");
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .expect("open the gateway's database");
        sqlx::raw_sql("BEGIN IMMEDIATE")
            .execute(&mut conn)
            .await
            .expect("take the write lock");
        WriteLock { conn }
    }

    /// Runs `sql` inside the locked transaction (it lands when the lock is released).
    async fn run(&mut self, sql: &str) {
        sqlx::raw_sql(sql).execute(&mut self.conn).await.unwrap();
    }

    async fn release(mut self) {
        sqlx::raw_sql("COMMIT")
            .execute(&mut self.conn)
            .await
            .unwrap();
    }
}

/// Waits until the metric sample `key` is `expected`.
async fn wait_metric(app: &TestApp, key: &str, expected: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = app.metric(key).await;
        if value == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{key} stayed {value}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const BATCHES: &str = "chat_store_send_batch_size_count";
const BATCHED: &str = "chat_store_send_batch_size_sum";
const WAITING: &str = "chat_store_sends_waiting";

/// Sends without waiting for the reply; returns the request id to wait on with `reply_to`.
async fn start_send(c: &mut Client, room: &str, content: &str, client_msg_id: &str) -> String {
    let id = format!("send-{client_msg_id}");
    let frame = json!({"type": "send", "id": id, "room": room, "content": content,
                       "clientMsgId": client_msg_id});
    c.send_text(&frame.to_string()).await;
    id
}

/// Starts a send and waits until it is queued for the writer (the `waiting`-th in the queue).
async fn queue_send(
    app: &TestApp,
    c: &mut Client,
    room: &str,
    content: &str,
    client_msg_id: &str,
    waiting: f64,
) -> String {
    let id = start_send(c, room, content, client_msg_id).await;
    wait_metric(app, WAITING, waiting).await;
    id
}

/// Takes the write lock and starts a send that the writer takes as batch number `batch` and
/// that then waits for the lock; what is sent next queues behind it.
async fn block_the_writer(app: &TestApp, c: &mut Client, room: &str, batch: f64) -> WriteLock {
    let lock = WriteLock::take(app).await;
    start_send(c, room, "taken first", "blocker").await;
    wait_metric(app, BATCHES, batch).await;
    lock
}

fn message(reply: &Value) -> &Value {
    assert_eq!(reply["type"], "result", "send failed: {reply}");
    &reply["result"]["message"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_in_several_rooms_each_get_their_own_message_gap_free() {
    let app = TestApp::spawn().await;
    let rooms = ["r1", "r2", "r3"];
    let senders = ["a", "b", "c", "d"];
    for room in rooms {
        app.room(room, &senders).await;
    }
    let mut watcher = app.client("a").await;
    watcher.join("r1", None).await;
    const EACH: usize = 25;

    let mut tasks = Vec::new();
    for room in rooms {
        for sender in senders {
            let mut c = app.client(sender).await;
            tasks.push(tokio::spawn(async move {
                let mut acks = Vec::new();
                for i in 0..EACH {
                    let content = format!("{room}/{sender}/{i}");
                    let m = c.send_ok(room, &content).await;
                    assert_eq!(
                        m["content"], content,
                        "an ack carries the sender's own message"
                    );
                    assert_eq!(m["senderId"], sender);
                    acks.push((m["seq"].as_i64().unwrap(), content));
                }
                (room, acks)
            }));
        }
    }
    let mut by_room: BTreeMap<&str, BTreeMap<i64, String>> = BTreeMap::new();
    for task in tasks {
        let (room, acks) = task.await.unwrap();
        for (seq, content) in acks {
            let earlier = by_room.entry(room).or_default().insert(seq, content);
            assert!(earlier.is_none(), "seq {seq} in {room} acknowledged twice");
        }
    }
    let total = rooms.len() * senders.len() * EACH;
    for (room, seqs) in &by_room {
        let expected: Vec<i64> = (1..=(senders.len() * EACH) as i64).collect();
        assert_eq!(seqs.keys().copied().collect::<Vec<_>>(), expected, "{room}");
        // What was acknowledged is what is stored, under the same numbers.
        let mut before = None;
        let mut stored = BTreeMap::new();
        loop {
            let page = watcher.history(room, before, Some(50)).await;
            let messages = page["result"]["messages"].as_array().unwrap().clone();
            for m in &messages {
                stored.insert(
                    m["seq"].as_i64().unwrap(),
                    m["content"].as_str().unwrap().to_string(),
                );
            }
            match page["result"]["nextBefore"].as_i64() {
                Some(b) => before = Some(b),
                None => break,
            }
        }
        assert_eq!(&stored, seqs, "{room}: history matches the acks");
    }
    // A socket in r1 received r1's messages once each, in order.
    let mut seen = Vec::new();
    while seen.len() < senders.len() * EACH {
        seen.push(watcher.expect_message("r1").await["seq"].as_i64().unwrap());
    }
    assert_eq!(
        seen,
        (1..=(senders.len() * EACH) as i64).collect::<Vec<_>>()
    );
    // The writer grouped them: fewer transactions than messages.
    assert_eq!(app.metric(BATCHED).await, total as f64);
    let batches = app.metric(BATCHES).await;
    assert!(
        batches < total as f64,
        "{batches} batches for {total} sends"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_queued_behind_a_busy_writer_are_written_together_in_arrival_order() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice", "bob", "carol"]).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    let mut carol = app.client("carol").await;
    let mut watcher = app.client("carol").await;
    watcher.join("r", None).await;

    let lock = block_the_writer(&app, &mut alice, "r", 1.0).await;
    let from_bob = queue_send(&app, &mut bob, "r", "bob's", "b1", 1.0).await;
    let from_carol = queue_send(&app, &mut carol, "r", "carol's", "c1", 2.0).await;
    lock.release().await;

    assert_eq!(message(&alice.reply_to("send-blocker").await)["seq"], 1);
    let bobs = bob.reply_to(&from_bob).await;
    let carols = carol.reply_to(&from_carol).await;
    assert_eq!(
        (
            message(&bobs)["seq"].as_i64(),
            message(&bobs)["content"].as_str()
        ),
        (Some(2), Some("bob's"))
    );
    assert_eq!(
        (
            message(&carols)["seq"].as_i64(),
            message(&carols)["content"].as_str()
        ),
        (Some(3), Some("carol's"))
    );
    // Two transactions: the blocked one, then both queued sends together.
    assert_eq!(
        (app.metric(BATCHES).await, app.metric(BATCHED).await),
        (2.0, 3.0)
    );
    for (seq, content) in [(1, "taken first"), (2, "bob's"), (3, "carol's")] {
        let m = watcher.expect_message("r").await;
        assert_eq!(
            (m["seq"].as_i64(), m["content"].as_str()),
            (Some(seq), Some(content))
        );
    }
    watcher.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_client_msg_id_twice_in_one_batch_is_stored_once() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice", "bob"]).await;
    let mut first = app.client("alice").await;
    let mut second = app.client("alice").await;
    let mut third = app.client("alice").await;
    let mut bob = app.client("bob").await;
    bob.join("r", None).await;

    let lock = block_the_writer(&app, &mut first, "r", 1.0).await;
    let a = queue_send(&app, &mut second, "r", "hello", "same-key", 1.0).await;
    let b = queue_send(&app, &mut third, "r", "hello", "same-key", 2.0).await;
    lock.release().await;

    first.reply_to("send-blocker").await;
    let a = second.reply_to(&a).await;
    let b = third.reply_to(&b).await;
    assert_eq!(a["result"]["duplicate"], false, "{a}");
    assert_eq!(b["result"]["duplicate"], true, "{b}");
    assert_eq!(
        message(&a),
        message(&b),
        "both callers get the one stored message"
    );
    assert_eq!(message(&a)["seq"], 2);
    assert_eq!(
        (app.metric(BATCHES).await, app.metric(BATCHED).await),
        (2.0, 3.0)
    );

    assert_eq!(bob.expect_message("r").await["seq"], 1);
    assert_eq!(bob.expect_message("r").await["seq"], 2);
    bob.expect_silence(Duration::from_millis(200)).await;
    let page = bob.history("r", None, None).await;
    assert_eq!(page["result"]["messages"].as_array().unwrap().len(), 2);
    // And a later retry still gets the original.
    let again = second.send("r", "hello", "same-key").await;
    assert_eq!(again["result"]["duplicate"], true);
    assert_eq!(message(&again)["id"], message(&a)["id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_to_a_room_deleted_meanwhile_fails_alone_in_its_batch() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice", "bob"]).await;
    app.room("gone", &["alice"]).await;
    let mut alice = app.client("alice").await;
    let mut alice2 = app.client("alice").await;
    let mut bob = app.client("bob").await;
    // Membership in `gone` is now cached: the next send there reaches the store.
    alice2.send_ok("gone", "before").await;

    let mut lock = block_the_writer(&app, &mut alice, "r", 2.0).await;
    let lost = queue_send(&app, &mut alice2, "gone", "into the void", "g2", 1.0).await;
    let kept = queue_send(&app, &mut bob, "r", "still here", "b1", 2.0).await;
    lock.run(r#"DELETE FROM "ChatRoom" WHERE id = 'gone'"#)
        .await;
    lock.release().await;

    assert_eq!(message(&alice.reply_to("send-blocker").await)["seq"], 1);
    let lost = alice2.reply_to(&lost).await;
    assert_eq!(
        (lost["type"].as_str(), lost["error"]["code"].as_str()),
        (Some("error"), Some("room_not_found")),
        "{lost}"
    );
    let kept = bob.reply_to(&kept).await;
    assert_eq!(message(&kept)["seq"], 2);
    assert_eq!(
        (app.metric(BATCHES).await, app.metric(BATCHED).await),
        (3.0, 4.0)
    );
    let page = bob.history("r", None, None).await;
    let seqs: Vec<i64> = page["result"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_database_refuses_fails_alone_and_its_batch_is_written() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice", "bob", "carol"]).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    let mut carol = app.client("carol").await;
    let mut refused = app.client("carol").await;
    let mut watcher = app.client("alice").await;
    watcher.join("r", None).await;

    let mut lock = block_the_writer(&app, &mut alice, "r", 1.0).await;
    let ok1 = queue_send(&app, &mut bob, "r", "first of the batch", "b1", 1.0).await;
    let bad = queue_send(&app, &mut refused, "r", "refuse me", "x1", 2.0).await;
    let ok2 = queue_send(&app, &mut carol, "r", "last of the batch", "c1", 3.0).await;
    // A rule the database enforces that fails the batch's multi-row insert.
    lock.run(
        r#"CREATE TRIGGER refuse BEFORE INSERT ON "ChatMessage" WHEN NEW.content = 'refuse me'
           BEGIN SELECT RAISE(ABORT, 'refused'); END"#,
    )
    .await;
    lock.release().await;

    assert_eq!(message(&alice.reply_to("send-blocker").await)["seq"], 1);
    assert_eq!(message(&bob.reply_to(&ok1).await)["seq"], 2);
    let bad = refused.reply_to(&bad).await;
    assert_eq!(
        (bad["type"].as_str(), bad["error"]["code"].as_str()),
        (Some("error"), Some("internal")),
        "{bad}"
    );
    assert_eq!(message(&carol.reply_to(&ok2).await)["seq"], 3);
    // No number was spent on the refused message: the room goes on without a gap.
    for (seq, content) in [
        (1, "taken first"),
        (2, "first of the batch"),
        (3, "last of the batch"),
    ] {
        let m = watcher.expect_message("r").await;
        assert_eq!(
            (m["seq"].as_i64(), m["content"].as_str()),
            (Some(seq), Some(content))
        );
    }
    assert_eq!(message(&bob.send("r", "after", "b2").await)["seq"], 4);
    assert_eq!(watcher.expect_message("r").await["seq"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_cannot_get_the_lock_fails_whole_with_a_retriable_error() {
    let app = TestApp::spawn_with(|s| s.database.busy_timeout_ms = 1000).await;
    app.room("r", &["alice", "bob", "carol"]).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    let mut carol = app.client("carol").await;

    let lock = block_the_writer(&app, &mut alice, "r", 1.0).await;
    let b = queue_send(&app, &mut bob, "r", "bob's", "b1", 1.0).await;
    let c = queue_send(&app, &mut carol, "r", "carol's", "c1", 2.0).await;
    // The first batch gives up after the busy timeout; the second (both queued sends) is taken
    // and waits in its turn, and gives up as a whole.
    let blocked = alice.reply_to("send-blocker").await;
    assert_eq!(blocked["error"]["code"], "unavailable", "{blocked}");
    let b = bob.reply_to(&b).await;
    let c = carol.reply_to(&c).await;
    for reply in [&b, &c] {
        assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
        assert!(
            reply["error"]["retryAfterMs"].as_u64().is_some(),
            "retriable: {reply}"
        );
    }
    assert_eq!(
        (app.metric(BATCHES).await, app.metric(BATCHED).await),
        (2.0, 3.0)
    );
    lock.release().await;

    // Nothing was stored and no number spent: the retries take 1, 2, 3.
    assert_eq!(message(&carol.send("r", "carol's", "c1").await)["seq"], 1);
    assert_eq!(message(&bob.send("r", "bob's", "b1").await)["seq"], 2);
    let retried = alice.send("r", "taken first", "blocker").await;
    assert_eq!(
        (
            message(&retried)["seq"].as_i64(),
            retried["result"]["duplicate"].as_bool()
        ),
        (Some(3), Some(false))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_whose_client_leaves_is_completed_and_its_retry_gets_the_original() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice", "bob"]).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    bob.join("r", None).await;

    let lock = block_the_writer(&app, &mut alice, "r", 1.0).await;
    // A REST client that gives up (and hangs up) while its send is queued.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let gave_up = tokio::spawn({
        let url = app.url("/api/chat/rooms/r/messages");
        let token = app.token("alice");
        async move {
            impatient
                .post(url)
                .bearer_auth(token)
                .json(&json!({"content": "nobody waits for me", "clientMsgId": "left"}))
                .send()
                .await
        }
    });
    wait_metric(&app, WAITING, 1.0).await;
    assert!(gave_up.await.unwrap().is_err(), "the client timed out");
    let mut bob2 = app.client("bob").await;
    let kept = queue_send(&app, &mut bob2, "r", "still here", "b1", 2.0).await;
    lock.release().await;

    assert_eq!(message(&alice.reply_to("send-blocker").await)["seq"], 1);
    let kept = bob2.reply_to(&kept).await;
    assert_eq!(message(&kept)["content"], "still here");
    // The abandoned send was stored all the same, and pushed to the room like any other: between
    // a commit and its announcement nothing waits on the caller.
    assert_eq!(message(&kept)["seq"], 3);
    let mut received = Vec::new();
    for _ in 0..3 {
        let m = bob.expect_message("r").await;
        received.push((
            m["seq"].as_i64().unwrap(),
            m["content"].as_str().unwrap().to_string(),
        ));
    }
    assert_eq!(
        received,
        [
            (1, "taken first".to_string()),
            (2, "nobody waits for me".to_string()),
            (3, "still here".to_string())
        ]
    );
    bob.expect_silence(Duration::from_millis(200)).await;
    // Its retry is told it was stored: the original, not a second message.
    let (status, body) = app
        .rest_send("alice", "r", "nobody waits for me", Some("left"))
        .await;
    assert_eq!(
        (
            status,
            body["message"]["seq"].as_i64(),
            body["duplicate"].as_bool()
        ),
        (200, Some(2), Some(true))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_send_is_written_at_once_whatever_the_write_interval() {
    // An interval far longer than the test's patience: only sends under load may wait for it.
    let app = TestApp::spawn_with(|s| s.database.write_interval_ms = 1000).await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    alice.send_ok("r", "the last activity").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let started = Instant::now();
    alice.send_ok("r", "after a quiet second").await;
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "a send after a quiet spell took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_one_after_another_are_never_held_for_the_write_interval() {
    // Steady sends that each find the writer free: each is written at once, however soon after
    // the one before it, and however long the interval.
    let app = TestApp::spawn_with(|s| s.database.write_interval_ms = 1000).await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    for i in 0..5 {
        let started = Instant::now();
        alice.send_ok("r", &format!("message {i}")).await;
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "send {i}, right after the one before it, took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        (app.metric(BATCHES).await, app.metric(BATCHED).await),
        (5.0, 5.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_batch_of_several_sends_the_next_batch_waits_out_the_interval_and_takes_all_that_came()
 {
    let app = TestApp::spawn_with(|s| s.database.write_interval_ms = 1000).await;
    app.room("r", &["alice", "bob", "carol"]).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    let mut carol = app.client("carol").await;
    // Under load: two sends queue behind a busy writer and are written together.
    let lock = block_the_writer(&app, &mut alice, "r", 1.0).await;
    let from_bob = queue_send(&app, &mut bob, "r", "bob's", "b1", 1.0).await;
    let from_carol = queue_send(&app, &mut carol, "r", "carol's", "c1", 2.0).await;
    lock.release().await;
    message(&alice.reply_to("send-blocker").await);
    message(&bob.reply_to(&from_bob).await);
    message(&carol.reply_to(&from_carol).await);
    assert_eq!(
        (app.metric(BATCHES).await, app.metric(BATCHED).await),
        (2.0, 3.0)
    );
    // Three sends right after it, one at a time: the writer waits out the interval since that
    // batch, so all three are one commit.
    let ids = [
        start_send(&mut alice, "r", "one", "a2").await,
        start_send(&mut bob, "r", "two", "b2").await,
        start_send(&mut carol, "r", "three", "c2").await,
    ];
    let mut seqs = [
        message(&alice.reply_to(&ids[0]).await)["seq"].as_i64(),
        message(&bob.reply_to(&ids[1]).await)["seq"].as_i64(),
        message(&carol.reply_to(&ids[2]).await)["seq"].as_i64(),
    ];
    // (Three sockets: the order they reach the writer in is theirs.)
    seqs.sort_unstable();
    assert_eq!(seqs, [Some(4), Some(5), Some(6)]);
    assert_eq!(
        (app.metric(BATCHES).await, app.metric(BATCHED).await),
        (3.0, 6.0)
    );
}

/// Checkpoints run beside the writer, on a connection of their own: after a burst of sends the
/// write-ahead log is copied into the database file (no WAL frame left pending) without a send
/// ever running a checkpoint itself, and the messages are all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_is_checkpointed_in_the_background() {
    let app = TestApp::spawn_with(|s| s.database.checkpoint_interval_ms = 50).await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    for i in 0..100 {
        alice.send_ok("r", &format!("m{i}")).await;
    }
    let before = app.metric("chat_store_checkpoints_total").await;
    let deadline = Instant::now() + WAIT;
    loop {
        let ran = app.metric("chat_store_checkpoints_total").await - before;
        let pending = app.metric("chat_store_wal_frames_pending").await;
        if ran >= 2.0 && pending == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the WAL was not checkpointed: {ran} checkpoints since the sends, {pending} frames pending"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let page = alice.history("r", None, Some(50)).await;
    let messages = page["result"]["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 50);
    assert_eq!(messages[0]["content"], "m50", "the newest 50, oldest first");
    assert_eq!(messages[49]["content"], "m99");
}

/// Under steady sends the background checkpoints never find the WAL still (a commit lands while
/// each one runs), so on their own they never let it restart from its beginning: it grew without
/// end, 60 MB/s at 5,000 msgs/s. Past `database.wal_limit_mb` the writer lets it restart, and the
/// file is cut back to the limit. Here 8 senders write about 20 MB of WAL against a 1 MiB limit,
/// without a pause: the file stays within a few MiB, it restarted several times, and every send
/// was stored in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_stays_bounded_under_steady_sends() {
    const SENDERS: usize = 8;
    const EACH: i64 = 300;
    let app = TestApp::spawn_with(|s| {
        s.database.checkpoint_interval_ms = 10;
        s.database.wal_limit_mb = 1;
        s.rate_limit.enabled = false;
    })
    .await;
    for k in 0..SENDERS {
        app.room(&format!("r{k}"), &[&format!("u{k}")]).await;
    }
    let wal = app.data_dir.path().join("chat.db-wal");
    let largest = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (largest, watching) = (largest.clone(), watching.clone());
        tokio::spawn(async move {
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let size = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
                largest.fetch_max(size, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let content = "x".repeat(1000);
    let senders = (0..SENDERS).map(|k| {
        let (app, content) = (&app, &content);
        async move {
            let room = format!("r{k}");
            let mut c = app.client(&format!("u{k}")).await;
            c.join(&room, None).await;
            for i in 1..=EACH {
                let message = c.send_ok(&room, content).await;
                assert_eq!(
                    message["seq"], i,
                    "{room}: sequence numbers in order, no gap"
                );
            }
        }
    });
    futures::future::join_all(senders).await;
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    watcher.await.unwrap();
    let restarts = app.metric("chat_store_wal_restarts_total").await;
    let largest = largest.load(std::sync::atomic::Ordering::Relaxed);
    assert!(restarts >= 2.0, "the WAL restarted {restarts} times");
    assert!(
        largest < 4 << 20,
        "the WAL file reached {largest} bytes against a limit of 1 MiB"
    );
}

/// A read transaction left open (another process reading the file) holds the WAL's restart off,
/// as it holds checkpoints: sends go on being acknowledged at once while the WAL grows past its
/// limit, and once the reader ends the WAL restarts and falls back under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_left_open_holds_the_wal_restart_off_without_holding_up_sends() {
    let app = TestApp::spawn_with(|s| {
        s.database.checkpoint_interval_ms = 10;
        s.database.wal_limit_mb = 1;
        s.rate_limit.enabled = false;
    })
    .await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    alice.join("r", None).await;
    let content = "x".repeat(1000);
    alice.send_ok("r", &content).await;
    let path = app.data_dir.path().join("chat.db");
    let mut reader = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("open the gateway's database");
    sqlx::raw_sql(r#"BEGIN; SELECT count(*) FROM "ChatMessage";"#)
        .execute(&mut reader)
        .await
        .expect("a read transaction");
    let held = app.metric("chat_store_wal_restarts_total").await;
    for _ in 0..400 {
        let started = Instant::now();
        alice.send_ok("r", &content).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a send waited {:?} behind the held WAL",
            started.elapsed()
        );
    }
    let wal = std::fs::metadata(app.data_dir.path().join("chat.db-wal"))
        .unwrap()
        .len();
    assert!(wal > 1 << 20, "the WAL ({wal} bytes) grew past its limit");
    assert_eq!(
        app.metric("chat_store_wal_restarts_total").await,
        held,
        "no restart while the reader is in the WAL"
    );
    sqlx::raw_sql("COMMIT").execute(&mut reader).await.unwrap();
    // Once a checkpoint has copied every frame, the WAL restarts: made to by the writer (counted
    // in chat_store_wal_restarts_total), or at these few sends a second by itself, when the next
    // commit finds every frame copied. Either way its length falls back and the file is cut back
    // to the limit.
    let deadline = Instant::now() + WAIT;
    loop {
        alice.send_ok("r", "after the reader").await;
        let bytes = app.metric("chat_store_wal_bytes").await;
        let file = std::fs::metadata(app.data_dir.path().join("chat.db-wal"))
            .unwrap()
            .len();
        if bytes < (1 << 20) as f64 && file <= 1 << 20 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the WAL did not restart once the reader ended: {bytes} bytes since its last \
             restart, a file of {file} bytes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
