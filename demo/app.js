// chat-gateway demo page. The layout is already painted by index.html; this script wires it to
// the gateway through the SDK. Order matters for how fast the page feels:
//   1. at once: input and room buttons work (no network needed), the socket starts connecting;
//   2. in the background: the current room is joined and its latest history page rendered;
//   3. about a second later, when idle: non-essential calls (unread counts and previews of the
//      other rooms, which are then joined too so their badges update live; latency). A new name
//      is a new session, which joins the other rooms again at once.
import { connect, ConnectionState } from "/sdk/chat-gateway.js";

const $ = (id) => document.getElementById(id);
const ROOMS = (document.body.dataset.rooms || "general").split(",");
const AVATAR_TEMPLATE = document.body.dataset.avatarTemplate || "{url}";
const AVATAR_PX = 32;
const PAGE_SIZE = 30;

const params = new URLSearchParams(location.search);
let userName = params.get("name") || localStorage.getItem("chat-demo-name") || `guest-${Math.random().toString(36).slice(2, 6)}`;
let current = ROOMS.includes(params.get("room")) ? params.get("room") : ROOMS[0];

/**
 * Per room: messages by seq, sends not yet acknowledged, paging state, and the chat signals:
 * read position (null until the server's `rooms` answer or our own mark), highest seq known,
 * messages pushed while the read position was unknown, who is typing, who is online, and the seq
 * of the message in the sidebar preview (the newest known).
 */
const rooms = new Map();
function roomState(room) {
  let st = rooms.get(room);
  if (!st) {
    st = {
      messages: new Map(), pending: new Map(), nextBefore: null, loaded: false, handler: null,
      readSeq: null, lastSeq: 0, unseen: 0, typers: new Map(), online: null, onlineUsers: new Map(),
      previewSeq: null,
    };
    rooms.set(room, st);
  }
  return st;
}

/** @type {import("/sdk/chat-gateway.js").ChatClient | null} */
let client = null;
let started = null;
/** The client that has joined the other rooms of the list (see followOtherRooms). */
let followed = null;

// ---- 1. wire the static layout (no network) ----------------------------------------------

$("name").value = userName;
$("me").textContent = `signed in as ${userName}`;
for (const button of document.querySelectorAll(".room")) {
  button.addEventListener("click", () => enterRoom(button.dataset.room));
}
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text) return;
  $("input").value = "";
  sendMessage(current, text); // the SDK ends the typing signal on send
});
// Typing on while the box has text; the SDK keeps it alive and ends it on send.
$("input").addEventListener("input", () => client?.typing(current, $("input").value.trim() !== ""));
$("input").addEventListener("blur", () => client?.typing(current, false));
$("older").addEventListener("click", loadOlder);
// Scrolled to the bottom of the open room: everything is read.
$("messages").addEventListener("scroll", () => markCurrentRead());
document.addEventListener("visibilitychange", () => markCurrentRead());
$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = $("name").value.trim();
  if (!name || name === userName) return;
  userName = name;
  localStorage.setItem("chat-demo-name", name);
  $("me").textContent = `signed in as ${name}`;
  // A different user is a different session: close this one, start afresh. The page is painted
  // already, so the other rooms are joined at once rather than a second later.
  client?.close();
  client = null;
  started = null;
  rooms.clear();
  for (const room of ROOMS) renderBadge(room); // the previous user's counts are not this one's
  start();
  followOtherRooms();
});
showRoom(current);
$("input").focus();
performance.mark("chat:interactive");

start();
deferNonEssential();

// ---- 2. connection and rooms --------------------------------------------------------------

/** Starts the session once (init-once guard): one client, one socket. */
function start() {
  started ??= (async () => {
    client = connect("/ws", { token: devToken });
    client.on("state", renderConnection);
    // Back after a drop: who is online may have changed meanwhile.
    client.on("state", (e) => e.state === ConnectionState.OPEN && e.previous === ConnectionState.RECONNECTING && loadPresence(current));
    client.on("error", (e) => showNotice(`${e.code}: ${e.message}`));
    enterRoom(current, { force: true });
  })();
  return started;
}

/** Dev mode token provider: any name gets a token from the gateway's /dev/token. */
async function devToken() {
  const res = await fetch("/dev/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ name: userName }),
  });
  if (!res.ok) throw new Error(`POST /dev/token: HTTP ${res.status}`);
  return (await res.json()).token;
}

/**
 * Switches the view to `room` on the same socket. Rooms stay joined once opened (and the other
 * rooms of the list are joined after the first second), so their unread badges count live.
 */
function enterRoom(room, { force = false } = {}) {
  if (room === current && !force) return;
  if (client && room !== current) client.typing(current, false);
  current = room;
  const url = new URL(location.href);
  url.searchParams.set("room", room);
  history.replaceState(null, "", url);
  showRoom(room);
  if (!client) return;
  const st = roomState(room);
  joinRoom(room);
  // History goes out right behind the join on the same socket; the skeleton shows meanwhile.
  if (!st.loaded) loadLatest(room);
  loadPresence(room);
}

/** Joins `room` with its handler (once: the SDK shares a join already made). */
function joinRoom(room) {
  const st = roomState(room);
  st.handler ??= {
    onMessage: (m) => {
      if (room !== current || document.hidden) {
        if (st.readSeq == null) st.unseen++;
      }
      addMessages(room, [m]);
      // A message ends its sender's typing.
      if (st.typers.delete(m.senderId) && room === current) renderTyping();
    },
    onReload: () => {
      st.messages.clear();
      st.loaded = false;
      if (room === current) showRoom(room);
      loadLatest(room);
    },
    onRemoved: ({ reason }) => showNotice(`You were removed from #${room} (${reason}).`),
    onTyping: ({ userId, name, typing }) => {
      if (typing) st.typers.set(userId, name || userId);
      else st.typers.delete(userId);
      if (room === current) renderTyping();
    },
    // Our own marks from another tab or device clear the badge here too.
    onRead: ({ userId, seq }) => {
      if (userId === client?.userId) setReadSeq(room, seq);
    },
    onPresence: ({ online, joined, left }) => {
      if (st.online == null) return; // no snapshot yet: loadPresence will bring one
      st.online = online;
      for (const id of left) st.onlineUsers.delete(id);
      for (const u of joined) st.onlineUsers.set(u.userId, u.name || u.userId);
      if (room === current) renderPresence();
    },
  };
  client.join(room, st.handler).catch((e) => {
    if (e.code !== "left" && e.code !== "closed") showNotice(`Could not join #${room}: ${e.message}`);
  });
}

/** Who is online in `room` (one page of names; the count is the whole room). */
function loadPresence(room) {
  client.presence(room, { limit: 20 }).then(
    (p) => {
      const st = roomState(room);
      st.online = p.online;
      st.onlineUsers = new Map(p.users.map((u) => [u.userId, u.name || u.userId]));
      if (room === current) renderPresence();
    },
    () => {}, // presence is decoration: a server without it just shows no count
  );
}

/** Marks the open room read when its newest message is on screen. */
function markCurrentRead() {
  const room = current;
  const st = roomState(room);
  if (!client || document.hidden || !st.loaded) return;
  const box = $("messages");
  if (box.scrollHeight - box.scrollTop - box.clientHeight > 80) return;
  const top = Math.max(st.lastSeq, ...st.messages.keys());
  if (top <= 0 || (st.readSeq != null && top <= st.readSeq)) {
    if (st.unseen) {
      st.unseen = 0;
      renderBadge(room);
    }
    return;
  }
  setReadSeq(room, top);
  client.markRead(room, top).catch(() => {});
}

function setReadSeq(room, seq) {
  const st = roomState(room);
  if (st.readSeq == null || seq > st.readSeq) st.readSeq = seq;
  st.unseen = 0;
  renderBadge(room);
}

function loadLatest(room) {
  client
    .history(room, { limit: PAGE_SIZE })
    .then((page) => {
      const st = roomState(room);
      st.loaded = true;
      st.nextBefore = page.nextBefore;
      addMessages(room, page.messages);
      if (room === current) performance.mark("chat:history-loaded");
    })
    .catch((e) => showNotice(`Could not load #${room}: ${e.message}`));
}

/** Older page; a second click while it loads shares the same request (the SDK's lock). */
function loadOlder() {
  const room = current;
  const st = roomState(room);
  if (st.nextBefore == null) return;
  $("older").disabled = true;
  client
    .history(room, { before: st.nextBefore, limit: PAGE_SIZE })
    .then((page) => {
      st.nextBefore = page.nextBefore;
      addMessages(room, page.messages, { keepScroll: true });
    })
    .catch((e) => showNotice(`Could not load older messages: ${e.message}`))
    .finally(() => ($("older").disabled = false));
}

/** Optimistic send: shown at once as pending, replaced by the stored message when it arrives. */
function sendMessage(room, text, clientMsgId) {
  const st = roomState(room);
  const send = client.send(room, text, { clientMsgId });
  st.pending.set(send.clientMsgId, { content: text, state: "sending…" });
  if (room === current) renderList(room, { stickToBottom: true });
  send
    .then((ack) => addMessages(room, [ack.message]))
    .catch((e) => {
      const pending = st.pending.get(send.clientMsgId);
      if (!pending) return;
      if (e.code === "rate_limited") {
        // Same clientMsgId: the server stores it once however often we retry.
        pending.state = `waiting ${Math.ceil(e.retryAfterMs / 100) / 10} s…`;
        showNotice(`Slow down: sending again in ${e.retryAfterMs} ms.`);
        setTimeout(() => sendMessage(room, text, send.clientMsgId), e.retryAfterMs);
      } else {
        pending.state = `not sent (${e.code})`;
        pending.failed = true;
      }
      if (room === current) renderList(room);
    });
}

function addMessages(room, messages, { keepScroll = false } = {}) {
  const st = roomState(room);
  let newest = null;
  for (const m of messages) {
    st.messages.set(m.seq, m);
    if (m.clientMsgId) st.pending.delete(m.clientMsgId);
    if (!newest || m.seq > newest.seq) newest = m;
  }
  // History pages and older pages arrive after live messages: order by seq, not by arrival.
  if (newest) {
    setPreview(room, newest);
    if (newest.seq > st.lastSeq) st.lastSeq = newest.seq;
  }
  if (room === current) {
    renderList(room, { keepScroll, stickToBottom: !keepScroll });
    markCurrentRead();
  }
  renderBadge(room);
}

// ---- 3. deferred, non-essential --------------------------------------------------------------

/**
 * Unread counts, room previews and latency: nice to have, so they wait until the page is
 * settled. The other rooms of the list are joined then, so that their badges count live.
 */
function deferNonEssential() {
  const idle = window.requestIdleCallback || ((fn) => setTimeout(fn, 0));
  setTimeout(() => idle(async () => {
    if (!client) return;
    followOtherRooms();
    const showRtt = () => client?.ping().then(({ rttMs }) => ($("rtt").textContent = `${rttMs} ms`), () => {});
    showRtt();
    setInterval(showRtt, 30_000);
  }), 1000);
}

/**
 * Joins the other rooms of the list, so that their badges and previews count new messages live,
 * and asks for the unread counts and last messages of all of them. Once per session: a session
 * joins only the open room by itself (at start-up, after a new name).
 */
function followOtherRooms() {
  if (!client || followed === client) return;
  followed = client;
  for (const room of ROOMS) if (room !== current) joinRoom(room);
  client.rooms({ limit: 200 }).then(({ rooms: list }) => {
    for (const r of list) {
      if (!ROOMS.includes(r.id)) continue;
      const st = roomState(r.id);
      if (r.lastSeq > st.lastSeq) st.lastSeq = r.lastSeq;
      if (st.readSeq == null || r.lastReadSeq > st.readSeq) st.readSeq = r.lastReadSeq;
      st.unseen = 0;
      if (r.lastMessage && !st.loaded) setPreview(r.id, r.lastMessage);
      renderBadge(r.id);
    }
    markCurrentRead();
  }, () => {});
}

// ---- rendering -------------------------------------------------------------------------------

function showRoom(room) {
  for (const b of document.querySelectorAll(".room")) b.classList.toggle("active", b.dataset.room === room);
  $("room-title").textContent = `# ${room}`;
  $("input").placeholder = `Message #${room}`;
  renderList(room, { stickToBottom: true });
  renderTyping();
  renderPresence();
  markCurrentRead();
}

/** The room's unread count: seqs past the read position, or pushes counted while unknown. */
function renderBadge(room) {
  const st = roomState(room);
  const unread = st.readSeq != null ? Math.max(0, st.lastSeq - st.readSeq) : st.unseen;
  const b = document.querySelector(`.room[data-room="${CSS.escape(room)}"] .badge`);
  if (!b) return;
  b.textContent = unread > 99 ? "99+" : String(unread);
  b.hidden = unread === 0;
}

/** "X is typing…" under the open room's messages. */
function renderTyping() {
  const names = [...roomState(current).typers.values()];
  const line = $("typing");
  if (names.length === 0) line.textContent = "";
  else if (names.length === 1) line.textContent = `${names[0]} is typing…`;
  else if (names.length === 2) line.textContent = `${names[0]} and ${names[1]} are typing…`;
  else line.textContent = `${names.length} people are typing…`;
}

/** The open room's online count and a few names with green dots. */
function renderPresence() {
  const st = roomState(current);
  $("online").hidden = st.online == null;
  if (st.online == null) return;
  $("online-count").textContent = `${st.online} online`;
  const names = [...st.onlineUsers.values()].slice(0, 5).map((n) => {
    const u = el("span", "u");
    u.textContent = n;
    return u;
  });
  $("online-users").replaceChildren(...names);
}

function renderList(room, { keepScroll = false, stickToBottom = false } = {}) {
  const st = roomState(room);
  const box = $("messages");
  const fromBottom = box.scrollHeight - box.scrollTop;
  const nearBottom = fromBottom - box.clientHeight < 80;
  const list = $("list");
  const items = [];
  for (const m of [...st.messages.values()].sort((a, b) => a.seq - b.seq)) items.push(messageItem(m));
  for (const [clientMsgId, p] of st.pending) items.push(pendingItem(clientMsgId, p));
  list.replaceChildren(...items);
  $("skeleton").hidden = st.loaded || items.length > 0;
  $("empty").hidden = !st.loaded || items.length > 0;
  $("older").hidden = st.nextBefore == null;
  if (keepScroll) box.scrollTop = box.scrollHeight - fromBottom;
  else if (stickToBottom || nearBottom) box.scrollTop = box.scrollHeight;
}

function messageItem(m) {
  const li = el("li", "msg");
  li.dataset.seq = m.seq;
  if (m.clientMsgId) li.dataset.clientMsgId = m.clientMsgId;
  if (client && m.senderId === client.userId) li.classList.add("mine");
  const name = m.senderName || m.senderId;
  const time = el("time");
  time.dateTime = m.createdAt;
  time.textContent = new Date(m.createdAt).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  li.append(avatar(name, m.senderId, m.senderAvatarUrl), body(name, time, m.content));
  return li;
}

function pendingItem(clientMsgId, p) {
  const li = el("li", p.failed ? "msg mine pending failed" : "msg mine pending");
  li.dataset.clientMsgId = clientMsgId;
  const state = el("span", "state");
  state.textContent = p.state;
  li.append(avatar(userName, client?.userId ?? userName, null), body(userName, state, p.content));
  return li;
}

function body(name, after, content) {
  const b = el("div", "body");
  const meta = el("div", "meta");
  const n = el("span", "name");
  n.textContent = name;
  meta.append(n, after);
  const c = el("div", "content");
  c.textContent = content;
  b.append(meta, c);
  return b;
}

/**
 * Initials on a colour derived from the user id, with the picture (if any) on top, loaded lazily
 * through the resize template. A picture that fails to load is removed: the initials remain.
 */
function avatar(name, userId, url) {
  const a = el("span", "avatar");
  a.textContent = initials(name);
  a.style.background = `hsl(${hash(userId) % 360} 45% 48%)`;
  if (url) {
    const img = el("img");
    img.alt = "";
    img.loading = "lazy";
    img.decoding = "async";
    img.width = img.height = AVATAR_PX;
    img.src = AVATAR_TEMPLATE.replaceAll("{url}", url)
      .replaceAll("{encodedUrl}", encodeURIComponent(url))
      .replaceAll("{size}", String(AVATAR_PX * Math.ceil(window.devicePixelRatio || 1)));
    img.addEventListener("error", () => img.remove());
    a.append(img);
  }
  return a;
}

function initials(name) {
  const parts = String(name).trim().split(/[\s._-]+/).filter(Boolean);
  return ((parts[0]?.[0] ?? "?") + (parts.length > 1 ? parts.at(-1)[0] : "")).toUpperCase();
}

function hash(s) {
  let h = 0;
  for (const ch of String(s)) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return h;
}

/** Shows `m` as the preview of `room` unless a newer message (higher seq) is shown already. */
function setPreview(room, m) {
  const st = roomState(room);
  if (st.previewSeq != null && m.seq < st.previewSeq) return;
  st.previewSeq = m.seq;
  const b = document.querySelector(`.room[data-room="${CSS.escape(room)}"] .preview`);
  if (b) b.textContent = m.content;
}

function renderConnection(e) {
  $("conn").dataset.state = e.state;
  const labels = {
    [ConnectionState.CONNECTING]: "connecting…",
    [ConnectionState.OPEN]: "connected",
    [ConnectionState.CLOSED]: "disconnected",
  };
  $("conn-label").textContent =
    e.state === ConnectionState.RECONNECTING
      ? `reconnecting${e.delayMs ? ` in ${(e.delayMs / 1000).toFixed(1)} s` : ""}…`
      : labels[e.state];
  if (e.state === ConnectionState.OPEN) $("notice").hidden = true;
}

let noticeTimer = null;
function showNotice(text) {
  const n = $("notice");
  n.textContent = text;
  n.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => (n.hidden = true), 6000);
}

function el(tag, className) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  return e;
}
