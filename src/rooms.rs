//! Rooms on this node: who is connected to which room, and in-order, exactly-once delivery.
//!
//! Each room with local members has a [`RoomHub`]. The hub is a *sequencer*: it pushes messages to
//! its members strictly in `seq` order, each once. Events that arrive ahead of a gap wait in
//! `pending`; if the gap is not closed within `gap_fill_after`, the hub reads the missing range from
//! the store (the source of truth), so a lost or late broker event delays a message but never drops
//! or reorders it.
//!
//! A joining socket is attached in *catching-up* state at the hub's current `delivered` sequence D:
//! live messages after D are buffered for it while the socket replays what it missed (up to D):
//! from the hub's newest delivered pushes (`limits.resume_buffer`) when they cover it, taken under
//! the same lock as D, else from the store; then the buffer is flushed and the member goes live.
//! No gap, no duplicate.
//!
//! A hub also remembers whose profile (name, avatar) its sockets have been told ([`Profiles`]):
//! a message push carries its sender's profile only when that is news to the room (a new sender,
//! or a changed profile); a joining socket is told every profile the hub remembers in its join
//! result, taken under the same lock as D.
//!
//! Locking rules: a hub's `state` mutex is held only for in-memory work (never across `.await`).
//! The registry's `DashMap` shard lock may be held while taking a hub's lock (in `detach`), never
//! the other way round. A socket's `rooms` lock may be taken while holding a hub lock, never the
//! other way round; so may the lock of the node's pending presence changes (`PresenceChanges`).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::Poll;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use futures::task::AtomicWaker;
use tokio::sync::{Notify, OnceCell};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::broker::{EventSink, PresenceDiff, Published, RoomEvent};
use crate::membership::MembershipCache;
use crate::metrics::Metrics;
use crate::presence::{OnlineUser, PresenceChange, PresenceChanges};
use crate::protocol::{self, Push, close};
use crate::store::Store;
use crate::wire::event_frame;

pub type ConnId = u64;

/// At most one presence push per room per second.
const PRESENCE_INTERVAL: Duration = Duration::from_secs(1);

/// Presence diffs merged since the last push of a room.
#[derive(Default)]
struct PendingPresence {
    online: Option<u64>,
    joined: std::collections::BTreeMap<String, Option<String>>,
    left: std::collections::BTreeSet<String>,
    last_push: Option<tokio::time::Instant>,
    flush_scheduled: bool,
}

/// How far ahead of what a hub delivered an event's sequence may be. Beyond it the event cannot
/// come from a gateway (the store would have to be that far ahead) and is ignored, so a stray
/// publish cannot send the gap filler through millions of rows.
const MAX_AHEAD: i64 = 1_000_000;

/// Why a socket is being closed: the first reason set wins.
pub struct Closer {
    reason: OnceLock<(u16, &'static str)>,
    token: CancellationToken,
    /// Set before the token is cancelled: what a hot loop checks after each wake-up instead of
    /// polling the token's future (which takes its locks).
    cancelled: AtomicBool,
    /// The peer went away without a close frame: nothing more is written to it.
    gone: AtomicBool,
}

impl Closer {
    pub fn new() -> Self {
        Self {
            reason: OnceLock::new(),
            token: CancellationToken::new(),
            cancelled: AtomicBool::new(false),
            gone: AtomicBool::new(false),
        }
    }

    /// The connection ended under the socket (reset, or closed without a close frame).
    pub fn peer_gone(&self) {
        self.gone.store(true, Ordering::Relaxed);
        self.cancel();
    }

    pub fn is_peer_gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }

    pub fn close(&self, code: u16, reason: &'static str) {
        let _ = self.reason.set((code, reason));
        self.cancel();
    }

    /// Ends the socket's tasks (without a reason: after a close frame, or when the socket fails).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// Whether [`Closer::cancel`] was called: one atomic read.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    pub fn reason(&self) -> Option<(u16, &'static str)> {
        self.reason.get().copied()
    }

    /// Completes once the socket's tasks are to end ([`Closer::cancel`], directly or through a
    /// close). The token itself stays inside, so nothing cancels it without setting the flag
    /// that [`Closer::is_cancelled`] reads.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }
}

impl Default for Closer {
    fn default() -> Self {
        Self::new()
    }
}

/// A socket's bounded outbound queue: the sending side ([`Outbox`], held by the rooms and the
/// reader) and the writer task's side ([`OutboxReader`]).
///
/// A `VecDeque` under a mutex, with the writer's waker beside it, rather than a channel crate:
/// tokio's bounded channel allocates its first block of 32 slots (about 1 KiB) when it is made,
/// on every socket, idle or not (6.4 KiB per idle socket with it, 4.8 without); flume's grows
/// with its content but allocates a waiter on every wait of the writer, which cost 5-20 % more
/// CPU per delivery in the fan-out benchmark (docs/BENCHMARKS.md). A push is one uncontended lock
/// and a wake-up; the writer takes what is queued one frame at a time, without a batch buffer.
pub fn outbox(capacity: usize, closer: Arc<Closer>) -> (Outbox, OutboxReader) {
    let queue = Arc::new(Queue {
        frames: Mutex::new(VecDeque::new()),
        capacity: capacity.max(1),
        writer: AtomicWaker::new(),
        senders: AtomicUsize::new(1),
        closed: AtomicBool::new(false),
        waiting: AtomicUsize::new(0),
        taken: Notify::new(),
    });
    let reader = OutboxReader {
        queue: queue.clone(),
    };
    (Outbox { queue, closer }, reader)
}

struct Queue {
    frames: Mutex<VecDeque<Utf8Bytes>>,
    capacity: usize,
    /// The writer task, woken by a push.
    writer: AtomicWaker,
    /// [`Outbox`] handles alive: at 0 the writer ends once it has written what is queued.
    senders: AtomicUsize,
    /// The writer is gone: pushes are refused (and the queue emptied).
    closed: AtomicBool,
    /// Senders waiting for room ([`Outbox::push_paced`], [`Outbox::push_wait`]).
    waiting: AtomicUsize,
    /// Notified when the writer took frames while `waiting` was not 0, or went away.
    taken: Notify,
}

impl Queue {
    /// Queues `frame` if at most `most` frames are queued (and the writer is there).
    fn push_if(&self, frame: Utf8Bytes, most: usize) -> Result<(), Refused> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Refused::Closed);
        }
        {
            let mut frames = self.frames.lock().unwrap();
            if frames.len() > most {
                return Err(Refused::Full(frame));
            }
            frames.push_back(frame);
        }
        self.writer.wake();
        Ok(())
    }
}

enum Refused {
    Full(Utf8Bytes),
    Closed,
}

/// The sending side of a socket's bounded outbound queue, drained by its writer task.
/// Overflow policy: a push never waits; a full queue closes the socket as a slow consumer (4008),
/// so one slow socket never slows a room. It can reconnect and resume.
pub struct Outbox {
    queue: Arc<Queue>,
    pub closer: Arc<Closer>,
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        self.queue.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            queue: self.queue.clone(),
            closer: self.closer.clone(),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if self.queue.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.queue.writer.wake();
        }
    }
}

impl Outbox {
    /// Queues a frame without waiting. A full queue closes the socket (slow consumer).
    pub fn push(&self, frame: Utf8Bytes) -> bool {
        match self.queue.push_if(frame, self.queue.capacity - 1) {
            Ok(()) => true,
            Err(Refused::Full(_)) => {
                self.slow();
                false
            }
            Err(Refused::Closed) => false,
        }
    }

    /// Queues a frame once half of the queue is free, waiting up to `patience` for that (bulk
    /// replays: catch-up and its buffered tail). Leaving half the queue free keeps room for the
    /// live pushes of the socket's other rooms, which never wait. Past `patience`: slow consumer.
    pub async fn push_paced(&self, frame: Utf8Bytes, patience: Duration) -> bool {
        let most = self.queue.capacity - (self.queue.capacity / 2).max(1);
        self.push_waiting(frame, most, patience).await
    }

    /// Queues a frame, waiting up to `patience` for room (replies and catch-up, which the socket's
    /// own task produces, so they may wait for the client to read). Past that: slow consumer.
    pub async fn push_wait(&self, frame: Utf8Bytes, patience: Duration) -> bool {
        self.push_waiting(frame, self.queue.capacity - 1, patience)
            .await
    }

    /// Queues a frame once at most `most` frames are queued, waiting up to `patience`.
    async fn push_waiting(&self, frame: Utf8Bytes, most: usize, patience: Duration) -> bool {
        let queue = &*self.queue;
        let mut frame = match queue.push_if(frame, most) {
            Ok(()) => return true,
            Err(Refused::Closed) => return false,
            Err(Refused::Full(frame)) => frame,
        };
        queue.waiting.fetch_add(1, Ordering::SeqCst);
        let pushed = tokio::time::timeout(patience, async {
            loop {
                // Registered before trying: frames taken in between wake it.
                let taken = queue.taken.notified();
                tokio::pin!(taken);
                taken.as_mut().enable();
                match queue.push_if(frame, most) {
                    Ok(()) => return true,
                    Err(Refused::Closed) => return false,
                    Err(Refused::Full(back)) => frame = back,
                }
                taken.await;
            }
        })
        .await;
        queue.waiting.fetch_sub(1, Ordering::SeqCst);
        pushed.unwrap_or_else(|_| {
            self.slow();
            false
        })
    }

    fn slow(&self) {
        self.closer
            .close(close::SLOW_CONSUMER, "slow consumer: outbound queue full");
    }
}

/// The writer task's side of a socket's outbound queue. Dropped, it refuses further pushes.
pub struct OutboxReader {
    queue: Arc<Queue>,
}

impl OutboxReader {
    /// The next frame, waiting for one; `None` once no sender is left and the queue is empty.
    pub async fn next(&self) -> Option<Utf8Bytes> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`OutboxReader::next`] as a poll: `Pending` registers the task to be woken by a push.
    pub fn poll_next(&self, cx: &mut std::task::Context<'_>) -> Poll<Option<Utf8Bytes>> {
        if let Some(frame) = self.try_next() {
            return Poll::Ready(Some(frame));
        }
        self.queue.writer.register(cx.waker());
        // Again after registering: a push in between woke no one.
        if let Some(frame) = self.try_next() {
            return Poll::Ready(Some(frame));
        }
        if self.queue.senders.load(Ordering::Acquire) == 0 {
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    /// A frame already queued, if any. The caller calls [`OutboxReader::taken`] after a batch.
    pub fn try_next(&self) -> Option<Utf8Bytes> {
        self.queue.frames.lock().unwrap().pop_front()
    }

    /// Tells senders waiting for room that frames were taken.
    pub fn taken(&self) {
        if self.queue.waiting.load(Ordering::SeqCst) > 0 {
            self.queue.taken.notify_waiters();
        }
    }
}

impl Drop for OutboxReader {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Release);
        // What was queued is never written now; waiting senders give up at once.
        std::mem::take(&mut *self.queue.frames.lock().unwrap());
        self.queue.taken.notify_waiters();
    }
}

/// What rooms hold of an authenticated socket.
pub struct ConnShared {
    pub id: ConnId,
    pub user_id: String,
    /// The user's display name (for presence lists).
    pub name: Option<String>,
    pub out: Outbox,
    /// Rooms this socket has joined.
    pub rooms: Mutex<HashSet<Arc<str>>>,
}

pub type Conn = Arc<ConnShared>;

impl ConnShared {
    pub fn new(id: ConnId, user_id: String, name: Option<String>, out: Outbox) -> Self {
        Self {
            name,
            id,
            user_id,
            out,
            rooms: Mutex::new(HashSet::new()),
        }
    }

    pub fn push(&self, frame: Utf8Bytes) -> bool {
        self.out.push(frame)
    }
}

struct Member {
    conn: Conn,
    /// `Some` while the socket replays missed messages: live frames wait here, bounded by
    /// `catch_up_buffer`; past it the socket is closed as a slow consumer.
    catching_up: Option<Vec<Utf8Bytes>>,
}

#[derive(Default)]
struct HubState {
    /// Set when the hub left the registry; a joiner holding a stale `Arc` must look again.
    closed: bool,
    /// False until the room's head is known; events meanwhile wait in `pending`.
    initialized: bool,
    /// Every message with `seq <= delivered` has been pushed to the members (or was not visible).
    delivered: i64,
    /// Messages that arrived ahead of a gap, by seq.
    pending: BTreeMap<i64, Arc<Published>>,
    /// The newest delivered message pushes (seq, frame), at most `resume_buffer`: every visible
    /// message with `recent_floor < seq <= delivered` is here, so a socket that resumes after a
    /// short absence is caught up from memory instead of the store.
    recent: VecDeque<(i64, Utf8Bytes)>,
    recent_floor: i64,
    gap_fill_scheduled: bool,
    /// Local sockets per user: presence changes when a user's count goes 0 -> 1 or 1 -> 0.
    user_sockets: HashMap<String, usize>,
    /// Presence changes received and not yet pushed (at most one push per room per second).
    presence: PendingPresence,
    /// The highest sequence some node says is stored (`Head` events); above `delivered`, the
    /// gap filler reads up to it.
    known_head: i64,
    members: HashMap<ConnId, Member>,
    /// The sender profiles the members have been told.
    profiles: Profiles,
}

/// The sender profiles a room's sockets have been told, in a push or in their join result, so
/// that a push carries its sender's profile only when it is news: the sender's first message in
/// the hub, or a changed profile. Bounded: past `capacity` the sender heard from least recently
/// is forgotten, and its next message announces it again. The capacity is at least
/// `limits.resume_buffer`, so every sender of the pushes a resume replays from memory is known.
#[derive(Default)]
struct Profiles {
    /// Sender (as its JSON string) -> (profile fragment, when last heard).
    known: HashMap<Box<str>, (Box<str>, u64)>,
    clock: u64,
}

/// Profiles a hub remembers at least (`limits.resume_buffer` raises it).
const PROFILES_KEPT: usize = 128;

impl Profiles {
    /// Whether a push from `sender` with `profile` must carry it; it is known from now on.
    fn tell(&mut self, sender: &str, profile: &str, capacity: usize) -> bool {
        self.clock += 1;
        let clock = self.clock;
        if let Some((known, heard)) = self.known.get_mut(sender) {
            *heard = clock;
            if **known == *profile {
                return false;
            }
            *known = profile.into();
            return true;
        }
        if self.known.len() >= capacity
            && let Some(oldest) = self
                .known
                .iter()
                .min_by_key(|(_, (_, heard))| *heard)
                .map(|(sender, _)| sender.clone())
        {
            self.known.remove(&oldest);
        }
        self.known.insert(sender.into(), (profile.into(), clock));
        true
    }

    /// The known profiles as a JSON object: `{"alice":{"senderName":…,"senderAvatarUrl":…}}`.
    fn to_json(&self) -> String {
        let mut json = String::from("{");
        for (i, (sender, (profile, _))) in self.known.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(sender);
            json.push_str(":{");
            // The fragment starts with the comma that followed the message's fields.
            json.push_str(profile.strip_prefix(',').unwrap_or(profile));
            json.push('}');
        }
        json.push('}');
        json
    }
}

pub struct RoomHub {
    room: Arc<str>,
    /// Completed once the node is subscribed to the room and knows its head.
    pub ready: OnceCell<()>,
    state: Mutex<HubState>,
}

/// A socket attached to a hub (see [`RoomRegistry::attach`]).
pub struct Attached {
    /// The sequence the socket is live after.
    pub delivered: i64,
    /// What it missed after its `since`, when the hub still holds all of it.
    pub missed: Option<Vec<Utf8Bytes>>,
    /// The sender profiles the room's pushes may leave out, as a JSON object.
    pub senders: String,
}

/// Every room with local members.
pub struct RoomRegistry {
    hubs: DashMap<Arc<str>, Arc<RoomHub>>,
    store: Arc<dyn Store>,
    membership: Arc<MembershipCache>,
    metrics: Arc<Metrics>,
    gap_fill_after: Duration,
    catch_up_buffer: usize,
    /// Message pushes each hub keeps for resumes (`limits.resume_buffer`).
    resume_buffer: usize,
    /// Sender profiles each hub remembers (see [`Profiles`]).
    profiles_kept: usize,
    /// Hubs created, for ids in logs.
    created: AtomicU64,
    /// Where this node's presence transitions wait for the task that records them and publishes
    /// the diffs. Set once the presence backend exists.
    presence_changes: OnceLock<Arc<PresenceChanges>>,
    /// Called with a room whose last local member was removed (by a `MemberRemoved` event), so
    /// the node unsubscribes from it. Set once the broker exists.
    unsubscriber: OnceLock<Box<dyn Fn(String) + Send + Sync>>,
}

impl RoomRegistry {
    pub fn new(
        store: Arc<dyn Store>,
        membership: Arc<MembershipCache>,
        metrics: Arc<Metrics>,
        gap_fill_after: Duration,
        catch_up_buffer: usize,
        resume_buffer: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            hubs: DashMap::new(),
            store,
            membership,
            metrics,
            gap_fill_after,
            catch_up_buffer,
            resume_buffer,
            profiles_kept: PROFILES_KEPT.max(resume_buffer),
            created: AtomicU64::new(0),
            unsubscriber: OnceLock::new(),
            presence_changes: OnceLock::new(),
        })
    }

    /// The room's hub, created (not yet ready) if the room has no local members.
    pub fn hub(&self, room: &str) -> Arc<RoomHub> {
        if let Some(hub) = self.hubs.get(room) {
            return hub.clone();
        }
        self.hubs
            .entry(Arc::from(room))
            .or_insert_with(|| {
                self.created.fetch_add(1, Ordering::Relaxed);
                self.metrics.rooms_active.inc();
                Arc::new(RoomHub {
                    room: Arc::from(room),
                    ready: OnceCell::new(),
                    state: Mutex::new(HubState::default()),
                })
            })
            .clone()
    }

    /// Sets the head of a freshly created hub; events that arrived meanwhile are sorted out.
    pub fn initialize(self: &Arc<Self>, hub: &Arc<RoomHub>, head: i64) {
        let delivered = {
            let mut st = hub.state.lock().unwrap();
            st.initialized = true;
            st.delivered = head;
            st.recent_floor = head;
            st.pending = st.pending.split_off(&(head + 1));
            self.drain_contiguous(&mut st)
        };
        self.metrics.messages_delivered.inc_by(delivered);
        self.schedule_gap_fill_if_needed(hub);
    }

    /// Attaches a socket in catching-up state. Returns the sequence it is live after and, when
    /// the socket resumes after `since` and the hub still holds every message it missed, those
    /// message pushes; `None` if the hub closed meanwhile (look it up again).
    pub fn attach(&self, hub: &RoomHub, conn: &Conn, since: Option<i64>) -> Option<Attached> {
        let mut st = hub.state.lock().unwrap();
        if st.closed {
            return None;
        }
        let previous = st.members.insert(
            conn.id,
            Member {
                conn: conn.clone(),
                catching_up: Some(Vec::new()),
            },
        );
        if previous.is_none() {
            let sockets = st.user_sockets.entry(conn.user_id.clone()).or_insert(0);
            *sockets += 1;
            if *sockets == 1 {
                self.presence_change(&hub.room, conn, true);
            }
        }
        let missed = since
            .filter(|&since| since < st.delivered && since >= st.recent_floor)
            .map(|since| {
                let first = st.recent.partition_point(|(seq, _)| *seq <= since);
                st.recent.range(first..).map(|(_, f)| f.clone()).collect()
            });
        Some(Attached {
            delivered: st.delivered,
            missed,
            senders: st.profiles.to_json(),
        })
    }

    /// Ends a member's catch-up: queues what was buffered for it (paced, in chunks taken under the
    /// lock, while new live frames keep buffering), then, once the buffer is empty under the lock,
    /// the member receives live.
    pub async fn go_live(&self, hub: &RoomHub, conn: &Conn, patience: Duration) {
        loop {
            let frames = {
                let mut st = hub.state.lock().unwrap();
                let Some(member) = st.members.get_mut(&conn.id) else {
                    return;
                };
                match member.catching_up.as_mut() {
                    None => return,
                    Some(buffer) if buffer.is_empty() => {
                        member.catching_up = None;
                        return;
                    }
                    Some(buffer) => std::mem::take(buffer),
                }
            };
            for frame in frames {
                if !conn.out.push_paced(frame, patience).await {
                    return;
                }
            }
        }
    }

    /// Sets where presence transitions of this node's sockets are sent.
    pub fn set_presence_changes(&self, changes: Arc<PresenceChanges>) {
        let _ = self.presence_changes.set(changes);
    }

    fn presence_change(&self, room: &str, conn: &Conn, arrived: bool) {
        if let Some(changes) = self.presence_changes.get() {
            let user = OnlineUser {
                user_id: conn.user_id.clone(),
                name: conn.name.clone(),
            };
            changes.push(PresenceChange {
                room: room.to_string(),
                user,
                arrived,
            });
        }
    }

    /// Records a presence diff for the room's sockets; pushes it now if the room had no presence
    /// push in the last second, or schedules the merged diff for when that second ends.
    fn on_presence(self: &Arc<Self>, hub: &Arc<RoomHub>, diff: &PresenceDiff) {
        let mut st = hub.state.lock().unwrap();
        let pending = &mut st.presence;
        pending.online = Some(diff.online);
        for user in &diff.joined {
            pending.left.remove(&user.user_id);
            pending
                .joined
                .insert(user.user_id.clone(), user.name.clone());
        }
        for user in &diff.left {
            if pending.joined.remove(user).is_none() {
                pending.left.insert(user.clone());
            }
        }
        if pending.flush_scheduled {
            return;
        }
        let now = tokio::time::Instant::now();
        let due = pending
            .last_push
            .map(|t| t + PRESENCE_INTERVAL)
            .filter(|due| *due > now);
        match due {
            None => self.flush_presence(&hub.room, &mut st),
            Some(due) => {
                st.presence.flush_scheduled = true;
                let hub = Arc::downgrade(hub);
                let registry = Arc::downgrade(self);
                tokio::spawn(async move {
                    tokio::time::sleep_until(due).await;
                    if let (Some(hub), Some(registry)) = (hub.upgrade(), registry.upgrade()) {
                        let mut st = hub.state.lock().unwrap();
                        st.presence.flush_scheduled = false;
                        registry.flush_presence(&hub.room, &mut st);
                    }
                });
            }
        }
    }

    fn flush_presence(&self, room: &str, st: &mut HubState) {
        let pending = std::mem::take(&mut st.presence);
        st.presence.last_push = Some(tokio::time::Instant::now());
        let Some(online) = pending.online else { return };
        let joined: Vec<OnlineUser> = pending
            .joined
            .into_iter()
            .map(|(user_id, name)| OnlineUser { user_id, name })
            .collect();
        let left: Vec<String> = pending.left.into_iter().collect();
        if joined.is_empty() && left.is_empty() {
            return;
        }
        let frame: Utf8Bytes = protocol::encode(&Push::Presence {
            room,
            online,
            joined: &joined,
            left: &left,
        })
        .into();
        for m in st.members.values().filter(|m| m.catching_up.is_none()) {
            m.conn.push(frame.clone());
        }
    }

    /// Sets what unsubscribes the node from a room (the broker, created after the registry).
    pub fn set_unsubscriber(&self, unsubscribe: impl Fn(String) + Send + Sync + 'static) {
        let _ = self.unsubscriber.set(Box::new(unsubscribe));
    }

    fn unsubscribe(&self, room: &str) {
        if let Some(unsubscribe) = self.unsubscriber.get() {
            unsubscribe(room.to_string());
        }
    }

    /// Drops a hub whose initialization failed, if it is still the room's hub and has no members.
    pub fn discard_unready(&self, room: &str, hub: &Arc<RoomHub>) {
        self.remove_if_empty(room, hub, true);
    }

    /// Drops `hub` if it is still the room's hub (not a newer one) and has no members; with
    /// `unready_only`, only if it never became ready. Returns whether it was dropped.
    fn remove_if_empty(&self, room: &str, hub: &Arc<RoomHub>, unready_only: bool) -> bool {
        let removed = self
            .hubs
            .remove_if(room, |_, current| {
                if !Arc::ptr_eq(current, hub) || (unready_only && current.ready.initialized()) {
                    return false;
                }
                let mut st = current.state.lock().unwrap();
                st.closed = st.members.is_empty();
                st.closed
            })
            .is_some();
        if removed {
            self.metrics.rooms_active.dec();
        }
        removed
    }

    /// Removes a socket from a room; drops the hub when it was the last member. Returns true when
    /// the room has no local members left (the caller unsubscribes from the broker).
    pub fn detach(&self, room: &str, conn_id: ConnId) -> bool {
        let Some(hub) = self.hubs.get(room).map(|h| h.clone()) else {
            return false;
        };
        let now_empty = {
            let mut st = hub.state.lock().unwrap();
            if let Some(member) = st.members.remove(&conn_id) {
                let user = &member.conn.user_id;
                let last = match st.user_sockets.get_mut(user) {
                    Some(sockets) if *sockets > 1 => {
                        *sockets -= 1;
                        false
                    }
                    _ => true,
                };
                if last {
                    st.user_sockets.remove(user);
                    self.presence_change(&hub.room, &member.conn, false);
                }
            }
            st.members.is_empty()
        };
        now_empty && self.remove_if_empty(room, &hub, false)
    }

    /// Pushes an ephemeral frame to every live local member of a room except `skip_user`'s
    /// sockets (not persisted, no seq).
    pub fn push_ephemeral(&self, room: &str, frame: Utf8Bytes, skip_user: Option<&str>) {
        if let Some(hub) = self.hubs.get(room).map(|h| h.clone()) {
            let st = hub.state.lock().unwrap();
            let receivers = st
                .members
                .values()
                .filter(|m| m.catching_up.is_none() && Some(m.conn.user_id.as_str()) != skip_user);
            for m in receivers {
                m.conn.push(frame.clone());
            }
        }
    }

    pub fn rooms_active(&self) -> usize {
        self.hubs.len()
    }

    fn on_head(self: &Arc<Self>, hub: &Arc<RoomHub>, seq: i64) {
        {
            let mut st = hub.state.lock().unwrap();
            if !st.initialized || seq <= st.delivered || seq > st.delivered + MAX_AHEAD {
                return;
            }
            st.known_head = st.known_head.max(seq);
        }
        self.schedule_gap_fill_if_needed(hub);
    }

    fn on_message(self: &Arc<Self>, hub: &Arc<RoomHub>, msg: Arc<Published>) {
        let (delivered, fill) = {
            let mut st = hub.state.lock().unwrap();
            if st.initialized && msg.seq > st.delivered + MAX_AHEAD {
                // Not from a gateway: no room jumps this far ahead of what was delivered.
                tracing::warn!(room = %hub.room, seq = msg.seq, "ignoring an implausible sequence");
                return;
            }
            let delivered = if !st.initialized || msg.seq > st.delivered + 1 {
                st.pending.insert(msg.seq, msg);
                0
            } else if msg.seq <= st.delivered {
                0 // a duplicate: already delivered
            } else {
                let mut n = self.deliver_next(&mut st, &msg);
                n += self.drain_contiguous(&mut st);
                n
            };
            // Decided in the same critical section: one lock per message on this hot path.
            (delivered, claim_gap_fill(&mut st))
        };
        self.metrics.messages_delivered.inc_by(delivered);
        if fill {
            self.spawn_gap_fill(hub);
        }
    }

    /// Pushes one frame to every member; returns how many sockets it was queued for.
    fn fan_out(&self, st: &mut HubState, frame: &Utf8Bytes) -> u64 {
        let mut pushed = 0;
        for m in st.members.values_mut() {
            match &mut m.catching_up {
                Some(buffer) => {
                    if buffer.len() >= self.catch_up_buffer {
                        m.conn
                            .out
                            .closer
                            .close(close::SLOW_CONSUMER, "slow consumer: catch-up too long");
                    } else {
                        buffer.push(frame.clone());
                    }
                }
                None => pushed += m.conn.push(frame.clone()) as u64,
            }
        }
        pushed
    }

    /// Delivers the message after `delivered` (the next visible one) and keeps it for resumes.
    fn deliver_next(&self, st: &mut HubState, msg: &Published) -> u64 {
        let news = !msg.profile.is_empty()
            && st
                .profiles
                .tell(msg.sender(), &msg.profile, self.profiles_kept);
        let frame = if news {
            msg.with_profile()
        } else {
            msg.frame.clone()
        };
        let pushed = self.fan_out(st, &frame);
        st.delivered = msg.seq;
        if self.resume_buffer > 0 {
            if st.recent.len() >= self.resume_buffer
                && let Some((seq, _)) = st.recent.pop_front()
            {
                st.recent_floor = seq;
            }
            st.recent.push_back((msg.seq, frame));
        } else {
            st.recent_floor = msg.seq;
        }
        pushed
    }

    /// Delivers pending messages that now follow `delivered` without a gap.
    fn drain_contiguous(&self, st: &mut HubState) -> u64 {
        let mut pushed = 0;
        while let Some(entry) = st.pending.first_entry() {
            let seq = *entry.key();
            if seq <= st.delivered {
                entry.remove();
            } else if seq == st.delivered + 1 {
                let msg = entry.remove();
                pushed += self.deliver_next(st, &msg);
            } else {
                break;
            }
        }
        pushed
    }

    fn schedule_gap_fill_if_needed(self: &Arc<Self>, hub: &Arc<RoomHub>) {
        let fill = claim_gap_fill(&mut hub.state.lock().unwrap());
        if fill {
            self.spawn_gap_fill(hub);
        }
    }

    fn spawn_gap_fill(self: &Arc<Self>, hub: &Arc<RoomHub>) {
        let registry = Arc::downgrade(self);
        let hub = Arc::downgrade(hub);
        let wait = self.gap_fill_after;
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            fill_gaps(registry, hub).await;
        });
    }
}

/// Whether the hub is behind with no gap fill under way; if so, marks one as under way.
fn claim_gap_fill(st: &mut HubState) -> bool {
    let behind = !st.pending.is_empty() || st.known_head > st.delivered;
    if !st.initialized || !behind || st.gap_fill_scheduled {
        return false;
    }
    st.gap_fill_scheduled = true;
    true
}

/// Reads the messages missing before the first pending one from the store and delivers them.
async fn fill_gaps(registry: Weak<RoomRegistry>, hub: Weak<RoomHub>) {
    loop {
        let (Some(registry), Some(hub)) = (registry.upgrade(), hub.upgrade()) else {
            return;
        };
        let (after, until) = {
            let mut st = hub.state.lock().unwrap();
            // Up to the first message waiting behind the gap, or else up to the known head.
            let target = match st.pending.first_key_value() {
                Some((&first, _)) => Some(first - 1),
                None if st.known_head > st.delivered => Some(st.known_head),
                None => None,
            };
            match target {
                Some(until) if !st.closed && until > st.delivered => (st.delivered, until),
                _ if !st.closed && !st.pending.is_empty() => {
                    // The gap closed meanwhile; deliver what follows it.
                    let pushed = registry.drain_contiguous(&mut st);
                    registry.metrics.messages_delivered.inc_by(pushed);
                    continue;
                }
                _ => {
                    st.gap_fill_scheduled = false;
                    return;
                }
            }
        };
        let limit = (until - after).clamp(1, 10_000) as u32;
        let missing = match registry
            .store
            .events_between(&hub.room, after, until, limit)
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(room = %hub.room, error = %e, "gap fill failed; retrying");
                tokio::time::sleep(registry.gap_fill_after).await;
                continue;
            }
        };
        let frames: Vec<_> = missing.iter().map(event_frame).collect();
        let read_all = frames.len() < limit as usize;
        let pushed = {
            let mut st = hub.state.lock().unwrap();
            let mut pushed = 0;
            for msg in frames {
                if msg.seq > st.delivered {
                    pushed += registry.deliver_next(&mut st, &msg);
                }
            }
            // Whatever the store did not return up to `until` is not visible (moderated away).
            if read_all && st.delivered < until {
                st.delivered = until;
            }
            pushed += registry.drain_contiguous(&mut st);
            pushed
        };
        registry.metrics.messages_delivered.inc_by(pushed);
        tracing::debug!(room = %hub.room, after, until, "filled a sequence gap from the store");
    }
}

/// Rooms whose heads one query asks for.
const HEADS_PER_QUERY: usize = 1000;

impl RoomRegistry {
    /// Asks the store for the heads of every room with local members, in a few queries, and has
    /// each hub that is behind fill its gap. The safety net for a message whose own publish was
    /// lost and that no later message reveals (its node died between commit and publish): run
    /// every few seconds where events cross nodes.
    pub async fn check_heads(self: &Arc<Self>) {
        let hubs: Vec<Arc<RoomHub>> = self.hubs.iter().map(|e| e.value().clone()).collect();
        for chunk in hubs.chunks(HEADS_PER_QUERY) {
            let rooms: Vec<&str> = chunk.iter().map(|h| &*h.room).collect();
            let heads = match self.store.room_heads(&rooms).await {
                Ok(heads) => heads,
                Err(e) => {
                    tracing::debug!(error = %e, "room heads not checked");
                    return;
                }
            };
            let heads: HashMap<String, i64> = heads.into_iter().collect();
            for hub in chunk {
                if let Some(&head) = heads.get(&*hub.room) {
                    self.on_head(hub, head);
                }
            }
        }
    }

    /// Catches every room up with the store (after the broker lost messages, e.g. a Redis
    /// restart): whatever was committed after a hub's `delivered` is delivered now, in order.
    pub fn resync_all(self: &Arc<Self>) {
        let hubs: Vec<Arc<RoomHub>> = self.hubs.iter().map(|e| e.value().clone()).collect();
        for hub in hubs {
            self.resync(hub);
        }
    }

    /// The rooms with local members.
    pub fn room_ids(&self) -> Vec<String> {
        self.hubs.iter().map(|e| e.key().to_string()).collect()
    }

    /// Catches one room up with the store (its subscription was lost and is back).
    pub fn resync_room(self: &Arc<Self>, room: &str) {
        if let Some(hub) = self.hubs.get(room).map(|h| h.clone()) {
            self.resync(hub);
        }
    }

    fn resync(self: &Arc<Self>, hub: Arc<RoomHub>) {
        {
            let registry = self.clone();
            tokio::spawn(async move {
                let after = {
                    let st = hub.state.lock().unwrap();
                    if !st.initialized || st.closed {
                        return;
                    }
                    st.delivered
                };
                let head = match registry.store.room_head(&hub.room).await {
                    Ok(Some(head)) if head > after => head,
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(room = %hub.room, error = %e, "resync failed");
                        return;
                    }
                };
                let limit = (head - after).clamp(1, 10_000) as u32;
                match registry
                    .store
                    .events_between(&hub.room, after, head, limit)
                    .await
                {
                    Ok(rows) => {
                        for row in &rows {
                            registry.on_message(&hub, event_frame(row));
                        }
                    }
                    Err(e) => tracing::warn!(room = %hub.room, error = %e, "resync failed"),
                }
            });
        }
    }
}

impl EventSink for Arc<RoomRegistry> {
    fn deliver(&self, room: &str, event: RoomEvent) {
        match event {
            RoomEvent::Presence(diff) => {
                if let Some(hub) = self.hubs.get(room).map(|h| h.clone()) {
                    self.on_presence(&hub, &diff);
                }
            }
            RoomEvent::Head { seq } => {
                if let Some(hub) = self.hubs.get(room).map(|h| h.clone()) {
                    self.on_head(&hub, seq);
                }
            }
            RoomEvent::Ephemeral { frame, skip_user } => {
                self.push_ephemeral(room, frame, skip_user.as_deref())
            }
            RoomEvent::Message(msg) => {
                if let Some(hub) = self.hubs.get(room).map(|h| h.clone()) {
                    self.on_message(&hub, msg);
                }
            }
            RoomEvent::MemberRemoved { user_id } => {
                self.membership.invalidate(room, &user_id);
                let Some(hub) = self.hubs.get(room).map(|h| h.clone()) else {
                    return;
                };
                let frame: Utf8Bytes = protocol::encode(&Push::Removed {
                    room,
                    reason: "membership removed",
                })
                .into();
                let removed: Vec<ConnId> = {
                    let st = hub.state.lock().unwrap();
                    let ids: Vec<ConnId> = st
                        .members
                        .values()
                        .filter(|m| m.conn.user_id == user_id)
                        .map(|m| m.conn.id)
                        .collect();
                    for id in &ids {
                        if let Some(m) = st.members.get(id) {
                            m.conn.rooms.lock().unwrap().remove(room);
                            m.conn.push(frame.clone());
                        }
                    }
                    ids
                };
                for id in removed {
                    if self.detach(room, id) {
                        self.unsubscribe(room);
                    }
                }
            }
        }
    }
}
