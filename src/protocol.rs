//! The WebSocket wire protocol. This module mirrors `proto-docs/protocol.md`; change both together.
//!
//! Frames are JSON text. A client request carries a client-chosen `id`; the server answers it
//! with exactly one `result` or `error` frame carrying the same `id`. Everything else the server
//! sends is a push (no `id`). Requests on one socket are processed in the order they arrive, so
//! replies come back in request order.

use std::borrow::Cow;
use std::fmt::Write;
use std::ops::Deref;

use axum::extract::ws::Utf8Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

/// A request id as the client sent it (a string or a number), echoed back as it came.
pub type RequestId = serde_json::Value;

/// Frames a client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Authenticate the socket, or refresh its token (same `sub`) before it expires.
    Auth { id: RequestId, token: String },
    /// Join a room; `since` = the last sequence already seen, to receive what was missed.
    Join {
        id: RequestId,
        room: String,
        #[serde(default)]
        since: Option<i64>,
    },
    /// Stop receiving a room's messages on this socket.
    Leave { id: RequestId, room: String },
    /// Persist and fan out a message; a retry with the same `clientMsgId` returns the original.
    Send {
        id: RequestId,
        room: String,
        content: String,
        #[serde(rename = "clientMsgId")]
        client_msg_id: String,
        /// The seq of the message this one replies to.
        #[serde(rename = "replyTo", default)]
        reply_to: Option<i64>,
    },
    /// Edit one's own message (section 15); a retry with the same `clientChangeId` returns the
    /// change stored the first time.
    Edit {
        id: RequestId,
        room: String,
        seq: i64,
        content: String,
        #[serde(rename = "clientChangeId")]
        client_change_id: String,
    },
    /// Delete a message (one's own; any, for ADMIN): it stays as a tombstone.
    Delete {
        id: RequestId,
        room: String,
        seq: i64,
    },
    /// Add a reaction (one emoji) to a message.
    React {
        id: RequestId,
        room: String,
        seq: i64,
        emoji: String,
    },
    /// Remove one's reaction from a message.
    Unreact {
        id: RequestId,
        room: String,
        seq: i64,
        emoji: String,
    },
    /// A page of a room's history, older than `before` (a sequence number), oldest first.
    History {
        id: RequestId,
        room: String,
        #[serde(default)]
        before: Option<i64>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Application-level round trip (the server also sends WebSocket pings on its own).
    Ping { id: RequestId },
    /// Mark the room read up to `seq` (the last message the user has seen).
    MarkRead {
        id: RequestId,
        room: String,
        seq: i64,
    },
    /// The user's rooms with unread counts and last messages, most recently active first.
    Rooms {
        id: RequestId,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// Who is online in the room: the count, and a page of users (`cursor` from the last page).
    Presence {
        id: RequestId,
        room: String,
        #[serde(default)]
        cursor: Option<String>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// "I am typing" (`typing: true`, repeat every few seconds while it lasts) or "I stopped".
    /// Needs the room joined on this socket. Ephemeral: never stored.
    Typing {
        id: RequestId,
        room: String,
        typing: bool,
    },
}

impl ClientFrame {
    pub fn id(&self) -> &RequestId {
        match self {
            ClientFrame::Auth { id, .. }
            | ClientFrame::Join { id, .. }
            | ClientFrame::Leave { id, .. }
            | ClientFrame::Send { id, .. }
            | ClientFrame::Edit { id, .. }
            | ClientFrame::Delete { id, .. }
            | ClientFrame::React { id, .. }
            | ClientFrame::Unreact { id, .. }
            | ClientFrame::History { id, .. }
            | ClientFrame::Typing { id, .. }
            | ClientFrame::MarkRead { id, .. }
            | ClientFrame::Rooms { id, .. }
            | ClientFrame::Presence { id, .. }
            | ClientFrame::Ping { id } => id,
        }
    }
}

/// Frames the server sends.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
// Built to be serialized at once, never stored: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum ServerFrame<'a, T: Serialize> {
    /// The successful answer to the request with the same `id`.
    Result { id: &'a RequestId, result: T },
    /// The failed answer to the request with the same `id` (`null` when the frame had none).
    Error {
        id: Option<&'a RequestId>,
        error: ErrorBody<'a>,
    },
    /// Push: a message in a joined room, in sequence order, exactly once per socket: the
    /// socket's message object without its `id` and `clientMsgId` (the room and `seq` identify
    /// it), with the sender's profile only when that is news to the room ([`message_push`]).
    Message {
        room: &'a str,
        message: SocketMessage<'a>,
    },
    /// Push: a message of a joined room changed (section 15), in sequence order with the room's
    /// messages, exactly once per socket.
    Change {
        room: &'a str,
        change: WireChange<'a>,
    },
    /// Push: this socket no longer receives the room (membership removed).
    Removed { room: &'a str, reason: &'a str },
    /// Push: another member started or stopped typing. A `typing: true` not refreshed within
    /// `expiresInMs` has ended (the typer vanished).
    Typing {
        room: &'a str,
        #[serde(rename = "userId")]
        user_id: &'a str,
        name: Option<&'a str>,
        typing: bool,
        #[serde(rename = "expiresInMs")]
        expires_in_ms: u64,
    },
    /// Push: users came online in the room or went offline (at most one per room per second).
    Presence {
        room: &'a str,
        online: u64,
        joined: &'a [OnlineUser],
        left: &'a [String],
    },
    /// Push: a member read the room up to `seq` (a read receipt).
    Read {
        room: &'a str,
        #[serde(rename = "userId")]
        user_id: &'a str,
        seq: i64,
    },
    /// Push: the token expires soon; send `auth` with a fresh one on this socket.
    SessionExpiring {
        #[serde(rename = "expiresAt")]
        expires_at: i64,
    },
}

/// The `error` object of an error reply.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub code: &'a str,
    pub message: &'a str,
    #[serde(rename = "retryAfterMs", skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// A server frame that is not a `result` (pushes and errors carry no result payload).
pub type Push<'a> = ServerFrame<'a, ()>;

/// Result of `auth`.
#[derive(Debug, Serialize)]
pub struct AuthResult<'a> {
    #[serde(rename = "userId")]
    pub user_id: &'a str,
    #[serde(rename = "expiresAt")]
    pub expires_at: i64,
}

/// Result of `join`. When `reload` is true, `missed` is 0 and the client should refetch history.
#[derive(Debug, Serialize)]
pub struct JoinResult<'a> {
    pub room: &'a str,
    /// The room's last sequence at the moment of joining; live pushes continue after it.
    pub head: i64,
    /// How many `message` pushes follow this reply before live traffic (the catch-up).
    pub missed: usize,
    /// Too many messages were missed to replay (over `limits.catch_up_limit`).
    pub reload: bool,
    /// The profiles of the senders whose pushes may come without one: `{userId: {senderName,
    /// senderAvatarUrl}}` (JSON assembled by the room, see `rooms::Profiles`).
    pub senders: &'a RawValue,
}

#[derive(Debug, Serialize)]
pub struct RoomResult<'a> {
    pub room: &'a str,
}

/// A change of a message (section 15): its place in the room's sequence, the message it changed
/// (`target`), who made it and when, and what it did (the fields of its `kind`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WireChange<'a> {
    pub seq: i64,
    pub target: i64,
    pub kind: &'a str,
    pub by: &'a str,
    /// Milliseconds since the Unix epoch.
    pub ts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
    #[serde(rename = "editedAt", skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<i64>,
    #[serde(rename = "deletedAt", skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub emoji: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
    #[serde(rename = "moderationStatus", skip_serializing_if = "Option::is_none")]
    pub moderation_status: Option<&'a str>,
}

/// Result of `edit`, `delete`, `react` and `unreact` (and their REST routes): the message in its
/// current state, the change stored (`None` when nothing changed), and whether nothing new was
/// stored. `M` is the door's message object.
#[derive(Debug, Serialize)]
pub struct ChangeResult<'a, M> {
    pub message: M,
    pub change: Option<WireChange<'a>>,
    pub duplicate: bool,
}

#[derive(Debug, Serialize)]
pub struct SendResult<'a> {
    pub message: SocketMessage<'a>,
    /// True when this `clientMsgId` had already been stored: nothing new was created.
    pub duplicate: bool,
}

/// One user in a presence list (and in presence pushes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnlineUser {
    #[serde(rename = "userId")]
    pub user_id: String,
    pub name: Option<String>,
}

/// Result of `presence`.
#[derive(Debug, Serialize)]
pub struct PresenceResult<'a> {
    pub room: &'a str,
    pub online: u64,
    pub users: Vec<OnlineUser>,
    #[serde(rename = "nextCursor")]
    pub next_cursor: Option<String>,
}

/// Result of `mark_read`.
#[derive(Debug, Serialize)]
pub struct MarkReadResult<'a> {
    pub room: &'a str,
    pub seq: i64,
}

/// One of the user's rooms: `unread` = `lastSeq` - `lastReadSeq` (never below 0). `M` is the
/// door's message object ([`SocketMessage`] or [`WireMessage`]).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WireRoom<'a, M> {
    pub id: &'a str,
    pub name: &'a str,
    pub last_seq: i64,
    pub last_read_seq: i64,
    pub unread: i64,
    pub last_message: Option<M>,
}

/// Result of `rooms` (and the body of `GET /api/chat/rooms`).
#[derive(Debug, Serialize)]
pub struct RoomsResult<'a, M> {
    pub rooms: Vec<WireRoom<'a, M>>,
}

#[derive(Debug, Serialize)]
pub struct PongResult {
    #[serde(rename = "serverTime")]
    pub server_time: String,
}

/// A history page, oldest first. `nextBefore` is the cursor for the next (older) page. `M` is
/// the door's message object: the socket's pages hold [`SocketMessage`]s, REST's
/// [`WireMessage`]s.
///
/// Older pages are serialized from it; latest pages are assembled from messages serialized once
/// ([`history_page`]), byte for byte what serializing this would give.
#[derive(Debug, Serialize, Deserialize)]
pub struct HistoryPage<'a, M> {
    #[serde(borrow)]
    pub room: Cow<'a, str>,
    pub messages: Vec<M>,
    #[serde(rename = "nextBefore")]
    pub next_before: Option<i64>,
    /// The reader's own reactions on the page's messages, `{"44":["👍"]}` (section 15): added
    /// per reader to pages with reactions (pages are shared, cached, without it).
    #[serde(
        rename = "myReactions",
        borrow,
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub my_reactions: Option<&'a RawValue>,
}

/// One message serialized once (the socket's full message object, [`SocketMessage`] with its
/// `clientMsgId` and profile), with its `seq`: what history pages are assembled from and pushes
/// are cut from. `J` is the text: owned, or borrowed from a cached value.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageJson<J = Utf8Bytes> {
    pub seq: i64,
    pub json: J,
}

/// A message as the socket shows it (section 4): what every receiver needs, its usual values
/// left out (`contentType` "TEXT", `status` "SENT", `moderationStatus` "APPROVED"), the time as
/// milliseconds (`ts`). Serialized in this field order, which [`MessageParts`] relies on: what a
/// push leaves out (`id`, `clientMsgId`, the sender's profile) comes last, so a push is cut from
/// the full object without parsing it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SocketMessage<'a> {
    pub seq: i64,
    #[serde(rename = "senderId", borrow)]
    pub sender_id: Cow<'a, str>,
    #[serde(borrow)]
    pub content: Cow<'a, str>,
    /// Milliseconds since the Unix epoch (the REST object's `createdAt`).
    pub ts: i64,
    #[serde(
        rename = "contentType",
        borrow,
        default = "text",
        skip_serializing_if = "is_text"
    )]
    pub content_type: Cow<'a, str>,
    #[serde(borrow, default = "sent", skip_serializing_if = "is_sent")]
    pub status: Cow<'a, str>,
    #[serde(
        rename = "moderationStatus",
        borrow,
        default = "approved",
        skip_serializing_if = "is_approved"
    )]
    pub moderation_status: Cow<'a, str>,
    /// The quote of the message this one replies to.
    #[serde(
        rename = "replyTo",
        borrow,
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub reply_to: Option<WireQuote<'a>>,
    /// When it was last edited (ms).
    #[serde(rename = "editedAt", default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<i64>,
    /// When it was deleted (ms): a tombstone, `content` is empty.
    #[serde(rename = "deletedAt", default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<i64>,
    /// The seq of its latest change, when it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// Emoji -> count, in the order the keys were first used (stored as this JSON).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub reactions: Option<Reactions<'a>>,
    /// The message id: in send results, history and rooms; not in pushes.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Cow<'a, str>>,
    /// The sender's idempotency key: in send results and history, never in pushes.
    #[serde(
        rename = "clientMsgId",
        borrow,
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub client_msg_id: Option<Cow<'a, str>>,
    /// The sender's profile: `Some` in send results and history (its value may be null), `None`
    /// (absent) in pushes whose receivers know it already.
    #[serde(
        rename = "senderName",
        borrow,
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub sender_name: Option<Option<Cow<'a, str>>>,
    #[serde(
        rename = "senderAvatarUrl",
        borrow,
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub sender_avatar_url: Option<Option<Cow<'a, str>>>,
}

/// A reply's quote of the message it replies to, in that message's current state. Its keys are
/// not the message object's (`name`, not `senderName`; no `id`): [`MessageParts`] finds those by
/// their names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireQuote<'a> {
    pub seq: i64,
    #[serde(rename = "senderId", borrow)]
    pub sender_id: Cow<'a, str>,
    #[serde(borrow, default)]
    pub name: Option<Cow<'a, str>>,
    /// The original's first characters; absent when it is deleted or rejected.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub excerpt: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

fn text() -> Cow<'static, str> {
    Cow::Borrowed("TEXT")
}
fn sent() -> Cow<'static, str> {
    Cow::Borrowed("SENT")
}
fn approved() -> Cow<'static, str> {
    Cow::Borrowed("APPROVED")
}
fn is_text(v: &str) -> bool {
    v == "TEXT"
}
fn is_sent(v: &str) -> bool {
    v == "SENT"
}
fn is_approved(v: &str) -> bool {
    v == "APPROVED"
}

/// Where the fields of a serialized [`SocketMessage`] are, found without parsing it: a raw `,"`
/// (a comma, then an unescaped quote) only ever starts a key, since every quote inside a JSON
/// string is escaped; and the keys a push leaves out come last, in a fixed order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MessageParts<'a> {
    /// `{` through the last field every push carries (without the closing brace).
    pub lean: &'a str,
    /// `,"senderName":…,"senderAvatarUrl":…`, or empty when the object carries no profile.
    pub profile: &'a str,
}

impl<'a> MessageParts<'a> {
    /// Splits a message object serialized from [`SocketMessage`] (`json` may end with more
    /// closing braces than its own: a push).
    pub fn of(json: &'a str) -> Self {
        let body = json.strip_suffix('}').unwrap_or(json);
        let profile_at = body.rfind(r#","senderName":"#);
        let lean_end = [r#","id":"#, r#","clientMsgId":"#]
            .iter()
            .find_map(|key| body.find(key))
            .or(profile_at)
            .unwrap_or(body.len());
        let profile_end = body.trim_end_matches('}').len();
        MessageParts {
            lean: &body[..lean_end],
            profile: profile_at.map_or("", |at| &body[at..profile_end]),
        }
    }
}

/// The JSON of a [`HistoryPage`] of `messages` (oldest first), without serializing any message
/// again: a page costs one copy of its messages' bytes, into one allocation of its exact size.
pub fn history_page<J: Deref<Target = str>>(
    room: &str,
    messages: &[MessageJson<J>],
    next_before: Option<i64>,
) -> Utf8Bytes {
    const OPEN: &str = r#","messages":["#;
    const CLOSE: &str = r#"],"nextBefore":"#;
    let room = JsonString::new(room);
    let json: usize = messages.iter().map(|m| m.json.len()).sum();
    let commas = messages.len().saturating_sub(1);
    let next_before_len = next_before.map_or("null".len(), decimal_len);
    let len = r#"{"room":"#.len()
        + room.len()
        + OPEN.len()
        + json
        + commas
        + CLOSE.len()
        + next_before_len
        + 1;
    let mut page = String::with_capacity(len);
    page.push_str(r#"{"room":"#);
    room.push_to(&mut page);
    page.push_str(OPEN);
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            page.push(',');
        }
        page.push_str(&m.json);
    }
    page.push_str(CLOSE);
    match next_before {
        Some(seq) => write!(page, "{seq}").expect("writing to a String cannot fail"),
        None => page.push_str("null"),
    }
    page.push('}');
    debug_assert_eq!(page.len(), len);
    // Exactly full, so the bytes are handed over without another allocation.
    page.into()
}

/// The `message` push of a message serialized once: what encoding [`Push::Message`] gives with
/// its `id` and `clientMsgId` left out, and its profile only when `with_profile` (the push that
/// tells a room's sockets who the sender is).
pub fn message_push(room: &str, message: &str, with_profile: bool) -> Utf8Bytes {
    const HEAD: &str = r#"{"type":"message","room":"#;
    const MESSAGE: &str = r#","message":"#;
    let parts = MessageParts::of(message);
    let room = JsonString::new(room);
    let profile = if with_profile { parts.profile } else { "" };
    let len = HEAD.len() + room.len() + MESSAGE.len() + parts.lean.len() + profile.len() + 2;
    let mut push = String::with_capacity(len);
    push.push_str(HEAD);
    room.push_to(&mut push);
    push.push_str(MESSAGE);
    push.push_str(parts.lean);
    push.push_str(profile);
    push.push_str("}}");
    debug_assert_eq!(push.len(), len);
    push.into()
}

/// A string as JSON, escaped exactly as serde_json escapes it (room ids rarely need it).
enum JsonString<'a> {
    Plain(&'a str),
    Escaped(String),
}

impl<'a> JsonString<'a> {
    fn new(s: &'a str) -> Self {
        if s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
            JsonString::Escaped(encode(&s))
        } else {
            JsonString::Plain(s)
        }
    }

    /// Its length with the quotes.
    fn len(&self) -> usize {
        match self {
            JsonString::Plain(s) => s.len() + 2,
            JsonString::Escaped(s) => s.len(),
        }
    }

    fn push_to(&self, out: &mut String) {
        match self {
            JsonString::Plain(s) => {
                out.push('"');
                out.push_str(s);
                out.push('"');
            }
            JsonString::Escaped(s) => out.push_str(s),
        }
    }
}

/// How many characters `n` takes in decimal.
fn decimal_len(n: i64) -> usize {
    let sign = usize::from(n < 0);
    sign + n
        .unsigned_abs()
        .checked_ilog10()
        .map_or(1, |d| d as usize + 1)
}

/// A message as the REST routes show it, compatible with the `ChatMessage` JSON of the app the
/// gateway replaces, plus `seq`, `clientMsgId` and `sender` (the REST door's contract: the socket
/// has its own, leaner object, [`SocketMessage`]).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WireMessage<'a> {
    pub id: &'a str,
    pub room_id: &'a str,
    pub seq: i64,
    pub sender_id: &'a str,
    pub sender_name: Option<&'a str>,
    pub sender_avatar_url: Option<&'a str>,
    pub sender: WireSender<'a>,
    pub content: &'a str,
    pub content_type: &'a str,
    pub status: &'a str,
    pub moderation_status: &'a str,
    #[serde(serialize_with = "millis_rfc3339")]
    pub created_at: DateTime<Utc>,
    pub client_msg_id: Option<&'a str>,
    // Section 15, each only when it applies: a message that never changed keeps the app's shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<WireQuote<'a>>,
    #[serde(
        serialize_with = "optional_millis_rfc3339",
        skip_serializing_if = "Option::is_none"
    )]
    pub edited_at: Option<DateTime<Utc>>,
    #[serde(
        serialize_with = "optional_millis_rfc3339",
        skip_serializing_if = "Option::is_none"
    )]
    pub deleted_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reactions: Option<Reactions<'a>>,
}

/// A message's reactions, `{"👍":3}`, passed on as stored (JSON checked when read).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Reactions<'a>(#[serde(borrow)] pub &'a RawValue);

impl PartialEq for Reactions<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WireSender<'a> {
    pub id: &'a str,
    pub name: Option<&'a str>,
    pub avatar_url: Option<&'a str>,
}

fn millis_rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn optional_millis_rfc3339<S: Serializer>(
    t: &Option<DateTime<Utc>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => millis_rfc3339(t, s),
        None => s.serialize_none(),
    }
}

/// WebSocket close codes the server uses (see proto-docs/protocol.md, "Close codes").
pub mod close {
    /// Client asked to close; nothing to do.
    pub const NORMAL: u16 = 1000;
    /// The client broke the WebSocket protocol (for example an unmasked or malformed frame).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame was not valid UTF-8 (RFC 6455 requires failing the connection).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A frame exceeded `limits.max_frame_bytes`. Do not resend it.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The server failed unexpectedly while handling a request on this socket (the socket's
    /// rooms and slots were released). Reconnect with backoff and resume.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The node is shutting down. Reconnect (another node will answer) and resume.
    pub const SERVICE_RESTART: u16 = 1012;
    /// No pong or other frame for two heartbeat intervals. Reconnect and resume.
    pub const HEARTBEAT_TIMEOUT: u16 = 4000;
    /// No `auth` within `auth.auth_timeout_ms`. Reconnect and authenticate first.
    pub const AUTH_TIMEOUT: u16 = 4001;
    /// The token is invalid (bad signature, malformed, wrong algorithm, unsigned, expired).
    /// Get a new token before reconnecting.
    pub const INVALID_TOKEN: u16 = 4002;
    /// The token expired during the session and was not refreshed. Refresh, reconnect, resume.
    pub const TOKEN_EXPIRED: u16 = 4003;
    /// The client read too slowly and its outbound queue overflowed. Reconnect and resume.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The user already holds `limits.max_connections_per_user` sockets on this node.
    pub const TOO_MANY_CONNECTIONS: u16 = 4029;
}

/// Stable error codes carried by `error` replies and REST error bodies.
pub mod code {
    pub const BAD_FRAME: &str = "bad_frame";
    pub const UNKNOWN_TYPE: &str = "unknown_type";
    pub const BAD_REQUEST: &str = "bad_request";
    pub const NOT_AUTHENTICATED: &str = "not_authenticated";
    pub const INVALID_TOKEN: &str = "invalid_token";
    pub const TOKEN_EXPIRED: &str = "token_expired";
    pub const FORBIDDEN: &str = "forbidden";
    pub const ROOM_NOT_FOUND: &str = "room_not_found";
    pub const NOT_FOUND: &str = "not_found";
    pub const CONFLICT: &str = "conflict";
    pub const CONTENT_EMPTY: &str = "content_empty";
    pub const CONTENT_TOO_LONG: &str = "content_too_long";
    pub const TOO_LARGE: &str = "too_large";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const TOO_MANY_ROOMS: &str = "too_many_rooms";
    pub const NOT_JOINED: &str = "not_joined";
    pub const MESSAGE_NOT_FOUND: &str = "message_not_found";
    pub const MESSAGE_DELETED: &str = "message_deleted";
    pub const EDIT_WINDOW_CLOSED: &str = "edit_window_closed";
    pub const UNKNOWN_REACTION: &str = "unknown_reaction";
    pub const TOO_MANY_REACTIONS: &str = "too_many_reactions";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const INTERNAL: &str = "internal";
}

/// Encodes a frame to text. Serializing our own types cannot fail; if it ever did, that is a bug.
pub fn encode<T: Serialize>(frame: &T) -> String {
    serde_json::to_string(frame).expect("server frames always serialize")
}

/// Encodes `ServerFrame::Result { id, result }` whose `result` is JSON text already (a history
/// page from the cache), without parsing or re-serializing it: the caller vouches that `result`
/// is one JSON value. Same bytes as `encode` of that frame.
pub fn encode_result_json(id: &RequestId, result: &str) -> String {
    const HEAD: &str = r#"{"type":"result","id":"#;
    const MIDDLE: &str = r#","result":"#;
    let id = serde_json::to_string(id).expect("a JSON value always serializes");
    let mut frame = String::with_capacity(HEAD.len() + id.len() + MIDDLE.len() + result.len() + 1);
    frame.push_str(HEAD);
    frame.push_str(&id);
    frame.push_str(MIDDLE);
    frame.push_str(result);
    frame.push('}');
    frame
}

/// Encodes to bytes held in an allocation of their exact size (for what is kept in a cache: no
/// slack, and no second allocation when the text becomes bytes).
pub fn encode_exact<T: Serialize>(value: &T) -> Utf8Bytes {
    let mut text = encode(value);
    text.shrink_to_fit();
    text.into()
}

/// Parses one client frame. Returns the request id (when one could be read) with the failure,
/// so the error reply can still be matched by the client.
pub fn decode(text: &str) -> Result<ClientFrame, DecodeError> {
    let frame = serde_json::from_str::<ClientFrame>(text).map_err(|err| {
        #[derive(Deserialize)]
        struct Envelope {
            id: Option<RequestId>,
            #[serde(rename = "type")]
            kind: Option<String>,
        }
        match serde_json::from_str::<Envelope>(text) {
            Err(_) => DecodeError {
                id: None,
                code: code::BAD_FRAME,
                message: format!("not a JSON object: {err}"),
            },
            Ok(env) => {
                let known = matches!(
                    env.kind.as_deref(),
                    Some(
                        "auth"
                            | "join"
                            | "leave"
                            | "send"
                            | "history"
                            | "ping"
                            | "typing"
                            | "presence"
                            | "mark_read"
                            | "rooms"
                            | "edit"
                            | "delete"
                            | "react"
                            | "unreact"
                    )
                );
                let (code, message) = match env.kind {
                    None => (code::BAD_FRAME, "missing \"type\"".to_string()),
                    Some(kind) if !known => (code::UNKNOWN_TYPE, format!("unknown type {kind:?}")),
                    Some(_) => (code::BAD_REQUEST, err.to_string()),
                };
                DecodeError {
                    id: env.id.filter(|id| id.is_string() || id.is_number()),
                    code,
                    message,
                }
            }
        }
    })?;
    if !(frame.id().is_string() || frame.id().is_number()) {
        return Err(DecodeError {
            id: None,
            code: code::BAD_REQUEST,
            message: "id must be a string or a number".into(),
        });
    }
    Ok(frame)
}

#[derive(Debug)]
pub struct DecodeError {
    pub id: Option<RequestId>,
    pub code: &'static str,
    pub message: String,
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_result_of_json_text_encodes_as_the_serialized_frame_does() {
        let page = r#"{"room":"r","nextBefore":null,"messages":[{"seq":1,"content":"a \"b\""}]}"#;
        for id in [serde_json::json!(7), serde_json::json!("req-\"1\"")] {
            let raw = serde_json::value::RawValue::from_string(page.to_string()).unwrap();
            let expected = super::encode(&super::ServerFrame::Result {
                id: &id,
                result: raw,
            });
            assert_eq!(super::encode_result_json(&id, page), expected);
        }
    }

    use super::*;

    #[test]
    fn decodes_every_request() {
        let f = decode(r#"{"type":"send","id":7,"room":"r","content":"hi","clientMsgId":"c1"}"#)
            .unwrap();
        assert!(matches!(f, ClientFrame::Send { ref room, .. } if room == "r"));
        assert_eq!(f.id(), &serde_json::json!(7));
        let f = decode(r#"{"type":"join","id":"a","room":"r","since":41}"#).unwrap();
        assert!(matches!(
            f,
            ClientFrame::Join {
                since: Some(41),
                ..
            }
        ));
    }

    #[test]
    fn bad_frames_keep_their_id_when_readable() {
        let e = decode("{nope").unwrap_err();
        assert_eq!((e.code, e.id.is_none()), (code::BAD_FRAME, true));
        let e = decode(r#"{"type":"dance","id":"x"}"#).unwrap_err();
        assert_eq!(e.code, code::UNKNOWN_TYPE);
        assert_eq!(e.id.unwrap(), "x");
        let e = decode(r#"{"type":"send","id":1,"room":"r"}"#).unwrap_err();
        assert_eq!(e.code, code::BAD_REQUEST);
        let e = decode(r#"{"type":"ping","id":{"a":1}}"#).unwrap_err();
        assert_eq!((e.code, e.id.is_none()), (code::BAD_REQUEST, true));
    }

    #[test]
    fn decimal_lengths() {
        for n in [0, 1, 9, 10, 99, 100, 12_345, i64::MAX, -1, -10, i64::MIN] {
            assert_eq!(decimal_len(n), n.to_string().len(), "{n}");
        }
    }

    #[test]
    fn replies_echo_the_id() {
        let id = serde_json::json!("req-1");
        let text = encode(&ServerFrame::Result {
            id: &id,
            result: RoomResult { room: "r" },
        });
        assert_eq!(
            text,
            r#"{"type":"result","id":"req-1","result":{"room":"r"}}"#
        );
    }
}
