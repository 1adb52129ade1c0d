//! The chat service: every operation and every rule, once. The WebSocket handler (`transport`)
//! and the REST routes (`http`) are thin adapters over it, so membership, validation, rate limits,
//! sequences, idempotency and the cache behave the same through both doors.

use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use std::collections::HashMap;

use chrono::{DateTime, SubsecRound, Utc};
use tokio::sync::Notify;

use crate::auth::{AuthError, Authenticator, Identity, Role, TokenMinter};
use crate::broker::PresenceDiff;
use crate::broker::{Broker, RoomEvent};
use crate::cache::{HistoryCache, Latest, MissToken, Tail};
use crate::config::Settings;
use crate::error::ChatError;
use crate::membership::MembershipCache;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::presence::PresenceChanges;
use crate::protocol::PresenceResult;
use crate::protocol::{self, HistoryPage, Push};
use crate::queue::{Job, JobQueue};

/// Most users in one page of a presence list.
const PRESENCE_PAGE: u32 = 100;
/// Most presence transitions recorded in one round trip to the presence backend.
const PRESENCE_BATCH: usize = 1000;
/// How long the presence task waits before recording again after the backend failed.
const PRESENCE_RETRY: Duration = Duration::from_secs(1);
use crate::ratelimit::{RateLimiter, Refused};
use crate::rooms::{Conn, RoomHub, RoomRegistry};
use crate::store::changes::{self, ChangeOp};
use crate::store::{
    Access, ChangeRequest, Changed, Event, Inserted, NewMessage, Quote, Refusal, Room, RoomSummary,
    Store, StoreError, Target,
};
use crate::wire::{self, change_frame, publish_frame, published};

/// Read marks not yet queued: (room, user) -> (highest seq, when).
pub type PendingReads = HashMap<(String, String), (i64, DateTime<Utc>)>;

/// Which door a request came through (a metrics label).
#[derive(Debug, Clone, Copy)]
pub enum Door {
    Ws,
    Rest,
}

impl Door {
    fn label(self) -> &'static str {
        match self {
            Door::Ws => "ws",
            Door::Rest => "rest",
        }
    }
}

/// What a join produced: the reply facts and the catch-up to queue before going live.
pub struct JoinPlan {
    pub hub: Arc<RoomHub>,
    pub head: i64,
    pub catch_up: Vec<Utf8Bytes>,
    pub reload: bool,
    /// The sender profiles the room's pushes may leave out (a JSON object, for the reply).
    pub senders: String,
}

pub struct ChatService {
    pub settings: Settings,
    pub store: Arc<dyn Store>,
    pub broker: Arc<dyn Broker>,
    pub cache: Arc<dyn HistoryCache>,
    /// A stored message's cache append and publish (one round trip on Redis).
    pub announcer: Arc<dyn crate::broker::Announcer>,
    /// Wakes the outbox relay after each stored message.
    pub outbox_wake: Arc<Notify>,
    /// Who is online where (in-process or Redis).
    pub presence: Arc<dyn Presence>,
    /// The job queue, for read marks (messages' jobs come through the outbox).
    pub queue: Arc<dyn JobQueue>,
    /// Read marks not yet queued, latest per (room, user). Locked only to record or take.
    pub read_marks: std::sync::Mutex<PendingReads>,
    /// Members per room, for the read-receipt size limit (cached a minute).
    pub room_sizes: moka::sync::Cache<String, i64>,
    pub limiter: Arc<dyn RateLimiter>,
    pub registry: Arc<RoomRegistry>,
    pub membership: Arc<MembershipCache>,
    pub metrics: Arc<Metrics>,
    pub authenticator: Authenticator,
    /// Present only in dev mode (no key configured).
    pub dev_minter: Option<TokenMinter>,
    /// Turns for connection churn: upgrades, joins and disconnect cleanups take one each
    /// (`server.churn_concurrency` at once, first come first served), so that thousands of them
    /// at once queue here, parked, instead of ahead of the established sockets' messages.
    pub churn: Arc<tokio::sync::Semaphore>,
}

/// Room ids are opaque text: 1..=128 bytes, no control characters.
pub fn validate_room_id(room: &str) -> Result<(), ChatError> {
    if room.is_empty() || room.len() > 128 || room.chars().any(char::is_control) {
        return Err(ChatError::BadRequest(
            "room id must be 1..=128 bytes without control characters".into(),
        ));
    }
    Ok(())
}

impl ChatService {
    /// Waits for a turn of connection churn (see [`ChatService::churn`]).
    pub async fn churn_turn(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.churn
            .clone()
            .acquire_owned()
            .await
            .expect("the churn semaphore is never closed")
    }

    pub fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        self.authenticator.verify(token)
    }

    fn dev_open_rooms(&self) -> bool {
        self.dev_minter.is_some() && self.settings.auth.dev_open_rooms
    }

    /// May `who` use `room`? `fresh` bypasses the membership cache (joins do).
    async fn authorize(&self, who: &Identity, room: &str, fresh: bool) -> Result<(), ChatError> {
        validate_room_id(room)?;
        let cached = if fresh {
            None
        } else {
            self.membership.get(room, &who.user_id)
        };
        let access = match cached {
            Some(access) => access,
            None => {
                let access = self.store.access(room, &who.user_id).await?;
                self.membership.put(room, &who.user_id, access);
                access
            }
        };
        match (access, who.role) {
            (Access::Member, _) => Ok(()),
            (Access::NotMember, Role::Admin) => Ok(()),
            (_, _) if self.dev_open_rooms() => {
                self.store.ensure_room(room, room).await?;
                self.store.add_member(room, &who.user_id).await?;
                self.membership.put(room, &who.user_id, Access::Member);
                Ok(())
            }
            (Access::NoRoom, _) => Err(ChatError::RoomNotFound),
            (Access::NotMember, _) => Err(ChatError::Forbidden),
        }
    }

    /// Whether `who` may still read `room` (false only on a definite no; an unreachable store
    /// keeps the socket in the room).
    pub async fn still_allowed(&self, who: &Identity, room: &str) -> bool {
        !matches!(
            self.authorize(who, room, false).await,
            Err(ChatError::Forbidden | ChatError::RoomNotFound)
        )
    }

    /// Joins `conn` to `room`, preparing the replay of what was missed after `since`.
    #[tracing::instrument(skip_all, fields(user = %who.user_id, room))]
    pub async fn join(
        &self,
        who: &Identity,
        conn: &Conn,
        room: &str,
        since: Option<i64>,
    ) -> Result<JoinPlan, ChatError> {
        let _turn = self.churn_turn().await;
        self.authorize(who, room, true).await?;
        let room_key: Arc<str> = Arc::from(room);
        {
            let rooms = conn.rooms.lock().unwrap();
            let max = self.settings.limits.max_rooms_per_connection;
            if !rooms.contains(room) && rooms.len() >= max {
                return Err(ChatError::TooManyRooms { max });
            }
        }
        // A repeated join starts over: `attach` replaces this socket's member entry, so a join
        // that fails below leaves the earlier one in place.
        let (hub, attached) = loop {
            let hub = self.registry.hub(room);
            let ready = hub
                .ready
                .get_or_try_init(|| async {
                    self.broker.subscribe(room).await.map_err(|e| {
                        tracing::warn!(error = %e, "subscribe failed");
                        ChatError::Unavailable
                    })?;
                    let head = match self.store.room_head(room).await {
                        Ok(Some(head)) => head,
                        failed => {
                            // Undo the subscription; the caller drops the hub.
                            self.broker.unsubscribe(room).await;
                            return Err(match failed {
                                Err(e) => e.into(),
                                _ => ChatError::RoomNotFound,
                            });
                        }
                    };
                    self.registry.initialize(&hub, head);
                    Ok::<(), ChatError>(())
                })
                .await;
            if let Err(e) = ready {
                // Nobody may keep a hub that never became ready (it would buffer forever).
                self.registry.discard_unready(room, &hub);
                return Err(e);
            }
            if let Some(attached) = self.registry.attach(&hub, conn, since) {
                break (hub, attached);
            }
        };
        conn.rooms.lock().unwrap().insert(room_key);

        let limit = self.settings.limits.catch_up_limit;
        let delivered = attached.delivered;
        let mut plan = JoinPlan {
            hub,
            head: delivered,
            catch_up: Vec::new(),
            reload: false,
            senders: attached.senders,
        };
        if let Some(since) = since.filter(|&s| s < delivered) {
            if delivered - since.max(0) > i64::from(limit) {
                plan.reload = true;
            } else if let Some(missed) = attached.missed {
                // A short absence: the room's recent messages in memory cover it.
                self.metrics.resumes_from_memory.inc();
                plan.catch_up = missed;
            } else {
                self.metrics.resumes_from_store.inc();
                let missed = self
                    .store
                    .events_between(room, since, delivered, limit)
                    .await;
                match missed {
                    Ok(rows) => {
                        plan.catch_up = rows
                            .iter()
                            .map(|e| match e {
                                // With their profiles: the hub may not have told them.
                                Event::Message(m) => publish_frame(m).with_profile(),
                                Event::Change(c) => change_frame(c).frame.clone(),
                            })
                            .collect()
                    }
                    Err(e) => {
                        self.leave(conn, room).await;
                        return Err(e.into());
                    }
                }
            }
        }
        Ok(plan)
    }

    /// Ends a join: the member receives what was buffered during the catch-up, then live.
    pub async fn finish_join(&self, plan: &JoinPlan, conn: &Conn, patience: std::time::Duration) {
        self.registry.go_live(&plan.hub, conn, patience).await;
    }

    /// Detaches the socket from the room (no error if it was not joined).
    pub async fn leave(&self, conn: &Conn, room: &str) {
        let was_joined = conn.rooms.lock().unwrap().remove(room);
        if was_joined && self.registry.detach(room, conn.id) {
            self.broker.unsubscribe(room).await;
        }
    }

    /// Validates, authorizes, rate-limits, stores (one atomic insert), appends the message to the
    /// room's cached history, publishes, and queues side effects. Returns once the message is
    /// durable.
    ///
    /// From the store on, the send runs in a task of its own: a caller that goes away (a REST
    /// client hanging up, a socket closing) cannot stop it between the commit and the publish,
    /// which would leave a stored message unannounced to the room's sockets.
    #[tracing::instrument(skip_all, fields(user = %who.user_id, room))]
    pub async fn send(
        self: &Arc<Self>,
        who: &Identity,
        room: &str,
        content: &str,
        client_msg_id: Option<&str>,
        reply_to: Option<i64>,
        door: Door,
    ) -> Result<Inserted, ChatError> {
        let started = Instant::now();
        let content = self.valid_content(content, "clientMsgId", client_msg_id)?;
        self.authorize(who, room, false).await?;
        let reply = match reply_to {
            Some(seq) => match self.quote(room, seq).await {
                Ok(quote) => Some(quote),
                // A retry of a reply stored before its original went away: answered with it.
                Err(refused) => {
                    let stored = match client_msg_id {
                        Some(id) => {
                            self.store
                                .find_by_client_msg_id(room, &who.user_id, id)
                                .await?
                        }
                        None => None,
                    };
                    return match stored {
                        Some(message) => Ok(Inserted {
                            message,
                            duplicate: true,
                        }),
                        None => Err(refused),
                    };
                }
            },
            None => None,
        };
        let inserted = match self.limiter.check_send(&who.user_id, room).await {
            Ok(()) => {
                let msg = NewMessage {
                    id: uuid::Uuid::now_v7().to_string(),
                    room_id: room.to_string(),
                    sender_id: who.user_id.clone(),
                    sender_name: who.name.clone(),
                    sender_avatar_url: who.avatar.clone(),
                    content: content.to_string(),
                    created_at: Utc::now().trunc_subsecs(3),
                    client_msg_id: client_msg_id.map(str::to_string),
                    reply: reply.clone(),
                };
                let service = self.clone();
                tokio::spawn(async move { service.store_and_announce(msg).await })
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %e, "a send's task failed");
                        ChatError::Internal
                    })??
            }
            // A retry of a message that was stored (its ack got lost) is answered, not refused:
            // only refused sends pay for this lookup.
            Err(refused) => match client_msg_id {
                Some(id) => match self
                    .store
                    .find_by_client_msg_id(room, &who.user_id, id)
                    .await?
                {
                    Some(message) => {
                        // Its first attempt may have been cut off before its append.
                        self.append_to_history(&message).await;
                        Inserted {
                            message,
                            duplicate: true,
                        }
                    }
                    None => return Err(self.refuse(refused)),
                },
                None => return Err(self.refuse(refused)),
            },
        };
        if !inserted.duplicate {
            self.metrics
                .messages_received
                .get_or_create(&vec![("door", door.label())])
                .inc();
        }
        self.metrics
            .send_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(inserted)
    }

    /// Stores a message (one atomic insert), appends it to the room's cached history and
    /// publishes it; side effects start from the outbox row the insert wrote, if any.
    async fn store_and_announce(&self, msg: NewMessage) -> Result<Inserted, ChatError> {
        let room = msg.room_id.clone();
        let reply = msg.reply.clone();
        let mut inserted = self.store.insert_message(msg).await?;
        // A store that returns the stored row leaves the quote out: it is the one the send
        // checked, or, for a retry's original that quotes another message, read again.
        if let Some(seq) = inserted.message.reply_to_seq
            && inserted.message.reply.is_none()
        {
            match reply.filter(|q| q.seq == seq) {
                Some(quote) => inserted.message.reply = Some(quote),
                None => {
                    crate::store::quote_replies(
                        &*self.store,
                        &room,
                        std::slice::from_mut(&mut inserted.message),
                    )
                    .await?
                }
            }
        }
        let m = &inserted.message;
        // Serialized once: for the cached history and for the push.
        let json = wire::message_json(m);
        // Before the ack, so a read after it shows the message. A retry answered with the
        // original appends it too: its first attempt may have been cut off before this line.
        let publish = (!inserted.duplicate).then(|| published(&room, &json));
        self.announcer
            .announce(&room, &json, m.is_visible(), publish)
            .await;
        if !inserted.duplicate && self.settings.side_effects() {
            // The outbox row was written with the message; the relay queues its side effects.
            self.outbox_wake.notify_one();
        }
        Ok(inserted)
    }

    /// Trimmed content that a message may hold (a send's or an edit's), with its idempotency key
    /// (`key_name`, for the error) checked.
    fn valid_content<'c>(
        &self,
        content: &'c str,
        key_name: &str,
        key: Option<&str>,
    ) -> Result<&'c str, ChatError> {
        let content = content.trim();
        if content.is_empty() {
            return Err(ChatError::ContentEmpty);
        }
        // Postgres text cannot hold NUL; refuse it on every store so both behave alike.
        if content.contains('\0') || key.is_some_and(|id| id.contains('\0')) {
            return Err(ChatError::BadRequest(format!(
                "content and {key_name} must not contain NUL characters"
            )));
        }
        let max = self.settings.limits.max_content_chars;
        if content.chars().nth(max).is_some() {
            return Err(ChatError::ContentTooLong { max });
        }
        let max_key = self.settings.limits.max_client_msg_id_bytes;
        if let Some(id) = key
            && (id.is_empty() || id.len() > max_key)
        {
            return Err(ChatError::BadRequest(format!(
                "{key_name} must be 1..={max_key} bytes"
            )));
        }
        Ok(content)
    }

    /// The quote of the message a reply names: a visible, not deleted message of the room.
    async fn quote(&self, room: &str, seq: i64) -> Result<Quote, ChatError> {
        // `messages_at`, not `message`: the original's own quote is not needed here.
        match self.store.messages_at(room, &[seq]).await?.pop() {
            Some(m) if !m.is_visible() => Err(ChatError::Message(Refusal::NotFound)),
            Some(m) if m.deleted_at.is_some() => Err(ChatError::Message(Refusal::Deleted)),
            Some(m) => Ok(Quote::of(&m)),
            None => Err(ChatError::Message(Refusal::NotFound)),
        }
    }

    /// Edits the sender's own message (section 15 of the protocol).
    #[tracing::instrument(skip_all, fields(user = %who.user_id, room))]
    pub async fn edit(
        self: &Arc<Self>,
        who: &Identity,
        room: &str,
        target: Target,
        content: &str,
        client_change_id: Option<&str>,
    ) -> Result<Changed, ChatError> {
        let content = self.valid_content(content, "clientChangeId", client_change_id)?;
        self.authorize(who, room, false).await?;
        // Edits spend the send budget: an edit is pushed to the room like a message.
        if let Err(refused) = self.limiter.check_send(&who.user_id, room).await {
            return Err(self.refuse(refused));
        }
        let window = self.settings.limits.edit_window_secs;
        let op = ChangeOp::Edit {
            content: content.to_string(),
            client_change_id: client_change_id.map(str::to_string),
            window: (window > 0).then(|| Duration::from_secs(window)),
        };
        self.change(who, room, target, op).await
    }

    /// Deletes a message: the sender's own, or any for ADMIN and SERVICE (which needs no
    /// membership: it is the management API's role).
    #[tracing::instrument(skip_all, fields(user = %who.user_id, room))]
    pub async fn delete_message(
        self: &Arc<Self>,
        who: &Identity,
        room: &str,
        target: Target,
    ) -> Result<Changed, ChatError> {
        match who.role {
            Role::Service => validate_room_id(room)?,
            _ => self.authorize(who, room, false).await?,
        }
        let any = matches!(who.role, Role::Admin | Role::Service);
        self.change(who, room, target, ChangeOp::Delete { any })
            .await
    }

    /// Adds (`add`) or removes the user's reaction `emoji` on a message.
    #[tracing::instrument(skip_all, fields(user = %who.user_id, room))]
    pub async fn react(
        self: &Arc<Self>,
        who: &Identity,
        room: &str,
        target: Target,
        emoji: &str,
        add: bool,
    ) -> Result<Changed, ChatError> {
        if !changes::is_emoji(emoji) {
            return Err(ChatError::UnknownReaction);
        }
        self.authorize(who, room, false).await?;
        if let Err(refused) = self.limiter.check_reaction(&who.user_id).await {
            return Err(self.refuse(refused));
        }
        let op = if add {
            ChangeOp::React {
                emoji: emoji.to_string(),
                max_keys: self.settings.limits.max_reaction_keys,
            }
        } else {
            ChangeOp::Unreact {
                emoji: emoji.to_string(),
            }
        };
        self.change(who, room, target, op).await
    }

    /// Sets a message's moderation status (management API, role SERVICE): `REJECTED` removes it
    /// from every screen and from history.
    #[tracing::instrument(skip_all, fields(user = %who.user_id, room))]
    pub async fn moderate(
        self: &Arc<Self>,
        who: &Identity,
        room: &str,
        target: Target,
        status: &str,
    ) -> Result<Changed, ChatError> {
        Self::require_service(who)?;
        validate_room_id(room)?;
        let status = match status {
            "REJECTED" => "REJECTED",
            "APPROVED" => "APPROVED",
            _ => {
                return Err(ChatError::BadRequest(
                    "moderationStatus must be REJECTED or APPROVED".into(),
                ));
            }
        };
        self.change(who, room, target, ChangeOp::Moderate { status })
            .await
    }

    /// Stores a change (its own seq, one transaction), drops what the history cache held of the
    /// room and publishes it, before the answer. In a task of its own, as a send's store and
    /// announce: a caller that goes away cannot stop it between the commit and the publish.
    async fn change(
        self: &Arc<Self>,
        who: &Identity,
        room: &str,
        target: Target,
        op: ChangeOp,
    ) -> Result<Changed, ChatError> {
        // Message ids are opaque text the store cannot hold with NUL: not one of its ids.
        if let Target::Id(id) = &target
            && (id.is_empty() || id.len() > 256 || id.chars().any(char::is_control))
        {
            return Err(ChatError::Message(Refusal::NotFound));
        }
        let req = ChangeRequest {
            room_id: room.to_string(),
            target,
            actor: who.user_id.clone(),
            op,
            at: Utc::now().trunc_subsecs(3),
        };
        let kind = req.kind();
        let service = self.clone();
        let changed = tokio::spawn(async move {
            let changed = service.store.change_message(req).await?;
            if let Some(change) = &changed.change {
                // A retried edit's first attempt may have stopped before this line: drop again.
                service.cache.changed(&change.room_id).await;
                if !changed.duplicate
                    && let Err(e) = service
                        .broker
                        .publish(&change.room_id, RoomEvent::Message(change_frame(change)))
                        .await
                {
                    // The room's other nodes find it by the head check or the next event.
                    tracing::warn!(error = %e, "change not published");
                }
            }
            Ok::<_, ChatError>(changed)
        })
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "a change's task failed");
            ChatError::Internal
        })??;
        if !changed.duplicate {
            self.metrics
                .messages_changed
                .get_or_create(&vec![("kind", kind)])
                .inc();
        }
        Ok(changed)
    }

    /// Appends a stored message to its room's cached history (when it is served at all).
    async fn append_to_history(&self, m: &crate::store::Message) {
        if m.is_visible() {
            self.cache.append(&m.room_id, &wire::message_json(m)).await;
        }
    }

    /// Counts a send refused by a rate limit, and the error it gets.
    fn refuse(&self, refused: Refused) -> ChatError {
        self.metrics
            .rate_limited
            .get_or_create(&vec![("scope", refused.scope.label())])
            .inc();
        ChatError::RateLimited {
            retry_after: refused.retry_after,
        }
    }

    /// A page of history as JSON (`HistoryPage` of the socket's message objects), oldest first,
    /// from the cache when possible. The REST door shows it in its own objects
    /// (`wire::rest_page`).
    #[tracing::instrument(skip_all, fields(user = %who.user_id, room))]
    pub async fn history(
        &self,
        who: &Identity,
        room: &str,
        before: Option<i64>,
        limit: Option<u32>,
    ) -> Result<Utf8Bytes, ChatError> {
        self.authorize(who, room, false).await?;
        let limits = &self.settings.limits;
        let limit = limit
            .unwrap_or(limits.history_default_limit)
            .clamp(1, limits.history_max_limit);
        let page = match before {
            None => self.latest_page(room, limit).await?,
            Some(before) if before < 1 => {
                return Err(ChatError::BadRequest(
                    "before must be a positive sequence number".into(),
                ));
            }
            Some(before) => self.older_page(room, before, limit).await?,
        };
        self.with_my_reactions(who, room, page).await
    }

    /// A page with the reader's own reactions added (`myReactions`), when any of its messages has
    /// reactions: pages are shared by every reader (and cached), the reader's reactions are not.
    async fn with_my_reactions(
        &self,
        who: &Identity,
        room: &str,
        page: Utf8Bytes,
    ) -> Result<Utf8Bytes, ChatError> {
        // A raw `"reactions":` is only ever a key: quotes inside strings are escaped.
        if !page.as_str().contains(r#""reactions":"#) {
            return Ok(page);
        }
        let parsed: HistoryPage<'_, protocol::SocketMessage<'_>> =
            serde_json::from_str(page.as_str()).map_err(|e| {
                tracing::error!(error = %e, "a history page does not parse");
                ChatError::Internal
            })?;
        let (Some(first), Some(last)) = (parsed.messages.first(), parsed.messages.last()) else {
            return Ok(page);
        };
        let mine = self
            .store
            .my_reactions(room, &who.user_id, first.seq, last.seq)
            .await?;
        let mut by_seq: Vec<(i64, Vec<String>)> = Vec::new();
        for (seq, emoji) in mine {
            match by_seq.last_mut() {
                Some((s, keys)) if *s == seq => keys.push(emoji),
                _ => by_seq.push((seq, vec![emoji])),
            }
        }
        let mut json = String::from(r#","myReactions":{"#);
        for (i, (seq, keys)) in by_seq.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            let _ = write!(json, r#""{seq}":{}"#, protocol::encode(keys));
        }
        json.push_str("}}");
        let body = page.as_str().strip_suffix('}').unwrap_or(page.as_str());
        Ok(format!("{body}{json}").into())
    }

    /// The newest `limit` messages, cut from the room's cached tail (which sends keep current) or
    /// read from the store, which refills the tail.
    async fn latest_page(&self, room: &str, limit: u32) -> Result<Utf8Bytes, ChatError> {
        let token = match self.cache.latest(room, limit).await {
            Latest::Hit { page, refresh } => {
                self.metrics.history_hits.inc();
                if let Some(token) = refresh {
                    self.refresh_tail(token);
                }
                return Ok(page);
            }
            Latest::Miss(token) => token,
        };
        self.metrics.history_misses.inc();
        let tail = read_tail(&*self.store, room, self.settings.limits.history_tail_len()).await?;
        let page = tail
            .latest_page(room, limit)
            .expect("a tail read from the store reaches the room's start or is longer than a page");
        self.cache.fill(token, tail).await;
        Ok(page)
    }

    /// Re-reads a room's tail in the background, so readers keep hitting while it is refreshed.
    fn refresh_tail(&self, token: MissToken) {
        self.metrics.history_refreshes.inc();
        let (store, cache, len) = (
            self.store.clone(),
            self.cache.clone(),
            self.settings.limits.history_tail_len(),
        );
        tokio::spawn(async move {
            match read_tail(&*store, token.room(), len).await {
                Ok(tail) => cache.fill(token, tail).await,
                Err(e) => tracing::debug!(error = %e, "latest history page not refreshed"),
            }
        });
    }

    /// `limit` messages older than `before`: no new message changes them, so they are cached
    /// once every sequence below `before` is taken (the page ends at `before - 1`).
    async fn older_page(
        &self,
        room: &str,
        before: i64,
        limit: u32,
    ) -> Result<Utf8Bytes, ChatError> {
        if let Some(page) = self.cache.older(room, limit, before).await {
            self.metrics.history_hits.inc();
            return Ok(page);
        }
        self.metrics.history_misses.inc();
        // One row more than asked tells whether an older page exists.
        let mut rows = self.store.history(room, Some(before), limit + 1).await?;
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let settled = rows.first().is_some_and(|newest| newest.seq == before - 1);
        rows.reverse();
        let page = protocol::encode_exact(&HistoryPage {
            room: room.into(),
            next_before: if more {
                rows.first().map(|m| m.seq)
            } else {
                None
            },
            messages: rows.iter().map(wire::socket_message).collect(),
            my_reactions: None,
        });
        if settled {
            self.cache
                .put_older(room, limit, before, page.clone())
                .await;
        }
        Ok(page)
    }

    /// Records that `who` read `room` up to `seq`: coalesced on this node and written through the
    /// job queue every `signals.read_flush_ms`; a read receipt goes to the room at once.
    pub async fn mark_read(&self, who: &Identity, room: &str, seq: i64) -> Result<i64, ChatError> {
        if seq < 0 {
            return Err(ChatError::BadRequest("seq must not be negative".into()));
        }
        self.authorize(who, room, false).await?;
        {
            let mut pending = self.read_marks.lock().unwrap();
            let mark = pending
                .entry((room.to_string(), who.user_id.clone()))
                .or_insert((seq, Utc::now()));
            *mark = (mark.0.max(seq), Utc::now());
        }
        if self.receipts_wanted(room).await {
            let frame = protocol::encode(&Push::Read {
                room,
                user_id: &who.user_id,
                seq,
            });
            let event = RoomEvent::Ephemeral {
                frame: frame.into(),
                skip_user: None,
            };
            if let Err(e) = self.broker.publish(room, event).await {
                tracing::debug!(error = %e, "read receipt not broadcast");
            }
        }
        Ok(seq)
    }

    /// Whether read receipts go to this room: enabled, and the room is small enough. Room sizes
    /// are cached for a minute (one count query per room per minute at most).
    async fn receipts_wanted(&self, room: &str) -> bool {
        let signals = &self.settings.signals;
        if !signals.read_receipts {
            return false;
        }
        let size = match self.room_sizes.get(room) {
            Some(size) => size,
            None => match self.store.member_count(room).await {
                Ok(size) => {
                    self.room_sizes.insert(room.to_string(), size);
                    size
                }
                Err(_) => return false,
            },
        };
        size <= signals.read_receipts_max_members
    }

    /// Queues the coalesced read marks (called every `signals.read_flush_ms`, and at shutdown).
    pub async fn flush_read_marks(&self) {
        let pending = std::mem::take(&mut *self.read_marks.lock().unwrap());
        for ((room_id, user_id), (seq, at)) in pending {
            let job = Job::MarkRead {
                room_id,
                user_id,
                seq,
                at,
            };
            if let Err(e) = self.queue.enqueue(job).await {
                tracing::warn!(error = %e, "read mark not queued");
                self.metrics.job("dropped", 1);
            }
        }
    }

    /// Who is online in `room`: the count and a page of users.
    pub async fn presence<'a>(
        &self,
        who: &Identity,
        room: &'a str,
        cursor: Option<&str>,
        limit: Option<u32>,
    ) -> Result<PresenceResult<'a>, ChatError> {
        self.authorize(who, room, false).await?;
        let limit = limit.unwrap_or(PRESENCE_PAGE).clamp(1, PRESENCE_PAGE);
        let unavailable = |e: crate::presence::PresenceError| {
            tracing::warn!(error = %e, "presence unavailable");
            ChatError::Unavailable
        };
        let online = self.presence.count(room).await.map_err(unavailable)?;
        let (users, next_cursor) = self
            .presence
            .list(room, cursor, limit)
            .await
            .map_err(unavailable)?;
        Ok(PresenceResult {
            room,
            online,
            users,
            next_cursor,
        })
    }

    /// Records this node's presence transitions and publishes the diffs they cause, for as long
    /// as the node runs: up to `PRESENCE_BATCH` transitions per round trip to the backend, one
    /// diff per room and batch. A batch the backend refused goes back to wait (behind any newer
    /// transition of the same user and room) and is recorded again after `PRESENCE_RETRY`.
    pub async fn run_presence(self: Arc<Self>, changes: Arc<PresenceChanges>) {
        loop {
            let batch = changes.take(PRESENCE_BATCH);
            if batch.is_empty() {
                changes.pushed().await;
                continue;
            }
            let outcomes = match self.presence.record(&batch).await {
                Ok(outcomes) => outcomes,
                Err(e) => {
                    let changes_waiting = batch.len();
                    tracing::warn!(error = %e, changes_waiting, "presence not recorded; retrying");
                    changes.put_back(batch);
                    tokio::time::sleep(PRESENCE_RETRY).await;
                    continue;
                }
            };
            let mut diffs: HashMap<String, PresenceDiff> = HashMap::new();
            for (change, online) in batch.into_iter().zip(outcomes) {
                let Some(online) = online else { continue };
                let diff = diffs.entry(change.room).or_insert_with(|| PresenceDiff {
                    online,
                    joined: Vec::new(),
                    left: Vec::new(),
                });
                // Recorded in order: the last count is the latest.
                diff.online = online;
                if change.arrived {
                    diff.joined.push(change.user);
                } else {
                    diff.left.push(change.user.user_id);
                }
            }
            let service = &self;
            let publishes = diffs
                .into_iter()
                .map(|(room, diff)| async move { service.publish_presence(&room, diff).await });
            futures::future::join_all(publishes).await;
        }
    }

    pub async fn publish_presence(&self, room: &str, diff: PresenceDiff) {
        if let Err(e) = self
            .broker
            .publish(room, RoomEvent::Presence(Arc::new(diff)))
            .await
        {
            tracing::debug!(error = %e, "presence diff not broadcast");
        }
    }

    /// The user's rooms with read state and last message (two queries, whatever their number),
    /// a last message that is a reply with its quote as history shows it (one more read for
    /// each such room, at once).
    pub async fn my_rooms(
        &self,
        who: &Identity,
        limit: Option<u32>,
    ) -> Result<Vec<RoomSummary>, ChatError> {
        let max = self.settings.signals.max_rooms_listed;
        let limit = limit.unwrap_or(max).clamp(1, max);
        let mut rooms = self.store.my_rooms(&who.user_id, limit).await?;
        let quotes = rooms.iter_mut().filter_map(|summary| {
            let last = summary.last_message.as_mut()?;
            last.reply_to_seq?;
            Some(crate::store::quote_replies(
                &*self.store,
                &summary.id,
                std::slice::from_mut(last),
            ))
        });
        futures::future::try_join_all(quotes).await?;
        Ok(rooms)
    }

    /// Tells the room's other members (on every node) that `who` started or stopped typing.
    /// Ephemeral: lost if the broker is down, which only hides an indicator.
    pub async fn typing(&self, who: &Identity, conn: &Conn, room: &str, typing: bool) {
        let frame = protocol::encode(&Push::Typing {
            room,
            user_id: &who.user_id,
            name: who.name.as_deref(),
            typing,
            expires_in_ms: self.settings.signals.typing_timeout_ms,
        });
        let event = RoomEvent::Ephemeral {
            frame: frame.into(),
            skip_user: Some(conn.user_id.clone()),
        };
        if let Err(e) = self.broker.publish(room, event).await {
            tracing::debug!(error = %e, "typing signal not broadcast");
        }
    }

    fn require_service(who: &Identity) -> Result<(), ChatError> {
        match who.role {
            Role::Service => Ok(()),
            _ => Err(ChatError::RoleRequired("SERVICE")),
        }
    }

    pub async fn create_room(
        &self,
        who: &Identity,
        id: Option<&str>,
        name: &str,
    ) -> Result<Room, ChatError> {
        Self::require_service(who)?;
        let id = id
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        validate_room_id(&id)?;
        let name = name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(ChatError::BadRequest(
                "name must be 1..=200 characters".into(),
            ));
        }
        Ok(self.store.create_room(&id, name).await?)
    }

    pub async fn add_member(
        &self,
        who: &Identity,
        room: &str,
        user: &str,
    ) -> Result<bool, ChatError> {
        Self::require_service(who)?;
        validate_room_id(room)?;
        if user.is_empty() || user.len() > 256 {
            return Err(ChatError::BadRequest(
                "user id must be 1..=256 bytes".into(),
            ));
        }
        let added = self.store.add_member(room, user).await?;
        self.membership.invalidate(room, user);
        Ok(added)
    }

    /// Removes a membership; the user's live sockets on every node stop receiving the room.
    pub async fn remove_member(
        &self,
        who: &Identity,
        room: &str,
        user: &str,
    ) -> Result<bool, ChatError> {
        Self::require_service(who)?;
        validate_room_id(room)?;
        let removed = self.store.remove_member(room, user).await?;
        self.membership.invalidate(room, user);
        if !removed {
            return Ok(false);
        }
        let event = RoomEvent::MemberRemoved {
            user_id: user.to_string(),
        };
        if let Err(e) = self.broker.publish(room, event).await {
            tracing::warn!(error = %e, "member removal not broadcast; other nodes see it after the cache TTL");
        }
        Ok(removed)
    }

    /// Mints a token in dev mode; `None` when a key is configured.
    pub fn dev_token(
        &self,
        user: &str,
        name: Option<&str>,
        role: Role,
        ttl_secs: i64,
    ) -> Option<String> {
        let minter = self.dev_minter.as_ref()?;
        Some(minter.mint(&crate::auth::claims_for(user, name, role, ttl_secs)))
    }
}

/// The room's newest `len` messages, as a cached tail.
async fn read_tail(store: &dyn Store, room: &str, len: usize) -> Result<Tail, StoreError> {
    let rows = store.history(room, None, len as u32).await?;
    Ok(Tail::from_store(&rows, len))
}
