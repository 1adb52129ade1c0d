//! Browser origins (`server.allowed_origins`), as a browser meets them: the WebSocket upgrade
//! refuses a page from an origin not allowed before anything else, and the REST routes pages call
//! answer CORS for allowed origins only. Requests without `Origin` (backends) are not concerned.
//! The same in real Chromium from a second origin: tests/browser/origins.test.js.

mod common;

use common::{TestApp, WAIT};
use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder, Response};
use secrecy::SecretString;
use serde_json::json;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const APP: &str = "https://app.example.com";
const ELSEWHERE: &str = "https://elsewhere.example.net";

async fn allowing_the_app() -> TestApp {
    TestApp::spawn_with(|s| s.server.allowed_origins = vec![APP.into()]).await
}

/// A browser's preflight of `method` on `path` with `Authorization` and `Content-Type`.
async fn preflight(app: &TestApp, path: &str, origin: &str, method: &str) -> Response {
    app.http
        .request(Method::OPTIONS, app.url(path))
        .header("origin", origin)
        .header("access-control-request-method", method)
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap()
}

async fn from_origin(request: RequestBuilder, origin: Option<&str>) -> Response {
    match origin {
        Some(origin) => request.header("origin", origin),
        None => request,
    }
    .send()
    .await
    .unwrap()
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

/// The CORS headers of a response (`access-control-*`), by name.
fn cors_headers(headers: &HeaderMap) -> Vec<String> {
    headers
        .keys()
        .map(|k| k.as_str().to_string())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
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
async fn a_preflight_from_an_allowed_origin_allows_the_send_with_its_headers() {
    let app = allowing_the_app().await;
    let r = preflight(&app, "/api/chat/rooms/general/messages", APP, "POST").await;
    assert!(r.status().is_success(), "{}", r.status());
    let h = r.headers();
    assert_eq!(header(h, "access-control-allow-origin"), Some(APP));
    let methods = header(h, "access-control-allow-methods").unwrap();
    assert!(
        methods.contains("GET") && methods.contains("POST"),
        "{methods}"
    );
    let allowed = header(h, "access-control-allow-headers").unwrap();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );
    assert_eq!(header(h, "access-control-max-age"), Some("600"));
    // Bearer tokens, never cookies: credentials are not allowed.
    assert_eq!(header(h, "access-control-allow-credentials"), None);
    assert!(header(h, "vary").unwrap().contains("origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_to_an_allowed_origin_carry_cors_and_expose_retry_after() {
    let app = TestApp::spawn_with(|s| {
        s.server.allowed_origins = vec![APP.into()];
        s.rate_limit.enabled = true;
    })
    .await;
    app.room("r", &["alice"]).await;
    let mut limited = None;
    for i in 0..10 {
        let send = app
            .http
            .post(app.url("/api/chat/rooms/r/messages"))
            .bearer_auth(app.token("alice"))
            .json(&json!({"content": format!("burst {i}")}));
        let r = from_origin(send, Some(APP)).await;
        assert_eq!(
            header(r.headers(), "access-control-allow-origin"),
            Some(APP)
        );
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
        assert_eq!(r.status(), 201);
    }
    let r = limited.expect("the burst went over the limit");
    let h = r.headers();
    assert!(header(h, "retry-after").is_some());
    assert_eq!(
        header(h, "access-control-expose-headers"),
        Some("retry-after")
    );
    let history = app
        .http
        .get(app.url("/api/chat/rooms/r/messages"))
        .bearer_auth(app.token("alice"));
    let r = from_origin(history, Some(APP)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(r.headers(), "access-control-allow-origin"),
        Some(APP)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_origins_and_requests_without_origin_get_no_cors_header() {
    let app = allowing_the_app().await;
    app.room("r", &["alice"]).await;
    for origin in [ELSEWHERE, "http://app.example.com", "null"] {
        let r = preflight(&app, "/api/chat/rooms/r/messages", origin, "POST").await;
        assert_eq!(r.status(), 405, "{origin}: the route's own answer");
        assert_eq!(cors_headers(r.headers()), Vec::<String>::new(), "{origin}");
        assert!(header(r.headers(), "vary").unwrap().contains("origin"));
    }
    // The server answers; the browser keeps the answer from a page of another origin.
    for origin in [Some(ELSEWHERE), None] {
        let history = app
            .http
            .get(app.url("/api/chat/rooms/r/messages"))
            .bearer_auth(app.token("alice"));
        let r = from_origin(history, origin).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            cors_headers(r.headers()),
            Vec::<String>::new(),
            "{origin:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_stays_without_cors_and_my_rooms_has_it_for_get_only() {
    let app = allowing_the_app().await;
    app.room("r", &[]).await;
    for method in ["PUT", "DELETE"] {
        let r = preflight(&app, "/api/chat/rooms/r/members/bob", APP, method).await;
        assert_eq!(r.status(), 405, "{method}");
        assert_eq!(cors_headers(r.headers()), Vec::<String>::new(), "{method}");
    }
    // GET /api/chat/rooms (the caller's rooms) is for pages; POST (create a room) is not.
    let r = preflight(&app, "/api/chat/rooms", APP, "POST").await;
    assert_eq!(
        header(r.headers(), "access-control-allow-methods"),
        Some("GET")
    );
    let create = app
        .http
        .post(app.url("/api/chat/rooms"))
        .bearer_auth(app.service_token())
        .json(&json!({"id": "made-from-a-page", "name": "nope"}));
    let r = from_origin(create, Some(APP)).await;
    assert_eq!(r.status(), 201, "the server answers; the browser blocks");
    assert_eq!(cors_headers(r.headers()), Vec::<String>::new());
    let mine = app
        .http
        .get(app.url("/api/chat/rooms"))
        .bearer_auth(app.token("alice"));
    let r = from_origin(mine, Some(APP)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(r.headers(), "access-control-allow-origin"),
        Some(APP)
    );
    // The other routes pages call.
    for (path, method) in [
        ("/api/chat/rooms", "GET"),
        ("/api/chat/rooms/r/read", "POST"),
        ("/api/chat/rooms/r/presence", "GET"),
        ("/api/chat/rooms/r/messages", "GET"),
    ] {
        let r = preflight(&app, path, APP, method).await;
        let h = r.headers();
        assert_eq!(
            header(h, "access-control-allow-origin"),
            Some(APP),
            "{path}"
        );
        assert!(
            header(h, "access-control-allow-methods")
                .unwrap()
                .contains(method),
            "{path}"
        );
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
    let r = preflight(&app, "/api/chat/rooms/r/messages", APP, "GET").await;
    assert_eq!(header(r.headers(), "access-control-allow-origin"), None);
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
        for path in ["/api/chat/rooms/general/messages", "/dev/token"] {
            let r = preflight(&app, path, origin, "POST").await;
            assert_eq!(
                header(r.headers(), "access-control-allow-origin"),
                Some(origin),
                "{path}"
            );
        }
        // An app under development loads the SDK from the gateway (a module script: CORS).
        let sdk = app.http.get(app.url("/sdk/chat-gateway.js"));
        let r = from_origin(sdk, Some(origin)).await;
        assert_eq!(
            header(r.headers(), "access-control-allow-origin"),
            Some(origin)
        );
    }
    assert_eq!(upgrade_status(&app, Some(APP), "").await, 403);
}
