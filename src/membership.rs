//! Cached answers to "may this user use this room?".
//!
//! Entries live `auth.membership_ttl_secs`. A removal made through the management API invalidates
//! the entry at once (on every node, through the broker's `MemberRemoved` event) and detaches the
//! user's live sockets from the room. A removal made directly in the database is seen when the
//! entry expires: the next send or history request after that is refused, and the socket is
//! detached from the room then.

use std::time::Duration;

use moka::sync::Cache;

use crate::store::Access;

pub struct MembershipCache {
    entries: Cache<MemberKey, Access>,
}

/// `(room, user)`. Lookups borrow both instead of allocating a key per request (every send and
/// history request asks).
struct MemberKey {
    room: Box<str>,
    user: Box<str>,
}

borrowed_key!(MemberKey, (&str, &str) => (&str, &str), |k| (&k.room, &k.user));

impl MembershipCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            entries: Cache::builder()
                .time_to_live(ttl)
                .max_capacity(1_000_000)
                .build(),
        }
    }

    pub fn get(&self, room: &str, user: &str) -> Option<Access> {
        self.entries.get(&(room, user) as &dyn KeyParts)
    }

    pub fn put(&self, room: &str, user: &str, access: Access) {
        let key = MemberKey {
            room: room.into(),
            user: user.into(),
        };
        self.entries.insert(key, access);
    }

    pub fn invalidate(&self, room: &str, user: &str) {
        self.entries.invalidate(&(room, user) as &dyn KeyParts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_found_by_borrowed_keys() {
        let cache = MembershipCache::new(Duration::from_secs(60));
        cache.put("r", "alice", Access::Member);
        cache.put("r", "bob", Access::NotMember);
        assert_eq!(cache.get("r", "alice"), Some(Access::Member));
        assert_eq!(cache.get("r", "bob"), Some(Access::NotMember));
        assert_eq!(cache.get("ra", "lice"), None);
        cache.invalidate("r", "alice");
        assert_eq!(cache.get("r", "alice"), None);
        assert_eq!(cache.get("r", "bob"), Some(Access::NotMember));
    }
}
