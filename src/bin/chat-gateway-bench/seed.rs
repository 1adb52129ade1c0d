//! `seed`: the k6 HTTP scenario (k6/chat-load-test.js). Each user loops: GET the latest history
//! page, POST a message, pause.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::Common;
use crate::gateway::{Gateway, Observer};
use crate::report::{Counters, Shared, Stats, line, print_errors, record};

pub(crate) async fn seed(
    gw: Arc<Gateway>,
    common: &Common,
    users: usize,
    rooms: usize,
    think_ms: u64,
    limit: u32,
) -> anyhow::Result<u64> {
    let rooms = rooms.clamp(1, users.max(1));
    println!(
        "scenario               seed: {users} users over {rooms} rooms, GET history + POST send, {think_ms} ms pause, {}s",
        common.duration
    );
    let room_names: Vec<String> = (0..rooms).map(|r| gw.room_id(r)).collect();
    let members: Vec<(String, Vec<String>)> = (0..rooms)
        .map(|r| {
            let m = (0..users)
                .filter(|u| u % rooms == r)
                .map(|u| gw.user_id(u))
                .collect();
            (room_names[r].clone(), m)
        })
        .collect();
    gw.setup(&members).await?;
    let shared: Shared = Arc::new((Mutex::new(Stats::new()), Counters::default()));
    let observer = Observer::start(&gw, common).await;
    let deadline = Instant::now() + Duration::from_secs(common.duration);
    let iterations = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for u in 0..users {
        let gw = gw.clone();
        let shared = shared.clone();
        let iterations = iterations.clone();
        let url = format!(
            "{}/api/chat/rooms/{}/messages",
            gw.base,
            room_names[u % rooms]
        );
        let token = gw.token(&gw.user_id(u));
        // Spread the users' first iterations over one pause, as a ramp would.
        let offset = Duration::from_millis(think_ms * u as u64 / users.max(1) as u64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut n = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = gw
                    .http
                    .get(format!("{url}?limit={limit}"))
                    .bearer_auth(&token)
                    .send()
                    .await;
                let ok = match r {
                    Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                    Ok(r) => {
                        shared
                            .0
                            .lock()
                            .unwrap()
                            .error(format!("history HTTP {}", r.status()));
                        false
                    }
                    Err(e) => {
                        shared.0.lock().unwrap().error(format!("history: {e}"));
                        false
                    }
                };
                if ok {
                    record(&mut shared.0.lock().unwrap().http_history, t.elapsed());
                }
                let t = Instant::now();
                let body =
                    json!({"content": format!("load {u}/{n}"), "clientMsgId": format!("s{u}-{n}")});
                let r = gw
                    .http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await;
                shared.1.sent.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok(r) if r.status() == 201 => {
                        let _ = r.bytes().await;
                        let mut s = shared.0.lock().unwrap();
                        record(&mut s.http_send, t.elapsed());
                        *s.acked.entry(0).or_default() += 1;
                    }
                    Ok(r) => shared
                        .0
                        .lock()
                        .unwrap()
                        .error(format!("send HTTP {}", r.status())),
                    Err(e) => shared.0.lock().unwrap().error(format!("send: {e}")),
                }
                n += 1;
                iterations.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(think_ms)).await;
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let secs = observer.started.elapsed().as_secs_f64();
    observer.finish(&gw).await;
    let stats = shared.0.lock().unwrap();
    let its = iterations.load(Ordering::Relaxed);
    let requests = its * 2;
    println!(
        "iterations             {its} ({:.0}/s, {:.0} requests/s)",
        its as f64 / secs,
        requests as f64 / secs
    );
    line("GET history", &stats.http_history);
    line("POST send", &stats.http_send);
    let errors = print_errors(&stats);
    println!(
        "error rate             {:.3}%",
        100.0 * errors as f64 / requests.max(1) as f64
    );
    Ok(errors)
}
