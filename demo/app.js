// chat-gateway demo page. The layout is already painted by index.html; this script wires it to
// the gateway through the SDK. Order matters for how fast the page feels:
//   1. at once: input and room buttons work (no network needed), the socket starts connecting;
//   2. in the background: the current room is joined and its latest history page rendered;
//   3. about a second later, when idle: non-essential calls (room previews, latency).
import { connect, ConnectionState } from "/sdk/chat-gateway.js";

const $ = (id) => document.getElementById(id);
const ROOMS = (document.body.dataset.rooms || "general").split(",");
const AVATAR_TEMPLATE = document.body.dataset.avatarTemplate || "{url}";
const AVATAR_PX = 32;
const PAGE_SIZE = 30;

const params = new URLSearchParams(location.search);
let userName = params.get("name") || localStorage.getItem("chat-demo-name") || `guest-${Math.random().toString(36).slice(2, 6)}`;
let current = ROOMS.includes(params.get("room")) ? params.get("room") : ROOMS[0];

/** Per room: messages by seq, sends not yet acknowledged, and paging state. */
const rooms = new Map();
function roomState(room) {
  let st = rooms.get(room);
  if (!st) {
    st = { messages: new Map(), pending: new Map(), nextBefore: null, loaded: false, handler: null };
    rooms.set(room, st);
  }
  return st;
}

/** @type {import("/sdk/chat-gateway.js").ChatClient | null} */
let client = null;
let started = null;

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
  sendMessage(current, text);
});
$("older").addEventListener("click", loadOlder);
$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = $("name").value.trim();
  if (!name || name === userName) return;
  userName = name;
  localStorage.setItem("chat-demo-name", name);
  $("me").textContent = `signed in as ${name}`;
  // A different user is a different session: close this one, start afresh.
  client?.close();
  client = null;
  started = null;
  rooms.clear();
  start();
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

/** Switches the view to `room`: leave the previous one, join this one on the same socket. */
function enterRoom(room, { force = false } = {}) {
  if (room === current && !force) return;
  if (client && room !== current) client.leave(current);
  current = room;
  const url = new URL(location.href);
  url.searchParams.set("room", room);
  history.replaceState(null, "", url);
  showRoom(room);
  if (!client) return;
  const st = roomState(room);
  st.handler ??= {
    onMessage: (m) => addMessages(room, [m]),
    onReload: () => {
      st.messages.clear();
      st.loaded = false;
      if (room === current) showRoom(room);
      loadLatest(room);
    },
    onRemoved: ({ reason }) => showNotice(`You were removed from #${room} (${reason}).`),
  };
  client.join(room, st.handler).catch((e) => {
    if (e.code !== "left" && e.code !== "closed") showNotice(`Could not join #${room}: ${e.message}`);
  });
  // History goes out right behind the join on the same socket; the skeleton shows meanwhile.
  if (!st.loaded) loadLatest(room);
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
  for (const m of messages) {
    st.messages.set(m.seq, m);
    if (m.clientMsgId) st.pending.delete(m.clientMsgId);
  }
  const last = [...st.messages.values()].at(-1);
  if (last) setPreview(room, last);
  if (room === current) renderList(room, { keepScroll, stickToBottom: !keepScroll });
}

// ---- 3. deferred, non-essential --------------------------------------------------------------

/** Room previews and latency: nice to have, so they wait until the page is settled. */
function deferNonEssential() {
  const idle = window.requestIdleCallback || ((fn) => setTimeout(fn, 0));
  setTimeout(() => idle(async () => {
    if (!client) return;
    for (const room of ROOMS) {
      if (room === current || roomState(room).loaded) continue;
      client.history(room, { limit: 1 }).then((page) => {
        const last = page.messages.at(-1);
        if (last) setPreview(room, last);
      }, () => {});
    }
    const showRtt = () => client?.ping().then(({ rttMs }) => ($("rtt").textContent = `${rttMs} ms`), () => {});
    showRtt();
    setInterval(showRtt, 30_000);
  }), 1000);
}

// ---- rendering -------------------------------------------------------------------------------

function showRoom(room) {
  for (const b of document.querySelectorAll(".room")) b.classList.toggle("active", b.dataset.room === room);
  $("room-title").textContent = `# ${room}`;
  $("input").placeholder = `Message #${room}`;
  renderList(room, { stickToBottom: true });
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

function setPreview(room, m) {
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
