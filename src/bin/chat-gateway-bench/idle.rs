//! `idle`: many authenticated, idle sockets held open; the server's RSS per connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::Common;
use crate::client::{connect_all, raise_nofile};
use crate::gateway::{Gateway, proc_sample};

pub(crate) async fn idle(gw: Arc<Gateway>, common: &Common, sockets: usize) -> anyhow::Result<u64> {
    let limit = raise_nofile();
    println!(
        "scenario               idle: {sockets} authenticated sockets (open-file limit here {limit})"
    );
    if (sockets as u64) + 64 > limit {
        bail!("{sockets} sockets need a higher open-file limit than {limit} (ulimit -n)");
    }
    let before = common.server_pid.first().and_then(|p| proc_sample(*p).ok());
    let t = Instant::now();
    let no_rooms: Arc<Vec<String>> = Arc::new(Vec::new());
    let user = gw.user_id(0);
    // Authenticated sockets need distinct users past the per-user limit (10 per node).
    let clients = connect_all(
        &gw,
        sockets,
        &no_rooms,
        |_| Vec::new(),
        |u| format!("{user}-{u}"),
        common.connect_concurrency,
    )
    .await?;
    let connect_secs = t.elapsed().as_secs_f64();
    println!(
        "connected              {} sockets in {connect_secs:.1}s ({:.0}/s)",
        clients.len(),
        clients.len() as f64 / connect_secs
    );
    // Each socket gets a reader, so the server's heartbeat pings are answered and a close by the
    // server is counted.
    let closed = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let closed = closed.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        msg = c.ws.next() => match msg {
                            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                                closed.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            Some(Ok(_)) => {}
                        },
                    }
                }
                let _ = c.ws.close(None).await;
            })
        })
        .collect();
    // Let the server settle (allocator, timers), sample, then hold for the rest of the duration.
    tokio::time::sleep(Duration::from_secs(common.duration.min(5))).await;
    let during = common.server_pid.first().and_then(|p| proc_sample(*p).ok());
    tokio::time::sleep(Duration::from_secs(common.duration.saturating_sub(5))).await;
    let closed = closed.load(Ordering::Relaxed);
    let alive = sockets - closed;
    println!("still open             {alive} of {sockets}");
    if let (Some(b), Some(d)) = (before, during) {
        let per = (d.rss_kib.saturating_sub(b.rss_kib)) as f64 * 1024.0 / sockets as f64;
        println!(
            "server rss             {} KiB before, {} KiB with the sockets: {:.2} KiB per connection ({per:.0} bytes)",
            b.rss_kib,
            d.rss_kib,
            per / 1024.0
        );
    }
    stop.cancel();
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }
    println!("errors                 {closed}");
    Ok(closed as u64)
}
