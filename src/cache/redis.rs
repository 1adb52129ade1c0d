//! The history cache in Redis, shared by every node.
//!
//! Keys follow the seed: `{prefix}messages:{roomId}:{limit}:{before}` (`latest` without a cursor),
//! each page stored as `"{generation}\n{json}"` with a TTL of `cache.history_ttl_ms`. The room's
//! generation lives in `{prefix}messages:{roomId}:gen`; a send bumps it (INCR, one round trip,
//! before the send is acknowledged), which invalidates every page of the room on every node at
//! once without scanning keys. A page is served only if it carries the current generation, and
//! stored only if the generation has not moved since the miss (checked atomically in a script),
//! so a page read before a send can never be cached after it.
//!
//! When Redis fails, lookups count as misses (the store answers) and nothing is cached.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;

use super::{HistoryCache, Lookup, MissToken, PageKey};
use crate::redis_conn::RedisConn;

/// Generations are kept far longer than any page, so a page never outlives its generation key.
const GENERATION_TTL_MS: u64 = 24 * 3600 * 1000;

pub struct RedisHistoryCache {
    redis: RedisConn,
    ttl: Duration,
    put: Script,
}

impl RedisHistoryCache {
    pub fn new(redis: RedisConn, ttl: Duration) -> Self {
        let put = Script::new(
            r"local g = redis.call('GET', KEYS[1]) or '0'
              if g == ARGV[1] then
                redis.call('SET', KEYS[2], ARGV[1] .. '\n' .. ARGV[2], 'PX', ARGV[3])
              end
              return 0",
        );
        Self { redis, ttl, put }
    }

    fn generation_key(&self, room: &str) -> String {
        self.redis.key(&format!("messages:{room}:gen"))
    }
}

#[async_trait]
impl HistoryCache for RedisHistoryCache {
    async fn get(&self, key: PageKey) -> Lookup {
        let mut conn = self.redis.conn.clone();
        let keys = [
            self.generation_key(&key.room),
            self.redis.key(&key.seed_key()),
        ];
        let found: Result<(Option<u64>, Option<String>), _> = self
            .redis
            .bounded(redis::cmd("MGET").arg(&keys).query_async(&mut conn))
            .await;
        match found {
            Ok((generation, page)) => {
                let generation = generation.unwrap_or(0);
                if let Some((stored, json)) = page.as_deref().and_then(|p| p.split_once('\n'))
                    && stored.parse::<u64>() == Ok(generation)
                {
                    return Lookup::Hit(Arc::from(json));
                }
                Lookup::Miss(MissToken { key, generation })
            }
            Err(e) => {
                tracing::warn!(error = %e, "history cache unavailable; reading the store");
                // A generation no room has: `put` will not store under it.
                Lookup::Miss(MissToken {
                    key,
                    generation: u64::MAX,
                })
            }
        }
    }

    async fn put(&self, token: MissToken, page: Arc<str>) {
        if token.generation == u64::MAX {
            return;
        }
        let mut conn = self.redis.conn.clone();
        let mut invocation = self.put.key(self.generation_key(&token.key.room));
        invocation
            .key(self.redis.key(&token.key.seed_key()))
            .arg(token.generation)
            .arg(&*page)
            .arg(self.ttl.as_millis() as u64);
        let result: Result<i64, _> = self.redis.bounded(invocation.invoke_async(&mut conn)).await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "history cache write failed");
        }
    }

    async fn invalidate_room(&self, room: &str) {
        let mut conn = self.redis.conn.clone();
        let key = self.generation_key(room);
        let mut pipe = redis::pipe();
        pipe.cmd("INCR")
            .arg(&key)
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(GENERATION_TTL_MS);
        let result: Result<(i64, i64), _> = self.redis.bounded(pipe.query_async(&mut conn)).await;
        if let Err(e) = result {
            // Pages of this room may be served for up to the TTL; nothing better is possible
            // while Redis is unreachable, and the message itself is already stored.
            tracing::warn!(room, error = %e, "history cache invalidation failed");
        }
    }
}
