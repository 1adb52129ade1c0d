//! The embedded store: one SQLite file in WAL mode.
//!
//! Write transactions start with `BEGIN IMMEDIATE`, taking the write lock up front, so several
//! processes may share the file (the busy timeout queues them) without a reader upgrading to a
//! writer on a stale snapshot.
//! SQLite has one writer at a time, so the store keeps exactly one writer connection and a small
//! pool of reader connections, which WAL lets run beside the writer.
//! `synchronous = NORMAL`: a commit survives a crash of the gateway; a power loss may lose the last
//! few commits (the embedded default is for one machine; production runs on Postgres).
//!
//! # Checkpoints off the commit path
//!
//! With `synchronous = NORMAL` a commit does not wait for the disk; a checkpoint (copying the WAL
//! into the database file) waits for two `fsync`s. SQLite's automatic checkpoint runs inside the
//! commit that crosses 1,000 WAL pages, so every few hundred milliseconds under load one group
//! commit, and every send queued behind it, waited 10-20 ms for the disk (more on a busy one).
//! The writer connection therefore does not checkpoint (`wal_autocheckpoint = 0`); a connection of
//! its own runs a `PASSIVE` checkpoint every `database.checkpoint_interval_ms`, beside the writer,
//! which keeps appending to the WAL meanwhile. When the store closes, the last connection to close folds the
//! WAL into the database file as SQLite always does.
//!
//! # Temporary files
//!
//! A statement that changes many rows inside a transaction keeps a statement journal (the pages'
//! contents before it, to undo it alone), and SQLite spills that journal past 64 KiB to a
//! temporary file: group commits of a dozen sends or more did, and at 5,000 msgs/s that file
//! took 3.9 of the 10.7 `pwrite` calls per stored message (the WAL the rest).
//! `temp_store = MEMORY` keeps statement journals (and sorts) in memory, bounded by the batch:
//! the WAL is the only file a commit writes.
//!
//! # The WAL's size
//!
//! A checkpoint copies the WAL into the database file; the WAL starts again from its beginning
//! only when a commit finds every frame of it copied and no reader in it. Under steady sends a
//! commit always lands while the background checkpoint runs, so that never happened: the WAL file
//! grew without end (60 MB/s at 5,000 msgs/s). Past `database.wal_limit_mb` the checkpointer syncs
//! the database file (the pages checkpoints copied since the last sync, which would otherwise go
//! to the disk inside the writer's checkpoint), checkpoints once more, and raises a flag; the
//! group writer, between two batches, runs a checkpoint itself, copying the few frames committed
//! since (about 5 ms during which no commit starts, as it is the only writer). The next commit then
//! writes the WAL from its beginning, and `journal_size_limit` cuts the file back to the limit.
//! A reader holding an old snapshot holds checkpoints back, and the restart with them: the flag is
//! raised only when at most `RESTART_MOST_PENDING` frames are left for the writer to copy.
//!
//! # Sends: group commit
//!
//! Sends do not take the writer connection themselves. They queue to one `GroupWriter` task
//! (`database.write_queue` deep; a full queue makes senders wait, it is not an error), which takes
//! everything waiting, up to `database.write_batch`, and writes it in one transaction of at most six
//! statements whatever the batch size: `BEGIN IMMEDIATE`; one `SELECT` of the originals of the
//! batch's `(roomId, senderId, clientMsgId)` keys that are stored already; one
//! `UPDATE "ChatRoom" ... RETURNING` moving each room's `lastSeq` by its number of new messages
//! (and its `lastMessageAt`); one multi-row `INSERT` of the messages; one of their outbox rows
//! (only with side effects configured, `SqliteOptions::outbox`); `COMMIT`. They take two calls
//! to the connection's thread, `BEGIN` with the read and the writes with the `COMMIT`
//! (`READ_ORIGINALS`, `WRITE_SENDS`): each call is a hand-over between threads and back.
//!
//! A send that finds the writer free is written at once. Under load (the previous batch took more
//! than one request, see `group::Pacer`), a batch starts no sooner than
//! `database.write_interval_ms` after the previous one started and takes everything that arrived
//! meanwhile: transactions per second stay bounded and batches grow with the load, so statements
//! per message fall as traffic rises (Postgres's `commit_delay` with `commit_siblings`, in spirit).
//!
//! - Order: a room's messages get their sequence numbers in the order their sends reached the
//!   writer; being the only writer is what keeps the sequence gap-free.
//! - Idempotency: a key already stored answers with the original (`duplicate = true`); the same
//!   key twice in one batch is stored once, and the later sends get that message as duplicates.
//! - A send to a room that does not exist gets `RoomNotFound`; the rest of its batch is written.
//! - Any other failure rolls the whole batch back: nothing of it is stored and no sequence number
//!   is spent. A retriable one (`Unavailable`: another process held the write lock past
//!   `database.busy_timeout_ms`, or the connection is gone) answers every send of the batch with
//!   it. Any other error
//!   may be one message's doing, so the writer then writes the batch's sends one by one, and only
//!   the message the database refuses fails.
//! - A caller that goes away (its future dropped) before its batch is taken is skipped: nobody can
//!   be told, and a retry with the same `clientMsgId` stores the message once. One that goes away
//!   later does not disturb the batch. (The chat service's sends never go away: a send runs in a
//!   task of its own from the store to the publish, whoever waits for it.)
//!
//! The rows of a batch travel as one JSON array bound to one parameter and unpacked by
//! `json_each`: each statement has one fixed text (prepared once, cached by the connection), and
//! no batch comes near SQLite's bound-parameter limit.
//!
//! # Changes: group commit
//!
//! Changes of messages (edits, deletions, reactions, moderation) queue to the same group writer
//! (a queue of their own, as deep), which takes them with the sends of the same turn and writes
//! them, after the sends, in one transaction of their own (see `super::change_batch`) in two
//! calls to the writer connection whatever their number: `BEGIN IMMEDIATE` with one read of every
//! change's message (`READ_CHANGES`), then the writes and `COMMIT` as one multi-statement call
//! (`WRITE_CHANGES`). A batch that fails for any reason but `Unavailable` is rolled back and
//! written again one change at a time, so only the change the database refuses fails.
//!
//! The other writes (rooms, memberships, read marks, outbox claims, leases and deletes) share the
//! writer connection with the group writer, one statement each whatever the number of rows.
//!
//! # The writer's thread
//!
//! The group writer, and every other use of the writer connection, runs on a thread of its own
//! (a single-threaded runtime, `sqlite-group-writer`), never on the node's main runtime. Each
//! statement is a round trip to the connection's thread, and a pooled connection is held until
//! the task that holds it runs again: on a main runtime busy with a reconnect storm, each of those
//! steps waited behind thousands of woken tasks, and one outbox claim holding the only writer
//! connection that way held every send behind it (40-120 ms in the storm benchmark). On its own
//! thread each step follows at once.
//! `chat_store_write_statements_total`, `chat_store_send_batch_size` and
//! `chat_store_sends_waiting` in `/metrics` show the writer's work.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use prometheus_client::metrics::gauge::Gauge;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::change_batch::{self, FoundRow};
use super::changes::{ChangeOp, Written};
use super::group::{self, Batch, Queued};
use super::{
    Access, CHANGE_COLUMNS, Change, ChangeRequest, ChangeRow, Changed, Event, Inserted, Message,
    NewMessage, OutboxEntry, ReadMark, Refusal, Room, RoomSummary, SqliteMetrics, Store,
    StoreError, StoreMetrics, Target, merge_events, quote_replies,
};

/// The embedded migrations (migrations/sqlite), applied by `migrate` and at start-up.
pub static MIGRATOR: super::migrations::Lazy = super::migrations::Lazy::new(|| {
    super::migrations::embed!("sqlite":
        "20261127000001_chat_schema.sql",
        "20261127000002_outbox.sql",
        "20261127000003_read_state.sql",
        "20261206000004_no_time_index.sql",
        "20261206000005_message_changes.sql",
        "20261206000006_change_key_partial.sql",
        "20261206000007_client_key_first.sql",
    )
    .migrator()
});

macro_rules! columns {
    () => {
        r#"id, "roomId", seq, "senderId", "senderName", "senderAvatarUrl", content, "contentType", status, "moderationStatus", "createdAt", "clientMsgId", "editedAt", "deletedAt", version, "replyToSeq", reactions"#
    };
}

const FIND_BY_CLIENT_MSG_ID: &str = concat!(
    "SELECT ",
    columns!(),
    r#" FROM "ChatMessage" WHERE "roomId" = ? AND "senderId" = ? AND "clientMsgId" = ?"#
);

/// How the store uses the file (`database.*`: `max_connections`, `busy_timeout_ms`, `write_*`).
#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    /// Reader connections.
    pub readers: u32,
    /// How long a write waits for another process's write lock before failing (`Unavailable`).
    pub busy_timeout: Duration,
    /// Most sends written in one transaction.
    pub write_batch: usize,
    /// Most sends waiting for the writer; past it, senders wait for room.
    pub write_queue: usize,
    /// Shortest time between the starts of two transactions. A send that arrives after a quiet
    /// spell is written at once; under load this bounds the commits per second, so the batches
    /// grow with the load (and statements per message fall) instead of commits multiplying.
    pub write_interval: Duration,
    /// How often the background checkpointer copies the WAL into the database file.
    pub checkpoint_interval: Duration,
    /// Past this size the WAL is made to restart from its beginning, and a restarted WAL file is
    /// cut back to it (see "The WAL's size" in the module docs).
    pub wal_limit_bytes: u64,
    /// Sends write outbox rows for the side-effect worker (a webhook is configured).
    pub outbox: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            readers: 8,
            busy_timeout: Duration::from_secs(5),
            write_batch: 256,
            write_queue: 4096,
            write_interval: Duration::from_millis(2),
            checkpoint_interval: Duration::from_millis(250),
            wal_limit_bytes: 64 << 20,
            outbox: false,
        }
    }
}

pub struct SqliteStore {
    /// The only connection that writes. Held for one transaction (or statement) at a time: a
    /// group commit of sends, or one of the other writes.
    writer: SqlitePool,
    readers: SqlitePool,
    /// Sends waiting for the group writer. Bounded (`database.write_queue`); when it is full a
    /// send waits for room, it never fails for it.
    sends: mpsc::Sender<PendingSend>,
    /// Changes waiting for the group writer (as bounded).
    changes: mpsc::Sender<PendingChange>,
    /// Cancelled by `close`: the group writer writes what is queued, then ends.
    stop: CancellationToken,
    /// The group writer and the checkpointer, ended by `stop` and awaited by `close`. Locked only
    /// to take them.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// The background checkpointer's connection.
    checkpointer: SqlitePool,
    /// The runtime of the group writer's thread, where every use of `writer` runs.
    writer_thread: tokio::runtime::Handle,
    stats: SqliteMetrics,
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

impl SqliteStore {
    /// Opens (creating if missing) the database file with `readers` reader connections and the
    /// other options at their defaults; does not migrate.
    pub async fn open(path: &Path, readers: u32) -> Result<Self, StoreError> {
        let options = SqliteOptions {
            readers,
            ..SqliteOptions::default()
        };
        Self::open_with(path, &options).await
    }

    /// Opens (creating if missing) the database file and starts the group writer; does not
    /// migrate.
    pub async fn open_with(path: &Path, options: &SqliteOptions) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Unavailable(format!("{}: {e}", dir.display())))?;
        }
        let connect = SqliteConnectOptions::from_str("sqlite://")
            .map_err(StoreError::from)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            // Checkpoints run on a connection of their own (see the module's documentation).
            .pragma("wal_autocheckpoint", "0")
            // Statement journals and sorts in memory (see "Temporary files" above).
            .pragma("temp_store", "MEMORY")
            // A WAL file is cut back to the limit when it restarts ("The WAL's size" above).
            .pragma("journal_size_limit", options.wal_limit_bytes.to_string())
            .foreign_keys(true)
            .busy_timeout(options.busy_timeout);
        // An in-process connection does not go stale: no ping (a round trip to the connection's
        // thread) before every use.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .test_before_acquire(false)
            .connect_with(connect.clone())
            .await?;
        // Every reader is opened here, by the caller's thread, and kept: a connection opened
        // later by a task on the churn lane would get its thread from the lane's, and with it the
        // lane's priority (`server.churn_nice`; see `crate::admission::ChurnLane`).
        let readers = SqlitePoolOptions::new()
            .max_connections(options.readers.max(1))
            .min_connections(options.readers.max(1))
            .idle_timeout(None)
            .max_lifetime(None)
            .test_before_acquire(false)
            .connect_with(connect.clone().read_only(true))
            .await?;
        let checkpointer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .test_before_acquire(false)
            .connect_with(connect.clone())
            .await?;
        let (sends, queued) = mpsc::channel(options.write_queue.max(1));
        let (changes, changes_queued) = mpsc::channel(options.write_queue.max(1));
        let stop = CancellationToken::new();
        let stats = SqliteMetrics::default();
        let wal_full = Arc::new(AtomicBool::new(false));
        let checkpoint_task = tokio::spawn(run_checkpoints(
            checkpointer.clone(),
            options.checkpoint_interval,
            options.wal_limit_bytes,
            wal_full.clone(),
            path.to_path_buf(),
            stats.clone(),
            stop.clone(),
        ));
        // On a thread of its own, with every other use of the writer connection (see the module
        // docs).
        let (task, writer_thread) = crate::dedicated::spawn(
            "sqlite-group-writer",
            GroupWriter {
                pool: writer.clone(),
                batch: options.write_batch.max(1),
                interval: options.write_interval,
                outbox: options.outbox,
                wal_full,
                stats: stats.clone(),
            }
            .run(queued, changes_queued, stop.clone()),
        )
        .map_err(|e| StoreError::Unavailable(format!("starting the group writer: {e}")))?;
        Ok(Self {
            writer,
            readers,
            sends,
            changes,
            stop,
            tasks: Mutex::new(vec![task, checkpoint_task]),
            writer_thread,
            checkpointer,
            stats,
        })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR
            .run(&self.writer)
            .await
            .map_err(|e| StoreError::Other(format!("migration failed: {e}")))
    }

    /// Writes the sends already queued, then closes the connections. Later sends get
    /// `Unavailable`.
    pub async fn close(&self) {
        self.stop.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        for task in tasks {
            let _ = task.await;
        }
        self.checkpointer.close().await;
        self.readers.close().await;
        // The last connection to close checkpoints the whole WAL and removes it.
        self.writer.close().await;
    }

    /// Counts `n` statements run on the writer connection.
    fn wrote(&self, n: u64) {
        self.stats.write_statements.inc_by(n);
    }

    /// Runs `work` with the writer connection on the writer's thread (see the module docs:
    /// the connection is held until the task that holds it runs again, and on the writer's
    /// thread that is at once, whatever the rest of the node is doing).
    async fn on_writer<T, F>(&self, work: impl FnOnce(SqlitePool) -> F) -> Result<T, sqlx::Error>
    where
        F: Future<Output = Result<T, sqlx::Error>> + Send + 'static,
        T: Send + 'static,
    {
        match self.writer_thread.spawn(work(self.writer.clone())).await {
            Ok(done) => done,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(sqlx::Error::PoolClosed),
        }
    }
}

/// Most WAL frames left to the writer's own checkpoint when the WAL is to restart (about 4 MiB,
/// 10 ms of copying at most while no commit starts); usually it is the few hundred committed
/// during the checkpointer's last pass.
const RESTART_MOST_PENDING: i64 = 1024;

/// A `PASSIVE` checkpoint on `conn`: (busy, WAL frames, frames checkpointed); -1s when the
/// database is not in WAL mode.
async fn passive_checkpoint<'c, E>(conn: E) -> Result<(i64, i64, i64), sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(conn)
        .await
}

/// Runs a `PASSIVE` checkpoint every `database.checkpoint_interval_ms` until `stop`: it copies
/// what the WAL holds into the database file without blocking the writer (or waiting for readers).
/// When the WAL has grown past its limit (bytes), it raises `wal_full` for the group writer, which
/// lets the WAL restart (see "The WAL's size" in the module docs).
async fn run_checkpoints(
    pool: SqlitePool,
    every: Duration,
    wal_limit: u64,
    wal_full: Arc<AtomicBool>,
    db_path: std::path::PathBuf,
    stats: SqliteMetrics,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut page_size = None;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.cancelled() => return,
        }
        if page_size.is_none() {
            page_size = sqlx::query_scalar::<_, i64>("PRAGMA page_size")
                .fetch_one(&pool)
                .await
                .ok();
        }
        let done = passive_checkpoint(&pool).await;
        match done {
            Ok((_, frames, copied)) => {
                stats.checkpoints.inc();
                stats.wal_frames_pending.set((frames - copied).max(0));
                let bytes = frames.max(0) as u64 * page_size.unwrap_or(4096).max(0) as u64;
                stats.wal_bytes.set(bytes as i64);
                if bytes > wal_limit {
                    // The pages checkpoints copied since the database file was last synced go to
                    // the disk here, not in the sync that ends the writer's checkpoint.
                    let file = db_path.clone();
                    let synced =
                        tokio::task::spawn_blocking(move || std::fs::File::open(file)?.sync_data())
                            .await;
                    if let Ok(Err(e)) = synced {
                        tracing::warn!(error = %e, "syncing the SQLite database file failed");
                    }
                    // Once more, to copy what was committed meanwhile: the writer's copy, which
                    // holds up commits, is then only of what comes after this. Not while a reader
                    // holds many frames back: the writer would have to copy them all.
                    if let Ok((_, frames, copied)) = passive_checkpoint(&pool).await
                        && frames - copied <= RESTART_MOST_PENDING
                    {
                        wal_full.store(true, Ordering::Relaxed);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "SQLite checkpoint failed; retrying"),
        }
    }
}

/// A send waiting for the group writer, and where its outcome goes.
type PendingSend = Queued<NewMessage, Inserted>;

/// A change waiting for the group writer, and where its outcome goes.
type PendingChange = Queued<ChangeRequest, Written>;

/// Counts a send in `sends_waiting` from the moment it asks for a place in the queue; a caller that
/// gives up before getting one takes itself out again.
struct Waiting<'a>(Option<&'a Gauge>);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(Some(gauge))
    }

    /// The send is in the queue; the writer decrements when it takes it.
    fn handed_over(mut self) {
        self.0 = None;
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(gauge) = self.0 {
            gauge.dec();
        }
    }
}

/// The task that writes every send: batches in one transaction each (see the module docs).
struct GroupWriter {
    pool: SqlitePool,
    /// Most sends per transaction.
    batch: usize,
    /// Shortest time between the starts of two batches (`database.write_interval_ms`).
    interval: Duration,
    /// Write each new message's outbox row too.
    outbox: bool,
    /// Raised by the checkpointer when the WAL has passed its limit: the writer copies the last
    /// frames itself between two batches, so that the next commit restarts the WAL.
    wal_full: Arc<AtomicBool>,
    stats: SqliteMetrics,
}

/// What a send of a batch turned out to be, before the batch's sequence numbers are known.
enum Plan {
    /// Its key is stored already: answered with the original.
    Stored(Box<Message>),
    /// Its key came earlier in this batch: answered as that send is, as a duplicate.
    SameAs(usize),
    /// A new message, `index`-th of its room in this batch.
    New { index: i64 },
}

/// One row of the messages bound as JSON: id, roomId, the seq's offset from the room's new head
/// (`index - n`, at most 0), senderId, senderName, senderAvatarUrl, content, createdAt,
/// clientMsgId, replyToSeq.
type Row<'a> = (
    &'a str,
    &'a str,
    i64,
    &'a str,
    Option<&'a str>,
    Option<&'a str>,
    &'a str,
    String,
    Option<&'a str>,
    Option<i64>,
);

impl GroupWriter {
    /// Runs until the queue closes or `stop`; then writes what is still queued and returns.
    async fn run(
        self,
        mut queued: mpsc::Receiver<PendingSend>,
        mut changes: mpsc::Receiver<PendingChange>,
        stop: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(self.batch);
        let mut changed = Vec::new();
        let mut pacer = group::Pacer::default();
        loop {
            let n = tokio::select! {
                n = queued.recv_many(&mut batch, self.batch) => n,
                n = changes.recv_many(&mut changed, self.batch) => n,
                _ = stop.cancelled() => {
                    queued.close();
                    changes.close();
                    while queued.recv_many(&mut batch, self.batch).await > 0 {
                        self.stats.sends_waiting.dec_by(batch.len() as i64);
                        self.commit(&mut batch).await;
                    }
                    while changes.recv_many(&mut changed, self.batch).await > 0 {
                        self.commit_changes(&mut changed).await;
                    }
                    return;
                }
            };
            if n == 0 {
                return;
            }
            // Paced under load (see `group::Pacer`), sends and changes alike.
            pacer.wait(self.interval).await;
            group::top_up(&mut queued, &mut batch, self.batch);
            group::top_up(&mut changes, &mut changed, self.batch);
            pacer.started(batch.len() + changed.len());
            if !batch.is_empty() {
                self.stats.sends_waiting.dec_by(batch.len() as i64);
                self.commit(&mut batch).await;
            }
            if !changed.is_empty() {
                self.commit_changes(&mut changed).await;
            }
            if self.wal_full.swap(false, Ordering::Relaxed) {
                self.let_wal_restart().await;
            }
        }
    }

    /// Copies into the database file what the WAL holds beyond the last background checkpoint,
    /// while no commit can add to it (this is the only writer): with every frame copied and no
    /// reader in the WAL, the next commit writes the WAL from its beginning.
    async fn let_wal_restart(&self) {
        let done = match self.pool.acquire().await {
            Ok(mut conn) => passive_checkpoint(&mut *conn).await,
            Err(e) => Err(e),
        };
        match done {
            Ok((0, frames, copied)) if frames == copied => {
                self.stats.wal_restarts.inc();
                self.stats.wal_frames_pending.set(0);
            }
            // A reader still in the WAL: the checkpointer asks again after its next checkpoint.
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "SQLite checkpoint by the writer failed"),
        }
    }

    /// Writes `batch` (emptying it) and answers every caller still waiting.
    async fn commit(&self, queued: &mut Vec<PendingSend>) {
        let Some(batch) = Batch::take(queued, &self.stats.send_batch_size) else {
            return;
        };
        let written = self.write(&batch.requests()).await;
        for send in batch.answer(written, "send") {
            let outcome = match self.write(&[&send.req]).await {
                Ok(mut outcomes) => outcomes.pop().expect("one outcome per send"),
                Err(e) => Err(e),
            };
            let _ = send.reply.send(outcome);
        }
    }

    /// Writes `msgs` in one transaction. The outer error fails (and rolls back) all of them; the
    /// inner ones are per send (`RoomNotFound`). One outcome per send, in order.
    async fn write(
        &self,
        msgs: &[&NewMessage],
    ) -> Result<Vec<Result<Inserted, StoreError>>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let written = self.write_on(&mut conn, msgs).await;
        rolled_back_if_failed(&mut conn, written).await
    }

    /// [`Self::write`] in two calls to the connection's thread: `BEGIN IMMEDIATE` with the read
    /// of the stored originals ([`READ_ORIGINALS`]), then the writes and `COMMIT`
    /// ([`WRITE_SENDS`]).
    async fn write_on(
        &self,
        conn: &mut sqlx::SqliteConnection,
        msgs: &[&NewMessage],
    ) -> Result<Vec<Result<Inserted, StoreError>>, StoreError> {
        let statements = &self.stats.write_statements;

        // The originals of keys stored before this batch.
        let mut keys: Vec<(&str, &str, &str)> = msgs
            .iter()
            .filter_map(|m| {
                let id = m.client_msg_id.as_deref()?;
                Some((m.room_id.as_str(), m.sender_id.as_str(), id))
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        statements.inc_by(2);
        let originals: Vec<Message> = sqlx::query_as(READ_ORIGINALS)
            .bind(json(&keys))
            .fetch_all(&mut *conn)
            .await?;
        let mut stored: HashMap<(String, String, String), Message> = HashMap::new();
        for m in originals {
            if let Some(id) = m.client_msg_id.clone() {
                stored.insert((m.room_id.clone(), m.sender_id.clone(), id), m);
            }
        }

        // What each send is, and how many new messages each room gets (and the newest time), in
        // arrival order.
        let mut first_of_key: HashMap<(&str, &str, &str), usize> = HashMap::new();
        let mut per_room: Vec<(&str, i64, String)> = Vec::new();
        let mut room_index: HashMap<&str, usize> = HashMap::new();
        let mut plans = Vec::with_capacity(msgs.len());
        for (i, m) in msgs.iter().enumerate() {
            if let Some(id) = m.client_msg_id.as_deref() {
                let key = (m.room_id.as_str(), m.sender_id.as_str(), id);
                let original = if stored.is_empty() {
                    None
                } else {
                    stored.get(&(key.0.into(), key.1.into(), key.2.into()))
                };
                if let Some(original) = original {
                    plans.push(Plan::Stored(Box::new(original.clone())));
                    continue;
                }
                match first_of_key.entry(key) {
                    Entry::Occupied(first) => {
                        plans.push(Plan::SameAs(*first.get()));
                        continue;
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(i);
                    }
                }
            }
            let r = *room_index.entry(m.room_id.as_str()).or_insert_with(|| {
                per_room.push((m.room_id.as_str(), 0, String::new()));
                per_room.len() - 1
            });
            per_room[r].1 += 1;
            per_room[r].2 = per_room[r].2.clone().max(ts(&m.created_at));
            plans.push(Plan::New {
                index: per_room[r].1,
            });
        }

        // A room that gets n new messages moves its head by n; its messages take head - n + 1
        // ..= head, each row carrying its offset from the new head (index - n).
        let new_in = |room: &str| room_index.get(room).map_or(0, |&r| per_room[r].1);
        let rows: Vec<Row> = msgs
            .iter()
            .zip(&plans)
            .filter_map(|(m, plan)| {
                let Plan::New { index } = plan else {
                    return None;
                };
                Some((
                    m.id.as_str(),
                    m.room_id.as_str(),
                    index - new_in(&m.room_id),
                    m.sender_id.as_str(),
                    m.sender_name.as_deref(),
                    m.sender_avatar_url.as_deref(),
                    m.content.as_str(),
                    ts(&m.created_at),
                    m.client_msg_id.as_deref(),
                    m.reply.as_ref().map(|q| q.seq),
                ))
            })
            .collect();
        let (sql, n) = if self.outbox {
            (WRITE_SENDS_WITH_OUTBOX, 4)
        } else {
            (WRITE_SENDS, 3)
        };
        statements.inc_by(n);
        let rows = json(&rows);
        let mut write = sqlx::query_as(sql).bind(json(&per_room)).bind(&rows);
        if self.outbox {
            write = write.bind(&rows);
        }
        let heads: Vec<(String, i64)> = write.fetch_all(&mut *conn).await?;
        let first_seq: HashMap<String, i64> = heads
            .into_iter()
            .map(|(room, head)| {
                let first = head - new_in(&room) + 1;
                (room, first)
            })
            .collect();
        let seq_of = |m: &NewMessage, index: i64| first_seq.get(&m.room_id).map(|s| s + index - 1);

        let mut outcomes: Vec<Result<Inserted, StoreError>> = Vec::with_capacity(msgs.len());
        for (m, plan) in msgs.iter().zip(plans) {
            let outcome = match plan {
                Plan::Stored(message) => Ok(Inserted {
                    message: *message,
                    duplicate: true,
                }),
                Plan::SameAs(first) => match &outcomes[first] {
                    Ok(Inserted { message, .. }) => Ok(Inserted {
                        message: message.clone(),
                        duplicate: true,
                    }),
                    Err(e) => Err(e.clone()),
                },
                Plan::New { index } => match seq_of(m, index) {
                    Some(seq) => Ok(Inserted {
                        message: m.stored(seq),
                        duplicate: false,
                    }),
                    None => Err(StoreError::RoomNotFound),
                },
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// Writes a batch of changes (emptying it) and answers every caller still waiting: one
    /// transaction for all of them; when it fails for any reason but `Unavailable`, one for each.
    async fn commit_changes(&self, queued: &mut Vec<PendingChange>) {
        let Some(batch) = Batch::take(queued, &self.stats.change_batch_size) else {
            return;
        };
        let answer = |a: Result<Written, Refusal>| a.map_err(StoreError::Refused);
        let written = self
            .write_changes(&batch.requests())
            .await
            .map(|answers| answers.into_iter().map(answer).collect());
        for change in batch.answer(written, "change") {
            let outcome = match self.write_changes(&[&change.req]).await {
                Ok(mut answers) => answer(answers.pop().expect("one answer per change")),
                Err(e) => Err(e),
            };
            let _ = change.reply.send(outcome);
        }
    }

    /// Reads, decides and writes `reqs` in one transaction, in two round trips to the writer
    /// connection's thread whatever their number (see [`super::change_batch`]): `BEGIN
    /// IMMEDIATE` and the read ([`READ_CHANGES`]); then [`WRITE_CHANGES`], its seven statements
    /// ending with `COMMIT`. Being the only writer, it needs no version check. One answer per
    /// request, in order.
    async fn write_changes(
        &self,
        reqs: &[&ChangeRequest],
    ) -> Result<Vec<Result<Written, Refusal>>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let written = self.write_changes_on(&mut conn, reqs).await;
        rolled_back_if_failed(&mut conn, written).await
    }

    async fn write_changes_on(
        &self,
        conn: &mut sqlx::SqliteConnection,
        reqs: &[&ChangeRequest],
    ) -> Result<Vec<Result<Written, Refusal>>, StoreError> {
        let statements = &self.stats.write_statements;
        let input: Vec<_> = reqs
            .iter()
            .map(|r| {
                let (seq, id) = match &r.target {
                    Target::Seq(seq) => (Some(*seq), None),
                    Target::Id(id) => (None, Some(id.as_str())),
                };
                let emoji = match &r.op {
                    ChangeOp::React { emoji, .. } | ChangeOp::Unreact { emoji } => {
                        Some(emoji.as_str())
                    }
                    _ => None,
                };
                (
                    r.room_id.as_str(),
                    seq,
                    id,
                    r.actor.as_str(),
                    r.client_change_id(),
                    emoji,
                )
            })
            .collect();
        statements.inc_by(2);
        let rows: Vec<FoundRow> = sqlx::query_as(READ_CHANGES)
            .bind(json(&input))
            .fetch_all(&mut *conn)
            .await?;
        let batch = change_batch::plan(reqs, change_batch::found(reqs.len(), rows));
        if batch.is_empty() {
            statements.inc();
            sqlx::query("ROLLBACK").execute(&mut *conn).await?;
            return Ok(batch.answers(&HashMap::new()));
        }
        // Each row carries its room's number of changes in the batch: the statements after the
        // first take the room's base as its new head minus that number.
        let n: HashMap<&str, i64> = batch.rooms.iter().map(|(r, n)| (r.as_str(), *n)).collect();
        let of = |room: &str| n.get(room).copied().unwrap_or(0);
        let messages: Vec<_> = batch
            .messages
            .iter()
            .map(|w| {
                let m = &w.message;
                (
                    &w.room,
                    w.seq,
                    &m.content,
                    m.edited_at.as_ref().map(ts),
                    m.deleted_at.as_ref().map(ts),
                    &m.reactions,
                    &m.moderation_status,
                    w.index - of(&w.room),
                )
            })
            .collect();
        let changes: Vec<_> = batch
            .changes
            .iter()
            .map(|c| {
                (
                    &c.room,
                    c.index - of(&c.room),
                    c.message_seq,
                    c.kind,
                    &c.actor,
                    &c.key,
                    &c.what,
                    ts(&c.at),
                )
            })
            .collect();
        let reactions = |rows: &[change_batch::ReactionWrite]| {
            json(
                &rows
                    .iter()
                    .map(|(room, seq, emoji, user, at)| (room, seq, emoji, user, ts(at)))
                    .collect::<Vec<_>>(),
            )
        };
        statements.inc_by(7);
        let heads: Vec<(String, i64)> = sqlx::query_as(WRITE_CHANGES)
            .bind(json(&batch.rooms))
            .bind(json(&messages))
            .bind(json(&changes))
            .bind(reactions(&batch.reacted))
            .bind(reactions(&batch.unreacted))
            .bind(json(&batch.cleared))
            .fetch_all(&mut *conn)
            .await?;
        let bases: HashMap<String, i64> = heads
            .into_iter()
            .map(|(room, head)| {
                let base = head - of(&room);
                (room, base)
            })
            .collect();
        Ok(batch.answers(&bases))
    }
}

/// Whatever failed on the writer connection, no transaction stays open on it (an error from the
/// `ROLLBACK` means there was none left to roll back).
async fn rolled_back_if_failed<T>(
    conn: &mut sqlx::SqliteConnection,
    written: Result<T, StoreError>,
) -> Result<T, StoreError> {
    if written.is_err() {
        let _ = sqlx::query("ROLLBACK").execute(conn).await;
    }
    written
}

/// A message by seq or id, in any state, without its quote.
async fn message_by<'e, E: sqlx::SqliteExecutor<'e>>(
    db: E,
    room: &str,
    target: &Target,
) -> Result<Option<Message>, sqlx::Error> {
    let query = match target {
        Target::Seq(seq) => sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            r#" FROM "ChatMessage" WHERE "roomId" = ? AND seq = ?"#
        ))
        .bind(room)
        .bind(seq),
        Target::Id(id) => sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            r#" FROM "ChatMessage" WHERE "roomId" = ? AND id = ?"#
        ))
        .bind(room)
        .bind(id.as_str()),
    };
    query.fetch_optional(db).await
}

/// A send batch's first call: `BEGIN IMMEDIATE` and the originals of its keys stored before it.
/// `?`: the keys, `[roomId, senderId, clientMsgId]` rows.
const READ_ORIGINALS: &str = concat!(
    "BEGIN IMMEDIATE;\nSELECT ",
    columns!(),
    r#" FROM "ChatMessage" WHERE ("roomId", "senderId", "clientMsgId") IN
    (SELECT value->>0, value->>1, value->>2 FROM json_each(?))"#
);

/// A send batch's writes and `COMMIT`. First `?`: `[roomId, n, newest createdAt]` per room, whose
/// head (`"lastSeq"`) moves by n, and its `lastMessageAt` (never backwards; the times are RFC
/// 3339 text of one width, so they compare as text); returns each room's new head (missing rooms
/// return no row). Second: the new messages ([`Row`]), each with its offset from its room's new
/// head; a message of a missing room is not written. In arrival order, so the relay (which reads
/// the outbox by id) queues them so.
macro_rules! write_sends {
    ($outbox:literal) => {
        concat!(
            r#"UPDATE "ChatRoom" SET "lastSeq" = "lastSeq" + (n.value->>1),
    "lastMessageAt" = max(coalesce("lastMessageAt", n.value->>2), n.value->>2),
    "updatedAt" = max(coalesce("lastMessageAt", n.value->>2), n.value->>2)
    FROM json_each(?) AS n WHERE "ChatRoom".id = n.value->>0
    RETURNING id, "lastSeq";
INSERT INTO "ChatMessage" (id, "roomId", seq, "senderId", "senderName", "senderAvatarUrl",
    content, "contentType", status, "moderationStatus", "createdAt", "clientMsgId", "replyToSeq")
    SELECT j.value->>0, j.value->>1, r."lastSeq" + (j.value->>2), j.value->>3, j.value->>4,
        j.value->>5, j.value->>6, 'TEXT', 'SENT', 'APPROVED', j.value->>7, j.value->>8,
        j.value->>9
    FROM json_each(?) AS j JOIN "ChatRoom" r ON r.id = j.value->>1 ORDER BY j.key;
"#,
            $outbox,
            "COMMIT;"
        )
    };
}
const WRITE_SENDS: &str = write_sends!("");
/// [`WRITE_SENDS`] with the messages' outbox rows (third `?`: the same messages).
const WRITE_SENDS_WITH_OUTBOX: &str = write_sends!(
    r#"INSERT INTO "ChatOutbox" ("roomId", seq, "messageId", "createdAt")
    SELECT j.value->>1, r."lastSeq" + (j.value->>2), j.value->>0, j.value->>7
    FROM json_each(?) AS j JOIN "ChatRoom" r ON r.id = j.value->>1 ORDER BY j.key;
"#
);

/// A change batch's transaction and read (see [`super::change_batch`]): every request's message, the seq of a
/// change stored under an edit's key and whether a reaction's row is there. The rows of `?`:
/// `[room, seq or null, id or null, actor, clientChangeId, emoji]`.
const READ_CHANGES: &str = change_batch::read_sql!(
    r#"BEGIN IMMEDIATE;
WITH input AS (
    SELECT key + 1 AS ord, value->>0 AS in_room, value->>1 AS in_seq, value->>2 AS in_id,
        value->>3 AS in_actor, value->>4 AS in_key, value->>5 AS in_emoji
    FROM json_each(?)
)"#,
    columns!()
);

/// A change batch's writes and commit, in one call. Its six parameters, in order (each `?` once:
/// across the statements of one call, sqlx binds anonymous parameters in turn): the rooms'
/// numbers of changes (`[room, n]`), moved first (the rooms' new heads are returned; in the rows
/// after it, seqs are relative to the room's new head: `head + value`); the messages' new states
/// `[room, seq, content, editedAt, deletedAt, reactions, moderationStatus, version]`; the change
/// rows `[room, seq, messageSeq, kind, actor, clientChangeId, change, createdAt]`; reaction rows
/// added, then removed `[room, messageSeq, emoji, user, createdAt]`; messages whose reaction rows
/// all go `[room, messageSeq]`. An empty array writes nothing.
const WRITE_CHANGES: &str = r#"UPDATE "ChatRoom" SET "lastSeq" = "lastSeq" + (n.value->>1)
    FROM json_each(?) AS n WHERE "ChatRoom".id = n.value->>0
    RETURNING id, "lastSeq";
UPDATE "ChatMessage" SET content = v.value->>2, "editedAt" = v.value->>3,
    "deletedAt" = v.value->>4, reactions = v.value->>5, "moderationStatus" = v.value->>6,
    version = (SELECT r."lastSeq" FROM "ChatRoom" r WHERE r.id = v.value->>0) + (v.value->>7)
    FROM json_each(?) AS v
    WHERE "ChatMessage"."roomId" = v.value->>0 AND "ChatMessage".seq = v.value->>1;
INSERT INTO "ChatMessageChange" ("roomId", seq, "messageSeq", kind, "actorId", "clientChangeId",
    change, "createdAt")
    SELECT value->>0, (SELECT r."lastSeq" FROM "ChatRoom" r WHERE r.id = value->>0) + (value->>1),
        value->>2, value->>3, value->>4, value->>5, value->>6, value->>7
    FROM json_each(?) ORDER BY key;
INSERT INTO "ChatReaction" ("roomId", "messageSeq", emoji, "userId", "createdAt")
    SELECT value->>0, value->>1, value->>2, value->>3, value->>4
    FROM json_each(?) WHERE true ON CONFLICT DO NOTHING;
DELETE FROM "ChatReaction" WHERE ("roomId", "messageSeq", emoji, "userId") IN
    (SELECT value->>0, value->>1, value->>2, value->>3 FROM json_each(?));
DELETE FROM "ChatReaction" WHERE ("roomId", "messageSeq") IN
    (SELECT value->>0, value->>1 FROM json_each(?));
COMMIT"#;

/// Rows for `json_each(?)`: a JSON array (of arrays), so one fixed statement text (prepared once)
/// takes any number of rows.
fn json<T: serde::Serialize>(rows: &T) -> String {
    serde_json::to_string(rows).expect("strings and numbers serialize")
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }

    async fn insert_message(&self, msg: NewMessage) -> Result<Inserted, StoreError> {
        let (reply, answer) = oneshot::channel();
        let waiting = Waiting::new(&self.stats.sends_waiting);
        // A full queue makes the caller wait here (back-pressure), it is not an error.
        self.sends
            .send(Queued { req: msg, reply })
            .await
            .map_err(|_| closed())?;
        // Queued: the writer counts it out when it takes it.
        waiting.handed_over();
        answer.await.map_err(|_| closed())?
    }

    async fn find_by_client_msg_id(
        &self,
        room: &str,
        sender: &str,
        client_msg_id: &str,
    ) -> Result<Option<Message>, StoreError> {
        let found: Option<Message> = sqlx::query_as(FIND_BY_CLIENT_MSG_ID)
            .bind(room)
            .bind(sender)
            .bind(client_msg_id)
            .fetch_optional(&self.readers)
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
        let mut rows = sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            r#" FROM "ChatMessage" WHERE "roomId" = ? AND seq < ? AND "moderationStatus" <> 'REJECTED'
                ORDER BY seq DESC LIMIT ?"#
        ))
        .bind(room)
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
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
        let mut messages = sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            r#" FROM "ChatMessage" WHERE "roomId" = ? AND seq > ? AND seq <= ?
                AND "moderationStatus" <> 'REJECTED' ORDER BY seq ASC LIMIT ?"#
        ))
        .bind(room)
        .bind(after)
        .bind(until)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        quote_replies(self, room, &mut messages).await?;
        let changes = sqlx::query_as(&format!(
            r#"SELECT {CHANGE_COLUMNS} FROM "ChatMessageChange"
               WHERE "roomId" = ? AND seq > ? AND seq <= ? ORDER BY seq ASC LIMIT ?"#
        ))
        .bind(room)
        .bind(after)
        .bind(until)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        merge_events(messages, changes, limit)
    }

    async fn messages_at(&self, room: &str, seqs: &[i64]) -> Result<Vec<Message>, StoreError> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            r#" FROM "ChatMessage" WHERE "roomId" = ? AND seq IN (SELECT value FROM json_each(?))"#
        ))
        .bind(room)
        .bind(json(&seqs))
        .fetch_all(&self.readers)
        .await?)
    }

    async fn message(&self, room: &str, target: &Target) -> Result<Option<Message>, StoreError> {
        let Some(m) = message_by(&self.readers, room, target).await? else {
            return Ok(None);
        };
        let mut rows = [m];
        quote_replies(self, room, &mut rows).await?;
        let [m] = rows;
        Ok(Some(m))
    }

    async fn change_message(&self, req: ChangeRequest) -> Result<Changed, StoreError> {
        let room = req.room_id.clone();
        let (actor, key) = (
            req.actor.clone(),
            req.client_change_id().map(str::to_string),
        );
        // Written by the group writer, in a batch with the other changes waiting.
        let written = group::ask(&self.changes, req, "the group writer").await?;
        let mut changed = match written {
            Written::Changed(changed) => changed,
            Written::Stored => {
                // The edit's key was stored by an earlier attempt: answer with that change.
                let row: ChangeRow = sqlx::query_as(&format!(
                    r#"SELECT {CHANGE_COLUMNS} FROM "ChatMessageChange"
                       WHERE "roomId" = ? AND "actorId" = ? AND "clientChangeId" = ?"#
                ))
                .bind(&room)
                .bind(&actor)
                .bind(key)
                .fetch_one(&self.readers)
                .await?;
                let change = Change::try_from(row)?;
                let message = self
                    .message(&room, &Target::Seq(change.target))
                    .await?
                    .ok_or(StoreError::Refused(Refusal::NotFound))?;
                return Ok(Changed {
                    message,
                    change: Some(change),
                    duplicate: true,
                });
            }
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
        Ok(sqlx::query_as(
            r#"SELECT "messageSeq", emoji FROM "ChatReaction"
               WHERE "roomId" = ? AND "userId" = ? AND "messageSeq" BETWEEN ? AND ?
               ORDER BY "messageSeq", "createdAt""#,
        )
        .bind(room)
        .bind(user)
        .bind(from)
        .bind(to)
        .fetch_all(&self.readers)
        .await?)
    }

    async fn room_head(&self, room: &str) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar(r#"SELECT "lastSeq" FROM "ChatRoom" WHERE id = ?"#)
                .bind(room)
                .fetch_optional(&self.readers)
                .await?,
        )
    }

    async fn room_heads(&self, rooms: &[&str]) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            r#"SELECT id, "lastSeq" FROM "ChatRoom" WHERE id IN (SELECT value FROM json_each(?))"#,
        )
        .bind(json(&rooms))
        .fetch_all(&self.readers)
        .await?)
    }

    async fn access(&self, room: &str, user: &str) -> Result<Access, StoreError> {
        let (room_exists, member): (Option<i64>, Option<i64>) = sqlx::query_as(
            r#"SELECT (SELECT 1 FROM "ChatRoom" WHERE id = ?1),
                      (SELECT 1 FROM "ChatRoomMember" WHERE "roomId" = ?1 AND "userId" = ?2)"#,
        )
        .bind(room)
        .bind(user)
        .fetch_one(&self.readers)
        .await?;
        Ok(match (room_exists, member) {
            (None, _) => Access::NoRoom,
            (Some(_), None) => Access::NotMember,
            (Some(_), Some(_)) => Access::Member,
        })
    }

    async fn create_room(&self, id: &str, name: &str) -> Result<Room, StoreError> {
        self.wrote(1);
        let (owned_id, owned_name) = (id.to_string(), name.to_string());
        self.on_writer(move |pool| async move {
            sqlx::query(r#"INSERT INTO "ChatRoom" (id, name) VALUES (?, ?)"#)
                .bind(owned_id)
                .bind(owned_name)
                .execute(&pool)
                .await
        })
        .await
        .map_err(|e| match StoreError::from(e) {
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
        self.wrote(1);
        let (id, name) = (id.to_string(), name.to_string());
        let done = self
            .on_writer(move |pool| async move {
                sqlx::query(
                    r#"INSERT INTO "ChatRoom" (id, name) VALUES (?, ?) ON CONFLICT (id) DO NOTHING"#,
                )
                .bind(id)
                .bind(name)
                .execute(&pool)
                .await
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn add_member(&self, room: &str, user: &str) -> Result<bool, StoreError> {
        if self.room_head(room).await?.is_none() {
            return Err(StoreError::RoomNotFound);
        }
        self.wrote(1);
        let (room, user) = (room.to_string(), user.to_string());
        let done = self
            .on_writer(move |pool| async move {
                sqlx::query(
                    r#"INSERT INTO "ChatRoomMember" (id, "roomId", "userId") VALUES (?, ?, ?)
                       ON CONFLICT ("roomId", "userId") DO NOTHING"#,
                )
                .bind(uuid::Uuid::now_v7().to_string())
                .bind(room)
                .bind(user)
                .execute(&pool)
                .await
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn remove_member(&self, room: &str, user: &str) -> Result<bool, StoreError> {
        self.wrote(1);
        let (room, user) = (room.to_string(), user.to_string());
        let done = self
            .on_writer(move |pool| async move {
                sqlx::query(r#"DELETE FROM "ChatRoomMember" WHERE "roomId" = ? AND "userId" = ?"#)
                    .bind(room)
                    .bind(user)
                    .execute(&pool)
                    .await
            })
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn my_rooms(&self, user: &str, limit: u32) -> Result<Vec<RoomSummary>, StoreError> {
        let rooms: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
            r#"SELECT r.id, r.name, r."lastSeq", m."lastReadSeq",
                 (SELECT count(*) FROM (SELECT 1 FROM "ChatMessage" x
                    WHERE x."roomId" = r.id AND x.seq > m."lastReadSeq"
                      AND x."moderationStatus" <> 'REJECTED' LIMIT 1000))
               FROM "ChatRoomMember" m JOIN "ChatRoom" r ON r.id = m."roomId"
               WHERE m."userId" = ? ORDER BY r."lastMessageAt" IS NULL, r."lastMessageAt" DESC, r.id LIMIT ?"#,
        )
        .bind(user)
        .bind(limit)
        .fetch_all(&self.readers)
        .await?;
        let last: Vec<Message> = sqlx::query_as(concat!(
            "SELECT ",
            columns!(),
            r#" FROM "ChatMessage" WHERE ("roomId", seq) IN
                (SELECT r.id, (SELECT max(x.seq) FROM "ChatMessage" x
                               WHERE x."roomId" = r.id AND x."moderationStatus" <> 'REJECTED')
                 FROM "ChatRoomMember" m JOIN "ChatRoom" r ON r.id = m."roomId"
                 WHERE m."userId" = ?)"#
        ))
        .bind(user)
        .fetch_all(&self.readers)
        .await?;
        Ok(super::summaries(rooms, last))
    }

    async fn member_count(&self, room: &str) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar(r#"SELECT COUNT(*) FROM "ChatRoomMember" WHERE "roomId" = ?"#)
                .bind(room)
                .fetch_one(&self.readers)
                .await?,
        )
    }

    async fn mark_read(&self, marks: &[ReadMark]) -> Result<u64, StoreError> {
        if marks.is_empty() {
            return Ok(0);
        }
        let rows: Vec<(&str, &str, i64, String)> = marks
            .iter()
            .map(|m| (m.room_id.as_str(), m.user_id.as_str(), m.seq, ts(&m.at)))
            .collect();
        // One statement for every mark; a (room, user) listed twice takes its furthest mark.
        self.wrote(1);
        let rows = json(&rows);
        let done = self
            .on_writer(move |pool| async move {
                sqlx::query(
                    r#"UPDATE "ChatRoomMember" SET "lastReadSeq" = r.seq, "lastReadAt" = r.at
                       FROM (SELECT value->>0 AS room, value->>1 AS usr, max(value->>2) AS seq,
                                    max(value->>3) AS at
                             FROM json_each(?) GROUP BY 1, 2) AS r
                       WHERE "ChatRoomMember"."roomId" = r.room AND "ChatRoomMember"."userId" = r.usr
                         AND "lastReadSeq" < r.seq"#,
                )
                .bind(rows)
                .execute(&pool)
                .await
            })
            .await?;
        Ok(done.rows_affected())
    }

    async fn outbox_claim(
        &self,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let now = Utc::now();
        let until =
            now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(30));
        self.wrote(1);
        let mut rows: Vec<OutboxEntry> = self
            .on_writer(move |pool| async move {
                sqlx::query_as(
                    r#"UPDATE "ChatOutbox" SET "claimedUntil" = ?1
                       WHERE id IN (SELECT id FROM "ChatOutbox"
                                    WHERE "claimedUntil" IS NULL OR "claimedUntil" < ?2
                                    ORDER BY id LIMIT ?3)
                       RETURNING id, "roomId", seq, "messageId", "createdAt""#,
                )
                .bind(ts(&until))
                .bind(ts(&now))
                .bind(limit)
                .fetch_all(&pool)
                .await
            })
            .await?;
        rows.sort_by_key(|r| r.id);
        Ok(rows)
    }

    async fn outbox_done(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        // One fixed statement text whatever the number of ids (prepared once).
        self.wrote(1);
        let ids = json(&ids);
        self.on_writer(move |pool| async move {
            sqlx::query(r#"DELETE FROM "ChatOutbox" WHERE id IN (SELECT value FROM json_each(?))"#)
                .bind(ids)
                .execute(&pool)
                .await
        })
        .await?;
        Ok(())
    }

    async fn outbox_lease(&self, ids: &[i64], lease: Option<Duration>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let until = lease.map(|lease| {
            ts(&(Utc::now()
                + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(60))))
        });
        self.wrote(1);
        let ids = json(&ids);
        self.on_writer(move |pool| async move {
            sqlx::query(
                r#"UPDATE "ChatOutbox" SET "claimedUntil" = ?
                   WHERE id IN (SELECT value FROM json_each(?))"#,
            )
            .bind(until)
            .bind(ids)
            .execute(&pool)
            .await
        })
        .await?;
        Ok(())
    }

    async fn outbox_release_all(&self) -> Result<u64, StoreError> {
        self.wrote(1);
        let done = self
            .on_writer(move |pool| async move {
                sqlx::query(
                    r#"UPDATE "ChatOutbox" SET "claimedUntil" = NULL WHERE "claimedUntil" IS NOT NULL"#,
                )
                .execute(&pool)
                .await
            })
            .await?;
        Ok(done.rows_affected())
    }

    async fn close(&self) {
        SqliteStore::close(self).await;
    }

    fn metrics(&self) -> Option<StoreMetrics> {
        Some(StoreMetrics::Sqlite(self.stats.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection keeps statement journals and sorts in memory (see "Temporary files"):
    /// a group commit writes no file but the WAL.
    #[tokio::test]
    async fn statement_journals_stay_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("chat.db"), 1)
            .await
            .unwrap();
        for pool in [&store.writer, &store.readers, &store.checkpointer] {
            let temp_store: i64 = sqlx::query_scalar("PRAGMA temp_store")
                .fetch_one(pool)
                .await
                .unwrap();
            assert_eq!(temp_store, 2, "temp_store = MEMORY");
        }
    }

    /// The query plan of a batch's read (`sql` without its leading `BEGIN IMMEDIATE;`), its one
    /// parameter an empty JSON array, on a freshly migrated database: one step per row.
    async fn plan_after_begin(sql: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("chat.db"), 1)
            .await
            .unwrap();
        store.migrate().await.unwrap();
        let read = sql
            .strip_prefix("BEGIN IMMEDIATE;")
            .expect("a batch's read");
        let plan: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {read}"))
                .bind("[]")
                .fetch_all(&store.readers)
                .await
                .unwrap();
        plan.into_iter().map(|(_, _, _, step)| step).collect()
    }

    /// The send batch's read of stored originals finds each key through the key's own index,
    /// whose first column is the key (`20261206000007_client_key_first.sql`): never a scan of a
    /// room's messages.
    #[tokio::test]
    async fn the_send_batch_read_searches_the_key_index() {
        let steps = plan_after_begin(READ_ORIGINALS).await;
        assert!(
            steps.iter().any(|s| s.starts_with(
                "SEARCH ChatMessage USING INDEX ChatMessage_clientMsgId_roomId_senderId_key \
                 (clientMsgId=? AND roomId=? AND senderId=?)"
            )),
            "the key lookup does not search the key's index: {steps:?}"
        );
        assert!(
            steps
                .iter()
                .all(|s| !s.starts_with("SCAN") || s.starts_with("SCAN json_each")),
            "a scan in the send batch's read: {steps:?}"
        );
    }

    /// The change batch's read finds every message, key and reaction row through an index: no
    /// table or index is scanned but the batch's own JSON rows, whatever the tables hold. (The
    /// key lookup's index is partial, keyed rows only: usable because `= ?` implies NOT NULL.)
    #[tokio::test]
    async fn the_change_batch_read_searches_indexes_only() {
        let steps = plan_after_begin(READ_CHANGES).await;
        for step in &steps {
            assert!(
                !step.starts_with("SCAN") || step.starts_with("SCAN json_each"),
                "a scan in the change batch's read: {steps:?}"
            );
        }
        for index in [
            "ChatMessage_roomId_seq_key",
            "ChatMessageChange_roomId_actorId_clientChangeId_key",
            "ChatReaction_",
        ] {
            assert!(
                steps
                    .iter()
                    .any(|s| s.starts_with("SEARCH") && s.contains(index)),
                "no search of {index}: {steps:?}"
            );
        }
    }
}
