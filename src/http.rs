//! HTTP routes: the WebSocket upgrade, the REST fallback (compatible with the app the gateway
//! replaces), the management API for backends (role SERVICE), health, readiness and metrics.
//! Every route is a thin adapter over [`crate::service::ChatService`].

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State, WebSocketUpgrade};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::App;
use crate::auth::{Identity, Role};
use crate::error::ChatError;
use crate::origins::{self, BrowserCors, RequestOrigin};
use crate::service::Door;
use crate::store::Target;
use crate::transport::Connection;

pub fn router(app: Arc<App>) -> Router {
    let body_limit = app.service.settings.limits.max_frame_bytes;
    // CORS for the routes pages call, for the methods they call (see `origins::BrowserCors`). The
    // management API (role SERVICE) is for backends and has none: a page cannot call it.
    let cors = |methods: &[Method]| {
        from_fn_with_state(
            BrowserCors::new(app.origins.clone(), methods),
            origins::browser_cors,
        )
    };
    let mut router = Router::new()
        .route("/ws", get(ws_upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        // GET (the caller's rooms) is for pages, POST (create a room) is the management API's:
        // added after the layer, it stays without CORS, and the preflight (answered by the layered
        // fallback) allows GET only.
        .route(
            "/api/chat/rooms",
            get(my_rooms).layer(cors(&[Method::GET])).post(create_room),
        )
        .route(
            "/api/chat/rooms/{room}/read",
            post(mark_read).layer(cors(&[Method::POST])),
        )
        .route(
            "/api/chat/rooms/{room}/presence",
            get(presence).layer(cors(&[Method::GET])),
        )
        .route(
            "/api/chat/rooms/{room}/messages",
            get(history)
                .post(send)
                .layer(cors(&[Method::GET, Method::POST])),
        )
        .route(
            "/api/chat/rooms/{room}/messages/{message}",
            patch(edit_message)
                .delete(delete_message)
                .layer(cors(&[Method::PATCH, Method::DELETE])),
        )
        .route(
            "/api/chat/rooms/{room}/messages/{message}/reactions/{emoji}",
            put(react)
                .delete(unreact)
                .layer(cors(&[Method::PUT, Method::DELETE])),
        )
        .route(
            "/api/chat/rooms/{room}/messages/{message}/moderation",
            put(moderate),
        )
        .route(
            "/api/chat/rooms/{room}/members/{user}",
            put(add_member).delete(remove_member),
        );
    if app.service.dev_minter.is_some() {
        // An app under development on its own origin mints its tokens and loads the SDK here.
        router = router
            .route("/dev/token", post(dev_token).layer(cors(&[Method::POST])))
            .route("/", get(demo_page))
            .route("/app.js", get(demo_script))
            .route("/app.css", get(demo_style))
            .route(
                "/sdk/chat-gateway.js",
                get(sdk_script).layer(cors(&[Method::GET])),
            );
    }
    router
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(app)
}

/// The caller of a REST route, from `Authorization: Bearer <jwt>`.
pub struct AuthUser(pub Identity);

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

impl FromRequestParts<Arc<App>> for AuthUser {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &Arc<App>,
    ) -> Result<Self, Self::Rejection> {
        let result = match bearer(&parts.headers) {
            None => Err(ChatError::NotAuthenticated),
            Some(token) => app.service.authenticate(token).map_err(ChatError::Auth),
        };
        result.map(AuthUser).map_err(|e| error_response(app, e))
    }
}

fn error_response(app: &App, e: ChatError) -> Response {
    app.service.metrics.error(e.code());
    e.into_response()
}

async fn ws_upgrade(
    State(app): State<Arc<App>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    // First: a page from an origin not allowed takes no connection slot, no turn of churn, and
    // its token is never looked at.
    if app.origins.check(&headers) == RequestOrigin::Refused {
        app.service.metrics.upgrade_refused("origin");
        return origin_not_allowed();
    }
    if app.shutdown.is_cancelled() {
        app.service.metrics.upgrade_refused("draining");
        return unavailable("shutting down");
    }
    let Ok(permit) = app.conn_slots.clone().try_acquire_owned() else {
        app.service.metrics.upgrade_refused("connection_limit");
        return unavailable("connection limit reached");
    };
    // Held through the upgrade and the token check; released before the socket reads frames.
    let turn = app.service.churn_turn().await;
    let token = query
        .get("token")
        .cloned()
        .or_else(|| bearer(&headers).map(str::to_string));
    let limits = &app.service.settings.limits;
    let guard = app.tracker.token();
    upgrade
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        .read_buffer_size(limits.ws_read_buffer_bytes)
        .write_buffer_size(limits.ws_write_buffer_bytes)
        .on_upgrade(move |socket| {
            // The connection gets a task of its own, sized for the connection alone (about half
            // of the upgrade task's size, which makes room for the WebSocket handshake too), on
            // the main runtime: the upgrade ran on the churn lane, the socket's life does not.
            // The guard covered the upgrade; the tracked task takes over from it.
            let tracker = app.tracker.clone();
            let main = app.main.clone();
            let _main = main.enter();
            tracker.spawn_on(Connection::run(app, socket, token, permit, turn), &main);
            drop(guard);
            std::future::ready(())
        })
}

fn unavailable(why: &str) -> Response {
    let body = json!({"error": {"code": "unavailable", "message": why, "retryAfterMs": 1000}});
    let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Longest a readiness check waits for a dependency before calling it unreachable.
const READY_WITHIN: std::time::Duration = std::time::Duration::from_millis(400);

/// `check`'s answer, or false when it takes longer than `limit`.
async fn within(limit: std::time::Duration, check: impl Future<Output = bool>) -> bool {
    tokio::time::timeout(limit, check).await.unwrap_or(false)
}

fn origin_not_allowed() -> Response {
    let body = json!({"error": {"code": "forbidden", "message": "origin not allowed"}});
    (StatusCode::FORBIDDEN, Json(body)).into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "draining": true})),
        )
            .into_response();
    }
    // Checked together, each bounded: a balancer probing with a short timeout gets a 503, not a
    // timeout, while a dependency hangs. A dependency already known down answers at once.
    let store = within(READY_WITHIN, async {
        match app.service.store.ping().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "readiness: store unreachable");
                false
            }
        }
    });
    let redis = async {
        let redis = app.redis.as_ref()?;
        // The command connection and the pub/sub subscription must be up for fan-out, and the
        // presence's own connection for presence.
        let pings =
            async { tokio::join!(redis.conn.ping(), redis.presence.ping()) == (true, true) };
        Some(redis.broker.connected() && within(READY_WITHIN, pings).await)
    };
    let (store_ok, redis_ok) = tokio::join!(store, redis);
    let mut body = json!({"ready": store_ok, "store": if store_ok { "ok" } else { "unreachable" }});
    if let Some(redis_ok) = redis_ok {
        body["redis"] = json!(if redis_ok { "ok" } else { "unreachable" });
        body["ready"] = json!(store_ok && redis_ok);
    }
    let status = if body["ready"] == true {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let body = app.service.metrics.render();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Parses an optional positive integer query parameter with a JSON error naming it.
fn query_number<T: std::str::FromStr>(
    q: &HashMap<String, String>,
    name: &str,
) -> Result<Option<T>, ChatError> {
    match q.get(name).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| ChatError::BadRequest(format!("{name} must be a positive integer"))),
    }
}

/// A request body, or why it could not be read (too large: 413 with a JSON error body).
type Body = Result<Bytes, BytesRejection>;

fn parse_json<T: for<'de> Deserialize<'de>>(app: &App, body: Body) -> Result<T, ChatError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ChatError::BodyTooLarge {
            max: app.service.settings.limits.max_frame_bytes,
        },
        _ => ChatError::BadRequest(rejection.body_text()),
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ChatError::BadRequest(format!("invalid JSON body: {e}")))
}

async fn history(
    State(app): State<Arc<App>>,
    AuthUser(who): AuthUser,
    Path(room): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        let limit = query_number::<u32>(&q, "limit")?;
        let before = query_number::<i64>(&q, "before")?;
        app.service.history(&who, &room, before, limit).await
    }
    .await;
    // The service's page holds the socket's message objects; REST shows its own.
    let result = result.and_then(|page| {
        crate::wire::rest_page(&page).ok_or_else(|| {
            tracing::error!("a history page is not the JSON the service builds");
            ChatError::Internal
        })
    });
    match result {
        Ok(page) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (
                    header::CACHE_CONTROL,
                    "private, max-age=3, stale-while-revalidate=5",
                ),
            ],
            page,
        )
            .into_response(),
        Err(e) => error_response(&app, e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    content: String,
    #[serde(rename = "clientMsgId", default)]
    client_msg_id: Option<String>,
    /// The seq of the message this one replies to.
    #[serde(rename = "replyTo", default)]
    reply_to: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EditBody {
    content: String,
    #[serde(rename = "clientChangeId", default)]
    client_change_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModerationBody {
    #[serde(rename = "moderationStatus")]
    moderation_status: String,
}

/// The answer to a change of a message: 200 with the message (REST object) in its current state.
fn change_response(app: &App, outcome: Result<crate::store::Changed, ChatError>) -> Response {
    match outcome {
        Ok(changed) => Json(crate::protocol::ChangeResult {
            message: crate::wire::rest_message(&changed.message),
            change: changed.change.as_ref().map(crate::wire::wire_change),
            duplicate: changed.duplicate,
        })
        .into_response(),
        Err(e) => error_response(app, e),
    }
}

/// `PATCH …/messages/{messageId}` with `{"content","clientChangeId"?}`: edit one's message.
async fn edit_message(
    State(app): State<Arc<App>>,
    AuthUser(who): AuthUser,
    Path((room, message)): Path<(String, String)>,
    body: Body,
) -> Response {
    let outcome = async {
        let body: EditBody = parse_json(&app, body)?;
        app.service
            .edit(
                &who,
                &room,
                Target::Id(message),
                &body.content,
                body.client_change_id.as_deref(),
            )
            .await
    }
    .await;
    change_response(&app, outcome)
}

/// `DELETE …/messages/{messageId}`: one's own message, any for ADMIN and SERVICE.
async fn delete_message(
    State(app): State<Arc<App>>,
    AuthUser(who): AuthUser,
    Path((room, message)): Path<(String, String)>,
) -> Response {
    let outcome = app
        .service
        .delete_message(&who, &room, Target::Id(message))
        .await;
    change_response(&app, outcome)
}

/// `PUT …/messages/{messageId}/reactions/{emoji}`.
async fn react(
    State(app): State<Arc<App>>,
    AuthUser(who): AuthUser,
    Path((room, message, emoji)): Path<(String, String, String)>,
) -> Response {
    let outcome = app
        .service
        .react(&who, &room, Target::Id(message), &emoji, true)
        .await;
    change_response(&app, outcome)
}

/// `DELETE …/messages/{messageId}/reactions/{emoji}`.
async fn unreact(
    State(app): State<Arc<App>>,
    AuthUser(who): AuthUser,
    Path((room, message, emoji)): Path<(String, String, String)>,
) -> Response {
    let outcome = app
        .service
        .react(&who, &room, Target::Id(message), &emoji, false)
        .await;
    change_response(&app, outcome)
}

/// `PUT …/messages/{messageId}/moderation` with `{"moderationStatus"}` (management API).
async fn moderate(
    State(app): State<Arc<App>>,
    AuthUser(who): AuthUser,
    Path((room, message)): Path<(String, String)>,
    body: Body,
) -> Response {
    let outcome = async {
        let body: ModerationBody = parse_json(&app, body)?;
        app.service
            .moderate(&who, &room, Target::Id(message), &body.moderation_status)
            .await
    }
    .await;
    change_response(&app, outcome)
}

async fn send(
    State(app): State<Arc<App>>,
    AuthUser(who): AuthUser,
    Path(room): Path<String>,
    body: Body,
) -> Response {
    let result = async {
        let body: SendBody = parse_json(&app, body)?;
        app.service
            .send(
                &who,
                &room,
                &body.content,
                body.client_msg_id.as_deref(),
                body.reply_to,
                Door::Rest,
            )
            .await
    }
    .await;
    match result {
        Ok(inserted) => {
            let status = if inserted.duplicate {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            let body = json!({
                "message": crate::wire::rest_message(&inserted.message),
                "duplicate": inserted.duplicate,
            });
            (status, Json(body)).into_response()
        }
        Err(e) => error_response(&app, e),
    }
}

/// The caller's rooms with unread counts and last messages (`?limit=`).
async fn my_rooms(
    State(app): State<Arc<App>>,
    AuthUser(who): AuthUser,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        let limit = query_number::<u32>(&q, "limit")?;
        app.service.my_rooms(&who, limit).await
    }
    .await;
    match result {
        Ok(rooms) => Json(crate::wire::rest_rooms(&rooms)).into_response(),
        Err(e) => error_response(&app, e),
    }
}

/// Who is online in the room (`?cursor=&limit=`), as the socket's `presence`.
async fn presence(
    State(app): State<Arc<App>>,
    AuthUser(who): AuthUser,
    Path(room): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        let limit = query_number::<u32>(&q, "limit")?;
        let cursor = q
            .get("cursor")
            .map(String::as_str)
            .filter(|c| !c.is_empty());
        app.service.presence(&who, &room, cursor, limit).await
    }
    .await;
    match result {
        Ok(page) => Json(page).into_response(),
        Err(e) => error_response(&app, e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MarkReadBody {
    seq: i64,
}

async fn mark_read(
    State(app): State<Arc<App>>,
    AuthUser(who): AuthUser,
    Path(room): Path<String>,
    body: Body,
) -> Response {
    let result = async {
        let body: MarkReadBody = parse_json(&app, body)?;
        app.service.mark_read(&who, &room, body.seq).await
    }
    .await;
    match result {
        Ok(seq) => Json(json!({"room": room, "seq": seq})).into_response(),
        Err(e) => error_response(&app, e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRoomBody {
    #[serde(default)]
    id: Option<String>,
    name: String,
}

async fn create_room(State(app): State<Arc<App>>, AuthUser(who): AuthUser, body: Body) -> Response {
    let result = async {
        let body: CreateRoomBody = parse_json(&app, body)?;
        app.service
            .create_room(&who, body.id.as_deref(), &body.name)
            .await
    }
    .await;
    match result {
        Ok(room) => (
            StatusCode::CREATED,
            Json(json!({"room": {"id": room.id, "name": room.name, "lastSeq": room.last_seq}})),
        )
            .into_response(),
        Err(e) => error_response(&app, e),
    }
}

async fn add_member(
    State(app): State<Arc<App>>,
    AuthUser(who): AuthUser,
    Path((room, user)): Path<(String, String)>,
) -> Response {
    match app.service.add_member(&who, &room, &user).await {
        Ok(added) => {
            let status = if added {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (
                status,
                Json(json!({"roomId": room, "userId": user, "added": added})),
            )
                .into_response()
        }
        Err(e) => error_response(&app, e),
    }
}

async fn remove_member(
    State(app): State<Arc<App>>,
    AuthUser(who): AuthUser,
    Path((room, user)): Path<(String, String)>,
) -> Response {
    match app.service.remove_member(&who, &room, &user).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error_response(&app, ChatError::NotFound("membership")),
        Err(e) => error_response(&app, e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenBody {
    #[serde(rename = "userId", default)]
    user_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    role: Option<Role>,
    #[serde(rename = "ttlSecs", default)]
    ttl_secs: Option<i64>,
}

/// Dev mode only: mints a token. The route does not exist when a key is configured.
async fn dev_token(State(app): State<Arc<App>>, body: Body) -> Response {
    let body: DevTokenBody = match parse_json(&app, body) {
        Ok(b) => b,
        Err(e) => return error_response(&app, e),
    };
    let name = body
        .name
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty());
    let user = body
        .user_id
        .or_else(|| name.map(|n| n.to_lowercase().replace(char::is_whitespace, "-")))
        .unwrap_or_else(|| format!("guest-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    let ttl = body.ttl_secs.unwrap_or(3600).clamp(1, 7 * 24 * 3600);
    match app.service.dev_token(
        &user,
        name.or(Some(&user)),
        body.role.unwrap_or_default(),
        ttl,
    ) {
        Some(token) => Json(json!({"token": token, "userId": user})).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

// The demo page (dev mode only) and the browser SDK it loads, embedded in the binary.
// `no-cache`: the browser revalidates, so a rebuilt gateway never serves a stale page.

const JS: &str = "text/javascript; charset=utf-8";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn demo_page() -> Response {
    asset(
        "text/html; charset=utf-8",
        include_str!("../demo/index.html"),
    )
}

async fn demo_script() -> Response {
    asset(JS, include_str!("../demo/app.js"))
}

async fn demo_style() -> Response {
    asset("text/css; charset=utf-8", include_str!("../demo/app.css"))
}

async fn sdk_script() -> Response {
    asset(JS, include_str!("../sdk/chat-gateway.js"))
}
