//! Send rate limits: per user (all of their sockets and REST together) and per room.
//!
//! The in-process limiter uses `governor`'s GCRA (a token bucket without a timer task), keyed by
//! user and by room. A send must pass both; the user bucket is checked first, so a send refused by
//! the room limit still spends one of the user's tokens (documented in proto-docs).

pub mod redis;

use std::num::NonZeroU32;
use std::time::Duration;

use async_trait::async_trait;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter as Gcra};

use crate::config::RateLimitSettings;

/// Which limit refused a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    User,
    Room,
    /// A user's reactions.
    Reaction,
}

impl Scope {
    pub fn label(self) -> &'static str {
        match self {
            Scope::User => "user",
            Scope::Room => "room",
            Scope::Reaction => "reaction",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub scope: Scope,
    pub retry_after: Duration,
}

#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// Spends one send from the user's and the room's budgets, or says how long to wait.
    async fn check_send(&self, user: &str, room: &str) -> Result<(), Refused>;
    /// Spends one of the user's reactions (react and unreact).
    async fn check_reaction(&self, user: &str) -> Result<(), Refused>;
    /// Forgets idle keys (called periodically) so memory follows active senders only.
    fn sweep(&self) {}
}

pub struct MemoryRateLimiter {
    users: DefaultKeyedRateLimiter<String>,
    rooms: DefaultKeyedRateLimiter<String>,
    reactions: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
}

fn quota(per_second: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(per_second).expect("validated: at least 1");
    let burst = NonZeroU32::new(burst).expect("validated: at least 1");
    Quota::per_second(rate).allow_burst(burst)
}

impl MemoryRateLimiter {
    pub fn new(settings: &RateLimitSettings) -> Self {
        Self {
            users: Gcra::dashmap(quota(settings.user_per_second, settings.user_burst)),
            rooms: Gcra::dashmap(quota(settings.room_per_second, settings.room_burst)),
            reactions: Gcra::dashmap(quota(settings.reaction_per_second, settings.reaction_burst)),
            clock: DefaultClock::default(),
        }
    }

    fn check(
        &self,
        limiter: &DefaultKeyedRateLimiter<String>,
        key: &str,
        scope: Scope,
    ) -> Result<(), Refused> {
        // Keys are owned Strings; the lookup allocates once per check, which is cheap next to a send.
        limiter
            .check_key(&key.to_string())
            .map_err(|not_until| Refused {
                scope,
                retry_after: not_until.wait_time_from(self.clock.now()),
            })
    }
}

#[async_trait]
impl RateLimiter for MemoryRateLimiter {
    async fn check_send(&self, user: &str, room: &str) -> Result<(), Refused> {
        self.check(&self.users, user, Scope::User)?;
        self.check(&self.rooms, room, Scope::Room)
    }

    async fn check_reaction(&self, user: &str) -> Result<(), Refused> {
        self.check(&self.reactions, user, Scope::Reaction)
    }

    fn sweep(&self) {
        self.users.retain_recent();
        self.rooms.retain_recent();
        self.reactions.retain_recent();
        self.users.shrink_to_fit();
        self.rooms.shrink_to_fit();
        self.reactions.shrink_to_fit();
    }
}

/// Used when `rate_limit.enabled = false`.
pub struct Unlimited;

#[async_trait]
impl RateLimiter for Unlimited {
    async fn check_send(&self, _user: &str, _room: &str) -> Result<(), Refused> {
        Ok(())
    }

    async fn check_reaction(&self, _user: &str) -> Result<(), Refused> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[tokio::test]
    async fn burst_of_five_then_refused_with_a_wait() {
        let limiter = MemoryRateLimiter::new(&Settings::defaults().rate_limit);
        for i in 0..5 {
            assert!(
                limiter.check_send("u", &format!("room{i}")).await.is_ok(),
                "send {i}"
            );
        }
        let refused = limiter.check_send("u", "room9").await.unwrap_err();
        assert_eq!(refused.scope, Scope::User);
        assert!(
            refused.retry_after > Duration::ZERO
                && refused.retry_after <= Duration::from_millis(334)
        );
        // Another user is unaffected.
        assert!(limiter.check_send("v", "room9").await.is_ok());
    }

    #[tokio::test]
    async fn room_limit_holds_across_users() {
        let limiter = MemoryRateLimiter::new(&Settings::defaults().rate_limit);
        for i in 0..10 {
            assert!(
                limiter
                    .check_send(&format!("user{i}"), "busy")
                    .await
                    .is_ok()
            );
        }
        let refused = limiter.check_send("user10", "busy").await.unwrap_err();
        assert_eq!(refused.scope, Scope::Room);
    }
}
