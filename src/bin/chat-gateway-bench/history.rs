//! `history`: history reads over WebSocket at a fixed rate, hot pages (the latest page of a few
//! rooms: cache hits) and cold pages (a random `before` in filled rooms: misses).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::Common;
use crate::client::{Client, Cmd, connect_all, start_clients};
use crate::gateway::{Gateway, Observer};
use crate::report::{Counters, Shared, Stats, line, paced, print_errors};

#[allow(clippy::too_many_arguments)]
pub(crate) async fn history(
    gw: Arc<Gateway>,
    common: &Common,
    hot_rooms: usize,
    cold_rooms: usize,
    fill: usize,
    rate: f64,
    cold_fraction: f64,
    sockets: usize,
    limit: u32,
) -> anyhow::Result<u64> {
    let hot_rooms = hot_rooms.max(1);
    let rooms = hot_rooms + cold_rooms;
    let sockets = sockets.max(1);
    println!(
        "scenario               history: {hot_rooms} hot rooms, {cold_rooms} cold rooms of {fill} messages, {rate} reads/s ({:.0}% cold), {sockets} sockets, limit {limit}",
        cold_fraction * 100.0
    );
    let room_names: Arc<Vec<String>> = Arc::new((0..rooms).map(|r| gw.room_id(r)).collect());
    let readers: Vec<String> = (0..sockets).map(|u| gw.user_id(u)).collect();
    let members: Vec<(String, Vec<String>)> = room_names
        .iter()
        .map(|r| (r.clone(), readers.clone()))
        .collect();
    gw.setup(&members).await?;
    // Fill every room (hot ones too, so their page is full) over one socket per room, pipelined.
    let t = Instant::now();
    let fills: Vec<anyhow::Result<()>> = futures::stream::iter(0..rooms)
        .map(|r| {
            let gw = gw.clone();
            let room = room_names[r].clone();
            let token = gw.token(&readers[r % sockets]);
            let n = if r < hot_rooms {
                (limit as usize).min(fill)
            } else {
                fill
            };
            async move { fill_room(&gw, r, &token, &room, n).await }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    fills.into_iter().collect::<anyhow::Result<()>>()?;
    println!(
        "filled                 {rooms} rooms in {:.1}s",
        t.elapsed().as_secs_f64()
    );

    let clients = connect_all(
        &gw,
        sockets,
        &room_names,
        |_| Vec::new(),
        |u| gw.user_id(u),
        common.connect_concurrency,
    )
    .await?;
    let shared: Shared = Arc::new((Mutex::new(Stats::new()), Counters::default()));
    let epoch = Instant::now();
    let (txs, tasks) = start_clients(clients, &room_names, epoch, &shared, 4096, limit);
    let observer = Observer::start(&gw, common).await;
    let mut overflow = 0u64;
    let mut rng_state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_random = move || {
        // xorshift64*: cheap, reproducible page choice.
        rng_state ^= rng_state >> 12;
        rng_state ^= rng_state << 25;
        rng_state ^= rng_state >> 27;
        rng_state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let cold_every = if cold_fraction > 0.0 && cold_rooms > 0 {
        (1.0 / cold_fraction.min(1.0)).round().max(1.0) as u64
    } else {
        0
    };
    let issued = paced(rate, Duration::from_secs(common.duration), |k| {
        let cmd = if cold_every > 0 && k % cold_every == 0 {
            let room = hot_rooms + (next_random() % cold_rooms as u64) as usize;
            let before = limit as u64
                + 1
                + next_random() % (fill as u64).saturating_sub(limit as u64).max(1);
            Cmd::History {
                room,
                before: Some(before as i64),
                cold: true,
            }
        } else {
            Cmd::History {
                room: (k % hot_rooms as u64) as usize,
                before: None,
                cold: false,
            }
        };
        if txs[(k % sockets as u64) as usize].try_send(cmd).is_err() {
            overflow += 1;
        }
    })
    .await;
    let load_secs = observer.started.elapsed().as_secs_f64();
    let drain_until = Instant::now() + Duration::from_millis(common.drain_ms);
    while Instant::now() < drain_until
        && (shared.1.requests.load(Ordering::Relaxed) < issued - overflow
            || shared.1.replies.load(Ordering::Relaxed) < shared.1.requests.load(Ordering::Relaxed))
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    observer.finish(&gw).await;
    for tx in &txs {
        let _ = tx.try_send(Cmd::Close);
    }
    drop(txs);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let stats = shared.0.lock().unwrap();
    let replies = shared.1.replies.load(Ordering::Relaxed);
    println!(
        "reads                  {replies} replies ({:.0}/s; {issued} scheduled, {overflow} dropped: generator backlog)",
        replies as f64 / load_secs
    );
    line("hot page latency", &stats.hot);
    line("cold page latency", &stats.cold);
    let errors = print_errors(&stats);
    Ok(errors
        + overflow
        + shared
            .1
            .requests
            .load(Ordering::Relaxed)
            .saturating_sub(replies))
}

/// Writes `n` messages into `room` over one socket, pipelined in windows of 64.
async fn fill_room(
    gw: &Gateway,
    k: usize,
    token: &str,
    room: &str,
    n: usize,
) -> anyhow::Result<()> {
    let mut c = Client::connect(gw, k, token, &[]).await?;
    let mut sent = 0usize;
    while sent < n {
        let window = (n - sent).min(64);
        let first = c.next_id;
        for i in 0..window {
            let id = c.next_id;
            c.next_id += 1;
            let f = json!({"type": "send", "id": id, "room": room,
                           "content": format!("fill {}", sent + i), "clientMsgId": format!("fill-{}", sent + i)});
            c.ws.feed(Message::text(f.to_string())).await?;
        }
        c.ws.flush().await?;
        let mut got = 0usize;
        while got < window {
            let msg = tokio::time::timeout(Duration::from_secs(30), c.ws.next())
                .await
                .context("fill: no reply within 30 s")?
                .context("fill: socket closed")??;
            let Message::Text(text) = msg else { continue };
            let v: serde_json::Value = serde_json::from_str(&text)?;
            if v["type"] == "error" {
                bail!("fill {room}: {}", v["error"]);
            }
            if v["type"] == "result" && v["id"].as_u64().is_some_and(|id| id >= first) {
                got += 1;
            }
        }
        sent += window;
    }
    let _ = c.ws.close(None).await;
    Ok(())
}
