//! What both sides of the storm (members, probes) measure against and add to: the run's phases,
//! the counters the drain waits on, and the send time a probe message carries.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// The storm's phases, by the time a message was sent (or a push received).
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Phase {
    /// Connecting, and the presence pushes of the first joins settling: not measured.
    Warmup,
    Baseline,
    Storm,
    After,
}

pub(super) const PHASES: [Phase; 3] = [Phase::Baseline, Phase::Storm, Phase::After];

impl Phase {
    pub(super) fn label(self) -> &'static str {
        match self {
            Phase::Warmup => "warmup",
            Phase::Baseline => "baseline",
            Phase::Storm => "storm",
            Phase::After => "after",
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// Phase boundaries in microseconds since the run's epoch (`u64::MAX` until reached): the start
/// of the measured load, the moment the clients dropped their sockets, and the moment the last of
/// them was back in its room.
pub(super) struct Phases {
    pub(super) started: AtomicU64,
    pub(super) dropped: AtomicU64,
    pub(super) back: AtomicU64,
}

impl Phases {
    pub(super) fn new() -> Self {
        Self {
            started: AtomicU64::new(u64::MAX),
            dropped: AtomicU64::new(u64::MAX),
            back: AtomicU64::new(u64::MAX),
        }
    }

    pub(super) fn of(&self, t: u64) -> Phase {
        if t < self.started.load(Ordering::Relaxed) {
            Phase::Warmup
        } else if t < self.dropped.load(Ordering::Relaxed) {
            Phase::Baseline
        } else if t <= self.back.load(Ordering::Relaxed) {
            Phase::Storm
        } else {
            Phase::After
        }
    }
}

pub(super) fn micros_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

/// Counters both sides of the generator (members, probes) add to while the run goes on, so the
/// drain knows when every acknowledged message reached every socket of its room.
pub(super) struct StormCounters {
    /// Messages acknowledged, per room.
    pub(super) acked: Vec<AtomicU64>,
    /// New messages received by any socket (members and probes).
    pub(super) delivered: AtomicU64,
    pub(super) requests: AtomicU64,
    pub(super) replies: AtomicU64,
    /// Clients back in their room after the drop.
    pub(super) back: AtomicUsize,
    /// Answers to the final presence requests.
    pub(super) presence_answers: AtomicUsize,
}

/// One delivery: when the message was sent and how long it took, in microseconds.
pub(super) type Sample = (u64, u64);

/// The send time and sender carried in a probe message's content (`t=<us> p=<probe> n=<k>`).
pub(super) fn probe_stamp(content: &str) -> Option<(u64, usize)> {
    let mut parts = content.split(' ');
    let t = parts.next()?.strip_prefix("t=")?.parse().ok()?;
    let p = parts.next()?.strip_prefix("p=")?.parse().ok()?;
    Some((t, p))
}
