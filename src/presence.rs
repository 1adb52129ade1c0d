//! Presence: who is online in a room right now, across the cluster.
//!
//! A user is online in a room while at least one of their sockets, on any node, has joined it.
//! Each node reports only transitions of its own: the first local socket of a user in a room
//! (an arrival) and the last one leaving (a departure); the registry computes them under the hub
//! lock, so two tabs on one node count once. Across nodes, Redis keeps per room a hash
//! `user -> number of nodes where the user is present`: online count = HLEN (O(1)), the member
//! list is paged with HSCAN. A node that dies cannot depart: every node holds a lease key
//! (`node_lease_ms`, renewed at a third of it) and records its contributions in a set; any node
//! finding a lease expired removes the dead node's contributions in one script and announces
//! those users as gone.
//!
//! Transitions wait in [`PresenceChanges`], the latest per (room, user), and are recorded in
//! batches by one task (`ChatService::run_presence`): one round trip to Redis for a batch, and one
//! diff (`presence` push) published per room and batch, which each receiving node coalesces again
//! to at most one push per room per second (see `rooms`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use prometheus_client::metrics::gauge::Gauge;
use redis::{Script, ScriptInvocation};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::redis_conn::RedisConn;

pub use crate::protocol::OnlineUser;

/// A presence transition of this node: a user's first socket joined a room, or their last left.
#[derive(Debug, Clone)]
pub struct PresenceChange {
    pub room: String,
    pub user: OnlineUser,
    pub arrived: bool,
}

/// This node's presence transitions waiting to be recorded: the latest per (room, user).
///
/// Bound and overflow policy: one entry per (room, user) pair whose transition is not recorded
/// yet, so at most the node's sockets times `limits.max_rooms_per_connection`, however often
/// users come and go while the presence backend is slow or down. A newer transition of a pair
/// replaces the older one: recording is idempotent (arriving when recorded, or leaving when not,
/// changes nothing), so only the latest matters, and a reconnect's leave-then-return costs the
/// backend nothing when it had not recorded the leave yet.
///
/// Locking: `pending` is held only for map operations, never across `.await`. The room registry
/// pushes while holding a hub's lock (hub, then this; never the other way round).
pub struct PresenceChanges {
    pending: Mutex<HashMap<(String, String), PresenceChange>>,
    /// Wakes the presence task after a push.
    pushed: Notify,
    /// `chat_presence_backlog`: pairs waiting.
    backlog: Gauge,
}

impl PresenceChanges {
    pub fn new(backlog: Gauge) -> Self {
        Self {
            pending: Mutex::new(HashMap::new()),
            pushed: Notify::new(),
            backlog,
        }
    }

    /// Queues a transition, replacing a pending one of the same user in the same room.
    pub fn push(&self, change: PresenceChange) {
        {
            let mut pending = self.pending.lock().unwrap();
            let key = (change.room.clone(), change.user.user_id.clone());
            pending.insert(key, change);
            self.backlog.set(pending.len() as i64);
        }
        self.pushed.notify_one();
    }

    /// Takes up to `max` pending transitions (in no particular order: pairs are independent).
    pub fn take(&self, max: usize) -> Vec<PresenceChange> {
        let mut pending = self.pending.lock().unwrap();
        let keys: Vec<(String, String)> = pending.keys().take(max).cloned().collect();
        let taken = keys.iter().filter_map(|k| pending.remove(k)).collect();
        self.backlog.set(pending.len() as i64);
        taken
    }

    /// Returns transitions that could not be recorded, except where a newer one of the same pair
    /// was pushed meanwhile.
    pub fn put_back(&self, changes: Vec<PresenceChange>) {
        let mut pending = self.pending.lock().unwrap();
        for change in changes {
            let key = (change.room.clone(), change.user.user_id.clone());
            pending.entry(key).or_insert(change);
        }
        self.backlog.set(pending.len() as i64);
    }

    /// Waits for a push (returns at once if there was one since the last wait).
    pub async fn pushed(&self) {
        self.pushed.notified().await;
    }

    /// Pairs waiting.
    pub fn len(&self) -> usize {
        self.pending.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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
    /// Records this node's transitions, in order: an arrival (this node's first socket of the
    /// user joined the room) or a departure (its last one left). Returns, for each, the room's
    /// online count if the user just came online or went offline in the cluster, `None` if that
    /// changed nothing (already online elsewhere, still online elsewhere, or already recorded).
    /// Each transition is idempotent, so a batch that failed, even halfway, may be recorded again.
    async fn record(&self, changes: &[PresenceChange]) -> Result<Vec<Option<u64>>, PresenceError>;
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
    async fn record(&self, changes: &[PresenceChange]) -> Result<Vec<Option<u64>>, PresenceError> {
        let mut rooms = self.rooms.lock().unwrap();
        let outcomes = changes
            .iter()
            .map(|change| {
                let user = &change.user;
                if change.arrived {
                    let users = rooms.entry(change.room.clone()).or_default();
                    let new = users
                        .insert(user.user_id.clone(), user.name.clone())
                        .is_none();
                    return new.then_some(users.len() as u64);
                }
                let users = rooms.get_mut(&change.room)?;
                let gone = users.remove(&user.user_id).is_some();
                let online = users.len() as u64;
                if users.is_empty() {
                    rooms.remove(&change.room);
                }
                gone.then_some(online)
            })
            .collect();
        Ok(outcomes)
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

/// The cluster's presence in Redis. Per room (keys tagged with the room, so that on a Redis
/// Cluster one script touches one shard): the hash `presence:{room}` (user -> nodes where the user
/// is present), `presence:{room}:names` (user -> display name) and, per node present in the room,
/// the set `presence:{room}:node:{node}` of the users it counted there (what makes a repeated
/// arrival or departure count once, and what a reaper takes back). Per node: the set
/// `presence:rooms:{node}` of the rooms it counted someone in, its lease
/// `presence:lease:{node}`, and its id in `presence:nodes`.
pub struct RedisPresence {
    redis: RedisConn,
    node: String,
    lease: Duration,
    arrive: Script,
    depart: Script,
    reap: Script,
}

/// The outcome of one script call: the room's online count after a user went online or offline
/// there (negative when nothing changed), and how many users the node still counts in the room.
type Outcome = (i64, i64);

impl RedisPresence {
    pub fn new(redis: RedisConn, lease: Duration) -> Self {
        let node = uuid::Uuid::new_v4().simple().to_string();
        Self {
            redis,
            node,
            lease,
            // KEYS: room hash, names hash, the node's users in the room. ARGV: user, name.
            arrive: Script::new(
                r"if redis.call('SADD', KEYS[3], ARGV[1]) == 0 then return {-1, 1} end
                  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
                  local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
                  if n == 1 then return {redis.call('HLEN', KEYS[1]), 1} end
                  return {-1, 1}",
            ),
            // KEYS: room hash, names hash, the node's users in the room. ARGV: user.
            depart: Script::new(
                r"if redis.call('SREM', KEYS[3], ARGV[1]) == 0 then
                    return {-1, redis.call('SCARD', KEYS[3])}
                  end
                  local left = redis.call('SCARD', KEYS[3])
                  local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
                  if n <= 0 then
                    redis.call('HDEL', KEYS[1], ARGV[1])
                    redis.call('HDEL', KEYS[2], ARGV[1])
                    return {redis.call('HLEN', KEYS[1]), left}
                  end
                  return {-1, left}",
            ),
            // KEYS: room hash, names hash, the dead node's users in the room.
            // Returns {user, online, ...} for each user who went offline.
            reap: Script::new(
                r"local gone = {}
                  for _, user in ipairs(redis.call('SMEMBERS', KEYS[3])) do
                    local n = redis.call('HINCRBY', KEYS[1], user, -1)
                    if n <= 0 then
                      redis.call('HDEL', KEYS[1], user)
                      redis.call('HDEL', KEYS[2], user)
                      table.insert(gone, user)
                      table.insert(gone, redis.call('HLEN', KEYS[1]))
                    end
                  end
                  redis.call('DEL', KEYS[3])
                  return gone",
            ),
        }
    }

    fn room_key(&self, room: &str) -> String {
        self.redis
            .key(&format!("presence:{}", self.redis.tag(room)))
    }

    /// A node's users in a room: on the room's shard.
    fn counted(&self, room: &str, node: &str) -> String {
        format!("{}:node:{node}", self.room_key(room))
    }

    /// The rooms a node counted someone in: on the node's shard.
    fn rooms_of(&self, node: &str) -> String {
        self.redis
            .key(&format!("presence:rooms:{}", self.redis.tag(node)))
    }

    /// The `arrive` or `depart` script call for one transition.
    fn invocation(&self, change: &PresenceChange) -> ScriptInvocation<'_> {
        let room_key = self.room_key(&change.room);
        let user = &change.user.user_id;
        let mut invocation = if change.arrived {
            self.arrive.key(&room_key)
        } else {
            self.depart.key(&room_key)
        };
        invocation
            .key(format!("{room_key}:names"))
            .key(self.counted(&change.room, &self.node))
            .arg(user);
        if change.arrived {
            invocation.arg(change.user.name.as_deref().unwrap_or(""));
        }
        invocation
    }

    /// Loads the three scripts (on every primary of a cluster).
    async fn load_scripts(&self) -> redis::RedisResult<()> {
        let mut conn = self.redis.conn.clone();
        for script in [&self.arrive, &self.depart, &self.reap] {
            self.redis
                .bounded(script.prepare_invoke().load_async(&mut conn))
                .await?;
        }
        Ok(())
    }

    /// Takes back everything a dead node counted, room by room; `on_gone(room, user, online)` for
    /// each user left offline.
    async fn reap_node(
        &self,
        node: &str,
        on_gone: &(impl Fn(String, String, u64) + Send + Sync),
    ) -> redis::RedisResult<usize> {
        let mut conn = self.redis.conn.clone();
        let index = self.rooms_of(node);
        let rooms: Vec<String> = self
            .redis
            .bounded(redis::cmd("SMEMBERS").arg(&index).query_async(&mut conn))
            .await?;
        let mut users = 0;
        for room in rooms {
            let room_key = self.room_key(&room);
            let mut invocation = self.reap.key(&room_key);
            invocation
                .key(format!("{room_key}:names"))
                .key(self.counted(&room, node));
            let gone: Vec<(String, u64)> = self
                .redis
                .bounded(invocation.invoke_async(&mut conn))
                .await?;
            users += gone.len();
            for (user, online) in gone {
                on_gone(room.clone(), user, online);
            }
            let mut srem = redis::cmd("SREM");
            srem.arg(&index).arg(&room);
            self.redis
                .bounded(srem.query_async::<i64>(&mut conn))
                .await?;
        }
        // Two keys of two slots: two commands (a cluster pipeline must keep to one slot).
        let mut del = redis::cmd("DEL");
        del.arg(&index);
        self.redis.bounded(del.query_async::<()>(&mut conn)).await?;
        let mut srem = redis::cmd("SREM");
        srem.arg(self.redis.key("presence:nodes")).arg(node);
        self.redis
            .bounded(srem.query_async::<()>(&mut conn))
            .await?;
        Ok(users)
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
            let mut set = redis::cmd("SET");
            set.arg(&lease_key)
                .arg(1)
                .arg("PX")
                .arg(self.lease.as_millis() as u64);
            let mut sadd = redis::cmd("SADD");
            sadd.arg(&nodes).arg(&self.node);
            let renewed = async {
                self.redis.bounded(set.query_async::<()>(&mut conn)).await?;
                let mut conn = self.redis.conn.clone();
                self.redis.bounded(sadd.query_async::<()>(&mut conn)).await
            };
            if let Err(e) = renewed.await {
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
                match self.reap_node(node, &on_gone).await {
                    Ok(users) => tracing::info!(node, users, "reaped the presence of a dead node"),
                    Err(e) => {
                        tracing::warn!(error = %e, node, "reaping a dead node's presence failed")
                    }
                }
            }
        }
    }

    /// One pipeline for the transitions: each room's script call, and for an arrival the room
    /// added to this node's rooms (its own shard on a cluster, so not in the script).
    async fn record_once(&self, changes: &[PresenceChange]) -> redis::RedisResult<Vec<Outcome>> {
        let rooms = self.rooms_of(&self.node);
        if self.redis.is_cluster() {
            // A cluster pipeline must keep to one slot: the calls go out together instead, and
            // the cluster connection batches each shard's share on its connection.
            return self.record_sharded(&rooms, changes).await;
        }
        let mut pipe = redis::pipe();
        for change in changes {
            if change.arrived {
                pipe.cmd("SADD").arg(&rooms).arg(&change.room).ignore();
            }
            pipe.invoke_script(&self.invocation(change));
        }
        let mut conn = self.redis.conn.clone();
        self.redis.bounded(pipe.query_async(&mut conn)).await
    }

    async fn record_sharded(
        &self,
        rooms: &str,
        changes: &[PresenceChange],
    ) -> redis::RedisResult<Vec<Outcome>> {
        let arrived: Vec<&str> = changes
            .iter()
            .filter(|c| c.arrived)
            .map(|c| c.room.as_str())
            .collect();
        if !arrived.is_empty() {
            let mut sadd = redis::cmd("SADD");
            sadd.arg(rooms).arg(&arrived);
            let mut conn = self.redis.conn.clone();
            self.redis
                .bounded(sadd.query_async::<()>(&mut conn))
                .await?;
        }
        let calls = changes.iter().map(|change| async move {
            let mut conn = self.redis.conn.clone();
            let invocation = self.invocation(change);
            invocation.invoke_async::<Outcome>(&mut conn).await
        });
        self.redis
            .bounded(futures::future::try_join_all(calls))
            .await
    }
}

#[async_trait]
impl Presence for RedisPresence {
    /// One pipeline, one round trip (scripts are loaded first when Redis does not have them:
    /// a first start, a restart, a promoted replica). A room this node no longer counts anyone
    /// in leaves its rooms with a second, rarer round trip.
    async fn record(&self, changes: &[PresenceChange]) -> Result<Vec<Option<u64>>, PresenceError> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let outcomes = match self.record_once(changes).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                // Arrivals and departures count once however often they are run: run them again.
                self.load_scripts().await?;
                self.record_once(changes).await?
            }
            other => other?,
        };
        // What the node counts in each room after the batch: its last transition there says.
        let mut left: HashMap<&str, i64> = HashMap::new();
        for (change, (_, count)) in changes.iter().zip(&outcomes) {
            left.insert(&change.room, *count);
        }
        let emptied: Vec<&str> = left
            .into_iter()
            .filter(|(_, count)| *count == 0)
            .map(|(room, _)| room)
            .collect();
        if !emptied.is_empty() {
            let mut srem = redis::cmd("SREM");
            srem.arg(self.rooms_of(&self.node)).arg(&emptied);
            let mut conn = self.redis.conn.clone();
            if let Err(e) = self.redis.bounded(srem.query_async::<i64>(&mut conn)).await {
                tracing::debug!(error = %e, "rooms left empty not dropped from the node's set");
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|(n, _)| (n >= 0).then_some(n as u64))
            .collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn change(room: &str, user: &str, arrived: bool) -> PresenceChange {
        PresenceChange {
            room: room.to_string(),
            user: OnlineUser {
                user_id: user.to_string(),
                name: None,
            },
            arrived,
        }
    }

    #[test]
    fn a_user_coming_and_going_waits_as_one_change_the_latest() {
        let backlog = Gauge::default();
        let changes = PresenceChanges::new(backlog.clone());
        for i in 0..10_000 {
            changes.push(change("r", "alice", i % 2 == 0));
        }
        changes.push(change("r", "bob", true));
        changes.push(change("other", "alice", true));
        assert_eq!(changes.len(), 3, "one per (room, user)");
        assert_eq!(backlog.get(), 3);
        let mut taken = changes.take(10);
        taken.sort_by(|a, b| (&a.room, &a.user.user_id).cmp(&(&b.room, &b.user.user_id)));
        let seen: Vec<(&str, &str, bool)> = taken
            .iter()
            .map(|c| (c.room.as_str(), c.user.user_id.as_str(), c.arrived))
            .collect();
        assert_eq!(
            seen,
            [
                ("other", "alice", true),
                ("r", "alice", false),
                ("r", "bob", true)
            ],
            "the last of alice's 10,000 changes in r was a departure"
        );
        assert!(changes.is_empty());
        assert_eq!(backlog.get(), 0);
    }

    #[test]
    fn a_change_put_back_after_a_failure_never_replaces_a_newer_one() {
        let changes = PresenceChanges::new(Gauge::default());
        changes.push(change("r", "alice", true));
        changes.push(change("r", "bob", true));
        let failed = changes.take(2);
        assert!(changes.is_empty());
        // While the batch was out, alice left again.
        changes.push(change("r", "alice", false));
        changes.put_back(failed);
        let mut back = changes.take(10);
        back.sort_by(|a, b| a.user.user_id.cmp(&b.user.user_id));
        assert_eq!(back.len(), 2);
        assert!(!back[0].arrived, "alice's newer departure stays");
        assert!(back[1].arrived, "bob's arrival waits again");
    }

    #[test]
    fn take_hands_out_at_most_the_batch_size() {
        let changes = PresenceChanges::new(Gauge::default());
        for u in 0..25 {
            changes.push(change("r", &format!("u{u}"), true));
        }
        assert_eq!(changes.take(10).len(), 10);
        assert_eq!(changes.take(10).len(), 10);
        assert_eq!(changes.take(10).len(), 5);
        assert!(changes.take(10).is_empty());
    }

    #[tokio::test]
    async fn memory_presence_counts_each_user_once_and_ignores_repeats() {
        let presence = MemoryPresence::default();
        let outcomes = presence
            .record(&[
                change("r", "alice", true),
                change("r", "bob", true),
                change("r", "alice", true),
                change("r", "alice", false),
                change("r", "alice", false),
                change("r", "carol", false),
            ])
            .await
            .unwrap();
        assert_eq!(outcomes, [Some(1), Some(2), None, Some(1), None, None]);
        assert_eq!(presence.count("r").await.unwrap(), 1);
    }
}
