//! Fan-out across nodes through Redis pub/sub.
//!
//! Channel per room: `{prefix}chat:room:{roomId}`. A node subscribes to a room's channel only while
//! it has local members in the room (reference-counted per hub), and unsubscribes when the last one
//! leaves. Envelopes (proto-docs/redis.md):
//! - `{"type":"message","room":…,"message":{"seq":N,…}}`: a persisted message, published by a
//!   gateway after commit: the push sockets receive, with the sender's profile (each node's room
//!   decides whether its own sockets need it, and cuts it off otherwise, without parsing again).
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
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{Broker, BrokerError, EventSink, PresenceDiff, Published, RoomEvent};
use crate::redis_conn::RedisConn;

const CHANNEL: &str = "chat:room:";

pub struct RedisBroker {
    redis: RedisConn,
    sink: Arc<dyn EventSink>,
    /// Rooms wanted by this node, with how many hubs want each, and the live subscriber (None
    /// while disconnected). One lock, held across the SUBSCRIBE round trip, keeps the order of
    /// subscribe/unsubscribe commands the order of the count changes.
    subscriptions: Mutex<Subscriptions>,
    connected: AtomicBool,
    /// How often the pub/sub connection is pinged (`redis.pubsub_keepalive_ms`); no answer
    /// within half of it means the connection is dead.
    keepalive: Duration,
    /// Times the subscription was lost (and re-established).
    reconnects: Counter,
}

#[derive(Default)]
struct Subscriptions {
    wanted: HashMap<String, usize>,
    sink: Option<PubSubSink>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    message: Option<SeqOnly>,
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
    /// Creates the broker and starts its subscriber task (until `stop`). `on_resubscribed` runs
    /// each time the subscription comes back after a loss, so rooms can catch up from the store.
    pub fn start(
        redis: RedisConn,
        sink: Arc<dyn EventSink>,
        on_resubscribed: Arc<dyn Fn() + Send + Sync>,
        keepalive: Duration,
        reconnects: Counter,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let broker = Arc::new(Self {
            redis,
            sink,
            subscriptions: Mutex::new(Subscriptions::default()),
            connected: AtomicBool::new(false),
            keepalive,
            reconnects,
        });
        tokio::spawn(broker.clone().subscriber(on_resubscribed, stop));
        broker
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    fn channel(&self, room: &str) -> String {
        self.redis.key(&format!("{CHANNEL}{room}"))
    }

    /// Keeps one pub/sub connection up: (re)connects, subscribes to every wanted room, forwards.
    async fn subscriber(
        self: Arc<Self>,
        on_resubscribed: Arc<dyn Fn() + Send + Sync>,
        stop: CancellationToken,
    ) {
        let prefix = self.redis.key(CHANNEL);
        let mut backoff = Duration::from_millis(100);
        let mut first = true;
        loop {
            let connected = async {
                let (mut sink, stream) = self.redis.client.get_async_pubsub().await?.split();
                let mut subs = self.subscriptions.lock().await;
                let channels: Vec<String> = subs.wanted.keys().map(|r| self.channel(r)).collect();
                if !channels.is_empty() {
                    sink.subscribe(&channels).await?;
                }
                subs.sink = Some(sink);
                Ok::<_, redis::RedisError>(stream)
            };
            let mut stream = tokio::select! {
                r = connected => match r {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "redis pub/sub unavailable; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = stop.cancelled() => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            backoff = Duration::from_millis(100);
            self.connected.store(true, Ordering::Relaxed);
            if !first {
                tracing::info!("redis pub/sub back; re-synchronizing rooms from the store");
                on_resubscribed();
            }
            first = false;
            // A connection that silently stopped carrying packets never ends the stream: ping it.
            let mut keepalive = tokio::time::interval(self.keepalive);
            keepalive.tick().await;
            loop {
                let msg = tokio::select! {
                    m = stream.next() => m,
                    _ = keepalive.tick() => {
                        let sink = self.subscriptions.lock().await.sink.clone();
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
                let Some(room) = msg.get_channel_name().strip_prefix(&prefix) else {
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
        let mut publish = redis::cmd("PUBLISH");
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
        let count = subs.wanted.entry(room.to_string()).or_insert(0);
        *count += 1;
        if *count > 1 {
            return Ok(());
        }
        let channel = self.channel(room);
        let Some(sink) = subs.sink.as_mut() else {
            // Disconnected: the subscriber subscribes to every wanted room when it is back.
            return Ok(());
        };
        if let Err(e) = sink.subscribe(&channel).await {
            subs.wanted.remove(room);
            return Err(BrokerError(e.to_string()));
        }
        Ok(())
    }

    async fn unsubscribe(&self, room: &str) {
        let mut subs = self.subscriptions.lock().await;
        let Some(count) = subs.wanted.get_mut(room) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
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
