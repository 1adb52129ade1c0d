//! The history cache in Redis, shared by every node: the same tails, older pages and generations
//! as the in-process cache (see the module doc of [`super`]), each operation one round trip, the
//! tail's checks and writes atomic in a script. A send's append also carries the message's
//! publish ([`RedisHistoryCache::append_and_publish`], used by the broker's `RedisAnnouncer`).
//!
//! Keys (proto-docs/redis.md): `{prefix}messages:{roomId}:list` and `…:last` (the tail), `…:gen`
//! (the room's generation, bumped by every append), `…:refresh` (a node is re-reading the tail),
//! `…:changed` (a message of the room changed in the last TTL: older pages are not used),
//! and older pages under the seed's key `{prefix}messages:{roomId}:{limit}:{before}`, as plain
//! page JSON.
//!
//! A tail is a list of its messages, oldest first, each `"{seq} {message JSON}"`, and a header
//! string `"{last seq} {complete 0|1}"`, both set with the same expiry when a store read fills
//! them. An append costs the same whatever the tail's length: the script reads the header to
//! decide, `RPUSH`es the message, `LTRIM`s the oldest when the tail is full and rewrites the
//! header with `KEEPTTL`, so appends never extend a tail's life. A lookup reads the header and
//! only the newest `limit + 1` entries of the list.
//!
//! Pages read from Redis are checked to be JSON before they are served (a miss otherwise).
//!
//! When Redis fails, lookups count as misses (the store answers) and nothing is cached. A failed
//! append leaves the tail without that message until the next send to the room (a gap, which
//! drops it), its refresh, or its expiry: at most `cache.history_ttl_ms`.

use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use redis::Script;

use super::{HistoryCache, Latest, MissToken, Tail, latest_page};
use crate::protocol::MessageJson;
use crate::redis_conn::RedisConn;

/// Generations are kept far longer than any tail, so a tail never outlives its generation key.
const GENERATION_TTL_MS: u64 = 24 * 3600 * 1000;

/// KEYS: generation, tail header, tail list, refresh claim. ARGV: half the TTL (ms), how many of
/// the newest entries to read. Returns the generation, the header (`""` when there is no tail),
/// those entries (oldest first) and 1 when this reader is to refresh the tail.
const LOOKUP: &str = r"
local generation = redis.call('GET', KEYS[1]) or '0'
local header = redis.call('GET', KEYS[2])
if not header then return {generation, '', {}, 0} end
local entries = redis.call('LRANGE', KEYS[3], -tonumber(ARGV[2]), -1)
local refresh = 0
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[1])
   and redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[1]) then
  refresh = 1
end
return {generation, header, entries, refresh}";

/// KEYS: generation, tail header, tail list. ARGV: the generation the miss saw, the header, the
/// TTL (ms), then the entries, oldest first.
const FILL: &str = r"
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[3])
if #ARGV > 3 then
  redis.call('RPUSH', KEYS[3], unpack(ARGV, 4))
  redis.call('PEXPIRE', KEYS[3], ARGV[3])
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1";

/// KEYS: generation, tail header, tail list. ARGV: seq ("" to append nothing), message JSON, tail
/// length, generation TTL (ms), and optionally a publish: the command (`PUBLISH`, or `SPUBLISH` on
/// a cluster, where the room's channel shares the keys' slot), the channel and the payload.
/// Returns 0: no tail, 1: already held, 2: dropped (a gap), 3: appended, -1: nothing to append.
const APPEND: &str = r"
local function append()
  redis.call('INCR', KEYS[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  local header = redis.call('GET', KEYS[2])
  if not header then return 0 end
  local last, complete = string.match(header, '^(%d+) ([01])$')
  local seq = tonumber(ARGV[1])
  if last and seq <= tonumber(last) then return 1 end
  if not last or seq ~= tonumber(last) + 1 then
    redis.call('DEL', KEYS[2], KEYS[3])
    return 2
  end
  local n = redis.call('RPUSH', KEYS[3], ARGV[1] .. ' ' .. ARGV[2])
  if n == 1 then
    -- The tail was empty (an empty room): the list lives as long as its header.
    redis.call('PEXPIRE', KEYS[3], math.max(redis.call('PTTL', KEYS[2]), 1))
  end
  local max = tonumber(ARGV[3])
  if n > max then
    redis.call('LTRIM', KEYS[3], n - max, -1)
    complete = '0'
  end
  redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. complete, 'KEEPTTL')
  return 3
end
local appended = -1
if ARGV[1] ~= '' then appended = append() end
if ARGV[5] then redis.call(ARGV[5], ARGV[6], ARGV[7]) end
return appended";

/// KEYS: generation, tail header, tail list, and for a change the room's changed mark. ARGV:
/// generation TTL (ms), and for a change the mark's TTL (ms).
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
    append: Script,
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
            append: Script::new(APPEND),
            forget: Script::new(FORGET),
            older: Script::new(OLDER),
            put_older: Script::new(PUT_OLDER),
        }
    }

    /// Appends `message` to the room's tail (when given) and publishes `publish` (command,
    /// channel, payload) in the same script: one round trip, the append first. The room's
    /// channel must live in the room's slot on a cluster (it carries the same hash tag).
    pub async fn append_and_publish(
        &self,
        room: &str,
        message: Option<&MessageJson>,
        publish: Option<(&str, &str, &[u8])>,
    ) -> redis::RedisResult<i64> {
        let mut conn = self.redis.conn.clone();
        let mut invocation = self.append.key(self.room_key(room, "gen"));
        invocation
            .key(self.room_key(room, "last"))
            .key(self.room_key(room, "list"));
        match message {
            Some(message) => invocation.arg(message.seq).arg(&*message.json),
            None => invocation.arg("").arg(""),
        };
        invocation.arg(self.tail_len).arg(GENERATION_TTL_MS);
        if let Some((command, channel, payload)) = publish {
            invocation.arg(command).arg(channel).arg(payload);
        }
        self.redis.bounded(invocation.invoke_async(&mut conn)).await
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

/// A tail's header as stored in Redis: `"{last seq} {complete 0|1}"`.
fn encode_header(tail: &Tail) -> String {
    format!("{} {}", tail.last_seq(), u8::from(tail.complete))
}

/// A tail's entry as stored in Redis: `"{seq} {message JSON}"`.
fn encode_entry(seq: i64, json: &str) -> String {
    format!("{seq} {json}")
}

/// The messages of the newest entries read and whether they reach the room's start, from a tail's
/// header and those entries (all of the tail's when fewer than were asked for); `None` when they
/// are not a tail (or the list expired before its header: a tail of a room with messages is never
/// empty).
fn decode_tail<'a>(
    header: &str,
    entries: &'a [String],
    asked: usize,
) -> Option<(Vec<MessageJson<&'a str>>, bool)> {
    let (last, complete) = header.split_once(' ')?;
    let last: i64 = last.parse().ok()?;
    if last > 0 && entries.is_empty() {
        return None;
    }
    let messages = entries
        .iter()
        .map(|entry| {
            let (seq, json) = entry.split_once(' ')?;
            Some(MessageJson {
                seq: seq.parse().ok()?,
                json,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    // Fewer entries than asked for: the whole tail; as many: more may be older, and only the
    // header's flag for the whole tail says whether they reach the start.
    let complete = complete == "1" && entries.len() < asked;
    Some((messages, complete))
}

#[async_trait]
impl HistoryCache for RedisHistoryCache {
    async fn latest(&self, room: &str, limit: u32) -> Latest {
        let mut conn = self.redis.conn.clone();
        // One more than the page: whether an older message exists.
        let asked = limit as usize + 1;
        let mut invocation = self.lookup.key(self.room_key(room, "gen"));
        invocation
            .key(self.room_key(room, "last"))
            .key(self.room_key(room, "list"))
            .key(self.room_key(room, "refresh"))
            .arg(self.ttl_ms() / 2)
            .arg(asked);
        let found: Result<(u64, String, Vec<String>, u8), _> =
            self.redis.bounded(invocation.invoke_async(&mut conn)).await;
        let (generation, header, entries, refresh) = match found {
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
        if header.is_empty() {
            return Latest::Miss(token());
        }
        let Some((messages, complete)) = decode_tail(&header, &entries, asked) else {
            tracing::warn!(
                room,
                "a cached history tail is malformed; reading the store"
            );
            return Latest::Miss(token());
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
        let entries: Vec<String> = tail
            .messages
            .iter()
            .map(|m| encode_entry(m.seq, &m.json))
            .collect();
        // The whole tail read (fewer entries than asked for): it reaches the start.
        let (messages, complete) = decode_tail("6 1", &entries, 4).unwrap();
        assert!(complete);
        assert_eq!(
            messages.iter().map(|m| (m.seq, m.json)).collect::<Vec<_>>(),
            tail.messages
                .iter()
                .map(|m| (m.seq, &*m.json))
                .collect::<Vec<_>>()
        );
        // As many as asked for: older entries may exist.
        assert!(!decode_tail("6 1", &entries[1..], 2).unwrap().1);
        assert!(decode_tail("not a tail", &entries, 4).is_none());
        assert!(
            decode_tail("6 1", &[], 4).is_none(),
            "the list expired first"
        );
        assert!(
            decode_tail("0 1", &[], 4).unwrap().0.is_empty(),
            "an empty room"
        );
    }
}
