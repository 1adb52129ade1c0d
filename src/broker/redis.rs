//! Fan-out across nodes through Redis pub/sub.
//!
//! Channel per room: `{prefix}chat:room:{roomId}`. A node subscribes to a room's channel only while
//! it has local members in the room (reference-counted per hub), and unsubscribes when the last one
//! leaves. Envelopes (proto-docs/redis.md):
//! - `{"type":"message","room":…,"message":{"seq":N,…}}`: a persisted message, published by a
//!   gateway after commit: the push sockets receive, with the sender's profile (each node's room
//!   decides whether its own sockets need it, and cuts it off otherwise, without parsing again).
//! - `{"type":"change","room":…,"change":{"seq":N,…}}`: a change of a stored message (an edit, a
//!   deletion, a reaction, moderation), published after its commit: the push sockets receive, in
//!   the room's sequence like a message.
//! - `{"type":"member_removed","room":…,"userId":…}`: that user's sockets leave the room.
//! - `{"type":"event","room":…,"event":{…}}`: ephemeral, published by backend services; pushed to
//!   the room's sockets as is, never stored, no sequence.
//! - `{"type":"read","room":…,"userId":…,"seq":N}`: a read receipt, published by gateways; pushed
//!   as is to the room's sockets.
//! - `{"type":"typing","room":…,"userId":…,…}`: ephemeral, published by gateways; pushed as is to
//!   the room's sockets except the typer's own.
//!
//! A node delivers its own messages locally at once and drops the echo from Redis (the sequencer
//! sees the seq again). Pub/sub is at-most-once: a message lost while the subscription is down is
//! read from the store when the next message of the room reveals the gap, and every room is
//! re-synchronized from the store as soon as the subscription is back.
//!
//! On a Redis Cluster the room's channel is sharded: `{prefix}chat:room:{{roomId}}` (the room id
//! in braces is the hash tag), published with `SPUBLISH` and received with `SSUBSCRIBE` on the
//! shard that owns its slot, so each shard carries only its own rooms' traffic. The `redis`
//! crate's cluster connection (RESP3, pushes) routes each `SSUBSCRIBE` to the owner and
//! re-subscribes after a reconnect or a topology change. What it does not do, done here: a shard
//! that loses a slot (a migration, a failover) sends `sunsubscribe` for its channels, and the
//! crate forgets them; a room still wanted is subscribed again (the crate follows `MOVED` to the
//! new owner). Every re-confirmed subscription, whoever made it, catches that room up from the
//! store, since what was published while it was away is lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use redis::aio::PubSubSink;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{Announcer, Broker, BrokerError, EventSink, PresenceDiff, Published, RoomEvent};
use crate::redis_conn::{RedisConn, Topology};

const CHANNEL: &str = "chat:room:";
/// How often a cluster's rooms whose subscription was lost are subscribed again.
const RESUBSCRIBE_EVERY: Duration = Duration::from_millis(250);

/// Runs `connect` until it succeeds, waiting 100 ms after the first failure and twice as long
/// after each next one, up to 2 s; `None` once `stop` fires.
async fn until_connected<T, F, Fut>(
    what: &str,
    stop: &CancellationToken,
    mut connect: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::select! {
            r = connect() => match r {
                Ok(connected) => return Some(connected),
                Err(e) => tracing::warn!(error = %e, "{what} unavailable; retrying"),
            },
            _ = stop.cancelled() => return None,
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return None,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Called when rooms must catch up from the store: one room (`Some`), or every room (`None`).
pub type Resync = Arc<dyn Fn(Option<&str>) + Send + Sync>;

pub struct RedisBroker {
    redis: RedisConn,
    sink: Arc<dyn EventSink>,
    /// Rooms wanted by this node, with how many hubs want each, and the live subscriber (None
    /// while disconnected). One lock, held across the SUBSCRIBE round trip, keeps the order of
    /// subscribe/unsubscribe commands the order of the count changes.
    subscriptions: Mutex<Subscriptions>,
    resync: Resync,
    connected: AtomicBool,
    /// How often the pub/sub connection is pinged (`redis.pubsub_keepalive_ms`); no answer
    /// within half of it means the connection is dead.
    keepalive: Duration,
    /// Times the subscription was lost (and re-established).
    reconnects: Counter,
}

#[derive(Default)]
struct Subscriptions {
    wanted: HashMap<String, Wanted>,
    sink: Option<Sink>,
    /// Sharded only: some wanted room may have lost its subscription (set wherever `live` is
    /// cleared), so the retry looks through the rooms; an idle retry looks at nothing.
    lost: bool,
}

/// A room this node wants to receive.
#[derive(Default)]
struct Wanted {
    /// Hubs that want it.
    count: usize,
    /// Sharded only: a shard confirmed the subscription, and has not ended it since.
    live: bool,
    /// Sharded only: the next confirmation is a re-subscription (after a reconnect, a failover
    /// or a migration, or a first one made late), so the room catches up from the store then. Not
    /// for the confirmation of a join's own subscription: the join reads the room itself.
    confirmed: bool,
}

/// The subscribing end: a RESP2 pub/sub connection to one Redis, or the cluster connection that
/// carries the sharded subscriptions.
enum Sink {
    Plain(PubSubSink),
    Sharded(ClusterConnection),
}

impl Sink {
    async fn subscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            Self::Plain(sink) => sink.subscribe(channels).await,
            Self::Sharded(conn) => conn.ssubscribe(channels).await,
        }
    }

    async fn unsubscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Self::Plain(sink) => sink.unsubscribe(channel).await,
            Self::Sharded(conn) => conn.sunsubscribe(channel).await,
        }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    message: Option<SeqOnly>,
    #[serde(default)]
    change: Option<SeqOnly>,
    #[serde(default, rename = "userId")]
    user_id: Option<String>,
    #[serde(default)]
    room: Option<String>,
    #[serde(default)]
    seq: Option<i64>,
}

#[derive(Deserialize)]
struct SeqOnly {
    seq: i64,
}

impl RedisBroker {
    /// Creates the broker and starts its subscriber task (until `stop`). `resync` runs each time
    /// a subscription comes back after a loss, so rooms can catch up from the store.
    pub fn start(
        redis: RedisConn,
        sink: Arc<dyn EventSink>,
        resync: Resync,
        keepalive: Duration,
        reconnects: Counter,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let broker = Arc::new(Self {
            redis,
            sink,
            subscriptions: Mutex::new(Subscriptions::default()),
            resync,
            connected: AtomicBool::new(false),
            keepalive,
            reconnects,
        });
        match &broker.redis.topology {
            Topology::Single(client) => {
                tokio::spawn(broker.clone().subscriber(client.clone(), stop));
            }
            Topology::Cluster(seeds) => {
                tokio::spawn(broker.clone().sharded_subscriber(seeds.clone(), stop));
            }
        }
        broker
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn channel(&self, room: &str) -> String {
        self.redis
            .key(&format!("{CHANNEL}{}", self.redis.tag(room)))
    }

    /// `SPUBLISH` to a cluster's sharded channels, `PUBLISH` on one Redis.
    fn publish_command(&self) -> &'static str {
        if self.redis.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// The room a channel name carries, if it is a room channel of this gateway.
    fn room_of<'a>(&self, prefix: &str, channel: &'a str) -> Option<&'a str> {
        let room = channel.strip_prefix(prefix)?;
        if self.redis.is_cluster() {
            room.strip_prefix('{')?.strip_suffix('}')
        } else {
            Some(room)
        }
    }

    /// Keeps one pub/sub connection up: (re)connects, subscribes to every wanted room, forwards.
    async fn subscriber(self: Arc<Self>, client: redis::Client, stop: CancellationToken) {
        let prefix = self.redis.key(CHANNEL);
        let mut first = true;
        loop {
            let this = &*self;
            let client = &client;
            let connected = until_connected("redis pub/sub", &stop, move || async move {
                let (mut sink, stream) = client.get_async_pubsub().await?.split();
                let mut subs = this.subscriptions.lock().await;
                let channels: Vec<String> = subs.wanted.keys().map(|r| this.channel(r)).collect();
                if !channels.is_empty() {
                    sink.subscribe(&channels).await?;
                }
                subs.sink = Some(Sink::Plain(sink));
                Ok(stream)
            });
            let Some(mut stream) = connected.await else {
                return;
            };
            self.connected.store(true, Ordering::Relaxed);
            if !first {
                tracing::info!("redis pub/sub back; re-synchronizing rooms from the store");
                (self.resync)(None);
            }
            first = false;
            // A connection that silently stopped carrying packets never ends the stream: ping it.
            let mut keepalive = tokio::time::interval(self.keepalive);
            keepalive.tick().await;
            loop {
                let msg = tokio::select! {
                    m = stream.next() => m,
                    _ = keepalive.tick() => {
                        let sink = match &self.subscriptions.lock().await.sink {
                            Some(Sink::Plain(sink)) => Some(sink.clone()),
                            _ => None,
                        };
                        let answer = match sink {
                            Some(mut sink) => {
                                tokio::time::timeout(self.keepalive / 2, sink.ping::<redis::Value>())
                                    .await
                            }
                            None => continue,
                        };
                        // A subscribed RESP2 connection answers PING with the array
                        // ["pong", ""], an unsubscribed one with +PONG: any answer is alive.
                        match answer {
                            Ok(Ok(_)) => continue,
                            Ok(Err(e)) => tracing::warn!(error = %e, "redis pub/sub ping failed"),
                            Err(_) => tracing::warn!("redis pub/sub connection unresponsive"),
                        }
                        break;
                    }
                    _ = stop.cancelled() => return,
                };
                let Some(msg) = msg else { break };
                let Some(room) = self.room_of(&prefix, msg.get_channel_name()) else {
                    continue;
                };
                self.forward(room, msg.get_payload_bytes());
            }
            self.connected.store(false, Ordering::Relaxed);
            self.subscriptions.lock().await.sink = None;
            self.reconnects.inc();
            tracing::warn!("redis pub/sub connection lost; reconnecting");
        }
    }

    /// The sharded subscriptions of a cluster: one cluster connection (RESP3) whose pushes come
    /// here. It reconnects and re-subscribes by itself; this task re-subscribes what a shard
    /// ended (`sunsubscribe` when a slot moved away), catches rooms up on every re-confirmation,
    /// and pings every primary: two unanswered rounds rebuild the connection from the seeds.
    async fn sharded_subscriber(self: Arc<Self>, seeds: Vec<String>, stop: CancellationToken) {
        let prefix = self.redis.key(CHANNEL);
        loop {
            let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel::<PushInfo>();
            let this = &*self;
            let (seeds, sender) = (&seeds, &tx);
            let connected = until_connected("redis cluster pub/sub", &stop, move || async move {
                let timeout = this.keepalive.max(Duration::from_secs(2));
                let client = Topology::cluster_client(seeds, Some(timeout))
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(sender.clone())
                    .build()?;
                let conn = client.get_async_connection().await?;
                // A new connection has none of the old one's subscriptions: every room is made
                // again by the retry below (one channel per SSUBSCRIBE: channels of several
                // slots cannot share one), and catches up when its shard confirms it.
                let mut subs = this.subscriptions.lock().await;
                for want in subs.wanted.values_mut() {
                    want.live = false;
                    want.confirmed = true;
                }
                subs.lost = true;
                subs.sink = Some(Sink::Sharded(conn.clone()));
                Ok(conn)
            });
            let Some(mut conn) = connected.await else {
                return;
            };
            // The client holds the pushes' only sender now: they end with it.
            drop(tx);
            self.connected.store(true, Ordering::Relaxed);
            let mut keepalive = tokio::time::interval(self.keepalive);
            keepalive.tick().await;
            let mut retry = tokio::time::interval(RESUBSCRIBE_EVERY);
            retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut unanswered = 0;
            loop {
                tokio::select! {
                    push = pushes.recv() => {
                        let Some(push) = push else { break };
                        self.on_push(&prefix, push).await;
                    }
                    _ = retry.tick() => self.resubscribe_lost(&conn).await,
                    _ = keepalive.tick() => {
                        let ping = conn.route_command(
                            redis::cmd("PING"),
                            redis::cluster_routing::RoutingInfo::MultiNode((
                                redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters,
                                Some(redis::cluster_routing::ResponsePolicy::AllSucceeded),
                            )),
                        );
                        match tokio::time::timeout(self.keepalive / 2, ping).await {
                            Ok(Ok(_)) => unanswered = 0,
                            Ok(Err(e)) => {
                                unanswered += 1;
                                tracing::warn!(error = %e, "redis cluster ping failed");
                            }
                            Err(_) => {
                                unanswered += 1;
                                tracing::warn!("redis cluster ping unanswered");
                            }
                        }
                        if unanswered >= 2 {
                            break;
                        }
                    }
                    _ = stop.cancelled() => return,
                }
            }
            self.connected.store(false, Ordering::Relaxed);
            self.subscriptions.lock().await.sink = None;
            self.reconnects.inc();
            tracing::warn!("redis cluster pub/sub connection lost; reconnecting");
        }
    }

    /// One push of the sharded subscriptions' connection.
    async fn on_push(&self, prefix: &str, push: PushInfo) {
        if push.kind == PushKind::Disconnection {
            // Which shard is not said: every room is subscribed again until a shard confirms it
            // (a shard that still has it confirms at once; the rooms of a dead one wait for the
            // promoted replica), and each confirmation catches its room up.
            self.reconnects.inc();
            tracing::warn!(
                "a redis cluster pub/sub connection dropped; subscribing every room again"
            );
            let mut subs = self.subscriptions.lock().await;
            for want in subs.wanted.values_mut() {
                want.live = false;
            }
            subs.lost = true;
            return;
        }
        // Every other push this connection carries names a room channel first.
        let Some(redis::Value::BulkString(channel)) = push.data.first() else {
            return;
        };
        let Some(room) = std::str::from_utf8(channel)
            .ok()
            .and_then(|channel| self.room_of(prefix, channel))
        else {
            return;
        };
        if push.kind == PushKind::SMessage {
            if let Some(redis::Value::BulkString(payload)) = push.data.get(1) {
                self.forward(room, payload);
            }
            return;
        }
        let mut subs = self.subscriptions.lock().await;
        let Subscriptions { wanted, sink, lost } = &mut *subs;
        let Some(want) = wanted.get_mut(room) else {
            return;
        };
        match push.kind {
            PushKind::SSubscribe => {
                want.live = true;
                if std::mem::replace(&mut want.confirmed, true) {
                    drop(subs);
                    tracing::info!(room, "room re-subscribed; catching up from the store");
                    (self.resync)(Some(room));
                }
            }
            PushKind::SUnsubscribe => {
                // Still wanted: the shard ended it (its slot moved). Subscribe again at once; the
                // cluster connection follows MOVED to the slot's new owner (and should this
                // fail, the retry every RESUBSCRIBE_EVERY takes it up).
                want.live = false;
                *lost = true;
                tracing::info!(
                    room,
                    "a shard ended the room's subscription; subscribing again"
                );
                if let Some(sink) = sink.as_mut()
                    && let Err(e) = sink.subscribe(&[self.channel(room)]).await
                {
                    tracing::debug!(room, error = %e, "re-subscribing failed; retrying");
                }
            }
            _ => {}
        }
    }

    /// Subscribes again to every wanted room no shard has confirmed since it was lost (a
    /// dropped connection, a slot with no owner yet), all at once and without holding the lock.
    async fn resubscribe_lost(&self, conn: &ClusterConnection) {
        let lost: Vec<String> = {
            let mut subs = self.subscriptions.lock().await;
            if !subs.lost {
                return;
            }
            let lost: Vec<String> = subs
                .wanted
                .iter()
                .filter(|(_, want)| !want.live)
                .map(|(room, _)| self.channel(room))
                .collect();
            subs.lost = !lost.is_empty();
            lost
        };
        let calls = lost.iter().map(|channel| async move {
            let mut conn = conn.clone();
            if let Err(e) = conn.ssubscribe(channel).await {
                tracing::debug!(channel, error = %e, "re-subscribing failed; retrying");
            }
        });
        futures::future::join_all(calls).await;
    }

    fn forward(&self, room: &str, payload: &[u8]) {
        let Ok(envelope) = serde_json::from_slice::<Envelope>(payload) else {
            tracing::warn!(room, "ignoring a malformed envelope on the room channel");
            return;
        };
        if envelope.room.as_deref().is_some_and(|r| r != room) {
            tracing::warn!(
                room,
                "ignoring an envelope for another room on this room's channel"
            );
            return;
        }
        let frame = || Utf8Bytes::try_from(Bytes::copy_from_slice(payload)).ok();
        let event = match (envelope.kind, envelope.message, envelope.user_id) {
            ("presence", _, _) => match serde_json::from_slice::<PresenceDiff>(payload) {
                Ok(diff) => RoomEvent::Presence(Arc::new(diff)),
                Err(_) => return,
            },
            ("head", _, _) => match envelope.seq {
                Some(seq) => RoomEvent::Head { seq },
                None => return,
            },
            ("message", Some(SeqOnly { seq }), _) => match std::str::from_utf8(payload) {
                Ok(push) => RoomEvent::Message(Arc::new(Published::from_announcing(seq, push))),
                Err(_) => return,
            },
            // A change of a message: in the room's sequence like a message, with no profile.
            ("change", _, _) => match (envelope.change, frame()) {
                (Some(SeqOnly { seq }), Some(frame)) => {
                    RoomEvent::Message(Arc::new(Published::new(seq, frame, "")))
                }
                _ => return,
            },
            ("member_removed", _, Some(user_id)) => RoomEvent::MemberRemoved { user_id },
            // Backend events and read receipts: pushed to the room's sockets as they are.
            ("event" | "read", _, _) => match frame() {
                Some(frame) => RoomEvent::Ephemeral {
                    frame,
                    skip_user: None,
                },
                None => return,
            },
            ("typing", _, Some(user_id)) => match frame() {
                Some(frame) => RoomEvent::Ephemeral {
                    frame,
                    skip_user: Some(user_id),
                },
                None => return,
            },
            (kind, _, _) => {
                tracing::warn!(room, kind, "ignoring an unknown envelope type");
                return;
            }
        };
        self.sink.deliver(room, event);
    }
}

/// On Redis, the cache append and the publish of a message are one pipeline on the room's keys
/// and channel (one slot on a cluster): one round trip before the ack instead of two, and one
/// read for Redis instead of two.
pub struct RedisAnnouncer {
    pub cache: Arc<crate::cache::redis::RedisHistoryCache>,
    pub broker: Arc<RedisBroker>,
}

#[async_trait]
impl Announcer for RedisAnnouncer {
    async fn announce(
        &self,
        room: &str,
        message: &crate::protocol::MessageJson,
        append: bool,
        publish: Option<Arc<Published>>,
    ) {
        if !append && publish.is_none() {
            return;
        }
        let broker = &self.broker;
        let payload = publish.as_ref().map(|p| p.with_profile());
        let channel = broker.channel(room);
        let result = self
            .cache
            .append_and_publish(
                room,
                append.then_some(message),
                payload
                    .as_ref()
                    .map(|p| (broker.publish_command(), channel.as_str(), p.as_bytes())),
            )
            .await;
        // Local sockets whatever Redis said (and after the append, as on every node).
        if let Some(published) = publish {
            broker.sink.deliver(room, RoomEvent::Message(published));
        }
        if let Err(e) = result {
            // Stored and acknowledged anyway: receivers fill the gap from the store, and the
            // tail misses the message until the room's next send or re-read (see the cache).
            broker
                .redis
                .log_failure("history cache append and publish failed", &e);
        }
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, room: &str, event: RoomEvent) -> Result<(), BrokerError> {
        let payload: Bytes = match &event {
            RoomEvent::Message(published) => Bytes::from(published.with_profile()),
            RoomEvent::MemberRemoved { user_id } => Bytes::from(
                serde_json::json!({"type": "member_removed", "room": room, "userId": user_id})
                    .to_string(),
            ),
            RoomEvent::Ephemeral { frame, .. } => Bytes::from(frame.clone()),
            RoomEvent::Head { seq } => Bytes::from(
                serde_json::json!({"type": "head", "room": room, "seq": seq}).to_string(),
            ),
            RoomEvent::Presence(diff) => {
                Bytes::from(crate::protocol::encode(&crate::protocol::Push::Presence {
                    room,
                    online: diff.online,
                    joined: &diff.joined,
                    left: &diff.left,
                }))
            }
        };
        match event {
            // Local sockets first: they never wait for the round trip through Redis. Messages
            // are deduplicated by seq and removals are idempotent, so the echo is harmless.
            RoomEvent::Message(_) | RoomEvent::MemberRemoved { .. } => {
                self.sink.deliver(room, event)
            }
            // Ephemeral frames have nothing to deduplicate them by: local sockets get the echo,
            // once. A head is only news to other nodes.
            RoomEvent::Ephemeral { .. } | RoomEvent::Head { .. } | RoomEvent::Presence(_) => {}
        }
        let mut conn = self.redis.conn.clone();
        let mut publish = redis::cmd(self.publish_command());
        publish.arg(self.channel(room)).arg(payload.as_ref());
        self.redis
            .bounded(publish.query_async::<i64>(&mut conn))
            .await
            .map(|_| ())
            .map_err(|e| {
                self.redis.log_failure("publish failed", &e);
                BrokerError(e.to_string())
            })
    }

    async fn subscribe(&self, room: &str) -> Result<(), BrokerError> {
        let mut subs = self.subscriptions.lock().await;
        let Subscriptions { wanted, sink, .. } = &mut *subs;
        let want = wanted.entry(room.to_string()).or_default();
        want.count += 1;
        if want.count > 1 {
            return Ok(());
        }
        let channel = self.channel(room);
        let Some(sink) = sink.as_mut() else {
            // Disconnected: the subscriber subscribes to every wanted room when it is back, and
            // (sharded) this one catches up when its shard confirms it.
            want.confirmed = true;
            return Ok(());
        };
        if let Err(e) = sink.subscribe(&[channel]).await {
            wanted.remove(room);
            return Err(BrokerError(e.to_string()));
        }
        if let Some(want) = wanted.get_mut(room) {
            want.live = true;
        }
        Ok(())
    }

    async fn unsubscribe(&self, room: &str) {
        let mut subs = self.subscriptions.lock().await;
        let Some(want) = subs.wanted.get_mut(room) else {
            return;
        };
        want.count -= 1;
        if want.count > 0 {
            return;
        }
        subs.wanted.remove(room);
        let channel = self.channel(room);
        if let Some(sink) = subs.sink.as_mut()
            && let Err(e) = sink.unsubscribe(&channel).await
        {
            tracing::warn!(room, error = %e, "unsubscribe failed");
        }
    }
}
