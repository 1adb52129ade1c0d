//! Browser origins (`server.allowed_origins`), as a browser meets them: the WebSocket upgrade
//! refuses a page from an origin not allowed before anything else. Requests without `Origin`
//! (backends) are not concerned.

mod common;

use common::{TestApp, WAIT};
use secrecy::SecretString;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const APP: &str = "https://app.example.com";
const ELSEWHERE: &str = "https://elsewhere.example.net";

async fn allowing_the_app() -> TestApp {
    TestApp::spawn_with(|s| s.server.allowed_origins = vec![APP.into()]).await
}

/// The upgrade's HTTP status: 101 when the socket opened.
async fn upgrade_status(app: &TestApp, origin: Option<&str>, query: &str) -> u16 {
    let mut request = format!("ws://{}/ws{query}", app.addr)
        .into_client_request()
        .unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("upgrade answered in time")
    {
        Ok((_, response)) => response.status().as_u16(),
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("upgrade: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_from_an_origin_not_allowed_gets_403_before_a_slot_or_its_token_is_looked_at() {
    // One connection slot, held: an upgrade that got as far as the slots would get 503.
    let app = TestApp::spawn_with(|s| {
        s.server.allowed_origins = vec![APP.into()];
        s.server.max_connections = 1;
    })
    .await;
    let held = app.client("alice").await;
    let token = format!("?token={}", app.token("bob"));
    assert_eq!(upgrade_status(&app, Some(ELSEWHERE), &token).await, 403);
    assert_eq!(upgrade_status(&app, Some("null"), &token).await, 403);
    assert_eq!(
        app.metric(r#"chat_upgrades_refused_total{reason="origin"}"#)
            .await,
        2.0
    );
    assert_eq!(
        app.metric(r#"chat_upgrades_refused_total{reason="connection_limit"}"#)
            .await,
        0.0
    );
    assert_eq!(app.metric("chat_connections_opened_total").await, 1.0);
    // An allowed page is refused by the slot, as before.
    assert_eq!(upgrade_status(&app, Some(APP), &token).await, 503);
    assert_eq!(
        app.metric(r#"chat_upgrades_refused_total{reason="connection_limit"}"#)
            .await,
        1.0
    );
    held.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_open_from_allowed_origins_the_gateways_own_and_without_origin() {
    let app = allowing_the_app().await;
    let own = format!("http://{}", app.addr);
    for origin in [Some(APP), Some(own.as_str()), None] {
        assert_eq!(upgrade_status(&app, origin, "").await, 101, "{origin:?}");
    }
    // Counted by the socket's task, which may start just after the client has its 101.
    let deadline = tokio::time::Instant::now() + WAIT;
    while app.metric("chat_connections_opened_total").await < 3.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "three sockets opened"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Same host, another port: another origin.
    let other_port = format!("http://{}:1", app.addr.ip());
    assert_eq!(upgrade_status(&app, Some(&other_port), "").await, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_key_and_no_list_only_the_gateways_own_origin_is_allowed() {
    let app = TestApp::spawn().await;
    let own = format!("http://{}", app.addr);
    let localhost = format!("http://localhost:{}", app.addr.port());
    assert_eq!(upgrade_status(&app, Some(&own), "").await, 101);
    assert_eq!(upgrade_status(&app, Some(&localhost), "").await, 403);
    assert_eq!(upgrade_status(&app, Some(APP), "").await, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_allows_pages_on_any_local_port_by_default() {
    let app = TestApp::spawn_with(|s| s.auth.jwt_secret = SecretString::from("")).await;
    for origin in ["http://localhost:5173", "http://127.0.0.1:3000"] {
        assert_eq!(
            upgrade_status(&app, Some(origin), "").await,
            101,
            "{origin}"
        );
    }
    assert_eq!(upgrade_status(&app, Some(APP), "").await, 403);
}
