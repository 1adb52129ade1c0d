//! The durable job queue: a Redis stream with a consumer group.
//!
//! - `{prefix}chat:jobs`: the stream. Each entry: `job` (JSON) and `attempt`.
//! - Consumer group `workers`: each worker (in a gateway, or `chat-gateway worker`) reads with its
//!   own consumer name; an entry is acknowledged only after its job was performed.
//! - A worker that dies leaves its entries pending; after `STALE_MS` another worker claims them
//!   (XAUTOCLAIM). Delivery is at-least-once; jobs are idempotent.
//! - A failed job is re-scheduled in `{prefix}chat:jobs:retry` (a sorted set scored by due time,
//!   exponential backoff) and acknowledged in the same MULTI; due retries go back into the stream.
//! - After `queue.max_attempts` attempts a job is moved to `{prefix}chat:jobs:dead`, a stream you
//!   can inspect (`XRANGE chat:jobs:dead - +`) and replay by hand.
//! - Redis is not where side effects are kept safe: each job's outbox row stays in the store until
//!   the job is done (or dead-lettered), leased past its next attempt. When a worker finds the
//!   consumer group missing (a Redis that restarted empty, or a first start), it releases every
//!   outbox lease, so whatever the lost stream held is queued again at once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamInfoGroupsReply, StreamReadReply};
use tokio_util::sync::CancellationToken;

use super::{Job, JobQueue, QueueError, Worker};
use crate::metrics::Metrics;
use crate::redis_conn::RedisConn;

const GROUP: &str = "workers";
/// Entries pending this long belong to a worker presumed dead and are claimed by another.
const STALE_MS: u64 = 30_000;
/// The stream keeps about this many entries (acknowledged ones are trimmed first by age).
const MAX_LEN: u64 = 1_000_000;
/// How often a worker promotes due retries, claims dead workers' entries and reads the gauges.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

struct Keys {
    stream: String,
    retry: String,
    dead: String,
}

impl Keys {
    fn new(redis: &RedisConn) -> Self {
        // One hash tag on a cluster: the promote script and the retry MULTI touch them together.
        let jobs = redis.tag("chat:jobs");
        Self {
            stream: redis.key(&jobs),
            retry: redis.key(&format!("{jobs}:retry")),
            dead: redis.key(&format!("{jobs}:dead")),
        }
    }
}

pub struct RedisJobQueue {
    redis: RedisConn,
    stream: String,
}

impl RedisJobQueue {
    pub fn new(redis: RedisConn) -> Self {
        let stream = Keys::new(&redis).stream;
        Self { redis, stream }
    }
}

impl RedisJobQueue {
    fn xadd(&self, job: &Job) -> redis::Cmd {
        let json = serde_json::to_string(job).expect("jobs serialize");
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&self.stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(MAX_LEN)
            .arg("*")
            .arg("job")
            .arg(json)
            .arg("attempt")
            .arg(1);
        xadd
    }
}

#[async_trait]
impl JobQueue for RedisJobQueue {
    async fn enqueue(&self, job: Job) -> Result<(), QueueError> {
        let mut conn = self.redis.conn.clone();
        self.redis
            .bounded(self.xadd(&job).query_async::<String>(&mut conn))
            .await
            .map(|_| ())
            .map_err(|e| QueueError::Unavailable(e.to_string()))
    }

    /// One pipeline, one round trip. If it fails, none counts as queued: those that made it in
    /// are queued again with the rest (jobs are at-least-once and idempotent).
    async fn enqueue_all(&self, jobs: Vec<Job>) -> (usize, Option<QueueError>) {
        let mut pipe = redis::pipe();
        for job in &jobs {
            pipe.add_command(self.xadd(job)).ignore();
        }
        let mut conn = self.redis.conn.clone();
        match self.redis.bounded(pipe.query_async::<()>(&mut conn)).await {
            Ok(()) => (jobs.len(), None),
            Err(e) => (0, Some(QueueError::Unavailable(e.to_string()))),
        }
    }
}

/// Runs a worker on the Redis queue until `shutdown`.
pub async fn run_worker(
    worker: Worker,
    redis: RedisConn,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let keys = Keys::new(&redis);
    let consumer = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
    let promote = Script::new(
        r"local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 100)
          for _, member in ipairs(due) do
            local sep = string.find(member, '|', 1, true)
            redis.call('XADD', KEYS[1], '*', 'job', string.sub(member, sep + 1), 'attempt', string.sub(member, 1, sep - 1))
            redis.call('ZREM', KEYS[2], member)
          end
          return #due",
    );
    let mut conn = loop {
        match redis.dedicated().await {
            Ok(conn) => break conn,
            Err(e) => {
                tracing::warn!(error = %e, "job queue connection failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    };
    let mut backoff = Duration::from_millis(100);
    // The consumer group is made at start and again whenever a read finds it missing; the
    // retries, the stale entries of dead workers and the gauges are looked after once a second,
    // not on every read.
    let mut needs_group = true;
    let mut housekeeping = tokio::time::Instant::now();
    loop {
        let round = async {
            if needs_group {
                ensure_group(&worker, &keys, &mut conn).await?;
                needs_group = false;
            }
            let mut entries = Vec::new();
            if tokio::time::Instant::now() >= housekeeping {
                let now = chrono::Utc::now().timestamp_millis();
                let _: i64 = promote
                    .key(&keys.stream)
                    .key(&keys.retry)
                    .arg(now)
                    .invoke_async(&mut conn)
                    .await?;
                let stale: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                    .arg(&keys.stream)
                    .arg(GROUP)
                    .arg(&consumer)
                    .arg(STALE_MS)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(worker.batch)
                    .query_async(&mut conn)
                    .await?;
                entries = stale.claimed;
                let groups: StreamInfoGroupsReply = redis::cmd("XINFO")
                    .arg("GROUPS")
                    .arg(&keys.stream)
                    .query_async(&mut conn)
                    .await?;
                if let Some(group) = groups.groups.iter().find(|g| g.name == GROUP) {
                    metrics.queue_waiting.set(group.lag.unwrap_or(0) as i64);
                    metrics.queue_pending.set(group.pending as i64);
                }
                housekeeping = tokio::time::Instant::now() + HOUSEKEEPING;
            }
            if entries.is_empty() {
                let read: redis::RedisResult<Option<StreamReadReply>> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(&consumer)
                    .arg("COUNT")
                    .arg(worker.batch)
                    .arg("BLOCK")
                    .arg(500)
                    .arg("STREAMS")
                    .arg(&keys.stream)
                    .arg(">")
                    .query_async(&mut conn)
                    .await;
                let read = match read {
                    Err(e) if e.code() == Some("NOGROUP") => {
                        // The stream or its group is gone: Redis lost them.
                        needs_group = true;
                        return Ok(());
                    }
                    read => read?,
                };
                entries = read
                    .into_iter()
                    .flat_map(|r| r.keys)
                    .flat_map(|k| k.ids)
                    .collect();
            }
            if !entries.is_empty() {
                process(&worker, &keys, &mut conn, &metrics, entries).await?;
            }
            Ok::<(), redis::RedisError>(())
        };
        tokio::select! {
            result = round => match result {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, "job queue unavailable; retrying");
                    // After a failure the group may be gone too (Redis restarted).
                    needs_group = true;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Makes the consumer group (and the stream) unless they exist. A new group means the stream,
/// and with it every queued and retrying job, may have been lost (a Redis that restarted empty
/// or was flushed): their outbox rows are still there, and are queued again now rather than after
/// their lease.
async fn ensure_group(
    worker: &Worker,
    keys: &Keys,
    conn: &mut crate::redis_conn::Conn,
) -> redis::RedisResult<()> {
    let created: redis::RedisResult<String> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&keys.stream)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Ok(_) => match worker.store.outbox_release_all().await {
            Ok(0) => {}
            Ok(released) => tracing::warn!(
                released,
                "the job queue was found empty (Redis restarted or was flushed); \
                 queueing again every side effect not yet done"
            ),
            Err(e) => tracing::warn!(error = %e, "outbox leases not released"),
        },
        Err(e) if e.code() == Some("BUSYGROUP") => {}
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Performs a batch of entries and settles each: acknowledged when done, re-scheduled or
/// dead-lettered (and acknowledged, atomically) when it failed.
async fn process(
    worker: &Worker,
    keys: &Keys,
    conn: &mut crate::redis_conn::Conn,
    metrics: &Metrics,
    entries: Vec<StreamId>,
) -> redis::RedisResult<()> {
    let mut jobs = Vec::with_capacity(entries.len());
    let mut ids = Vec::with_capacity(entries.len());
    let mut attempts = Vec::with_capacity(entries.len());
    let mut pipe = redis::pipe();
    pipe.atomic();
    for entry in &entries {
        let job = entry
            .get::<String>("job")
            .and_then(|json| serde_json::from_str::<Job>(&json).ok());
        match job {
            Some(job) => {
                jobs.push(job);
                ids.push(entry.id.clone());
                attempts.push(entry.get::<u32>("attempt").unwrap_or(1));
            }
            None => {
                // Unreadable: keep it for a person to look at, out of the way.
                tracing::error!(id = %entry.id, "unreadable job moved to the dead-letter stream");
                pipe.cmd("XADD")
                    .arg(&keys.dead)
                    .arg("*")
                    .arg("entry")
                    .arg(&entry.id)
                    .ignore();
                pipe.cmd("XACK")
                    .arg(&keys.stream)
                    .arg(GROUP)
                    .arg(&entry.id)
                    .ignore();
            }
        }
    }
    let failed = worker.perform(&jobs).await;
    let now = chrono::Utc::now().timestamp_millis();
    // Outbox rows: deleted for jobs done or dead-lettered, leased past the retry for the others.
    let mut finished = Vec::with_capacity(jobs.len());
    let mut retrying = Vec::new();
    let mut longest_delay = 0;
    for (i, id) in ids.iter().enumerate() {
        if failed.contains(&i) {
            let attempt = attempts[i];
            let json = serde_json::to_string(&jobs[i]).expect("jobs serialize");
            if attempt >= worker.max_attempts {
                tracing::error!(attempt, job = %json, "job failed for the last time; dead-lettered");
                pipe.cmd("XADD")
                    .arg(&keys.dead)
                    .arg("*")
                    .arg("job")
                    .arg(&json)
                    .arg("attempt")
                    .arg(attempt)
                    .ignore();
                metrics.job("dead", 1);
                finished.push(&jobs[i]);
            } else {
                let delay = 500i64 << attempt.min(10);
                longest_delay = longest_delay.max(delay);
                retrying.push(&jobs[i]);
                pipe.cmd("ZADD")
                    .arg(&keys.retry)
                    .arg(now + delay)
                    .arg(format!("{}|{json}", attempt + 1))
                    .ignore();
                metrics.job("retried", 1);
            }
        } else {
            metrics.job("done", 1);
            finished.push(&jobs[i]);
        }
        pipe.cmd("XACK")
            .arg(&keys.stream)
            .arg(GROUP)
            .arg(id)
            .ignore();
    }
    worker.settle(finished).await;
    let retrying = super::outbox_ids(retrying);
    let lease = worker.redeliver_after + Duration::from_millis(longest_delay as u64);
    if let Err(e) = worker.store.outbox_lease(&retrying, Some(lease)).await {
        tracing::warn!(error = %e, "outbox leases of retried jobs not extended; they may run twice");
    }
    pipe.query_async::<()>(conn).await
}
