//! Presence: who is online in a room right now, across the cluster.
//!
//! A user is online in a room while at least one of their sockets, on any node, has joined it.
//! Each node reports only transitions of its own: the first local socket of a user in a room
//! (`arrive`) and the last one leaving (`depart`); the registry computes them under the hub lock,
//! so two tabs on one node count once. Across nodes, Redis keeps per room a hash
//! `user -> number of nodes where the user is present`: online count = HLEN (O(1)), the member
//! list is paged with HSCAN. A node that dies cannot depart: every node holds a lease key
//! (`node_lease_ms`, renewed at a third of it) and records its contributions in a set; any node
//! finding a lease expired removes the dead node's contributions in one script and announces
//! those users as gone.
//!
//! Diffs (`presence` pushes) are published per transition and coalesced by each receiving node
//! to at most one push per room per second (see `rooms`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use tokio_util::sync::CancellationToken;

use crate::redis_conn::RedisConn;

/// One user in a presence list.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OnlineUser {
    #[serde(rename = "userId")]
    pub user_id: String,
    pub name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("presence unavailable: {0}")]
pub struct PresenceError(pub String);

impl From<redis::RedisError> for PresenceError {
    fn from(e: redis::RedisError) -> Self {
        PresenceError(e.to_string())
    }
}

#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// This node's first socket of `user` joined `room`. Returns the room's online count if the
    /// user just came online in the cluster, `None` if they already were.
    async fn arrive(&self, room: &str, user: &OnlineUser) -> Result<Option<u64>, PresenceError>;
    /// This node's last socket of `user` left `room`. Returns the room's online count if the user
    /// just went offline in the cluster.
    async fn depart(&self, room: &str, user: &str) -> Result<Option<u64>, PresenceError>;
    /// How many users are online in the room.
    async fn count(&self, room: &str) -> Result<u64, PresenceError>;
    /// A page of the room's online users, and the cursor of the next page.
    async fn list(
        &self,
        room: &str,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<OnlineUser>, Option<String>), PresenceError>;
}

/// One node: presence is this node's own sockets.
#[derive(Default)]
pub struct MemoryPresence {
    /// room -> user -> name. Locked only for map operations.
    rooms: Mutex<HashMap<String, std::collections::BTreeMap<String, Option<String>>>>,
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn arrive(&self, room: &str, user: &OnlineUser) -> Result<Option<u64>, PresenceError> {
        let mut rooms = self.rooms.lock().unwrap();
        let users = rooms.entry(room.to_string()).or_default();
        let new = users
            .insert(user.user_id.clone(), user.name.clone())
            .is_none();
        Ok(new.then_some(users.len() as u64))
    }

    async fn depart(&self, room: &str, user: &str) -> Result<Option<u64>, PresenceError> {
        let mut rooms = self.rooms.lock().unwrap();
        let Some(users) = rooms.get_mut(room) else {
            return Ok(None);
        };
        let gone = users.remove(user).is_some();
        let online = users.len() as u64;
        if users.is_empty() {
            rooms.remove(room);
        }
        Ok(gone.then_some(online))
    }

    async fn count(&self, room: &str) -> Result<u64, PresenceError> {
        Ok(self
            .rooms
            .lock()
            .unwrap()
            .get(room)
            .map_or(0, |u| u.len() as u64))
    }

    async fn list(
        &self,
        room: &str,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<OnlineUser>, Option<String>), PresenceError> {
        let rooms = self.rooms.lock().unwrap();
        let Some(users) = rooms.get(room) else {
            return Ok((Vec::new(), None));
        };
        let after = cursor.unwrap_or("");
        let mut page: Vec<OnlineUser> = users
            .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            .take(limit as usize + 1)
            .map(|(id, name)| OnlineUser {
                user_id: id.clone(),
                name: name.clone(),
            })
            .collect();
        let next = (page.len() > limit as usize).then(|| {
            page.truncate(limit as usize);
            page.last().map(|u| u.user_id.clone()).unwrap_or_default()
        });
        Ok((page, next))
    }
}

/// The cluster's presence in Redis.
pub struct RedisPresence {
    redis: RedisConn,
    node: String,
    lease: Duration,
    arrive: Script,
    depart: Script,
    reap: Script,
}

impl RedisPresence {
    pub fn new(redis: RedisConn, lease: Duration) -> Self {
        let node = uuid::Uuid::new_v4().simple().to_string();
        Self {
            redis,
            node,
            lease,
            // KEYS: room hash, names hash, node set. ARGV: user, name, member.
            arrive: Script::new(
                r"if redis.call('SADD', KEYS[3], ARGV[3]) == 0 then return -1 end
                  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
                  local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
                  if n == 1 then return redis.call('HLEN', KEYS[1]) end
                  return -1",
            ),
            // KEYS: room hash, names hash, node set. ARGV: user, member.
            depart: Script::new(
                r"if redis.call('SREM', KEYS[3], ARGV[2]) == 0 then return -1 end
                  local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
                  if n <= 0 then
                    redis.call('HDEL', KEYS[1], ARGV[1])
                    redis.call('HDEL', KEYS[2], ARGV[1])
                    return redis.call('HLEN', KEYS[1])
                  end
                  return -1",
            ),
            // KEYS: dead node's set, nodes set. ARGV: key prefix, dead node id.
            // Returns {room, user, online, ...} for each user who went offline.
            reap: Script::new(
                r"local gone = {}
                  for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
                    local sep = string.find(member, '\n', 1, true)
                    local room = string.sub(member, 1, sep - 1)
                    local user = string.sub(member, sep + 1)
                    local hash = ARGV[1] .. 'presence:' .. room
                    local n = redis.call('HINCRBY', hash, user, -1)
                    if n <= 0 then
                      redis.call('HDEL', hash, user)
                      redis.call('HDEL', hash .. ':names', user)
                      table.insert(gone, room)
                      table.insert(gone, user)
                      table.insert(gone, redis.call('HLEN', hash))
                    end
                  end
                  redis.call('DEL', KEYS[1])
                  redis.call('SREM', KEYS[2], ARGV[2])
                  return gone",
            ),
        }
    }

    fn room_key(&self, room: &str) -> String {
        self.redis.key(&format!("presence:{room}"))
    }

    fn node_set(&self, node: &str) -> String {
        self.redis.key(&format!("presence:node:{node}"))
    }

    /// Keeps this node's lease alive and reaps nodes whose lease expired, until `stop`.
    /// `on_gone(room, user, online)` is called for each user a reaped node leaves offline.
    pub async fn run_janitor(
        &self,
        on_gone: impl Fn(String, String, u64) + Send + Sync,
        stop: CancellationToken,
    ) {
        let nodes = self.redis.key("presence:nodes");
        let mut every = tokio::time::interval(self.lease / 3);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.cancelled() => return,
            }
            let mut conn = self.redis.conn.clone();
            let lease_key = self.redis.key(&format!("presence:lease:{}", self.node));
            let mut pipe = redis::pipe();
            pipe.cmd("SET")
                .arg(&lease_key)
                .arg(1)
                .arg("PX")
                .arg(self.lease.as_millis() as u64)
                .ignore();
            pipe.cmd("SADD").arg(&nodes).arg(&self.node).ignore();
            if let Err(e) = self.redis.bounded(pipe.query_async::<()>(&mut conn)).await {
                tracing::warn!(error = %e, "presence lease not renewed");
                continue;
            }
            let members: Vec<String> = match self
                .redis
                .bounded(redis::cmd("SMEMBERS").arg(&nodes).query_async(&mut conn))
                .await
            {
                Ok(m) => m,
                Err(_) => continue,
            };
            for node in members.iter().filter(|n| **n != self.node) {
                let lease = self.redis.key(&format!("presence:lease:{node}"));
                let alive: bool = match self
                    .redis
                    .bounded(redis::cmd("EXISTS").arg(&lease).query_async(&mut conn))
                    .await
                {
                    Ok(alive) => alive,
                    Err(_) => continue,
                };
                if alive {
                    continue;
                }
                let mut invocation = self.reap.key(self.node_set(node));
                invocation.key(&nodes).arg(self.redis.key("")).arg(node);
                let gone: Vec<redis::Value> = match self
                    .redis
                    .bounded(invocation.invoke_async(&mut conn))
                    .await
                {
                    Ok(gone) => gone,
                    Err(e) => {
                        tracing::warn!(error = %e, node, "reaping a dead node's presence failed");
                        continue;
                    }
                };
                tracing::info!(
                    node,
                    users = gone.len() / 3,
                    "reaped the presence of a dead node"
                );
                for triple in gone.chunks(3) {
                    if let [room, user, online] = triple {
                        let text = |v: &redis::Value| {
                            redis::from_redis_value::<String>(v.clone()).unwrap_or_default()
                        };
                        let online = redis::from_redis_value::<u64>(online.clone()).unwrap_or(0);
                        on_gone(text(room), text(user), online);
                    }
                }
            }
        }
    }
}

#[async_trait]
impl Presence for RedisPresence {
    async fn arrive(&self, room: &str, user: &OnlineUser) -> Result<Option<u64>, PresenceError> {
        let mut conn = self.redis.conn.clone();
        let room_key = self.room_key(room);
        let mut invocation = self.arrive.key(&room_key);
        invocation
            .key(format!("{room_key}:names"))
            .key(self.node_set(&self.node))
            .arg(&user.user_id)
            .arg(user.name.as_deref().unwrap_or(""))
            .arg(format!("{room}\n{}", user.user_id));
        let online: i64 = self
            .redis
            .bounded(invocation.invoke_async(&mut conn))
            .await?;
        Ok((online >= 0).then_some(online as u64))
    }

    async fn depart(&self, room: &str, user: &str) -> Result<Option<u64>, PresenceError> {
        let mut conn = self.redis.conn.clone();
        let room_key = self.room_key(room);
        let mut invocation = self.depart.key(&room_key);
        invocation
            .key(format!("{room_key}:names"))
            .key(self.node_set(&self.node))
            .arg(user)
            .arg(format!("{room}\n{user}"));
        let online: i64 = self
            .redis
            .bounded(invocation.invoke_async(&mut conn))
            .await?;
        Ok((online >= 0).then_some(online as u64))
    }

    async fn count(&self, room: &str) -> Result<u64, PresenceError> {
        let mut conn = self.redis.conn.clone();
        let key = self.room_key(room);
        Ok(self
            .redis
            .bounded(redis::cmd("HLEN").arg(key).query_async(&mut conn))
            .await?)
    }

    async fn list(
        &self,
        room: &str,
        cursor: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<OnlineUser>, Option<String>), PresenceError> {
        let mut conn = self.redis.conn.clone();
        let key = self.room_key(room);
        let mut scan = redis::cmd("HSCAN");
        scan.arg(&key)
            .arg(cursor.unwrap_or("0"))
            .arg("COUNT")
            .arg(limit);
        let (next, pairs): (String, Vec<(String, i64)>) =
            self.redis.bounded(scan.query_async(&mut conn)).await?;
        let ids: Vec<String> = pairs.into_iter().map(|(user, _)| user).collect();
        let names: Vec<Option<String>> = if ids.is_empty() {
            Vec::new()
        } else {
            let mut get = redis::cmd("HMGET");
            get.arg(format!("{key}:names")).arg(&ids);
            self.redis.bounded(get.query_async(&mut conn)).await?
        };
        let users = ids
            .into_iter()
            .zip(names)
            .map(|(user_id, name)| OnlineUser {
                user_id,
                name: name.filter(|n| !n.is_empty()),
            })
            .collect();
        Ok((users, (next != "0").then_some(next)))
    }
}
