//! What the group writers share (SQLite's, and Postgres' send and change writers): the queue a
//! request waits in with where its answer goes, the pacing of batches under load, and how a
//! batch is answered.
//!
//! Every writer answers a batch the same way: callers that went away before it was taken are
//! skipped (nobody can be told, and a retry with the same key is stored once); the rest are
//! written at once; when that fails for want of the database every caller gets that failure
//! (retriable), and when it fails any other way (one request the database refuses, or a race
//! with another node) the batch is written again one request at a time, so only the request at
//! fault fails.

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, oneshot};

use super::StoreError;

/// A request waiting for a group writer, and where its answer goes.
pub(crate) struct Queued<Q, A> {
    pub req: Q,
    pub reply: oneshot::Sender<Result<A, StoreError>>,
}

/// Hands `req` to a writer's queue and waits for the answer. A full queue makes the caller
/// wait (back-pressure, not an error); a writer that is gone is `Unavailable`, saying `what`
/// stopped.
pub(crate) async fn ask<Q, A>(
    queue: &mpsc::Sender<Queued<Q, A>>,
    req: Q,
    what: &str,
) -> Result<A, StoreError> {
    let (reply, answer) = oneshot::channel();
    queue
        .send(Queued { req, reply })
        .await
        .map_err(|_| StoreError::Unavailable("the store is closed".into()))?;
    answer
        .await
        .map_err(|_| StoreError::Unavailable(format!("{what} stopped")))?
}

/// The pacing of a group writer: batches grow with the load, and a writer that keeps up waits
/// for nothing.
///
/// A writer is under load when its last batch took more than one request: they queued while it
/// was busy. Then the next batch starts no sooner than the interval (`database.write_interval_ms`)
/// after that one started, and takes everything that arrived meanwhile, so commits per request
/// fall as the load rises. A batch of one (a send after a quiet spell, or steady sends that each
/// find the writer free) ends the pacing: the next request is written as it comes. Requests that
/// come faster than one per interval keep the writer paced, whatever the commit's speed.
///
/// (Pacing every batch that started within the interval of the one before held moderate steady
/// traffic, each send finding the writer free, for most of the interval, for batches of one.)
#[derive(Default)]
pub(crate) struct Pacer {
    /// When the last batch started, if it took more than one request.
    loaded_since: Option<tokio::time::Instant>,
}

impl Pacer {
    /// Before a batch is taken: waits out the interval if the writer is under load.
    pub(crate) async fn wait(&self, interval: std::time::Duration) {
        if let Some(next) = self.loaded_since.map(|t| t + interval)
            && next > tokio::time::Instant::now()
        {
            tokio::time::sleep_until(next).await;
        }
    }

    /// A batch of `taken` requests starts now.
    pub(crate) fn started(&mut self, taken: usize) {
        self.loaded_since = (taken > 1).then(tokio::time::Instant::now);
    }

    /// For a writer of one queue: [`Pacer::wait`], then tops `batch` up (to `max` at most) with
    /// what arrived meanwhile, and the batch starts.
    pub(crate) async fn pace<T>(
        &mut self,
        interval: std::time::Duration,
        queued: &mut mpsc::Receiver<T>,
        batch: &mut Vec<T>,
        max: usize,
    ) {
        self.wait(interval).await;
        top_up(queued, batch, max);
        self.started(batch.len());
    }
}

/// Adds to `batch` what is waiting in `queued`, to `max` at most, without waiting.
pub(crate) fn top_up<T>(queued: &mut mpsc::Receiver<T>, batch: &mut Vec<T>, max: usize) {
    while batch.len() < max {
        match queued.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
}

/// A batch taken for one write: the requests whose callers still wait.
pub(crate) struct Batch<Q, A>(Vec<Queued<Q, A>>);

impl<Q, A> Batch<Q, A> {
    /// Takes what `queued` holds (emptying it), without the callers that went away; `None` when
    /// nobody is left. Observes the batch's size in `size`.
    pub fn take(queued: &mut Vec<Queued<Q, A>>, size: &Histogram) -> Option<Self> {
        queued.retain(|q| !q.reply.is_closed());
        if queued.is_empty() {
            return None;
        }
        size.observe(queued.len() as f64);
        Some(Self(std::mem::take(queued)))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The requests, in the order they were queued.
    pub fn requests(&self) -> Vec<&Q> {
        self.0.iter().map(|q| &q.req).collect()
    }

    /// Answers every caller from `written` (one answer per request, in order), or with the
    /// batch's failure when the database could not be reached. Any other failure sends the
    /// requests back, to be written one at a time (a request written alone may take a path the
    /// batch cannot, such as Postgres' change that waits for its message's lock).
    pub fn answer(
        self,
        written: Result<Vec<Result<A, StoreError>>, StoreError>,
        what: &'static str,
    ) -> Vec<Queued<Q, A>> {
        match written {
            Ok(answers) => {
                for (q, answer) in self.0.into_iter().zip(answers) {
                    let _ = q.reply.send(answer);
                }
                Vec::new()
            }
            Err(e) if retriable(&e) => {
                for q in self.0 {
                    let _ = q.reply.send(Err(e.clone()));
                }
                Vec::new()
            }
            Err(e) => {
                if self.0.len() > 1 {
                    tracing::warn!(error = %e, requests = self.0.len(), "a {what} batch failed; writing its requests one by one");
                }
                self.0
            }
        }
    }

    /// Every caller's request, to be written one at a time without an answer for the batch.
    pub fn into_requests(self) -> Vec<Queued<Q, A>> {
        self.0
    }
}

/// A failure for want of the database: the same for every request of a batch.
fn retriable(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable(_) | StoreError::Down)
}

#[cfg(test)]
mod pacer_tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::Pacer;

    const INTERVAL: Duration = Duration::from_millis(2);

    #[tokio::test(start_paused = true)]
    async fn a_writer_that_keeps_up_waits_for_nothing() {
        let mut pacer = Pacer::default();
        for _ in 0..5 {
            let before = Instant::now();
            pacer.wait(INTERVAL).await;
            assert_eq!(before.elapsed(), Duration::ZERO);
            pacer.started(1);
            // The next send comes well within the interval, and finds the writer free.
            tokio::time::advance(Duration::from_micros(500)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_batch_of_several_the_next_waits_out_the_interval_then_pacing_ends() {
        let mut pacer = Pacer::default();
        let first = Instant::now();
        pacer.started(3);
        tokio::time::advance(Duration::from_micros(500)).await;
        pacer.wait(INTERVAL).await;
        // (The timer's resolution is a millisecond.)
        let waited = first.elapsed();
        assert!(
            waited >= INTERVAL && waited <= INTERVAL + Duration::from_millis(1),
            "the batch after a batch of 3 started {waited:?} after it"
        );
        // That batch took one request: the load is gone, the next is written at once.
        pacer.started(1);
        let before = Instant::now();
        pacer.wait(INTERVAL).await;
        assert_eq!(before.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_started_longer_ago_than_the_interval_holds_nothing() {
        let mut pacer = Pacer::default();
        pacer.started(10);
        tokio::time::advance(INTERVAL * 2).await;
        let before = Instant::now();
        pacer.wait(INTERVAL).await;
        assert_eq!(before.elapsed(), Duration::ZERO);
    }
}
