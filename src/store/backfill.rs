//! `chat-gateway backfill`: completes, on a live Postgres database, the rows the app wrote before
//! the gateway. Two passes, each in small batches with a pause between them:
//!
//! 1. senders: copies `"User".name` / `"User".image` into `"senderName"` / `"senderAvatarUrl"`
//!    where those are NULL (values the gateway wrote are kept);
//! 2. sequences: numbers the rows with a NULL `seq`, room by room, in (`"createdAt"`, `id`) order.
//!
//! Legacy rows are numbered through the same counter as live sends, `"ChatRoom"."lastSeq"`, under
//! the same row lock: a batch locks the room row, gives its rows `lastSeq + 1 ..`, raises
//! `lastSeq`, and commits. A live send to that room waits for the batch (and vice versa), so the
//! room's sequence stays gap-free and unique whatever runs at the same time. The price: legacy rows
//! numbered after live messages of the same room come after them in the sequence. Run the backfill
//! before cutting traffic over (docs/migration-runbook.md) and they come first.
//!
//! Every batch is its own transaction, so the backfill can be stopped at any moment (Ctrl-C, or a
//! kill) and rerun: what is done stays done, and a rerun finds only what is left. It is
//! idempotent: a rerun on a finished database changes nothing.

use std::fmt;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::StoreError;

#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// Rows per batch (one transaction each).
    pub batch: u32,
    /// Sleep between batches, leaving the database to live traffic.
    pub pause: Duration,
    /// Count what would change, change nothing.
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Senders,
    Sequences,
}

impl fmt::Display for Pass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pass::Senders => "sender names",
            Pass::Sequences => "sequence numbers",
        })
    }
}

/// Where a pass stands, reported after each batch.
#[derive(Debug, Clone)]
pub struct Progress {
    pub pass: Pass,
    pub done: u64,
    pub total: u64,
    pub elapsed: Duration,
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(0.001);
        let rate = self.done as f64 / secs;
        let percent = if self.total == 0 {
            100.0
        } else {
            self.done as f64 * 100.0 / self.total as f64
        };
        write!(
            f,
            "{}: {}/{} ({percent:.1}%), {rate:.0} rows/s",
            self.pass, self.done, self.total
        )?;
        // Rows written meanwhile by live traffic can push `done` past the first count.
        let left = self.total.saturating_sub(self.done);
        if rate > 0.0 {
            write!(f, ", about {:.0} s left", left as f64 / rate)?;
        }
        Ok(())
    }
}

/// What is left to do (what `--dry-run` reports).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Messages whose sender name or avatar can be filled from "User".
    pub senders: u64,
    /// Messages without a sequence number.
    pub unsequenced: u64,
    /// Rooms holding such messages.
    pub rooms: u64,
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub plan: Plan,
    pub senders_filled: u64,
    pub sequenced: u64,
    /// False when stopped before the end (rerun to finish).
    pub finished: bool,
}

const PLAN_SQL: &str = r#"
SELECT
    (SELECT count(*) FROM "ChatMessage" m JOIN "User" u ON u.id = m."senderId"
     WHERE (m."senderName" IS NULL AND u.name IS NOT NULL)
        OR (m."senderAvatarUrl" IS NULL AND u.image IS NOT NULL)),
    (SELECT count(*) FROM "ChatMessage" WHERE seq IS NULL),
    (SELECT count(DISTINCT "roomId") FROM "ChatMessage" WHERE seq IS NULL)"#;

/// One batch of pass 1, in primary-key order after `$1` (a keyset, so each row is visited once
/// per run even when its user has nothing to give). Returns the rows changed and the last id seen.
const FILL_SENDERS_SQL: &str = r#"
WITH batch AS (
    SELECT m.id FROM "ChatMessage" m JOIN "User" u ON u.id = m."senderId"
    WHERE m.id > $1
      AND ((m."senderName" IS NULL AND u.name IS NOT NULL)
        OR (m."senderAvatarUrl" IS NULL AND u.image IS NOT NULL))
    ORDER BY m.id
    LIMIT $2
),
filled AS (
    UPDATE "ChatMessage" m
    SET "senderName" = COALESCE(m."senderName", u.name),
        "senderAvatarUrl" = COALESCE(m."senderAvatarUrl", u.image)
    FROM batch, "User" u
    WHERE m.id = batch.id AND u.id = m."senderId"
    RETURNING 1
)
SELECT (SELECT count(*) FROM filled), (SELECT max(id) FROM batch)"#;

/// The next room (after `$1`) holding unnumbered rows, from the partial index of such rows.
const NEXT_ROOM_SQL: &str = r#"
SELECT "roomId" FROM "ChatMessage"
WHERE seq IS NULL AND "roomId" > $1
ORDER BY "roomId"
LIMIT 1"#;

/// Numbers up to `$3` of room `$1`'s oldest unnumbered rows `$2 + 1 ..`. Runs after the room row
/// was locked in the same transaction, so its snapshot sees every earlier allocation.
const NUMBER_ROWS_SQL: &str = r#"
WITH batch AS (
    SELECT id, row_number() OVER (ORDER BY "createdAt", id) AS n
    FROM "ChatMessage"
    WHERE "roomId" = $1 AND seq IS NULL
    ORDER BY "createdAt", id
    LIMIT $3
)
UPDATE "ChatMessage" m SET seq = $2 + batch.n
FROM batch
WHERE m.id = batch.id"#;

/// Counts what is left to do.
pub async fn plan(pool: &PgPool) -> Result<Plan, StoreError> {
    let (senders, unsequenced, rooms): (i64, i64, i64) =
        sqlx::query_as(PLAN_SQL).fetch_one(pool).await?;
    Ok(Plan {
        senders: senders as u64,
        unsequenced: unsequenced as u64,
        rooms: rooms as u64,
    })
}

/// Runs both passes (or only counts, with `dry_run`) until done or `stop` is cancelled; `progress`
/// hears about every batch.
pub async fn run(
    pool: &PgPool,
    options: &BackfillOptions,
    stop: &CancellationToken,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Outcome, StoreError> {
    let mut outcome = Outcome {
        plan: plan(pool).await?,
        ..Outcome::default()
    };
    if options.dry_run {
        outcome.finished = outcome.plan == Plan::default();
        return Ok(outcome);
    }
    let batch = i64::from(options.batch.max(1));

    let started = Instant::now();
    let mut after = String::new();
    loop {
        if stop.is_cancelled() {
            return Ok(outcome);
        }
        let (filled, last): (i64, Option<String>) = sqlx::query_as(FILL_SENDERS_SQL)
            .bind(&after)
            .bind(batch)
            .fetch_one(pool)
            .await?;
        let Some(last) = last else { break };
        after = last;
        outcome.senders_filled += filled as u64;
        progress(&Progress {
            pass: Pass::Senders,
            done: outcome.senders_filled,
            total: outcome.plan.senders,
            elapsed: started.elapsed(),
        });
        if pause(options.pause, stop).await {
            return Ok(outcome);
        }
    }

    let started = Instant::now();
    let mut room = String::new();
    loop {
        let next: Option<String> = sqlx::query_scalar(NEXT_ROOM_SQL)
            .bind(&room)
            .fetch_optional(pool)
            .await?;
        let Some(next) = next else { break };
        room = next;
        loop {
            if stop.is_cancelled() {
                return Ok(outcome);
            }
            let numbered = number_batch(pool, &room, batch).await?;
            outcome.sequenced += numbered;
            progress(&Progress {
                pass: Pass::Sequences,
                done: outcome.sequenced,
                total: outcome.plan.unsequenced,
                elapsed: started.elapsed(),
            });
            if pause(options.pause, stop).await {
                return Ok(outcome);
            }
            if numbered < batch as u64 {
                break;
            }
        }
    }
    outcome.finished = true;
    Ok(outcome)
}

/// One batch of pass 2: lock the room row (live sends to the room wait), number, raise "lastSeq".
async fn number_batch(pool: &PgPool, room: &str, batch: i64) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    let last_seq: Option<i64> =
        sqlx::query_scalar(r#"SELECT "lastSeq" FROM "ChatRoom" WHERE id = $1 FOR UPDATE"#)
            .bind(room)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(last_seq) = last_seq else {
        tracing::warn!(
            room,
            "messages of a room that does not exist stay unnumbered"
        );
        return Ok(0);
    };
    let numbered = sqlx::query(NUMBER_ROWS_SQL)
        .bind(room)
        .bind(last_seq)
        .bind(batch)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query(r#"UPDATE "ChatRoom" SET "lastSeq" = "lastSeq" + $2 WHERE id = $1"#)
        .bind(room)
        .bind(numbered as i64)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(numbered)
}

/// Sleeps between batches; true when `stop` came meanwhile.
async fn pause(pause: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(pause) => stop.is_cancelled(),
        _ = stop.cancelled() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_done_total_rate_and_time_left() {
        let p = Progress {
            pass: Pass::Sequences,
            done: 3000,
            total: 12000,
            elapsed: Duration::from_secs(3),
        };
        assert_eq!(
            p.to_string(),
            "sequence numbers: 3000/12000 (25.0%), 1000 rows/s, about 9 s left"
        );
    }
}
