//! The gateway as operators run it: restart on the same data, graceful drain, heartbeats,
//! health/readiness/metrics, configuration errors, the binary's subcommands.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Client, DataDir, TestApp, WAIT, seqs, test_settings};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_the_same_sqlite_file_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let mut app = TestApp::start(test_settings(), DataDir::Borrowed(path.clone())).await;
    app.room("r", &["alice", "bob"]).await;
    let mut alice = app.client("alice").await;
    let mut acked = Vec::new();
    for i in 1..=20 {
        acked.push(alice.send_ok("r", &format!("persisted {i}")).await["id"].clone());
    }
    app.stop().await.unwrap();

    let app = TestApp::start(test_settings(), DataDir::Borrowed(path)).await;
    let (status, page) = app.rest_history("alice", "r", "?limit=50").await;
    assert_eq!(status, 200);
    let messages = page["messages"].as_array().unwrap();
    assert_eq!(seqs(messages), (1..=20).collect::<Vec<_>>());
    let ids: Vec<_> = messages.iter().map(|m| m["id"].clone()).collect();
    assert_eq!(ids, acked);
    // The sequence continues, and a resume across the restart replays from the store.
    let mut bob = app.client("bob").await;
    let joined = bob.join("r", Some(15)).await;
    assert_eq!(
        (joined["head"].as_i64(), joined["missed"].as_i64()),
        (Some(20), Some(5))
    );
    for seq in 16..=20 {
        assert_eq!(bob.expect_message("r").await["seq"], seq);
    }
    let mut alice = app.client("alice").await;
    assert_eq!(alice.send_ok("r", "after restart").await["seq"], 21);
    assert_eq!(bob.expect_message("r").await["seq"], 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_sockets_to_reconnect_with_1012_and_finishes() {
    let mut app = TestApp::spawn().await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    alice.join("r", None).await;
    alice.send_ok("r", "before shutdown").await;
    assert_eq!(alice.expect_message("r").await["seq"], 1);
    let started = Instant::now();
    app.stop().await.expect("run returns Ok after draining");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drained promptly"
    );
    let (ended, _) = alice.ended().await;
    assert_eq!(
        ended,
        common::Ended::Close(1012, "server shutting down; reconnect and resume".into())
    );
    // The listener is gone.
    assert!(
        tokio_tungstenite::connect_async(format!("ws://{}/ws", app.addr))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_socket_is_reaped_within_two_heartbeat_intervals() {
    let app = TestApp::spawn_with(|s| s.heartbeat.interval_ms = 300).await;
    // This client answers pings only while it reads; it stops reading after authenticating.
    let mut silent = app.client("silent").await;
    let mut alive = app.client("alive").await;
    let since = Instant::now();
    let deadline = since + Duration::from_secs(3);
    loop {
        if app
            .metric("chat_closes_total{reason=\"heartbeat_timeout\"}")
            .await
            == 1.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "not reaped");
        // The live client keeps reading, so it answers pings and survives.
        let _ = tokio::time::timeout(Duration::from_millis(50), alive.ws_next()).await;
    }
    let reaped_after = since.elapsed();
    assert!(
        reaped_after <= Duration::from_millis(2 * 300 + 250),
        "reaped after {reaped_after:?}"
    );
    assert_eq!(silent.expect_close().await, 4000);
    assert_eq!(
        alive.request(json!({"type": "ping"})).await["type"],
        "result",
        "the reading client lives"
    );
    assert_eq!(app.metric("chat_connections").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_answer() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    alice.join("r", None).await;
    alice.send_ok("r", "counted").await;
    alice.expect_message("r").await;
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready: serde_json::Value = app
        .http
        .get(app.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["ready"], true);
    assert_eq!(app.metric("chat_connections").await, 1.0);
    assert_eq!(app.metric("chat_connections_opened_total").await, 1.0);
    assert_eq!(app.metric("chat_rooms_active").await, 1.0);
    assert_eq!(
        app.metric("chat_messages_received_total{door=\"ws\"}")
            .await,
        1.0
    );
    assert_eq!(app.metric("chat_messages_delivered_total").await, 1.0);
    assert_eq!(app.metric("chat_send_duration_seconds_count").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_answers_503_before_upgrading() {
    let app = TestApp::spawn_with(|s| s.server.max_connections = 1).await;
    let _only = app.client("alice").await;
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/ws", app.addr)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!("expected HTTP 503, got {other:?}"),
    }
}

/// A burst of connections beyond `server.accept_rate` waits its turn: every one is served, none
/// refused, at the configured pace, while a socket that was already connected keeps its answers
/// quick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_accept_rate_wait_their_turn_and_none_is_refused() {
    const RATE: u32 = 20;
    const BURST: u32 = 2;
    const ARRIVING: usize = 12;
    let app = TestApp::spawn_with(|s| {
        s.server.accept_rate = RATE;
        s.server.accept_burst = BURST;
        // One turn of churn at a time: upgrades, joins and cleanups still all get theirs.
        s.server.churn_concurrency = 1;
    })
    .await;
    let users: Vec<String> = (0..ARRIVING).map(|i| format!("u{i}")).collect();
    let mut members: Vec<&str> = users.iter().map(String::as_str).collect();
    members.push("steady");
    app.room("r", &members).await;
    let mut steady = app.client("steady").await;
    steady.join("r", None).await;
    // The bucket is full again before the burst arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let arriving: Vec<_> = users
        .iter()
        .map(|user| {
            let (addr, token) = (app.addr, app.token(user));
            tokio::spawn(async move {
                let mut c = Client::connect(addr, Some(&format!("token={token}"))).await;
                c.join("r", None).await;
                (started.elapsed(), c)
            })
        })
        .collect();
    // Meanwhile the connected socket is served as usual: its sends answered and delivered.
    let mut answers = Vec::new();
    while !arriving.iter().all(|h| h.is_finished()) {
        let asked = Instant::now();
        steady.send_ok("r", "still here").await;
        steady.expect_message("r").await;
        answers.push(asked.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut last = Duration::ZERO;
    let mut arrived = Vec::new();
    for h in arriving {
        let (took, client) = h.await.expect("every connection is served and joins");
        last = last.max(took);
        arrived.push(client);
    }
    // 12 connections, 2 at once and then 20 a second: the last waits about 0.5 s.
    let paced = Duration::from_secs_f64((ARRIVING as u32 - BURST) as f64 / RATE as f64);
    assert!(
        last >= paced.mul_f64(0.8),
        "accepted faster than the pace: the last after {last:?}, expected about {paced:?}"
    );
    // Not queued behind the arrivals: typically answered at once, and never as late as the last
    // arrival waited (a single slow commit of the store file may still take a few hundred ms).
    answers.sort();
    let (typical, slowest) = (answers[answers.len() / 2], answers[answers.len() - 1]);
    assert!(
        typical < Duration::from_millis(100) && slowest < last,
        "the connected socket's answers took {typical:?} (median) and {slowest:?} (slowest) while \
         the last arrival waited {last:?}"
    );
    assert!(app.metric("chat_connections_paced_total").await >= 1.0);
    // Every wait ends. (Read at an instant, the gauge may count a connection of this test's own
    // HTTP client that is waiting for its turn at the pace right then, so it is read until 0.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.metric("chat_connections_waiting").await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "connections still waiting for their turn 5 s after the burst"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.metric("chat_connections").await,
        ARRIVING as f64 + 1.0,
        "every connection is open"
    );
}

/// The nice values of this process's threads named `name`.
#[cfg(target_os = "linux")]
fn nice_of_threads(name: &str) -> Vec<i64> {
    let mut nices = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        if comm.trim() != name {
            continue;
        }
        // After "pid (comm) ": state is field 3 of proc(5), nice field 19.
        let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
        nices.push(fields[19 - 3].parse().unwrap());
    }
    nices
}

/// Connection churn runs on a thread of its own, at `server.churn_nice` when set, and the sockets
/// it upgrades are served as usual.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_churn_runs_on_a_thread_of_its_own_at_the_configured_priority() {
    let app = TestApp::spawn_with(|s| s.server.churn_nice = 7).await;
    app.room("r", &["alice"]).await;
    let mut alice = app.client("alice").await;
    alice.join("r", None).await;
    assert_eq!(alice.send_ok("r", "upgraded on the lane").await["seq"], 1);
    assert_eq!(alice.expect_message("r").await["seq"], 1);
    // Other tests' gateways in this process have lanes too, at the default (0).
    let lanes = nice_of_threads("churn");
    assert!(lanes.contains(&7), "churn threads' nice: {lanes:?}");
    assert!(
        lanes.iter().all(|n| *n == 7 || *n == 0),
        "churn threads' nice: {lanes:?}"
    );
    let own = nice_of_threads("tokio-rt-worker");
    assert!(
        own.iter().all(|n| *n == 0),
        "the test's runtime keeps the default priority: {own:?}"
    );
}

fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chat-gateway"));
    for var in [
        "DATABASE_URL",
        "REDIS_URL",
        "JWT_SECRET",
        "JWT_PUBLIC_KEY_FILE",
        "BIND_ADDR",
        "CHAT_GATEWAY_CONFIG",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

#[test]
fn invalid_configuration_stops_start_up_with_one_line_naming_the_key() {
    for (var, value, key) in [
        (
            "CHAT_GATEWAY__LIMITS__OUTBOUND_QUEUE",
            "1",
            "limits.outbound_queue",
        ),
        (
            "CHAT_GATEWAY__SERVER__MAX_CONNECTIONS",
            "lots",
            "server.max_connections",
        ),
        ("BIND_ADDR", "not-an-address", "server.bind_addr"),
        (
            "CHAT_GATEWAY__SERVER__LISTEN_BACKLOG",
            "0",
            "server.listen_backlog",
        ),
        (
            "CHAT_GATEWAY__SERVER__CHURN_NICE",
            "20",
            "server.churn_nice",
        ),
        ("JWT_SECRET", "short", "auth.jwt_secret"),
        (
            "CHAT_GATEWAY__SERVER__ALLOWED_ORIGINS",
            "https://app.example.com,https://app.example.com/chat",
            "server.allowed_origins",
        ),
    ] {
        let out = binary().env(var, value).arg("serve").output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(key), "{var}: {stderr} should name {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_subcommand_mints_tokens_the_server_accepts() {
    let app = TestApp::spawn().await;
    let out = binary()
        .env("JWT_SECRET", common::SECRET)
        .args(["token", "--user", "cli-user", "--name", "From CLI"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut c = Client::connect(app.addr, None).await;
    let reply = c.request(json!({"type": "auth", "token": token})).await;
    assert_eq!(reply["result"]["userId"], "cli-user");

    let out = binary()
        .env("JWT_SECRET", common::SECRET)
        .args(["token", "--user", "load", "--count", "3"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let users: Vec<_> = text.lines().map(|l| l.split_once(' ').unwrap().0).collect();
    assert_eq!(users, vec!["load1", "load2", "load3"]);
}

#[test]
fn migrate_creates_the_schema_and_is_safe_to_run_twice() {
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..2 {
        let out = binary()
            .env("CHAT_GATEWAY__SERVER__DATA_DIR", dir.path())
            .arg("migrate")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(dir.path().join("chat.db").exists());
}

/// A message committed straight into the store, with its outbox row, as a gateway that died
/// before its side effects were done leaves it; `leased`: the row had been handed to its queue.
async fn orphan(path: &std::path::Path, leased: bool) {
    use chat_gateway::store::sqlite::{SqliteOptions, SqliteStore};
    use chat_gateway::store::{NewMessage, Store};
    let options = SqliteOptions {
        readers: 1,
        outbox: true,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open_with(&path.join("chat.db"), &options)
        .await
        .unwrap();
    let inserted = store
        .insert_message(NewMessage {
            id: "orphan".into(),
            room_id: "r".into(),
            sender_id: "alice".into(),
            sender_name: None,
            sender_avatar_url: None,
            content: "committed, side effects never done".into(),
            created_at: chrono::Utc::now(),
            client_msg_id: None,
            reply: None,
        })
        .await
        .unwrap();
    assert_eq!(inserted.message.seq, 1);
    if leased {
        let claimed = store
            .outbox_claim(10, Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
    }
    store.close().await;
}

/// Starts a gateway with a webhook on `path`, and waits until the webhook heard of the orphan
/// and its outbox row is gone.
async fn side_effects_done_at_start(path: &std::path::Path) {
    let hook = common::nodes::WebhookReceiver::start(Duration::ZERO).await;
    let mut settings = test_settings();
    settings.queue.webhook_url = hook.url.clone();
    let _app = TestApp::start(settings, DataDir::Borrowed(path.to_path_buf())).await;
    let deadline = Instant::now() + WAIT;
    while !hook.distinct().contains("orphan") {
        assert!(
            Instant::now() < deadline,
            "the orphan's side effect was not performed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.join("chat.db").display()))
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let outbox: i64 = sqlx::query_scalar(r#"SELECT COUNT(*) FROM "ChatOutbox""#)
            .fetch_one(&pool)
            .await
            .unwrap();
        if outbox == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the done job's row stayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn side_effects_left_in_the_outbox_by_a_dead_process_are_performed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut app = TestApp::start(test_settings(), DataDir::Borrowed(dir.path().into())).await;
    app.room("r", &["alice"]).await;
    app.stop().await.unwrap();
    orphan(dir.path(), false).await;
    side_effects_done_at_start(dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn side_effects_handed_to_the_queue_by_a_process_that_died_are_performed_at_start() {
    // Handed to the in-process queue (its outbox row leased for an hour) by a process that died
    // before its worker performed it: the queue died with the process.
    let dir = tempfile::tempdir().unwrap();
    let mut app = TestApp::start(test_settings(), DataDir::Borrowed(dir.path().into())).await;
    app.room("r", &["alice"]).await;
    app.stop().await.unwrap();
    orphan(dir.path(), true).await;
    side_effects_done_at_start(dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_a_request_handler_closes_with_1011_and_still_cleans_up() {
    let app = TestApp::spawn_with(|s| {
        s.limits.max_connections_per_user = 1;
        s.faults.before_frame = Some(std::sync::Arc::new(|text: &str| {
            if text.contains("\"boom\"") {
                panic!("injected fault in a request handler");
            }
        }));
    })
    .await;
    app.room("r", &["alice", "bob"]).await;
    let mut bob = app.client("bob").await;
    bob.join("r", None).await;
    let mut alice = app.client("alice").await;
    alice.join("r", None).await;
    let arrived = loop {
        let push = bob.next_push_any().await;
        if push["type"] == "presence" && push["joined"][0]["userId"] == "alice" {
            break push;
        }
    };
    assert_eq!(arrived["online"], 2);
    assert_eq!(app.metric("chat_connections").await, 2.0);

    alice.send_text(r#"{"type":"ping","id":"boom"}"#).await;
    assert_eq!(alice.expect_close().await, 1011, "told the server failed");

    // Cleanup ran: her membership in the room (bob is told she left), her connection slot (the
    // per-user limit is 1, so a leaked slot would refuse her next socket with 4029), the
    // connection gauge.
    let left = loop {
        let push = bob.next_push_any().await;
        if push["type"] == "presence" {
            break push;
        }
    };
    assert_eq!(left["left"], json!(["alice"]));
    assert_eq!(left["online"], 1);
    let deadline = Instant::now() + WAIT;
    while app.metric("chat_connections").await != 1.0 {
        assert!(Instant::now() < deadline, "the connection gauge leaked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.metric("chat_connection_panics_total").await, 1.0);
    assert_eq!(
        app.metric("chat_closes_total{reason=\"internal_error\"}")
            .await,
        1.0
    );
    let mut again = app.client("alice").await;
    again.join("r", None).await;
    let m = again.send_ok("r", "back").await;
    assert_eq!(bob.expect_message("r").await["seq"], m["seq"]);
}
