//! A history request served from the in-process cache: the page lookup a `history` request makes
//! before it would go to the store.
//!
//! It calls only `MemoryHistoryCache::new(ttl, max_pages)`, `HistoryCache::invalidate_room`,
//! `get(PageKey)` -> `Lookup::Miss(token)` -> `put(token, page)` to fill, then measures
//! `get(PageKey)` -> `Lookup::Hit(page)` (the key built per request, as `ChatService::history`
//! builds it).

mod common;

use std::sync::Arc;
use std::time::Duration;

use chat_gateway::cache::{HistoryCache, Lookup, MemoryHistoryCache, PageKey};
use chat_gateway::protocol::{self, HistoryPage, WireMessage};
use criterion::{Criterion, criterion_group, criterion_main};

/// Rooms with a cached latest page.
const ROOMS: usize = 1_000;

fn history_cache(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    // Longer than the run, so no page expires mid-measurement (the default TTL is 3 s).
    let cache = MemoryHistoryCache::new(Duration::from_secs(600), 100_000);
    let key = |room: usize| PageKey {
        room: format!("room-{room}"),
        limit: 30,
        before: None,
    };
    rt.block_on(async {
        for room in 0..ROOMS {
            let key = key(room);
            // A room that has had sends has a generation of its own.
            cache.invalidate_room(&key.room).await;
            let rows: Vec<_> = (1..=30)
                .map(|seq| common::message(&key.room, seq))
                .collect();
            let page: Arc<str> = Arc::from(protocol::encode(&HistoryPage {
                room: &key.room,
                messages: rows.iter().map(WireMessage::from).collect(),
                next_before: None,
            }));
            let Lookup::Miss(token) = cache.get(key).await else {
                panic!("an empty cache hit")
            };
            cache.put(token, page).await;
        }
    });

    let names: Vec<String> = (0..ROOMS).map(|room| format!("room-{room}")).collect();
    let mut i = 0;
    c.bench_function("history_cache/hit", |b| {
        b.to_async(&rt).iter(|| {
            i += 1;
            let key = PageKey {
                room: names[i % ROOMS].clone(),
                limit: 30,
                before: None,
            };
            async {
                match cache.get(key).await {
                    Lookup::Hit(page) => page,
                    Lookup::Miss(_) => panic!("a cached page missed"),
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
