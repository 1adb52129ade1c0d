//! `chat` and `fanout`: rooms of WebSocket members sending at a steady total rate, every member
//! receiving every message of its room. `chat` mirrors the k6 WebSocket scenario (k6/ws-chat.js):
//! every member sends. `fanout` is a few rooms with many receivers and one sender each.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Common;
use crate::client::{Client, Cmd, connect_all, start_clients};
use crate::gateway::{Gateway, Observer};
use crate::report::{Counters, Shared, Stats, line, paced, print_errors};

/// Rooms of WebSocket members with senders: `chat`, `fanout` and `changes` share it.
pub(crate) struct RoomLoad {
    /// (room index, sender user index) per send, round-robin.
    pub senders: Vec<(usize, usize)>,
    /// Sockets joined per room: deliveries expected per acknowledged message.
    pub members_per_room: Vec<u64>,
}

/// `chat`'s rooms: `users` users in rooms of `room_size` (the last one may be smaller). Returns
/// the room size used, the number of rooms, each user's room, and the load: round-robin over
/// rooms first, then over each room's members, so every room gets the same share of the rate and
/// every user acts.
pub(crate) fn chat_rooms(users: usize, room_size: usize) -> (usize, usize, Vec<usize>, RoomLoad) {
    let room_size = room_size.clamp(1, users.max(1));
    let rooms = users.div_ceil(room_size);
    let room_of: Vec<usize> = (0..users).map(|u| u / room_size).collect();
    let members_per_room = (0..rooms)
        .map(|r| room_of.iter().filter(|x| **x == r).count() as u64)
        .collect();
    let senders = (0..users)
        .map(|k| {
            let room = k % rooms;
            let first = room * room_size;
            let size = room_size.min(users - first);
            (room, first + (k / rooms) % size)
        })
        .collect();
    let load = RoomLoad {
        senders,
        members_per_room,
    };
    (room_size, rooms, room_of, load)
}

/// Creates the rooms and memberships through the management API and connects every user, joined
/// to its room. Returns the rooms' names and the clients, by user.
pub(crate) async fn set_up_rooms(
    gw: &Arc<Gateway>,
    common: &Common,
    users: usize,
    room_of: &[usize],
    rooms: usize,
) -> anyhow::Result<(Arc<Vec<String>>, Vec<Client>)> {
    let room_names: Arc<Vec<String>> = Arc::new((0..rooms).map(|r| gw.room_id(r)).collect());
    let members: Vec<(String, Vec<String>)> = (0..rooms)
        .map(|r| {
            let m = (0..users)
                .filter(|u| room_of[*u] == r)
                .map(|u| gw.user_id(u))
                .collect();
            (room_names[r].clone(), m)
        })
        .collect();
    let t = Instant::now();
    gw.setup(&members).await?;
    println!(
        "setup                  {rooms} rooms, {users} members in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let clients = connect_all(
        gw,
        users,
        &room_names,
        |u| vec![room_of[u]],
        |u| gw.user_id(u),
        common.connect_concurrency,
    )
    .await?;
    println!(
        "connected              {users} sockets (auth + join) in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    Ok((room_names, clients))
}

async fn run_rooms(
    gw: Arc<Gateway>,
    common: &Common,
    users: usize,
    room_of: Vec<usize>,
    rooms: usize,
    load: RoomLoad,
    rate: f64,
) -> anyhow::Result<u64> {
    let (room_names, clients) = set_up_rooms(&gw, common, users, &room_of, rooms).await?;
    let shared: Shared = Arc::new((Mutex::new(Stats::new()), Counters::default()));
    let epoch = Instant::now();
    let (txs, tasks) = start_clients(clients, &room_names, epoch, &shared, 1024, 30);
    let observer = Observer::start(&gw, common).await;
    let duration = Duration::from_secs(common.duration);
    let mut overflow = 0u64;
    let issued = paced(rate, duration, |k| {
        let (room, user) = load.senders[(k % load.senders.len() as u64) as usize];
        if txs[user].try_send(Cmd::Send { room }).is_err() {
            overflow += 1;
        }
    })
    .await;
    let load_secs = observer.started.elapsed().as_secs_f64();
    // Drain: until every acknowledged message reached every member, or the drain time is up.
    let drain_until = Instant::now() + Duration::from_millis(common.drain_ms);
    let expected = || {
        let s = shared.0.lock().unwrap();
        s.acked
            .iter()
            .map(|(room, n)| n * load.members_per_room[*room])
            .sum::<u64>()
    };
    while Instant::now() < drain_until {
        let c = &shared.1;
        // Every scheduled command taken up by its connection, every request answered, every
        // acknowledged message delivered to every member.
        let requests = c.requests.load(Ordering::Relaxed);
        if requests >= issued - overflow
            && c.replies.load(Ordering::Relaxed) >= requests
            && c.delivered.load(Ordering::Relaxed) >= expected()
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
    let stats = shared.0.lock().unwrap();
    let sent = c.sent.load(Ordering::Relaxed);
    let acked: u64 = stats.acked.values().sum();
    let delivered = c.delivered.load(Ordering::Relaxed);
    let expected = stats
        .acked
        .iter()
        .map(|(room, n)| n * load.members_per_room[*room])
        .sum::<u64>();
    println!(
        "sent                   {sent} ({:.0} msgs/s; {issued} scheduled, {overflow} dropped: generator backlog)",
        sent as f64 / load_secs
    );
    println!(
        "acknowledged           {acked} ({:.0} msgs/s)",
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
    println!("lost                   {lost} (acknowledged, not delivered to every member)");
    println!("unanswered sends       {unanswered}");
    println!("duplicates             {duplicates}");
    if delivered > 0 {
        println!(
            "message push size      {:.0} bytes on average (text; the frame header adds 4)",
            c.push_bytes.load(Ordering::Relaxed) as f64 / delivered as f64
        );
    }
    line("send ack latency", &stats.ack);
    line("delivery latency", &stats.delivery);
    let errors = print_errors(&stats);
    if let Some(cpu) = cpu
        && delivered > 0
    {
        println!(
            "server cpu per delivery {:.2} us (per message {:.1} us)",
            cpu * 1e6 / delivered as f64,
            cpu * 1e6 / acked.max(1) as f64
        );
    }
    Ok(errors + lost + unanswered + duplicates + overflow)
}

pub(crate) async fn chat(
    gw: Arc<Gateway>,
    common: &Common,
    users: usize,
    room_size: usize,
    rate: f64,
) -> anyhow::Result<u64> {
    let (room_size, rooms, room_of, load) = chat_rooms(users, room_size);
    println!(
        "scenario               chat: {users} users, rooms of {room_size} ({rooms} rooms), {rate} msgs/s for {}s",
        common.duration
    );
    run_rooms(gw, common, users, room_of, rooms, load, rate).await
}

pub(crate) async fn fanout(
    gw: Arc<Gateway>,
    common: &Common,
    rooms: usize,
    receivers: usize,
    rate: f64,
) -> anyhow::Result<u64> {
    let rooms = rooms.max(1);
    // Per room: `receivers` receivers and one sender (who has joined too and receives its own).
    let per_room = receivers + 1;
    let users = rooms * per_room;
    let room_of: Vec<usize> = (0..users).map(|u| u / per_room).collect();
    let members_per_room = vec![per_room as u64; rooms];
    let senders = (0..rooms).map(|r| (r, r * per_room)).collect();
    println!(
        "scenario               fanout: {rooms} rooms x {receivers} receivers (+1 sender each), {rate} msgs/s for {}s",
        common.duration
    );
    let load = RoomLoad {
        senders,
        members_per_room,
    };
    run_rooms(gw, common, users, room_of, rooms, load, rate).await
}
