//! Send rate limits held in Redis, so they apply to the cluster as a whole: a user with sockets on
//! two nodes, or sending over REST to a third, gets one budget. Both buckets (user, room) are
//! checked and spent in one script call: one round trip per send, atomic, timed by Redis' own
//! clock (so nodes' clocks do not matter). The algorithm is GCRA, the same as the in-process limiter.
//!
//! When Redis is unreachable sends are allowed (and a warning is logged): refusing every send
//! because the limiter is down would turn a Redis outage into a chat outage.

use std::time::Duration;

use async_trait::async_trait;
use redis::Script;

use super::{RateLimiter, Refused, Scope};
use crate::config::RateLimitSettings;
use crate::redis_conn::RedisConn;

pub struct RedisRateLimiter {
    redis: RedisConn,
    script: Script,
    /// Emission interval (µs) and burst, per scope.
    user: (u64, u32),
    room: (u64, u32),
}

impl RedisRateLimiter {
    pub fn new(redis: RedisConn, settings: &RateLimitSettings) -> Self {
        let script = Script::new(
            r"local t = redis.call('TIME')
              local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
              local function spend(key, interval, burst)
                local tat = tonumber(redis.call('GET', key) or '0')
                if tat < now then tat = now end
                local tolerance = interval * (burst - 1)
                if tat - now > tolerance then
                  return tat - tolerance - now
                end
                local next_tat = tat + interval
                redis.call('SET', key, string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1000)
                return 0
              end
              local wait = spend(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
              if wait > 0 then return {1, wait} end
              wait = spend(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
              if wait > 0 then return {2, wait} end
              return {0, 0}",
        );
        let interval = |per_second: u32| 1_000_000 / u64::from(per_second.max(1));
        Self {
            redis,
            script,
            user: (interval(settings.user_per_second), settings.user_burst),
            room: (interval(settings.room_per_second), settings.room_burst),
        }
    }
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn check_send(&self, user: &str, room: &str) -> Result<(), Refused> {
        let mut conn = self.redis.conn.clone();
        let mut invocation = self
            .script
            .key(self.redis.key(&format!("chat:rl:user:{user}")));
        invocation
            .key(self.redis.key(&format!("chat:rl:room:{room}")))
            .arg(self.user.0)
            .arg(self.user.1)
            .arg(self.room.0)
            .arg(self.room.1);
        let result: Result<(i64, i64), _> =
            self.redis.bounded(invocation.invoke_async(&mut conn)).await;
        match result {
            Ok((0, _)) => Ok(()),
            Ok((which, wait_us)) => Err(Refused {
                scope: if which == 1 { Scope::User } else { Scope::Room },
                retry_after: Duration::from_micros(wait_us.max(1) as u64),
            }),
            Err(e) => {
                self.redis
                    .log_failure("rate limiter unavailable; allowing the send", &e);
                Ok(())
            }
        }
    }
}
