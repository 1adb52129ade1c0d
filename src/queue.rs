//! Side effects of a send leave the send path: the store writes an outbox row in the message's own
//! transaction, the [`OutboxRelay`] moves outbox rows to the [`JobQueue`] (deleting them only once
//! queued), and the [`Worker`] performs the jobs. A process that dies anywhere along the way loses
//! no side effect: unrelayed rows stay in the outbox and are claimed again when their lease ends.
//! Jobs are therefore at-least-once, and each is idempotent.
//!
//! The in-process queue is a bounded channel. Overflow policy: `enqueue` never waits; when the
//! queue is full the relay leaves the rest of its batch in the outbox and retries after the lease.
//! Jobs sitting in the in-process queue when the process dies are lost from it, but their outbox
//! rows were deleted only after queueing, so durability on one node ends at the queue: the
//! Redis-backed queue is the durable one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{OutboxEntry, Store};

#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    /// A message was stored: update the room's `lastMessageAt` (coalesced per batch).
    MessageStored {
        room_id: String,
        seq: i64,
        created_at: DateTime<Utc>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("job queue full")]
    Full,
    #[error("job queue closed")]
    Closed,
}

#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    async fn enqueue(&self, job: Job) -> Result<(), QueueError>;
}

pub struct MemoryJobQueue {
    tx: mpsc::Sender<Job>,
}

impl MemoryJobQueue {
    pub fn new(capacity: usize) -> (Self, mpsc::Receiver<Job>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self { tx }, rx)
    }
}

#[async_trait]
impl JobQueue for MemoryJobQueue {
    async fn enqueue(&self, job: Job) -> Result<(), QueueError> {
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => QueueError::Full,
            mpsc::error::TrySendError::Closed(_) => QueueError::Closed,
        })
    }
}

/// Performs queued jobs in batches. Runs inside the gateway.
pub struct Worker {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub batch: usize,
}

const MAX_ATTEMPTS: u32 = 5;

impl Worker {
    /// Runs until `shutdown`, then drains what is already queued and returns.
    pub async fn run(self, mut rx: mpsc::Receiver<Job>, shutdown: CancellationToken) {
        let mut jobs = Vec::with_capacity(self.batch);
        loop {
            let n = tokio::select! {
                n = rx.recv_many(&mut jobs, self.batch) => n,
                _ = shutdown.cancelled() => {
                    rx.close();
                    while rx.recv_many(&mut jobs, self.batch).await > 0 {
                        self.perform(&mut jobs).await;
                    }
                    return;
                }
            };
            if n == 0 {
                return;
            }
            self.perform(&mut jobs).await;
        }
    }

    async fn perform(&self, jobs: &mut Vec<Job>) {
        let count = jobs.len() as u64;
        let mut latest: HashMap<String, DateTime<Utc>> = HashMap::new();
        for job in jobs.drain(..) {
            match job {
                Job::MessageStored {
                    room_id,
                    created_at,
                    ..
                } => {
                    let at = latest.entry(room_id).or_insert(created_at);
                    *at = (*at).max(created_at);
                }
            }
        }
        let updates: Vec<_> = latest.into_iter().collect();
        let mut backoff = Duration::from_millis(50);
        for attempt in 1..=MAX_ATTEMPTS {
            match self.store.touch_rooms(&updates).await {
                Ok(()) => {
                    self.metrics.job("done", count);
                    return;
                }
                Err(e) if attempt < MAX_ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "job batch failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(e) => {
                    tracing::error!(error = %e, jobs = count, "job batch failed; giving up");
                    self.metrics.job("failed", count);
                }
            }
        }
    }
}

impl From<OutboxEntry> for Job {
    fn from(e: OutboxEntry) -> Self {
        Job::MessageStored {
            room_id: e.room_id,
            seq: e.seq,
            created_at: e.created_at,
        }
    }
}

/// Moves outbox rows to the job queue. Woken by each send, and polls for rows left by others.
pub struct OutboxRelay {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn JobQueue>,
    pub metrics: Arc<Metrics>,
    /// Notified after every stored message, so side effects start at once.
    pub wake: Arc<Notify>,
    pub batch: u32,
    /// How often to look for rows nobody woke us for (left by a node that died).
    pub poll: Duration,
    /// How long claimed rows stay ours before another relay may take them.
    pub lease: Duration,
}

impl OutboxRelay {
    /// Runs until `shutdown`, then relays what is in the outbox once more and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            self.drain().await;
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.poll) => {}
                _ = shutdown.cancelled() => {
                    self.drain().await;
                    return;
                }
            }
        }
    }

    /// Relays until the outbox is empty or the queue refuses.
    async fn drain(&self) {
        loop {
            let rows = match self.store.outbox_claim(self.batch, self.lease).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox claim failed");
                    return;
                }
            };
            let claimed = rows.len();
            if claimed == 0 {
                return;
            }
            let mut relayed = Vec::with_capacity(claimed);
            for row in rows {
                let id = row.id;
                match self.queue.enqueue(Job::from(row)).await {
                    Ok(()) => relayed.push(id),
                    Err(e) => {
                        tracing::warn!(error = %e, "job queue refused; the rest waits in the outbox");
                        break;
                    }
                }
            }
            if let Err(e) = self.store.outbox_ack(&relayed).await {
                // Rows stay claimed and are relayed again after the lease: jobs are idempotent.
                tracing::warn!(error = %e, "outbox ack failed");
            }
            self.metrics.job("enqueued", relayed.len() as u64);
            if relayed.len() < claimed {
                return;
            }
        }
    }
}
