//! Chat over the WebSocket: rooms, ordering, multiplexing, idempotency, resume, history, bad input,
//! backpressure. Each test runs its own gateway on port 0 with its own SQLite file.

mod common;

use std::time::Duration;

use chat_gateway::auth::{Role, claims_for};
use common::{Client, Ended, TestApp, assert_latest_page_holds, seqs};
use futures::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_see_each_others_messages_in_order() {
    let app = TestApp::spawn().await;
    app.room("lobby", &["alice", "bob"]).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    alice.join("lobby", None).await;
    bob.join("lobby", None).await;

    for i in 0..10 {
        let (sender, text) = if i % 2 == 0 {
            (&mut alice, "from alice")
        } else {
            (&mut bob, "from bob")
        };
        sender.send_ok("lobby", &format!("{text} {i}")).await;
    }
    for client in [&mut alice, &mut bob] {
        let mut got = Vec::new();
        for _ in 0..10 {
            got.push(client.expect_message("lobby").await);
        }
        assert_eq!(
            seqs(&got),
            (1..=10).collect::<Vec<_>>(),
            "every message once, in order"
        );
        for (i, m) in got.iter().enumerate() {
            assert!(m["content"].as_str().unwrap().ends_with(&format!(" {i}")));
        }
        assert_eq!(got[1]["senderId"], "bob");
        // Each sender's profile comes with their first message in the room, then not again.
        assert_eq!(
            got[1]["senderName"], "bob name",
            "sender name comes from the token"
        );
        assert_eq!(got[0]["senderName"], "alice name");
        for m in &got[2..] {
            assert!(m.get("senderName").is_none(), "profile told again: {m}");
        }
        // The message id and the sender's idempotency key stay out of pushes.
        assert!(
            got.iter()
                .all(|m| m.get("id").is_none() && m.get("clientMsgId").is_none())
        );
    }
    alice.expect_silence(Duration::from_millis(200)).await;
}

/// The next `message` push as the text on the wire.
async fn raw_push(client: &mut Client) -> String {
    use futures::StreamExt;
    loop {
        match tokio::time::timeout(common::WAIT, client.ws.next()).await {
            Ok(Some(Ok(WsMessage::Text(t)))) if t.as_str().starts_with(r#"{"type":"message""#) => {
                return t.as_str().to_string();
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("no push: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_is_lean_and_a_joining_socket_is_told_the_profiles_it_leaves_out() {
    let app = TestApp::spawn().await;
    app.room("r", &["carol", "dave", "erin"]).await;
    // A user with a 60-character avatar URL sends an 82-character message.
    let avatar = format!("https://cdn.example.com/avatars/{}.png", "a".repeat(24));
    assert_eq!(avatar.len(), 60);
    let mut claims = claims_for("carol", Some("Carol"), Role::User, 600);
    claims.avatar = Some(avatar.clone());
    let mut carol = Client::connect(app.addr, None).await;
    carol
        .request(json!({"type": "auth", "token": app.token_with(&claims)}))
        .await;
    carol.join("r", None).await;
    let mut dave = app.client("dave").await;
    dave.join("r", None).await;

    let text = |i: usize| format!("{i:02} {}", "x".repeat(79));
    assert_eq!(text(1).len(), 82);
    carol.send("r", &text(1), "c-1").await;
    let first = raw_push(&mut dave).await;
    carol.send("r", &text(2), "c-2").await;
    let second = raw_push(&mut dave).await;
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["message"]["senderAvatarUrl"], avatar.as_str());
    assert_eq!(first["message"]["senderName"], "Carol");
    // What every later push of hers costs on the wire (a 4-byte frame header for 126..65535).
    let wire = second.len() + 4;
    assert!(wire <= 250, "{wire} bytes: {second}");
    let second: Value = serde_json::from_str(&second).unwrap();
    assert_eq!(
        second,
        json!({"type": "message", "room": "r", "message": {
            "seq": 2, "senderId": "carol", "content": text(2),
            "ts": second["message"]["ts"].as_i64().unwrap()}})
    );

    // Erin joins after the profile was told: her join result tells her.
    let mut erin = app.client("erin").await;
    let joined = erin.join("r", None).await;
    assert_eq!(
        joined["senders"]["carol"],
        json!({"senderName": "Carol", "senderAvatarUrl": avatar})
    );
    carol.send("r", &text(3), "c-3").await;
    let third = erin.expect_message("r").await;
    assert_eq!(third["seq"], 3);
    assert!(third.get("senderName").is_none(), "{third}");
    // A changed profile is told again, to everyone.
    claims.avatar = None;
    let mut carol_again = Client::connect(app.addr, None).await;
    carol_again
        .request(json!({"type": "auth", "token": app.token_with(&claims)}))
        .await;
    carol_again.send("r", &text(4), "c-4").await;
    let fourth = erin.expect_message("r").await;
    assert_eq!(
        (fourth["seq"].as_i64(), &fourth["senderAvatarUrl"]),
        (Some(4), &Value::Null)
    );
    // History and send results carry everything: id, clientMsgId, profile.
    let page = erin.history("r", None, None).await;
    let m = &page["result"]["messages"][0];
    for field in [
        "seq",
        "id",
        "senderId",
        "content",
        "ts",
        "clientMsgId",
        "senderName",
        "senderAvatarUrl",
    ] {
        assert!(m.get(field).is_some(), "{field} missing in {m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_socket_multiplexes_three_rooms() {
    let app = TestApp::spawn().await;
    for room in ["a", "b", "c"] {
        app.room(room, &["multi", "sender"]).await;
    }
    let mut multi = app.client("multi").await;
    for room in ["a", "b", "c"] {
        multi.join(room, None).await;
    }
    let mut sender = app.client("sender").await;
    let order = ["b", "a", "c", "c", "a", "b", "a"];
    for (i, room) in order.iter().enumerate() {
        sender.send_ok(room, &format!("{room}-{i}")).await;
    }
    let mut per_room = std::collections::HashMap::<String, Vec<i64>>::new();
    for (i, room) in order.iter().enumerate() {
        let push = multi.next_push().await;
        assert_eq!(push["type"], "message");
        assert_eq!(
            push["room"], *room,
            "pushes arrive in send order, tagged with their room"
        );
        assert_eq!(push["message"]["content"], format!("{room}-{i}"));
        per_room
            .entry(room.to_string())
            .or_default()
            .push(push["message"]["seq"].as_i64().unwrap());
    }
    assert_eq!(per_room["a"], vec![1, 2, 3]);
    assert_eq!(per_room["b"], vec![1, 2]);
    assert_eq!(per_room["c"], vec![1, 2]);

    // Leaving one room stops its pushes, the others continue on the same socket.
    let reply = multi.request(json!({"type": "leave", "room": "b"})).await;
    assert_eq!(reply["result"]["room"], "b");
    sender.send_ok("b", "not for multi").await;
    sender.send_ok("c", "still for multi").await;
    assert_eq!(
        multi.expect_message("c").await["content"],
        "still for multi"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_client_msg_id_creates_no_duplicate() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice", "bob"]).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    bob.join("r", None).await;

    let first = alice.send("r", "only once", "client-msg-1").await;
    let retry = alice.send("r", "only once", "client-msg-1").await;
    assert_eq!(first["result"]["duplicate"], false);
    assert_eq!(retry["result"]["duplicate"], true);
    assert_eq!(
        first["result"]["message"]["id"],
        retry["result"]["message"]["id"]
    );
    assert_eq!(
        first["result"]["message"]["seq"],
        retry["result"]["message"]["seq"]
    );

    // Over REST too, with the same key: still the original.
    let (status, body) = app
        .rest_send("alice", "r", "only once", Some("client-msg-1"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["message"]["id"], first["result"]["message"]["id"]);

    assert_eq!(bob.expect_message("r").await["seq"], 1);
    bob.expect_silence(Duration::from_millis(300)).await;
    let page = alice.history("r", None, None).await;
    assert_eq!(page["result"]["messages"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_delivers_exactly_the_missed_messages() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice", "bob"]).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    bob.join("r", None).await;
    for i in 1..=3 {
        alice.send_ok("r", &format!("before {i}")).await;
    }
    let mut last_seen = 0;
    for _ in 0..3 {
        last_seen = bob.expect_message("r").await["seq"].as_i64().unwrap();
    }
    assert_eq!(last_seen, 3);
    bob.close().await;

    for i in 4..=9 {
        alice.send_ok("r", &format!("missed {i}")).await;
    }
    let mut bob = app.client("bob").await;
    let joined = bob.join("r", Some(last_seen)).await;
    assert_eq!(joined["missed"], 6);
    assert_eq!(joined["head"], 9);
    assert_eq!(joined["reload"], false);
    // Sent during and after the resume: must follow the catch-up without gap or duplicate.
    alice.send_ok("r", "live 10").await;
    let got: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..7 {
            v.push(bob.expect_message("r").await);
        }
        v
    };
    assert_eq!(seqs(&got), (4..=10).collect::<Vec<_>>());
    assert_eq!(got[0]["content"], "missed 4");
    bob.expect_silence(Duration::from_millis(200)).await;
}

/// While the room has sockets on the node, a resume that missed no more than the room's recent
/// messages kept in memory (`limits.resume_buffer`) is replayed from memory; one that missed
/// more, from the store. Either way: exactly the missed messages, in order, then live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_resume_is_replayed_from_memory_and_a_longer_one_from_the_store() {
    let app = TestApp::spawn_with(|s| s.limits.resume_buffer = 5).await;
    app.room("r", &["alice", "bob"]).await;
    let mut alice = app.client("alice").await;
    alice.join("r", None).await;
    let mut bob = app.client("bob").await;
    bob.join("r", None).await;
    alice.send_ok("r", "seen").await;
    assert_eq!(bob.expect_message("r").await["seq"], 1);
    bob.close().await;

    let mut last_seen = 1;
    for (missed, from) in [(5, "memory"), (6, "store")] {
        for i in 0..missed {
            alice
                .send_ok("r", &format!("missed {}", last_seen + 1 + i))
                .await;
        }
        let mut bob = app.client("bob").await;
        let joined = bob.join("r", Some(last_seen)).await;
        assert_eq!(joined["missed"], missed, "{joined}");
        alice.send_ok("r", "live").await;
        let got: Vec<_> = {
            let mut v = Vec::new();
            for _ in 0..=missed {
                v.push(bob.expect_message("r").await);
            }
            v
        };
        let want: Vec<i64> = (last_seen + 1..=last_seen + missed + 1).collect();
        assert_eq!(seqs(&got), want, "replayed from {from}");
        assert_eq!(got[0]["content"], format!("missed {}", last_seen + 1));
        assert_eq!(got[missed as usize]["content"], "live");
        bob.expect_silence(Duration::from_millis(200)).await;
        assert_eq!(
            app.metric(&format!("chat_resumes_total{{from=\"{from}\"}}"))
                .await,
            1.0,
            "{missed} missed, buffer of 5: replayed from {from}"
        );
        bob.close().await;
        last_seen += missed + 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_while_messages_keep_arriving_has_no_gap_or_duplicate() {
    let app = TestApp::spawn().await;
    app.room("busy", &["writer", "reader"]).await;
    let mut writer = app.client("writer").await;
    for i in 0..50 {
        writer.send_ok("busy", &format!("m{i}")).await;
    }
    // Keep sending while the reader resumes from seq 10.
    let addr = app.addr;
    let writer_token = app.token("writer");
    let sending = tokio::spawn(async move {
        let mut w = Client::connect(addr, Some(&format!("token={writer_token}"))).await;
        for i in 50..150 {
            w.send_ok("busy", &format!("m{i}")).await;
        }
    });
    let mut reader = app.client("reader").await;
    let joined = reader.join("busy", Some(10)).await;
    let head = joined["head"].as_i64().unwrap();
    assert_eq!(joined["missed"].as_i64().unwrap(), head - 10);
    sending.await.unwrap();
    let mut got = Vec::new();
    for _ in 11..=150 {
        got.push(reader.expect_message("busy").await["seq"].as_i64().unwrap());
    }
    assert_eq!(got, (11..=150).collect::<Vec<_>>());
    reader.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_past_the_catch_up_limit_asks_for_a_reload() {
    let app = TestApp::spawn_with(|s| s.limits.catch_up_limit = 5).await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    for i in 0..8 {
        alice.send_ok("r", &format!("{i}")).await;
    }
    let joined = alice.join("r", Some(1)).await;
    assert_eq!(joined["reload"], true, "7 missed > limit 5");
    assert_eq!(joined["missed"], 0);
    assert_eq!(joined["head"], 8);
    alice.send_ok("r", "live").await;
    assert_eq!(
        alice.expect_message("r").await["seq"],
        9,
        "live traffic continues after head"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pagination_walks_120_messages_without_gap_or_duplicate() {
    let app = TestApp::spawn().await;
    app.room("long", &["alice"]).await;
    let mut alice = app.client("alice").await;
    for i in 1..=120 {
        alice.send_ok("long", &format!("message {i}")).await;
    }
    let mut seen = Vec::new();
    let mut before = None;
    let mut pages = 0;
    loop {
        let reply = alice.history("long", before, Some(50)).await;
        let page = &reply["result"];
        let messages = page["messages"].as_array().unwrap();
        let page_seqs = seqs(messages);
        assert!(
            page_seqs.windows(2).all(|w| w[0] < w[1]),
            "a page is oldest first"
        );
        seen.splice(0..0, page_seqs);
        pages += 1;
        match page["nextBefore"].as_i64() {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 3, "50 + 50 + 20");
    assert_eq!(seen, (1..=120).collect::<Vec<_>>());

    // Default limit is 30 and the maximum 50.
    let latest = alice.history("long", None, None).await;
    assert_eq!(
        seqs(latest["result"]["messages"].as_array().unwrap()),
        (91..=120).collect::<Vec<_>>()
    );
    let clamped = alice.history("long", None, Some(500)).await;
    assert_eq!(clamped["result"]["messages"].as_array().unwrap().len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_never_serves_a_page_older_than_an_acknowledged_message() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    alice.send_ok("r", "one").await;
    let first = alice.history("r", None, None).await;
    assert_eq!(first["result"]["messages"].as_array().unwrap().len(), 1);
    // Cached now; the send appends to it before its ack, so the next read is a hit with it.
    alice.send_ok("r", "two").await;
    let second = alice.history("r", None, None).await;
    let messages = second["result"]["messages"].as_array().unwrap();
    assert_eq!(seqs(messages), vec![1, 2]);
    assert_eq!(messages[1]["content"], "two");
    assert!(second["result"]["nextBefore"].is_null());
    let _ = alice.history("r", None, None).await;
    assert_eq!(
        (
            app.metric("chat_history_requests_total{cache=\"miss\"}")
                .await,
            app.metric("chat_history_requests_total{cache=\"hit\"}")
                .await
        ),
        (1.0, 2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_before_is_exact_whether_the_room_is_shorter_or_longer_than_the_page() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    let page = |reply: Value| {
        let page = &reply["result"];
        (
            seqs(page["messages"].as_array().unwrap()),
            page["nextBefore"].as_i64(),
        )
    };
    let empty = alice.history("r", None, Some(5)).await;
    assert_eq!(page(empty), (vec![], None));
    for i in 1..=3 {
        alice.send_ok("r", &format!("m{i}")).await;
    }
    // Fewer messages than the limit, exactly as many, and more.
    assert_eq!(
        page(alice.history("r", None, Some(5)).await),
        (vec![1, 2, 3], None)
    );
    assert_eq!(
        page(alice.history("r", None, Some(3)).await),
        (vec![1, 2, 3], None)
    );
    assert_eq!(
        page(alice.history("r", None, Some(2)).await),
        (vec![2, 3], Some(2))
    );
    for i in 4..=50 {
        alice.send_ok("r", &format!("m{i}")).await;
    }
    assert_eq!(
        page(alice.history("r", None, Some(50)).await),
        ((1..=50).collect(), None)
    );
    // Two more: the room now has more messages than the largest page.
    alice.send_ok("r", "m51").await;
    alice.send_ok("r", "m52").await;
    assert_eq!(
        page(alice.history("r", None, Some(50)).await),
        ((3..=52).collect(), Some(3))
    );
    assert_eq!(
        page(alice.history("r", None, Some(30)).await),
        ((23..=52).collect(), Some(23))
    );
    assert_eq!(
        page(alice.history("r", Some(3), Some(50)).await),
        (vec![1, 2], None)
    );
    // Every latest page above came from the cached messages the sends appended to; the empty
    // room's read and the older page were read from the store.
    assert_eq!(
        app.metric("chat_history_requests_total{cache=\"miss\"}")
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_always_find_their_message_in_the_latest_page() {
    let app = TestApp::spawn().await;
    let users = ["alice", "bob", "carol", "dave"];
    app.room("r", &users).await;
    let mut tasks = Vec::new();
    for user in users {
        let mut client = app.client(user).await;
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let sent = client.send_ok("r", &format!("{user} {i}")).await;
                let seq = sent["seq"].as_i64().unwrap();
                let reply = client.history("r", None, Some(50)).await;
                assert_latest_page_holds(&reply, seq, user);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut alice = app.client("alice").await;
    let last = alice.history("r", None, Some(50)).await;
    assert_eq!(
        seqs(last["result"]["messages"].as_array().unwrap()),
        (51..=100).collect::<Vec<_>>()
    );
    assert!(
        app.metric("chat_history_requests_total{cache=\"hit\"}")
            .await
            > 0.0,
        "the reads never reached the cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_error_replies_and_the_socket_stays_usable() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;

    alice.send_text("{not json").await;
    let e = alice.next_frame().await;
    assert_eq!(
        (e["type"].as_str(), e["error"]["code"].as_str()),
        (Some("error"), Some("bad_frame"))
    );
    assert!(e["id"].is_null());

    alice.send_text(r#"{"type":"dance","id":"d1"}"#).await;
    let e = alice.next_frame().await;
    assert_eq!(e["error"]["code"], "unknown_type");
    assert_eq!(e["id"], "d1");

    alice
        .send_text(r#"{"type":"send","id":7,"room":"r"}"#)
        .await;
    let e = alice.next_frame().await;
    assert_eq!(e["error"]["code"], "bad_request");
    assert_eq!(e["id"], 7, "numeric ids are echoed as numbers");

    alice
        .ws
        .send(WsMessage::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    assert_eq!(alice.next_frame().await["error"]["code"], "bad_frame");

    for (content, code) in [
        ("   ", "content_empty"),
        (&"x".repeat(2001)[..], "content_too_long"),
    ] {
        let e = alice
            .send("r", content, &uuid::Uuid::new_v4().to_string())
            .await;
        assert_eq!(e["error"]["code"], code);
    }
    // Exactly the maximum, in multi-byte characters, is fine.
    let m = alice.send_ok("r", &"é".repeat(2000)).await;
    assert_eq!(m["seq"], 1, "nothing was stored by the refused sends");

    let pong = alice.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "result");
    assert!(pong["result"]["serverTime"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_frame_closes_with_1009() {
    let app = TestApp::spawn_with(|s| s.limits.max_frame_bytes = 4096).await;
    let mut alice = app.client("alice").await;
    alice
        .send_text(&format!(r#"{{"type":"ping","id":"{}"}}"#, "x".repeat(5000)))
        .await;
    assert_eq!(alice.expect_close().await, 1009);
    // The server is fine afterwards.
    let mut again = app.client("alice").await;
    assert_eq!(
        again.request(json!({"type": "ping"})).await["type"],
        "result"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_frame_that_is_not_utf8_closes_with_1007_and_a_protocol_violation_with_1002() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let app = TestApp::spawn().await;
    app.room("r", &["alice", "bob"]).await;
    let mut bob = app.client("bob").await;
    bob.join("r", None).await;

    // RFC 6455: an endpoint that receives invalid UTF-8 in a text frame fails the connection
    // with 1007 (a browser cannot send one; a broken client can).
    let mut alice = app.client("alice").await;
    alice.join("r", None).await;
    let bytes: &[u8] = b"{\"type\":\"ping\",\"id\":\"\xff\xfe\"}";
    alice
        .ws
        .send(WsMessage::Frame(Frame::message(
            bytes.to_vec(),
            OpCode::Data(Data::Text),
            true,
        )))
        .await
        .unwrap();
    assert_eq!(alice.expect_close().await, 1007);
    // Counted by the connection's cleanup, which may follow the close frame by a moment.
    assert_eq!(
        app.metric_reaching(
            "chat_closes_total{reason=\"invalid_utf8\"}",
            1.0,
            Duration::from_secs(2)
        )
        .await,
        1.0
    );

    // A continuation frame with nothing to continue breaks the protocol itself: 1002.
    let mut carol = app.client("alice").await;
    carol
        .ws
        .send(WsMessage::Frame(Frame::message(
            b"stray".to_vec(),
            OpCode::Data(Data::Continue),
            true,
        )))
        .await
        .unwrap();
    assert_eq!(carol.expect_close().await, 1002);

    // Nobody else noticed, and alice's connection slots were given back.
    let m = app.client("alice").await.send_ok("r", "still here").await;
    assert_eq!(bob.expect_message("r").await["seq"], m["seq"]);
    bob.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_rooms_on_one_socket_is_refused() {
    let app = TestApp::spawn_with(|s| s.limits.max_rooms_per_connection = 2).await;
    for room in ["a", "b", "c"] {
        app.room(room, &["alice"]).await;
    }
    let mut alice = app.client("alice").await;
    alice.join("a", None).await;
    alice.join("b", None).await;
    let e = alice.request(json!({"type": "join", "room": "c"})).await;
    assert_eq!(e["error"]["code"], "too_many_rooms");
    // Re-joining a room already joined is not a new room.
    alice.join("a", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_refuses_the_sixth_of_a_burst_and_accepts_after_a_pause() {
    let app = TestApp::spawn_with(|s| s.rate_limit.enabled = true).await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    for i in 1..=5 {
        alice.send_ok("r", &format!("burst {i}")).await;
    }
    let sixth = alice.send("r", "sixth", "c6").await;
    assert_eq!(sixth["error"]["code"], "rate_limited");
    // A retry of a message that was stored (its ack lost) is answered even while limited.
    let first_id =
        alice.history("r", None, Some(1)).await["result"]["messages"][0]["clientMsgId"].clone();
    let retry = alice.send("r", "burst 5", first_id.as_str().unwrap()).await;
    assert_eq!(retry["result"]["duplicate"], true, "{retry}");
    let wait = sixth["error"]["retryAfterMs"].as_u64().unwrap();
    assert!(
        (1..=334).contains(&wait),
        "3/s refills one token every ~333 ms, got {wait}"
    );
    tokio::time::sleep(Duration::from_millis(wait + 20)).await;
    let seventh = alice.send("r", "seventh", "c7").await;
    assert_eq!(seventh["type"], "result", "{seventh}");
    assert_eq!(
        seventh["result"]["message"]["seq"], 6,
        "the refused send stored nothing"
    );
    assert_eq!(
        app.metric("chat_rate_limited_total{scope=\"user\"}").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected_and_others_keep_receiving() {
    let app = TestApp::spawn_with(|s| s.limits.outbound_queue = 8).await;
    app.room("r", &["slow", "fast", "sender"]).await;

    // A client with a tiny receive buffer that never reads after joining.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(app.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(
        format!("ws://{}/ws", app.addr),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .unwrap();
    let mut slow = Client::from_ws(ws);
    assert_eq!(
        slow.request(json!({"type":"auth","token": app.token("slow")}))
            .await["type"],
        "result"
    );
    slow.join("r", None).await;

    let mut fast = app.client("fast").await;
    fast.join("r", None).await;
    let mut sender = app.client("sender").await;
    let big = "x".repeat(1900);
    let total = 4000;
    let reader = tokio::spawn(async move {
        let mut got = Vec::with_capacity(total);
        for _ in 0..total {
            got.push(fast.expect_message("r").await["seq"].as_i64().unwrap());
        }
        got
    });
    let sending = tokio::spawn(async move {
        for _ in 0..total {
            sender.send_ok("r", &big).await;
        }
    });
    // Dropped as slow while the traffic goes on.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while app
        .metric("chat_closes_total{reason=\"slow_consumer\"}")
        .await
        < 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never dropped as slow"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Reading again now, it gets what was already on its way (its queue was dropped), then the
    // close frame that says why: 4008, not a bare end of the connection.
    let (ended, frames) = slow.ended().await;
    assert!(
        matches!(ended, Ended::Close(4008, _)),
        "the slow client is told why: {ended:?}"
    );
    sending.await.unwrap();
    let got = reader.await.unwrap();
    assert_eq!(
        got,
        (1..=total as i64).collect::<Vec<_>>(),
        "the fast client got everything, in order"
    );
    assert_eq!(
        app.metric("chat_closes_total{reason=\"slow_consumer\"}")
            .await,
        1.0
    );
    assert!(
        frames.len() < total,
        "the slow client cannot have received everything"
    );
    // And it can resume from what it saw.
    let last = frames
        .iter()
        .filter_map(|f| f["message"]["seq"].as_i64())
        .max()
        .unwrap_or(0);
    let mut again = app.client("slow").await;
    let joined = again.join("r", Some(last)).await;
    assert_eq!(joined["head"], total as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_round_trips_byte_for_byte_and_nul_is_refused() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    let tricky = "quotes ' \" `; emoji 👋🏽; RTL שלום مرحبا; SQL '); DROP TABLE \"ChatMessage\"; --";
    let stored = alice.send_ok("r", tricky).await;
    assert_eq!(stored["content"], tricky);
    let page = alice.history("r", None, None).await;
    assert_eq!(page["result"]["messages"][0]["content"], tricky);
    let e = alice.send("r", "nul \u{0} inside", "c-nul").await;
    assert_eq!(e["error"]["code"], "bad_request");
    let e = alice.send("r", "fine", "id-with-\u{0}").await;
    assert_eq!(e["error"]["code"], "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_the_others_and_a_flood_is_refused() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice", "bob"]).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    alice.join("r", None).await;
    bob.join("r", None).await;
    assert_eq!(
        alice
            .request(json!({"type": "typing", "room": "r", "typing": true}))
            .await["type"],
        "result"
    );
    let push = bob.next_push().await;
    assert_eq!(
        (push["type"].as_str(), push["userId"].as_str()),
        (Some("typing"), Some("alice"))
    );
    alice.expect_silence(Duration::from_millis(100)).await;
    // Repeats within the refresh interval are answered but not forwarded.
    alice
        .request(json!({"type": "typing", "room": "r", "typing": true}))
        .await;
    bob.expect_silence(Duration::from_millis(100)).await;
    // Start/stop toggles are forwarded up to a cap per second, then refused.
    let mut refused = 0;
    for i in 0..12 {
        let reply = alice
            .request(json!({"type": "typing", "room": "r", "typing": i % 2 == 1}))
            .await;
        if reply["type"] == "error" {
            assert_eq!(reply["error"]["code"], "rate_limited");
            refused += 1;
        }
    }
    assert!(refused > 0, "a typing flood is limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_typer_is_stopped_by_the_server_and_its_session_still_expires_on_time() {
    let app = TestApp::spawn_with(|s| {
        s.signals.typing_timeout_ms = 300;
        s.signals.typing_refresh_ms = 100;
        s.auth.leeway_secs = 0;
        s.auth.expiry_warning_secs = 1;
    })
    .await;
    app.room("r", &["alice", "bob"]).await;
    let mut alice = Client::connect(app.addr, None).await;
    let short = app.token_with(&claims_for("alice", None, Role::User, 4));
    let auth = alice.request(json!({"type": "auth", "token": short})).await;
    assert_eq!(auth["type"], "result");
    alice.join("r", None).await;
    let mut bob = app.client("bob").await;
    bob.join("r", None).await;

    alice
        .request(json!({"type": "typing", "room": "r", "typing": true}))
        .await;
    assert_eq!(bob.next_push().await["typing"], true);
    let started = std::time::Instant::now();
    assert_eq!(bob.next_push().await["typing"], false);
    let lapsed = started.elapsed();
    assert!(
        lapsed >= Duration::from_millis(200) && lapsed < Duration::from_millis(1500),
        "ended by the typing timeout, not at once nor by the session's end: {lapsed:?}"
    );
    // The typing deadline passed; the token's own still hold: the warning, then 4003.
    let (ended, frames) = alice.ended().await;
    assert_eq!(ended, Ended::Close(4003, "token expired".into()));
    assert!(
        frames.iter().any(|f| f["type"] == "session_expiring"),
        "{frames:?}"
    );
}
