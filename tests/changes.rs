//! Messages that change (proto-docs/protocol.md section 15): edits, deletions, reactions, replies
//! and moderation travel in the room's sequence, over real sockets against the real server.
//! Every test keeps a "screen" per socket, built only from what the socket received by the rules
//! a client follows (apply a change when its seq is above the message's version), and checks it
//! against history: exactly once, in order, every screen ending in the same state.
//!
//! The single-node tests run on SQLite; the cross-node tests on Postgres + Redis (skipped, with a
//! message, when those are not reachable; failing under `CI=true`).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Client, TestApp, redis_url, scratch_database, seqs, unique_prefix};
use serde_json::{Value, json};

/// What a client shows of one room: its messages by seq, built from pushes and history.
#[derive(Default, Debug)]
struct Screen {
    messages: BTreeMap<i64, Value>,
    /// The highest seq received in order (pushes must come as `last + 1`).
    last: i64,
}

impl Screen {
    /// Applies one push of the room, asserting it is the next in the room's sequence.
    fn push(&mut self, push: &Value) {
        let (seq, kind) = match push["type"].as_str() {
            Some("message") => (push["message"]["seq"].as_i64().unwrap(), "message"),
            Some("change") => (push["change"]["seq"].as_i64().unwrap(), "change"),
            other => panic!("not a room event: {other:?} {push}"),
        };
        if self.last > 0 {
            assert_eq!(
                seq,
                self.last + 1,
                "a gap or a repeat before this {kind}: {push}"
            );
        }
        self.last = seq;
        match kind {
            "message" => {
                self.messages.insert(seq, push["message"].clone());
            }
            _ => self.apply(&push["change"]),
        }
    }

    /// The documented rule: a change applies when its seq is above the message's version.
    fn apply(&mut self, change: &Value) {
        let seq = change["seq"].as_i64().unwrap();
        let target = change["target"].as_i64().unwrap();
        let Some(m) = self.messages.get_mut(&target) else {
            return;
        };
        let version = m["version"].as_i64().unwrap_or(target);
        if seq <= version {
            return;
        }
        m["version"] = json!(seq);
        let kind = change["kind"].as_str().unwrap();
        match kind {
            "edit" => {
                m["content"] = change["content"].clone();
                m["editedAt"] = change["editedAt"].clone();
            }
            "delete" => {
                m["content"] = json!("");
                m["deletedAt"] = change["deletedAt"].clone();
                m.as_object_mut().unwrap().remove("reactions");
            }
            "reaction" => {
                let emoji = change["emoji"].as_str().unwrap();
                let count = change["count"].as_i64().unwrap();
                let mut reactions = m["reactions"].as_object().cloned().unwrap_or_default();
                if count == 0 {
                    reactions.remove(emoji);
                } else {
                    reactions.insert(emoji.into(), json!(count));
                }
                if reactions.is_empty() {
                    m.as_object_mut().unwrap().remove("reactions");
                } else {
                    m["reactions"] = Value::Object(reactions);
                }
            }
            "moderation" => {
                if change["moderationStatus"] == "REJECTED" {
                    self.messages.remove(&target);
                }
            }
            other => panic!("unknown change kind {other}"),
        }
        // Quotes of the replies held follow their original (pushes carry them as of the send).
        let gone = kind == "delete" || change["moderationStatus"] == "REJECTED";
        if kind == "edit" || gone {
            for reply in self.messages.values_mut() {
                let quote = &mut reply["replyTo"];
                if quote["seq"] != target {
                    continue;
                }
                if gone {
                    quote.as_object_mut().unwrap().remove("excerpt");
                    quote["deleted"] = json!(true);
                } else {
                    let content = change["content"].as_str().unwrap();
                    quote["excerpt"] = json!(content.chars().take(100).collect::<String>());
                }
            }
        }
    }

    /// What history must agree with: per seq, content, deletion, version and reactions.
    fn state(&self) -> Vec<Value> {
        self.messages.values().map(state_of).collect()
    }
}

fn state_of(m: &Value) -> Value {
    json!({
        "seq": m["seq"],
        "content": m["content"],
        "deleted": m.get("deletedAt").is_some(),
        "version": m["version"].as_i64().unwrap_or(m["seq"].as_i64().unwrap()),
        "reactions": m.get("reactions").cloned().unwrap_or(json!({})),
        "replyTo": m.get("replyTo").cloned().unwrap_or(Value::Null),
    })
}

/// The room's whole history (newest 50) in the same form as [`Screen::state`].
async fn history_state(c: &mut Client, room: &str) -> Vec<Value> {
    let reply = c.history(room, None, Some(50)).await;
    assert_eq!(reply["type"], "result", "{reply}");
    reply["result"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(state_of)
        .collect()
}

/// Takes pushes of `room` into `screen` until it has seen `until` (its seq).
async fn watch(c: &mut Client, screen: &mut Screen, until: i64) {
    while screen.last < until {
        let push = c.next_push().await;
        screen.push(&push);
    }
}

async fn request_ok(c: &mut Client, frame: Value) -> Value {
    let reply = c.request(frame.clone()).await;
    assert_eq!(reply["type"], "result", "{frame} -> {reply}");
    reply["result"].clone()
}

async fn edit(c: &mut Client, room: &str, seq: i64, content: &str) -> Value {
    let key = uuid::Uuid::new_v4().to_string();
    request_ok(
        c,
        json!({"type": "edit", "room": room, "seq": seq, "content": content, "clientChangeId": key}),
    )
    .await
}

async fn react(c: &mut Client, room: &str, seq: i64, emoji: &str, on: bool) -> Value {
    let kind = if on { "react" } else { "unreact" };
    request_ok(
        c,
        json!({"type": kind, "room": room, "seq": seq, "emoji": emoji}),
    )
    .await
}

fn error_code(reply: &Value) -> &str {
    assert_eq!(reply["type"], "error", "{reply}");
    reply["error"]["code"].as_str().unwrap()
}

/// The room's head, as a join tells it.
async fn head(app: &TestApp, user: &str, room: &str) -> i64 {
    let mut c = app.client(user).await;
    let head = c.join(room, None).await["head"].as_i64().unwrap();
    c.close().await;
    head
}

/// Where a test's gateway keeps its data: the embedded SQLite store and in-process parts, or
/// Postgres and Redis.
#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    PostgresRedis,
}

/// A gateway on `backend`, with `configure` applied; `None` when Postgres or Redis cannot be
/// reached (the suite says it skipped; under `CI=true` it fails instead). The database lives as
/// long as the returned guard.
async fn gateway(
    backend: Backend,
    configure: impl FnOnce(&mut chat_gateway::config::Settings),
) -> Option<(TestApp, Option<common::ScratchDb>)> {
    match backend {
        Backend::Sqlite => Some((TestApp::spawn_with(configure).await, None)),
        Backend::PostgresRedis => {
            let db = scratch_database().await?;
            let url = redis_url().await?;
            let app = TestApp::spawn_on_postgres(&db.url, move |s| {
                s.redis.url = secrecy::SecretString::from(url);
                s.redis.key_prefix = unique_prefix();
                configure(s);
            })
            .await;
            Some((app, Some(db)))
        }
    }
}

/// A test run on both backends: `<name>::sqlite` and `<name>::postgres_and_redis`.
/// Room `r` with members alice and bob, each with a socket that has joined it.
async fn alice_and_bob_in_r(app: &TestApp) -> (Client, Client) {
    app.room("r", &["alice", "bob"]).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    alice.join("r", None).await;
    bob.join("r", None).await;
    (alice, bob)
}

macro_rules! on_both {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name(super::Backend::Sqlite).await
            }

            #[tokio::test]
            async fn postgres_and_redis() {
                super::$name(super::Backend::PostgresRedis).await
            }
        }
    };
}

on_both!(edits_deletions_reactions_and_replies_arrive_once_in_order_and_history_agrees);
async fn edits_deletions_reactions_and_replies_arrive_once_in_order_and_history_agrees(
    backend: Backend,
) {
    let Some((app, _db)) = gateway(backend, |_| {}).await else {
        return;
    };
    let (mut alice, mut bob) = alice_and_bob_in_r(&app).await;
    let mut screen = Screen::default();

    let first = alice.send_ok("r", "helo wrold").await;
    let one = first["seq"].as_i64().unwrap();
    let fixed = edit(&mut alice, "r", one, "hello world").await;
    assert_eq!(fixed["duplicate"], false);
    assert_eq!(fixed["change"]["seq"], one + 1);
    assert_eq!(fixed["message"]["content"], "hello world");
    assert_eq!(fixed["message"]["version"], one + 1);
    react(&mut bob, "r", one, "👍", true).await;
    react(&mut alice, "r", one, "👍", true).await;
    let tada = react(&mut bob, "r", one, "🎉", true).await;
    assert_eq!(tada["message"]["reactions"], json!({"👍": 2, "🎉": 1}));
    // Bob replies; then the original is edited again: history quotes its current state.
    let reply = request_ok(
        &mut bob,
        json!({"type": "send", "room": "r", "content": "agreed", "clientMsgId": "b1", "replyTo": one}),
    )
    .await;
    let reply_seq = reply["message"]["seq"].as_i64().unwrap();
    assert_eq!(reply["message"]["replyTo"]["excerpt"], "hello world");
    assert_eq!(reply["message"]["replyTo"]["senderId"], "alice");
    let again = edit(&mut alice, "r", one, "hello, world").await;
    let second = alice.send_ok("r", "oops").await;
    let two = second["seq"].as_i64().unwrap();
    let gone = request_ok(
        &mut alice,
        json!({"type": "delete", "room": "r", "seq": two}),
    )
    .await;
    assert_eq!(gone["message"]["content"], "");
    assert!(gone["message"]["deletedAt"].is_i64());
    let last = gone["change"]["seq"].as_i64().unwrap();
    assert_eq!(last, two + 1, "every change took the next seq");
    assert!(again["change"]["seq"].as_i64().unwrap() > reply_seq);

    watch(&mut bob, &mut screen, last).await;
    assert_eq!(screen.last, last);
    let history = history_state(&mut bob, "r").await;
    assert_eq!(
        screen.state(),
        history,
        "the pushes built what history shows"
    );
    let page = bob.history("r", None, None).await;
    let messages = page["result"]["messages"].as_array().unwrap();
    let quoted = messages.iter().find(|m| m["seq"] == reply_seq).unwrap();
    assert_eq!(
        quoted["replyTo"]["excerpt"], "hello, world",
        "a current quote"
    );
    assert_eq!(
        page["result"]["myReactions"],
        json!({ one.to_string(): ["👍", "🎉"] }),
        "bob's own reactions on the page"
    );
    let tombstone = messages.iter().find(|m| m["seq"] == two).unwrap();
    assert_eq!(tombstone["content"], "", "a tombstone, not a hole");

    // Deleting the original shows in the reply's quote.
    request_ok(
        &mut alice,
        json!({"type": "delete", "room": "r", "seq": one}),
    )
    .await;
    let page = bob.history("r", None, None).await;
    let quoted = page["result"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["seq"] == reply_seq)
        .unwrap()
        .clone();
    assert_eq!(quoted["replyTo"]["deleted"], true);
    assert!(quoted["replyTo"].get("excerpt").is_none());
}

on_both!(a_resume_replays_an_edit_a_delete_and_50_reaction_changes_exactly_once_in_order);
async fn a_resume_replays_an_edit_a_delete_and_50_reaction_changes_exactly_once_in_order(
    backend: Backend,
) {
    let Some((app, _db)) = gateway(backend, |_| {}).await else {
        return;
    };
    let users: Vec<String> = (0..25).map(|i| format!("u{i}")).collect();
    let mut members: Vec<&str> = users.iter().map(String::as_str).collect();
    members.extend(["alice", "bob"]);
    app.room("r", &members).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    // Alice stays joined: the room (and its memory of recent pushes) stays on the node.
    alice.join("r", None).await;
    bob.join("r", None).await;
    let mut screen = Screen::default();
    let kept = alice.send_ok("r", "keep me").await["seq"].as_i64().unwrap();
    let doomed = alice.send_ok("r", "delete me").await["seq"]
        .as_i64()
        .unwrap();
    watch(&mut bob, &mut screen, doomed).await;
    bob.close().await;

    // While bob is away: an edit, a delete, and 50 reaction changes (25 users react, then 25
    // of those reactions change: 13 removed, 12 switched to another emoji).
    edit(&mut alice, "r", kept, "kept, edited").await;
    request_ok(
        &mut alice,
        json!({"type": "delete", "room": "r", "seq": doomed}),
    )
    .await;
    let mut reactors = Vec::new();
    for user in &users {
        let mut c = app.client(user).await;
        react(&mut c, "r", kept, "👍", true).await;
        reactors.push(c);
    }
    for (i, c) in reactors.iter_mut().enumerate() {
        if i % 2 == 0 {
            react(c, "r", kept, "👍", false).await;
        } else {
            react(c, "r", kept, "🔥", true).await;
        }
    }
    let away = 2 + 25 + 25;

    let mut bob = app.client("bob").await;
    let joined = bob.join("r", Some(screen.last)).await;
    assert_eq!(joined["head"], screen.last + away, "{joined}");
    assert_eq!(joined["missed"], away, "changes are counted like messages");
    let until = screen.last + away;
    watch(&mut bob, &mut screen, until).await;
    bob.expect_silence(Duration::from_millis(200)).await;
    let history = history_state(&mut bob, "r").await;
    assert_eq!(screen.state(), history);
    assert_eq!(history[0]["reactions"], json!({"👍": 12, "🔥": 12}));
    assert_eq!(history[1]["deleted"], true);
    assert_eq!(
        app.metric(r#"chat_resumes_total{from="store"}"#).await,
        1.0,
        "52 > the 32 kept"
    );

    // A short absence is replayed from the room's memory: the same pushes.
    bob.close().await;
    react(&mut reactors[0], "r", kept, "👍", true).await;
    edit(&mut alice, "r", kept, "kept, edited twice").await;
    let mut bob = app.client("bob").await;
    let joined = bob.join("r", Some(screen.last)).await;
    assert_eq!(joined["missed"], 2);
    let until = screen.last + 2;
    watch(&mut bob, &mut screen, until).await;
    assert_eq!(screen.state(), history_state(&mut bob, "r").await);
    assert!(app.metric(r#"chat_resumes_total{from="memory"}"#).await >= 1.0);

    // Unread counts messages, not changes: 52 changes after bob's read position count for 0.
    let rooms = request_ok(&mut bob, json!({"type": "rooms"})).await;
    let room = &rooms["rooms"][0];
    assert_eq!(room["lastSeq"], screen.last);
    assert_eq!(
        room["unread"], 2,
        "the two messages, none of the changes: {room}"
    );
    assert_eq!(
        room["lastMessage"]["seq"], doomed,
        "the newest message, a tombstone"
    );
}

on_both!(a_room_whose_last_message_is_a_reply_lists_it_with_its_quote);
async fn a_room_whose_last_message_is_a_reply_lists_it_with_its_quote(backend: Backend) {
    let Some((app, _db)) = gateway(backend, |_| {}).await else {
        return;
    };
    let (mut alice, mut bob) = alice_and_bob_in_r(&app).await;
    let one = alice.send_ok("r", "lunch at noon?").await["seq"]
        .as_i64()
        .unwrap();
    let reply = request_ok(
        &mut bob,
        json!({"type": "send", "room": "r", "content": "yes", "clientMsgId": "b1", "replyTo": one}),
    )
    .await;
    let rooms = request_ok(&mut alice, json!({"type": "rooms"})).await;
    let last = &rooms["rooms"][0]["lastMessage"];
    assert_eq!(
        last["seq"], reply["message"]["seq"],
        "the reply is the newest"
    );
    assert_eq!(
        last["replyTo"], reply["message"]["replyTo"],
        "the room list quotes what the reply quotes, as history does: {last}"
    );
    assert_eq!(last["replyTo"]["excerpt"], "lunch at noon?");
    // The quote follows its original, as history's does.
    edit(&mut alice, "r", one, "lunch at one?").await;
    let rooms = request_ok(&mut alice, json!({"type": "rooms"})).await;
    assert_eq!(
        rooms["rooms"][0]["lastMessage"]["replyTo"]["excerpt"],
        "lunch at one?"
    );
}

on_both!(bad_changes_get_their_codes_and_change_nothing);
async fn bad_changes_get_their_codes_and_change_nothing(backend: Backend) {
    let Some((app, _db)) = gateway(backend, |s| {
        s.limits.max_reaction_keys = 2;
        s.limits.edit_window_secs = 1;
    })
    .await
    else {
        return;
    };
    app.room("r", &["alice", "bob"]).await;
    app.room("other", &["alice"]).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    let m = alice.send_ok("r", "mine").await["seq"].as_i64().unwrap();
    let elsewhere = alice.send_ok("other", "elsewhere").await["seq"]
        .as_i64()
        .unwrap();
    react(&mut bob, "r", m, "👍", true).await;
    react(&mut bob, "r", m, "🎉", true).await;
    let before = head(&app, "alice", "r").await;
    let edit_frame = |seq: i64, content: &str| json!({"type": "edit", "room": "r", "seq": seq, "content": content, "clientChangeId": uuid::Uuid::new_v4().to_string()});
    let long = "x".repeat(2001);
    let cases = [
        ("bob", edit_frame(m, "not yours"), "forbidden"),
        (
            "bob",
            json!({"type": "delete", "room": "r", "seq": m}),
            "forbidden",
        ),
        (
            "alice",
            edit_frame(m + 100, "nothing there"),
            "message_not_found",
        ),
        (
            "alice",
            edit_frame(m + 1, "a change's seq"),
            "message_not_found",
        ),
        (
            "alice",
            json!({"type": "edit", "room": "other", "seq": m + 50, "content": "x", "clientChangeId": "k"}),
            "message_not_found",
        ),
        ("alice", edit_frame(m, "   "), "content_empty"),
        ("alice", edit_frame(m, &long), "content_too_long"),
        (
            "alice",
            json!({"type": "react", "room": "r", "seq": m, "emoji": "+1"}),
            "unknown_reaction",
        ),
        (
            "alice",
            json!({"type": "react", "room": "r", "seq": m, "emoji": "🔥"}),
            "too_many_reactions",
        ),
        (
            "alice",
            json!({"type": "send", "room": "r", "content": "re", "clientMsgId": "c9", "replyTo": m + 100}),
            "message_not_found",
        ),
        (
            "bob",
            json!({"type": "react", "room": "other", "seq": elsewhere, "emoji": "👍"}),
            "forbidden",
        ),
        (
            "alice",
            json!({"type": "edit", "room": "r", "seq": m, "content": "no key"}),
            "bad_request",
        ),
    ];
    for (who, frame, code) in cases {
        let client = if who == "bob" { &mut bob } else { &mut alice };
        let reply = client.request(frame.clone()).await;
        assert_eq!(error_code(&reply), code, "{frame}");
    }
    assert_eq!(head(&app, "alice", "r").await, before, "no seq was spent");

    // Repeats store nothing: the same reaction, an edit to the same content.
    let again = react(&mut bob, "r", m, "👍", true).await;
    assert_eq!(
        (again["duplicate"].clone(), again["change"].clone()),
        (json!(true), Value::Null)
    );
    let same = edit(&mut alice, "r", m, "mine").await;
    assert_eq!(same["duplicate"], true);
    // A retried edit (same clientChangeId) answers with the change stored the first time.
    let frame =
        json!({"type": "edit", "room": "r", "seq": m, "content": "once", "clientChangeId": "k1"});
    let first = request_ok(&mut alice, frame.clone()).await;
    let retry = request_ok(&mut alice, frame).await;
    assert_eq!(retry["duplicate"], true);
    assert_eq!(retry["change"], first["change"]);
    assert_eq!(head(&app, "alice", "r").await, before + 1);

    // Deleted: no edit, no reaction, no reply; deleting again stores nothing.
    request_ok(&mut alice, json!({"type": "delete", "room": "r", "seq": m})).await;
    let twice = request_ok(&mut alice, json!({"type": "delete", "room": "r", "seq": m})).await;
    assert_eq!(twice["duplicate"], true);
    for frame in [
        edit_frame(m, "back"),
        json!({"type": "react", "room": "r", "seq": m, "emoji": "👍"}),
        json!({"type": "send", "room": "r", "content": "re", "clientMsgId": "c10", "replyTo": m}),
    ] {
        let reply = alice.request(frame.clone()).await;
        assert_eq!(error_code(&reply), "message_deleted", "{frame}");
    }

    // A reply stored before its original was deleted: its retry is answered with it.
    let original = alice.send_ok("r", "original").await["seq"]
        .as_i64()
        .unwrap();
    let frame = json!({"type": "send", "room": "r", "content": "re", "clientMsgId": "c11", "replyTo": original});
    let first = request_ok(&mut bob, frame.clone()).await;
    request_ok(
        &mut alice,
        json!({"type": "delete", "room": "r", "seq": original}),
    )
    .await;
    let retry = request_ok(&mut bob, frame).await;
    assert_eq!(retry["duplicate"], true);
    assert_eq!(retry["message"]["seq"], first["message"]["seq"]);
    assert_eq!(retry["message"]["replyTo"]["deleted"], true, "{retry}");

    // ADMIN deletes anyone's message on the socket; SERVICE over REST, without membership.
    let claims = chat_gateway::auth::claims_for("root", None, chat_gateway::auth::Role::Admin, 600);
    let mut admin = Client::connect(app.addr, None).await;
    request_ok(
        &mut admin,
        json!({"type": "auth", "token": app.token_with(&claims)}),
    )
    .await;
    let bobs = bob.send_ok("r", "bob's").await;
    let removed = request_ok(
        &mut admin,
        json!({"type": "delete", "room": "r", "seq": bobs["seq"]}),
    )
    .await;
    assert_eq!(removed["change"]["by"], "root");
    let alices = alice.send_ok("r", "alice's").await;
    let r = app
        .http
        .delete(app.url(&format!(
            "/api/chat/rooms/r/messages/{}",
            alices["id"].as_str().unwrap()
        )))
        .bearer_auth(app.service_token())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A message id the store cannot hold is not one of its messages (not a server error).
    let r = app
        .http
        .delete(app.url("/api/chat/rooms/r/messages/a%00b"))
        .bearer_auth(app.token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // The edit window (1 s here).
    let fresh = alice.send_ok("r", "quick").await["seq"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let late = alice.request(edit_frame(fresh, "too late")).await;
    assert_eq!(error_code(&late), "edit_window_closed");
}

on_both!(reactions_have_a_rate_limit_of_their_own);
async fn reactions_have_a_rate_limit_of_their_own(backend: Backend) {
    let Some((app, _db)) = gateway(backend, |s| {
        s.rate_limit.enabled = true;
        s.rate_limit.user_per_second = 100;
        s.rate_limit.user_burst = 100;
        s.rate_limit.room_per_second = 100;
        s.rate_limit.room_burst = 100;
        s.rate_limit.reaction_per_second = 1;
        s.rate_limit.reaction_burst = 3;
    })
    .await
    else {
        return;
    };
    app.room("r", &["alice", "bob"]).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    let m = alice.send_ok("r", "react").await["seq"].as_i64().unwrap();
    for emoji in ["👍", "🎉", "🔥"] {
        react(&mut bob, "r", m, emoji, true).await;
    }
    let refused = bob
        .request(json!({"type": "react", "room": "r", "seq": m, "emoji": "👀"}))
        .await;
    assert_eq!(error_code(&refused), "rate_limited");
    let wait = refused["error"]["retryAfterMs"].as_u64().unwrap();
    assert!((1..=1000).contains(&wait), "{refused}");
    assert_eq!(
        app.metric(r#"chat_rate_limited_total{scope="reaction"}"#)
            .await,
        1.0
    );
    // Another user's reactions, and the sender's messages, are not limited by it.
    react(&mut alice, "r", m, "👀", true).await;
    alice.send_ok("r", "still sending").await;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    react(&mut bob, "r", m, "👀", true).await;
}

on_both!(concurrent_edits_from_two_sockets_end_in_the_last_version_everywhere);
async fn concurrent_edits_from_two_sockets_end_in_the_last_version_everywhere(backend: Backend) {
    let Some((app, _db)) = gateway(backend, |_| {}).await else {
        return;
    };
    app.room("r", &["alice", "bob"]).await;
    let mut a1 = app.client("alice").await;
    let mut a2 = app.client("alice").await;
    let mut bob = app.client("bob").await;
    bob.join("r", None).await;
    let mut screen = Screen::default();
    let m = a1.send_ok("r", "draft").await["seq"].as_i64().unwrap();
    let rounds = 20;
    let (r1, r2) = tokio::join!(
        async {
            let mut seqs = Vec::new();
            for i in 0..rounds {
                seqs.push(edit(&mut a1, "r", m, &format!("one {i}")).await);
            }
            seqs
        },
        async {
            let mut seqs = Vec::new();
            for i in 0..rounds {
                seqs.push(edit(&mut a2, "r", m, &format!("two {i}")).await);
            }
            seqs
        }
    );
    let mut changes: Vec<(i64, String)> = r1
        .iter()
        .chain(&r2)
        .map(|r| {
            (
                r["change"]["seq"].as_i64().unwrap(),
                r["change"]["content"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    changes.sort();
    let all: Vec<i64> = changes.iter().map(|c| c.0).collect();
    assert_eq!(
        all,
        (m + 1..=m + 2 * rounds).collect::<Vec<_>>(),
        "every edit stored, in order"
    );
    let (last_seq, last_content) = changes.last().unwrap().clone();
    watch(&mut bob, &mut screen, last_seq).await;
    let history = history_state(&mut bob, "r").await;
    assert_eq!(screen.state(), history);
    assert_eq!(history[0]["content"], last_content.as_str());
    assert_eq!(history[0]["version"], last_seq);

    // One edit sent from both sockets at once with one key (a retry racing its first attempt):
    // stored once, both answered with that change.
    for round in 0..5 {
        let frame = json!({"type": "edit", "room": "r", "seq": m, "content": format!("raced {round}"),
                           "clientChangeId": format!("same-{round}")});
        let (one, two) = tokio::join!(
            request_ok(&mut a1, frame.clone()),
            request_ok(&mut a2, frame)
        );
        assert_eq!(one["change"], two["change"], "{one} {two}");
        let fresh = [&one, &two]
            .iter()
            .filter(|r| r["duplicate"] == false)
            .count();
        assert_eq!(fresh, 1, "{one} {two}");
    }
}

on_both!(two_hundred_users_reacting_at_once_make_one_right_count);
async fn two_hundred_users_reacting_at_once_make_one_right_count(backend: Backend) {
    let Some((app, _db)) = gateway(backend, |_| {}).await else {
        return;
    };
    storm(&app).await;
}

/// 200 users react to one message at once over REST; a watcher's screen, history and the REST
/// answer agree on 200.
async fn storm(app: &TestApp) {
    let users: Vec<String> = (0..200).map(|i| format!("s{i}")).collect();
    let mut members: Vec<&str> = users.iter().map(String::as_str).collect();
    members.push("alice");
    app.room("storm", &members).await;
    let mut alice = app.client("alice").await;
    alice.join("storm", None).await;
    let mut screen = Screen::default();
    let sent = alice.send_ok("storm", "react to me").await;
    let (seq, id) = (
        sent["seq"].as_i64().unwrap(),
        sent["id"].as_str().unwrap().to_string(),
    );
    watch(&mut alice, &mut screen, seq).await;
    let reactions = users.iter().map(|user| {
        let url = app.url(&format!(
            "/api/chat/rooms/storm/messages/{id}/reactions/%F0%9F%91%8D"
        ));
        let request = app.http.put(url).bearer_auth(app.token(user)).send();
        async move {
            let r = request.await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    });
    let answers = futures::future::join_all(reactions).await;
    let mut counts: Vec<i64> = answers
        .iter()
        .map(|a| a["change"]["count"].as_i64().unwrap())
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        (1..=200).collect::<Vec<_>>(),
        "each reaction counted once"
    );
    watch(&mut alice, &mut screen, seq + 200).await;
    assert_eq!(screen.messages[&seq]["reactions"], json!({"👍": 200}));
    assert_eq!(screen.state(), history_state(&mut alice, "storm").await);
}

on_both!(history_never_serves_a_stale_version_after_the_ack);
async fn history_never_serves_a_stale_version_after_the_ack(backend: Backend) {
    let Some((app, _db)) = gateway(backend, |_| {}).await else {
        return;
    };
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    for i in 0..60 {
        alice.send_ok("r", &format!("m{i}")).await;
    }
    let old = 5;
    // Warm the latest page and an older page, then change messages in both and read at once.
    let older = alice.history("r", Some(old + 3), Some(3)).await;
    assert_eq!(
        seqs(older["result"]["messages"].as_array().unwrap()),
        [5, 6, 7]
    );
    for round in 0..10 {
        let recent = 58;
        let content = format!("edited {round}");
        edit(&mut alice, "r", recent, &content).await;
        let latest = alice.history("r", None, Some(5)).await;
        let m = latest["result"]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["seq"] == recent)
            .cloned()
            .unwrap();
        assert_eq!(m["content"], content.as_str(), "latest page after the ack");
        edit(&mut alice, "r", old, &content).await;
        let older = alice.history("r", Some(old + 3), Some(3)).await;
        assert_eq!(
            older["result"]["messages"][0]["content"],
            content.as_str(),
            "older page after the ack"
        );
    }
}

on_both!(rest_routes_edit_delete_react_and_moderation_removes_a_message_live);
async fn rest_routes_edit_delete_react_and_moderation_removes_a_message_live(backend: Backend) {
    let Some((app, _db)) = gateway(backend, |_| {}).await else {
        return;
    };
    app.room("r", &["alice", "bob"]).await;
    let mut bob = app.client("bob").await;
    bob.join("r", None).await;
    let mut screen = Screen::default();
    let (status, sent) = app.rest_send("alice", "r", "via rest", Some("k")).await;
    assert_eq!(status, 201);
    let id = sent["message"]["id"].as_str().unwrap().to_string();
    let seq = sent["message"]["seq"].as_i64().unwrap();
    // A message that never changed keeps the replaced app's shape exactly.
    let keys: Vec<&str> = sent["message"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys.len(), 13, "{keys:?}");
    let url = |path: &str| app.url(&format!("/api/chat/rooms/r/messages/{id}{path}"));

    let r = app
        .http
        .patch(url(""))
        .bearer_auth(app.token("alice"))
        .json(&json!({"content": "via rest, edited"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let edited: Value = r.json().await.unwrap();
    assert_eq!(edited["message"]["content"], "via rest, edited");
    assert!(
        edited["message"]["editedAt"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    let r = app
        .http
        .put(url("/reactions/%E2%9D%A4%EF%B8%8F"))
        .bearer_auth(app.token("bob"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .http
        .patch(url(""))
        .bearer_auth(app.token("bob"))
        .json(&json!({"content": "hijack"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = app
        .http
        .patch(app.url("/api/chat/rooms/r/messages/no-such-id"))
        .bearer_auth(app.token("alice"))
        .json(&json!({"content": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "message_not_found");

    // Moderation is the management API's: a user gets 403, a service removes it live.
    let moderate = |token: String| {
        app.http
            .put(url("/moderation"))
            .bearer_auth(token)
            .json(&json!({"moderationStatus": "REJECTED"}))
            .send()
    };
    assert_eq!(moderate(app.token("alice")).await.unwrap().status(), 403);
    let r = moderate(app.service_token()).await.unwrap();
    assert_eq!(r.status(), 200);
    let moderated: Value = r.json().await.unwrap();
    let last = moderated["change"]["seq"].as_i64().unwrap();
    assert_eq!(last, seq + 3);
    watch(&mut bob, &mut screen, last).await;
    assert!(
        screen.messages.is_empty(),
        "removed from the screen: {screen:?}"
    );
    let (_, history) = app.rest_history("bob", "r", "").await;
    assert_eq!(history["messages"], json!([]), "and from history");
}

/// Two gateways on one Postgres and one Redis: changes made on both reach both, in order, and
/// both screens end in the state history shows on either node.
#[tokio::test]
async fn two_nodes_on_postgres_and_redis_end_in_the_same_state() {
    let Some(db) = scratch_database().await else {
        return;
    };
    let Some(url) = redis_url().await else {
        return;
    };
    let prefix = unique_prefix();
    let node = || {
        let (url, prefix) = (url.clone(), prefix.clone());
        TestApp::spawn_on_postgres(&db.url, move |s| {
            s.redis.url = secrecy::SecretString::from(url);
            s.redis.key_prefix = prefix;
        })
    };
    let a = node().await;
    let b = node().await;
    a.room("r", &["alice", "bob"]).await;
    let mut alice = a.client("alice").await;
    let mut bob = b.client("bob").await;
    alice.join("r", None).await;
    bob.join("r", None).await;
    let (mut on_a, mut on_b) = (Screen::default(), Screen::default());
    let m = alice.send_ok("r", "cross").await["seq"].as_i64().unwrap();
    let n = bob.send_ok("r", "node").await["seq"].as_i64().unwrap();
    for round in 0..10 {
        edit(&mut alice, "r", m, &format!("cross {round}")).await;
        react(&mut bob, "r", m, "👍", round % 2 == 0).await;
        react(&mut alice, "r", n, "🎉", round % 2 == 0).await;
        // History on the other node right after the ack shows the edit.
        let page = bob.history("r", None, None).await;
        let shown = page["result"]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["seq"] == m)
            .cloned()
            .unwrap();
        assert_eq!(
            shown["content"],
            format!("cross {round}"),
            "node b after the ack"
        );
    }
    let last = request_ok(&mut bob, json!({"type": "delete", "room": "r", "seq": n})).await["change"]
        ["seq"]
        .as_i64()
        .unwrap();
    watch(&mut alice, &mut on_a, last).await;
    watch(&mut bob, &mut on_b, last).await;
    assert_eq!(on_a.state(), on_b.state());
    assert_eq!(on_a.state(), history_state(&mut alice, "r").await);
    assert_eq!(on_b.state(), history_state(&mut bob, "r").await);
    assert_eq!(on_a.state()[0]["reactions"], json!({}));
}

/// A change committed by a node that died before publishing it (only the store knows it): the
/// room's nodes find it by comparing their rooms with the store's heads, and deliver it in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_event_was_lost_still_reaches_every_node() {
    use chat_gateway::store::changes::ChangeOp;
    use chat_gateway::store::sqlite::SqliteStore;
    use chat_gateway::store::{ChangeRequest, Store, Target};
    let Some(url) = redis_url().await else {
        return;
    };
    let prefix = unique_prefix();
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let settings = common::redis_settings(&url, &prefix);
        let data = common::DataDir::Borrowed(dir.path().to_path_buf());
        nodes.push(TestApp::start(settings, data).await);
    }
    nodes[0].room("r", &["alice", "bob"]).await;
    let mut bob = nodes[1].client("bob").await;
    bob.join("r", None).await;
    let mut screen = Screen::default();
    let mut alice = nodes[0].client("alice").await;
    let m = alice.send_ok("r", "before").await["seq"].as_i64().unwrap();
    watch(&mut bob, &mut screen, m).await;

    let store = SqliteStore::open(&dir.path().join("chat.db"), 1)
        .await
        .unwrap();
    let changed = store
        .change_message(ChangeRequest {
            room_id: "r".into(),
            target: Target::Seq(m),
            actor: "alice".into(),
            op: ChangeOp::Edit {
                content: "after".into(),
                client_change_id: None,
                window: None,
            },
            at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    store.close().await;
    let seq = changed.change.unwrap().seq;
    // Nobody sends anything after it: the head check (every 2 s) reveals it.
    let started = std::time::Instant::now();
    watch(&mut bob, &mut screen, seq).await;
    let took = started.elapsed();
    common::say(&format!(
        "a lost change reached the other node after {took:?}"
    ));
    assert!(
        took < Duration::from_secs(4),
        "head check (2 s) + gap fill (0.25 s), with room for a busy machine: {took:?}"
    );
    assert_eq!(screen.messages[&m]["content"], "after");
    bob.expect_silence(Duration::from_millis(300)).await;
}

/// The SQLite store's group commit of changes: 240 changes at once (reactions added, then some
/// taken back, one message deleted while it is reacted to, edits), written in batches of one
/// transaction each. Every change is stored once under its own seq or refused with its reason,
/// and every message's counts, rows and version agree afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_writes_concurrent_changes_in_batches_that_add_up() {
    use chat_gateway::store::changes::ChangeOp;
    use chat_gateway::store::sqlite::SqliteStore;
    use chat_gateway::store::{
        ChangeRequest, NewMessage, Refusal, Store, StoreError, StoreMetrics, Target,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.db");
    let store = std::sync::Arc::new(SqliteStore::open(&path, 1).await.unwrap());
    store.migrate().await.unwrap();
    store.ensure_room("r", "r").await.unwrap();
    for i in 1..=4 {
        store
            .insert_message(NewMessage {
                id: format!("m{i}"),
                room_id: "r".into(),
                sender_id: "alice".into(),
                sender_name: None,
                sender_avatar_url: None,
                content: format!("message {i}"),
                created_at: chrono::Utc::now(),
                client_msg_id: None,
                reply: None,
            })
            .await
            .unwrap();
    }
    let change = |target: i64, actor: String, op: ChangeOp| ChangeRequest {
        room_id: "r".into(),
        target: Target::Seq(target),
        actor,
        op,
        at: chrono::Utc::now(),
    };
    let react = |target: i64, user: usize, adding: bool| {
        let emoji = ["👍", "🎉", "🔥"][user % 3].to_string();
        let op = if adding {
            ChangeOp::React {
                emoji,
                max_keys: 20,
            }
        } else {
            ChangeOp::Unreact { emoji }
        };
        change(target, format!("u{user}"), op)
    };
    let run = |reqs: Vec<ChangeRequest>| {
        let tasks: Vec<_> = reqs
            .into_iter()
            .map(|req| {
                let store = store.clone();
                tokio::spawn(async move { store.change_message(req).await })
            })
            .collect();
        async move {
            let mut outcomes = Vec::new();
            for task in tasks {
                outcomes.push(task.await.unwrap());
            }
            outcomes
        }
    };
    // 120 users react to messages 1-3; then 60 of them take it back, 40 react to message 3 while
    // alice deletes it, and alice edits message 4 twenty times.
    let first = run((0..120)
        .map(|u| react(1 + (u % 3) as i64, u, true))
        .collect())
    .await;
    let mut stored = 0;
    for outcome in &first {
        let changed = outcome.as_ref().expect("every first reaction is stored");
        assert!(changed.change.is_some());
        stored += 1;
    }
    let mut second: Vec<ChangeRequest> = (0..60)
        .map(|u| react(1 + (u % 3) as i64, u, false))
        .collect();
    second.extend((200..240).map(|u| react(3, u, true)));
    second.push(change(3, "alice".into(), ChangeOp::Delete { any: false }));
    second.extend((0..20).map(|i| {
        change(
            4,
            "alice".into(),
            ChangeOp::Edit {
                content: format!("edit {i}"),
                client_change_id: Some(format!("e{i}")),
                window: None,
            },
        )
    }));
    let mut refused = 0;
    for outcome in run(second).await {
        match outcome {
            Ok(changed) if changed.change.is_some() => stored += 1,
            // Taking back a reaction to the deleted message (it has none left).
            Ok(changed) => assert!(
                changed.message.seq == 3 && changed.message.deleted_at.is_some(),
                "only a reaction taken back after the deletion changes nothing"
            ),
            // A reaction that came after the deletion.
            Err(StoreError::Refused(Refusal::Deleted)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", path.display()))
        .await
        .unwrap();
    let rows: Vec<(i64, String, i64)> = sqlx::query_as(common::REACTION_ROWS_SQL)
        .fetch_all(&pool)
        .await
        .unwrap();
    let last: Vec<(i64, i64)> = sqlx::query_as(common::LAST_CHANGES_SQL)
        .fetch_all(&pool)
        .await
        .unwrap();
    let head =
        common::assert_changes_add_up(store.as_ref(), "r", &[1, 2, 3, 4], &rows, &last).await;
    assert_eq!(head, 4 + stored);
    assert!(
        rows.iter().all(|r| r.0 != 3),
        "the deleted message has no reaction rows"
    );
    let Some(StoreMetrics::Sqlite(counted)) = store.metrics() else {
        panic!("the SQLite store counts its batches");
    };
    let batches = common::observations(&counted.change_batch_size);
    common::say(&format!(
        "sqlite change batches: {stored} changes stored and {refused} refused in {batches} batches"
    ));
    assert!(
        batches < 241.0,
        "{batches} batches for 241 concurrent changes"
    );
    store.close().await;
}
