//! A latest-page request served from the in-process cache: the lookup a `history` request makes
//! before it would go to the store.
//!
//! 1,000 rooms, each with a cached tail filled as a miss fills it (`latest` -> `Latest::Miss` ->
//! `fill` with the room's 51 newest messages, `Tail::from_store`). Then:
//!
//! - `history_cache/hit`: `latest(room, 30)` returning `Latest::Hit`, the page already cut from
//!   the tail by an earlier read (a room read more often than it is written to).
//! - `history_cache/append_and_hit`: `append` of the room's next message (as every send does),
//!   then `latest(room, 30)`, which cuts the page from the new tail (a read after each send).

mod common;

use std::time::Duration;

use chat_gateway::cache::{HistoryCache, Latest, MemoryHistoryCache, Tail};
use chat_gateway::protocol::MessageJson;
use criterion::{Criterion, criterion_group, criterion_main};

/// Rooms with a cached tail.
const ROOMS: usize = 1_000;
/// Messages a tail keeps with the default `limits.history_max_limit` (50).
const TAIL_LEN: usize = 51;

fn history_cache(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    // Longer than the run, so no tail expires or is refreshed mid-measurement.
    let cache = MemoryHistoryCache::new(Duration::from_secs(600), 1 << 30, TAIL_LEN);
    let names: Vec<String> = (0..ROOMS).map(|room| format!("room-{room}")).collect();
    rt.block_on(async {
        for room in &names {
            // Newest first, as the store returns them.
            let rows: Vec<_> = (1..=TAIL_LEN as i64)
                .rev()
                .map(|seq| common::message(room, seq))
                .collect();
            let Latest::Miss(token) = cache.latest(room, 30).await else {
                panic!("an empty cache hit")
            };
            cache.fill(token, Tail::from_store(&rows, TAIL_LEN)).await;
        }
    });

    let mut i = 0;
    c.bench_function("history_cache/hit", |b| {
        b.to_async(&rt).iter(|| {
            i += 1;
            let room = &names[i % ROOMS];
            let cache = &cache;
            async move {
                match cache.latest(room, 30).await {
                    Latest::Hit { page, .. } => page,
                    Latest::Miss(_) => panic!("a cached page missed"),
                }
            }
        })
    });

    // One message's JSON, reused with each room's next seq (the cache reads only the seq).
    let json = chat_gateway::wire::message_json(&common::message("room-0", 1)).json;
    let mut next_seq = vec![TAIL_LEN as i64 + 1; ROOMS];
    let mut i = 0;
    c.bench_function("history_cache/append_and_hit", |b| {
        b.to_async(&rt).iter(|| {
            i += 1;
            let room = i % ROOMS;
            let message = MessageJson {
                seq: next_seq[room],
                json: json.clone(),
            };
            next_seq[room] += 1;
            let (cache, room) = (&cache, &names[room]);
            async move {
                cache.append(room, &message).await;
                match cache.latest(room, 30).await {
                    Latest::Hit { page, .. } => page,
                    Latest::Miss(_) => panic!("an appended tail missed"),
                }
            }
        })
    });
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = history_cache
}
criterion_main!(benches);
