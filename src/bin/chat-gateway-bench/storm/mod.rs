//! `storm`: the presence reconnect storm. Clients in rooms, plus probe sockets in every room that
//! stay connected and send to each other; after the baseline every client drops its socket at
//! once and reconnects at once, and the probes' message latency per phase is the measure.
//!
//! - This file: the run (setup, connect, baseline, drop, reconnect, drain) and its report.
//! - [`measure`]: the run's phases, the counters both sides add to, a probe message's stamp.
//! - [`member`]: one client that drops its socket and reconnects.
//! - [`probe`]: the probes and the server sampler, on a thread and runtime of their own.
//! - [`timeline`]: the storm step by step, its slow messages, CPU and RSS between two moments.

mod measure;
mod member;
mod probe;
mod timeline;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::Semaphore;

use self::measure::{PHASES, Phase, Phases, StormCounters, micros_since};
use self::member::MemberCtx;
use self::probe::{ProbeControl, Sampled, spawn_probes};
use self::timeline::{print_slow, print_timeline, usage_between};
use crate::Common;
use crate::client::{join_one, raise_nofile};
use crate::gateway::{Gateway, ProcSample, presence_backlog};
use crate::report::{Stats, histogram_of, line, print_errors};

/// What the storm scenario is asked to do (see `Scenario::Storm`).
pub(crate) struct StormOptions {
    pub(crate) clients: usize,
    pub(crate) room_size: usize,
    pub(crate) probes: usize,
    pub(crate) rate: f64,
    pub(crate) settle: u64,
    pub(crate) reconnect_concurrency: usize,
    pub(crate) storm_timeout: u64,
    pub(crate) slow_ms: Option<f64>,
}

pub(crate) async fn storm(
    gw: Arc<Gateway>,
    common: &Common,
    o: StormOptions,
) -> anyhow::Result<u64> {
    let limit = raise_nofile();
    let room_size = o.room_size.clamp(1, o.clients.max(1));
    let rooms = o.clients.div_ceil(room_size);
    let per_room = o.probes.max(2);
    let sockets = o.clients + rooms * per_room;
    println!(
        "scenario               storm: {} clients in rooms of {room_size} ({rooms} rooms) + {per_room} probes per room, {} msgs/s from the probes; baseline {}s, drop all, reconnect all ({} handshakes at once), {}s after",
        o.clients, o.rate, common.duration, o.reconnect_concurrency, o.settle
    );
    if (sockets as u64) + 64 > limit {
        bail!("{sockets} sockets need a higher open-file limit than {limit} (ulimit -n)");
    }
    let room_of = |u: usize| u / room_size;
    let room_names: Arc<Vec<String>> = Arc::new((0..rooms).map(|r| gw.room_id(r)).collect());
    let members: Vec<(String, Vec<String>)> = (0..rooms)
        .map(|r| {
            let mut m: Vec<String> = (r * room_size..((r + 1) * room_size).min(o.clients))
                .map(|u| gw.user_id(u))
                .collect();
            m.extend((r * per_room..(r + 1) * per_room).map(|p| gw.probe_id(p)));
            (room_names[r].clone(), m)
        })
        .collect();
    let sockets_in_room: Vec<u64> = members.iter().map(|(_, m)| m.len() as u64).collect();
    let t = Instant::now();
    gw.setup(&members).await?;
    println!(
        "setup                  {rooms} rooms, {sockets} members in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let phases = Arc::new(Phases::new());
    let counters = Arc::new(StormCounters {
        acked: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
        delivered: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        replies: AtomicU64::new(0),
        back: AtomicUsize::new(0),
        presence_answers: AtomicUsize::new(0),
    });
    let epoch = Instant::now();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel();
    let (check_tx, check_rx) = tokio::sync::oneshot::channel();
    let stop_sending = tokio_util::sync::CancellationToken::new();
    let t = Instant::now();
    let probe_thread = spawn_probes(
        gw.clone(),
        room_names.clone(),
        per_room,
        o.rate,
        common.connect_concurrency,
        ProbeControl {
            ready: ready_tx,
            go: go_rx,
            epoch,
            stop_sending: stop_sending.clone(),
            check: check_rx,
            phases: phases.clone(),
            counters: counters.clone(),
            server_pid: common.server_pid.first().copied(),
        },
    )?;
    ready_rx.await.context("probe thread")??;

    let gate = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let connects: Vec<_> = (0..o.clients)
        .map(|u| {
            let gw = gw.clone();
            let gate = gate.clone();
            let room = room_names[room_of(u)].clone();
            tokio::spawn(async move {
                let _permit = gate.acquire().await.expect("semaphore open");
                let token = gw.token(&gw.user_id(u));
                join_one(&gw, u, &token, &room, None).await
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(o.clients);
    for (u, h) in connects.into_iter().enumerate() {
        let (c, head, _) = h
            .await?
            .with_context(|| format!("client {u} of {}", o.clients))?;
        clients.push((c, head));
    }
    println!(
        "connected              {} clients + {} probes (auth + join) in {:.1}s",
        o.clients,
        rooms * per_room,
        t.elapsed().as_secs_f64()
    );
    let drop_all = tokio_util::sync::CancellationToken::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let reconnect_gate = Arc::new(Semaphore::new(o.reconnect_concurrency.max(1)));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(u, (c, head))| {
            let ctx = MemberCtx {
                gw: gw.clone(),
                n: u,
                user: gw.user_id(u),
                room: room_names[room_of(u)].clone(),
                epoch,
                phases: phases.clone(),
                counters: counters.clone(),
                drop: drop_all.clone(),
                stop: stop.clone(),
                gate: reconnect_gate.clone(),
                storm_timeout: Duration::from_secs(o.storm_timeout),
            };
            tokio::spawn(ctx.run(c, head))
        })
        .collect();
    // Let the presence of the first joins settle (pushes are at most one per room per second, and
    // the gateway's backlog of presence changes, where it tells, is empty).
    let quiet_from = Instant::now();
    while quiet_from.elapsed() < Duration::from_secs(30)
        && presence_backlog(&gw.http, &gw.base)
            .await
            .is_some_and(|b| b > 0.0)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Phase 1: everyone connected.
    phases.started.store(micros_since(epoch), Ordering::Relaxed);
    let _ = go_tx.send(());
    tokio::time::sleep(Duration::from_secs(common.duration)).await;
    // Phase 2: every client drops its socket at once and reconnects at once.
    phases.dropped.store(micros_since(epoch), Ordering::Relaxed);

    drop_all.cancel();
    let storm_until = Instant::now() + Duration::from_secs(o.storm_timeout);
    while counters.back.load(Ordering::Relaxed) < o.clients && Instant::now() < storm_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    phases.back.store(micros_since(epoch), Ordering::Relaxed);
    // Phase 3: the same load for a while after everyone is back.
    tokio::time::sleep(Duration::from_secs(o.settle)).await;
    let end = micros_since(epoch);
    stop_sending.cancel();

    // Drain: every send answered and every acknowledged message at every socket of its room.
    let expected = || {
        counters
            .acked
            .iter()
            .zip(&sockets_in_room)
            .map(|(a, n)| a.load(Ordering::Relaxed) * n)
            .sum::<u64>()
    };
    let drain_until = Instant::now() + Duration::from_millis(common.drain_ms);
    tokio::time::sleep(Duration::from_millis(50)).await;
    while Instant::now() < drain_until
        && (counters.replies.load(Ordering::Relaxed) < counters.requests.load(Ordering::Relaxed)
            || counters.delivered.load(Ordering::Relaxed) < expected())
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let unanswered = counters
        .requests
        .load(Ordering::Relaxed)
        .saturating_sub(counters.replies.load(Ordering::Relaxed));
    let _ = check_tx.send(());
    let probe_side = tokio::task::spawn_blocking(move || probe_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the probe thread panicked"))??;
    stop.cancel();
    let mut reports = Vec::with_capacity(tasks.len());
    for t in tasks {
        reports.push(t.await?);
    }

    // The report.
    let started = phases.started.load(Ordering::Relaxed);
    let dropped = phases.dropped.load(Ordering::Relaxed);
    let back_all = phases.back.load(Ordering::Relaxed);
    let secs = |us: u64| us as f64 / 1e6;
    let backs: Vec<u64> = reports.iter().filter_map(|r| r.back_at).collect();
    let not_back = o.clients - backs.len();
    let retries: u64 = reports.iter().map(|r| r.retries as u64).sum();
    if let (Some(first), Some(last)) = (backs.iter().min(), backs.iter().max()) {
        println!(
            "back                   {} of {} clients; first {:.2}s, last {:.2}s after the drop: reconnect time (first to last back) {:.2}s; {retries} failed attempts retried",
            backs.len(),
            o.clients,
            secs(first - dropped),
            secs(last - dropped),
            secs(last - first)
        );
    }
    println!(
        "phases                 baseline {:.1}s, storm {:.1}s (drop to last back), after {:.1}s",
        secs(dropped - started),
        secs(back_all.saturating_sub(dropped)),
        secs(end.saturating_sub(back_all))
    );
    let probe_samples = || probe_side.probes.iter().flat_map(|p| p.samples.iter());
    let mut p99 = [0u64; 4];
    for phase in PHASES {
        let h = histogram_of(
            probe_samples()
                .filter(|(t, _)| phases.of(*t) == phase)
                .map(|(_, l)| *l),
        );
        if !h.is_empty() {
            p99[phase.index()] = h.value_at_quantile(0.99);
        }
        line(&format!("probe latency {}", phase.label()), &h);
    }
    let (base_p99, storm_p99) = (p99[Phase::Baseline.index()], p99[Phase::Storm.index()]);
    let ratio = storm_p99 as f64 / base_p99.max(1) as f64;
    println!(
        "storm p99 / baseline   {:.2}x ({:.1} ms / {:.1} ms): requirement <= 2x {}",
        ratio,
        storm_p99 as f64 / 1000.0,
        base_p99 as f64 / 1000.0,
        if ratio <= 2.0 { "met" } else { "MISSED" }
    );
    let acks = || probe_side.probes.iter().flat_map(|p| p.acks.iter());
    for phase in PHASES {
        let h = histogram_of(
            acks()
                .filter(|(t, _)| phases.of(*t) == phase)
                .map(|(_, l)| *l),
        );
        line(&format!("send ack {}", phase.label()), &h);
    }
    for phase in PHASES {
        let h = histogram_of(
            reports
                .iter()
                .flat_map(|r| r.samples.iter())
                .filter(|(t, _)| phases.of(*t) == phase)
                .map(|(_, l)| *l),
        );
        line(&format!("client latency {}", phase.label()), &h);
    }
    println!("                       (clients: live, or replayed on resume after the reconnect)");

    print_timeline(&probe_side, &reports, dropped, back_all, end);
    if let Some(slow_ms) = o.slow_ms {
        print_slow(&probe_side, dropped, slow_ms);
    }

    let storm_secs = secs(end.saturating_sub(dropped)).max(1e-6);
    let probe_pushes: Vec<u32> = probe_side
        .probes
        .iter()
        .map(|p| p.presence[2] + p.presence[3])
        .collect();
    let client_pushes: Vec<u32> = reports
        .iter()
        .map(|r| r.presence[2] + r.presence[3])
        .collect();
    let mean = |v: &[u32]| v.iter().map(|x| *x as f64).sum::<f64>() / v.len().max(1) as f64;
    let max = |v: &[u32]| v.iter().copied().max().unwrap_or(0);
    println!(
        "presence pushes        from the drop to the end ({storm_secs:.1}s): per probe mean {:.1}, max {} ({:.2}/s); per client (after its reconnect) mean {:.1}, max {}; baseline per probe {:.1}",
        mean(&probe_pushes),
        max(&probe_pushes),
        mean(&probe_pushes) / storm_secs,
        mean(&client_pushes),
        max(&client_pushes),
        mean(
            &probe_side
                .probes
                .iter()
                .map(|p| p.presence[1])
                .collect::<Vec<_>>()
        )
    );
    // Presence must end where it started: everyone online in every room.
    let mut wrong_rooms = 0u64;
    let mut last_push = 0u64;
    for (probes, want) in probe_side.probes.chunks(per_room).zip(&sockets_in_room) {
        // The first probe of each room asked the room's presence at the end.
        if probes[0].final_online != Some(*want) {
            wrong_rooms += 1;
        }
        for p in probes {
            if let Some((at, _)) = p.last_presence {
                last_push = last_push.max(at);
            }
        }
    }
    println!(
        "presence settled       {} of {rooms} rooms report everyone online at the end; last presence push {:+.2}s from the last client back",
        rooms as u64 - wrong_rooms,
        (last_push as f64 - back_all as f64) / 1e6
    );
    let bounds = [(started, dropped), (dropped, back_all), (back_all, end)];
    let usage = |of: fn(&Sampled) -> Option<ProcSample>| {
        bounds
            .iter()
            .zip(PHASES)
            .map(
                |((from, to), phase)| match usage_between(&probe_side.samples, *from, *to, of) {
                    Some((cpu, rss)) => {
                        format!("{} {cpu:.0}% max rss {} MiB", phase.label(), rss / 1024)
                    }
                    None => format!("{} -", phase.label()),
                },
            )
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !common.server_pid.is_empty() {
        println!("server                 {}", usage(|s| s.server));
    }
    println!("generator              {}", usage(|s| s.generator));
    let backlog: Vec<String> = bounds
        .iter()
        .zip(PHASES)
        .map(|((from, to), phase)| {
            let max = probe_side
                .samples
                .iter()
                .filter(|s| s.t >= *from && s.t <= *to)
                .filter_map(|s| s.backlog)
                .fold(None, |m: Option<f64>, b| Some(m.map_or(b, |m| m.max(b))));
            match max {
                Some(b) => format!("{} max {b:.0}", phase.label()),
                None => format!("{} -", phase.label()),
            }
        })
        .collect();
    println!(
        "presence backlog       {} (chat_presence_backlog, sampled every 200 ms)",
        backlog.join(", ")
    );

    let acked: u64 = counters
        .acked
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .sum();
    let delivered = counters.delivered.load(Ordering::Relaxed);
    let expected = expected();
    let duplicates = reports.iter().map(|r| r.duplicates).sum::<u64>()
        + probe_side.probes.iter().map(|p| p.duplicates).sum::<u64>();
    let lost = expected.saturating_sub(delivered);
    println!(
        "sent                   {} ({} dropped: generator backlog); acknowledged {acked}",
        probe_side.issued, probe_side.overflow
    );
    println!("delivered              {delivered} of {expected} expected (clients and probes)");
    println!(
        "lost                   {lost} (acknowledged, not delivered to every socket of its room)"
    );
    println!("unanswered requests    {unanswered}");
    println!("duplicates             {duplicates}");
    let mut errors: HashMap<String, u64> = HashMap::new();
    for e in reports
        .iter()
        .flat_map(|r| r.errors.iter())
        .chain(probe_side.probes.iter().flat_map(|p| p.errors.iter()))
    {
        *errors.entry(e.clone()).or_default() += 1;
    }
    let stats = Stats {
        errors,
        ..Stats::new()
    };
    let errors = print_errors(&stats);
    Ok(errors
        + lost
        + duplicates
        + unanswered
        + probe_side.overflow
        + not_back as u64
        + wrong_rooms)
}
