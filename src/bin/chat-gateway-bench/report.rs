//! What the generator measures and how it reports it: the clients' `Stats` and `Counters`,
//! latency histograms in microseconds, the open-loop pacing of requests, and the report's latency
//! and error lines.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;

/// Everything the connections record, behind one lock (the generator runs on one thread, so the
/// lock is never contended; it is there because tokio tasks must be `Send`).
pub(crate) struct Stats {
    pub(crate) delivery: Histogram<u64>,
    pub(crate) ack: Histogram<u64>,
    pub(crate) hot: Histogram<u64>,
    pub(crate) cold: Histogram<u64>,
    pub(crate) http_history: Histogram<u64>,
    pub(crate) http_send: Histogram<u64>,
    /// Messages acknowledged per room (room index -> count); in the `changes` scenario, changes
    /// stored.
    pub(crate) acked: HashMap<usize, u64>,
    pub(crate) errors: HashMap<String, u64>,
    /// Changes requested, by kind (`edit`, `react`, `unreact`).
    pub(crate) change_kinds: HashMap<&'static str, u64>,
    /// Stored changes' request times (us since the run's epoch), by (room, change seq).
    pub(crate) change_requests: HashMap<(String, i64), u64>,
    /// `change` pushes received: (room, change seq, us since the run's epoch).
    pub(crate) change_arrivals: Vec<(String, i64, u64)>,
}

fn histogram() -> Histogram<u64> {
    // Microseconds, 1 us .. 60 s, 3 significant figures.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

impl Stats {
    pub(crate) fn new() -> Self {
        Self {
            delivery: histogram(),
            ack: histogram(),
            hot: histogram(),
            cold: histogram(),
            http_history: histogram(),
            http_send: histogram(),
            acked: HashMap::new(),
            errors: HashMap::new(),
            change_kinds: HashMap::new(),
            change_requests: HashMap::new(),
            change_arrivals: Vec::new(),
        }
    }

    pub(crate) fn error(&mut self, what: impl Into<String>) {
        *self.errors.entry(what.into()).or_default() += 1;
    }
}

pub(crate) fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

#[derive(Default)]
pub(crate) struct Counters {
    /// Pushes of new messages (and changes) received (seq above the last seen in that room on
    /// that socket).
    pub(crate) delivered: AtomicU64,
    /// Pushes at or below the last seq seen: duplicates (or reordering, which the contract
    /// forbids as much).
    pub(crate) duplicates: AtomicU64,
    pub(crate) sent: AtomicU64,
    /// Replies received for requests sent (results and errors).
    pub(crate) replies: AtomicU64,
    pub(crate) requests: AtomicU64,
    /// Bytes of the `message` pushes delivered (their text; the WebSocket frame header adds 2-4).
    pub(crate) push_bytes: AtomicU64,
}

impl Counters {
    /// Back to zero, between a scenario's preparation and its measured phase.
    pub(crate) fn reset(&self) {
        for c in [
            &self.delivered,
            &self.duplicates,
            &self.sent,
            &self.replies,
            &self.requests,
            &self.push_bytes,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

pub(crate) type Shared = Arc<(Mutex<Stats>, Counters)>;

pub(crate) fn histogram_of(samples: impl Iterator<Item = u64>) -> Histogram<u64> {
    let mut h = histogram();
    for v in samples {
        h.saturating_record(v.max(1));
    }
    h
}

/// Calls `f(k)` for k = 0, 1, 2, ... at `rate` per second for `duration` (ticks of 1 ms, each
/// issuing what is due, so high rates are exact on average and not limited by timer resolution).
pub(crate) async fn paced(rate: f64, duration: Duration, mut f: impl FnMut(u64)) -> u64 {
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut issued = 0u64;
    loop {
        tick.tick().await;
        let elapsed = start.elapsed().min(duration);
        let due = (elapsed.as_secs_f64() * rate) as u64;
        while issued < due {
            f(issued);
            issued += 1;
        }
        if elapsed >= duration {
            return issued;
        }
    }
}

pub(crate) fn line(name: &str, h: &Histogram<u64>) {
    if h.is_empty() {
        return;
    }
    let ms = |v: u64| v as f64 / 1000.0;
    println!(
        "{name:<22} n={:<9} p50={:.3}ms p95={:.3}ms p99={:.3}ms max={:.3}ms",
        h.len(),
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.95)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
    );
}

pub(crate) fn print_errors(stats: &Stats) -> u64 {
    let total: u64 = stats.errors.values().sum();
    println!("errors                 {total}");
    let mut errors: Vec<_> = stats.errors.iter().collect();
    errors.sort();
    for (what, n) in errors {
        println!("  {n:>8}  {what}");
    }
    total
}
