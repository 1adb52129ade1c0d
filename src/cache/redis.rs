//! The history cache in Redis, shared by every node: the same tails, older pages and generations
//! as the in-process cache (see the module doc of [`super`]), each operation one round trip, the
//! tail's checks and writes atomic in a script.
//!
//! Keys (proto-docs/redis.md): `{prefix}messages:{roomId}:tail` (the tail), `…:gen` (the room's
//! generation, bumped by every append), `…:refresh` (a node is re-reading the tail), and older
//! pages under the seed's key `{prefix}messages:{roomId}:{limit}:{before}`, as plain page JSON.
//!
//! A tail is text: a header line `"{last seq} {complete 0|1} {count}\n"`, then one line per
//! message, oldest first, `"{seq} {message JSON}\n"` (compact JSON never holds a newline). The
//! append script reads the header to decide, appends a line and drops the first one when the
//! tail is full, with `SET … KEEPTTL`, so appends never extend a tail's life.
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

/// KEYS: generation, tail, refresh claim. ARGV: half the TTL (ms).
/// Returns the generation, the tail (`""` when none) and 1 when this reader is to refresh it.
const LOOKUP: &str = r"
local generation = redis.call('GET', KEYS[1]) or '0'
local tail = redis.call('GET', KEYS[2])
if not tail then return {generation, '', 0} end
local refresh = 0
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[1])
   and redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[1]) then
  refresh = 1
end
return {generation, tail, refresh}";

/// KEYS: generation, tail. ARGV: the generation the miss saw, the tail, the TTL (ms).
const FILL: &str = r"
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1";

/// KEYS: generation, tail. ARGV: seq, message JSON, tail length, generation TTL (ms).
/// Returns 0: no tail, 1: already held, 2: dropped (a gap), 3: appended.
const APPEND: &str = r"
redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local tail = redis.call('GET', KEYS[2])
if not tail then return 0 end
local eol = string.find(tail, '\n', 1, true)
local last, complete, count
if eol then
  last, complete, count = string.match(string.sub(tail, 1, eol - 1), '^(%d+) ([01]) (%d+)$')
end
local seq = tonumber(ARGV[1])
if last and seq <= tonumber(last) then return 1 end
if not last or seq ~= tonumber(last) + 1 then
  redis.call('DEL', KEYS[2])
  return 2
end
local lines = string.sub(tail, eol + 1)
count = tonumber(count) + 1
if count > tonumber(ARGV[3]) then
  lines = string.sub(lines, string.find(lines, '\n', 1, true) + 1)
  count = count - 1
  complete = '0'
end
redis.call('SET', KEYS[2],
  ARGV[1] .. ' ' .. complete .. ' ' .. count .. '\n' .. lines .. ARGV[1] .. ' ' .. ARGV[2] .. '\n',
  'KEEPTTL')
return 3";

pub struct RedisHistoryCache {
    redis: RedisConn,
    ttl: Duration,
    tail_len: usize,
    lookup: Script,
    fill: Script,
    append: Script,
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
        }
    }

    fn room_key(&self, room: &str, what: &str) -> String {
        self.redis.key(&format!("messages:{room}:{what}"))
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }
}

/// The seed's key of an older page.
fn older_key(room: &str, limit: u32, before: i64) -> String {
    format!("messages:{room}:{limit}:{before}")
}

/// Whether text read from Redis is one JSON value. Redis is shared: whatever is read from it is
/// checked before it is served, so the doors can pass pages on as they are.
fn is_json(text: &str) -> bool {
    serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok()
}

/// A tail as stored in Redis (see the module doc).
fn encode_tail(tail: &Tail) -> String {
    let bytes: usize = tail.messages.iter().map(|m| m.json.len() + 24).sum();
    let mut text = String::with_capacity(bytes + 32);
    let count = tail.messages.len();
    let complete = u8::from(tail.complete);
    text.push_str(&format!("{} {complete} {count}\n", tail.last_seq()));
    for m in &tail.messages {
        debug_assert!(!m.json.contains('\n'), "compact JSON has no newline");
        text.push_str(&m.seq.to_string());
        text.push(' ');
        text.push_str(&m.json);
        text.push('\n');
    }
    text
}

/// A stored tail's messages (borrowed from the text) and whether it reaches the room's start;
/// `None` when the text is not a tail.
fn decode_tail(text: &str) -> Option<(Vec<MessageJson<&str>>, bool)> {
    let (header, lines) = text.split_once('\n')?;
    let mut fields = header.split(' ');
    let (_last, complete) = (fields.next()?, fields.next()?);
    let messages = lines
        .split_terminator('\n')
        .map(|line| {
            let (seq, json) = line.split_once(' ')?;
            Some(MessageJson {
                seq: seq.parse().ok()?,
                json,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some((messages, complete == "1"))
}

#[async_trait]
impl HistoryCache for RedisHistoryCache {
    async fn latest(&self, room: &str, limit: u32) -> Latest {
        let mut conn = self.redis.conn.clone();
        let mut invocation = self.lookup.key(self.room_key(room, "gen"));
        invocation
            .key(self.room_key(room, "tail"))
            .key(self.room_key(room, "refresh"))
            .arg(self.ttl_ms() / 2);
        let found: Result<(u64, String, u8), _> =
            self.redis.bounded(invocation.invoke_async(&mut conn)).await;
        let (generation, tail, refresh) = match found {
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
        if tail.is_empty() {
            return Latest::Miss(token());
        }
        let Some((messages, complete)) = decode_tail(&tail) else {
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
            .key(self.room_key(&token.room, "tail"))
            .arg(generation)
            .arg(encode_tail(&tail))
            .arg(self.ttl_ms());
        let result: Result<i64, _> = self.redis.bounded(invocation.invoke_async(&mut conn)).await;
        if let Err(e) = result {
            self.redis.log_failure("history cache write failed", &e);
        }
    }

    async fn append(&self, room: &str, message: &MessageJson) {
        let mut conn = self.redis.conn.clone();
        let mut invocation = self.append.key(self.room_key(room, "gen"));
        invocation
            .key(self.room_key(room, "tail"))
            .arg(message.seq)
            .arg(&*message.json)
            .arg(self.tail_len)
            .arg(GENERATION_TTL_MS);
        let result: Result<i64, _> = self.redis.bounded(invocation.invoke_async(&mut conn)).await;
        if let Err(e) = result {
            // The message is stored; see the module doc for how long the tail may miss it.
            self.redis.log_failure("history cache append failed", &e);
        }
    }

    async fn older(&self, room: &str, limit: u32, before: i64) -> Option<Utf8Bytes> {
        let mut conn = self.redis.conn.clone();
        let key = self.redis.key(&older_key(room, limit, before));
        let found: Result<Option<String>, _> = self
            .redis
            .bounded(redis::cmd("GET").arg(key).query_async(&mut conn))
            .await;
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
        let key = self.redis.key(&older_key(room, limit, before));
        let result: Result<(), _> = self
            .redis
            .bounded(
                redis::cmd("SET")
                    .arg(key)
                    .arg(page.as_bytes())
                    .arg("PX")
                    .arg(self.ttl_ms())
                    .query_async(&mut conn),
            )
            .await;
        if let Err(e) = result {
            self.redis.log_failure("history cache write failed", &e);
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
                    json: format!(r#"{{"seq":{seq},"content":"a b\nc"}}"#)
                        .replace('\n', "\\n")
                        .into(),
                })
                .collect(),
            complete: false,
        };
        let text = encode_tail(&tail);
        assert!(text.starts_with("6 0 3\n4 {"), "{text}");
        let (messages, complete) = decode_tail(&text).unwrap();
        assert!(!complete);
        assert_eq!(
            messages.iter().map(|m| (m.seq, m.json)).collect::<Vec<_>>(),
            tail.messages
                .iter()
                .map(|m| (m.seq, &*m.json))
                .collect::<Vec<_>>()
        );
        assert!(decode_tail("not a tail").is_none());
    }
}
