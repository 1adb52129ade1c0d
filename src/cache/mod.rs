//! The history cache: serialized history pages, reused for `cache.history_ttl_ms` and dropped when
//! their room gets a new message.
//!
//! Correctness under races: each room has a *generation*, bumped by every send before its ack.
//! A lookup returns the generation it saw; a page read from the store after a miss is stored under
//! that generation. A send that commits while the page is being read bumps the generation, so the
//! (possibly older) page lands under a generation nobody reads any more. No reader is ever served a
//! page older than a message already acknowledged, and invalidation is O(1) (no key scans).

pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use moka::sync::Cache;

/// Which page: the seed's key is `messages:{roomId}:{limit}:{before}` ("latest" with no cursor).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PageKey {
    pub room: String,
    pub limit: u32,
    pub before: Option<i64>,
}

impl PageKey {
    /// The seed's key text (used by the Redis implementation and in logs).
    pub fn seed_key(&self) -> String {
        match self.before {
            Some(b) => format!("messages:{}:{}:{}", self.room, self.limit, b),
            None => format!("messages:{}:{}:latest", self.room, self.limit),
        }
    }
}

/// The outcome of a lookup. A miss carries what `put` needs to store the page safely.
pub enum Lookup {
    Hit(Arc<str>),
    Miss(MissToken),
}

/// The generation a miss was observed at.
pub struct MissToken {
    key: PageKey,
    generation: u64,
}

#[async_trait]
pub trait HistoryCache: Send + Sync + 'static {
    async fn get(&self, key: PageKey) -> Lookup;
    async fn put(&self, token: MissToken, page: Arc<str>);
    /// Drops every cached page of the room. Called by each send before it is acknowledged.
    async fn invalidate_room(&self, room: &str);
}

/// In-process cache: bounded by `cache.max_pages`, entries expire after the TTL.
pub struct MemoryHistoryCache {
    pages: Cache<(PageKey, u64), Arc<str>>,
    /// Current generation per room. Grows by one entry per room ever written to on this node.
    generations: DashMap<String, u64>,
}

impl MemoryHistoryCache {
    pub fn new(ttl: Duration, max_pages: u64) -> Self {
        Self {
            pages: Cache::builder()
                .time_to_live(ttl)
                .max_capacity(max_pages)
                .build(),
            generations: DashMap::new(),
        }
    }

    fn generation(&self, room: &str) -> u64 {
        self.generations.get(room).map(|g| *g).unwrap_or(0)
    }
}

#[async_trait]
impl HistoryCache for MemoryHistoryCache {
    async fn get(&self, key: PageKey) -> Lookup {
        let generation = self.generation(&key.room);
        let cache_key = (key, generation);
        match self.pages.get(&cache_key) {
            Some(page) => Lookup::Hit(page),
            None => Lookup::Miss(MissToken {
                key: cache_key.0,
                generation,
            }),
        }
    }

    async fn put(&self, token: MissToken, page: Arc<str>) {
        if self.generation(&token.key.room) == token.generation {
            self.pages.insert((token.key, token.generation), page);
        }
    }

    async fn invalidate_room(&self, room: &str) {
        *self.generations.entry(room.to_string()).or_insert(0) += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> PageKey {
        PageKey {
            room: "r".into(),
            limit: 30,
            before: None,
        }
    }

    #[tokio::test]
    async fn a_send_during_a_miss_keeps_the_stale_page_out() {
        let cache = MemoryHistoryCache::new(Duration::from_secs(3), 100);
        let Lookup::Miss(token) = cache.get(key()).await else {
            panic!("empty cache hit")
        };
        cache.invalidate_room("r").await; // a message committed while the page was read
        cache.put(token, Arc::from("old page")).await;
        assert!(matches!(cache.get(key()).await, Lookup::Miss(_)));
        let Lookup::Miss(token) = cache.get(key()).await else {
            unreachable!()
        };
        cache.put(token, Arc::from("new page")).await;
        assert!(matches!(cache.get(key()).await, Lookup::Hit(p) if &*p == "new page"));
    }

    #[test]
    fn seed_key_format() {
        assert_eq!(key().seed_key(), "messages:r:30:latest");
        let k = PageKey {
            before: Some(90),
            ..key()
        };
        assert_eq!(k.seed_key(), "messages:r:30:90");
    }
}
