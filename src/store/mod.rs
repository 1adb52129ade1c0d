//! The store: the source of truth for rooms, memberships and messages.
//!
//! [`Store`] is what the chat service needs from a database; `sqlite` is the embedded default,
//! `postgres` the production store (with `backfill`, its one-off data migration).
//! Every implementation guarantees: a message's `seq` is allocated in the same transaction as its
//! insert (strictly increasing, gap-free per room), a message is visible to readers before the
//! insert returns, a repeated `(roomId, senderId, clientMsgId)` returns the stored original, and
//! the same statement moves the room's `"lastSeq"` and `"lastMessageAt"`, and, when side effects
//! are configured (a webhook), writes the message's `"ChatOutbox"` row (see `queue::OutboxRelay`),
//! which stays until a worker has performed them.

pub mod backfill;
mod change_batch;
pub mod changes;
mod group;
pub mod migrations;
mod pg_changes;
mod pg_conns;
mod pg_sends;
pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use chrono::{DateTime, SubsecRound, Utc};
use sqlx::postgres::PgDatabaseError;

pub use changes::{Change, ChangeRequest, Changed, Refusal, Target};

/// A stored message (a row of `"ChatMessage"`, read by its column names: see [`MESSAGE_COLUMNS`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub id: String,
    pub room_id: String,
    pub seq: i64,
    pub sender_id: String,
    pub sender_name: Option<String>,
    pub sender_avatar_url: Option<String>,
    pub content: String,
    pub content_type: String,
    pub status: String,
    pub moderation_status: String,
    pub created_at: DateTime<Utc>,
    pub client_msg_id: Option<String>,
    /// When it was last edited.
    pub edited_at: Option<DateTime<Utc>>,
    /// When it was deleted (a tombstone: `content` is empty).
    pub deleted_at: Option<DateTime<Utc>>,
    /// The seq of its latest change; `None` while it never changed (its version is its seq).
    pub version: Option<i64>,
    /// The seq of the message it replies to.
    pub reply_to_seq: Option<i64>,
    /// Its reactions: a JSON object, emoji -> count, in the order the keys were first used.
    pub reactions: Option<String>,
    /// The quote of the message it replies to, in that message's current state (not a column:
    /// filled in by the store's reads, see [`quote_replies`]).
    pub reply: Option<Quote>,
}

/// A reply's quote of the message it replies to.
#[derive(Debug, Clone, PartialEq)]
pub struct Quote {
    pub seq: i64,
    pub sender_id: String,
    pub sender_name: Option<String>,
    /// The first [`QUOTE_CHARS`] characters of its content; `None` when it is deleted or rejected.
    pub excerpt: Option<String>,
}

/// How much of the original a reply quotes.
pub const QUOTE_CHARS: usize = 100;

impl Quote {
    /// The quote of `original` in its current state.
    pub fn of(original: &Message) -> Self {
        let gone = original.deleted_at.is_some() || !original.is_visible();
        Quote {
            seq: original.seq,
            sender_id: original.sender_id.clone(),
            sender_name: original.sender_name.clone(),
            excerpt: (!gone).then(|| original.content.chars().take(QUOTE_CHARS).collect()),
        }
    }
}

/// `sqlx::FromRow` for a struct, field by column name, for both databases' rows: written out
/// rather than derived, since the derive needs sqlx's proc macros (see `migrations`).
macro_rules! from_row {
    ($ty:ident { $($field:ident: $column:literal),+ $(,)? } $(default: $($default:ident),+)?) => {
        from_row!(@impl sqlx::sqlite::SqliteRow, $ty { $($field: $column),+ } $($($default),+)?);
        from_row!(@impl sqlx::postgres::PgRow, $ty { $($field: $column),+ } $($($default),+)?);
    };
    (@impl $row:ty, $ty:ident { $($field:ident: $column:literal),+ } $($default:ident),*) => {
        impl<'r> sqlx::FromRow<'r, $row> for $ty {
            fn from_row(row: &'r $row) -> Result<Self, sqlx::Error> {
                use sqlx::Row;
                Ok(Self { $($field: row.try_get($column)?,)+ $($default: Default::default(),)* })
            }
        }
    };
}

from_row!(Message {
    id: "id",
    room_id: "roomId",
    seq: "seq",
    sender_id: "senderId",
    sender_name: "senderName",
    sender_avatar_url: "senderAvatarUrl",
    content: "content",
    content_type: "contentType",
    status: "status",
    moderation_status: "moderationStatus",
    created_at: "createdAt",
    client_msg_id: "clientMsgId",
    edited_at: "editedAt",
    deleted_at: "deletedAt",
    version: "version",
    reply_to_seq: "replyToSeq",
    reactions: "reactions",
} default: reply);

impl Message {
    /// Not rejected by moderation (see [`VISIBLE`]).
    pub fn is_visible(&self) -> bool {
        self.moderation_status != "REJECTED"
    }
}

/// What the send path asks the store to persist. The store assigns `seq`.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: String,
    pub room_id: String,
    pub sender_id: String,
    pub sender_name: Option<String>,
    pub sender_avatar_url: Option<String>,
    pub content: String,
    /// Kept in whole milliseconds by both stores (cut, not rounded).
    pub created_at: DateTime<Utc>,
    pub client_msg_id: Option<String>,
    /// The message it replies to (checked by the service: a visible message of the room), and
    /// its quote, for the stored message the insert returns.
    pub reply: Option<Quote>,
}

/// The outcome of an insert: the stored message, and whether it already existed.
#[derive(Debug, Clone)]
pub struct Inserted {
    pub message: Message,
    pub duplicate: bool,
}

impl NewMessage {
    /// The message as a fresh send stores it: its fields, the defaults of a new message, and the
    /// sequence number the store gave it. Both stores answer a fresh send with it instead of
    /// reading back what they just wrote.
    pub fn stored(&self, seq: i64) -> Message {
        Message {
            id: self.id.clone(),
            room_id: self.room_id.clone(),
            seq,
            sender_id: self.sender_id.clone(),
            sender_name: self.sender_name.clone(),
            sender_avatar_url: self.sender_avatar_url.clone(),
            content: self.content.clone(),
            content_type: "TEXT".into(),
            status: "SENT".into(),
            moderation_status: "APPROVED".into(),
            created_at: self.created_at.trunc_subsecs(3),
            client_msg_id: self.client_msg_id.clone(),
            edited_at: None,
            deleted_at: None,
            version: None,
            reply_to_seq: self.reply.as_ref().map(|q| q.seq),
            reactions: None,
            reply: self.reply.clone(),
        }
    }
}

/// An event of a room's sequence: a message or a change of one.
#[derive(Debug, Clone, PartialEq)]
// Most events are messages: boxing them would cost an allocation per message read.
#[allow(clippy::large_enum_variant)]
pub enum Event {
    Message(Message),
    Change(Change),
}

impl Event {
    pub fn seq(&self) -> i64 {
        match self {
            Event::Message(m) => m.seq,
            Event::Change(c) => c.seq,
        }
    }
}

/// A row of `"ChatMessageChange"` as read (`change`: the JSON of [`changes::ChangeWhat`]).
pub(crate) struct ChangeRow {
    room_id: String,
    seq: i64,
    target: i64,
    by: String,
    at: DateTime<Utc>,
    change: String,
}

from_row!(ChangeRow {
    room_id: "roomId",
    seq: "seq",
    target: "messageSeq",
    by: "actorId",
    at: "createdAt",
    change: "change",
});

impl TryFrom<ChangeRow> for Change {
    type Error = StoreError;
    fn try_from(row: ChangeRow) -> Result<Self, StoreError> {
        let what = serde_json::from_str(&row.change).map_err(|e| {
            StoreError::Other(format!("change {} of room {}: {e}", row.seq, row.room_id))
        })?;
        Ok(Change {
            room_id: row.room_id,
            seq: row.seq,
            target: row.target,
            by: row.by,
            at: row.at,
            what,
        })
    }
}

/// What a change's first statement finds: the message (locked, on Postgres), and the seq of a
/// change stored under the edit's `clientChangeId` (a column `"keySeq"`), if any.
pub(crate) struct Locked {
    pub message: Message,
    pub key_seq: Option<i64>,
}

macro_rules! locked_from_row {
    ($($row:ty),+) => {$(
        impl<'r> sqlx::FromRow<'r, $row> for Locked {
            fn from_row(row: &'r $row) -> Result<Self, sqlx::Error> {
                use sqlx::Row;
                Ok(Self {
                    message: sqlx::FromRow::from_row(row)?,
                    key_seq: row.try_get("keySeq")?,
                })
            }
        }
    )+};
}
locked_from_row!(sqlx::sqlite::SqliteRow, sqlx::postgres::PgRow);

/// The change rows' columns, as [`ChangeRow`] reads them.
pub(crate) const CHANGE_COLUMNS: &str =
    r#""roomId", seq, "messageSeq", "actorId", "createdAt", change"#;

/// Messages and changes, each read in seq order with at most `limit` rows, merged: the first
/// `limit` events of the room after the range's start.
pub(crate) fn merge_events(
    messages: Vec<Message>,
    changes: Vec<ChangeRow>,
    limit: u32,
) -> Result<Vec<Event>, StoreError> {
    let mut events: Vec<Event> = messages.into_iter().map(Event::Message).collect();
    for row in changes {
        events.push(Event::Change(row.try_into()?));
    }
    events.sort_by_key(Event::seq);
    events.truncate(limit as usize);
    Ok(events)
}

/// Fills in the quotes of the replies among `rows` (messages of `room`), in their originals'
/// current state: one read when there are replies, none otherwise.
pub(crate) async fn quote_replies<S: Store + ?Sized>(
    store: &S,
    room: &str,
    rows: &mut [Message],
) -> Result<(), StoreError> {
    let mut seqs: Vec<i64> = rows.iter().filter_map(|m| m.reply_to_seq).collect();
    if seqs.is_empty() {
        return Ok(());
    }
    seqs.sort_unstable();
    seqs.dedup();
    let originals = store.messages_at(room, &seqs).await?;
    let by_seq: std::collections::HashMap<i64, &Message> =
        originals.iter().map(|m| (m.seq, m)).collect();
    for m in rows {
        if let Some(seq) = m.reply_to_seq {
            m.reply = by_seq.get(&seq).map(|original| Quote::of(original));
        }
    }
    Ok(())
}

/// What the store knows about a user and a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    NoRoom,
    NotMember,
    Member,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    pub id: String,
    pub name: String,
    pub last_seq: i64,
}

/// Cloned when one failure answers every send of a group commit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (or the connection broke). Retriable. Nothing was written,
    /// except when the connection broke during the commit itself: then the write may have landed,
    /// which is why retries carry the same `clientMsgId`.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The database is known to be unreachable (a background probe waits for it to answer):
    /// nothing was tried. Retriable, like `Unavailable`, and not logged again per operation.
    #[error("store unavailable: the database is unreachable (waiting for it to answer again)")]
    Down,
    #[error("room not found")]
    RoomNotFound,
    #[error("{0}")]
    Conflict(String),
    /// Input the database cannot store (for example a NUL byte in Postgres text).
    #[error("{0}")]
    Invalid(String),
    #[error("store error: {0}")]
    Other(String),
    /// A change the message does not allow (nothing was written).
    #[error("{0}")]
    Refused(Refusal),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::Conflict(db.message().to_string())
            }
            sqlx::Error::Database(db) => match db.try_downcast_ref::<PgDatabaseError>() {
                Some(pg) if pg_retriable(pg.code()) => StoreError::Unavailable(e.to_string()),
                Some(pg) if pg_unstorable(pg.code()) => {
                    StoreError::Invalid(format!("text the database cannot store: {}", pg.message()))
                }
                // SQLite: SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes, when
                // another process held the write lock past the busy timeout. Retriable.
                None if db
                    .code()
                    .and_then(|c| c.parse::<i64>().ok())
                    .is_some_and(|c| matches!(c & 0xff, 5 | 6)) =>
                {
                    StoreError::Unavailable(e.to_string())
                }
                _ => StoreError::Other(e.to_string()),
            },
            _ => StoreError::Other(e.to_string()),
        }
    }
}

/// SQLSTATEs a retry can get past: the connection failed (class 08), the server is shutting down
/// or restarting or terminated this backend (`pg_terminate_backend` gives 57P01), too many
/// connections, or the transaction lost a serialization or deadlock race. A connection lost while
/// committing may have committed: a retry with the same clientMsgId then gets the original.
fn pg_retriable(code: &str) -> bool {
    code.starts_with("08")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01"
        )
}

/// SQLSTATEs for text Postgres cannot hold (a NUL byte, or a character the encoding lacks).
fn pg_unstorable(code: &str) -> bool {
    matches!(code, "22021" | "22P05")
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap reachability check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Allocates the room's next sequence and inserts, atomically; idempotent on `clientMsgId`.
    async fn insert_message(&self, msg: NewMessage) -> Result<Inserted, StoreError>;

    /// The message a sender stored in a room under `client_msg_id`, if any.
    async fn find_by_client_msg_id(
        &self,
        room: &str,
        sender: &str,
        client_msg_id: &str,
    ) -> Result<Option<Message>, StoreError>;

    /// Up to `limit` visible messages with `seq < before` (all when `None`), newest first.
    async fn history(
        &self,
        room: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError>;

    /// The room's events with `after < seq <= until`, oldest first, at most `limit`: its visible
    /// messages, in their current state, and its changes.
    async fn events_between(
        &self,
        room: &str,
        after: i64,
        until: i64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError>;

    /// The room's messages at these sequences, in any state (what replies quote).
    async fn messages_at(&self, room: &str, seqs: &[i64]) -> Result<Vec<Message>, StoreError>;

    /// One message of the room, by seq or id, in any state, with its quote if it is a reply.
    async fn message(&self, room: &str, target: &Target) -> Result<Option<Message>, StoreError>;

    /// Stores a change of a message, with the room's next seq (see [`changes`]). A retried edit
    /// (its `clientChangeId` stored) answers with the change stored the first time.
    async fn change_message(&self, req: ChangeRequest) -> Result<Changed, StoreError>;

    /// The reactions `user` has on the room's messages with `from <= seq <= to`: (seq, emoji).
    async fn my_reactions(
        &self,
        room: &str,
        user: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, String)>, StoreError>;

    /// The room's last allocated sequence, or `None` when the room does not exist.
    async fn room_head(&self, room: &str) -> Result<Option<i64>, StoreError>;

    /// The last allocated sequences of several rooms, in one query (rooms that do not exist are
    /// left out).
    async fn room_heads(&self, rooms: &[&str]) -> Result<Vec<(String, i64)>, StoreError>;

    async fn access(&self, room: &str, user: &str) -> Result<Access, StoreError>;

    /// Creates a room; `Conflict` when the id is taken.
    async fn create_room(&self, id: &str, name: &str) -> Result<Room, StoreError>;

    /// Creates the room if needed (dev open rooms). Returns true if it was created.
    async fn ensure_room(&self, id: &str, name: &str) -> Result<bool, StoreError>;

    /// Adds a membership; returns false when it already existed. `RoomNotFound` if no room.
    async fn add_member(&self, room: &str, user: &str) -> Result<bool, StoreError>;

    /// Removes a membership; returns false when there was none.
    async fn remove_member(&self, room: &str, user: &str) -> Result<bool, StoreError>;

    /// The user's rooms (most recently active first, at most `limit`) with their read state and
    /// last visible message, in two queries whatever the number of rooms.
    async fn my_rooms(&self, user: &str, limit: u32) -> Result<Vec<RoomSummary>, StoreError>;

    /// How many members the room has.
    async fn member_count(&self, room: &str) -> Result<i64, StoreError>;

    /// Moves read positions forward (never back) and sets `"lastReadAt"`, for several
    /// (room, user) pairs in one write. Returns how many memberships changed.
    async fn mark_read(&self, marks: &[ReadMark]) -> Result<u64, StoreError>;

    /// Claims up to `limit` outbox rows that are unclaimed or whose lease expired, leasing them
    /// for `lease`. Oldest first.
    async fn outbox_claim(
        &self,
        limit: u32,
        lease: std::time::Duration,
    ) -> Result<Vec<OutboxEntry>, StoreError>;

    /// Deletes the outbox rows whose side effects were performed (or given up on).
    async fn outbox_done(&self, ids: &[i64]) -> Result<(), StoreError>;

    /// Leases outbox rows for `lease` from now, or releases them (`None`) so the next claim
    /// takes them again.
    async fn outbox_lease(
        &self,
        ids: &[i64],
        lease: Option<std::time::Duration>,
    ) -> Result<(), StoreError>;

    /// Releases every claimed row (the job queue lost what it held). Returns how many.
    async fn outbox_release_all(&self) -> Result<u64, StoreError>;

    /// Closes the connections (shutdown, after the last job).
    async fn close(&self) {}

    /// What the store counts of its own work, for `/metrics` (the SQLite store; `None` elsewhere).
    fn metrics(&self) -> Option<StoreMetrics> {
        None
    }
}

/// A store's own counters, shared with the metrics registry (the handles are cheap clones).
#[derive(Debug, Clone)]
pub enum StoreMetrics {
    Sqlite(SqliteMetrics),
    Postgres(postgres::PgMetrics),
}

/// The SQLite store's writer, group commit and checkpointer.
#[derive(Debug, Clone)]
pub struct SqliteMetrics {
    /// Statements run on the writer connection, `BEGIN` and `COMMIT` included.
    pub write_statements: prometheus_client::metrics::counter::Counter,
    /// Sends written per group commit (one observation per batch, taken when the batch starts).
    pub send_batch_size: prometheus_client::metrics::histogram::Histogram,
    /// Changes written per group commit (one observation per batch).
    pub change_batch_size: prometheus_client::metrics::histogram::Histogram,
    /// Sends queued for the writer and not yet taken into a batch.
    pub sends_waiting: prometheus_client::metrics::gauge::Gauge,
    /// WAL frames not yet copied into the database file, as of the last checkpoint.
    pub wal_frames_pending: prometheus_client::metrics::gauge::Gauge,
    /// Checkpoints run by the background checkpointer.
    pub checkpoints: prometheus_client::metrics::counter::Counter,
    /// The WAL's length in bytes (frames written since it last restarted), as of the last
    /// checkpoint.
    pub wal_bytes: prometheus_client::metrics::gauge::Gauge,
    /// Times the WAL was made to restart from its beginning (the writer copied its last frames
    /// with no reader in it).
    pub wal_restarts: prometheus_client::metrics::counter::Counter,
}

impl Default for SqliteMetrics {
    fn default() -> Self {
        Self {
            write_statements: Default::default(),
            // 1, 2, 4, ... 1024 sends per batch.
            send_batch_size: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 11),
            ),
            change_batch_size: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 11),
            ),
            sends_waiting: Default::default(),
            wal_frames_pending: Default::default(),
            checkpoints: Default::default(),
            wal_bytes: Default::default(),
            wal_restarts: Default::default(),
        }
    }
}

/// One of a user's rooms, with what its unread count is computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct RoomSummary {
    pub id: String,
    pub name: String,
    pub last_seq: i64,
    pub last_read_seq: i64,
    /// Visible messages after the read position (changes do not count), at most 1000.
    pub unread: i64,
    /// The newest visible message.
    pub last_message: Option<Message>,
}

/// A member's read position in a room.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadMark {
    pub room_id: String,
    pub user_id: String,
    pub seq: i64,
    pub at: DateTime<Utc>,
}

/// A row of `"ChatOutbox"`: a stored message whose side effects are not yet queued.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    pub id: i64,
    pub room_id: String,
    pub seq: i64,
    pub message_id: String,
    pub created_at: DateTime<Utc>,
}

from_row!(OutboxEntry {
    id: "id",
    room_id: "roomId",
    seq: "seq",
    message_id: "messageId",
    created_at: "createdAt",
});

/// Visible = not rejected by moderation. Every read the gateway serves applies it.
pub const VISIBLE: &str = r#""moderationStatus" <> 'REJECTED'"#;

/// The message columns in the order [`Message`] reads them.
pub const MESSAGE_COLUMNS: &str = r#"id, "roomId", seq, "senderId", "senderName", "senderAvatarUrl", content, "contentType", status, "moderationStatus", "createdAt", "clientMsgId", "editedAt", "deletedAt", version, "replyToSeq", reactions"#;

/// Joins room rows `(id, name, lastSeq, lastReadSeq, unread)` with the rooms' last messages.
fn summaries(rooms: Vec<(String, String, i64, i64, i64)>, last: Vec<Message>) -> Vec<RoomSummary> {
    let mut last: std::collections::HashMap<String, Message> =
        last.into_iter().map(|m| (m.room_id.clone(), m)).collect();
    rooms
        .into_iter()
        .map(|(id, name, last_seq, last_read_seq, unread)| RoomSummary {
            last_message: last.remove(&id),
            id,
            name,
            last_seq,
            last_read_seq,
            unread,
        })
        .collect()
}
