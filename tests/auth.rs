//! Authentication and authorization, through both doors: every bad-token case, the three ways a
//! token travels, refresh and expiry on a live socket, strangers to a room, the management API.

mod common;

use std::time::Duration;

use chat_gateway::auth::{Claims, Role, TokenMinter, claims_for};
use chat_gateway::config::JwtAlgorithm;
use common::{Client, Ended, SECRET, TestApp};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::SecretString;
use serde_json::json;

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, &b| (acc << 8) | b as u32) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// The token cases a gateway must refuse, each with the error code it must answer.
fn bad_tokens(app: &TestApp) -> Vec<(&'static str, String, &'static str)> {
    let claims = claims_for("mallory", None, Role::Admin, 3600);
    let other_secret = TokenMinter::hs256(&SecretString::from(
        "another-secret-another-secret-another!!",
    ));
    let mut expired = claims_for("mallory", None, Role::User, 0);
    expired.exp = chrono::Utc::now().timestamp() - 120;
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let payload = base64url(serde_json::to_string(&claims).unwrap().as_bytes());
    let unsigned = format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT"}"#),
        payload
    );
    let valid = app.token_with(&claims);
    let (head, rest) = valid.split_once('.').unwrap();
    let (_, sig) = rest.split_once('.').unwrap();
    let forged = format!("{head}.{payload}x.{sig}");
    vec![
        (
            "wrong signing key",
            other_secret.mint(&claims),
            "invalid_token",
        ),
        ("expired", app.token_with(&expired), "token_expired"),
        ("wrong algorithm (HS512)", hs512, "invalid_token"),
        ("unsigned (alg none)", unsigned, "invalid_token"),
        ("tampered payload", forged, "invalid_token"),
        ("not a JWT", "hello".to_string(), "invalid_token"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_refused_on_the_socket_with_4002() {
    let app = TestApp::spawn().await;
    for (case, token, code) in bad_tokens(&app) {
        let mut c = Client::connect(app.addr, None).await;
        let reply = c.request(json!({"type": "auth", "token": token})).await;
        assert_eq!(reply["type"], "error", "{case}");
        assert_eq!(reply["error"]["code"], code, "{case}");
        assert_eq!(c.expect_close().await, 4002, "{case}");
    }
    // Through the query parameter too.
    for (case, token, _) in bad_tokens(&app) {
        let mut c = Client::connect(app.addr, Some(&format!("token={token}"))).await;
        assert_eq!(c.expect_close().await, 4002, "{case} (query)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_refused_over_rest_with_401() {
    let app = TestApp::spawn().await;
    app.room("r", &["mallory"]).await;
    for (case, token, code) in bad_tokens(&app) {
        let r = app
            .http
            .get(app.url("/api/chat/rooms/r/messages"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{case}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{case}");
    }
    let r = app
        .http
        .get(app.url("/api/chat/rooms/r/messages"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no token");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_authenticated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_travels_by_first_frame_query_or_header() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice"]).await;
    // Query parameter: usable at once.
    let mut q = Client::connect(app.addr, Some(&format!("token={}", app.token("alice")))).await;
    assert_eq!(q.join("r", None).await["room"], "r");
    // Authorization header on the upgrade.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{}/ws",
            app.addr
        ))
        .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", app.token("alice")).parse().unwrap(),
    );
    let (ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let mut h = Client::from_ws(ws);
    assert_eq!(h.join("r", None).await["room"], "r");
    // Before authenticating, other requests are refused but the socket stays open.
    let mut f = Client::connect(app.addr, None).await;
    let e = f.request(json!({"type": "join", "room": "r"})).await;
    assert_eq!(e["error"]["code"], "not_authenticated");
    let ok = f
        .request(json!({"type": "auth", "token": app.token("alice")}))
        .await;
    assert_eq!(ok["result"]["userId"], "alice");
    assert_eq!(f.join("r", None).await["room"], "r");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_never_authenticates_is_closed_with_4001() {
    let app = TestApp::spawn_with(|s| s.auth.auth_timeout_ms = 300).await;
    let mut c = Client::connect(app.addr, None).await;
    assert_eq!(c.expect_close().await, 4001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_is_warned_then_closed_with_4003_unless_refreshed() {
    let app = TestApp::spawn_with(|s| {
        s.auth.leeway_secs = 0;
        s.auth.expiry_warning_secs = 1;
    })
    .await;
    let short = |user: &str| app.token_with(&claims_for(user, None, Role::User, 2));

    // Not refreshed: a warning, then 4003.
    let mut lazy = Client::connect(app.addr, None).await;
    assert_eq!(
        lazy.request(json!({"type":"auth","token": short("lazy")}))
            .await["type"],
        "result"
    );
    let (ended, frames) = lazy.ended().await;
    assert_eq!(ended, Ended::Close(4003, "token expired".into()));
    assert!(
        frames.iter().any(|f| f["type"] == "session_expiring"),
        "{frames:?}"
    );

    // Refreshed on the same socket: stays open past the first expiry.
    let mut diligent = Client::connect(app.addr, None).await;
    assert_eq!(
        diligent
            .request(json!({"type":"auth","token": short("diligent")}))
            .await["type"],
        "result"
    );
    let refreshed = diligent
        .request(json!({"type":"auth","token": app.token("diligent")}))
        .await;
    assert_eq!(refreshed["type"], "result");
    assert!(
        refreshed["result"]["expiresAt"].as_i64().unwrap() > chrono::Utc::now().timestamp() + 3000
    );
    // A token for someone else is refused and changes nothing.
    let wrong = diligent
        .request(json!({"type":"auth","token": app.token("intruder")}))
        .await;
    assert_eq!(wrong["error"]["code"], "invalid_token");
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(
        diligent.request(json!({"type": "ping"})).await["type"],
        "result"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_is_refused_join_history_and_send_on_both_doors() {
    let app = TestApp::spawn().await;
    app.room("private", &["alice"]).await;
    let mut stranger = app.client("stranger").await;
    for frame in [
        json!({"type": "join", "room": "private"}),
        json!({"type": "history", "room": "private"}),
        json!({"type": "send", "room": "private", "content": "hi", "clientMsgId": "x"}),
    ] {
        let e = stranger.request(frame.clone()).await;
        assert_eq!(e["error"]["code"], "forbidden", "{frame}");
    }
    let e = stranger
        .request(json!({"type": "join", "room": "nowhere"}))
        .await;
    assert_eq!(e["error"]["code"], "room_not_found");

    let (status, body) = app.rest_send("stranger", "private", "hi", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let (status, _) = app.rest_history("stranger", "private", "").await;
    assert_eq!(status, 403);
    let (status, body) = app.rest_history("stranger", "nowhere", "").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("room_not_found"))
    );

    // Nothing was stored by the refused sends.
    let (_, page) = app.rest_history("alice", "private", "").await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 0);

    // An ADMIN may read and join any existing room.
    let admin = app.token_with(&claims_for("root", None, Role::Admin, 600));
    let mut root = Client::connect(app.addr, Some(&format!("token={admin}"))).await;
    assert_eq!(root.join("private", None).await["room"], "private");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_stops_receiving_at_once() {
    let app = TestApp::spawn().await;
    app.room("r", &["alice", "bob"]).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    bob.join("r", None).await;
    alice.send_ok("r", "before").await;
    assert_eq!(bob.expect_message("r").await["content"], "before");

    let r = app
        .http
        .delete(app.url("/api/chat/rooms/r/members/bob"))
        .bearer_auth(app.service_token())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let push = bob.next_push().await;
    assert_eq!(
        (push["type"].as_str(), push["room"].as_str()),
        (Some("removed"), Some("r"))
    );
    alice.send_ok("r", "after").await;
    bob.expect_silence(Duration::from_millis(300)).await;
    let e = bob.send("r", "let me in", "c1").await;
    assert_eq!(e["error"]["code"], "forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_needs_the_service_role() {
    let app = TestApp::spawn().await;
    let user = app.token("alice");
    let r = app
        .http
        .post(app.url("/api/chat/rooms"))
        .bearer_auth(&user)
        .json(&json!({"id": "x", "name": "X"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = app
        .http
        .put(app.url("/api/chat/rooms/x/members/alice"))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    app.room("x", &[]).await;
    let again = app
        .http
        .post(app.url("/api/chat/rooms"))
        .bearer_auth(app.service_token())
        .json(&json!({"id": "x", "name": "X"}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let missing = app
        .http
        .put(app.url("/api/chat/rooms/none/members/alice"))
        .bearer_auth(app.service_token())
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    // No dev endpoint when a key is configured.
    let dev = app
        .http
        .post(app.url("/dev/token"))
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(dev.status(), 404);
}

async fn asymmetric(alg: JwtAlgorithm, private: &str, public: &str) {
    let dir = env!("CARGO_MANIFEST_DIR");
    let app = TestApp::spawn_with(|s| {
        s.auth.jwt_secret = SecretString::from("");
        s.auth.algorithm = alg;
        s.auth.public_key_file = format!("{dir}/tests/keys/{public}").into();
    })
    .await;
    let minter = TokenMinter::from_private_pem(
        alg,
        &std::fs::read(format!("{dir}/tests/keys/{private}")).unwrap(),
    )
    .unwrap();
    let good = minter.mint(&claims_for("alice", None, Role::User, 600));
    let mut c = Client::connect(app.addr, None).await;
    assert_eq!(
        c.request(json!({"type":"auth","token": good})).await["result"]["userId"],
        "alice"
    );
    // An HS256 token signed with the public key as the secret (the classic confusion attack).
    let pem = std::fs::read(format!("{dir}/tests/keys/{public}")).unwrap();
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims_for("alice", None, Role::Admin, 600),
        &EncodingKey::from_secret(&pem),
    )
    .unwrap();
    let mut c = Client::connect(app.addr, None).await;
    assert_eq!(
        c.request(json!({"type":"auth","token": confused})).await["error"]["code"],
        "invalid_token"
    );
    assert_eq!(c.expect_close().await, 4002);
    // Dev mode is off: no generated secret, no dev endpoint.
    assert!(!app.data_dir.path().join("dev-jwt-secret").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_es256_keys_verify_and_refuse_algorithm_confusion() {
    asymmetric(JwtAlgorithm::RS256, "rs256-private.pem", "rs256-public.pem").await;
    asymmetric(JwtAlgorithm::ES256, "es256-private.pem", "es256-public.pem").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_mints_tokens_and_opens_rooms() {
    let app = TestApp::spawn_with(|s| s.auth.jwt_secret = SecretString::from("")).await;
    let r: serde_json::Value = app
        .http
        .post(app.url("/dev/token"))
        .json(&json!({"name": "Dev User"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["userId"], "dev-user");
    let token = r["token"].as_str().unwrap();
    let mut c = Client::connect(app.addr, Some(&format!("token={token}"))).await;
    // Any room can be joined; it is created with the membership.
    assert_eq!(c.join("anything", None).await["head"], 0);
    let m = c.send_ok("anything", "hello").await;
    assert_eq!(m["senderName"], "Dev User");
    // The secret persists in the data directory, so tokens survive a restart.
    assert!(app.data_dir.path().join("dev-jwt-secret").exists());
    // Claims other than the ones the gateway knows are ignored; unknown roles are plain users.
    let odd: Claims = Claims {
        role: Role::User,
        ..claims_for("x", None, Role::User, 60)
    };
    assert_eq!(odd.role, Role::User);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_sockets_for_one_user_are_closed_with_4029() {
    let app = TestApp::spawn_with(|s| s.limits.max_connections_per_user = 2).await;
    let _a = app.client("alice").await;
    let _b = app.client("alice").await;
    let mut third = Client::connect(app.addr, Some(&format!("token={}", app.token("alice")))).await;
    assert_eq!(third.expect_close().await, 4029);
    // Other users are not affected.
    let _bob = app.client("bob").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_removed_in_the_database_takes_effect_within_the_ttl() {
    let app = TestApp::spawn_with(|s| s.auth.membership_ttl_secs = 1).await;
    app.room("r", &["alice", "bob"]).await;
    let mut alice = app.client("alice").await;
    let mut bob = app.client("bob").await;
    bob.join("r", None).await;
    // Removed behind the gateway's back, with plain SQL.
    let db = app.data_dir.path().join("chat.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query(r#"DELETE FROM "ChatRoomMember" WHERE "roomId" = 'r' AND "userId" = 'bob'"#)
        .execute(&pool)
        .await
        .unwrap();
    // Bob only listens; within about two TTLs his socket is told and detached.
    let push = tokio::time::timeout(Duration::from_secs(4), bob.next_push())
        .await
        .expect("removed push");
    assert_eq!(
        (push["type"].as_str(), push["room"].as_str()),
        (Some("removed"), Some("r"))
    );
    alice.send_ok("r", "bob must not see this").await;
    bob.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_may_be_a_list_and_is_checked_when_configured() {
    let app = TestApp::spawn_with(|s| s.auth.audience = "chat".into()).await;
    let token = |aud: serde_json::Value| {
        let mut claims = claims_for("alice", None, Role::User, 600);
        claims.aud = Some(aud);
        app.token_with(&claims)
    };
    for (aud, ok) in [
        (json!("chat"), true),
        (json!(["other", "chat"]), true),
        (json!(["other"]), false),
    ] {
        let mut c = Client::connect(app.addr, None).await;
        let reply = c
            .request(json!({"type": "auth", "token": token(aud.clone())}))
            .await;
        assert_eq!(reply["type"] == "result", ok, "aud {aud}: {reply}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_issuer_or_audience_is_required_not_only_checked() {
    // (issuer configured, audience configured)
    for (issuer, audience) in [(true, false), (false, true), (true, true), (false, false)] {
        let app = TestApp::spawn_with(|s| {
            if issuer {
                s.auth.issuer = "https://auth.example.com".into();
            }
            if audience {
                s.auth.audience = "chat".into();
            }
        })
        .await;
        // Each claim omitted, wrong, or right.
        for iss in [
            None,
            Some("https://evil.example.com"),
            Some("https://auth.example.com"),
        ] {
            for aud in [None, Some("other"), Some("chat")] {
                let mut claims = claims_for("alice", None, Role::User, 600);
                claims.iss = iss.map(str::to_string);
                claims.aud = aud.map(|a| json!(a));
                let token = app.token_with(&claims);
                let iss_ok = !issuer || iss == Some("https://auth.example.com");
                let aud_ok = !audience || aud == Some("chat");
                let ok = iss_ok && aud_ok;
                let case =
                    format!("issuer {issuer}, audience {audience}: iss {iss:?}, aud {aud:?}");

                let mut c = Client::connect(app.addr, None).await;
                let reply = c.request(json!({"type": "auth", "token": token})).await;
                if ok {
                    assert_eq!(reply["type"], "result", "{case}: {reply}");
                } else {
                    assert_eq!(reply["error"]["code"], "invalid_token", "{case}: {reply}");
                    assert_eq!(c.expect_close().await, 4002, "{case}");
                }
                let r = app
                    .http
                    .get(app.url("/api/chat/rooms"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), if ok { 200 } else { 401 }, "{case}");
            }
        }
    }
}
