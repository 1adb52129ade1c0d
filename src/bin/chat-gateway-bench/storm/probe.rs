//! The probes: sockets connected the whole run that send the measured messages and receive each
//! other's, with the server sampler, on a thread and runtime of their own.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;

use super::measure::{Phases, Sample, StormCounters, micros_since, probe_stamp};
use crate::client::{Client, Frame, Read, join_one, read_text};
use crate::gateway::{Gateway, ProcSample, presence_backlog, proc_sample};
use crate::report::paced;

/// Commands for a probe socket.
enum ProbeCmd {
    Send,
    /// Ask the room's presence (the final check).
    Presence,
    Close,
}

#[derive(Clone, Copy)]
enum ProbePending {
    Send { at: Instant, t: u64, wall_ms: i64 },
    Presence,
}

/// What one probe saw.
#[derive(Default)]
pub(super) struct ProbeReport {
    /// Deliveries of the other probes' messages.
    pub(super) samples: Vec<Sample>,
    /// Send acknowledgements: (sent, latency).
    pub(super) acks: Vec<Sample>,
    /// (sent, ms from send to the gateway's createdAt stamp, ms from that stamp to the ack).
    pub(super) split: Vec<(u64, i64, i64)>,
    pub(super) duplicates: u64,
    /// Presence pushes received, by the phase they arrived in.
    pub(super) presence: [u32; 4],
    /// The last presence push: when (us since the epoch) and the count it carried.
    pub(super) last_presence: Option<(u64, u64)>,
    /// The room's online count from the final presence request.
    pub(super) final_online: Option<u64>,
    pub(super) errors: Vec<String>,
}

/// One server-side sample: us since the epoch, CPU seconds and RSS (KiB) of the gateway and of
/// this generator, and the presence backlog from /metrics.
#[derive(Clone, Copy, Default)]
pub(super) struct Sampled {
    pub(super) t: u64,
    pub(super) server: Option<ProcSample>,
    pub(super) generator: Option<ProcSample>,
    pub(super) backlog: Option<f64>,
}

/// The probe side's results.
pub(super) struct ProbeSide {
    pub(super) probes: Vec<ProbeReport>,
    pub(super) samples: Vec<Sampled>,
    pub(super) issued: u64,
    pub(super) overflow: u64,
}

/// How the main thread steers the probe thread.
pub(super) struct ProbeControl {
    /// Answered once every probe is connected and joined.
    pub(super) ready: tokio::sync::oneshot::Sender<anyhow::Result<()>>,
    /// Start sending.
    pub(super) go: tokio::sync::oneshot::Receiver<()>,
    /// What every time in the run is measured from.
    pub(super) epoch: Instant,
    pub(super) stop_sending: tokio_util::sync::CancellationToken,
    /// Ask each room's presence, then close.
    pub(super) check: tokio::sync::oneshot::Receiver<()>,
    pub(super) phases: Arc<Phases>,
    pub(super) counters: Arc<StormCounters>,
    pub(super) server_pid: Option<u32>,
}

/// A probe: connected the whole run, sends its share of the messages, receives the others'.
#[allow(clippy::too_many_arguments)]
async fn probe_task(
    mut c: Client,
    me: usize,
    room: usize,
    room_name: String,
    epoch: Instant,
    mut cmds: mpsc::Receiver<ProbeCmd>,
    phases: Arc<Phases>,
    counters: Arc<StormCounters>,
) -> ProbeReport {
    let mut report = ProbeReport::default();
    let mut pending: HashMap<u64, ProbePending> = HashMap::new();
    let mut last_seq = 0i64;
    let mut counter = 0u64;
    loop {
        tokio::select! {
            cmd = cmds.recv() => {
                let id = c.next_id;
                c.next_id += 1;
                let frame = match cmd {
                    None | Some(ProbeCmd::Close) => break,
                    Some(ProbeCmd::Send) => {
                        counter += 1;
                        let at = Instant::now();
                        let t = at.duration_since(epoch).as_micros() as u64;
                        let wall_ms = chrono::Utc::now().timestamp_millis();
                        pending.insert(id, ProbePending::Send { at, t, wall_ms });
                        json!({"type": "send", "id": id, "room": room_name,
                               "content": format!("t={t} p={me} n={counter}"),
                               "clientMsgId": format!("p{me}-{counter}")})
                    }
                    Some(ProbeCmd::Presence) => {
                        pending.insert(id, ProbePending::Presence);
                        json!({"type": "presence", "id": id, "room": room_name, "limit": 1})
                    }
                };
                counters.requests.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = c.ws.send(Message::text(frame.to_string())).await {
                    report.errors.push(format!("socket write: {e}"));
                    break;
                }
            }
            msg = c.ws.next() => {
                let text = match read_text(msg) {
                    Read::Text(text) => text,
                    Read::Skip => continue,
                    Read::Ended(why) => {
                        report.errors.push(format!("probe {why}"));
                        break;
                    }
                };
                let now = Instant::now();
                let now_us = now.duration_since(epoch).as_micros() as u64;
                let Ok(frame) = serde_json::from_str::<Frame>(&text) else {
                    report.errors.push("unparsable frame".into());
                    continue;
                };
                match frame.kind {
                    "message" => {
                        let Some(m) = frame.message else { continue };
                        if m.seq <= last_seq {
                            report.duplicates += 1;
                            continue;
                        }
                        last_seq = m.seq;
                        counters.delivered.fetch_add(1, Ordering::Relaxed);
                        if let Some((t, sender)) = probe_stamp(&m.content)
                            && sender != me
                        {
                            report.samples.push((t, now_us.saturating_sub(t).max(1)));
                        }
                    }
                    "presence" => {
                        report.presence[phases.of(now_us).index()] += 1;
                        if let Some(online) = frame.online {
                            report.last_presence = Some((now_us, online));
                        }
                    }
                    "result" | "error" => {
                        counters.replies.fetch_add(1, Ordering::Relaxed);
                        let Some(p) = frame.id.and_then(|id| pending.remove(&id)) else {
                            continue;
                        };
                        if frame.kind == "error" {
                            let code = frame
                                .error
                                .as_ref()
                                .and_then(|e| e["code"].as_str())
                                .unwrap_or("?")
                                .to_string();
                            report.errors.push(format!("error reply: {code}"));
                            continue;
                        }
                        match p {
                            ProbePending::Send { at, t, wall_ms } => {
                                report.acks.push((t, (now - at).as_micros() as u64));
                                // Where the time went: until the gateway stamped the message
                                // (createdAt, ms), and from there to the ack.
                                let created = frame
                                    .result
                                    .and_then(|r| serde_json::from_str::<serde_json::Value>(r.get()).ok())
                                    .and_then(|r| r["message"]["createdAt"].as_str().and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok()))
                                    .map(|c| c.timestamp_millis());
                                if let Some(created) = created {
                                    let acked = chrono::Utc::now().timestamp_millis();
                                    report.split.push((t, created - wall_ms, acked - created));
                                }
                                counters.acked[room].fetch_add(1, Ordering::Relaxed);
                            }
                            ProbePending::Presence => {
                                counters.presence_answers.fetch_add(1, Ordering::Relaxed);
                                report.final_online = frame
                                    .result
                                    .and_then(|r| serde_json::from_str::<serde_json::Value>(r.get()).ok())
                                    .and_then(|r| r["online"].as_u64());
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    let _ = c.ws.close(None).await;
    report
}

/// Runs the probes (and the server sampler) on a thread and runtime of their own, so that the
/// storm's thousands of handshakes in the generator's main runtime do not delay their clocks.
pub(super) fn spawn_probes(
    gw: Arc<Gateway>,
    room_names: Arc<Vec<String>>,
    probes: usize,
    rate: f64,
    concurrency: usize,
    ctl: ProbeControl,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<ProbeSide>>> {
    let thread = std::thread::Builder::new()
        .name("probes".into())
        .spawn(move || {
            // The probes measure the gateway: their thread goes ahead of the generator's own
            // reconnect storm on this core (where allowed; an unprivileged run keeps the default).
            // SAFETY: setpriority on the calling thread's id has no memory effects.
            let raised = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -15) };
            if raised != 0 {
                eprintln!("probes: could not raise the probe thread's priority (nice -15); the generator's own churn may delay the probes");
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(run_probes(gw, room_names, probes, rate, concurrency, ctl))
        })?;
    Ok(thread)
}

async fn run_probes(
    gw: Arc<Gateway>,
    room_names: Arc<Vec<String>>,
    per_room: usize,
    rate: f64,
    concurrency: usize,
    ctl: ProbeControl,
) -> anyhow::Result<ProbeSide> {
    let rooms = room_names.len();
    let total = rooms * per_room;
    // Probe p is probe p % per_room of room p / per_room.
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let connects: Vec<_> = (0..total)
        .map(|p| {
            let gw = gw.clone();
            let gate = gate.clone();
            let room = room_names[p / per_room].clone();
            tokio::spawn(async move {
                let _permit = gate.acquire().await.expect("semaphore open");
                let token = gw.token(&gw.probe_id(p));
                join_one(&gw, p, &token, &room, None).await
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(total);
    for (p, h) in connects.into_iter().enumerate() {
        match h.await.context("probe task")? {
            Ok((c, _, _)) => clients.push(c),
            Err(e) => {
                let e = e.context(format!("probe {p} of {total}"));
                let _ = ctl.ready.send(Err(anyhow::anyhow!("{e:#}")));
                bail!("probes not connected");
            }
        }
    }
    let epoch = ctl.epoch;
    let mut txs = Vec::with_capacity(total);
    let mut tasks = Vec::with_capacity(total);
    for (p, c) in clients.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel(1024);
        txs.push(tx);
        let room = p / per_room;
        tasks.push(tokio::spawn(probe_task(
            c,
            p,
            room,
            room_names[room].clone(),
            epoch,
            rx,
            ctl.phases.clone(),
            ctl.counters.clone(),
        )));
    }
    let _ = ctl.ready.send(Ok(()));
    if ctl.go.await.is_err() {
        bail!("the run ended before it started");
    }

    // The sampler: gateway and generator CPU/RSS every 100 ms, the presence backlog every 200 ms.
    let samples = Arc::new(Mutex::new(Vec::<Sampled>::new()));
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let samples = samples.clone();
        let sampling = sampling.clone();
        let pid = ctl.server_pid;
        let base = gw.base.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let me = std::process::id();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut k = 0u64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = sampling.cancelled() => return,
                }
                let backlog = if k.is_multiple_of(2) {
                    presence_backlog(&http, &base).await
                } else {
                    None
                };
                k += 1;
                samples.lock().unwrap().push(Sampled {
                    t: micros_since(epoch),
                    server: pid.and_then(|p| proc_sample(p).ok()),
                    generator: proc_sample(me).ok(),
                    backlog,
                });
            }
        })
    };

    let mut overflow = 0u64;
    let mut issued = 0u64;
    {
        // Round-robin over rooms first, then over each room's probes.
        let send = paced(rate, Duration::from_secs(3600), |k| {
            issued = k + 1;
            let room = (k % rooms as u64) as usize;
            let j = ((k / rooms as u64) % per_room as u64) as usize;
            if txs[room * per_room + j].try_send(ProbeCmd::Send).is_err() {
                overflow += 1;
            }
        });
        tokio::select! {
            _ = send => {}
            _ = ctl.stop_sending.cancelled() => {}
        }
    }
    // Until the main thread has drained; then one presence request per room.
    let _ = ctl.check.await;
    for room in 0..rooms {
        let _ = txs[room * per_room].try_send(ProbeCmd::Presence);
    }
    let asked = Instant::now();
    while Instant::now() < asked + Duration::from_secs(10)
        && ctl.counters.presence_answers.load(Ordering::Relaxed) < rooms
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sampling.cancel();
    let _ = sampler.await;
    for tx in &txs {
        let _ = tx.try_send(ProbeCmd::Close);
    }
    drop(txs);
    let mut probes = Vec::with_capacity(total);
    for t in tasks {
        probes.push(t.await.context("probe task")?);
    }
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    Ok(ProbeSide {
        probes,
        samples,
        issued,
        overflow,
    })
}
