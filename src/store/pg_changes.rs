//! Changes on Postgres, in group commits (see [`super::change_batch`]). A change queues for the
//! node's change writer, which takes everything waiting (up to [`BATCH`]) and writes it with no
//! explicit transaction, whatever the batch size:
//!
//! 1. one read of every request's message, the seq of a change stored under an edit's key, and
//!    whether a reaction's row is there (one snapshot), skipped for the messages the writer
//!    remembers (below);
//! 2. one write: every changed message is locked in (room, seq) order, and the statement goes on
//!    only if each one's version is still the one the decisions were made on, and every reaction
//!    row the batch decided on is there or not as assumed; then the rooms are locked in id order
//!    and move their heads by their number of changes, and the messages' new states, the change
//!    rows and the reaction rows are written. It commits as it ends (one WAL flush).
//!
//! The writer remembers the state of the messages this node stored, read or changed last (a
//! bounded cache), so a change of a message sent or changed recently through this node is one
//! statement: its decision is made
//! on the remembered state, a reaction assumed to change something, an edit's key assumed new,
//! and the write checks all of it (the version, the reaction rows, the key's unique index). A
//! remembered state only ever saves the read: a request it would refuse or find changing nothing
//! is decided again from the store.
//!
//! When the write finds a version moved or an assumption wrong (a change through another node),
//! it changes nothing: the batch is decided again from a fresh read and written once more, and if
//! that one loses too, written one change at a time through the locking transaction
//! (`postgres::write_change`), which waits for the message's lock instead. Locks are taken as
//! there: messages first, rooms last, each in a fixed order, so the change writer, the locking
//! path and sends (rooms only) never wait for each other in a cycle.
//!
//! One batch at a time, and under load (the previous batch took more than one change, see
//! `group::Pacer`) a batch starts no sooner than `database.write_interval_ms` after the previous
//! one started, taking everything that arrived meanwhile: statements per change fall as traffic
//! rises. A change that finds the writer free is written at once. Moderation
//! (rare, and written to a column the app may have made an enum type) always takes the locking
//! path.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::NaiveDateTime;
use tokio::sync::mpsc;

use super::change_batch::{self, Batch, Found, FoundRow};
use super::changes::{ChangeOp, ChangeRequest, Refusal, Target, Written};
use super::group::{self, Queued};
use super::postgres::{CHANGE_KEY, Writes, columns, utc};
use super::{Message, StoreError};

/// Most changes in one batch.
pub const BATCH: usize = 256;
/// Changes waiting for the writer; past it, callers wait for room (never an error).
const QUEUE: usize = 4096;
/// How much message state the writer remembers, in bytes (about each message's content and 256
/// more).
const KNOWN_BYTES: u64 = 8 << 20;

/// The messages the writer read or changed last, in the state it last saw them: (room, seq) to
/// the message, bounded by [`KNOWN_BYTES`].
///
/// Every send stores into it, so it is on the per-message path: `quick_cache` (one shard lock and
/// a hash-table insert, eviction in place) where moka's insert, with its queued policy updates,
/// cost about 2 % of a crossnode gateway's CPU at 1,000 msgs/s.
pub(super) struct Known(quick_cache::sync::Cache<(String, i64), Arc<Message>, ByContent>);

/// What a remembered message weighs: its content and 256 bytes for the rest.
#[derive(Clone)]
pub(super) struct ByContent;

impl quick_cache::Weighter<(String, i64), Arc<Message>> for ByContent {
    fn weight(&self, _: &(String, i64), m: &Arc<Message>) -> u64 {
        m.content.len() as u64 + 256
    }
}

/// A (room, seq) key without a copy of the room id: hashes and compares as the stored key.
#[derive(Hash)]
struct KeyRef<'a>(&'a str, i64);

impl quick_cache::Equivalent<(String, i64)> for KeyRef<'_> {
    fn equivalent(&self, key: &(String, i64)) -> bool {
        self.1 == key.1 && self.0 == key.0
    }
}

impl Known {
    pub(super) fn new() -> Self {
        // The item estimate only sizes the first tables: a message of 64 characters weighs 320.
        Self(quick_cache::sync::Cache::with_weighter(
            (KNOWN_BYTES / 320) as usize,
            KNOWN_BYTES,
            ByContent,
        ))
    }

    fn get(&self, room: &str, seq: i64) -> Option<Arc<Message>> {
        self.0.get(&KeyRef(room, seq))
    }

    /// Remembers a message as stored (without its quote: the store's reads add that).
    pub(super) fn remember(&self, m: &Message) {
        let mut m = m.clone();
        m.reply = None;
        self.0.insert((m.room_id.clone(), m.seq), Arc::new(m));
    }

    /// Forgets a message (changed some other way).
    pub(super) fn forget(&self, room: &str, seq: i64) {
        self.0.remove(&KeyRef(room, seq));
    }
}

/// Every request's message, the seq stored under an edit's key and whether its reaction row is
/// there. `$1` rooms, `$2` seqs (NULL: by id), `$3` ids, `$4` actors, `$5` clientChangeIds, `$6`
/// emojis, one element per request. Returns `ord` (1-based) with each request that found its
/// message.
const READ_SQL: &str = change_batch::read_sql!(
    r#"WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[])
        WITH ORDINALITY AS t(in_room, in_seq, in_id, in_actor, in_key, in_emoji, ord)
)"#,
    columns!()
);

/// A batch's writes in one statement (see the module docs). Messages: `$1` rooms, `$2` seqs, `$3`
/// expected versions, `$4` contents, `$5` editedAts, `$6` deletedAts, `$7` reactions, `$8`
/// indexes of their last change; `$9` the number of messages. Rooms: `$10` ids, `$11` numbers of
/// changes. Changes: `$12` rooms, `$13` indexes, `$14` message seqs, `$15` kinds, `$16` actors,
/// `$17` clientChangeIds, `$18` changes (JSON), `$19` times. Reaction rows added: `$20` rooms,
/// `$21` message seqs, `$22` emojis, `$23` users, `$24` times; removed: `$25` to `$28` alike;
/// cleared (deleted messages): `$29` rooms, `$30` message seqs. Reaction rows the batch decided
/// on as not there: `$31` to `$34` (room, message seq, emoji, user); as there: `$35` to `$38`,
/// `$39` their number. Returns each room's base (its head before the batch), or no row when a
/// version moved or a reaction row is not as assumed.
const WRITE_SQL: &str = r#"WITH msg AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::timestamp[],
                         $6::timestamp[], $7::text[], $8::bigint[])
        AS t(room, seq, expected, content, edited, deleted, reactions, idx)
),
locked AS MATERIALIZED (
    SELECT m."roomId", m.seq FROM "ChatMessage" m JOIN msg t ON m."roomId" = t.room AND m.seq = t.seq
    WHERE m.version IS NOT DISTINCT FROM t.expected
    ORDER BY m."roomId", m.seq FOR NO KEY UPDATE OF m
),
ok AS MATERIALIZED (
    SELECT (SELECT count(*) FROM locked) = $9
       AND NOT EXISTS (
           SELECT 1 FROM unnest($31::text[], $32::bigint[], $33::text[], $34::text[])
               AS a(room, mseq, emoji, usr)
           JOIN "ChatReaction" r ON r."roomId" = a.room AND r."messageSeq" = a.mseq
               AND r.emoji = a.emoji AND r."userId" = a.usr)
       AND (SELECT count(*) FROM unnest($35::text[], $36::bigint[], $37::text[], $38::text[])
               AS p(room, mseq, emoji, usr)
           JOIN "ChatReaction" r ON r."roomId" = p.room AND r."messageSeq" = p.mseq
               AND r.emoji = p.emoji AND r."userId" = p.usr) = $39
       AS ok
),
counts AS (SELECT * FROM unnest($10::text[], $11::bigint[]) AS c(room, n)),
room_locked AS MATERIALIZED (
    SELECT r.id FROM "ChatRoom" r WHERE r.id IN (SELECT room FROM counts) AND (SELECT ok FROM ok)
    ORDER BY r.id FOR NO KEY UPDATE
),
rooms AS (
    UPDATE "ChatRoom" r SET "lastSeq" = r."lastSeq" + c.n
    FROM counts c, room_locked l WHERE r.id = c.room AND l.id = r.id
    RETURNING r.id AS room, r."lastSeq" - c.n AS base
),
message AS (
    UPDATE "ChatMessage" m SET content = t.content, "editedAt" = t.edited, "deletedAt" = t.deleted,
        reactions = t.reactions, version = rooms.base + t.idx
    FROM msg t JOIN rooms ON rooms.room = t.room
    WHERE m."roomId" = t.room AND m.seq = t.seq
),
change AS (
    INSERT INTO "ChatMessageChange" ("roomId", seq, "messageSeq", kind, "actorId",
        "clientChangeId", change, "createdAt")
    SELECT c.room, rooms.base + c.idx, c.mseq, c.kind, c.actor, c.ckey, c.what, c.at
    FROM unnest($12::text[], $13::bigint[], $14::bigint[], $15::text[], $16::text[], $17::text[],
                $18::text[], $19::timestamp[]) AS c(room, idx, mseq, kind, actor, ckey, what, at)
    JOIN rooms ON rooms.room = c.room
),
reacted AS (
    INSERT INTO "ChatReaction" ("roomId", "messageSeq", emoji, "userId", "createdAt")
    SELECT * FROM unnest($20::text[], $21::bigint[], $22::text[], $23::text[], $24::timestamp[])
    WHERE (SELECT ok FROM ok)
    ON CONFLICT DO NOTHING
),
unreacted AS (
    DELETE FROM "ChatReaction" r
    USING unnest($25::text[], $26::bigint[], $27::text[], $28::text[]) AS u(room, mseq, emoji, usr)
    WHERE r."roomId" = u.room AND r."messageSeq" = u.mseq AND r.emoji = u.emoji
      AND r."userId" = u.usr AND (SELECT ok FROM ok)
),
cleared AS (
    DELETE FROM "ChatReaction" r USING unnest($29::text[], $30::bigint[]) AS u(room, mseq)
    WHERE r."roomId" = u.room AND r."messageSeq" = u.mseq AND (SELECT ok FROM ok)
)
SELECT room, base FROM rooms"#;

type Answer = Result<Written, StoreError>;

type Pending = Queued<ChangeRequest, Written>;

/// The queue changes wait in for the writer.
pub struct Changes {
    queue: mpsc::Sender<Pending>,
}

impl Changes {
    /// Starts the writer on the current runtime.
    pub fn start(writes: Arc<Writes>) -> Self {
        let (queue, queued) = mpsc::channel(QUEUE);
        tokio::spawn(write_all(writes, queued));
        Self { queue }
    }

    /// Queues a change and waits for its outcome (after its commit). Moderation is not queued:
    /// see the module docs.
    pub async fn write(&self, req: ChangeRequest) -> Answer {
        group::ask(&self.queue, req, "the change writer").await
    }
}

/// Takes what is waiting, one batch at a time, until every caller is gone.
async fn write_all(writes: Arc<Writes>, mut queued: mpsc::Receiver<Pending>) {
    let mut pacer = group::Pacer::default();
    loop {
        let mut batch = Vec::with_capacity(BATCH);
        if queued.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        pacer
            .pace(writes.write_interval(), &mut queued, &mut batch, BATCH)
            .await;
        write(&writes, batch).await;
    }
}

/// Writes a batch and answers each of its changes.
async fn write(writes: &Writes, mut queued: Vec<Pending>) {
    let Some(batch) = group::Batch::take(&mut queued, &writes.change_batch_size) else {
        return;
    };
    let written = match write_many(writes, &batch.requests()).await {
        Ok(Some(answers)) => Ok(answers
            .into_iter()
            .map(|a| a.map_err(StoreError::Refused))
            .collect()),
        Ok(None) => {
            // Lost to another node's change twice: one change at a time.
            writes.change_batch_races.inc();
            for p in batch.into_requests() {
                let _ = p.reply.send(writes.change_one(&p.req).await);
            }
            return;
        }
        Err(e) => Err(e),
    };
    for p in batch.answer(written, "change") {
        let _ = p.reply.send(writes.change_one(&p.req).await);
    }
}

/// Decides and writes `reqs`: first from what the writer remembers (reading only the rest), then,
/// if the write found a version moved or an assumption wrong, from a fresh read of all of them.
/// `None` when that lost too (nothing was written); otherwise one answer per request, in order.
async fn write_many(
    writes: &Writes,
    reqs: &[&ChangeRequest],
) -> Result<Option<Vec<Result<Written, Refusal>>>, StoreError> {
    if let Some(answers) = attempt(writes, reqs, true).await? {
        return Ok(Some(answers));
    }
    attempt(writes, reqs, false).await
}

/// One read (of what the writer remembers, when `use_memory`, nothing) and one write. `None`:
/// nothing was written.
async fn attempt(
    writes: &Writes,
    reqs: &[&ChangeRequest],
    use_memory: bool,
) -> Result<Option<Vec<Result<Written, Refusal>>>, StoreError> {
    let known = &writes.known;
    let mut writer = writes.writer().await?;
    let mut found: Vec<Option<Found>> = (0..reqs.len()).map(|_| None).collect();
    let mut from_memory = Vec::new();
    let mut unread: Vec<&ChangeRequest> = Vec::new();
    let mut unread_at = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let remembered = match r.target {
            Target::Seq(seq) if use_memory => known.get(&r.room_id, seq),
            _ => None,
        };
        match remembered {
            Some(m) => {
                found[i] = Some(Found {
                    message: (*m).clone(),
                    key_seq: None,
                    // Assumed to change something (checked by the write).
                    reacted: matches!(r.op, ChangeOp::Unreact { .. }),
                });
                from_memory.push(i);
            }
            None => {
                unread.push(r);
                unread_at.push(i);
            }
        }
    }
    if !unread.is_empty() {
        let rows: Result<Vec<FoundRow>, sqlx::Error> = bind_read(sqlx::query_as(READ_SQL), &unread)
            .fetch_all(writer.conn())
            .await;
        writer.finish(&rows);
        let rows = rows.map_err(|e| writes.failed(e))?;
        for (i, read) in unread_at
            .into_iter()
            .zip(change_batch::found(unread.len(), rows))
        {
            if let Some(read) = &read {
                known.remember(&read.message);
            }
            found[i] = read;
        }
    }
    let batch = change_batch::plan(reqs, found);
    if !batch.writes_all(&from_memory) {
        // A remembered state refused a request or found it changing nothing: not trusted for
        // that, decided again from the store.
        for &i in &from_memory {
            if let Target::Seq(seq) = reqs[i].target {
                known.forget(&reqs[i].room_id, seq);
            }
        }
        return Ok(None);
    }
    if batch.is_empty() {
        return Ok(Some(batch.answers(&HashMap::new())));
    }
    let bases = bind_writes(sqlx::query_as(WRITE_SQL), &batch)
        .fetch_all(writer.conn())
        .await;
    writer.finish(&bases);
    drop(writer);
    let bases: Vec<(String, i64)> = match bases {
        Ok(bases) => bases,
        // An edit assumed new was a retry (its key is stored): decided again from the read,
        // which finds the key.
        Err(sqlx::Error::Database(e)) if use_memory && e.constraint() == Some(CHANGE_KEY) => {
            Vec::new()
        }
        Err(e) => return Err(writes.failed(e)),
    };
    if bases.is_empty() {
        for w in &batch.messages {
            known.forget(&w.room, w.seq);
        }
        return Ok(None);
    }
    let bases: HashMap<String, i64> = bases.into_iter().collect();
    for w in &batch.messages {
        if let Some(base) = bases.get(&w.room) {
            let mut m = w.message.clone();
            m.version = Some(base + w.index);
            known.remember(&m);
        }
    }
    Ok(Some(batch.answers(&bases)))
}

type ReadQuery<'q> =
    sqlx::query::QueryAs<'q, sqlx::Postgres, FoundRow, sqlx::postgres::PgArguments>;

/// Binds [`READ_SQL`]'s six parameters.
fn bind_read<'q>(query: ReadQuery<'q>, reqs: &[&ChangeRequest]) -> ReadQuery<'q> {
    fn by_seq(r: &&ChangeRequest) -> Option<i64> {
        match r.target {
            Target::Seq(seq) => Some(seq),
            Target::Id(_) => None,
        }
    }
    fn by_id(r: &&ChangeRequest) -> Option<String> {
        match &r.target {
            Target::Seq(_) => None,
            Target::Id(id) => Some(id.clone()),
        }
    }
    fn emoji(r: &&ChangeRequest) -> Option<String> {
        match &r.op {
            ChangeOp::React { emoji, .. } | ChangeOp::Unreact { emoji } => Some(emoji.clone()),
            _ => None,
        }
    }
    query
        .bind(reqs.iter().map(|r| r.room_id.clone()).collect::<Vec<_>>())
        .bind(reqs.iter().map(by_seq).collect::<Vec<_>>())
        .bind(reqs.iter().map(by_id).collect::<Vec<_>>())
        .bind(reqs.iter().map(|r| r.actor.clone()).collect::<Vec<_>>())
        .bind(
            reqs.iter()
                .map(|r| r.client_change_id().map(str::to_string))
                .collect::<Vec<_>>(),
        )
        .bind(reqs.iter().map(emoji).collect::<Vec<_>>())
}

type WriteQuery<'q> =
    sqlx::query::QueryAs<'q, sqlx::Postgres, (String, i64), sqlx::postgres::PgArguments>;

/// Binds [`WRITE_SQL`]'s thirty-nine parameters.
fn bind_writes<'q>(query: WriteQuery<'q>, b: &Batch) -> WriteQuery<'q> {
    fn time(t: &chrono::DateTime<chrono::Utc>) -> NaiveDateTime {
        utc(t)
    }
    let ms = &b.messages;
    let reactions = |rows: &[change_batch::ReactionWrite]| {
        (
            rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
            rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            rows.iter().map(|r| r.2.clone()).collect::<Vec<_>>(),
            rows.iter().map(|r| r.3.clone()).collect::<Vec<_>>(),
            rows.iter().map(|r| time(&r.4)).collect::<Vec<_>>(),
        )
    };
    let assumed = |there: bool| {
        let rows = b.assumed.iter().filter(|a| a.4 == there);
        (
            rows.clone().map(|a| a.0.clone()).collect::<Vec<_>>(),
            rows.clone().map(|a| a.1).collect::<Vec<_>>(),
            rows.clone().map(|a| a.2.clone()).collect::<Vec<_>>(),
            rows.map(|a| a.3.clone()).collect::<Vec<_>>(),
        )
    };
    let (absent, present) = (assumed(false), assumed(true));
    let present_n = present.0.len() as i64;
    let (ra, rb, rc, rd, re) = reactions(&b.reacted);
    let (ua, ub, uc, ud, _) = reactions(&b.unreacted);
    query
        .bind(ms.iter().map(|m| m.room.clone()).collect::<Vec<_>>())
        .bind(ms.iter().map(|m| m.seq).collect::<Vec<_>>())
        .bind(ms.iter().map(|m| m.expected).collect::<Vec<_>>())
        .bind(
            ms.iter()
                .map(|m| m.message.content.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            ms.iter()
                .map(|m| m.message.edited_at.as_ref().map(time))
                .collect::<Vec<_>>(),
        )
        .bind(
            ms.iter()
                .map(|m| m.message.deleted_at.as_ref().map(time))
                .collect::<Vec<_>>(),
        )
        .bind(
            ms.iter()
                .map(|m| m.message.reactions.clone())
                .collect::<Vec<_>>(),
        )
        .bind(ms.iter().map(|m| m.index).collect::<Vec<_>>())
        .bind(ms.len() as i64)
        .bind(b.rooms.iter().map(|r| r.0.clone()).collect::<Vec<_>>())
        .bind(b.rooms.iter().map(|r| r.1).collect::<Vec<_>>())
        .bind(b.changes.iter().map(|c| c.room.clone()).collect::<Vec<_>>())
        .bind(b.changes.iter().map(|c| c.index).collect::<Vec<_>>())
        .bind(b.changes.iter().map(|c| c.message_seq).collect::<Vec<_>>())
        .bind(b.changes.iter().map(|c| c.kind).collect::<Vec<_>>())
        .bind(
            b.changes
                .iter()
                .map(|c| c.actor.clone())
                .collect::<Vec<_>>(),
        )
        .bind(b.changes.iter().map(|c| c.key.clone()).collect::<Vec<_>>())
        .bind(b.changes.iter().map(|c| c.what.clone()).collect::<Vec<_>>())
        .bind(b.changes.iter().map(|c| time(&c.at)).collect::<Vec<_>>())
        .bind(ra)
        .bind(rb)
        .bind(rc)
        .bind(rd)
        .bind(re)
        .bind(ua)
        .bind(ub)
        .bind(uc)
        .bind(ud)
        .bind(b.cleared.iter().map(|c| c.0.clone()).collect::<Vec<_>>())
        .bind(b.cleared.iter().map(|c| c.1).collect::<Vec<_>>())
        .bind(absent.0)
        .bind(absent.1)
        .bind(absent.2)
        .bind(absent.3)
        .bind(present.0)
        .bind(present.1)
        .bind(present.2)
        .bind(present.3)
        .bind(present_n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(room: &str, seq: i64, content: &str) -> Message {
        Message {
            room_id: room.into(),
            seq,
            content: content.into(),
            ..crate::store::changes::tests::message()
        }
    }

    #[test]
    fn a_remembered_message_is_found_by_room_and_seq_until_forgotten() {
        let known = Known::new();
        known.remember(&message("r1", 1, "one"));
        known.remember(&message("r1", 2, "two"));
        known.remember(&message("r2", 1, "other room"));
        assert_eq!(known.get("r1", 2).unwrap().content, "two");
        assert_eq!(known.get("r2", 1).unwrap().content, "other room");
        assert!(known.get("r1", 3).is_none());
        assert!(known.get("r3", 1).is_none());
        // A newer state replaces the one remembered.
        let mut edited = message("r1", 2, "two, edited");
        edited.version = Some(3);
        known.remember(&edited);
        assert_eq!(known.get("r1", 2).unwrap().version, Some(3));
        known.forget("r1", 2);
        assert!(known.get("r1", 2).is_none());
        assert_eq!(known.get("r1", 1).unwrap().content, "one");
    }

    #[test]
    fn what_is_remembered_stays_within_its_bytes() {
        let known = Known::new();
        let content = "x".repeat(64 * 1024);
        // 40 MiB of messages into 8 MiB: the oldest go, and the newest are there.
        for seq in 1..=640 {
            known.remember(&message("r1", seq, &content));
        }
        let key = ("r1".to_string(), 0);
        let weight: u64 = (1..=640)
            .filter_map(|seq| known.get("r1", seq))
            .map(|m| quick_cache::Weighter::weight(&ByContent, &key, &m))
            .sum();
        assert!(weight <= KNOWN_BYTES, "{weight} bytes remembered");
        assert!(known.get("r1", 640).is_some());
        assert!(known.get("r1", 1).is_none());
    }
}
