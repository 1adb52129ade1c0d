//! Test harness: the real gateway on a port-0 listener with a data directory of its own, and a
//! WebSocket client whose helpers read like the protocol. Every wait is bounded by a timeout.

#![allow(dead_code)]

pub mod faults;
pub mod nodes;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chat_gateway::auth::{Claims, Role, TokenMinter, claims_for};
use chat_gateway::config::Settings;
use futures::{SinkExt, StreamExt};
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-test-secret-test-secret-0123456789";
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestApp {
    pub addr: SocketAddr,
    pub settings: Settings,
    pub http: reqwest::Client,
    minter: TokenMinter,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    /// Kept alive for the app's life (and reusable across a restart).
    pub data_dir: DataDir,
}

pub enum DataDir {
    Owned(tempfile::TempDir),
    Borrowed(PathBuf),
}

impl DataDir {
    pub fn path(&self) -> &Path {
        match self {
            DataDir::Owned(t) => t.path(),
            DataDir::Borrowed(p) => p,
        }
    }
}

/// Settings for tests: a configured HS256 secret (not dev mode), generous rate limits (tests that
/// exercise the limits set them back), quick timers.
pub fn test_settings() -> Settings {
    let mut s = Settings::defaults();
    s.auth.jwt_secret = SecretString::from(SECRET);
    s.rate_limit.enabled = false;
    s.server.shutdown_grace_secs = 5;
    s
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    pub async fn spawn_with(configure: impl FnOnce(&mut Settings)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut settings = test_settings();
        configure(&mut settings);
        Self::start(settings, DataDir::Owned(dir)).await
    }

    /// Starts a gateway on an existing data directory (restart tests).
    pub async fn start(mut settings: Settings, data_dir: DataDir) -> Self {
        chat_gateway::telemetry::init_for_tests();
        settings.server.data_dir = data_dir.path().to_path_buf();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(chat_gateway::run(listener, settings.clone(), async move {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::new();
        // Ready when /healthz answers (the store is open and migrated before the listener serves).
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(r) = http.get(format!("http://{addr}/healthz")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let minter = TokenMinter::hs256(&SecretString::from(SECRET));
        TestApp {
            addr,
            settings,
            http,
            minter,
            stop: Some(stop),
            server: Some(server),
            data_dir,
        }
    }

    /// Stops the gateway (as SIGTERM would) and waits for it to finish draining.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.server.take() {
            Some(server) => tokio::time::timeout(Duration::from_secs(20), server)
                .await
                .expect("gateway stops within 20 s")
                .expect("server task"),
            None => Ok(()),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn token(&self, user: &str) -> String {
        self.minter.mint(&claims_for(
            user,
            Some(&format!("{user} name")),
            Role::User,
            3600,
        ))
    }

    pub fn token_with(&self, claims: &Claims) -> String {
        self.minter.mint(claims)
    }

    pub fn service_token(&self) -> String {
        self.minter
            .mint(&claims_for("backend", None, Role::Service, 3600))
    }

    /// Creates a room and adds the members, through the management API.
    pub async fn room(&self, room: &str, members: &[&str]) {
        let r = self
            .http
            .post(self.url("/api/chat/rooms"))
            .bearer_auth(self.service_token())
            .json(&json!({"id": room, "name": format!("Room {room}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            201,
            "create room {room}: {}",
            r.text().await.unwrap()
        );
        for user in members {
            self.add_member(room, user).await;
        }
    }

    pub async fn add_member(&self, room: &str, user: &str) {
        let r = self
            .http
            .put(self.url(&format!("/api/chat/rooms/{room}/members/{user}")))
            .bearer_auth(self.service_token())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "add member: {}", r.status());
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A sample's value from /metrics: `key` is the name with its labels exactly as exposed
    /// (e.g. `chat_closes_total{reason="slow_consumer"}`); 0 when absent.
    pub async fn metric(&self, key: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .filter_map(|l| l.rsplit_once(' '))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// A sample's value once it reaches `want`, or as it is after `within`: for what a socket's
    /// cleanup counts after the socket itself was told (a close frame goes out first).
    pub async fn metric_reaching(&self, key: &str, want: f64, within: Duration) -> f64 {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let value = self.metric(key).await;
            if value >= want || tokio::time::Instant::now() >= deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Connects and authenticates with a first `auth` frame.
    pub async fn client(&self, user: &str) -> Client {
        let mut c = Client::connect(self.addr, None).await;
        let reply = c
            .request(json!({"type": "auth", "token": self.token(user)}))
            .await;
        assert_eq!(reply["type"], "result", "auth failed: {reply}");
        c
    }

    /// Sends over REST; returns (status, body).
    pub async fn rest_send(
        &self,
        user: &str,
        room: &str,
        content: &str,
        client_msg_id: Option<&str>,
    ) -> (u16, Value) {
        let mut body = json!({"content": content});
        if let Some(id) = client_msg_id {
            body["clientMsgId"] = json!(id);
        }
        let r = self
            .http
            .post(self.url(&format!("/api/chat/rooms/{room}/messages")))
            .bearer_auth(self.token(user))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn rest_history(&self, user: &str, room: &str, query: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.url(&format!("/api/chat/rooms/{room}/messages{query}")))
            .bearer_auth(self.token(user))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A protocol client over a real WebSocket.
pub struct Client {
    pub ws: Ws,
    next_id: u64,
    /// Pushes received while waiting for a reply, in arrival order.
    pushes: VecDeque<Value>,
}

/// How a socket ended, as seen by the client.
#[derive(Debug, PartialEq)]
pub enum Ended {
    Close(u16, String),
    /// The connection dropped without a close frame.
    Dropped,
}

impl Client {
    pub async fn connect(addr: SocketAddr, query: Option<&str>) -> Client {
        let url = match query {
            Some(q) => format!("ws://{addr}/ws?{q}"),
            None => format!("ws://{addr}/ws"),
        };
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timeout")
            .expect("connect");
        Client {
            ws,
            next_id: 0,
            pushes: VecDeque::new(),
        }
    }

    pub fn from_ws(ws: Ws) -> Client {
        Client {
            ws,
            next_id: 0,
            pushes: VecDeque::new(),
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(WsMessage::text(text))
            .await
            .expect("send frame");
    }

    /// The next JSON frame from the server (pings are answered by the library and skipped).
    pub async fn next_frame(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a frame")
                .expect("socket ended")
                .expect("socket error");
            match msg {
                WsMessage::Text(t) => {
                    return serde_json::from_str(t.as_str()).expect("server sent JSON");
                }
                WsMessage::Close(c) => panic!("socket closed while waiting for a frame: {c:?}"),
                _ => continue,
            }
        }
    }

    /// Sends a request (an `id` is added) and returns its reply; pushes meanwhile are kept.
    pub async fn request(&mut self, mut frame: Value) -> Value {
        self.next_id += 1;
        let id = format!("r{}", self.next_id);
        frame["id"] = json!(id);
        self.send_text(&frame.to_string()).await;
        self.reply_to(&id).await
    }

    pub async fn reply_to(&mut self, id: &str) -> Value {
        loop {
            let frame = self.next_frame().await;
            if frame["id"] == id {
                return frame;
            }
            assert!(
                frame.get("id").is_none() || frame["id"].is_null(),
                "reply to another request: {frame}"
            );
            self.pushes.push_back(frame);
        }
    }

    /// Joins; returns the `result` object. Panics on error.
    pub async fn join(&mut self, room: &str, since: Option<i64>) -> Value {
        let mut frame = json!({"type": "join", "room": room});
        if let Some(s) = since {
            frame["since"] = json!(s);
        }
        let reply = self.request(frame).await;
        assert_eq!(reply["type"], "result", "join {room}: {reply}");
        reply["result"].clone()
    }

    /// Sends a message; returns the reply frame (result or error).
    pub async fn send(&mut self, room: &str, content: &str, client_msg_id: &str) -> Value {
        self.request(
            json!({"type": "send", "room": room, "content": content, "clientMsgId": client_msg_id}),
        )
        .await
    }

    /// Sends and asserts success; returns the stored message.
    pub async fn send_ok(&mut self, room: &str, content: &str) -> Value {
        let id = uuid::Uuid::new_v4().to_string();
        let reply = self.send(room, content, &id).await;
        assert_eq!(reply["type"], "result", "send failed: {reply}");
        reply["result"]["message"].clone()
    }

    pub async fn history(&mut self, room: &str, before: Option<i64>, limit: Option<u32>) -> Value {
        let mut frame = json!({"type": "history", "room": room});
        if let Some(b) = before {
            frame["before"] = json!(b);
        }
        if let Some(l) = limit {
            frame["limit"] = json!(l);
        }
        self.request(frame).await
    }

    /// The next push (not a reply), from those already received or the socket.
    /// Presence pushes (who came online) are skipped: most tests are not about them; the
    /// presence tests read them with [`Client::next_push_any`].
    pub async fn next_push(&mut self) -> Value {
        loop {
            let push = self.next_push_any().await;
            if push["type"] != "presence" {
                return push;
            }
        }
    }

    /// The next push of any type.
    pub async fn next_push_any(&mut self) -> Value {
        if let Some(p) = self.pushes.pop_front() {
            return p;
        }
        self.next_frame().await
    }

    /// The next `message` push; asserts it is for `room`.
    pub async fn expect_message(&mut self, room: &str) -> Value {
        let push = self.next_push().await;
        assert_eq!(
            push["type"], "message",
            "expected a message push, got {push}"
        );
        assert_eq!(push["room"], room, "message for another room: {push}");
        push["message"].clone()
    }

    /// Asserts nothing arrives for `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        self.pushes.retain(|p| p["type"] != "presence");
        assert!(
            self.pushes.is_empty(),
            "unexpected pushes: {:?}",
            self.pushes
        );
        loop {
            match tokio::time::timeout(quiet, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(WsMessage::Text(t))))
                    if t.as_str().starts_with(r#"{"type":"presence""#) =>
                {
                    continue;
                }
                Ok(Some(Ok(WsMessage::Text(t)))) => panic!("unexpected frame: {t}"),
                Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => continue,
                Ok(other) => panic!("unexpected socket event: {other:?}"),
            }
        }
    }

    /// Reads one frame of any kind (keeps the connection answering pings); texts are kept.
    pub async fn ws_next(&mut self) {
        if let Some(Ok(WsMessage::Text(t))) = self.ws.next().await {
            self.pushes
                .push_back(serde_json::from_str(t.as_str()).unwrap());
        }
    }

    /// Reads until the socket ends; returns how (text frames on the way are returned too).
    pub async fn ended(&mut self) -> (Ended, Vec<Value>) {
        let mut frames = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("socket did not end in time")
            {
                None | Some(Err(_)) => return (Ended::Dropped, frames),
                Some(Ok(WsMessage::Close(Some(c)))) => {
                    return (
                        Ended::Close(u16::from(c.code), c.reason.to_string()),
                        frames,
                    );
                }
                Some(Ok(WsMessage::Close(None))) => {
                    return (Ended::Close(1005, String::new()), frames);
                }
                Some(Ok(WsMessage::Text(t))) => {
                    frames.push(serde_json::from_str(t.as_str()).unwrap())
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Reads until a close frame; returns its code.
    pub async fn expect_close(&mut self) -> u16 {
        match self.ended().await.0 {
            Ended::Close(code, _) => code,
            Ended::Dropped => panic!("socket dropped without a close frame"),
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }
}

/// The `seq` of each message.
pub fn seqs(messages: &[Value]) -> Vec<i64> {
    messages
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect()
}

/// Asserts that a history reply holds the acknowledged message `seq` in a gap-free page: what
/// a reader must see right after `who`'s send was acknowledged.
pub fn assert_latest_page_holds(reply: &Value, seq: i64, who: &str) {
    let got = seqs(reply["result"]["messages"].as_array().unwrap());
    assert!(
        got.contains(&seq),
        "{who} got {got:?} after the ack of {seq}"
    );
    let newest = *got.last().unwrap();
    let from = (newest - got.len() as i64 + 1).max(1);
    assert_eq!(got, (from..=newest).collect::<Vec<_>>(), "a gap-free page");
}

/// The Redis the Redis suites use: `TEST_REDIS_URL`, else the local default. When it is not
/// reachable the suite is skipped with a plain message, except under `CI=true`, where that fails.
/// A `redis+cluster://` URL runs the suites against a Redis Cluster (`.ci/redis-cluster`).
pub async fn redis_url() -> Option<String> {
    let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    reachable_redis(
        url,
        "Start redis-server on 127.0.0.1:6379 or set TEST_REDIS_URL to run it.",
    )
    .await
}

/// `url` when a PING through it answers (every primary, on a cluster); else skips (`None`, with
/// `how` to enable it), or fails under `CI=true`.
pub async fn reachable_redis(url: String, how: &str) -> Option<String> {
    let reachable = async {
        let mut conn = redis_target_conn(&url).await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .ok()
    };
    match tokio::time::timeout(Duration::from_secs(5), reachable).await {
        Ok(Some(_)) => Some(url),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("Redis is unreachable at {url} and CI=true: the Redis suites must run in CI")
        }
        _ => {
            eprintln!("SKIPPED: Redis suite (no Redis at {url}). {how}");
            None
        }
    }
}

/// A command connection to a test's Redis, one server or a cluster.
pub async fn redis_target_conn(url: &str) -> anyhow::Result<chat_gateway::redis_conn::Conn> {
    let topology = chat_gateway::redis_conn::Topology::parse(url)?;
    chat_gateway::redis_conn::connection(&topology, Some(Duration::from_secs(5))).await
}

/// Whether `url` names a Redis Cluster.
pub fn is_cluster(url: &str) -> bool {
    url.starts_with("redis+cluster://")
}

/// What a room's keys and channel carry for its id: `{id}` on a cluster (the hash tag).
pub fn tag(url: &str, id: &str) -> String {
    if is_cluster(url) {
        format!("{{{id}}}")
    } else {
        id.to_string()
    }
}

/// Settings for one node of a Redis-backed cluster: every node of a test shares `prefix`.
pub fn redis_settings(url: &str, prefix: &str) -> Settings {
    let mut s = test_settings();
    s.redis.url = SecretString::from(url.to_string());
    s.redis.key_prefix = prefix.to_string();
    s
}

/// A key prefix of its own for one test, so tests can share one Redis.
pub fn unique_prefix() -> String {
    format!("test-{}:", uuid::Uuid::new_v4().simple())
}

/// The Postgres server the Postgres suite uses: `TEST_DATABASE_URL`, or the local default. Every
/// test creates a database of its own on it, so tests run in parallel.
pub fn postgres_admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A database of one test's own, dropped when this is dropped.
pub struct ScratchDb {
    pub name: String,
    /// Connects to this database.
    pub url: String,
    admin_url: String,
}

/// `url` with its database name replaced.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let (scheme, rest) = base.split_once("://").expect("a postgres:// URL");
    let authority = rest.split('/').next().unwrap();
    match query {
        Some(q) => format!("{scheme}://{authority}/{name}?{q}"),
        None => format!("{scheme}://{authority}/{name}"),
    }
}

/// `url` with its host and port replaced by `addr` (to go through a proxy).
pub fn with_host(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let userinfo = authority
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}{path}")
}

/// Creates a database for one test. When Postgres cannot be reached: with `CI=true` the test
/// fails; otherwise it says once, on the terminal, that the Postgres suite was skipped, and the
/// caller returns (passes).
pub async fn scratch_database() -> Option<ScratchDb> {
    use sqlx::Connection;
    let admin_url = postgres_admin_url();
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        sqlx::PgConnection::connect(&admin_url),
    )
    .await;
    let mut admin = match connected {
        Ok(Ok(conn)) => conn,
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_string(),
            };
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "Postgres is unreachable at {admin_url} ({why}) and CI=true: the Postgres \
                     suite must run in CI. Start Postgres (see .ci/run) or set TEST_DATABASE_URL."
                );
            }
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                use std::io::Write;
                // Straight to the terminal: the test harness hides what passing tests print.
                let _ = writeln!(
                    std::io::stderr(),
                    "\nPOSTGRES SUITE SKIPPED: no Postgres at {admin_url} ({why}). To run it, \
                     start Postgres on 127.0.0.1:5432 (user postgres, trust auth) or set \
                     TEST_DATABASE_URL=postgres://USER@HOST:PORT/DB. With CI=true it fails instead.\n"
                );
            });
            return None;
        }
    };
    let name = format!("cg_test_{}", uuid::Uuid::new_v4().simple());
    sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .expect("create the test database");
    let _ = admin.close().await;
    Some(ScratchDb {
        url: with_database(&admin_url, &name),
        name,
        admin_url,
    })
}

impl ScratchDb {
    /// A pool of its own (not the gateway's), for setting up and checking.
    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.url)
            .await
            .expect("connect to the test database")
    }

    /// The database's schema from the automatic migrations.
    pub async fn migrated(&self) -> sqlx::PgPool {
        let pool = self.pool().await;
        chat_gateway::store::postgres::MIGRATOR
            .run(&pool)
            .await
            .expect("migrate");
        pool
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop cannot await, and may run on a runtime thread: a thread and a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(Ok(mut admin)) = tokio::time::timeout(
                    Duration::from_secs(5),
                    sqlx::PgConnection::connect(&admin_url),
                )
                .await
                {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(10),
                        sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .execute(&mut admin),
                    )
                    .await;
                }
            });
        })
        .join();
    }
}

impl TestApp {
    /// The gateway on `database_url` (Postgres) instead of its own SQLite file.
    pub async fn spawn_on_postgres(
        database_url: &str,
        configure: impl FnOnce(&mut Settings),
    ) -> Self {
        let url = database_url.to_string();
        Self::spawn_with(move |s| {
            s.database.url = SecretString::from(url);
            configure(s);
        })
        .await
    }
}

/// Waits until the gateway at `addr` answers /readyz with `ready` (200) or not (503); returns how
/// long it took (at most 30 s).
pub async fn until_ready(addr: SocketAddr, ready: bool) -> Duration {
    let started = std::time::Instant::now();
    let http = reqwest::Client::new();
    loop {
        if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
            && r.status().is_success() == ready
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "/readyz never became ready={ready}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Prints straight to the terminal, past the test harness's capture: for numbers a reader of the
/// test output should see (timings of the Postgres suite).
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// How many times a histogram was observed.
pub fn observations(histogram: &prometheus_client::metrics::histogram::Histogram) -> f64 {
    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("batch", "", histogram.clone());
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("batch_count "))
        .unwrap()
        .parse()
        .unwrap()
}

/// Room "r"'s reaction rows counted: (message seq, emoji, users), in that order. Both stores.
pub const REACTION_ROWS_SQL: &str = r#"SELECT "messageSeq", emoji, count(*) FROM "ChatReaction"
    WHERE "roomId" = 'r' GROUP BY 1, 2 ORDER BY 1, 2"#;

/// Room "r"'s changed messages and the seq of each one's last change. Both stores.
pub const LAST_CHANGES_SQL: &str = r#"SELECT "messageSeq", max(seq) FROM "ChatMessageChange"
    WHERE "roomId" = 'r' GROUP BY 1"#;

/// After concurrent changes of `room`'s messages `seqs`: its sequence holds every number up to
/// its head once, in order, and each message's reaction counts are its reaction rows (`rows`:
/// message seq, emoji, users) and its version the seq of its last change (`last`: message seq,
/// that seq). Returns the head.
pub async fn assert_changes_add_up(
    store: &dyn chat_gateway::store::Store,
    room: &str,
    seqs: &[i64],
    rows: &[(i64, String, i64)],
    last: &[(i64, i64)],
) -> i64 {
    let head = store.room_head(room).await.unwrap().unwrap();
    let events = store.events_between(room, 0, head, 100_000).await.unwrap();
    let numbers: Vec<i64> = events.iter().map(|e| e.seq()).collect();
    assert_eq!(numbers, (1..=head).collect::<Vec<_>>(), "gap-free");
    for m in store.messages_at(room, seqs).await.unwrap() {
        let mut counted = chat_gateway::store::changes::reactions(&m);
        counted.sort();
        let stored: Vec<(String, i64)> = rows
            .iter()
            .filter(|r| r.0 == m.seq)
            .map(|r| (r.1.clone(), r.2))
            .collect();
        assert_eq!(counted, stored, "message {}: counts against rows", m.seq);
        let version = last.iter().find(|l| l.0 == m.seq).map(|l| l.1);
        assert_eq!(m.version, version, "message {}: its last change", m.seq);
    }
    head
}
