//! The broker carries room events between gateway nodes (fan-out). On one node the in-process
//! [`MemoryBroker`] hands each event straight to the local [`EventSink`] (the room registry);
//! [`redis::RedisBroker`] carries them between nodes through Redis pub/sub.
//!
//! Contract: a message is published only after its insert committed; events of one room may arrive
//! out of sequence order or twice (the registry reorders by `seq` and drops duplicates), and may be
//! lost (the registry fills gaps from the store), so the broker need not be perfect to be correct.

pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;

/// A message ready to push: its sequence and the `message` push serialized once and shared by
/// every receiver, and its sender's profile, which a room splices into the push that tells its
/// sockets who the sender is (see `rooms::Profiles`).
#[derive(Debug)]
pub struct Published {
    pub seq: i64,
    /// The push without the sender's profile.
    pub frame: Utf8Bytes,
    /// `,"senderName":…,"senderAvatarUrl":…` (empty when the message came without one).
    pub profile: Box<str>,
}

impl Published {
    pub fn new(seq: i64, frame: Utf8Bytes, profile: &str) -> Self {
        Self {
            seq,
            frame,
            profile: profile.into(),
        }
    }

    /// A push as it crossed Redis (with the profile, so that every node can tell its own
    /// sockets): split into the shared push and the profile.
    pub fn from_announcing(seq: i64, push: &str) -> Self {
        let parts = crate::protocol::MessageParts::of(push);
        let frame = format!("{}}}}}", parts.lean);
        Self::new(seq, frame.into(), parts.profile)
    }

    /// The sender's id as a JSON string, quotes and escapes included, cut from the push (the
    /// key of a room's profiles; a raw `,"` only ever starts a key).
    pub fn sender(&self) -> &str {
        let frame = self.frame.as_str();
        let start = frame
            .find(r#","senderId":"#)
            .map_or(0, |at| at + r#","senderId":"#.len());
        let end = frame[start..]
            .find(r#","content":"#)
            .map_or(frame.len(), |at| start + at);
        &frame[start..end]
    }

    /// The push with the sender's profile spliced in: what tells a room who the sender is, and
    /// what crosses Redis.
    pub fn with_profile(&self) -> Utf8Bytes {
        let frame = self.frame.as_str();
        let body = frame.strip_suffix("}}").unwrap_or(frame);
        let mut push = String::with_capacity(frame.len() + self.profile.len());
        push.push_str(body);
        push.push_str(&self.profile);
        push.push_str("}}");
        push.into()
    }
}

#[derive(Debug, Clone)]
pub enum RoomEvent {
    /// A persisted message.
    Message(Arc<Published>),
    /// A membership was removed: that user's sockets stop receiving the room.
    MemberRemoved { user_id: String },
    /// Users came online in the room or went offline (coalesced per room by receivers).
    Presence(Arc<PresenceDiff>),
    /// The room's messages are stored up to `seq`: a node that has delivered less reads the rest
    /// from the store. Published by the outbox relay for every batch, so a message whose own
    /// event was lost (failed publish, a node that died after commit) still reaches everyone.
    Head { seq: i64 },
    /// An ephemeral frame (a backend's event, a typing signal): pushed as is to the room's live
    /// sockets, except those of `skip_user`; never stored, no sequence.
    Ephemeral {
        frame: Utf8Bytes,
        skip_user: Option<String>,
    },
}

/// A presence diff as published (the `presence` push, before coalescing).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PresenceDiff {
    pub online: u64,
    pub joined: Vec<crate::presence::OnlineUser>,
    pub left: Vec<String>,
}

/// Where a broker hands the events it receives.
/// What a send does with a stored message before its ack: append it to the room's cached history
/// (when history serves it) and publish it to the room (unless it is a retry's original), the
/// append first, so whoever saw the push reads the message in history.
#[async_trait]
pub trait Announcer: Send + Sync + 'static {
    async fn announce(
        &self,
        room: &str,
        message: &crate::protocol::MessageJson,
        append: bool,
        publish: Option<Arc<Published>>,
    );
}

/// The cache and the broker each doing their part (in-process, one after the other).
pub struct Apart {
    pub cache: Arc<dyn crate::cache::HistoryCache>,
    pub broker: Arc<dyn Broker>,
}

#[async_trait]
impl Announcer for Apart {
    async fn announce(
        &self,
        room: &str,
        message: &crate::protocol::MessageJson,
        append: bool,
        publish: Option<Arc<Published>>,
    ) {
        if append {
            self.cache.append(room, message).await;
        }
        if let Some(published) = publish
            && let Err(e) = self
                .broker
                .publish(room, RoomEvent::Message(published))
                .await
        {
            // Stored and acknowledged anyway: receivers fill the gap from the store.
            tracing::debug!(error = %e, seq = message.seq, "publish failed");
        }
    }
}

pub trait EventSink: Send + Sync + 'static {
    fn deliver(&self, room: &str, event: RoomEvent);
}

#[derive(Debug, thiserror::Error)]
#[error("broker unavailable: {0}")]
pub struct BrokerError(pub String);

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    async fn publish(&self, room: &str, event: RoomEvent) -> Result<(), BrokerError>;
    /// Start receiving a room's events on this node (called when its first local member joins).
    async fn subscribe(&self, room: &str) -> Result<(), BrokerError>;
    /// Stop receiving them (called when its last local member leaves).
    async fn unsubscribe(&self, room: &str);
}

/// One node: every published event goes straight to the local sink, synchronously.
pub struct MemoryBroker {
    sink: Arc<dyn EventSink>,
}

impl MemoryBroker {
    pub fn new(sink: Arc<dyn EventSink>) -> Self {
        Self { sink }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, room: &str, event: RoomEvent) -> Result<(), BrokerError> {
        self.sink.deliver(room, event);
        Ok(())
    }

    async fn subscribe(&self, _room: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn unsubscribe(&self, _room: &str) {}
}
