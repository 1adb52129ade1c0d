//! Sends on Postgres, in group commits. A send does not take a connection of its own: it queues
//! for the node's send writer, which takes everything waiting (up to [`BATCH`]) and writes it in
//! one statement, one round trip and one commit (one WAL flush), at most [`IN_FLIGHT`] batches at
//! once, on the writers' connections (generic plans of index lookups: see
//! `postgres::WRITER_SETTINGS`). A send that finds the writer free is a batch of one, written by
//! the single-send statement at once; under load (the previous batch took more than one send, see
//! `group::Pacer`) a batch starts no sooner than `database.write_interval_ms` after the previous
//! one started and takes everything that arrived meanwhile, so batches grow with the load and
//! commits (WAL flushes) per message fall.
//!
//! A batch statement does what the single-send one does for every send of the batch:
//! - a `clientMsgId` already stored answers with the original (`duplicate`); the same key twice in
//!   one batch is written once, the later send answered as its duplicate;
//! - every room of the batch is locked in id order (so two nodes' batches over the same rooms can
//!   never wait for each other in a cycle), moves its `"lastSeq"` by its number of new messages
//!   and its `"lastMessageAt"`; its new messages take the numbers in between, in arrival order;
//! - the messages (and with side effects their outbox rows) are inserted; a send to a room that
//!   does not exist gets `RoomNotFound`, the rest of its batch is written.
//!
//! Any other failure of a batch rolls all of it back (nothing stored, no number spent). When the
//! database cannot be reached, every send of the batch gets `Unavailable`; otherwise (another
//! node stored one of its keys at the same moment, or one message the database refuses) the batch
//! is written again one send at a time, so only that send fails.
//!
//! The caller's future may go away (it never does from the chat service, whose sends run in
//! tasks of their own): its message is written all the same and the answer dropped.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use chrono::NaiveDateTime;
use tokio::sync::{Semaphore, mpsc};

use super::group::{self, Batch, Queued};
use super::postgres::{Answer, Writes, columns, seq_only, utc};
use super::{Inserted, NewMessage, StoreError};

/// Most sends in one statement.
pub const BATCH: usize = 256;
/// Batches written at once (each on a pooled connection).
pub const IN_FLIGHT: usize = 2;
/// Sends waiting for the writer; past it, senders wait for room (never an error).
const QUEUE: usize = 4096;

/// The message columns as the batch statement's CTEs name them (cast where they are read).
macro_rules! fields {
    () => {
        r#"id, "roomId", seq, "senderId", "senderName", "senderAvatarUrl", content, "contentType", status, "moderationStatus", "createdAt", "clientMsgId", "editedAt", "deletedAt", version, "replyToSeq", reactions"#
    };
}

/// A batch of sends in one statement. `$1` ids, `$2` rooms, `$3` senders, `$4` names, `$5`
/// avatars, `$6` contents, `$7` times (UTC), `$8` clientMsgIds, `$9` replyToSeqs, one element per send, in arrival
/// order (`ord`). Returns `(ord, duplicate, …)` for every send that was stored or found: a stored
/// send's new `seq`, or a repeat's original (`postgres::Answer`).
macro_rules! batch_sql {
    ($outbox:literal) => {
        concat!(
            r#"WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $7::timestamp[], $8::text[], $9::bigint[])
        WITH ORDINALITY AS t(in_id, in_room, in_sender, in_name, in_avatar, in_content, in_at,
                             in_cmid, in_reply, ord)
),
existing AS (
    SELECT i.ord, "#,
            columns!(),
            r#" FROM input i JOIN "ChatMessage" m
    ON m."roomId" = i.in_room AND m."senderId" = i.in_sender AND m."clientMsgId" = i.in_cmid
),
fresh AS (SELECT * FROM input i WHERE NOT EXISTS (SELECT 1 FROM existing e WHERE e.ord = i.ord)),
counts AS (SELECT in_room AS room, count(*) AS n, max(in_at) AS at FROM fresh GROUP BY in_room),
locked AS MATERIALIZED (
    SELECT r.id FROM "ChatRoom" r WHERE r.id IN (SELECT room FROM counts)
    ORDER BY r.id FOR NO KEY UPDATE
),
rooms AS (
    UPDATE "ChatRoom" r SET "lastSeq" = r."lastSeq" + c.n,
        "lastMessageAt" = GREATEST(COALESCE(r."lastMessageAt", c.at), c.at),
        "updatedAt" = GREATEST(COALESCE(r."lastMessageAt", c.at), c.at)
    FROM counts c, locked l WHERE r.id = c.room AND l.id = r.id
    RETURNING r.id AS room, r."lastSeq" - c.n AS base
),
numbered AS (
    SELECT f.*, rooms.base + row_number() OVER (PARTITION BY f.in_room ORDER BY f.ord) AS in_seq
    FROM fresh f JOIN rooms ON rooms.room = f.in_room
),
message AS (
    INSERT INTO "ChatMessage" (id, "roomId", seq, "senderId", "senderName", "senderAvatarUrl",
        content, "contentType", status, "moderationStatus", "createdAt", "clientMsgId", "replyToSeq")
    SELECT in_id, in_room, in_seq, in_sender, in_name, in_avatar, in_content, 'TEXT', 'SENT',
        'APPROVED', in_at, in_cmid, in_reply
    FROM numbered ORDER BY in_room, in_seq
    RETURNING id, "roomId", seq, "createdAt"
)"#,
            $outbox,
            r#"
SELECT n.ord, false AS duplicate, "#,
            seq_only!(),
            r#" FROM message m JOIN numbered n ON n.in_id = m.id
UNION ALL
SELECT ord, true AS duplicate, "#,
            fields!(),
            r#" FROM existing"#
        )
    };
}

const BATCH_SQL: &str = batch_sql!("");
const BATCH_WITH_OUTBOX_SQL: &str = batch_sql!(
    r#",
outbox AS (
    INSERT INTO "ChatOutbox" ("roomId", seq, "messageId", "createdAt")
    SELECT "roomId", seq, id, "createdAt" FROM message
)"#
);

/// One send of a batch: its place in the batch, and what the store answered.
struct Row {
    ord: i64,
    answer: Answer,
}

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for Row {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::Row as _;
        Ok(Self {
            ord: row.try_get("ord")?,
            answer: sqlx::FromRow::from_row(row)?,
        })
    }
}

type Pending = Queued<NewMessage, Inserted>;

/// The queue sends wait in for the writer.
pub struct Sends {
    queue: mpsc::Sender<Pending>,
}

impl Sends {
    /// Starts the writer on the current runtime (the one that opened the pool's connections).
    pub fn start(writes: Arc<Writes>) -> Self {
        let (queue, queued) = mpsc::channel(QUEUE);
        tokio::spawn(write_all(writes, queued));
        Self { queue }
    }

    /// Queues a send and waits for its outcome (after its commit).
    pub async fn insert(&self, msg: NewMessage) -> Result<Inserted, StoreError> {
        group::ask(&self.queue, msg, "the send writer").await
    }
}

/// Takes what is waiting, a batch at a time, [`IN_FLIGHT`] batches at once, until every sender
/// is gone.
async fn write_all(writes: Arc<Writes>, mut queued: mpsc::Receiver<Pending>) {
    let turns = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut pacer = group::Pacer::default();
    loop {
        let turn = turns
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let mut batch = Vec::with_capacity(BATCH);
        if queued.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        pacer
            .pace(writes.write_interval(), &mut queued, &mut batch, BATCH)
            .await;
        let writes = writes.clone();
        tokio::spawn(async move {
            write(&writes, batch).await;
            drop(turn);
        });
    }
}

/// Writes a batch and answers each of its sends.
async fn write(writes: &Writes, mut queued: Vec<Pending>) {
    let Some(batch) = Batch::take(&mut queued, &writes.batch_size) else {
        return;
    };
    let written = if batch.len() == 1 {
        Ok(vec![writes.insert_one(batch.requests()[0]).await])
    } else {
        insert_many(writes, &batch.requests()).await
    };
    for p in batch.answer(written, "send") {
        let _ = p.reply.send(writes.insert_one(&p.req).await);
    }
}

/// What a send of a batch is before the statement runs.
enum Plan {
    /// Written by this batch, as `ord` (1-based position in the statement's arrays).
    Written(i64),
    /// Its key came earlier in this batch: answered as that send is, as a duplicate.
    SameAs(usize),
}

/// Writes `msgs` in one statement. The outer error fails (and rolls back) all of them; the inner
/// ones are per send (`RoomNotFound`). One outcome per send, in order.
async fn insert_many(
    writes: &Writes,
    msgs: &[&NewMessage],
) -> Result<Vec<Result<Inserted, StoreError>>, StoreError> {
    let mut first_of_key: HashMap<(&str, &str, &str), usize> = HashMap::new();
    let mut plans = Vec::with_capacity(msgs.len());
    let mut written: Vec<&NewMessage> = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        if let Some(key) = m.client_msg_id.as_deref() {
            match first_of_key.entry((&m.room_id, &m.sender_id, key)) {
                Entry::Occupied(first) => {
                    plans.push(Plan::SameAs(*first.get()));
                    continue;
                }
                Entry::Vacant(slot) => {
                    slot.insert(i);
                }
            }
        }
        written.push(m);
        plans.push(Plan::Written(written.len() as i64));
    }
    let column = |f: fn(&NewMessage) -> Option<&str>| -> Vec<Option<&str>> {
        written.iter().map(|m| f(m)).collect()
    };
    let ids = column(|m| Some(&m.id));
    let rooms = column(|m| Some(&m.room_id));
    let senders = column(|m| Some(&m.sender_id));
    let names = column(|m| m.sender_name.as_deref());
    let avatars = column(|m| m.sender_avatar_url.as_deref());
    let contents = column(|m| Some(&m.content));
    let keys = column(|m| m.client_msg_id.as_deref());
    let times: Vec<NaiveDateTime> = written.iter().map(|m| utc(&m.created_at)).collect();
    let replies: Vec<Option<i64>> = written
        .iter()
        .map(|m| m.reply.as_ref().map(|q| q.seq))
        .collect();
    let sql = if writes.outbox() {
        BATCH_WITH_OUTBOX_SQL
    } else {
        BATCH_SQL
    };
    let mut writer = writes.writer().await?;
    let rows: Result<Vec<Row>, sqlx::Error> = sqlx::query_as(sql)
        .bind(&ids)
        .bind(&rooms)
        .bind(&senders)
        .bind(&names)
        .bind(&avatars)
        .bind(&contents)
        .bind(&times)
        .bind(&keys)
        .bind(&replies)
        .fetch_all(writer.conn())
        .await;
    writer.finish(&rows);
    drop(writer);
    let rows = rows.map_err(|e| writes.failed(e))?;
    let mut by_ord: HashMap<i64, Answer> = rows.into_iter().map(|r| (r.ord, r.answer)).collect();
    let mut outcomes: Vec<Result<Inserted, StoreError>> = Vec::with_capacity(msgs.len());
    for plan in plans {
        let outcome = match plan {
            Plan::Written(ord) => by_ord
                .remove(&ord)
                .map(|answer| answer.inserted(written[ord as usize - 1]))
                .ok_or(StoreError::RoomNotFound),
            Plan::SameAs(first) => match &outcomes[first] {
                Ok(Inserted { message, .. }) => Ok(Inserted {
                    message: message.clone(),
                    duplicate: true,
                }),
                Err(e) => Err(e.clone()),
            },
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}
