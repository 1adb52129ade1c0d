//! The PostgreSQL store: the production source of truth, in the schema of the chat app the gateway
//! replaces (quoted camelCase tables, TEXT ids, `TIMESTAMP(3)` holding UTC).
//!
//! A send is one statement, so one round trip once it is prepared: it increments the room's
//! `"lastSeq"`, inserts the message with that sequence and its outbox row, or returns the stored
//! original of a repeated `clientMsgId` without allocating anything. The UPDATE's row lock on the
//! `"ChatRoom"` row serializes allocations per room until commit, which keeps sequences gap-free
//! and strictly increasing; the statement commits before its reply is read to the end, so nothing
//! is acknowledged before it is durable.
//!
//! Migrations: [`MIGRATOR`] (migrations/postgres) runs automatically; the maintenance-window file
//! (migrations/postgres-maintenance) runs only by hand, through [`run_maintenance`].

use std::str::FromStr;
use std::time::{Duration, Instant};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, SubsecRound, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgDatabaseError, PgPoolOptions};
use sqlx::{Connection, PgPool};

use super::pg_changes::{Changes, Known};
use super::pg_conns::{Lease, WriterConns};
use super::pg_sends::Sends;
use crate::health::Health;

use super::changes::{self, ChangeOp, Decision, Written};
use super::{
    Access, Change, ChangeRequest, ChangeRow, Changed, Event, Inserted, Locked, Message,
    NewMessage, OutboxEntry, ReadMark, Refusal, Room, RoomSummary, Store, StoreError, StoreMetrics,
    Target, merge_events, quote_replies,
};

/// The automatic migrations (migrations/postgres), applied by `migrate` and at start-up.
pub static MIGRATOR: super::migrations::Lazy = super::migrations::Lazy::new(|| {
    super::migrations::embed!("postgres":
        "20261127000001_app_schema.up.sql",
        "20261127000001_app_schema.down.sql",
        "20261127000002_message_sequence.up.sql",
        "20261127000002_message_sequence.down.sql",
        "20261127000003_outbox.up.sql",
        "20261127000003_outbox.down.sql",
        "20261127000004_read_state.up.sql",
        "20261127000004_read_state.down.sql",
        "20261206000005_message_changes.up.sql",
        "20261206000005_message_changes.down.sql",
    )
    .migrator()
});

/// The maintenance-window change for a live database: run by hand, statement by statement.
pub const MAINTENANCE_FILE: &str =
    "migrations/postgres-maintenance/20261127000100_live_database.sql";
pub const MAINTENANCE_SQL: &str =
    include_str!("../../migrations/postgres-maintenance/20261127000100_live_database.sql");
/// Its rollback, also run by hand.
pub const MAINTENANCE_DOWN_SQL: &str =
    include_str!("../../migrations/postgres-maintenance/20261127000100_live_database.down.sql");

/// The writers' connection settings (the send writer's and the change writer's connections, see
/// `pg_sends` and `pg_changes`). Their statements join a batch's arrays to the tables by key, and
/// the right plan for them is always the same: a nested loop of index lookups, one per row of the
/// batch. Left to itself, Postgres re-plans them for every batch (a custom plan, about 0.5 ms of
/// its CPU per batch), or caches a generic plan made with the statistics of the moment, which on
/// new tables (the change and reaction tables start empty) are table scans and hash joins that
/// stay cached as the tables grow. Here the plan is generic (planned once per connection) and
/// made of index scans only.
const WRITER_SETTINGS: [(&str, &str); 4] = [
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_seqscan", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
];

/// `database.write_interval_ms` until the gateway sets it (see [`PgStore::with_write_interval`]).
const DEFAULT_WRITE_INTERVAL_MS: u64 = 2;

/// How long the probe of an unreachable database waits for each `SELECT 1`.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// The index every history page and resume reads (see [`HISTORY_SQL`]).
pub const SEQ_INDEX: &str = "ChatMessage_roomId_seq_key";

/// The message columns in the order [`Message`] reads them. Casts keep the app's column types
/// readable as they are: `TIMESTAMP(3)` holds UTC, and the text columns may be Prisma enums.
macro_rules! columns {
    () => {
        r#"id, "roomId", seq, "senderId", "senderName", "senderAvatarUrl", content, "contentType"::text AS "contentType", status::text AS status, "moderationStatus"::text AS "moderationStatus", "createdAt" AT TIME ZONE 'UTC' AS "createdAt", "clientMsgId", "editedAt" AT TIME ZONE 'UTC' AS "editedAt", "deletedAt" AT TIME ZONE 'UTC' AS "deletedAt", version, "replyToSeq", reactions"#
    };
}
pub(super) use columns;

/// [`columns!`] for a fresh send's answer row: only its `seq` (the gateway has the rest, see
/// [`NewMessage::stored`]); the others are NULL, in [`columns!`]' order, so that the row can share
/// a `UNION ALL` with a repeat's, which carries the original.
macro_rules! seq_only {
    () => {
        r#"NULL AS id, NULL AS "roomId", seq, NULL AS "senderId", NULL AS "senderName", NULL AS "senderAvatarUrl", NULL AS content, NULL AS "contentType", NULL AS status, NULL AS "moderationStatus", NULL AS "createdAt", NULL AS "clientMsgId", NULL AS "editedAt", NULL AS "deletedAt", NULL AS version, NULL AS "replyToSeq", NULL AS reactions"#
    };
}
pub(super) use seq_only;

/// A send's answer row: `duplicate`, then either the new message's `seq` ([`seq_only!`]) or, for
/// a repeat of a stored `clientMsgId`, the original's columns.
pub(super) enum Answer {
    Stored(i64),
    /// Boxed: repeats are rare, and the batch holds an answer per send.
    Duplicate(Box<Message>),
}

impl Answer {
    /// What the send of `msg` is answered with.
    pub(super) fn inserted(self, msg: &NewMessage) -> Inserted {
        match self {
            Answer::Stored(seq) => Inserted {
                message: msg.stored(seq),
                duplicate: false,
            },
            Answer::Duplicate(message) => Inserted {
                message: *message,
                duplicate: true,
            },
        }
    }
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for Answer {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row;
        Ok(if row.try_get("duplicate")? {
            Answer::Duplicate(Box::new(sqlx::FromRow::from_row(row)?))
        } else {
            Answer::Stored(row.try_get("seq")?)
        })
    }
}

/// A page of history: a keyset read walking [`SEQ_INDEX`] backwards from `$2` (exclusive), no JOIN,
/// no OFFSET, no sort. `$1` room, `$2` before, `$3` limit. The EXPLAIN test runs this very text.
pub const HISTORY_SQL: &str = concat!(
    "SELECT ",
    columns!(),
    r#" FROM "ChatMessage" WHERE "roomId" = $1 AND seq < $2 AND "moderationStatus" <> 'REJECTED' ORDER BY seq DESC LIMIT $3"#
);

const MESSAGES_BETWEEN_SQL: &str = concat!(
    "SELECT ",
    columns!(),
    r#" FROM "ChatMessage" WHERE "roomId" = $1 AND seq > $2 AND seq <= $3 AND "moderationStatus" <> 'REJECTED' ORDER BY seq ASC LIMIT $4"#
);

const FIND_BY_CLIENT_MSG_ID_SQL: &str = concat!(
    "SELECT ",
    columns!(),
    r#" FROM "ChatMessage" WHERE "roomId" = $1 AND "senderId" = $2 AND "clientMsgId" = $3"#
);

/// The whole send in one statement. `$1` id, `$2` room, `$3` sender, `$4` sender name, `$5` avatar,
/// `$6` content, `$7` createdAt (UTC), `$8` clientMsgId, `$9` replyToSeq. `room` allocates only when `existing`
/// found nothing, so a repeat allocates no sequence; the same row write moves the room's
/// `"lastMessageAt"` (never backwards), which needs no other write, no other lock and no job.
/// Two concurrent first sends of one clientMsgId both get past `existing` (same snapshot); the
/// second then fails on the unique key, rolling back its allocation, and
/// [`PgStore::insert_message`] answers it with the original. With side effects configured, the
/// outbox row is written by the same statement ([`INSERT_MESSAGE_WITH_OUTBOX_SQL`]). Answers with
/// one [`Answer`] row: the new `seq`, or the original of a repeat.
macro_rules! insert_message_sql {
    ($outbox:literal) => {
        concat!(
            "WITH existing AS (SELECT ",
            columns!(),
            r#" FROM "ChatMessage" WHERE "roomId" = $2 AND "senderId" = $3 AND "clientMsgId" = $8),
room AS (
    UPDATE "ChatRoom" SET "lastSeq" = "lastSeq" + 1,
        "lastMessageAt" = GREATEST(COALESCE("lastMessageAt", $7), $7),
        "updatedAt" = GREATEST(COALESCE("lastMessageAt", $7), $7)
    WHERE id = $2 AND NOT EXISTS (SELECT 1 FROM existing)
    RETURNING "lastSeq"
),
message AS (
    INSERT INTO "ChatMessage" (id, "roomId", seq, "senderId", "senderName", "senderAvatarUrl",
        content, "contentType", status, "moderationStatus", "createdAt", "clientMsgId", "replyToSeq")
    SELECT $1, $2, "lastSeq", $3, $4, $5, $6, 'TEXT', 'SENT', 'APPROVED', $7, $8, $9 FROM room
    RETURNING "roomId", seq, id
)"#,
            $outbox,
            r#"
SELECT false AS duplicate, "#,
            seq_only!(),
            r#" FROM message
UNION ALL
SELECT true AS duplicate, * FROM existing"#
        )
    };
}

const INSERT_MESSAGE_SQL: &str = insert_message_sql!("");

const INSERT_MESSAGE_WITH_OUTBOX_SQL: &str = insert_message_sql!(
    r#",
outbox AS (
    INSERT INTO "ChatOutbox" ("roomId", seq, "messageId", "createdAt")
    SELECT "roomId", seq, id, $7 FROM message
)"#
);

/// A stored edit by its idempotency key. `$1` room, `$2` actor, `$3` clientChangeId.
const CHANGE_BY_KEY_SQL: &str = r#"SELECT "roomId", seq, "messageSeq", "actorId",
    "createdAt" AT TIME ZONE 'UTC' AS "createdAt", change
    FROM "ChatMessageChange" WHERE "roomId" = $1 AND "actorId" = $2 AND "clientChangeId" = $3"#;

/// The unique index that makes a clientChangeId idempotent.
pub(super) const CHANGE_KEY: &str = "ChatMessageChange_roomId_actorId_clientChangeId_key";

/// A message by seq or id, in any state, without its quote.
async fn message_by<'e, E: sqlx::PgExecutor<'e>>(
    db: E,
    room: &str,
    target: &Target,
) -> Result<Option<Message>, sqlx::Error> {
    let query = match target {
        Target::Seq(seq) => sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            r#" FROM "ChatMessage" WHERE "roomId" = $1 AND seq = $2"#
        ))
        .bind(room)
        .bind(*seq),
        Target::Id(id) => sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            r#" FROM "ChatMessage" WHERE "roomId" = $1 AND id = $2 AND seq IS NOT NULL"#
        ))
        .bind(room)
        .bind(id.as_str()),
    };
    query.fetch_optional(db).await
}

/// A change's first statement: the message, locked (`FOR UPDATE` returns its newest version,
/// whatever the statement's snapshot), and the seq of a change stored under the edit's key. `$1`
/// room, `$2` the message's seq or id, `$3` actor, `$4` clientChangeId (NULL: none).
macro_rules! lock_message_sql {
    ($target:literal) => {
        concat!(
            "SELECT ",
            columns!(),
            r#", (SELECT k.seq FROM "ChatMessageChange" k
                 WHERE k."roomId" = $1 AND k."actorId" = $3 AND k."clientChangeId" = $4) AS "keySeq"
               FROM "ChatMessage" WHERE "roomId" = $1 AND "#,
            $target,
            " FOR UPDATE"
        )
    };
}

const LOCK_BY_SEQ_SQL: &str = lock_message_sql!("seq = $2");
// Rows the app wrote and the backfill has not numbered yet (no seq) are not messages to change.
const LOCK_BY_ID_SQL: &str = lock_message_sql!("id = $2 AND seq IS NOT NULL");

/// A change's writes in one transaction (see [`super::changes`]), in four round trips (five for a
/// reaction), whatever the kind: lock and read the message; for a reaction, write its row and
/// read its count; then allocate the room's seq, update the message and insert the change in one
/// statement; commit.
///
/// Every change locks its message's row before anything else and the room's row last (the
/// seq, held until the commit as a send holds it), so changes of one message are serialized, a
/// reaction count read after the lock is exact, and no two transactions wait for each other in a
/// cycle (sends lock rooms only). `Ok(Err(_))` when the message refuses it, a `duplicate` answer
/// when it changes nothing (the caller rolls back: no seq was taken).
async fn write_change(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    req: &ChangeRequest,
) -> Result<Result<Written, Refusal>, sqlx::Error> {
    let query = match &req.target {
        Target::Seq(seq) => sqlx::query_as(LOCK_BY_SEQ_SQL)
            .bind(&req.room_id)
            .bind(*seq),
        Target::Id(id) => sqlx::query_as(LOCK_BY_ID_SQL)
            .bind(&req.room_id)
            .bind(id.as_str()),
    };
    let locked: Option<Locked> = query
        .bind(&req.actor)
        .bind(req.client_change_id())
        .fetch_optional(&mut **tx)
        .await?;
    let Some(Locked {
        message: m,
        key_seq,
    }) = locked
    else {
        return Ok(Err(Refusal::NotFound));
    };
    if key_seq.is_some() {
        return Ok(Ok(Written::Stored));
    }
    let unchanged = |message: Message| {
        Ok(Ok(Written::Changed(Changed {
            message,
            change: None,
            duplicate: true,
        })))
    };
    match changes::decide(req, &m) {
        Err(refusal) => return Ok(Err(refusal)),
        // An edit to the content it already has may be the retry of an edit that committed
        // while this one waited for the lock (after the first statement's snapshot): look again.
        Ok(Decision::Nothing) => {
            if let Some(key) = req.client_change_id() {
                let stored: Option<i64> = sqlx::query_scalar(
                    r#"SELECT seq FROM "ChatMessageChange"
                       WHERE "roomId" = $1 AND "actorId" = $2 AND "clientChangeId" = $3"#,
                )
                .bind(&req.room_id)
                .bind(&req.actor)
                .bind(key)
                .fetch_optional(&mut **tx)
                .await?;
                if stored.is_some() {
                    return Ok(Ok(Written::Stored));
                }
            }
            return unchanged(m);
        }
        Ok(Decision::Proceed) => {}
    }
    let at = utc(&req.at);
    let mut count = 0;
    if let ChangeOp::React { emoji, .. } | ChangeOp::Unreact { emoji } = &req.op {
        let adding = matches!(req.op, ChangeOp::React { .. });
        let query = sqlx::query_as(if adding { REACT_SQL } else { UNREACT_SQL })
            .bind(&req.room_id)
            .bind(m.seq)
            .bind(emoji)
            .bind(&req.actor);
        let query = if adding { query.bind(at) } else { query };
        let (written, before): (i64, i64) = query.fetch_one(&mut **tx).await?;
        if written == 0 {
            return unchanged(m);
        }
        count = if adding { before + 1 } else { before - 1 };
    }
    // The seq is the room's, allocated by the write itself: applied with 0, set after.
    let (mut after, mut change) = changes::apply(req, &m, 0, count);
    let sql = match (&req.op, after.moderation_status.as_str()) {
        (ChangeOp::Delete { .. }, _) => WRITE_DELETE_SQL,
        _ if after.moderation_status == m.moderation_status => WRITE_CHANGE_SQL,
        (_, "REJECTED") => WRITE_REJECT_SQL,
        _ => WRITE_APPROVE_SQL,
    };
    let seq: Option<i64> = sqlx::query_scalar(sql)
        .bind(&after.content)
        .bind(after.edited_at.as_ref().map(utc))
        .bind(after.deleted_at.as_ref().map(utc))
        .bind(&after.reactions)
        .bind(&req.room_id)
        .bind(m.seq)
        .bind(req.kind())
        .bind(&req.actor)
        .bind(req.client_change_id())
        .bind(serde_json::to_string(&change.what).expect("a change serializes"))
        .bind(at)
        .fetch_optional(&mut **tx)
        .await?;
    let Some(seq) = seq else {
        // The room is gone (deleted with its messages meanwhile).
        return Ok(Err(Refusal::NotFound));
    };
    after.version = Some(seq);
    change.seq = seq;
    Ok(Ok(Written::Changed(Changed {
        message: after,
        change: Some(change),
        duplicate: false,
    })))
}

/// A reaction row written, and the message's count of that emoji as it was before: one round
/// trip. Run after the message's row was locked, so its snapshot holds every earlier reaction to
/// it. `$1` room, `$2` message seq, `$3` emoji, `$4` user, `$5` time. Returns (rows written,
/// count before).
const REACT_SQL: &str = r#"WITH written AS (
    INSERT INTO "ChatReaction" ("roomId", "messageSeq", emoji, "userId", "createdAt")
    VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING 1
)
SELECT (SELECT count(*) FROM written),
       (SELECT count(*) FROM "ChatReaction" WHERE "roomId" = $1 AND "messageSeq" = $2 AND emoji = $3)"#;

/// [`REACT_SQL`]'s opposite: the user's reaction row removed (`$1` to `$4` alike).
const UNREACT_SQL: &str = r#"WITH written AS (
    DELETE FROM "ChatReaction"
    WHERE "roomId" = $1 AND "messageSeq" = $2 AND emoji = $3 AND "userId" = $4
    RETURNING 1
)
SELECT (SELECT count(*) FROM written),
       (SELECT count(*) FROM "ChatReaction" WHERE "roomId" = $1 AND "messageSeq" = $2 AND emoji = $3)"#;

/// A change's writes in one statement: the room's next seq (its row locked until the commit),
/// the message's new state with that seq as its version, the change's row, and what its kind
/// adds (`$set`: more columns of the message; `$with`: another write). Returns the seq. `$1`
/// content, `$2` editedAt, `$3` deletedAt, `$4` reactions, `$5` room, `$6` message seq, `$7`
/// kind, `$8` actor, `$9` clientChangeId, `$10` the change (JSON), `$11` time.
macro_rules! write_change_sql {
    ($set:literal, $with:literal) => {
        concat!(
            r#"WITH room AS (
    UPDATE "ChatRoom" SET "lastSeq" = "lastSeq" + 1 WHERE id = $5 RETURNING "lastSeq"
),
message AS (
    UPDATE "ChatMessage" SET content = $1, "editedAt" = $2, "deletedAt" = $3,
        version = (SELECT "lastSeq" FROM room), reactions = $4"#,
            $set,
            r#" WHERE "roomId" = $5 AND seq = $6
)"#,
            $with,
            r#"
INSERT INTO "ChatMessageChange" ("roomId", seq, "messageSeq", kind, "actorId", "clientChangeId",
    change, "createdAt") SELECT $5, "lastSeq", $6, $7, $8, $9, $10, $11 FROM room
RETURNING seq"#
        )
    };
}

const WRITE_CHANGE_SQL: &str = write_change_sql!("", "");
/// A deletion also removes the message's reaction rows.
const WRITE_DELETE_SQL: &str = write_change_sql!(
    "",
    r#",
cleared AS (DELETE FROM "ChatReaction" WHERE "roomId" = $5 AND "messageSeq" = $6)"#
);
// The status as a literal: the app's column may be an enum type, which a text parameter cannot
// be assigned to.
const WRITE_REJECT_SQL: &str = write_change_sql!(r#", "moderationStatus" = 'REJECTED'"#, "");
const WRITE_APPROVE_SQL: &str = write_change_sql!(r#", "moderationStatus" = 'APPROVED'"#, "");

/// The unique index that makes a clientMsgId idempotent (see migrations/postgres).
const CLIENT_MSG_ID_KEY: &str = "ChatMessage_roomId_senderId_clientMsgId_key";

/// Moves read positions forward. `$1` rooms, `$2` users, `$3` seqs, `$4` times (a (room, user)
/// listed twice takes its furthest). Workers on several nodes run this at once for overlapping
/// memberships (a user's tabs on two nodes): the rows are locked in (room, user) order (`ORDER BY
/// ... FOR UPDATE` locks as it reads the sorted rows), so two of them can never wait for each
/// other in a cycle; an `UPDATE ... FROM unnest(...)` locks in whatever order its join produces,
/// which deadlocked.
const MARK_READ_SQL: &str = r#"WITH u AS (
    SELECT room, usr, max(seq) AS seq, max(at) AS at
    FROM unnest($1::text[], $2::text[], $3::bigint[], $4::timestamp[]) AS u(room, usr, seq, at)
    GROUP BY room, usr
),
locked AS MATERIALIZED (
    SELECT m.id, u.seq, u.at FROM "ChatRoomMember" m
    JOIN u ON m."roomId" = u.room AND m."userId" = u.usr
    WHERE m."lastReadSeq" < u.seq
    ORDER BY m."roomId", m."userId"
    FOR NO KEY UPDATE OF m
)
UPDATE "ChatRoomMember" m SET "lastReadSeq" = locked.seq, "lastReadAt" = locked.at
FROM locked
WHERE m.id = locked.id AND m."lastReadSeq" < locked.seq"#;

/// Most times a write that lost a deadlock or serialization race is run again.
const RACE_RETRIES: u32 = 3;

pub struct PgStore {
    pool: PgPool,
    /// What every statement goes through (shared with the send writer).
    writes: Arc<Writes>,
    /// Sends, written in group commits (see `pg_sends`).
    sends: Sends,
    /// Changes, written in group commits (see `pg_changes`).
    changes: Changes,
    counters: PgMetrics,
}

/// The pool as writes use it: through the database's known health.
pub(super) struct Writes {
    pool: PgPool,
    /// Whether Postgres answers: while it does not, every operation fails at once with
    /// `Unavailable` instead of waiting `database.acquire_timeout_ms` for a connection that
    /// cannot open (sends answered promptly, `/readyz` at once).
    health: Arc<Health>,
    /// The writers' own connections: one per send batch in flight and one for the change writer
    /// (see [`WRITER_SETTINGS`] and `pg_conns`).
    writers: Arc<WriterConns>,
    /// The messages the change writer need not read first (see `pg_changes`).
    pub(super) known: Known,
    /// Sends write outbox rows (side effects are configured: `queue.webhook_url`).
    outbox: AtomicBool,
    /// Sends per group commit.
    pub(super) batch_size: prometheus_client::metrics::histogram::Histogram,
    /// Changes per group commit.
    pub(super) change_batch_size: prometheus_client::metrics::histogram::Histogram,
    /// Change batches written again one by one because another writer changed one of their
    /// messages first.
    pub(super) change_batch_races: Counter,
    /// The shortest time between the starts of two change batches under load, in milliseconds
    /// (`database.write_interval_ms`).
    write_interval_ms: AtomicU64,
}

impl Writes {
    /// The pool, or `Unavailable` at once while the database is known to be unreachable.
    pub(super) fn live_pool(&self) -> Result<&PgPool, StoreError> {
        if self.health.is_up() {
            Ok(&self.pool)
        } else {
            Err(StoreError::Down)
        }
    }

    /// A writer's connection for one statement, or `Unavailable` at once while the database is
    /// known to be unreachable.
    pub(super) async fn writer(&self) -> Result<Lease<'_>, StoreError> {
        self.live_pool()?;
        self.writers.lease().await.map_err(|e| self.failed(e))
    }

    /// Maps a failed statement, marking the database down when it could not be reached.
    pub(super) fn failed(&self, e: sqlx::Error) -> StoreError {
        if unreachable(&e) {
            self.health.trip(&e);
        }
        e.into()
    }

    pub(super) fn outbox(&self) -> bool {
        self.outbox.load(Ordering::Relaxed)
    }

    /// One change in a transaction of its own that waits for its message's lock (see
    /// [`write_change`]): the path of moderation, and of a change batch that lost a race.
    pub(super) async fn change_one(&self, req: &ChangeRequest) -> Result<Written, StoreError> {
        let pool = self.live_pool()?;
        let outcome = async {
            let mut tx = pool.begin().await?;
            let outcome = write_change(&mut tx, req).await?;
            match &outcome {
                Ok(Written::Changed(Changed {
                    duplicate: false, ..
                })) => tx.commit().await?,
                _ => tx.rollback().await?,
            }
            Ok::<_, sqlx::Error>(outcome)
        }
        .await;
        match outcome {
            Ok(Ok(written)) => {
                if let Written::Changed(changed) = &written {
                    // What the change writer remembers of the message is out of date.
                    let m = &changed.message;
                    self.known.forget(&m.room_id, m.seq);
                }
                Ok(written)
            }
            Ok(Err(refusal)) => Err(StoreError::Refused(refusal)),
            // Two first edits with one key at once: the second answers with the first's change.
            Err(sqlx::Error::Database(e)) if e.constraint() == Some(CHANGE_KEY) => {
                Ok(Written::Stored)
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    /// The shortest time between the starts of two change batches under load.
    pub(super) fn write_interval(&self) -> Duration {
        Duration::from_millis(self.write_interval_ms.load(Ordering::Relaxed))
    }

    /// One send in one statement (see [`INSERT_MESSAGE_SQL`]).
    pub(super) async fn insert_one(&self, msg: &NewMessage) -> Result<Inserted, StoreError> {
        // fetch_optional reads the reply to its end (through the commit), so an Ok here means
        // the message is durable.
        let sql = if self.outbox() {
            INSERT_MESSAGE_WITH_OUTBOX_SQL
        } else {
            INSERT_MESSAGE_SQL
        };
        let mut writer = self.writer().await?;
        let stored: Result<Option<Answer>, sqlx::Error> = sqlx::query_as(sql)
            .bind(&msg.id)
            .bind(&msg.room_id)
            .bind(&msg.sender_id)
            .bind(&msg.sender_name)
            .bind(&msg.sender_avatar_url)
            .bind(&msg.content)
            .bind(utc(&msg.created_at))
            .bind(&msg.client_msg_id)
            .bind(msg.reply.as_ref().map(|q| q.seq))
            .fetch_optional(writer.conn())
            .await;
        writer.finish(&stored);
        drop(writer);
        match stored {
            Ok(Some(answer)) => Ok(answer.inserted(msg)),
            Ok(None) => Err(StoreError::RoomNotFound),
            Err(sqlx::Error::Database(e)) if e.constraint() == Some(CLIENT_MSG_ID_KEY) => {
                let client_msg_id = msg.client_msg_id.as_deref().unwrap_or_default();
                let original = self
                    .find_by_client_msg_id(&msg.room_id, &msg.sender_id, client_msg_id)
                    .await?
                    .ok_or_else(|| {
                        StoreError::Other("clientMsgId conflict without a stored original".into())
                    })?;
                Ok(Inserted {
                    message: original,
                    duplicate: true,
                })
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    async fn find_by_client_msg_id(
        &self,
        room: &str,
        sender: &str,
        client_msg_id: &str,
    ) -> Result<Option<Message>, StoreError> {
        sqlx::query_as(FIND_BY_CLIENT_MSG_ID_SQL)
            .bind(room)
            .bind(sender)
            .bind(client_msg_id)
            .fetch_optional(self.live_pool()?)
            .await
            .map_err(|e| self.failed(e))
    }
}

/// The Postgres store's own counters, for `/metrics`.
#[derive(Debug, Clone)]
pub struct PgMetrics {
    /// Times the database was found unreachable.
    pub outages: Counter,
    /// Writes run again after losing a race: `reason="deadlock"` or `"serialization"`.
    pub retries: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Sends written per group commit (one observation per batch).
    pub send_batch_size: prometheus_client::metrics::histogram::Histogram,
    /// Changes written per group commit (one observation per batch).
    pub change_batch_size: prometheus_client::metrics::histogram::Histogram,
    /// Change batches written again one change at a time because another writer changed one of
    /// their messages between their read and their write.
    pub change_batch_races: Counter,
}

impl Default for PgMetrics {
    fn default() -> Self {
        Self {
            outages: Counter::default(),
            retries: Family::default(),
            // 1, 2, 4, ... 256 sends per batch.
            send_batch_size: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 9),
            ),
            change_batch_size: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 9),
            ),
            change_batch_races: Counter::default(),
        }
    }
}

/// Whether one of `pool`'s connections answers, dropping up to `size` dead ones on the way.
async fn answers(pool: &PgPool, size: u32) -> bool {
    for _ in 0..=size {
        let ping = sqlx::query("SELECT 1").execute(pool);
        match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
            Ok(Ok(_)) => return true,
            Ok(Err(e)) if unreachable(&e) => continue,
            _ => return false,
        }
    }
    false
}

/// A failure that says the database cannot be reached (as opposed to an answer it gave): no
/// connection could be had or it broke, or the server is shutting down or starting up.
pub(super) fn unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.try_downcast_ref::<PgDatabaseError>().is_some_and(|pg| {
            let code = pg.code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

/// Why a write lost a race it may win when run again, if it did.
fn race(e: &sqlx::Error) -> Option<&'static str> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    match db.try_downcast_ref::<PgDatabaseError>()?.code() {
        "40P01" => Some("deadlock"),
        "40001" => Some("serialization"),
        _ => None,
    }
}

/// `TIMESTAMP(3)` columns hold UTC without a zone, in whole milliseconds: cut here as SQLite's
/// text is (Postgres would round), so that a value is stored as the gateway answers it.
pub(super) fn utc(t: &DateTime<Utc>) -> NaiveDateTime {
    t.trunc_subsecs(3).naive_utc()
}

/// Postgres text cannot hold U+0000; refusing it here gives the client a clear reason.
fn refuse_nul(fields: &[(&str, Option<&str>)]) -> Result<(), StoreError> {
    match fields
        .iter()
        .find(|(_, v)| v.is_some_and(|v| v.contains('\0')))
    {
        Some((name, _)) => Err(StoreError::Invalid(format!(
            "{name} must not contain NUL (U+0000) characters"
        ))),
        None => Ok(()),
    }
}

impl PgStore {
    /// Connects (at least one connection must open now); does not migrate.
    pub async fn connect(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?.application_name("chat-gateway");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(acquire_timeout)
            // A ping before every checkout would double the round trips of a send. A connection
            // that died meanwhile fails its one statement (`Unavailable`, nothing written) and is
            // discarded when it is returned; the pool opens a fresh one.
            .test_before_acquire(false)
            // Every connection is opened here, on the runtime that starts the gateway, and kept:
            // a socket belongs to the runtime that opened it, and one opened by a task on the
            // churn lane would have every later query on it answered by the lane's thread, after
            // the churn queued there (see `crate::admission::ChurnLane`).
            .min_connections(max_connections.max(1))
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await?;
        let writers = Arc::new(
            WriterConns::open(
                options
                    .application_name("chat-gateway writer")
                    .options(WRITER_SETTINGS),
                super::pg_sends::IN_FLIGHT + 1,
                acquire_timeout,
            )
            .await?,
        );
        let counters = PgMetrics::default();
        let (probe_pool, probe_writers) = (pool.clone(), writers.clone());
        let pool_size = max_connections.max(1);
        let health = Health::new(
            "the database",
            counters.outages.clone(),
            Box::new(move || {
                let (pool, writers) = (probe_pool.clone(), probe_writers.clone());
                Box::pin(async move {
                    // A pool hands out its idle connections first, and each that died with the
                    // database fails its one statement and is dropped: go through the pool's
                    // until one answers, and through every writer's, so that traffic does not
                    // meet them after the recovery (each would find the database "down" again).
                    answers(&pool, pool_size).await && writers.answer(PROBE_TIMEOUT).await
                })
            }),
        );
        let writes = Arc::new(Writes {
            pool: pool.clone(),
            health,
            writers,
            known: Known::new(),
            outbox: AtomicBool::new(false),
            batch_size: counters.send_batch_size.clone(),
            change_batch_size: counters.change_batch_size.clone(),
            change_batch_races: counters.change_batch_races.clone(),
            write_interval_ms: AtomicU64::new(DEFAULT_WRITE_INTERVAL_MS),
        });
        Ok(Self {
            pool,
            sends: Sends::start(writes.clone()),
            changes: Changes::start(writes.clone()),
            writes,
            counters,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Whether sends write outbox rows for the side-effect worker (off by default: with no
    /// webhook a message has no side effect left to perform).
    pub fn with_outbox(self, outbox: bool) -> Self {
        self.writes.outbox.store(outbox, Ordering::Relaxed);
        self
    }

    /// The shortest time between the starts of two change batches under load
    /// (`database.write_interval_ms`; see `pg_changes`).
    pub fn with_write_interval(self, interval: Duration) -> Self {
        let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        self.writes.write_interval_ms.store(ms, Ordering::Relaxed);
        self
    }

    fn live_pool(&self) -> Result<&PgPool, StoreError> {
        self.writes.live_pool()
    }

    /// The change an edit's `clientChangeId` stored (a retry's answer), with its message as it
    /// is now.
    async fn stored_change(&self, req: &ChangeRequest) -> Result<Changed, StoreError> {
        let row: ChangeRow = sqlx::query_as(CHANGE_BY_KEY_SQL)
            .bind(&req.room_id)
            .bind(&req.actor)
            .bind(req.client_change_id())
            .fetch_one(self.live_pool()?)
            .await
            .map_err(|e| self.failed(e))?;
        let change = Change::try_from(row)?;
        let message = self
            .message(&req.room_id, &Target::Seq(change.target))
            .await?
            .ok_or(StoreError::Refused(Refusal::NotFound))?;
        Ok(Changed {
            message,
            change: Some(change),
            duplicate: true,
        })
    }

    fn failed(&self, e: sqlx::Error) -> StoreError {
        self.writes.failed(e)
    }

    /// Runs a write that locks several rows, again (up to [`RACE_RETRIES`] times) when Postgres
    /// made it a deadlock victim or it lost a serialization race; counts every retry.
    async fn retrying<'p, T, F>(&'p self, run: impl Fn(&'p PgPool) -> F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, sqlx::Error>>,
    {
        let mut attempt = 0;
        loop {
            match run(self.live_pool()?).await {
                Err(e) if attempt < RACE_RETRIES && race(&e).is_some() => {
                    let reason = race(&e).unwrap_or_default();
                    self.counters
                        .retries
                        .get_or_create(&vec![("reason", reason)])
                        .inc();
                    tracing::warn!(error = %e, attempt, "a write lost a race; running it again");
                    attempt += 1;
                }
                result => return result.map_err(|e| self.failed(e)),
            }
        }
    }

    /// Applies the automatic migrations. Refuses when "ChatMessage" holds rows but lacks the
    /// sequence index: building it here would block the app's writes for the whole build, so the
    /// maintenance-window file has to build it CONCURRENTLY first.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        if needs_maintenance(&self.pool).await? {
            return Err(StoreError::Other(format!(
                "\"ChatMessage\" holds rows but has no \"{SEQ_INDEX}\" index: run \
                 `chat-gateway migrate --maintenance` in a maintenance window first (it builds the \
                 indexes CONCURRENTLY); see docs/migration-runbook.md"
            )));
        }
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Other(format!("migration failed: {e}")))
    }

    pub async fn close(&self) {
        self.writes.writers.close().await;
        self.pool.close().await;
    }
}

/// True for a legacy "ChatMessage" with rows and without the gateway's sequence index.
async fn needs_maintenance(pool: &PgPool) -> Result<bool, StoreError> {
    let (table, index): (bool, bool) = sqlx::query_as(
        r#"SELECT to_regclass('"ChatMessage"') IS NOT NULL, to_regclass(format('%I', $1::text)) IS NOT NULL"#,
    )
    .bind(SEQ_INDEX)
    .fetch_one(pool)
    .await?;
    if !table || index {
        return Ok(false);
    }
    Ok(
        sqlx::query_scalar(r#"SELECT EXISTS (SELECT 1 FROM "ChatMessage")"#)
            .fetch_one(pool)
            .await?,
    )
}

/// The statements of a maintenance file: one per `;` at a line end, comment lines dropped.
pub fn maintenance_statements(sql: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        let line = line.trim_end();
        if line.trim_start().starts_with("--") || line.trim().is_empty() {
            continue;
        }
        if !current.is_empty() {
            current.push('\n');
        }
        current.push_str(line);
        if line.ends_with(';') {
            current.pop();
            statements.push(std::mem::take(&mut current));
        }
    }
    if !current.trim().is_empty() {
        statements.push(current);
    }
    statements
}

/// The index a `CREATE [UNIQUE] INDEX CONCURRENTLY IF NOT EXISTS "name"` statement builds.
fn concurrent_index_name(statement: &str) -> Option<&str> {
    if !statement.contains("CONCURRENTLY") || !statement.starts_with("CREATE") {
        return None;
    }
    let rest = statement.split_once("IF NOT EXISTS ")?.1;
    let rest = rest.strip_prefix('"')?;
    Some(&rest[..rest.find('"')?])
}

/// Runs the maintenance-window file on `url`: each statement on its own, outside any transaction,
/// reporting each as it goes. A CONCURRENTLY build that failed earlier left an INVALID index that
/// IF NOT EXISTS would keep; it is dropped (concurrently) and built again.
pub async fn run_maintenance(url: &str, report: &mut dyn FnMut(&str)) -> Result<(), StoreError> {
    let options = PgConnectOptions::from_str(url)?.application_name("chat-gateway maintenance");
    let mut conn = PgConnection::connect_with(&options).await?;
    let table: bool = sqlx::query_scalar(r#"SELECT to_regclass('"ChatMessage"') IS NOT NULL"#)
        .fetch_one(&mut conn)
        .await?;
    if !table {
        report(&format!(
            "skipped {MAINTENANCE_FILE}: there is no \"ChatMessage\" table yet, so the automatic \
             migrations create it with these columns and indexes"
        ));
        return Ok(());
    }
    for statement in maintenance_statements(MAINTENANCE_SQL) {
        if let Some(index) = concurrent_index_name(&statement) {
            let invalid: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_index WHERE NOT indisvalid \
                 AND indexrelid = to_regclass(format('%I', $1::text)))",
            )
            .bind(index)
            .fetch_one(&mut conn)
            .await?;
            if invalid {
                report(&format!(
                    "dropping the invalid index \"{index}\" left by an interrupted build"
                ));
                sqlx::raw_sql(&format!("DROP INDEX CONCURRENTLY IF EXISTS \"{index}\""))
                    .execute(&mut conn)
                    .await?;
            }
        }
        let started = Instant::now();
        let one_line = statement.split_whitespace().collect::<Vec<_>>().join(" ");
        sqlx::raw_sql(&statement)
            .execute(&mut conn)
            .await
            .map_err(|e| {
                StoreError::Other(format!(
                    "{one_line}: {e} (every statement is idempotent: rerun `migrate --maintenance`)"
                ))
            })?;
        report(&format!(
            "{one_line} ({} ms)",
            started.elapsed().as_millis()
        ));
    }
    conn.close().await?;
    Ok(())
}

#[async_trait]
impl Store for PgStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(self.live_pool()?)
            .await
            .map_err(|e| self.failed(e))?;
        Ok(())
    }

    async fn insert_message(&self, msg: NewMessage) -> Result<Inserted, StoreError> {
        refuse_nul(&[
            ("content", Some(&msg.content)),
            ("clientMsgId", msg.client_msg_id.as_deref()),
            ("sender name", msg.sender_name.as_deref()),
            ("sender avatar", msg.sender_avatar_url.as_deref()),
            ("sender id", Some(&msg.sender_id)),
            ("room id", Some(&msg.room_id)),
        ])?;
        // Fails at once while the database is known to be unreachable, without queueing.
        self.live_pool()?;
        let inserted = self.sends.insert(msg).await?;
        if !inserted.duplicate {
            // Changes go to recent messages: the change writer need not read this one first.
            self.writes.known.remember(&inserted.message);
        }
        Ok(inserted)
    }

    async fn find_by_client_msg_id(
        &self,
        room: &str,
        sender: &str,
        client_msg_id: &str,
    ) -> Result<Option<Message>, StoreError> {
        refuse_nul(&[("clientMsgId", Some(client_msg_id))])?;
        let found = self
            .writes
            .find_by_client_msg_id(room, sender, client_msg_id)
            .await?;
        let mut rows: Vec<Message> = found.into_iter().collect();
        quote_replies(self, room, &mut rows).await?;
        Ok(rows.pop())
    }

    async fn history(
        &self,
        room: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let mut rows = sqlx::query_as(HISTORY_SQL)
            .bind(room)
            .bind(before.unwrap_or(i64::MAX))
            .bind(i64::from(limit))
            .fetch_all(self.live_pool()?)
            .await
            .map_err(|e| self.failed(e))?;
        quote_replies(self, room, &mut rows).await?;
        Ok(rows)
    }

    async fn events_between(
        &self,
        room: &str,
        after: i64,
        until: i64,
        limit: u32,
    ) -> Result<Vec<Event>, StoreError> {
        let mut messages = sqlx::query_as(MESSAGES_BETWEEN_SQL)
            .bind(room)
            .bind(after)
            .bind(until)
            .bind(i64::from(limit))
            .fetch_all(self.live_pool()?)
            .await
            .map_err(|e| self.failed(e))?;
        quote_replies(self, room, &mut messages).await?;
        let changes = sqlx::query_as(
            r#"SELECT "roomId", seq, "messageSeq", "actorId", "createdAt" AT TIME ZONE 'UTC' AS "createdAt", change
               FROM "ChatMessageChange" WHERE "roomId" = $1 AND seq > $2 AND seq <= $3
               ORDER BY seq ASC LIMIT $4"#,
        )
        .bind(room)
        .bind(after)
        .bind(until)
        .bind(i64::from(limit))
        .fetch_all(self.live_pool()?)
        .await
        .map_err(|e| self.failed(e))?;
        merge_events(messages, changes, limit)
    }

    async fn messages_at(&self, room: &str, seqs: &[i64]) -> Result<Vec<Message>, StoreError> {
        sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            r#" FROM "ChatMessage" WHERE "roomId" = $1 AND seq = ANY($2)"#
        ))
        .bind(room)
        .bind(seqs)
        .fetch_all(self.live_pool()?)
        .await
        .map_err(|e| self.failed(e))
    }

    async fn message(&self, room: &str, target: &Target) -> Result<Option<Message>, StoreError> {
        let found = message_by(self.live_pool()?, room, target)
            .await
            .map_err(|e| self.failed(e))?;
        let mut rows: Vec<Message> = found.into_iter().collect();
        quote_replies(self, room, &mut rows).await?;
        Ok(rows.pop())
    }

    async fn change_message(&self, req: ChangeRequest) -> Result<Changed, StoreError> {
        refuse_nul(&[("clientChangeId", req.client_change_id())])?;
        self.live_pool()?;
        let written = match req.op {
            ChangeOp::Moderate { .. } => self.writes.change_one(&req).await?,
            _ => self.changes.write(req.clone()).await?,
        };
        let mut changed = match written {
            Written::Changed(changed) => changed,
            Written::Stored => return self.stored_change(&req).await,
        };
        let room = changed.message.room_id.clone();
        quote_replies(self, &room, std::slice::from_mut(&mut changed.message)).await?;
        Ok(changed)
    }

    async fn my_reactions(
        &self,
        room: &str,
        user: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        sqlx::query_as(
            r#"SELECT "messageSeq", emoji FROM "ChatReaction"
               WHERE "roomId" = $1 AND "userId" = $2 AND "messageSeq" BETWEEN $3 AND $4
               ORDER BY "messageSeq", "createdAt""#,
        )
        .bind(room)
        .bind(user)
        .bind(from)
        .bind(to)
        .fetch_all(self.live_pool()?)
        .await
        .map_err(|e| self.failed(e))
    }

    async fn room_head(&self, room: &str) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar(r#"SELECT "lastSeq" FROM "ChatRoom" WHERE id = $1"#)
                .bind(room)
                .fetch_optional(self.live_pool()?)
                .await
                .map_err(|e| self.failed(e))?,
        )
    }

    async fn room_heads(&self, rooms: &[&str]) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(
            sqlx::query_as(r#"SELECT id, "lastSeq" FROM "ChatRoom" WHERE id = ANY($1)"#)
                .bind(rooms)
                .fetch_all(self.live_pool()?)
                .await
                .map_err(|e| self.failed(e))?,
        )
    }

    async fn access(&self, room: &str, user: &str) -> Result<Access, StoreError> {
        let (room_exists, member): (bool, bool) = sqlx::query_as(
            r#"SELECT EXISTS (SELECT 1 FROM "ChatRoom" WHERE id = $1),
                      EXISTS (SELECT 1 FROM "ChatRoomMember" WHERE "roomId" = $1 AND "userId" = $2)"#,
        )
        .bind(room)
        .bind(user)
        .fetch_one(self.live_pool()?)
        .await
        .map_err(|e| self.failed(e))?;
        Ok(match (room_exists, member) {
            (false, _) => Access::NoRoom,
            (true, false) => Access::NotMember,
            (true, true) => Access::Member,
        })
    }

    async fn create_room(&self, id: &str, name: &str) -> Result<Room, StoreError> {
        refuse_nul(&[("room name", Some(name))])?;
        sqlx::query(
            r#"INSERT INTO "ChatRoom" (id, name, "createdAt", "updatedAt")
               VALUES ($1, $2, now() AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC')"#,
        )
        .bind(id)
        .bind(name)
        .execute(self.live_pool()?)
        .await
        .map_err(|e| match self.failed(e) {
            StoreError::Conflict(_) => StoreError::Conflict(format!("room {id:?} already exists")),
            other => other,
        })?;
        Ok(Room {
            id: id.to_string(),
            name: name.to_string(),
            last_seq: 0,
        })
    }

    async fn ensure_room(&self, id: &str, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query(
            r#"INSERT INTO "ChatRoom" (id, name, "createdAt", "updatedAt")
               VALUES ($1, $2, now() AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC')
               ON CONFLICT (id) DO NOTHING"#,
        )
        .bind(id)
        .bind(name)
        .execute(self.live_pool()?)
        .await
        .map_err(|e| self.failed(e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn add_member(&self, room: &str, user: &str) -> Result<bool, StoreError> {
        refuse_nul(&[("user id", Some(user))])?;
        let (room_exists, added): (bool, bool) = sqlx::query_as(
            r#"WITH room AS (SELECT id FROM "ChatRoom" WHERE id = $2),
               added AS (
                   INSERT INTO "ChatRoomMember" (id, "roomId", "userId", "joinedAt")
                   SELECT $1, id, $3, now() AT TIME ZONE 'UTC' FROM room
                   ON CONFLICT ("roomId", "userId") DO NOTHING
                   RETURNING 1
               )
               SELECT EXISTS (SELECT 1 FROM room), EXISTS (SELECT 1 FROM added)"#,
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(room)
        .bind(user)
        .fetch_one(self.live_pool()?)
        .await
        .map_err(|e| self.failed(e))?;
        if !room_exists {
            return Err(StoreError::RoomNotFound);
        }
        Ok(added)
    }

    async fn remove_member(&self, room: &str, user: &str) -> Result<bool, StoreError> {
        let done =
            sqlx::query(r#"DELETE FROM "ChatRoomMember" WHERE "roomId" = $1 AND "userId" = $2"#)
                .bind(room)
                .bind(user)
                .execute(self.live_pool()?)
                .await
                .map_err(|e| self.failed(e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn my_rooms(&self, user: &str, limit: u32) -> Result<Vec<RoomSummary>, StoreError> {
        let rooms: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
            r#"SELECT r.id, r.name, r."lastSeq", m."lastReadSeq",
                 (SELECT count(*) FROM (SELECT 1 FROM "ChatMessage" x
                    WHERE x."roomId" = r.id AND x.seq > m."lastReadSeq"
                      AND x."moderationStatus" <> 'REJECTED' LIMIT 1000) unread) AS unread
               FROM "ChatRoomMember" m JOIN "ChatRoom" r ON r.id = m."roomId"
               WHERE m."userId" = $1 ORDER BY r."lastMessageAt" DESC NULLS LAST, r.id LIMIT $2"#,
        )
        .bind(user)
        .bind(i64::from(limit))
        .fetch_all(self.live_pool()?)
        .await
        .map_err(|e| self.failed(e))?;
        let last: Vec<Message> = sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            r#" FROM "ChatMessage" WHERE ("roomId", seq) IN
                (SELECT r.id, (SELECT max(x.seq) FROM "ChatMessage" x
                               WHERE x."roomId" = r.id AND x."moderationStatus" <> 'REJECTED')
                 FROM "ChatRoomMember" m JOIN "ChatRoom" r ON r.id = m."roomId"
                 WHERE m."userId" = $1)"#
        ))
        .bind(user)
        .fetch_all(self.live_pool()?)
        .await
        .map_err(|e| self.failed(e))?;
        Ok(super::summaries(rooms, last))
    }

    async fn member_count(&self, room: &str) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar(r#"SELECT COUNT(*) FROM "ChatRoomMember" WHERE "roomId" = $1"#)
                .bind(room)
                .fetch_one(self.live_pool()?)
                .await
                .map_err(|e| self.failed(e))?,
        )
    }

    async fn mark_read(&self, marks: &[ReadMark]) -> Result<u64, StoreError> {
        if marks.is_empty() {
            return Ok(0);
        }
        let rooms: Vec<&str> = marks.iter().map(|m| m.room_id.as_str()).collect();
        let users: Vec<&str> = marks.iter().map(|m| m.user_id.as_str()).collect();
        let seqs: Vec<i64> = marks.iter().map(|m| m.seq).collect();
        let ats: Vec<NaiveDateTime> = marks.iter().map(|m| utc(&m.at)).collect();
        let done = self
            .retrying(|pool| {
                sqlx::query(MARK_READ_SQL)
                    .bind(&rooms)
                    .bind(&users)
                    .bind(&seqs)
                    .bind(&ats)
                    .execute(pool)
            })
            .await?;
        Ok(done.rows_affected())
    }

    async fn outbox_claim(
        &self,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        // The database's clock, so relays on several nodes agree on whose lease has ended;
        // SKIP LOCKED lets them claim disjoint rows at the same time.
        let mut rows: Vec<OutboxEntry> = sqlx::query_as(
            r#"UPDATE "ChatOutbox" SET "claimedUntil" = now() AT TIME ZONE 'UTC' + make_interval(secs => $1)
               WHERE id IN (SELECT id FROM "ChatOutbox"
                            WHERE "claimedUntil" IS NULL OR "claimedUntil" < now() AT TIME ZONE 'UTC'
                            ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
               RETURNING id, "roomId", seq, "messageId", "createdAt" AT TIME ZONE 'UTC' AS "createdAt""#,
        )
        .bind(lease.as_secs_f64())
        .bind(i64::from(limit))
        .fetch_all(self.live_pool()?)
        .await
        .map_err(|e| self.failed(e))?;
        rows.sort_by_key(|r| r.id);
        Ok(rows)
    }

    async fn outbox_done(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.retrying(|pool| {
            sqlx::query(r#"DELETE FROM "ChatOutbox" WHERE id = ANY($1)"#)
                .bind(ids)
                .execute(pool)
        })
        .await?;
        Ok(())
    }

    async fn outbox_lease(&self, ids: &[i64], lease: Option<Duration>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.retrying(|pool| {
            sqlx::query(
                r#"UPDATE "ChatOutbox"
                   SET "claimedUntil" = now() AT TIME ZONE 'UTC' + make_interval(secs => $2)
                   WHERE id = ANY($1)"#,
            )
            .bind(ids)
            .bind(lease.map(|l| l.as_secs_f64()))
            .execute(pool)
        })
        .await?;
        Ok(())
    }

    async fn outbox_release_all(&self) -> Result<u64, StoreError> {
        let done = self
            .retrying(|pool| {
                sqlx::query(
                    r#"UPDATE "ChatOutbox" SET "claimedUntil" = NULL WHERE "claimedUntil" IS NOT NULL"#,
                )
                .execute(pool)
            })
            .await?;
        Ok(done.rows_affected())
    }

    async fn close(&self) {
        PgStore::close(self).await;
    }

    fn metrics(&self) -> Option<StoreMetrics> {
        Some(StoreMetrics::Postgres(self.counters.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_maintenance_file_says_it_runs_by_hand_and_splits_into_statements() {
        assert!(
            MAINTENANCE_SQL
                .lines()
                .next()
                .unwrap()
                .starts_with("-- MAINTENANCE WINDOW, RUN BY HAND")
        );
        let statements = maintenance_statements(MAINTENANCE_SQL);
        assert!(statements.iter().all(|s| !s.contains("--")));
        let indexes: Vec<_> = statements
            .iter()
            .filter_map(|s| concurrent_index_name(s))
            .collect();
        assert_eq!(
            indexes,
            [
                "ChatMessage_roomId_createdAt_idx",
                SEQ_INDEX,
                CLIENT_MSG_ID_KEY,
                "ChatMessage_unsequenced_idx"
            ]
        );
        assert_eq!(statements.first().unwrap(), "SET lock_timeout = '5s'");
    }

    #[test]
    fn nul_is_refused_naming_the_field() {
        let err = refuse_nul(&[("content", Some("a\0b"))]).unwrap_err();
        assert!(matches!(err, StoreError::Invalid(m) if m.starts_with("content ")));
        assert!(refuse_nul(&[("content", Some("é ' -- ; \u{202e}")), ("x", None)]).is_ok());
    }
}
