//! The demo page and the browser SDK it loads: served in dev mode only. Their behaviour in a
//! browser is tested in tests/browser/ (headless Chromium).

mod common;

use common::TestApp;
use reqwest::header::CONTENT_TYPE;
use secrecy::SecretString;

const ROUTES: [&str; 4] = ["/", "/app.js", "/app.css", "/sdk/chat-gateway.js"];

#[tokio::test]
async fn dev_mode_serves_the_demo_page_and_the_sdk() {
    let app = TestApp::spawn_with(|s| s.auth.jwt_secret = SecretString::from("")).await;
    let expected = [
        ("text/html", r#"<form id="composer""#),
        ("text/javascript", r#"from "/sdk/chat-gateway.js""#),
        ("text/css", ".skeleton"),
        ("text/javascript", "export function connect("),
    ];
    for (path, (content_type, needle)) in ROUTES.into_iter().zip(expected) {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let ct = r.headers()[CONTENT_TYPE].to_str().unwrap().to_owned();
        assert!(ct.starts_with(content_type), "{path}: {ct}");
        assert!(r.text().await.unwrap().contains(needle), "{path}");
    }
}

#[tokio::test]
async fn with_a_key_configured_there_is_no_demo_page() {
    let app = TestApp::spawn().await;
    for path in ROUTES {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
}
