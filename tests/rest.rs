//! The REST fallback: the old app's routes and JSON, errors with the right statuses, and the same
//! rules and the same messages as the socket.

mod common;

use std::time::{Duration, Instant};

use common::{TestApp, seqs};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_history_and_send_speak_the_old_apps_json() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice"]).await;
    let (status, body) = app
        .rest_send("alice", "r", "  hello over REST  ", None)
        .await;
    assert_eq!(status, 201);
    let m = &body["message"];
    assert_eq!(m["content"], "hello over REST", "content is trimmed");
    for field in [
        "id",
        "roomId",
        "senderId",
        "senderName",
        "senderAvatarUrl",
        "content",
        "contentType",
        "status",
        "moderationStatus",
        "createdAt",
        "seq",
        "sender",
    ] {
        assert!(m.get(field).is_some(), "missing {field} in {m}");
    }
    assert_eq!(
        m["sender"],
        json!({"id": "alice", "name": "alice name", "avatarUrl": null})
    );
    assert_eq!(m["seq"], 1);
    assert!(m["createdAt"].as_str().unwrap().ends_with('Z'));

    let r = app
        .http
        .get(app.url("/api/chat/rooms/r/messages?limit=30"))
        .bearer_auth(app.token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["cache-control"],
        "private, max-age=3, stale-while-revalidate=5"
    );
    let page: serde_json::Value = r.json().await.unwrap();
    assert_eq!(page["messages"][0], *m);
    assert!(page["nextBefore"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_errors_are_json_with_the_documented_statuses() {
    let app = TestApp::spawn_with(|s| s.rate_limit.enabled = true).await;
    app.room("r", &["alice"]).await;
    let post = |body: String| {
        app.http
            .post(app.url("/api/chat/rooms/r/messages"))
            .bearer_auth(app.token("alice"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = post("{oops".into()).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "bad_request"
    );
    let r = post(json!({"content": " "}).to_string()).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "content_empty"
    );
    let r = post(json!({"content": "y".repeat(2001)}).to_string())
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "content_too_long"
    );
    let (status, _) = app.rest_history("alice", "r", "?limit=abc").await;
    assert_eq!(status, 400);
    let (status, _) = app.rest_history("alice", "r", "?before=0").await;
    assert_eq!(status, 400);

    // The sixth of a burst: 429 with Retry-After, and the seventh after the wait is accepted.
    for i in 0..5 {
        let (status, _) = app
            .rest_send("alice", "r", &format!("burst {i}"), None)
            .await;
        assert_eq!(status, 201);
    }
    let r = post(json!({"content": "sixth"}).to_string()).await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    let wait = body["error"]["retryAfterMs"].as_u64().unwrap();
    tokio::time::sleep(Duration::from_millis(wait + 20)).await;
    let (status, body) = app.rest_send("alice", "r", "seventh", None).await;
    assert_eq!(status, 201);
    assert_eq!(body["message"]["seq"], 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_and_socket_see_each_others_messages() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice", "bob"]).await;
    let mut bob = app.client("bob").await;
    bob.join("r", None).await;
    let (status, _) = app
        .rest_send("alice", "r", "from REST", Some("rest-1"))
        .await;
    assert_eq!(status, 201);
    let pushed = bob.expect_message("r").await;
    assert_eq!(
        (pushed["content"].as_str(), pushed["senderId"].as_str()),
        (Some("from REST"), Some("alice"))
    );
    assert!(
        pushed.get("clientMsgId").is_none(),
        "the key is the sender's: {pushed}"
    );

    bob.send_ok("r", "from the socket").await;
    let (_, page) = app.rest_history("alice", "r", "").await;
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(seqs(messages), vec![1, 2]);
    assert_eq!(messages[1]["content"], "from the socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rate_limit_covers_both_doors() {
    let app = TestApp::spawn_with(|s| s.rate_limit.enabled = true).await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    for i in 0..3 {
        alice.send_ok("r", &format!("ws {i}")).await;
    }
    for i in 0..2 {
        assert_eq!(
            app.rest_send("alice", "r", &format!("rest {i}"), None)
                .await
                .0,
            201
        );
    }
    assert_eq!(
        app.rest_send("alice", "r", "one too many", None).await.0,
        429
    );
    assert_eq!(
        alice.send("r", "and here", "c").await["error"]["code"],
        "rate_limited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_body_gets_a_json_413_and_errors_carry_no_empty_fields() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice"]).await;
    let r = app
        .http
        .post(app.url("/api/chat/rooms/r/messages"))
        .bearer_auth(app.token("alice"))
        .header("content-type", "application/json")
        .body(json!({"content": "z".repeat(70_000)}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_large");
    assert!(body["error"].get("retryAfterMs").is_none(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latest_page_stays_cached_while_the_room_is_written_to() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice", "bob"]).await;
    // The seed's loop: read the latest page, then send. Every read shows every acknowledged
    // message, and only the first one reads the store.
    for i in 1..=20 {
        let (status, page) = app.rest_history("alice", "r", "?limit=5").await;
        assert_eq!(status, 200);
        let acked = i - 1;
        assert_eq!(
            seqs(page["messages"].as_array().unwrap()),
            ((acked - 4).max(1)..=acked).collect::<Vec<_>>()
        );
        let next_before = (acked > 5).then_some(acked - 4);
        assert_eq!(page["nextBefore"].as_i64(), next_before, "after {acked}");
        let user = if i % 2 == 0 { "alice" } else { "bob" };
        assert_eq!(
            app.rest_send(user, "r", &format!("m{i}"), None).await.0,
            201
        );
    }
    assert_eq!(
        (
            app.metric("chat_history_requests_total{cache=\"miss\"}")
                .await,
            app.metric("chat_history_requests_total{cache=\"hit\"}")
                .await
        ),
        (1.0, 19.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_pages_survive_sends_and_a_cursor_past_the_head_is_never_stale() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice"]).await;
    for i in 1..=40 {
        app.rest_send("alice", "r", &format!("m{i}"), None).await;
    }
    let (_, older) = app.rest_history("alice", "r", "?before=21&limit=10").await;
    assert_eq!(
        seqs(older["messages"].as_array().unwrap()),
        (11..=20).collect::<Vec<_>>()
    );
    assert_eq!(older["nextBefore"], 11);
    let misses = app
        .metric("chat_history_requests_total{cache=\"miss\"}")
        .await;
    app.rest_send("alice", "r", "m41", None).await;
    let (_, again) = app.rest_history("alice", "r", "?before=21&limit=10").await;
    assert_eq!(again, older);
    assert_eq!(
        app.metric("chat_history_requests_total{cache=\"miss\"}")
            .await,
        misses,
        "a send does not drop older pages"
    );
    // A cursor beyond the room's head is a latest page in disguise: new messages belong in it.
    let (_, beyond) = app.rest_history("alice", "r", "?before=100&limit=5").await;
    assert_eq!(
        seqs(beyond["messages"].as_array().unwrap()),
        (37..=41).collect::<Vec<_>>()
    );
    app.rest_send("alice", "r", "m42", None).await;
    let (_, beyond) = app.rest_history("alice", "r", "?before=100&limit=5").await;
    assert_eq!(
        seqs(beyond["messages"].as_array().unwrap()),
        (38..=42).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_rejected_in_the_database_leaves_a_busy_rooms_latest_page_within_the_ttl() {
    let ttl = Duration::from_millis(800);
    let app = TestApp::spawn_with(|s| s.cache.history_ttl_ms = ttl.as_millis() as u64).await;
    app.room("r", &["alice"]).await;
    for i in 1..=5 {
        app.rest_send("alice", "r", &format!("m{i}"), None).await;
    }
    let (_, page) = app.rest_history("alice", "r", "").await;
    assert_eq!(seqs(page["messages"].as_array().unwrap()), [1, 2, 3, 4, 5]);
    // Moderation, behind the gateway's back.
    let db = app.data_dir.path().join("chat.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query(
        r#"UPDATE "ChatMessage" SET "moderationStatus" = 'REJECTED' WHERE "roomId" = 'r' AND seq = 3"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let rejected_at = Instant::now();
    // The room stays busy (a send and a read every 50 ms): sends keep the cached page current,
    // but do not keep the rejected message in it past the TTL.
    let mut sent = 5;
    let gone_after = loop {
        sent += 1;
        app.rest_send("alice", "r", &format!("m{sent}"), None).await;
        let (_, page) = app.rest_history("alice", "r", "").await;
        let got = seqs(page["messages"].as_array().unwrap());
        assert_eq!(
            got.last(),
            Some(&sent),
            "the newest acknowledged message is shown"
        );
        if !got.contains(&3) {
            break rejected_at.elapsed();
        }
        assert!(
            rejected_at.elapsed() < ttl + Duration::from_millis(500),
            "message 3 still shown {:?} after its rejection",
            rejected_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Re-read in the background ahead of its expiry: no reader waited for the store but the first.
    assert!(
        app.metric("chat_history_refreshes_total").await >= 1.0,
        "gone after {gone_after:?} without a refresh"
    );
    assert_eq!(
        app.metric("chat_history_requests_total{cache=\"miss\"}")
            .await,
        1.0
    );
}
