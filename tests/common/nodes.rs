//! Gateway processes for the multi-node suites: the built binary started on ports of its own,
//! sharing one Postgres database and one Redis, with helpers to mint tokens, set up rooms and
//! receive webhooks.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::{Client, SECRET, ScratchDb};

/// The gateway binary: `CHAT_GATEWAY_BIN` when set (to run these suites against another build),
/// else the one cargo built for the tests.
pub fn gateway_binary() -> String {
    std::env::var("CHAT_GATEWAY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_chat-gateway").into())
}

/// One gateway process of the built binary (or `CHAT_GATEWAY_BIN`), on a port of its own.
pub struct Node {
    pub addr: SocketAddr,
    child: Child,
    /// Its log (what it prints, `RUST_LOG=warn`), for asserting what it did not say.
    pub log: std::path::PathBuf,
}

impl Node {
    pub async fn start(
        db: &ScratchDb,
        redis: &str,
        prefix: &str,
        data_dir: &std::path::Path,
        rate_limits: bool,
    ) -> Node {
        Self::start_with(db, redis, prefix, data_dir, rate_limits, &[]).await
    }

    pub async fn start_with(
        db: &ScratchDb,
        redis: &str,
        prefix: &str,
        data_dir: &std::path::Path,
        rate_limits: bool,
        extra_env: &[(&str, &str)],
    ) -> Node {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = std::env::temp_dir().join(format!("chat-gateway-node-{port}.log"));
        let output = std::fs::File::create(&log).expect("create the node's log file");
        let child = Command::new(gateway_binary())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &db.url)
            .env("REDIS_URL", redis)
            .env("CHAT_GATEWAY__REDIS__KEY_PREFIX", prefix)
            .env("JWT_SECRET", SECRET)
            .env("BIND_ADDR", addr.to_string())
            .env("CHAT_GATEWAY__SERVER__DATA_DIR", data_dir)
            .env("CHAT_GATEWAY__RATE_LIMIT__ENABLED", rate_limits.to_string())
            .env("RUST_LOG", "warn")
            .envs(extra_env.iter().copied())
            .stdout(output)
            .stderr(Stdio::null())
            .spawn()
            .expect("start the gateway binary");
        let node = Node { addr, child, log };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
                && r.status().is_success()
            {
                return node;
            }
            assert!(
                Instant::now() < deadline,
                "node on {addr} never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its log lines that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// A sample's value from its /metrics (0 when absent), as `TestApp::metric`.
    pub async fn metric(&self, key: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter_map(|l| l.rsplit_once(' '))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn kill(&mut self) {
        // std's Child::kill sends SIGKILL on Unix: no drain, no goodbye.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

pub fn token(user: &str, role: chat_gateway::auth::Role) -> String {
    let minter = chat_gateway::auth::TokenMinter::hs256(&secrecy::SecretString::from(SECRET));
    minter.mint(&chat_gateway::auth::claims_for(
        user,
        Some(user),
        role,
        3600,
    ))
}

pub async fn setup_room(addr: SocketAddr, room: &str, members: &[&str]) {
    let http = reqwest::Client::new();
    let service = token("backend", chat_gateway::auth::Role::Service);
    let r = http
        .post(format!("http://{addr}/api/chat/rooms"))
        .bearer_auth(&service)
        .json(&json!({"id": room, "name": room}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    for user in members {
        let r = http
            .put(format!(
                "http://{addr}/api/chat/rooms/{room}/members/{user}"
            ))
            .bearer_auth(&service)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
}

pub async fn client(addr: SocketAddr, user: &str) -> Client {
    let token = token(user, chat_gateway::auth::Role::User);
    Client::connect(addr, Some(&format!("token={token}"))).await
}

/// An HTTP server of the test's own that receives the gateway's webhook: the `messageId`s it was
/// called for, each time it was called (duplicates kept), answering after `delay`.
pub struct WebhookReceiver {
    pub url: String,
    pub received: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl WebhookReceiver {
    pub async fn start(delay: Duration) -> WebhookReceiver {
        use axum::routing::post;
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = received.clone();
        let app = axum::Router::new().route(
            "/hook",
            post(move |body: axum::Json<serde_json::Value>| {
                let store = store.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    if let Some(id) = body["messageId"].as_str() {
                        store.lock().unwrap().push(id.to_string());
                    }
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        WebhookReceiver {
            url: format!("http://{addr}/hook"),
            received,
        }
    }

    /// The distinct message ids received so far.
    pub fn distinct(&self) -> std::collections::HashSet<String> {
        self.received.lock().unwrap().iter().cloned().collect()
    }
}
