//! One WebSocket client of the generator: connecting (auth, joins), the measured phase in which
//! it carries out the generator's commands and records replies and pushes, and connecting
//! thousands at a time.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::gateway::Gateway;
use crate::report::{Shared, record};

pub(crate) type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Reactions the `changes` scenario toggles (each a key of its own: one pictographic character).
const EMOJI: [&str; 3] = ["\u{1F44D}", "\u{1F389}", "\u{1F602}"];

/// Messages of a room a client keeps as targets for its reactions: the newest it received.
const RECENT: usize = 5;

/// What the generator asks a connection to do.
pub(crate) enum Cmd {
    Send {
        room: usize,
    },
    /// A send whose ack's `seq` the client keeps: the message its edits change.
    Seed {
        room: usize,
    },
    /// One change in the room: an edit of the client's seeded message, or else a reaction on one
    /// of the room's recent messages, added or removed (toggled per message and emoji).
    Change {
        room: usize,
        edit: bool,
    },
    History {
        room: usize,
        before: Option<i64>,
        cold: bool,
    },
    Close,
}

#[derive(Clone, Copy)]
enum Pending {
    Send { room: usize, at: Instant },
    Seed { room: usize },
    Change { room: usize, at: Instant },
    History { at: Instant, cold: bool },
    Other,
}

/// A server frame, read only as far as the report needs.
#[derive(Deserialize)]
pub(crate) struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    pub(crate) kind: &'a str,
    #[serde(default)]
    pub(crate) id: Option<u64>,
    /// Pushes: their room.
    #[serde(default, borrow)]
    pub(crate) room: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    pub(crate) message: Option<PushMessage<'a>>,
    /// `change` pushes: the change (only its `seq` is read).
    #[serde(default)]
    pub(crate) change: Option<Seq>,
    /// Presence pushes: the room's online count (storm).
    #[serde(default)]
    pub(crate) online: Option<u64>,
    #[serde(default, borrow)]
    pub(crate) result: Option<&'a serde_json::value::RawValue>,
    #[serde(default)]
    pub(crate) error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
pub(crate) struct PushMessage<'a> {
    pub(crate) seq: i64,
    #[serde(borrow)]
    pub(crate) content: std::borrow::Cow<'a, str>,
}

/// Any object of which only the `seq` is read.
#[derive(Deserialize)]
pub(crate) struct Seq {
    pub(crate) seq: i64,
}

/// A send's result, as far as the `changes` scenario reads it.
#[derive(Deserialize)]
struct SendResult {
    message: Seq,
}

/// An edit's or reaction's result: the change it stored (`null` and `duplicate` when none).
#[derive(Deserialize)]
struct ChangeResult {
    change: Option<Seq>,
    #[serde(default)]
    duplicate: bool,
}

/// What one read of a generator socket gave: a text frame, something to skip (pings, pongs,
/// binary), or the end of the socket, with why.
pub(crate) enum Read {
    Text(tokio_tungstenite::tungstenite::Utf8Bytes),
    Skip,
    Ended(String),
}

pub(crate) fn read_text(
    msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Read {
    match msg {
        Some(Ok(Message::Text(text))) => Read::Text(text),
        Some(Ok(Message::Close(frame))) => Read::Ended(format!("closed by server: {frame:?}")),
        Some(Ok(_)) => Read::Skip,
        Some(Err(e)) => Read::Ended(format!("socket read: {e}")),
        None => Read::Ended("socket closed by server".into()),
    }
}

/// A connected, authenticated client with its rooms joined.
pub(crate) struct Client {
    pub(crate) ws: Ws,
    pub(crate) next_id: u64,
}

/// A send's idempotency key as the SDK makes them: the time first (milliseconds, fixed-width hex),
/// so a store's index of keys takes each commit's new keys at one place.
fn client_msg_id(user: usize, counter: u64) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("c-{ms:012x}-u{user}-{counter}")
}

fn ws_config() -> WebSocketConfig {
    // Small buffers: thousands of sockets live in this one process.
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
}

impl Client {
    /// Connects, authenticates with a first `auth` frame and joins `rooms`, waiting for each
    /// reply (pushes cannot arrive before the joins complete since nothing is sent yet).
    pub(crate) async fn connect(
        gw: &Gateway,
        n: usize,
        token: &str,
        rooms: &[String],
    ) -> anyhow::Result<Self> {
        let stream = gw.tcp(n).await.context("connect")?;
        let url = format!("ws://{}/ws", gw.node_addr(n));
        let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config()))
            .await
            .context("websocket handshake")?;
        let mut client = Client { ws, next_id: 1 };
        client
            .call(json!({"type": "auth", "token": token}))
            .await
            .context("auth")?;
        for room in rooms {
            client
                .call(json!({"type": "join", "room": room}))
                .await
                .with_context(|| format!("join {room}"))?;
        }
        Ok(client)
    }

    /// Sends one request and waits for its reply (setup only: no pushes expected meanwhile).
    async fn call(&mut self, mut frame: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let id = self.next_id;
        self.next_id += 1;
        frame["id"] = json!(id);
        self.ws.send(Message::text(frame.to_string())).await?;
        let deadline = Duration::from_secs(30);
        loop {
            let msg = tokio::time::timeout(deadline, self.ws.next())
                .await
                .context("no reply within 30 s")?
                .context("socket closed")??;
            let Message::Text(text) = msg else { continue };
            let reply: serde_json::Value = serde_json::from_str(&text)?;
            if reply["id"] == json!(id) {
                if reply["type"] == "error" {
                    bail!("{}", reply["error"]);
                }
                return Ok(reply["result"].clone());
            }
        }
    }

    /// The measured phase: carry out commands, read replies and pushes until told to close.
    async fn run(
        mut self,
        rooms: Arc<Vec<String>>,
        epoch: Instant,
        mut cmds: mpsc::Receiver<Cmd>,
        shared: Shared,
        user: usize,
        limit: u32,
    ) {
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        let mut last_seq: HashMap<String, i64> = HashMap::new();
        let mut counter = 0u64;
        // The `changes` scenario's state: the seq of this user's seeded message per room, the
        // newest messages received per room, and the (message, emoji) reactions it holds.
        let mut own: HashMap<usize, i64> = HashMap::new();
        let mut recent: HashMap<String, VecDeque<i64>> = HashMap::new();
        let mut reacted: HashSet<(i64, usize)> = HashSet::new();
        let mut reactions = 0usize;
        loop {
            tokio::select! {
                cmd = cmds.recv() => {
                    let Some(cmd) = cmd else { break };
                    let id = self.next_id;
                    self.next_id += 1;
                    let at = Instant::now();
                    let frame = match cmd {
                        Cmd::Close => break,
                        Cmd::Send { room } | Cmd::Seed { room } => {
                            counter += 1;
                            let p = match cmd {
                                Cmd::Seed { .. } => Pending::Seed { room },
                                _ => Pending::Send { room, at },
                            };
                            pending.insert(id, p);
                            shared.1.sent.fetch_add(1, Ordering::Relaxed);
                            // The send time (us since the run's epoch) travels in the content, so
                            // every receiver can measure delivery latency.
                            let t = at.duration_since(epoch).as_micros();
                            json!({"type": "send", "id": id, "room": rooms[room],
                                   "content": format!("t={t} u={user} n={counter}"),
                                   "clientMsgId": client_msg_id(user, counter)})
                        }
                        Cmd::Change { room, edit } => {
                            counter += 1;
                            let frame = if edit {
                                own.get(&room).map(|seq| {
                                    // The request time travels in the content, as in a send.
                                    let t = at.duration_since(epoch).as_micros();
                                    ("edit", json!({"type": "edit", "id": id, "room": rooms[room],
                                        "seq": seq, "content": format!("t={t} u={user} n={counter}"),
                                        "clientChangeId": format!("u{user}-e{counter}")}))
                                })
                            } else {
                                // Three (message, emoji) keys per user, each on another of the
                                // room's recent messages (offset by user), added one time round
                                // and removed the next: as many removals as reactions.
                                recent.get(&rooms[room]).filter(|r| !r.is_empty()).map(|r| {
                                    let emoji = reactions % EMOJI.len();
                                    let seq = r[(user + emoji) % r.len()];
                                    reactions += 1;
                                    let kind = if reacted.remove(&(seq, emoji)) {
                                        "unreact"
                                    } else {
                                        reacted.insert((seq, emoji));
                                        "react"
                                    };
                                    (kind, json!({"type": kind, "id": id, "room": rooms[room],
                                        "seq": seq, "emoji": EMOJI[emoji]}))
                                })
                            };
                            let Some((kind, frame)) = frame else {
                                shared.0.lock().unwrap().error("no message to change (room not seeded)");
                                continue;
                            };
                            pending.insert(id, Pending::Change { room, at });
                            shared.1.sent.fetch_add(1, Ordering::Relaxed);
                            *shared.0.lock().unwrap().change_kinds.entry(kind).or_default() += 1;
                            frame
                        }
                        Cmd::History { room, before, cold } => {
                            pending.insert(id, Pending::History { at, cold });
                            let mut f = json!({"type": "history", "id": id, "room": rooms[room],
                                               "limit": limit});
                            if let Some(b) = before {
                                f["before"] = json!(b);
                            }
                            f
                        }
                    };
                    shared.1.requests.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = self.ws.send(Message::text(frame.to_string())).await {
                        shared.0.lock().unwrap().error(format!("socket write: {e}"));
                        break;
                    }
                }
                msg = self.ws.next() => {
                    let text = match read_text(msg) {
                        Read::Text(text) => text,
                        Read::Skip => continue,
                        Read::Ended(why) => {
                            shared.0.lock().unwrap().error(why);
                            break;
                        }
                    };
                    let now = Instant::now();
                    let frame: Frame = match serde_json::from_str(&text) {
                        Ok(f) => f,
                        Err(e) => {
                            shared.0.lock().unwrap().error(format!("unparsable frame: {e}"));
                            continue;
                        }
                    };
                    match frame.kind {
                        "message" => {
                            let (Some(m), Some(room)) = (frame.message, frame.room) else {
                                continue;
                            };
                            if !last_seq.contains_key(&*room) {
                                last_seq.insert(room.to_string(), 0);
                            }
                            let last = last_seq.get_mut(&*room).expect("inserted above");
                            if m.seq <= *last {
                                shared.1.duplicates.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            *last = m.seq;
                            match recent.get_mut(&*room) {
                                Some(r) => {
                                    if r.len() == RECENT {
                                        r.pop_front();
                                    }
                                    r.push_back(m.seq);
                                }
                                None => {
                                    recent.insert(room.to_string(), VecDeque::from([m.seq]));
                                }
                            }
                            shared.1.delivered.fetch_add(1, Ordering::Relaxed);
                            shared.1.push_bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
                            let sent_at = m
                                .content
                                .strip_prefix("t=")
                                .and_then(|r| r.split(' ').next())
                                .and_then(|t| t.parse::<u64>().ok());
                            if let Some(t) = sent_at {
                                let since = now.duration_since(epoch).as_micros() as u64;
                                let mut s = shared.0.lock().unwrap();
                                s.delivery.saturating_record(since.saturating_sub(t).max(1));
                            }
                        }
                        "change" => {
                            let (Some(c), Some(room)) = (frame.change, frame.room) else {
                                continue;
                            };
                            // Changes take the room's seq like messages: same order, same check.
                            let last = match last_seq.get_mut(&*room) {
                                Some(last) => last,
                                None => last_seq.entry(room.to_string()).or_insert(0),
                            };
                            if c.seq <= *last {
                                shared.1.duplicates.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            *last = c.seq;
                            shared.1.delivered.fetch_add(1, Ordering::Relaxed);
                            shared.1.push_bytes.fetch_add(text.len() as u64, Ordering::Relaxed);
                            // Matched with the request's time by (room, seq) when the report is
                            // made: the sender learns the seq from its ack, which may come later.
                            let since = now.duration_since(epoch).as_micros() as u64;
                            shared.0.lock().unwrap().change_arrivals.push((room.to_string(), c.seq, since));
                        }
                        "result" | "error" => {
                            shared.1.replies.fetch_add(1, Ordering::Relaxed);
                            let p = frame
                                .id
                                .and_then(|id| pending.remove(&id))
                                .unwrap_or(Pending::Other);
                            let mut s = shared.0.lock().unwrap();
                            if frame.kind == "error" {
                                let code = frame
                                    .error
                                    .as_ref()
                                    .and_then(|e| e["code"].as_str())
                                    .unwrap_or("?")
                                    .to_string();
                                s.error(format!("error reply: {code}"));
                                continue;
                            }
                            match p {
                                Pending::Send { room, at } => {
                                    record(&mut s.ack, now - at);
                                    *s.acked.entry(room).or_default() += 1;
                                }
                                Pending::Seed { room } => {
                                    match frame.result.map(|r| serde_json::from_str::<SendResult>(r.get())) {
                                        Some(Ok(r)) => {
                                            own.insert(room, r.message.seq);
                                            *s.acked.entry(room).or_default() += 1;
                                        }
                                        _ => s.error("send result without a message seq"),
                                    }
                                }
                                Pending::Change { room, at } => {
                                    match frame.result.map(|r| serde_json::from_str::<ChangeResult>(r.get())) {
                                        Some(Ok(ChangeResult { change: Some(c), duplicate: false })) => {
                                            record(&mut s.ack, now - at);
                                            *s.acked.entry(room).or_default() += 1;
                                            let t = at.duration_since(epoch).as_micros() as u64;
                                            s.change_requests.insert((rooms[room].clone(), c.seq), t);
                                        }
                                        Some(Ok(_)) => s.error("change stored nothing (duplicate)"),
                                        _ => s.error("change result without a change seq"),
                                    }
                                }
                                Pending::History { at, cold } => {
                                    let h = if cold { &mut s.cold } else { &mut s.hot };
                                    record(h, now - at);
                                }
                                Pending::Other => {}
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        let _ = self.ws.close(None).await;
    }
}

/// Connects `users` clients (`rooms_of(i)` gives the room indexes user i joins), at most
/// `concurrency` handshakes at a time. Returns the clients in user order.
pub(crate) async fn connect_all(
    gw: &Arc<Gateway>,
    users: usize,
    room_names: &Arc<Vec<String>>,
    rooms_of: impl Fn(usize) -> Vec<usize>,
    user_of: impl Fn(usize) -> String,
    concurrency: usize,
) -> anyhow::Result<Vec<Client>> {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let done = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::with_capacity(users);
    for i in 0..users {
        let gw = gw.clone();
        let gate = gate.clone();
        let done = done.clone();
        let joins: Vec<String> = rooms_of(i)
            .into_iter()
            .map(|r| room_names[r].clone())
            .collect();
        let token = gw.token(&user_of(i));
        handles.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.expect("semaphore open");
            let c = Client::connect(&gw, i, &token, &joins).await;
            done.fetch_add(1, Ordering::Relaxed);
            c
        }));
    }
    let mut clients = Vec::with_capacity(users);
    for (i, h) in handles.into_iter().enumerate() {
        let c = h.await?.with_context(|| format!("socket {i} of {users}"))?;
        clients.push(c);
    }
    Ok(clients)
}

/// Starts each connected client's measured phase (`Client::run`, client i as user i), each with a
/// command queue of `queue` entries; returns the queues' senders and the tasks.
pub(crate) fn start_clients(
    clients: Vec<Client>,
    rooms: &Arc<Vec<String>>,
    epoch: Instant,
    shared: &Shared,
    queue: usize,
    limit: u32,
) -> (Vec<mpsc::Sender<Cmd>>, Vec<tokio::task::JoinHandle<()>>) {
    clients
        .into_iter()
        .enumerate()
        .map(|(u, client)| {
            let (tx, rx) = mpsc::channel(queue);
            let task = tokio::spawn(client.run(rooms.clone(), epoch, rx, shared.clone(), u, limit));
            (tx, task)
        })
        .unzip()
}

/// Connects, authenticates and joins one room with `since`; returns the client, the join's
/// `head` and whether the server asked for a reload (more missed than it replays).
pub(crate) async fn join_one(
    gw: &Gateway,
    n: usize,
    token: &str,
    room: &str,
    since: Option<i64>,
) -> anyhow::Result<(Client, i64, bool)> {
    let mut c = Client::connect(gw, n, token, &[]).await?;
    let mut frame = json!({"type": "join", "room": room});
    if let Some(since) = since {
        frame["since"] = json!(since);
    }
    let result = c
        .call(frame)
        .await
        .with_context(|| format!("join {room}"))?;
    let head = result["head"].as_i64().unwrap_or(0);
    Ok((c, head, result["reload"] == json!(true)))
}

/// Raises the open-file limit to the hard limit; returns the new soft limit.
pub(crate) fn raise_nofile() -> libc::rlim_t {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) == 0 {
                return wanted.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}
