//! The history cache: each room's newest messages (its *tail*), which the latest pages are cut
//! from and which sends keep current, and older pages, which sends never change.
//!
//! **Older pages** (`before` given) hold messages older than the cursor. Once every `seq` below
//! the cursor is allocated (the page's newest message is `before - 1`), a new message cannot
//! change them: they are cached for `cache.history_ttl_ms` and never invalidated. A page whose
//! newest message is not `before - 1` (the cursor is past the room's head, or that message was
//! rejected) is not cached.
//!
//! **The tail** holds the room's newest `limits.history_max_limit + 1` messages, each serialized
//! once, and whether it reaches the room's first message. A latest page of any `limit` is cut from
//! it and concatenated, never serialized again. Every send appends its message after the commit
//! and before the ack: if the tail ends at `seq - 1` the message is appended; if it already holds
//! `seq` (a read after the commit filled it) nothing changes; otherwise (a gap: appends from two
//! nodes out of order, a message stored by something else) the tail is dropped and the next read
//! refills it from the store. So a tail only ever serves a gap-free run of what the store held.
//! (In Redis the append is plain commands that cannot look at the tail, so the reader makes that
//! check instead, after putting the entries in order: see [`redis`].)
//!
//! **Races.** Each room has a *generation*, bumped by every append (before the ack). A miss takes
//! the generation before the store is read; the tail read is stored only if the generation has not
//! moved since, atomically with the check. A send that commits while the tail is being read bumps
//! the generation, so that read, possibly older than the message, is thrown away; a send whose
//! append came before the generation was taken committed before the read began. So no reader is
//! ever served a latest page without a message already acknowledged, and no invalidation scans
//! keys.
//!
//! **Changes.** A change of a stored message (section 15 of the protocol) can touch any page. It
//! drops the room's tail (bumping its generation, so a store read in flight is not stored either)
//! and marks the room *changed* for `cache.history_ttl_ms`: while marked, the room's older pages
//! are neither served nor stored. An older page stored before the mark expires before the mark
//! does (both live that long), so no page read before a change is served after it; one read after
//! the change is stored again once the mark is gone. Busy rooms' reactions keep their older pages
//! uncached; older pages are the rare reads.
//!
//! **Lifetime.** A tail lives `cache.history_ttl_ms` from the store read that filled it: appends
//! do not extend it, so changes made outside the gateway (moderation) show within that time. A
//! read of a tail past half its life is still a hit, and hands out a token to re-read the tail in
//! the background (once per tail), so a room read steadily never waits for the store.

pub mod redis;

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use dashmap::mapref::one::RefMut;
use moka::Expiry;
use moka::sync::Cache;

use crate::protocol::{self, MessageJson};
use crate::store::Message;
use crate::wire::message_json;

/// A room's newest messages, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Tail {
    pub messages: Vec<MessageJson>,
    /// No visible message is older than the first one here: the tail reaches the room's start.
    pub complete: bool,
}

/// What appending a message to a tail gives.
#[derive(Debug, PartialEq)]
pub enum Append {
    /// The tail already holds it.
    Present,
    Appended(Tail),
    /// The tail does not end right before it: drop the tail.
    Gap,
}

impl Tail {
    /// A tail from a store read that asked for `asked` rows and got `rows`, newest first.
    pub fn from_store(rows: &[Message], asked: usize) -> Self {
        Tail {
            messages: rows.iter().rev().map(message_json).collect(),
            complete: rows.len() < asked,
        }
    }

    /// The newest sequence held; 0 for an empty tail (an empty room).
    pub fn last_seq(&self) -> i64 {
        self.messages.last().map_or(0, |m| m.seq)
    }

    /// The latest page of `limit` messages, or `None` when the tail is too short to tell.
    pub fn latest_page(&self, room: &str, limit: u32) -> Option<Utf8Bytes> {
        latest_page(room, &self.messages, self.complete, limit)
    }

    /// The tail with `message` appended (a just-stored message), at most `max_len` long.
    pub fn append(&self, message: &MessageJson, max_len: usize) -> Append {
        let last = self.last_seq();
        if message.seq <= last {
            return Append::Present;
        }
        if message.seq != last + 1 {
            return Append::Gap;
        }
        let dropped = (self.messages.len() + 1).saturating_sub(max_len);
        let mut messages = Vec::with_capacity(self.messages.len() + 1 - dropped);
        messages.extend_from_slice(&self.messages[dropped..]);
        messages.push(message.clone());
        Append::Appended(Tail {
            messages,
            complete: self.complete && dropped == 0,
        })
    }
}

/// The latest page of `limit` messages cut from a tail (oldest first), with `nextBefore` exactly
/// as the store would give it; `None` when the tail is shorter than `limit` and does not reach
/// the room's start (only the store knows that page).
pub fn latest_page<J: Deref<Target = str>>(
    room: &str,
    tail: &[MessageJson<J>],
    complete: bool,
    limit: u32,
) -> Option<Utf8Bytes> {
    let limit = limit as usize;
    let (first, older_exists) = match tail.len() {
        len if len > limit => (len - limit, true),
        len if len == limit => (0, !complete),
        _ if complete => (0, false),
        _ => return None,
    };
    let page = &tail[first..];
    let next_before = if older_exists {
        page.first().map(|m| m.seq)
    } else {
        None
    };
    Some(protocol::history_page(room, page, next_before))
}

/// The outcome of a latest-page lookup.
pub enum Latest {
    /// `refresh`: the tail is past half its life; re-read it in the background with this token.
    Hit {
        page: Utf8Bytes,
        refresh: Option<MissToken>,
    },
    /// Read the tail from the store and `fill` it with this token.
    Miss(MissToken),
}

/// The room and the generation a lookup saw: what `fill` needs to store a tail safely.
#[derive(Debug)]
pub struct MissToken {
    room: String,
    /// `None` when the cache could not be read: nothing will be stored.
    generation: Option<u64>,
}

impl MissToken {
    pub fn room(&self) -> &str {
        &self.room
    }
}

#[async_trait]
pub trait HistoryCache: Send + Sync + 'static {
    /// The latest page of `limit` messages, cut from the room's tail.
    async fn latest(&self, room: &str, limit: u32) -> Latest;
    /// Stores a tail read from the store after `latest` handed out `token`, unless a message was
    /// appended since (then the read may be older than that message, and is thrown away).
    async fn fill(&self, token: MissToken, tail: Tail);
    /// Appends a stored message to its room's tail (see the module doc). Every send calls it after
    /// the commit and before the ack, a retry answered with the stored original included.
    async fn append(&self, room: &str, message: &MessageJson);
    /// A page of `limit` messages older than `before`.
    async fn older(&self, room: &str, limit: u32, before: i64) -> Option<Utf8Bytes>;
    /// Stores an older page whose newest message is `before - 1` (so no send can change it).
    async fn put_older(&self, room: &str, limit: u32, before: i64, page: Utf8Bytes);
    /// Drops the room's tail, and any store read in flight for it: the tail may miss acknowledged
    /// messages (a Redis Cluster shard failed over before its replica had the last appends).
    async fn forget(&self, room: &str);
    /// A message of the room changed (an edit, a deletion, a reaction, moderation: see
    /// "Changes" in the module doc): drops the tail as `forget` does, and serves and stores no
    /// older page of the room for `cache.history_ttl_ms`. Called after the change's commit and
    /// before its ack.
    async fn changed(&self, room: &str);
}

/// In-process cache, bounded by `cache.max_bytes` of cached JSON (plus bookkeeping per entry).
pub struct MemoryHistoryCache {
    /// Tails and older pages. Weighed in bytes; each entry expires at its own `expires_at`.
    entries: Cache<Key, Entry>,
    /// Each room's generation and changed mark. One entry per room ever read or written. Every
    /// write of a room's tail (fill, append, drop) happens while that room's entry here is locked
    /// (a `RefMut`, never held across an await), which makes the generation check and the write
    /// one step.
    rooms: DashMap<Box<str>, RoomMarks>,
    ttl: Duration,
    tail_len: usize,
}

/// What the cache keeps of a room beside its entries.
#[derive(Default)]
struct RoomMarks {
    /// Appends and drops of the room's tail on this node.
    generation: u64,
    /// Until when the room counts as changed (see "Changes"): its older pages are not used.
    changed_until: Option<Instant>,
}

impl RoomMarks {
    fn changed(&self) -> bool {
        self.changed_until
            .is_some_and(|until| until > Instant::now())
    }
}

/// An entry's key: a room's tail, or one of its older pages (`(limit, before)`).
#[derive(Clone)]
struct Key {
    room: Box<str>,
    older: Option<(u32, i64)>,
}

// Lookups borrow the room instead of allocating a key per request.
borrowed_key!(Key, (&str, Option<(u32, i64)>) => (&str, Option<(u32, i64)>), |k| (&k.room, k.older));

#[derive(Clone)]
enum Entry {
    Tail(Arc<CachedTail>),
    Older {
        page: Utf8Bytes,
        expires_at: Instant,
    },
}

struct CachedTail {
    tail: Tail,
    /// The fill's store read plus the TTL; appends keep it.
    expires_at: Instant,
    /// A reader took the refresh token (one background re-read per tail).
    refresh_taken: AtomicBool,
    /// The first page cut from this tail and its limit: readers of a room mostly ask one limit,
    /// and until the next append they share these bytes instead of copying them again. Set once,
    /// read without a lock; pages of other limits are cut each time.
    first_page: OnceLock<(u32, Utf8Bytes)>,
}

impl CachedTail {
    fn new(tail: Tail, expires_at: Instant, refresh_taken: bool) -> Self {
        CachedTail {
            tail,
            expires_at,
            refresh_taken: AtomicBool::new(refresh_taken),
            first_page: OnceLock::new(),
        }
    }

    fn latest_page(&self, room: &str, limit: u32) -> Option<Utf8Bytes> {
        if let Some((cut, page)) = self.first_page.get()
            && *cut == limit
        {
            return Some(page.clone());
        }
        let page = self.tail.latest_page(room, limit)?;
        let _ = self.first_page.set((limit, page.clone()));
        Some(page)
    }
}

impl Entry {
    fn expires_at(&self) -> Instant {
        match self {
            Entry::Tail(t) => t.expires_at,
            Entry::Older { expires_at, .. } => *expires_at,
        }
    }

    /// Roughly what the entry holds in memory: its JSON and its bookkeeping.
    fn weight(&self, key: &Key) -> u32 {
        /// moka's entry, the key, the `Arc` and the tail (estimated).
        const PER_ENTRY: usize = 256;
        /// A message's `seq` and byte-buffer handle.
        const PER_MESSAGE: usize = 48;
        let json = match self {
            // The messages, and the first page cut from them (about as large).
            Entry::Tail(t) => t
                .tail
                .messages
                .iter()
                .map(|m| 2 * m.json.len() + PER_MESSAGE)
                .sum(),
            Entry::Older { page, .. } => page.len(),
        };
        u32::try_from(PER_ENTRY + key.room.len() + json).unwrap_or(u32::MAX)
    }
}

/// Expires each entry at its own `expires_at`, which an update (an append) does not move.
struct ExpireAt;

impl Expiry<Key, Entry> for ExpireAt {
    fn expire_after_create(&self, _: &Key, entry: &Entry, now: Instant) -> Option<Duration> {
        Some(entry.expires_at().saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _: &Key,
        entry: &Entry,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.expires_at().saturating_duration_since(now))
    }
}

impl MemoryHistoryCache {
    /// `tail_len`: messages kept per room (`limits.history_max_limit + 1`).
    pub fn new(ttl: Duration, max_bytes: u64, tail_len: usize) -> Self {
        Self {
            entries: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|key: &Key, entry: &Entry| entry.weight(key))
                .expire_after(ExpireAt)
                .build(),
            rooms: DashMap::new(),
            ttl,
            tail_len,
        }
    }

    /// Locks the room's marks (see `rooms`).
    fn lock_room(&self, room: &str) -> RefMut<'_, Box<str>, RoomMarks> {
        match self.rooms.get_mut(room) {
            Some(marks) => marks,
            None => self.rooms.entry(room.into()).or_default(),
        }
    }

    /// Whether a change of the room keeps its older pages out of use.
    fn changed_lately(&self, room: &str) -> bool {
        self.rooms.get(room).is_some_and(|marks| marks.changed())
    }

    /// Drops the room's tail (a new generation); with `changed`, marks the room changed too.
    fn drop_tail(&self, room: &str, changed: bool) {
        let mut marks = self.lock_room(room);
        marks.generation += 1;
        if changed {
            marks.changed_until = Some(Instant::now() + self.ttl);
        }
        self.entries.invalidate(&(room, None) as &dyn KeyParts);
        drop(marks);
    }

    fn tail(&self, room: &str) -> Option<Arc<CachedTail>> {
        match self.entries.get(&(room, None) as &dyn KeyParts) {
            Some(Entry::Tail(tail)) => Some(tail),
            _ => None,
        }
    }

    fn put_tail(&self, room: &str, tail: CachedTail) {
        let key = Key {
            room: room.into(),
            older: None,
        };
        self.entries.insert(key, Entry::Tail(Arc::new(tail)));
    }

    /// Entries held and their weight in bytes (after pending evictions ran).
    #[cfg(test)]
    fn usage(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        (self.entries.entry_count(), self.entries.weighted_size())
    }
}

#[async_trait]
impl HistoryCache for MemoryHistoryCache {
    async fn latest(&self, room: &str, limit: u32) -> Latest {
        // Taken only when a store read follows (see "Races"), so a plain hit touches no lock.
        let token = || MissToken {
            room: room.to_string(),
            generation: Some(self.rooms.get(room).map_or(0, |marks| marks.generation)),
        };
        let Some(cached) = self.tail(room) else {
            return Latest::Miss(token());
        };
        let Some(page) = cached.latest_page(room, limit) else {
            return Latest::Miss(token());
        };
        let past_half_life =
            cached.expires_at.saturating_duration_since(Instant::now()) < self.ttl / 2;
        let refresh =
            (past_half_life && !cached.refresh_taken.swap(true, Ordering::Relaxed)).then(token);
        Latest::Hit { page, refresh }
    }

    async fn fill(&self, token: MissToken, tail: Tail) {
        let Some(seen) = token.generation else {
            return;
        };
        let marks = self.lock_room(&token.room);
        if marks.generation == seen {
            let expires_at = Instant::now() + self.ttl;
            self.put_tail(&token.room, CachedTail::new(tail, expires_at, false));
        }
        drop(marks);
    }

    async fn append(&self, room: &str, message: &MessageJson) {
        let mut marks = self.lock_room(room);
        marks.generation += 1;
        if let Some(cached) = self.tail(room) {
            match cached.tail.append(message, self.tail_len) {
                Append::Present => {}
                Append::Appended(tail) => {
                    let refresh_taken = cached.refresh_taken.load(Ordering::Relaxed);
                    self.put_tail(
                        room,
                        CachedTail::new(tail, cached.expires_at, refresh_taken),
                    );
                }
                Append::Gap => self.entries.invalidate(&(room, None) as &dyn KeyParts),
            }
        }
        drop(marks);
    }

    async fn older(&self, room: &str, limit: u32, before: i64) -> Option<Utf8Bytes> {
        if self.changed_lately(room) {
            return None;
        }
        match self
            .entries
            .get(&(room, Some((limit, before))) as &dyn KeyParts)
        {
            Some(Entry::Older { page, .. }) => Some(page),
            _ => None,
        }
    }

    async fn put_older(&self, room: &str, limit: u32, before: i64, page: Utf8Bytes) {
        if self.changed_lately(room) {
            return;
        }
        let key = Key {
            room: room.into(),
            older: Some((limit, before)),
        };
        let expires_at = Instant::now() + self.ttl;
        self.entries.insert(key, Entry::Older { page, expires_at });
    }

    async fn forget(&self, room: &str) {
        self.drop_tail(room, false);
    }

    async fn changed(&self, room: &str) {
        self.drop_tail(room, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(seq: i64) -> MessageJson {
        MessageJson {
            seq,
            json: format!(r#"{{"seq":{seq}}}"#).into(),
        }
    }

    fn tail(seqs: std::ops::RangeInclusive<i64>, complete: bool) -> Tail {
        Tail {
            messages: seqs.map(json).collect(),
            complete,
        }
    }

    fn empty_room() -> Tail {
        Tail {
            messages: Vec::new(),
            complete: true,
        }
    }

    fn page(tail: &Tail, limit: u32) -> Option<serde_json::Value> {
        tail.latest_page("r", limit)
            .map(|p| serde_json::from_str(&p).unwrap())
    }

    fn seqs(page: &serde_json::Value) -> Vec<i64> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_i64().unwrap())
            .collect()
    }

    #[test]
    fn next_before_is_set_exactly_when_an_older_message_exists() {
        // 1..=5 is the whole room.
        let whole = tail(1..=5, true);
        let p = page(&whole, 3).unwrap();
        assert_eq!(
            (seqs(&p), p["nextBefore"].as_i64()),
            (vec![3, 4, 5], Some(3))
        );
        let p = page(&whole, 5).unwrap();
        assert_eq!(
            (seqs(&p), p["nextBefore"].as_i64()),
            (vec![1, 2, 3, 4, 5], None)
        );
        let p = page(&whole, 30).unwrap();
        assert_eq!(
            (seqs(&p), p["nextBefore"].as_i64()),
            (vec![1, 2, 3, 4, 5], None)
        );
        // 6..=10 of a longer room.
        let part = tail(6..=10, false);
        let p = page(&part, 5).unwrap();
        assert_eq!(
            (seqs(&p), p["nextBefore"].as_i64()),
            (vec![6, 7, 8, 9, 10], Some(6))
        );
        assert_eq!(page(&part, 6), None, "only the store knows what precedes 6");
        let empty = empty_room();
        let p = page(&empty, 30).unwrap();
        assert_eq!((seqs(&p), p["nextBefore"].as_i64()), (vec![], None));
    }

    #[test]
    fn appends_extend_contiguous_tails_and_refuse_gaps() {
        let t = tail(1..=3, true);
        assert_eq!(t.append(&json(3), 5), Append::Present);
        assert_eq!(t.append(&json(5), 5), Append::Gap);
        let Append::Appended(t) = t.append(&json(4), 5) else {
            panic!("contiguous")
        };
        assert_eq!((t.last_seq(), t.complete), (4, true));
        let Append::Appended(t) = t.append(&json(5), 5) else {
            panic!("contiguous")
        };
        assert_eq!((t.messages.len(), t.complete), (5, true));
        // Full: the oldest goes, and the tail no longer reaches the room's start.
        let Append::Appended(t) = t.append(&json(6), 5) else {
            panic!("contiguous")
        };
        assert_eq!(t.messages.first().map(|m| m.seq), Some(2));
        assert_eq!((t.messages.len(), t.complete), (5, false));
        assert_eq!(
            empty_room().append(&json(1), 5),
            Append::Appended(tail(1..=1, true))
        );
    }

    fn cache() -> MemoryHistoryCache {
        MemoryHistoryCache::new(Duration::from_secs(60), 1 << 20, 5)
    }

    async fn hit(cache: &MemoryHistoryCache, limit: u32) -> Option<Vec<i64>> {
        match cache.latest("r", limit).await {
            Latest::Hit { page, .. } => Some(seqs(&serde_json::from_str(&page).unwrap())),
            Latest::Miss(_) => None,
        }
    }

    #[tokio::test]
    async fn a_send_during_a_miss_keeps_the_stale_tail_out() {
        let cache = cache();
        let Latest::Miss(token) = cache.latest("r", 3).await else {
            panic!("empty cache hit")
        };
        // Message 3 is committed and appended while the tail (1..=2) is being read.
        cache.append("r", &json(3)).await;
        cache.fill(token, tail(1..=2, true)).await;
        assert_eq!(hit(&cache, 3).await, None);
        let Latest::Miss(token) = cache.latest("r", 3).await else {
            unreachable!()
        };
        cache.fill(token, tail(1..=3, true)).await;
        assert_eq!(hit(&cache, 3).await, Some(vec![1, 2, 3]));
    }

    #[tokio::test]
    async fn sends_keep_the_tail_current_and_a_gap_drops_it() {
        let cache = cache();
        let Latest::Miss(token) = cache.latest("r", 2).await else {
            panic!("empty cache hit")
        };
        cache.fill(token, tail(1..=2, true)).await;
        cache.append("r", &json(3)).await;
        assert_eq!(hit(&cache, 2).await, Some(vec![2, 3]));
        // Until the next append, readers of the same limit share one copy of the page.
        let page = || async {
            match cache.latest("r", 2).await {
                Latest::Hit { page, .. } => page,
                Latest::Miss(_) => panic!("miss"),
            }
        };
        assert_eq!(page().await.as_ptr(), page().await.as_ptr());
        // A retry answered with message 3 changes nothing.
        cache.append("r", &json(3)).await;
        assert_eq!(hit(&cache, 5).await, Some(vec![1, 2, 3]));
        // 5 before 4 (two senders, out of order): dropped, not corrupted.
        cache.append("r", &json(5)).await;
        assert_eq!(hit(&cache, 2).await, None);
        cache.append("r", &json(4)).await;
        assert_eq!(hit(&cache, 2).await, None);
    }

    #[tokio::test]
    async fn a_tail_past_half_its_life_hands_out_one_refresh() {
        let cache = MemoryHistoryCache::new(Duration::from_millis(1000), 1 << 20, 5);
        let Latest::Miss(token) = cache.latest("r", 2).await else {
            panic!("empty cache hit")
        };
        cache.fill(token, tail(1..=2, true)).await;
        assert!(matches!(
            cache.latest("r", 2).await,
            Latest::Hit { refresh: None, .. }
        ));
        tokio::time::sleep(Duration::from_millis(600)).await;
        cache.append("r", &json(3)).await;
        let Latest::Hit {
            refresh: Some(token),
            ..
        } = cache.latest("r", 2).await
        else {
            panic!("no refresh handed out")
        };
        assert!(matches!(
            cache.latest("r", 2).await,
            Latest::Hit { refresh: None, .. }
        ));
        cache.fill(token, tail(1..=3, true)).await;
        // The refreshed tail lives a whole TTL again, past the first one's end.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(hit(&cache, 2).await, Some(vec![2, 3]));
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(hit(&cache, 2).await, None, "expired");
    }

    #[tokio::test]
    async fn a_change_drops_the_tail_and_keeps_older_pages_out_for_a_ttl() {
        let cache = MemoryHistoryCache::new(Duration::from_millis(400), 1 << 20, 5);
        let Latest::Miss(token) = cache.latest("r", 2).await else {
            panic!("empty cache hit")
        };
        cache.fill(token, tail(3..=4, false)).await;
        cache.put_older("r", 2, 3, Utf8Bytes::from("before")).await;
        assert_eq!(cache.older("r", 2, 3).await.as_deref(), Some("before"));
        // A read that missed before the change must not store what it read.
        let Latest::Miss(token) = cache.latest("r", 5).await else {
            panic!("the tail holds two of four, five asked")
        };
        cache.changed("r").await;
        assert_eq!(hit(&cache, 2).await, None, "the tail is dropped");
        cache.fill(token, tail(1..=4, true)).await;
        assert_eq!(hit(&cache, 2).await, None, "a read from before the change");
        assert_eq!(cache.older("r", 2, 3).await, None, "older pages not served");
        cache.put_older("r", 2, 1, Utf8Bytes::from("during")).await;
        assert_eq!(cache.older("r", 2, 1).await, None, "nor stored");
        // Another room is not concerned.
        cache.put_older("s", 2, 3, Utf8Bytes::from("other")).await;
        assert_eq!(cache.older("s", 2, 3).await.as_deref(), Some("other"));
        // Once the mark is gone, older pages are stored and served again.
        tokio::time::sleep(Duration::from_millis(500)).await;
        cache.put_older("r", 2, 1, Utf8Bytes::from("after")).await;
        assert_eq!(cache.older("r", 2, 1).await.as_deref(), Some("after"));
    }

    #[tokio::test]
    async fn the_cache_is_bounded_by_bytes() {
        let cache = MemoryHistoryCache::new(Duration::from_secs(60), 256 * 1024, 5);
        let page = Utf8Bytes::from("x".repeat(10_000));
        for before in 0..1000 {
            cache.put_older("r", 30, before, page.clone()).await;
        }
        // 10 KB each: at most 25 fit in 256 KiB.
        let (entries, bytes) = cache.usage();
        assert!(bytes <= 256 * 1024, "{bytes} bytes in {entries} entries");
        assert!((1..=25).contains(&entries), "{entries} entries");
    }
}
