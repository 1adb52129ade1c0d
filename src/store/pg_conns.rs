//! The Postgres writers' own connections, outside any pool.
//!
//! A pooled connection costs a round trip every time it goes back to its pool: sqlx tests it
//! with a `Sync` then, whatever `test_before_acquire` says, to flush what a cancelled statement
//! may have left. For the writers that is one more round trip per batch, and at the batch sizes
//! of ordinary traffic (a few sends per commit) about one per message: measured, 10-16 % of
//! Postgres' CPU per stored message and 6-14 % of the gateways' (docs/BENCHMARKS.md, "Writers
//! without a pool"). The writers run one statement at a time on a connection (each its
//! own implicit transaction), so they need no pool's bookkeeping: each holds a slot with its
//! connection for the statement, and puts the connection back only when the statement ran to
//! its end. A statement whose future was dropped, or that failed for want of the database,
//! leaves its slot empty, and the next use opens a fresh connection (bounded by
//! `database.acquire_timeout_ms`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::{Mutex, MutexGuard};

/// A fixed set of connections, one per writer that may run at once.
pub(super) struct WriterConns {
    options: PgConnectOptions,
    connect_timeout: Duration,
    slots: Box<[Mutex<Option<PgConnection>>]>,
    /// Where the next lease starts looking for a free slot.
    next: AtomicUsize,
}

impl WriterConns {
    /// Opens `size` connections now (the gateway does not start without its database).
    pub async fn open(
        options: PgConnectOptions,
        size: usize,
        connect_timeout: Duration,
    ) -> Result<Self, sqlx::Error> {
        let mut slots = Vec::with_capacity(size.max(1));
        for _ in 0..size.max(1) {
            let conn = connect(&options, connect_timeout).await?;
            slots.push(Mutex::new(Some(conn)));
        }
        Ok(Self {
            options,
            connect_timeout,
            slots: slots.into_boxed_slice(),
            next: AtomicUsize::new(0),
        })
    }

    /// A connection for one statement: a free slot's, or the next slot's once it is free;
    /// opened first when the slot is empty.
    pub async fn lease(&self) -> Result<Lease<'_>, sqlx::Error> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.slots.len();
        let free = (0..n).find_map(|i| self.slots[(start + i) % n].try_lock().ok());
        let slot = match free {
            Some(slot) => slot,
            None => self.slots[start % n].lock().await,
        };
        self.fill(slot).await
    }

    /// Whether every slot's connection answers `SELECT 1` within `timeout`, reopening the ones
    /// that do not (the database's health probe: after an outage, no writer should meet a
    /// connection that died with it).
    pub async fn answer(&self, timeout: Duration) -> bool {
        for slot in self.slots.iter() {
            let probe = async {
                let mut lease = self.fill(slot.lock().await).await?;
                let answered = sqlx::query("SELECT 1").execute(lease.conn()).await;
                lease.finish(&answered);
                answered.map(|_| ())
            };
            if !matches!(tokio::time::timeout(timeout, probe).await, Ok(Ok(()))) {
                return false;
            }
        }
        true
    }

    /// Closes every connection (at shutdown, after the writers stopped).
    pub async fn close(&self) {
        for slot in self.slots.iter() {
            if let Some(conn) = slot.lock().await.take() {
                let _ = conn.close().await;
            }
        }
    }

    async fn fill<'a>(
        &self,
        mut slot: MutexGuard<'a, Option<PgConnection>>,
    ) -> Result<Lease<'a>, sqlx::Error> {
        let conn = match slot.take() {
            Some(conn) => conn,
            None => {
                let conn = connect(&self.options, self.connect_timeout).await?;
                tracing::info!("a database writer connection was opened again");
                conn
            }
        };
        Ok(Lease {
            slot,
            conn: Some(conn),
            clean: false,
        })
    }
}

async fn connect(
    options: &PgConnectOptions,
    timeout: Duration,
) -> Result<PgConnection, sqlx::Error> {
    match tokio::time::timeout(timeout, PgConnection::connect_with(options)).await {
        Ok(conn) => conn,
        Err(_) => Err(sqlx::Error::PoolTimedOut),
    }
}

/// One slot's connection, for one statement. Goes back to its slot when dropped, but only if
/// [`Lease::finish`] saw the statement end with the connection in a known state.
pub(super) struct Lease<'a> {
    slot: MutexGuard<'a, Option<PgConnection>>,
    conn: Option<PgConnection>,
    clean: bool,
}

impl Lease<'_> {
    pub fn conn(&mut self) -> &mut PgConnection {
        self.clean = false;
        self.conn.as_mut().expect("a lease holds its connection")
    }

    /// Records how the statement ended: the connection is kept after an answer from the
    /// database (rows or an error it reported), dropped after any other failure.
    pub fn finish<T>(&mut self, outcome: &Result<T, sqlx::Error>) {
        self.clean = match outcome {
            Ok(_) => true,
            Err(e @ sqlx::Error::Database(_)) => !super::postgres::unreachable(e),
            Err(_) => false,
        };
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if self.clean {
            *self.slot = self.conn.take();
        }
    }
}
