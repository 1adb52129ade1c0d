//! The known health of one dependency (the store, a Redis connection). While it is known down,
//! callers fail at once instead of each waiting out a connect or command timeout, and one
//! background probe asks the dependency again, with backoff, until it answers.
//!
//! Hand-written rather than a circuit-breaker crate: what it needs is small (a flag, one probe
//! task, a counter), and the probe must be the dependency's own cheap check (PING, `SELECT 1`)
//! run on the runtime that owns the dependency's connections (see `crate::admission`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;

/// First wait between two probes; it doubles up to [`PROBE_MAX`].
const PROBE_FIRST: Duration = Duration::from_millis(50);
const PROBE_MAX: Duration = Duration::from_millis(1000);
/// A loss this soon after a recovery is the same outage: probed at [`PROBE_MAX`] from the start.
const FLAPPING: Duration = Duration::from_secs(5);

/// Asks the dependency whether it answers; must bound its own wait.
pub type Probe = Box<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

pub struct Health {
    /// For logs: "the store", "redis (commands)".
    name: &'static str,
    up: AtomicBool,
    probe: Probe,
    /// Where the probe runs: the runtime that opened the dependency's connections, whoever
    /// happened to see the failure.
    runtime: tokio::runtime::Handle,
    /// Times the dependency was found down (each ends with one recovery).
    lost: Counter,
    /// Runs after each recovery (set once, after construction: Redis asks the rooms to catch up
    /// with the store, since publishes were skipped while it was down).
    on_recovered: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// When it last came back: a dependency that fails again soon after (one shard of a Redis
    /// Cluster down while the others answer the probe) is probed at the slowest pace, so it
    /// cannot flap, and run `on_recovered`, ten times a second.
    recovered_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Health {
    /// Starts up; the probe runs only after a [`Health::trip`]. Must be called on the runtime
    /// that owns the dependency's connections.
    pub fn new(name: &'static str, lost: Counter, probe: Probe) -> Arc<Self> {
        Arc::new(Self {
            name,
            up: AtomicBool::new(true),
            probe,
            runtime: tokio::runtime::Handle::current(),
            lost,
            on_recovered: OnceLock::new(),
            recovered_at: std::sync::Mutex::new(None),
        })
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Sets what runs after each recovery (once; later calls are ignored).
    pub fn on_recovered(&self, f: impl Fn() + Send + Sync + 'static) {
        let _ = self.on_recovered.set(Box::new(f));
    }

    /// Marks the dependency down after a failure that says it cannot be reached, and starts the
    /// probe unless one runs already.
    pub fn trip(self: &Arc<Self>, why: &dyn std::fmt::Display) {
        if self
            .up
            .compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        self.lost.inc();
        tracing::warn!(dependency = self.name, error = %why, "unreachable; failing fast until it answers again");
        let health = self.clone();
        let flapping = self
            .recovered_at
            .lock()
            .unwrap()
            .is_some_and(|at| at.elapsed() < FLAPPING);
        self.runtime.spawn(async move {
            let mut wait = if flapping { PROBE_MAX } else { PROBE_FIRST };
            loop {
                tokio::time::sleep(wait).await;
                if (health.probe)().await {
                    break;
                }
                wait = (wait * 2).min(PROBE_MAX);
            }
            *health.recovered_at.lock().unwrap() = Some(std::time::Instant::now());
            health.up.store(true, Ordering::Release);
            tracing::info!(dependency = health.name, "reachable again");
            if let Some(f) = health.on_recovered.get() {
                f();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test(start_paused = true)]
    async fn down_until_the_probe_answers_then_up_once() {
        let answers = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(AtomicUsize::new(0));
        let recovered = Arc::new(AtomicUsize::new(0));
        let lost = Counter::default();
        let health = {
            let (answers, probes) = (answers.clone(), probes.clone());
            Health::new(
                "test",
                lost.clone(),
                Box::new(move || {
                    probes.fetch_add(1, Ordering::SeqCst);
                    let ok = answers.load(Ordering::SeqCst);
                    Box::pin(async move { ok })
                }),
            )
        };
        {
            let recovered = recovered.clone();
            health.on_recovered(move || {
                recovered.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert!(health.is_up());
        health.trip(&"refused");
        health.trip(&"refused again");
        assert!(!health.is_up());
        assert_eq!(lost.get(), 1, "one loss, however many failures saw it");
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!health.is_up());
        let probed = probes.load(Ordering::SeqCst);
        assert!((3..=8).contains(&probed), "backoff up to 1 s: {probed}");
        answers.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert!(health.is_up());
        assert_eq!(recovered.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            probes.load(Ordering::SeqCst),
            probed + 1,
            "no probing while up"
        );
    }
}
