//! `changes`: the `chat` scenario's rooms (N users, one socket each, rooms of K members), where
//! the load is changes of messages instead of sends (protocol section 15). Each member first
//! sends one message (not measured); then, at a steady total rate, members edit their own message
//! (with a `clientChangeId`) or react to the room's newest messages, toggling three (message,
//! emoji) pairs each: added one time round, removed the next. Every member receives every change of its room as a `change` push; latency is from
//! the request to each push, as for messages. Mirrors k6/ws-changes.js.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::Common;
use crate::client::{Cmd, start_clients};
use crate::gateway::{Gateway, Observer};
use crate::report::{Counters, Shared, Stats, histogram_of, line, paced, print_errors};
use crate::rooms::{RoomLoad, chat_rooms, set_up_rooms};

/// How long the seed messages may take to be acknowledged and delivered.
const SEED_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) async fn changes(
    gw: Arc<Gateway>,
    common: &Common,
    users: usize,
    room_size: usize,
    rate: f64,
    edit_percent: u32,
) -> anyhow::Result<u64> {
    let edit_percent = u64::from(edit_percent.min(100));
    let (room_size, rooms, room_of, load) = chat_rooms(users, room_size);
    let RoomLoad {
        senders,
        members_per_room,
    } = load;
    println!(
        "scenario               changes: {users} users, rooms of {room_size} ({rooms} rooms), {rate} changes/s ({edit_percent} % edits, the rest reactions) for {}s",
        common.duration
    );
    let (room_names, clients) = set_up_rooms(&gw, common, users, &room_of, rooms).await?;

    let shared: Shared = Arc::new((Mutex::new(Stats::new()), Counters::default()));
    let epoch = Instant::now();
    let (txs, tasks) = start_clients(clients, &room_names, epoch, &shared, 1024, 30);
    let expected_deliveries = |acked: &HashMap<usize, u64>| {
        acked
            .iter()
            .map(|(room, n)| n * members_per_room[*room])
            .sum::<u64>()
    };

    // Seed: every member sends one message (its edits' target, and the room's reaction targets),
    // and every member receives all of them, before the measured phase.
    let t = Instant::now();
    for (u, tx) in txs.iter().enumerate() {
        tx.send(Cmd::Seed { room: room_of[u] }).await?;
    }
    let seeded = loop {
        let (acked, expected) = {
            let s = shared.0.lock().unwrap();
            (s.acked.values().sum::<u64>(), expected_deliveries(&s.acked))
        };
        if acked == users as u64 && shared.1.delivered.load(Ordering::Relaxed) >= expected {
            break true;
        }
        if t.elapsed() > SEED_TIMEOUT || !shared.0.lock().unwrap().errors.is_empty() {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if !seeded {
        let s = shared.0.lock().unwrap();
        print_errors(&s);
        bail!(
            "seeding failed: {} of {users} messages acknowledged",
            s.acked.values().sum::<u64>()
        );
    }
    println!(
        "seeded                 {users} messages in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    *shared.0.lock().unwrap() = Stats::new();
    shared.1.reset();

    let observer = Observer::start(&gw, common).await;
    let duration = Duration::from_secs(common.duration);
    let mut overflow = 0u64;
    let issued = paced(rate, duration, |k| {
        let (room, user) = senders[(k % senders.len() as u64) as usize];
        // Edits spread evenly over the issued changes: edit_percent of every 100.
        let edit = (k + 1) * edit_percent / 100 != k * edit_percent / 100;
        if txs[user].try_send(Cmd::Change { room, edit }).is_err() {
            overflow += 1;
        }
    })
    .await;
    let load_secs = observer.started.elapsed().as_secs_f64();
    let drain_until = Instant::now() + Duration::from_millis(common.drain_ms);
    while Instant::now() < drain_until {
        let c = &shared.1;
        let requests = c.requests.load(Ordering::Relaxed);
        let expected = expected_deliveries(&shared.0.lock().unwrap().acked);
        if requests >= issued - overflow
            && c.replies.load(Ordering::Relaxed) >= requests
            && c.delivered.load(Ordering::Relaxed) >= expected
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = observer.finish(&gw).await;
    for tx in &txs {
        let _ = tx.try_send(Cmd::Close);
    }
    drop(txs);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }

    let c = &shared.1;
    let mut stats = shared.0.lock().unwrap();
    let sent = c.sent.load(Ordering::Relaxed);
    let acked: u64 = stats.acked.values().sum();
    let delivered = c.delivered.load(Ordering::Relaxed);
    let expected = expected_deliveries(&stats.acked);
    let mut kinds: Vec<_> = stats.change_kinds.iter().collect();
    kinds.sort();
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
    println!(
        "sent                   {sent} changes ({:.0}/s; {issued} scheduled, {overflow} dropped: generator backlog): {}",
        sent as f64 / load_secs,
        kinds.join(", ")
    );
    println!(
        "acknowledged           {acked} changes stored ({:.0}/s)",
        acked as f64 / load_secs
    );
    println!(
        "delivered              {delivered} of {expected} expected ({:.0}/s)",
        delivered as f64 / load_secs
    );
    let lost = expected.saturating_sub(delivered);
    let unanswered = c
        .requests
        .load(Ordering::Relaxed)
        .saturating_sub(c.replies.load(Ordering::Relaxed));
    let duplicates = c.duplicates.load(Ordering::Relaxed);
    println!("lost                   {lost} (stored, not delivered to every member)");
    println!("unanswered changes     {unanswered}");
    println!("duplicates             {duplicates}");
    if delivered > 0 {
        println!(
            "change push size       {:.0} bytes on average (text; the frame header adds 4)",
            c.push_bytes.load(Ordering::Relaxed) as f64 / delivered as f64
        );
    }
    // Each push's latency: from its change's request (known from the sender's ack) to its arrival.
    let arrivals = std::mem::take(&mut stats.change_arrivals);
    let mut unmatched = 0u64;
    let delivery = histogram_of(arrivals.into_iter().filter_map(|(room, seq, at)| {
        let sent_at = stats.change_requests.get(&(room, seq));
        if sent_at.is_none() {
            unmatched += 1;
        }
        sent_at.map(|t| at.saturating_sub(*t))
    }));
    if unmatched > 0 {
        *stats
            .errors
            .entry("change push without an acknowledged request".into())
            .or_default() += unmatched;
    }
    line("change ack latency", &stats.ack);
    line("delivery latency", &delivery);
    let errors = print_errors(&stats);
    if let Some(cpu) = cpu
        && delivered > 0
    {
        println!(
            "server cpu per delivery {:.2} us (per change {:.1} us)",
            cpu * 1e6 / delivered as f64,
            cpu * 1e6 / acked.max(1) as f64
        );
    }
    Ok(errors + lost + unanswered + duplicates + overflow)
}
