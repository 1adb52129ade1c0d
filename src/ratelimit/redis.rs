//! Send rate limits held in Redis, so they apply to the cluster as a whole: a user with sockets on
//! two nodes, or sending over REST to a third, gets one budget. On one Redis both buckets (user,
//! room) are checked and spent in one script call: one round trip per send, atomic, timed by
//! Redis' own clock (so nodes' clocks do not matter). On a Redis Cluster the two buckets live on
//! the shards of `{userId}` and `{roomId}`: the user's is spent first, and the room's only when
//! the user's allowed the send (two round trips), so a refused sender never drains a room's
//! budget. The algorithm is GCRA, the same as the in-process limiter.
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
    reaction: (u64, u32),
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
              for i = 1, #KEYS do
                local wait = spend(KEYS[i], tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i]))
                if wait > 0 then return {i, wait} end
              end
              return {0, 0}",
        );
        let interval = |per_second: u32| 1_000_000 / u64::from(per_second.max(1));
        Self {
            redis,
            script,
            user: (interval(settings.user_per_second), settings.user_burst),
            room: (interval(settings.room_per_second), settings.room_burst),
            reaction: (
                interval(settings.reaction_per_second),
                settings.reaction_burst,
            ),
        }
    }
}

impl RedisRateLimiter {
    /// Spends one send from each bucket in turn (key, (interval, burst)); `(i, wait)` names the
    /// first (1-based) that refused, `(0, 0)` when all allowed.
    async fn spend(&self, buckets: &[(&str, (u64, u32))]) -> redis::RedisResult<(i64, i64)> {
        let mut conn = self.redis.conn.clone();
        let mut invocation = self.script.prepare_invoke();
        for (key, (interval, burst)) in buckets {
            invocation.key(*key).arg(*interval).arg(*burst);
        }
        self.redis.bounded(invocation.invoke_async(&mut conn)).await
    }
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn check_send(&self, user: &str, room: &str) -> Result<(), Refused> {
        let user_key = self
            .redis
            .key(&format!("chat:rl:user:{}", self.redis.tag(user)));
        let room_key = self
            .redis
            .key(&format!("chat:rl:room:{}", self.redis.tag(room)));
        let result = if self.redis.is_cluster() {
            match self.spend(&[(&user_key, self.user)]).await {
                Ok((0, _)) => self
                    .spend(&[(&room_key, self.room)])
                    .await
                    .map(|(which, wait)| (if which == 0 { 0 } else { 2 }, wait)),
                other => other,
            }
        } else {
            self.spend(&[(&user_key, self.user), (&room_key, self.room)])
                .await
        };
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

    async fn check_reaction(&self, user: &str) -> Result<(), Refused> {
        let key = self
            .redis
            .key(&format!("chat:rl:reaction:{}", self.redis.tag(user)));
        match self.spend(&[(&key, self.reaction)]).await {
            Ok((0, _)) => Ok(()),
            Ok((_, wait_us)) => Err(Refused {
                scope: Scope::Reaction,
                retry_after: Duration::from_micros(wait_us.max(1) as u64),
            }),
            Err(e) => {
                self.redis
                    .log_failure("rate limiter unavailable; allowing the reaction", &e);
                Ok(())
            }
        }
    }
}
