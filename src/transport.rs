//! One WebSocket connection: a reader task (this module's [`Connection`]) and a writer task.
//!
//! Life of a connection, in stages:
//! 1. **handshake**: the upgrade is refused (HTTP 503) when the node holds `server.max_connections`;
//!    otherwise it waits for a turn of connection churn (held until the socket starts reading
//!    frames), and the socket authenticates with a token from the `token` query parameter, the
//!    `Authorization` header, or its first `auth` frame (within `auth.auth_timeout_ms`).
//! 2. **ready loop**: one `select!` over inbound frames, token expiry, close requests and shutdown.
//!    Requests are handled one at a time, in order; all writes go through the bounded outbox to
//!    the writer task, which also sends heartbeat pings and reaps silent sockets.
//! 3. **cleanup**: in a turn of connection churn (see `crate::admission`), leave every room,
//!    release the user's connection slot, let the writer send the close frame (none when the peer
//!    is gone). The first task to end cancels the other. Cleanup runs however the ready loop
//!    ended, a panic in a request handler included (the socket is then closed with 1011).

use std::cmp;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;
use tokio::time::{Instant as TokioInstant, sleep_until};

use crate::App;
use crate::auth::{AuthError, Identity};
use crate::error::ChatError;
use crate::protocol::{
    self, AuthResult, ChangeResult, ClientFrame, ErrorBody, JoinResult, MarkReadResult, PongResult,
    Push, RequestId, RoomResult, SendResult, ServerFrame, close, code,
};
use crate::rooms::{Closer, Conn, ConnShared, Outbox, OutboxReader, outbox};
use crate::service::Door;
use crate::store::{Changed, Target};

/// How long the socket's own replies may wait for room in its outbox before it counts as slow.
const REPLY_PATIENCE: Duration = Duration::from_secs(5);
/// Frames the writer takes from the outbox per write (one flush, usually one syscall).
const WRITE_BATCH: usize = 64;

/// Everything the reader task owns for one socket.
pub struct Connection {
    app: Arc<App>,
    id: u64,
    out: Outbox,
    /// Milliseconds since `epoch` when the client was last heard from (any frame, pongs too).
    last_seen: Arc<AtomicU64>,
    epoch: Instant,
    /// Set once authenticated.
    session: Option<Session>,
    _permit: OwnedSemaphorePermit,
}

struct Session {
    identity: Identity,
    conn: Conn,
    warned: bool,
    /// Rooms this socket is typing in: when the signal lapses, and when it was last broadcast.
    typing: HashMap<String, (TokioInstant, TokioInstant)>,
    /// Typing broadcasts in the current one-second window (start of window, count).
    typing_window: (TokioInstant, u32),
}

/// What the reader's one timer is set for (see [`Connection::next_timer`]).
#[derive(Debug, Clone, Copy)]
enum Timer {
    /// Not authenticated within `auth.auth_timeout_ms`: close with 4001.
    AuthTimeout,
    /// The token's `exp` (plus leeway) passed without a refresh: close with 4003.
    TokenExpired,
    /// Time for the `session_expiring` push.
    ExpiryWarning,
    /// Time to re-ask the memberships of the joined rooms.
    MembershipRecheck,
    /// A typing signal was not refreshed in time.
    TypingLapse,
}

/// Most typing broadcasts one socket may cause per second; more are refused (`rate_limited`).
const TYPING_BROADCASTS_PER_SECOND: u32 = 5;

impl Connection {
    /// Starts the connection's writer task and returns the reader: a future that runs the
    /// connection to its end. `query_token` came with the upgrade request, if any.
    ///
    /// Not an `async fn`, so that the socket is split before the future exists: an idle socket's
    /// task holds that future, which then keeps no room for the unsplit `WebSocket`.
    pub fn run(
        app: Arc<App>,
        socket: WebSocket,
        query_token: Option<String>,
        permit: OwnedSemaphorePermit,
        turn: OwnedSemaphorePermit,
    ) -> impl Future<Output = ()> + Send + 'static {
        let id = app.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let (sink, mut stream) = socket.split();
        let closer = Arc::new(Closer::new());
        let (out, queued) = outbox(app.service.settings.limits.outbound_queue, closer.clone());
        let epoch = Instant::now();
        let last_seen = Arc::new(AtomicU64::new(0));
        let writer = tokio::spawn(write_loop(
            sink,
            queued,
            closer,
            app.service.settings.heartbeat.interval(),
            last_seen.clone(),
            epoch,
        ));
        app.service.metrics.connections.inc();
        app.service.metrics.connections_opened.inc();
        let mut connection = Connection {
            app,
            id,
            out,
            last_seen,
            epoch,
            session: None,
            _permit: permit,
        };
        async move {
            // Boxed, like every request in the ready loop, so they do not size the idle task.
            if let Some(token) = query_token {
                Box::pin(connection.authenticate(None, &token)).await;
            }
            // The upgrade's turn of churn ends here: from now on the socket waits for its client.
            drop(turn);
            // A panic in a handler must not skip the cleanup below: the user's connection slot,
            // the rooms' member entries (which keep the writer alive) and presence depend on it.
            let ended = std::panic::AssertUnwindSafe(connection.ready_loop(&mut stream))
                .catch_unwind()
                .await;
            if let Err(panic) = ended {
                let what = panic
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("a panic");
                tracing::error!(
                    conn = connection.id,
                    panic = what,
                    "connection task panicked; cleaning up"
                );
                connection.app.service.metrics.connection_panics.inc();
                connection
                    .out
                    .closer
                    .close(close::INTERNAL_ERROR, "internal error");
            }
            // On the churn lane, like the connection's upgrade (see `crate::admission`). Boxed:
            // it runs once, and need not size the future an idle socket's task holds.
            let app = connection.app.clone();
            let cleanup = Box::pin(async move {
                connection.cleanup(stream, writer).await;
                connection.app.service.metrics.connections.dec();
            });
            app.churn.run(cleanup).await;
        }
    }

    async fn ready_loop(&mut self, stream: &mut SplitStream<WebSocket>) {
        let settings = &self.app.service.settings;
        let auth_deadline =
            TokioInstant::now() + Duration::from_millis(settings.auth.auth_timeout_ms);
        let warning = Duration::from_secs(settings.auth.expiry_warning_secs);
        let closer = self.out.closer.clone();
        let shutdown = self.app.shutdown.clone();
        let ttl = Duration::from_secs(settings.auth.membership_ttl_secs.max(1));
        let mut recheck_at = TokioInstant::now() + ttl;
        // While idle, this loop's future is what the socket's task holds, so it stays small: one
        // timer for the earliest deadline, and the work a frame or a timer starts is boxed (one
        // allocation per request instead of every idle socket carrying the largest request).
        loop {
            let (deadline, timer) = self.next_timer(auth_deadline, recheck_at, warning);
            tokio::select! {
                biased;
                _ = closer.cancelled() => break,
                _ = shutdown.cancelled() => {
                    closer.close(close::SERVICE_RESTART, "server shutting down; reconnect and resume");
                    break;
                }
                _ = sleep_until(deadline) => match timer {
                    Timer::AuthTimeout => {
                        closer.close(close::AUTH_TIMEOUT, "authentication timeout");
                        break;
                    }
                    Timer::TokenExpired => {
                        closer.close(close::TOKEN_EXPIRED, "token expired");
                        break;
                    }
                    Timer::ExpiryWarning => self.warn_expiry(),
                    Timer::MembershipRecheck => {
                        Box::pin(self.recheck_memberships()).await;
                        recheck_at = TokioInstant::now() + ttl;
                    }
                    Timer::TypingLapse => Box::pin(self.lapse_typing()).await,
                },
                frame = stream.next() => {
                    self.last_seen.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                    match frame {
                        None => {
                            closer.peer_gone();
                            break;
                        }
                        Some(Ok(Message::Close(_))) => break,
                        Some(Ok(Message::Text(text))) => Box::pin(self.handle_text(text)).await,
                        Some(Ok(Message::Binary(_))) => {
                            let why = "binary frames are not supported; send JSON text";
                            Box::pin(self.reply_error(None, code::BAD_FRAME, why, None)).await
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Err(e)) => {
                            match read_failure(e) {
                                ReadFailure::TooBig => {
                                    closer.close(close::MESSAGE_TOO_BIG, "frame too large")
                                }
                                ReadFailure::InvalidUtf8 => closer.close(
                                    close::INVALID_PAYLOAD,
                                    "a text frame was not valid UTF-8",
                                ),
                                ReadFailure::PeerGone => closer.peer_gone(),
                                ReadFailure::Protocol => {
                                    closer.close(close::PROTOCOL_ERROR, "WebSocket protocol error")
                                }
                            }
                            break;
                        }
                    }
                }
            }
        }
    }

    /// The earliest deadline of the connection and what it is for. Before authentication only
    /// the auth timeout counts; after it, the token's expiry, the warning ahead of it (once per
    /// token), the membership recheck and the first typing signal to lapse.
    fn next_timer(
        &self,
        auth_deadline: TokioInstant,
        recheck_at: TokioInstant,
        warning: Duration,
    ) -> (TokioInstant, Timer) {
        let Some(s) = &self.session else {
            return (auth_deadline, Timer::AuthTimeout);
        };
        // Warned ahead of `exp` itself (the close waits for the leeway on top).
        let warn_at = (!s.warned).then(|| {
            let exp = deadline_of(s.identity.expires_at);
            (
                exp.checked_sub(warning).unwrap_or(exp),
                Timer::ExpiryWarning,
            )
        });
        let lapse_at = s.typing.values().map(|(lapses, _)| *lapses).min();
        let expiry = (deadline_of(s.identity.valid_until), Timer::TokenExpired);
        [
            warn_at,
            Some((recheck_at, Timer::MembershipRecheck)),
            lapse_at.map(|at| (at, Timer::TypingLapse)),
        ]
        .into_iter()
        .flatten()
        // On a tie the earlier one in this order wins, the expiry first.
        .fold(expiry, |next, other| {
            cmp::min_by_key(next, other, |(at, _)| *at)
        })
    }

    fn warn_expiry(&mut self) {
        if let Some(s) = self.session.as_mut() {
            s.warned = true;
            let frame = Push::SessionExpiring {
                expires_at: s.identity.expires_at,
            };
            self.out.push(protocol::encode(&frame).into());
        }
    }

    /// Leaves the rooms, releases the user's slot and ends the writer, in a turn of churn (a
    /// storm of disconnects waits for turns instead of crowding the runtime). When the peer is
    /// gone, the socket is closed within the turn too; otherwise the writer may take up to 2 s
    /// to say goodbye to the client, after the turn.
    async fn cleanup(&mut self, stream: SplitStream<WebSocket>, writer: JoinHandle<()>) {
        if let Some((code, _)) = self.out.closer.reason() {
            self.app.service.metrics.close(close_label(code));
        }
        let turn = self.app.service.churn_turn().await;
        self.leave_everything().await;
        // The writer ends on the cancelled token. To a peer that is gone it says nothing, so the
        // socket closes within the turn; saying goodbye to one that is there may wait for it,
        // which is no churn work.
        self.out.closer.cancel();
        let turn = self.out.closer.is_peer_gone().then_some(turn);
        drop(stream);
        let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
        drop(turn);
    }

    async fn leave_everything(&mut self) {
        let typing: Vec<String> = self
            .session
            .as_ref()
            .map(|s| s.typing.keys().cloned().collect())
            .unwrap_or_default();
        for room in typing {
            self.stop_typing(&room).await;
        }
        if let Some(session) = self.session.take() {
            let rooms: Vec<Arc<str>> = session.conn.rooms.lock().unwrap().iter().cloned().collect();
            for room in rooms {
                self.app.service.leave(&session.conn, &room).await;
            }
            self.app.user_connections.release(&session.identity.user_id);
        }
    }

    async fn handle_text(&mut self, text: Utf8Bytes) {
        if let Some(before_frame) = &self.app.service.settings.faults.before_frame {
            before_frame(text.as_str());
        }
        let frame = match protocol::decode(text.as_str()) {
            Ok(frame) => frame,
            Err(e) => {
                return self
                    .reply_error(e.id.as_ref(), e.code, &e.message, None)
                    .await;
            }
        };
        if let ClientFrame::Auth { id, token } = &frame {
            return self.authenticate(Some(id), token).await;
        }
        let Some(session) = &self.session else {
            let id = frame.id();
            return self
                .reply_error(
                    Some(id),
                    code::NOT_AUTHENTICATED,
                    "send an auth frame first",
                    None,
                )
                .await;
        };
        let app = self.app.clone();
        let service = &app.service;
        let identity = session.identity.clone();
        let conn = session.conn.clone();
        match frame {
            ClientFrame::Auth { .. } => unreachable!("handled above"),
            ClientFrame::Ping { id } => {
                let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                self.reply(&id, PongResult { server_time: now }).await;
            }
            ClientFrame::Join { id, room, since } => {
                // On the churn lane: a join is churn work (see `crate::admission`).
                let joined = {
                    let (service, conn, room) = (service.clone(), conn.clone(), room.clone());
                    app.churn
                        .run(async move { service.join(&identity, &conn, &room, since).await })
                        .await
                };
                match joined {
                    Ok(plan) => {
                        let senders =
                            serde_json::value::RawValue::from_string(plan.senders.clone())
                                .expect("the room assembles valid JSON");
                        let result = JoinResult {
                            room: &room,
                            head: plan.head,
                            missed: plan.catch_up.len(),
                            reload: plan.reload,
                            senders: &senders,
                        };
                        self.reply(&id, result).await;
                        for frame in &plan.catch_up {
                            // Removed from the room meanwhile: the `removed` push ends it.
                            if !conn.rooms.lock().unwrap().contains(room.as_str())
                                || !self.out.push_paced(frame.clone(), REPLY_PATIENCE).await
                            {
                                return;
                            }
                        }
                        service.finish_join(&plan, &conn, REPLY_PATIENCE).await;
                    }
                    Err(e) => self.reply_room_error(&conn, &id, &room, e).await,
                }
            }
            ClientFrame::Leave { id, room } => {
                self.stop_typing(&room).await;
                service.leave(&conn, &room).await;
                self.reply(&id, RoomResult { room: &room }).await;
            }
            ClientFrame::Send {
                id,
                room,
                content,
                client_msg_id,
                reply_to,
            } => {
                match service
                    .send(
                        &identity,
                        &room,
                        &content,
                        Some(&client_msg_id),
                        reply_to,
                        Door::Ws,
                    )
                    .await
                {
                    Ok(inserted) => {
                        // Sending ends typing in that room.
                        self.stop_typing(&room).await;
                        let result = SendResult {
                            message: crate::wire::socket_message(&inserted.message),
                            duplicate: inserted.duplicate,
                        };
                        self.reply(&id, result).await;
                    }
                    Err(e) => self.reply_room_error(&conn, &id, &room, e).await,
                }
            }
            ClientFrame::Edit {
                id,
                room,
                seq,
                content,
                client_change_id,
            } => {
                let edited = service
                    .edit(
                        &identity,
                        &room,
                        Target::Seq(seq),
                        &content,
                        Some(&client_change_id),
                    )
                    .await;
                self.reply_change(&conn, &id, &room, edited).await;
            }
            ClientFrame::Delete { id, room, seq } => {
                let deleted = service
                    .delete_message(&identity, &room, Target::Seq(seq))
                    .await;
                self.reply_change(&conn, &id, &room, deleted).await;
            }
            ClientFrame::React {
                id,
                room,
                seq,
                emoji,
            } => {
                let reacted = service
                    .react(&identity, &room, Target::Seq(seq), &emoji, true)
                    .await;
                self.reply_change(&conn, &id, &room, reacted).await;
            }
            ClientFrame::Unreact {
                id,
                room,
                seq,
                emoji,
            } => {
                let unreacted = service
                    .react(&identity, &room, Target::Seq(seq), &emoji, false)
                    .await;
                self.reply_change(&conn, &id, &room, unreacted).await;
            }
            ClientFrame::MarkRead { id, room, seq } => {
                match service.mark_read(&identity, &room, seq).await {
                    Ok(seq) => self.reply(&id, MarkReadResult { room: &room, seq }).await,
                    Err(e) => self.reply_room_error(&conn, &id, &room, e).await,
                }
            }
            ClientFrame::Presence {
                id,
                room,
                cursor,
                limit,
            } => {
                match service
                    .presence(&identity, &room, cursor.as_deref(), limit)
                    .await
                {
                    Ok(result) => self.reply(&id, result).await,
                    Err(e) => self.reply_room_error(&conn, &id, &room, e).await,
                }
            }
            ClientFrame::Rooms { id, limit } => match service.my_rooms(&identity, limit).await {
                Ok(rooms) => self.reply(&id, crate::wire::socket_rooms(&rooms)).await,
                Err(e) => self.reply_chat_error(&id, e).await,
            },
            ClientFrame::Typing { id, room, typing } => match self.typing(&room, typing).await {
                Ok(()) => self.reply(&id, RoomResult { room: &room }).await,
                Err(e) => self.reply_chat_error(&id, e).await,
            },
            ClientFrame::History {
                id,
                room,
                before,
                limit,
            } => match service.history(&identity, &room, before, limit).await {
                // The page is JSON text: built by this gateway, or read back from Redis and
                // checked there (src/cache/redis.rs). Framed as it is, not parsed again.
                Ok(page) => {
                    let frame = protocol::encode_result_json(&id, &page);
                    self.out.push_wait(frame.into(), REPLY_PATIENCE).await;
                }
                Err(e) => self.reply_room_error(&conn, &id, &room, e).await,
            },
        }
    }

    /// Answers a change request (edit, delete, react, unreact) with the message's current state.
    async fn reply_change(
        &self,
        conn: &Conn,
        id: &RequestId,
        room: &str,
        outcome: Result<Changed, ChatError>,
    ) {
        match outcome {
            Ok(changed) => {
                let result = ChangeResult {
                    message: crate::wire::socket_message(&changed.message),
                    change: changed.change.as_ref().map(crate::wire::wire_change),
                    duplicate: changed.duplicate,
                };
                self.reply(id, result).await;
            }
            Err(e) => self.reply_room_error(conn, id, room, e).await,
        }
    }

    /// Handles a typing signal: forwards starts and stops, and a repeated start at most once per
    /// `signals.typing_refresh_ms`; every start pushes back the moment the signal lapses.
    async fn typing(&mut self, room: &str, typing: bool) -> Result<(), ChatError> {
        let signals = &self.app.service.settings.signals;
        let (timeout, refresh) = (
            Duration::from_millis(signals.typing_timeout_ms),
            Duration::from_millis(signals.typing_refresh_ms),
        );
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        if !session.conn.rooms.lock().unwrap().contains(room) {
            return Err(ChatError::NotJoined);
        }
        let now = TokioInstant::now();
        let broadcast = match (typing, session.typing.get(room)) {
            (true, Some((_, last))) => now.duration_since(*last) >= refresh,
            (true, None) => true,
            (false, previous) => previous.is_some(),
        };
        if !broadcast {
            if let Some(entry) = session.typing.get_mut(room) {
                entry.0 = now + timeout;
            }
            return Ok(());
        }
        let window = &mut session.typing_window;
        if now.duration_since(window.0) >= Duration::from_secs(1) {
            *window = (now, 0);
        }
        if window.1 >= TYPING_BROADCASTS_PER_SECOND {
            let retry_after = Duration::from_secs(1).saturating_sub(now.duration_since(window.0));
            return Err(ChatError::RateLimited { retry_after });
        }
        window.1 += 1;
        if typing {
            session
                .typing
                .insert(room.to_string(), (now + timeout, now));
        } else {
            session.typing.remove(room);
        }
        let (identity, conn) = (session.identity.clone(), session.conn.clone());
        self.app
            .service
            .typing(&identity, &conn, room, typing)
            .await;
        Ok(())
    }

    /// Ends this socket's typing in `room`, if it was typing there.
    async fn stop_typing(&mut self, room: &str) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        if session.typing.remove(room).is_some() {
            let (identity, conn) = (session.identity.clone(), session.conn.clone());
            self.app.service.typing(&identity, &conn, room, false).await;
        }
    }

    /// Ends the typing signals that were not refreshed in time.
    async fn lapse_typing(&mut self) {
        let now = TokioInstant::now();
        let lapsed: Vec<String> = match &self.session {
            Some(s) => s
                .typing
                .iter()
                .filter(|(_, (lapses, _))| *lapses <= now)
                .map(|(r, _)| r.clone())
                .collect(),
            None => return,
        };
        for room in lapsed {
            self.stop_typing(&room).await;
        }
    }

    /// Replies with an error about `room`. A refusal for a room this socket has joined means the
    /// membership was removed behind our back: the socket stops receiving the room first.
    async fn reply_room_error(&self, conn: &Conn, id: &RequestId, room: &str, e: ChatError) {
        if matches!(e, ChatError::Forbidden | ChatError::RoomNotFound) {
            self.drop_room(conn, room).await;
        }
        self.reply_chat_error(id, e).await;
    }

    /// Detaches the socket from a room it may no longer read and tells the client.
    async fn drop_room(&self, conn: &Conn, room: &str) {
        if conn.rooms.lock().unwrap().contains(room) {
            self.app.service.leave(conn, room).await;
            let frame = Push::Removed {
                room,
                reason: "membership removed",
            };
            self.out.push(protocol::encode(&frame).into());
        }
    }

    /// Re-asks the membership of every joined room (answers are cached for the membership TTL,
    /// so this reaches the store about once per TTL), detaching the socket from rooms it lost.
    async fn recheck_memberships(&self) {
        let Some(session) = &self.session else { return };
        let rooms: Vec<Arc<str>> = session.conn.rooms.lock().unwrap().iter().cloned().collect();
        for room in rooms {
            if !self
                .app
                .service
                .still_allowed(&session.identity, &room)
                .await
            {
                self.drop_room(&session.conn, &room).await;
            }
        }
    }

    /// First authentication (creates the session) or a refresh (same user, new expiry).
    async fn authenticate(&mut self, id: Option<&RequestId>, token: &str) {
        let verified = self.app.service.authenticate(token);
        if let Some(session) = &mut self.session {
            let result = verified.and_then(|identity| {
                if identity.user_id == session.identity.user_id {
                    Ok(identity)
                } else {
                    Err(AuthError::SubjectMismatch)
                }
            });
            match result {
                Ok(identity) => {
                    session.identity = identity;
                    session.warned = false;
                    let (user_id, expires_at) = (
                        session.identity.user_id.clone(),
                        session.identity.expires_at,
                    );
                    if let Some(id) = id {
                        self.reply(
                            id,
                            AuthResult {
                                user_id: &user_id,
                                expires_at,
                            },
                        )
                        .await;
                    }
                }
                Err(e) => self.reply_chat_error_opt(id, ChatError::Auth(e)).await,
            }
            return;
        }
        let identity = match verified {
            Ok(identity) => identity,
            Err(e) => {
                self.reply_chat_error_opt(id, ChatError::Auth(e)).await;
                self.out.closer.close(close::INVALID_TOKEN, "invalid token");
                return;
            }
        };
        let max = self.app.service.settings.limits.max_connections_per_user;
        if !self.app.user_connections.acquire(&identity.user_id, max) {
            self.out.closer.close(
                close::TOO_MANY_CONNECTIONS,
                "too many connections for this user",
            );
            return;
        }
        let conn = Arc::new(ConnShared::new(
            self.id,
            identity.user_id.clone(),
            identity.name.clone(),
            self.out.clone(),
        ));
        if let Some(id) = id {
            self.reply(
                id,
                AuthResult {
                    user_id: &identity.user_id,
                    expires_at: identity.expires_at,
                },
            )
            .await;
        }
        self.session = Some(Session {
            identity,
            conn,
            warned: false,
            typing: HashMap::new(),
            typing_window: (TokioInstant::now(), 0),
        });
    }

    async fn reply<T: serde::Serialize>(&self, id: &RequestId, result: T) {
        let frame = protocol::encode(&ServerFrame::Result { id, result });
        self.out.push_wait(frame.into(), REPLY_PATIENCE).await;
    }

    async fn reply_error(
        &self,
        id: Option<&RequestId>,
        code: &'static str,
        message: &str,
        retry_after_ms: Option<u64>,
    ) {
        self.app.service.metrics.error(code);
        let frame = Push::Error {
            id,
            error: ErrorBody {
                code,
                message,
                retry_after_ms,
            },
        };
        self.out
            .push_wait(protocol::encode(&frame).into(), REPLY_PATIENCE)
            .await;
    }

    async fn reply_chat_error(&self, id: &RequestId, e: ChatError) {
        self.reply_chat_error_opt(Some(id), e).await
    }

    async fn reply_chat_error_opt(&self, id: Option<&RequestId>, e: ChatError) {
        let retry = e.retry_after_ms();
        self.reply_error(id, e.code(), &e.to_string(), retry).await
    }
}

/// Drains the outbox into the socket, batching what is queued into one flush; pings every
/// heartbeat interval. At each tick, a socket that has sent nothing at all (not even the pong)
/// since the previous ping is closed: a peer that dies is reaped within two intervals.
///
/// A push wakes this task once, so what a wake-up polls is paid per push and per socket (1,000
/// times for a message to a room of 1,000). The close and the heartbeat's timer stay registered
/// with the task and are polled again only once due, which an atomic read and a clock read tell:
/// polled at every wake-up, their token and timer were 6.8 % of a fanning-out gateway's CPU.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    queued: OutboxReader,
    closer: Arc<Closer>,
    heartbeat: Duration,
    last_seen: Arc<AtomicU64>,
    epoch: Instant,
) {
    // A block: the wait for the close borrows `closer`, which the goodbye then takes.
    {
        enum Next {
            Closed,
            Frame(Option<Utf8Bytes>),
            Tick,
        }
        let closed = closer.cancelled();
        tokio::pin!(closed);
        let tick = sleep_until(TokioInstant::now() + heartbeat);
        tokio::pin!(tick);
        let mut registered = false;
        // When the last ping was sent (ms since `epoch`).
        let mut last_ping: Option<u64> = None;
        loop {
            // The gates are read at every poll: the close, then the queue, then the heartbeat.
            let next = std::future::poll_fn(|cx| {
                if !registered {
                    // Once, with this task's waker: the close and the tick wake it from now on.
                    registered = true;
                    if closed.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Next::Closed);
                    }
                    let _ = tick.as_mut().poll(cx);
                }
                if closer.is_cancelled() && closed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Next::Closed);
                }
                if let Poll::Ready(frame) = queued.poll_next(cx) {
                    return Poll::Ready(Next::Frame(frame));
                }
                if TokioInstant::now() >= tick.deadline() && tick.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Next::Tick);
                }
                Poll::Pending
            })
            .await;
            match next {
                Next::Closed | Next::Frame(None) => break,
                Next::Frame(Some(frame)) => {
                    // What else is already queued goes out with it (no batch buffer is kept: an
                    // idle socket holds none).
                    let write = async {
                        sink.feed(Message::Text(frame)).await?;
                        for _ in 1..WRITE_BATCH {
                            let Some(frame) = queued.try_next() else {
                                break;
                            };
                            sink.feed(Message::Text(frame)).await?;
                        }
                        queued.taken();
                        sink.flush().await
                    };
                    // The write first: a frame taken from the queue just as the socket is closed
                    // (the error reply that explains the close) goes out if the socket takes it,
                    // and is abandoned only while the peer is not reading.
                    tokio::select! {
                        biased;
                        result = write => if result.is_err() { closer.cancel(); break },
                        _ = &mut closed => break,
                    }
                }
                Next::Tick => {
                    let now_ms = epoch.elapsed().as_millis() as u64;
                    if let Some(pinged) = last_ping
                        && last_seen.load(Ordering::Relaxed) < pinged
                    {
                        closer.close(close::HEARTBEAT_TIMEOUT, "heartbeat timeout");
                        break;
                    }
                    last_ping = Some(now_ms);
                    // The next tick a whole interval after this one ran, however late it was; the
                    // timer is registered again at the next poll.
                    tick.as_mut().reset(TokioInstant::now() + heartbeat);
                    registered = false;
                    let ping = sink.send(Message::Ping(Default::default()));
                    tokio::select! {
                        result = ping => if result.is_err() { closer.cancel(); break },
                        _ = &mut closed => break,
                    }
                }
            }
        }
    }
    // Boxed: the goodbye runs once, and need not size the future an idle writer holds.
    Box::pin(say_goodbye(sink, queued, closer, heartbeat)).await;
}

/// Ends a closed socket's writing: sends what was queued before the close (an error reply, the
/// ack of an in-flight send) and the close frame, then closes the sink.
///
/// A slow consumer's queue is dropped, not sent, but the frames already written to its socket
/// (the kernel's buffers, and a frame half written) are on their way and cannot be taken back:
/// the close frame can only follow them. It waits up to `slow_patience` (the heartbeat interval)
/// for the client to read that far; a client that reads again within it sees its backlog, then
/// 4008. One that does not (a frozen tab) sees the connection end without a close frame (1006).
/// The socket's rooms and slots were released before this; only the socket waits.
async fn say_goodbye(
    mut sink: SplitSink<WebSocket, Message>,
    queued: OutboxReader,
    closer: Arc<Closer>,
    slow_patience: Duration,
) {
    if closer.is_peer_gone() {
        // Nothing to say to a peer that is not there (a close frame would only draw a reset).
        return;
    }
    if let Some((code, reason)) = closer.reason() {
        // A slow consumer's queue is not waited for: its socket is not being read.
        let flush_queued = async {
            if code != close::SLOW_CONSUMER {
                while let Some(frame) = queued.try_next() {
                    sink.feed(Message::Text(frame)).await?;
                }
            }
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            sink.send(Message::Close(Some(frame))).await
        };
        let patience = if code == close::SLOW_CONSUMER {
            slow_patience
        } else {
            Duration::from_secs(1)
        };
        let _ = tokio::time::timeout(patience, flush_queued).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}

fn deadline_of(expires_at: i64) -> TokioInstant {
    let left = expires_at - chrono::Utc::now().timestamp();
    TokioInstant::now() + Duration::from_secs(left.max(0) as u64)
}

/// Why reading a socket failed, as far as the close goes.
enum ReadFailure {
    /// A frame over `limits.max_frame_bytes`: closed with 1009.
    TooBig,
    /// A text frame that is not UTF-8: closed with 1007, as RFC 6455 requires.
    InvalidUtf8,
    /// The connection is gone (reset, or ended without a close frame): nothing is written to it.
    PeerGone,
    /// The peer broke the WebSocket protocol otherwise: closed with 1002.
    Protocol,
}

fn read_failure(e: axum::Error) -> ReadFailure {
    use tungstenite::error::ProtocolError;
    match e.into_inner().downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => ReadFailure::TooBig,
        Some(tungstenite::Error::Utf8(_)) => ReadFailure::InvalidUtf8,
        Some(
            tungstenite::Error::Io(_)
            | tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed
            | tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake),
        ) => ReadFailure::PeerGone,
        _ => ReadFailure::Protocol,
    }
}

fn close_label(code: u16) -> &'static str {
    match code {
        close::MESSAGE_TOO_BIG => "message_too_big",
        close::INVALID_PAYLOAD => "invalid_utf8",
        close::PROTOCOL_ERROR => "protocol_error",
        close::INTERNAL_ERROR => "internal_error",
        close::SERVICE_RESTART => "shutdown",
        close::HEARTBEAT_TIMEOUT => "heartbeat_timeout",
        close::AUTH_TIMEOUT => "auth_timeout",
        close::INVALID_TOKEN => "invalid_token",
        close::TOKEN_EXPIRED => "token_expired",
        close::SLOW_CONSUMER => "slow_consumer",
        close::TOO_MANY_CONNECTIONS => "too_many_connections",
        _ => "other",
    }
}

/// Sockets per user on this node, so one user cannot exhaust the node's connection slots.
#[derive(Default)]
pub struct UserConnections {
    counts: dashmap::DashMap<String, usize>,
}

impl UserConnections {
    /// Takes a slot for the user; false when they already hold `max`.
    pub fn acquire(&self, user: &str, max: usize) -> bool {
        let mut count = self.counts.entry(user.to_string()).or_insert(0);
        if *count >= max {
            return false;
        }
        *count += 1;
        true
    }

    pub fn release(&self, user: &str) {
        self.counts.remove_if_mut(user, |_, count| {
            *count = count.saturating_sub(1);
            *count == 0
        });
    }
}
