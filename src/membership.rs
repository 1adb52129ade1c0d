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
    entries: Cache<(String, String), Access>,
}

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
        self.entries.get(&(room.to_string(), user.to_string()))
    }

    pub fn put(&self, room: &str, user: &str, access: Access) {
        self.entries
            .insert((room.to_string(), user.to_string()), access);
    }

    pub fn invalidate(&self, room: &str, user: &str) {
        self.entries
            .invalidate(&(room.to_string(), user.to_string()));
    }
}
