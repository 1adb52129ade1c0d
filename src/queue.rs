//! Side effects of a send leave the send path through a job queue, and a worker performs them.
//!
//! The in-process queue is a bounded channel. Overflow policy: `enqueue` never waits; a full queue
//! drops the job and counts it (`chat_jobs_total{outcome="dropped"}`), because the jobs here are
//! coalescible bookkeeping (`"ChatRoom"."lastMessageAt"`) that the next message of the room
//! repairs. It is not durable: jobs queued when the process dies are lost. The Redis queue, with a
//! transactional outbox, is the durable one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::Store;

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
