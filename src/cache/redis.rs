//! The history cache in Redis, shared by every node: the same tails, older pages and generations
//! as the in-process cache (see the module doc of [`super`]), each operation one round trip. A
//! send's append is plain commands in one pipeline, which also carries the message's publish
//! ([`RedisHistoryCache::append_and_publish`], used by the broker's `RedisAnnouncer`); the reads,
//! fills and drops are scripts.
//!
//! Keys (proto-docs/redis.md): `{prefix}messages:{roomId}:list` (the tail), `…:gen` (the room's
//! generation, bumped by every append), `…:refresh` (a node is re-reading the tail), `…:changed`
//! (a message of the room changed in the last TTL: older pages are not used), `…:last` (the
//! header earlier versions read, still written by fills so that their appends stay correct
//! during a rolling upgrade), and older pages under the seed's key
//! `{prefix}messages:{roomId}:{limit}:{before}`, as plain page JSON.
//!
//! **The tail** is a list, set with an expiry by a store read: `start` first when it reaches the
//! room's first message, then the messages read, oldest first, each `"{seq} {message JSON}"`.
//! A send appends `"{seq}+ {message JSON}"` with `RPUSHX` (only to a tail that exists, keeping its
//! expiry) and `LTRIM`s it to its length: the same work whatever the tail's length, and no script,
//! whose start costs Redis more than the commands themselves. Appends from two nodes may land out
//! of order, twice (a message a fill already read), or not at all (Redis failed); so a lookup
//! reads the whole list and orders it by `seq`, drops repeats, and serves it only when every
//! appended message follows the one before it (`seq - 1`), the oldest excepted (in a complete
//! tail it must be the room's first, `seq` 1). Anything else is a miss, and the fill that follows
//! replaces the list. The messages a store read put there may have holes (the `seq`s of
//! changes), which are the store's own.
//!
//! Pages read from Redis are checked to be JSON before they are served (a miss otherwise).
//!
//! When Redis fails, lookups count as misses (the store answers) and nothing is cached. A failed
//! append leaves the tail without that message until the room's next send (its entry shows the
//! hole), the tail's refresh, or its expiry: at most `cache.history_ttl_ms`.

use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use redis::Script;

use super::{HistoryCache, Latest, MissToken, Tail, latest_page};
use crate::protocol::MessageJson;
use crate::redis_conn::RedisConn;

/// Generations are kept far longer than any tail, so a tail never outlives its generation key.
const GENERATION_TTL_MS: u64 = 24 * 3600 * 1000;

/// KEYS: generation, tail, refresh claim. ARGV: half the TTL (ms). Returns the generation, the
/// tail's entries (none when there is no tail) and 1 when this reader is to refresh the tail.
const LOOKUP: &str = r"
local generation = redis.call('GET', KEYS[1]) or '0'
local entries = redis.call('LRANGE', KEYS[2], 0, -1)
if #entries == 0 then return {generation, {}, 0} end
local refresh = 0
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[1])
   and redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[1]) then
  refresh = 1
end
return {generation, entries, refresh}";

/// KEYS: generation, the earlier versions' header, tail. ARGV: the generation the miss saw, the
/// header, the TTL (ms), then the entries (`start` first when the tail is complete).
const FILL: &str = r"
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[3])
if #ARGV > 3 then
  redis.call('RPUSH', KEYS[3], unpack(ARGV, 4))
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1";

/// KEYS: generation, the earlier versions' header, tail, and for a change the room's changed
/// mark. ARGV: generation TTL (ms), and for a change the mark's TTL (ms).
const FORGET: &str = r"
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if KEYS[4] then redis.call('SET', KEYS[4], '1', 'PX', ARGV[2]) end
return redis.call('DEL', KEYS[2], KEYS[3])";

/// KEYS: the room's changed mark, the page. Nothing while the room is marked.
const OLDER: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
return redis.call('GET', KEYS[2])";

/// KEYS: the room's changed mark, the page. ARGV: the page, its TTL (ms). Not while marked.
const PUT_OLDER: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1";

pub struct RedisHistoryCache {
    redis: RedisConn,
    ttl: Duration,
    tail_len: usize,
    lookup: Script,
    fill: Script,
    forget: Script,
    older: Script,
    put_older: Script,
}

impl RedisHistoryCache {
    /// `tail_len`: messages kept per room (`limits.history_max_limit + 1`).
    pub fn new(redis: RedisConn, ttl: Duration, tail_len: usize) -> Self {
        Self {
            redis,
            ttl,
            tail_len,
            lookup: Script::new(LOOKUP),
            fill: Script::new(FILL),
            forget: Script::new(FORGET),
            older: Script::new(OLDER),
            put_older: Script::new(PUT_OLDER),
        }
    }

    /// Appends `message` to the room's tail (when given) and publishes `publish` (command,
    /// channel, payload): one pipeline, one round trip, the append first. The room's channel must
    /// live in the room's slot on a cluster (it carries the same hash tag).
    pub async fn append_and_publish(
        &self,
        room: &str,
        message: Option<&MessageJson>,
        publish: Option<(&str, &str, &[u8])>,
    ) -> redis::RedisResult<()> {
        if message.is_none() && publish.is_none() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        if let Some(message) = message {
            let generation = self.room_key(room, "gen");
            let list = self.room_key(room, "list");
            // The generation first: a fill whose store read may predate this message is refused
            // from here on, and one that got in before lands ahead of this entry.
            pipe.incr(&generation, 1)
                .ignore()
                .pexpire(&generation, GENERATION_TTL_MS as i64)
                .ignore()
                .rpush_exists(&list, encode_appended(message.seq, &message.json))
                .ignore()
                .ltrim(&list, -(self.tail_len as isize), -1)
                .ignore();
        }
        if let Some((command, channel, payload)) = publish {
            pipe.cmd(command).arg(channel).arg(payload).ignore();
        }
        let mut conn = self.redis.conn.clone();
        self.redis.bounded(pipe.query_async(&mut conn)).await
    }

    fn room_key(&self, room: &str, what: &str) -> String {
        let room = self.redis.tag(room);
        self.redis.key(&format!("messages:{room}:{what}"))
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }
}

/// The seed's key of an older page (`room` tagged on a cluster, as the room's other keys).
fn older_key(room: &str, limit: u32, before: i64) -> String {
    format!("messages:{room}:{limit}:{before}")
}

/// Whether text read from Redis is one JSON value. Redis is shared: whatever is read from it is
/// checked before it is served, so the doors can pass pages on as they are.
fn is_json(text: &str) -> bool {
    serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

/// A tail's header as earlier versions read it: `"{last seq} {complete 0|1}"`.
fn encode_header(tail: &Tail) -> String {
    format!("{} {}", tail.last_seq(), u8::from(tail.complete))
}

/// The first entry of a tail that reaches the room's first message.
const START: &str = "start";

/// A tail's entry read from the store: `"{seq} {message JSON}"`.
fn encode_entry(seq: i64, json: &str) -> String {
    format!("{seq} {json}")
}

/// A tail's entry appended by a send: `"{seq}+ {message JSON}"`.
fn encode_appended(seq: i64, json: &str) -> String {
    format!("{seq}+ {json}")
}

/// Why a tail read from Redis is not served.
#[derive(Debug, PartialEq)]
enum Unservable {
    /// An entry is not one this or an earlier version writes.
    Malformed,
    /// An appended message does not follow the one before it: an append is missing (still on its
    /// way from another node, or lost with Redis), or the list was trimmed past one that landed
    /// out of order.
    Hole,
}

/// A tail's messages in `seq` order and whether they reach the room's start, from its entries
/// (the whole list, in the order they landed).
fn decode_tail(entries: &[String]) -> Result<(Vec<MessageJson<&str>>, bool), Unservable> {
    let complete = entries.first().is_some_and(|e| e == START);
    let mut messages = Vec::with_capacity(entries.len());
    for entry in entries {
        // `start` stands where seq 0 would: an appended message right after it must be seq 1.
        if messages.is_empty() && complete {
            messages.push((MessageJson { seq: 0, json: "" }, false));
            continue;
        }
        let (head, json) = entry.split_once(' ').ok_or(Unservable::Malformed)?;
        let (seq, appended) = match head.strip_suffix('+') {
            Some(seq) => (seq, true),
            None => (head, false),
        };
        let seq: i64 = seq.parse().map_err(|_| Unservable::Malformed)?;
        messages.push((MessageJson { seq, json }, appended));
    }
    // Appends land in order almost always: sort only when they did not.
    if !messages.is_sorted_by_key(|(m, _)| m.seq) {
        messages.sort_by_key(|(m, _)| m.seq);
    }
    messages.dedup_by_key(|(m, _)| m.seq);
    let follows = |pair: &[(MessageJson<&str>, bool)]| {
        let (before, (message, appended)) = (&pair[0].0, &pair[1]);
        !appended || message.seq == before.seq + 1
    };
    if !messages.windows(2).all(follows) {
        return Err(Unservable::Hole);
    }
    let messages = messages.into_iter().skip(usize::from(complete));
    Ok((messages.map(|(m, _)| m).collect(), complete))
}

#[async_trait]
impl HistoryCache for RedisHistoryCache {
    async fn latest(&self, room: &str, limit: u32) -> Latest {
        let mut conn = self.redis.conn.clone();
        let mut invocation = self.lookup.key(self.room_key(room, "gen"));
        invocation
            .key(self.room_key(room, "list"))
            .key(self.room_key(room, "refresh"))
            .arg(self.ttl_ms() / 2);
        let found: Result<(u64, Vec<String>, u8), _> =
            self.redis.bounded(invocation.invoke_async(&mut conn)).await;
        let (generation, entries, refresh) = match found {
            Ok(found) => found,
            Err(e) => {
                self.redis
                    .log_failure("history cache unavailable; reading the store", &e);
                return Latest::Miss(MissToken {
                    room: room.to_string(),
                    generation: None,
                });
            }
        };
        let token = || MissToken {
            room: room.to_string(),
            generation: Some(generation),
        };
        if entries.is_empty() {
            return Latest::Miss(token());
        }
        let (messages, complete) = match decode_tail(&entries) {
            Ok(tail) => tail,
            Err(Unservable::Hole) => return Latest::Miss(token()),
            Err(Unservable::Malformed) => {
                tracing::warn!(
                    room,
                    "a cached history tail is malformed; reading the store"
                );
                return Latest::Miss(token());
            }
        };
        match latest_page(room, &messages, complete, limit) {
            Some(page) if is_json(&page) => Latest::Hit {
                page,
                refresh: (refresh == 1).then(token),
            },
            Some(_) => {
                tracing::warn!(room, "a cached history tail is not JSON; reading the store");
                Latest::Miss(token())
            }
            None => Latest::Miss(token()),
        }
    }

    async fn fill(&self, token: MissToken, tail: Tail) {
        let Some(generation) = token.generation else {
            return;
        };
        let mut conn = self.redis.conn.clone();
        let mut invocation = self.fill.key(self.room_key(&token.room, "gen"));
        invocation
            .key(self.room_key(&token.room, "last"))
            .key(self.room_key(&token.room, "list"))
            .arg(generation)
            .arg(encode_header(&tail))
            .arg(self.ttl_ms());
        if tail.complete {
            invocation.arg(START);
        }
        for m in &tail.messages {
            invocation.arg(encode_entry(m.seq, &m.json));
        }
        let result: Result<i64, _> = self.redis.bounded(invocation.invoke_async(&mut conn)).await;
        if let Err(e) = result {
            self.redis.log_failure("history cache write failed", &e);
        }
    }

    async fn append(&self, room: &str, message: &MessageJson) {
        if let Err(e) = self.append_and_publish(room, Some(message), None).await {
            // The message is stored; see the module doc for how long the tail may miss it.
            self.redis.log_failure("history cache append failed", &e);
        }
    }

    async fn forget(&self, room: &str) {
        self.drop_tail(room, false).await;
    }

    async fn changed(&self, room: &str) {
        self.drop_tail(room, true).await;
    }

    async fn older(&self, room: &str, limit: u32, before: i64) -> Option<Utf8Bytes> {
        let mut conn = self.redis.conn.clone();
        let key = self
            .redis
            .key(&older_key(&self.redis.tag(room), limit, before));
        let mut invocation = self.older.key(self.room_key(room, "changed"));
        invocation.key(key);
        let found: Result<Option<String>, _> =
            self.redis.bounded(invocation.invoke_async(&mut conn)).await;
        match found {
            // Anything else under the key (an earlier version's format) is a miss.
            Ok(Some(page)) if is_json(&page) => Some(page.into()),
            Ok(_) => None,
            Err(e) => {
                self.redis
                    .log_failure("history cache unavailable; reading the store", &e);
                None
            }
        }
    }

    async fn put_older(&self, room: &str, limit: u32, before: i64, page: Utf8Bytes) {
        let mut conn = self.redis.conn.clone();
        let key = self
            .redis
            .key(&older_key(&self.redis.tag(room), limit, before));
        let mut invocation = self.put_older.key(self.room_key(room, "changed"));
        invocation.key(key).arg(page.as_bytes()).arg(self.ttl_ms());
        let result: Result<i64, _> = self.redis.bounded(invocation.invoke_async(&mut conn)).await;
        if let Err(e) = result {
            self.redis.log_failure("history cache write failed", &e);
        }
    }
}

impl RedisHistoryCache {
    /// Drops the room's tail (and any store read in flight for it); for a change, also marks the
    /// room changed (see "Changes" in the module doc of [`super`]).
    async fn drop_tail(&self, room: &str, change: bool) {
        // A script, not MULTI: one slot (the room's tag), atomic, and it follows MOVED on a
        // cluster whose slots just moved. A fill that read the store before this sees another
        // generation and is refused.
        let mut conn = self.redis.conn.clone();
        let mut invocation = self.forget.key(self.room_key(room, "gen"));
        invocation
            .key(self.room_key(room, "last"))
            .key(self.room_key(room, "list"))
            .arg(GENERATION_TTL_MS);
        if change {
            invocation
                .key(self.room_key(room, "changed"))
                .arg(self.ttl_ms());
        }
        let result: Result<i64, _> = self.redis.bounded(invocation.invoke_async(&mut conn)).await;
        if let Err(e) = result {
            self.redis.log_failure("history cache tail not dropped", &e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_key_format() {
        assert_eq!(older_key("r", 30, 90), "messages:r:30:90");
    }

    fn seqs(entries: &[&str]) -> Result<(Vec<i64>, bool), Unservable> {
        let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
        decode_tail(&entries)
            .map(|(messages, complete)| (messages.iter().map(|m| m.seq).collect(), complete))
    }

    #[test]
    fn tails_read_back_as_written() {
        let tail = Tail {
            messages: (4..=6)
                .map(|seq| MessageJson {
                    seq,
                    json: format!(r#"{{"seq":{seq},"content":"a b\nc"}}"#).into(),
                })
                .collect(),
            complete: true,
        };
        assert_eq!(encode_header(&tail), "6 1");
        let mut entries = vec![START.to_string()];
        entries.extend(tail.messages.iter().map(|m| encode_entry(m.seq, &m.json)));
        entries.push(encode_appended(7, r#"{"seq":7,"content":"x y"}"#));
        let (messages, complete) = decode_tail(&entries).unwrap();
        assert!(complete);
        assert_eq!(
            messages.iter().map(|m| (m.seq, m.json)).collect::<Vec<_>>(),
            vec![
                (4, r#"{"seq":4,"content":"a b\nc"}"#),
                (5, r#"{"seq":5,"content":"a b\nc"}"#),
                (6, r#"{"seq":6,"content":"a b\nc"}"#),
                (7, r#"{"seq":7,"content":"x y"}"#),
            ]
        );
        assert_eq!(seqs(&["start"]), Ok((vec![], true)), "an empty room");
        assert_eq!(seqs(&["4 {}", "5 {}"]), Ok((vec![4, 5], false)));
    }

    #[test]
    fn appends_out_of_order_or_twice_are_served_in_order_once() {
        // Two nodes' appends landed out of order.
        assert_eq!(
            seqs(&["1 {}", "2 {}", "4+ {}", "3+ {}"]),
            Ok((vec![1, 2, 3, 4], false))
        );
        // A fill read 3 before its append landed.
        assert_eq!(
            seqs(&["start", "1 {}", "2 {}", "3 {}", "3+ {}", "4+ {}"]),
            Ok((vec![1, 2, 3, 4], true))
        );
        // Holes the store read left (the seqs of changes) are the store's own.
        assert_eq!(seqs(&["1 {}", "4 {}", "5+ {}"]), Ok((vec![1, 4, 5], false)));
        // The oldest entry left after a trim has nothing before it to follow.
        assert_eq!(seqs(&["7+ {}", "8+ {}"]), Ok((vec![7, 8], false)));
    }

    #[test]
    fn a_tail_missing_an_appended_message_is_not_served() {
        // 3 is still on its way from another node, or was lost with Redis; or a change took 3
        // after the fill, which the next send's entry cannot tell (the next read goes to the
        // store once, and its fill holds 4).
        assert_eq!(seqs(&["1 {}", "2 {}", "4+ {}"]), Err(Unservable::Hole));
        // The first message of an empty room was lost; the tail reaches the start.
        assert_eq!(seqs(&["start", "2+ {}"]), Err(Unservable::Hole));
        assert_eq!(seqs(&["start", "1+ {}", "2+ {}"]), Ok((vec![1, 2], true)));
        // 6 landed early and 3-5 are not there yet: a page cut from the end would lack 6.
        assert_eq!(
            seqs(&["1 {}", "2 {}", "6+ {}", "3+ {}"]),
            Err(Unservable::Hole)
        );
    }

    #[test]
    fn entries_of_another_shape_are_malformed() {
        assert_eq!(seqs(&["1 {}", "start"]), Err(Unservable::Malformed));
        assert_eq!(seqs(&["x {}"]), Err(Unservable::Malformed));
        assert_eq!(seqs(&["1+{}"]), Err(Unservable::Malformed));
        assert_eq!(seqs(&["{\"seq\":1}"]), Err(Unservable::Malformed));
    }
}
