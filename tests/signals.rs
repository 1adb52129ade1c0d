//! Read state: unread counts from two devices, read receipts, mark-read bursts coalesced into one
//! write, the "my rooms" list, over both doors, on the embedded store and on Postgres.

mod common;

use std::time::{Duration, Instant};

use common::{TestApp, WAIT, scratch_database};
use serde_json::{Value, json};

async fn rooms_over_rest(app: &TestApp, user: &str) -> Value {
    app.http
        .get(app.url("/api/chat/rooms"))
        .bearer_auth(app.token(user))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn unread(rooms: &Value, room: &str) -> i64 {
    rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == room)
        .unwrap()["unread"]
        .as_i64()
        .unwrap()
}

/// Waits until `user`'s unread count in `room` (over REST, a second device) is `expected`.
async fn wait_unread(app: &TestApp, user: &str, room: &str, expected: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let rooms = rooms_over_rest(app, user).await;
        if unread(&rooms, room) == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "unread in {room} never became {expected}: {rooms}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn read_state_scenario(app: &TestApp) {
    app.room("r1", &["alice", "bob"]).await;
    app.room("r2", &["alice", "bob"]).await;
    app.room("quiet", &["alice"]).await;
    let mut bob = app.client("bob").await;
    bob.join("r1", None).await;
    for i in 1..=3 {
        bob.send_ok("r1", &format!("r1 message {i}")).await;
    }
    bob.send_ok("r2", "r2 message").await;

    // Device 1: the socket's `rooms` request.
    let mut alice = app.client("alice").await;
    let listed = alice.request(json!({"type": "rooms"})).await;
    let rooms = &listed["result"];
    assert_eq!(unread(rooms, "r1"), 3);
    assert_eq!(unread(rooms, "r2"), 1);
    assert_eq!(unread(rooms, "quiet"), 0);
    let r1 = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "r1")
        .unwrap()
        .clone();
    assert_eq!(r1["lastMessage"]["content"], "r1 message 3");
    assert_eq!(
        (r1["lastSeq"].as_i64(), r1["lastReadSeq"].as_i64()),
        (Some(3), Some(0))
    );
    let quiet = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "quiet")
        .unwrap()
        .clone();
    assert!(quiet["lastMessage"].is_null());

    // Marking read pushes a receipt to the room at once and lands in the store shortly after.
    let reply = alice
        .request(json!({"type": "mark_read", "room": "r1", "seq": 2}))
        .await;
    assert_eq!(reply["result"], json!({"room": "r1", "seq": 2}));
    let receipt = loop {
        let push = bob.next_push().await;
        if push["type"] != "message" {
            break push; // bob's own three messages come first
        }
    };
    assert_eq!(
        receipt,
        json!({"type": "read", "room": "r1", "userId": "alice", "seq": 2})
    );
    wait_unread(app, "alice", "r1", 1).await;
    // Bob's own count is untouched by alice's reads.
    assert_eq!(unread(&rooms_over_rest(app, "bob").await, "r1"), 3);

    // A burst of marks becomes one write.
    let key = "chat_read_marks_written_total";
    let before = app.metric(key).await;
    for _ in 0..20 {
        alice
            .request(json!({"type": "mark_read", "room": "r2", "seq": 1}))
            .await;
    }
    wait_unread(app, "alice", "r2", 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.metric(key).await - before, 1.0, "20 marks, one write");

    // Device 2 over REST; a position never moves back.
    let r = app
        .http
        .post(app.url("/api/chat/rooms/r1/read"))
        .bearer_auth(app.token("alice"))
        .json(&json!({"seq": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_unread(app, "alice", "r1", 0).await;
    alice
        .request(json!({"type": "mark_read", "room": "r1", "seq": 1}))
        .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        unread(&rooms_over_rest(app, "alice").await, "r1"),
        0,
        "read positions only move forward"
    );
    // New messages count again.
    bob.send_ok("r1", "one more").await;
    assert_eq!(unread(&rooms_over_rest(app, "alice").await, "r1"), 1);

    // Strangers cannot mark rooms they are not in.
    let mut mallory = app.client("mallory").await;
    let e = mallory
        .request(json!({"type": "mark_read", "room": "r1", "seq": 1}))
        .await;
    assert_eq!(e["error"]["code"], "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_state_and_unread_counts_on_the_embedded_store() {
    let app = TestApp::spawn_with(|s| s.signals.read_flush_ms = 100).await;
    read_state_scenario(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_state_and_unread_counts_on_postgres() {
    let Some(db) = scratch_database().await else {
        return;
    };
    let app = TestApp::spawn_on_postgres(&db.url, |s| s.signals.read_flush_ms = 100).await;
    read_state_scenario(&app).await;
}

/// The next presence push that mentions `user` (bob's own arrival comes first, for one).
async fn next_presence(client: &mut common::Client, user: &str) -> Value {
    loop {
        let push = client.next_push_any().await;
        let mentions = |list: &Value| {
            list.as_array()
                .unwrap()
                .iter()
                .any(|u| u == user || u["userId"] == user)
        };
        if push["type"] == "presence" && (mentions(&push["joined"]) || mentions(&push["left"])) {
            return push;
        }
    }
}

async fn presence_scenario(app: &TestApp) {
    app.room("p", &["alice", "bob"]).await;
    let mut bob = app.client("bob").await;
    bob.join("p", None).await;
    let mut tab1 = app.client("alice").await;
    let mut tab2 = app.client("alice").await;
    tab1.join("p", None).await;
    let joined = next_presence(&mut bob, "alice").await;
    assert_eq!(joined["online"], 2);
    assert_eq!(
        joined["joined"],
        json!([{"userId": "alice", "name": "alice name"}])
    );
    tab2.join("p", None).await;
    let page = bob.request(json!({"type": "presence", "room": "p"})).await;
    assert_eq!(page["result"]["online"], 2, "two tabs count once: {page}");
    let mut ids: Vec<&str> = page["result"]["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["userId"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["alice", "bob"]);
    // Closing one tab changes nothing; closing the last one reports alice gone.
    tab1.close().await;
    tab2.close().await;
    let started = Instant::now();
    let left = next_presence(&mut bob, "alice").await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "diffs are pushed within about a second"
    );
    assert_eq!(left["left"], json!(["alice"]));
    assert_eq!(left["online"], 1);
    let (status, body) = {
        let r = app
            .http
            .get(app.url("/api/chat/rooms/p/presence"))
            .bearer_auth(app.token("bob"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!((status, body["online"].as_u64()), (200, Some(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_counts_a_user_with_two_tabs_once_on_one_node() {
    let app = TestApp::spawn().await;
    presence_scenario(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_counts_a_user_with_two_tabs_once_with_redis() {
    let Some(url) = common::redis_url().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let settings = common::redis_settings(&url, &common::unique_prefix());
    let app = TestApp::start(
        settings,
        common::DataDir::Borrowed(dir.path().to_path_buf()),
    )
    .await;
    presence_scenario(&app).await;
}
