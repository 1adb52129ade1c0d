//! Side effects of a send leave the send path. A message's (the webhook, when `queue.webhook_url`
//! is set; nothing else is left: the room's `lastMessageAt` moves with the send) start as an
//! outbox row the store writes in the message's own statement; the [`OutboxRelay`] hands outbox rows to the [`JobQueue`], leasing them for
//! `queue.redeliver_after_ms`, and the [`Worker`] performs the jobs and only then deletes their
//! rows. Whatever forgets a job on the way (a process that dies, a Redis that restarts empty), its
//! row is still in the outbox and is queued again when its lease ends, or at once when the queue
//! is found empty (a fresh in-process queue at start, a Redis consumer group created anew). Jobs
//! are therefore at-least-once, and each is idempotent.
//!
//! The in-process queue is a bounded channel. Overflow policy: `enqueue` never waits; when the
//! queue is full (or the Redis queue unreachable) the relay releases the rest of its batch in the
//! outbox, to be claimed again at its next drain.

pub mod redis;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{OutboxEntry, ReadMark, Store};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Job {
    /// A message was stored: call the webhook. Written to the outbox only when one is configured
    /// (`queue.webhook_url`); the room's `lastMessageAt` moves with the send itself. Receivers
    /// dedupe by `messageId` (delivery is at-least-once).
    MessageStored {
        room_id: String,
        seq: i64,
        message_id: String,
        created_at: DateTime<Utc>,
        /// The outbox row the worker deletes once this job is done (absent in jobs queued by
        /// earlier versions, whose rows were deleted when queued).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outbox_id: Option<i64>,
    },
    /// A member read a room up to `seq`: move `"lastReadSeq"` / `"lastReadAt"` forward (coalesced
    /// per member and room within a batch; idempotent, positions never move back).
    MarkRead {
        room_id: String,
        user_id: String,
        seq: i64,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("job queue full")]
    Full,
    #[error("job queue closed")]
    Closed,
    #[error("job queue unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    async fn enqueue(&self, job: Job) -> Result<(), QueueError>;

    /// Queues `jobs` in order; returns how many were queued before the queue refused (the rest
    /// were not). The Redis queue sends them in one round trip.
    async fn enqueue_all(&self, jobs: Vec<Job>) -> (usize, Option<QueueError>) {
        let total = jobs.len();
        for (queued, job) in jobs.into_iter().enumerate() {
            if let Err(e) = self.enqueue(job).await {
                return (queued, Some(e));
            }
        }
        (total, None)
    }
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

/// Webhook calls in flight at once per batch.
const WEBHOOK_CONCURRENCY: usize = 32;

/// Performs jobs: coalesces the read marks of a batch into one write per member and room, and
/// calls the webhook once per message. Shared by the in-process and the Redis queue.
pub struct Worker {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub batch: usize,
    pub max_attempts: u32,
    pub webhook: Option<Webhook>,
    /// `queue.redeliver_after_ms`: how long a job's outbox row is leased past its next attempt.
    pub redeliver_after: Duration,
}

/// The outbox rows of jobs (those that have one).
pub fn outbox_ids<'a>(jobs: impl IntoIterator<Item = &'a Job>) -> Vec<i64> {
    jobs.into_iter()
        .filter_map(|job| match job {
            Job::MessageStored { outbox_id, .. } => *outbox_id,
            Job::MarkRead { .. } => None,
        })
        .collect()
}

impl Worker {
    /// Deletes the outbox rows of jobs that are done, or given up on (dead-lettered): nothing
    /// will queue them again. A failure leaves the rows to be queued again after their lease
    /// (at-least-once).
    pub async fn settle<'a>(&self, finished: impl IntoIterator<Item = &'a Job>) {
        let ids = outbox_ids(finished);
        if let Err(e) = self.store.outbox_done(&ids).await {
            tracing::warn!(error = %e, rows = ids.len(), "outbox rows of done jobs not deleted; they will be done again");
        }
    }

    /// Performs a batch. Returns the indices of the jobs that failed (to retry later).
    pub async fn perform(&self, jobs: &[Job]) -> Vec<usize> {
        let mut reads: HashMap<(&str, &str), (i64, DateTime<Utc>)> = HashMap::new();
        for job in jobs {
            match job {
                // Its room's lastMessageAt moved with the send itself; the webhook is below.
                Job::MessageStored { .. } => {}
                Job::MarkRead {
                    room_id,
                    user_id,
                    seq,
                    at,
                } => {
                    let mark = reads
                        .entry((room_id.as_str(), user_id.as_str()))
                        .or_insert((*seq, *at));
                    *mark = (mark.0.max(*seq), mark.1.max(*at));
                }
            }
        }
        let marks: Vec<ReadMark> = reads
            .into_iter()
            .map(|((room, user), (seq, at))| ReadMark {
                room_id: room.to_string(),
                user_id: user.to_string(),
                seq,
                at,
            })
            .collect();
        let written = async {
            if !marks.is_empty() {
                self.store.mark_read(&marks).await?;
                // One write per (room, user) per batch, however many marks were queued.
                self.metrics.read_marks_written.inc_by(marks.len() as u64);
            }
            Ok::<(), crate::store::StoreError>(())
        };
        if let Err(e) = written.await {
            tracing::warn!(error = %e, jobs = jobs.len(), "read marks not written");
            return (0..jobs.len()).collect();
        }
        let Some(webhook) = &self.webhook else {
            return Vec::new();
        };
        // Concurrently, so a batch takes about one call's time, well below the 30 s after which
        // another worker would claim the batch's jobs again.
        let mut failed = Vec::new();
        for (chunk_index, chunk) in jobs.chunks(WEBHOOK_CONCURRENCY).enumerate() {
            let outcomes =
                futures::future::join_all(chunk.iter().map(|job| webhook.deliver(job))).await;
            for (i, outcome) in outcomes.into_iter().enumerate() {
                if let Err(e) = outcome {
                    tracing::warn!(error = %e, "webhook delivery failed");
                    failed.push(chunk_index * WEBHOOK_CONCURRENCY + i);
                }
            }
        }
        failed
    }

    /// The in-process loop: runs until `shutdown`, then drains what is already queued. Failed jobs
    /// are retried with exponential backoff up to `max_attempts`, then counted as failed.
    pub async fn run(self, mut rx: mpsc::Receiver<Job>, shutdown: CancellationToken) {
        let mut jobs = Vec::with_capacity(self.batch);
        loop {
            let n = tokio::select! {
                n = rx.recv_many(&mut jobs, self.batch) => n,
                _ = shutdown.cancelled() => {
                    rx.close();
                    while rx.recv_many(&mut jobs, self.batch).await > 0 {
                        self.perform_with_retries(&mut jobs).await;
                    }
                    return;
                }
            };
            if n == 0 {
                return;
            }
            self.perform_with_retries(&mut jobs).await;
        }
    }

    async fn perform_with_retries(&self, jobs: &mut Vec<Job>) {
        let total = jobs.len() as u64;
        // Done or given up on, the whole batch is settled at the end.
        let settled = jobs.clone();
        let mut backoff = Duration::from_millis(50);
        let mut given_up = 0;
        for attempt in 1..=self.max_attempts {
            let failed = self.perform(jobs).await;
            if failed.is_empty() {
                break;
            }
            if attempt == self.max_attempts {
                tracing::error!(jobs = failed.len(), "jobs failed; giving up");
                given_up = failed.len() as u64;
                break;
            }
            // Only the failed jobs are tried again.
            let mut i = 0;
            jobs.retain(|_| {
                i += 1;
                failed.contains(&(i - 1))
            });
            self.metrics.job("retried", jobs.len() as u64);
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
        self.metrics.job("failed", given_up);
        self.metrics.job("done", total - given_up);
        self.settle(&settled).await;
        jobs.clear();
    }
}

/// POSTs every stored message to a configured URL (`queue.webhook_url`), for notifications.
/// Body: `{"type":"message.created","roomId","seq","messageId","createdAt"}`; any 2xx is success.
pub struct Webhook {
    pub url: String,
    pub client: reqwest::Client,
}

impl Webhook {
    pub fn new(url: String) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client with default TLS settings builds");
        Self { url, client }
    }

    async fn deliver(&self, job: &Job) -> Result<(), String> {
        let Job::MessageStored {
            room_id,
            seq,
            message_id,
            created_at,
            ..
        } = job
        else {
            return Ok(());
        };
        let body = serde_json::json!({
            "type": "message.created",
            "roomId": room_id,
            "seq": seq,
            "messageId": message_id,
            "createdAt": created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        });
        let response = self
            .client
            .post(&self.url)
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("webhook answered {}", response.status()))
        }
    }
}

impl From<OutboxEntry> for Job {
    fn from(e: OutboxEntry) -> Self {
        Job::MessageStored {
            room_id: e.room_id,
            seq: e.seq,
            message_id: e.message_id,
            created_at: e.created_at,
            outbox_id: Some(e.id),
        }
    }
}

/// Hands outbox rows to the job queue. Woken by each send (draining at most every `pace`), and
/// polls for rows left by others or whose lease ended.
pub struct OutboxRelay {
    pub store: Arc<dyn Store>,
    pub queue: Arc<dyn JobQueue>,
    pub metrics: Arc<Metrics>,
    /// Notified after every stored message, so side effects start at once.
    pub wake: Arc<Notify>,
    pub batch: u32,
    /// How often to look for rows nobody woke us for (left by a node that died).
    pub poll: Duration,
    /// How long handed-over rows stay ours before they are queued again (by any relay), unless
    /// the worker deleted them first: `queue.redeliver_after_ms`.
    pub lease: Duration,
    /// Shortest time between two drains. Under load every stored message wakes the relay; pacing
    /// the drains makes each claim, ack and room touch cover many messages instead of a few. A
    /// wake after a quiet spell drains at once.
    pub pace: Duration,
}

impl OutboxRelay {
    /// Runs until `shutdown`, then relays what is in the outbox once more and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let drained = tokio::time::Instant::now();
            self.drain().await;
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(self.poll) => {}
                _ = shutdown.cancelled() => {
                    self.drain().await;
                    return;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(drained + self.pace) => {}
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
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            let (relayed, refused) = self
                .queue
                .enqueue_all(rows.into_iter().map(Job::from).collect())
                .await;
            if let Some(e) = refused {
                tracing::warn!(error = %e, "job queue refused; the rest waits in the outbox");
                // Claimed again at the next drain, not after the lease.
                if let Err(e) = self.store.outbox_lease(&ids[relayed..], None).await {
                    tracing::warn!(error = %e, "outbox rows not released; queued again after their lease");
                }
            }
            self.metrics.job("enqueued", relayed as u64);
            // A short claim emptied the outbox: asking again would cost a statement to learn
            // that. Rows stored since then woke us again (`wake` keeps the notification).
            if relayed < claimed || claimed < self.batch as usize {
                return;
            }
        }
    }
}
