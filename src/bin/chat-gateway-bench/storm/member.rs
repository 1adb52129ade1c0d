//! A storm client: reads its room until the drop, drops its socket without a close frame,
//! reconnects with `since` (as the SDK does) and reads on until the end of the run.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::Semaphore;

use super::measure::{Phases, Sample, StormCounters, micros_since, probe_stamp};
use crate::client::{Client, Frame, Read, join_one, read_text};
use crate::gateway::Gateway;

/// What one storm client saw.
#[derive(Default)]
pub(super) struct MemberReport {
    /// Deliveries of probe messages (live, or replayed on resume after the reconnect).
    pub(super) samples: Vec<Sample>,
    delivered: u64,
    pub(super) duplicates: u64,
    /// Presence pushes received, by the phase they arrived in.
    pub(super) presence: [u32; 4],
    /// When the client was back in its room (join answered), us since the epoch.
    pub(super) back_at: Option<u64>,
    /// Reconnect attempts that failed (and were retried).
    pub(super) retries: u32,
    pub(super) errors: Vec<String>,
}

/// Everything a storm client needs besides its socket.
pub(super) struct MemberCtx {
    pub(super) gw: Arc<Gateway>,
    pub(super) n: usize,
    pub(super) user: String,
    pub(super) room: String,
    pub(super) epoch: Instant,
    pub(super) phases: Arc<Phases>,
    pub(super) counters: Arc<StormCounters>,
    /// Cancelled when every client drops its socket.
    pub(super) drop: tokio_util::sync::CancellationToken,
    /// Cancelled at the end of the run.
    pub(super) stop: tokio_util::sync::CancellationToken,
    /// Reconnect handshakes in flight.
    pub(super) gate: Arc<Semaphore>,
    /// Reconnects give up this long after the drop.
    pub(super) storm_timeout: Duration,
}

impl MemberCtx {
    /// Reads pushes until `until` completes (true) or the socket ends (false).
    async fn read(
        &self,
        c: &mut Client,
        last_seq: &mut i64,
        report: &mut MemberReport,
        until: impl std::future::Future<Output = ()>,
    ) -> bool {
        tokio::pin!(until);
        loop {
            let msg = tokio::select! {
                biased;
                _ = &mut until => return true,
                msg = c.ws.next() => msg,
            };
            let text = match read_text(msg) {
                Read::Text(text) => text,
                Read::Skip => continue,
                Read::Ended(why) => {
                    report.errors.push(why);
                    return false;
                }
            };
            let now = micros_since(self.epoch);
            let Ok(frame) = serde_json::from_str::<Frame>(&text) else {
                report.errors.push("unparsable frame".into());
                continue;
            };
            match frame.kind {
                "message" => {
                    let Some(m) = frame.message else { continue };
                    if m.seq <= *last_seq {
                        report.duplicates += 1;
                        continue;
                    }
                    *last_seq = m.seq;
                    report.delivered += 1;
                    self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                    if let Some((t, _)) = probe_stamp(&m.content) {
                        report.samples.push((t, now.saturating_sub(t).max(1)));
                    }
                }
                "presence" => report.presence[self.phases.of(now).index()] += 1,
                _ => {}
            }
        }
    }

    pub(super) async fn run(self, mut c: Client, mut last_seq: i64) -> MemberReport {
        let mut report = MemberReport::default();
        let token = self.gw.token(&self.user);
        if !self
            .read(&mut c, &mut last_seq, &mut report, self.drop.cancelled())
            .await
        {
            self.stop.cancelled().await;
            return report;
        }
        // Dropped without a close frame, as a network blip or a crashed tab would.
        drop(c);
        let give_up = Instant::now() + self.storm_timeout;
        let mut c = loop {
            let permit = self.gate.acquire().await.expect("semaphore open");
            let joined = join_one(&self.gw, self.n, &token, &self.room, Some(last_seq)).await;
            drop(permit);
            match joined {
                Ok((c, _, reload)) => {
                    if reload {
                        report
                            .errors
                            .push("join asked for a reload: more missed than replayed".into());
                    }
                    break c;
                }
                Err(e) => {
                    report.retries += 1;
                    if Instant::now() > give_up {
                        report.errors.push(format!("not back: {e:#}"));
                        self.stop.cancelled().await;
                        return report;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        report.back_at = Some(micros_since(self.epoch));
        self.counters.back.fetch_add(1, Ordering::Relaxed);
        if self
            .read(&mut c, &mut last_seq, &mut report, self.stop.cancelled())
            .await
        {
            let _ = c.ws.close(None).await;
        }
        report
    }
}
