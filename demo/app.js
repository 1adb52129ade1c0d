// chat-gateway demo page. The layout is already painted by index.html; this script wires it to
// the gateway through the SDK. Order matters for how fast the page feels:
//   1. at once: input and room buttons work (no network needed), the socket starts connecting;
//   2. in the background: the current room is joined and its latest history page rendered;
//   3. about a second later, when idle: non-essential calls (unread counts and previews of the
//      other rooms, which are then joined too so their badges update live; latency). A new name
//      is a new session, which joins the other rooms again at once.
// Messages change (edits, deletions, reactions): the SDK hands each change to the room handler's
// onChange with the message as it now is, and the page draws that message again.
import { connect, ConnectionState } from "/sdk/chat-gateway.js";

const $ = (id) => document.getElementById(id);
const ROOMS = (document.body.dataset.rooms || "general").split(",");
const AVATAR_TEMPLATE = document.body.dataset.avatarTemplate || "{url}";
const AVATAR_PX = 32;
const PAGE_SIZE = 30;
/** The reactions offered when hovering a message (any emoji works; these are one click away). */
const REACTIONS = ["👍", "❤️", "😂", "🎉", "😮"];

const params = new URLSearchParams(location.search);
let userName = params.get("name") || localStorage.getItem("chat-demo-name") || `guest-${Math.random().toString(36).slice(2, 6)}`;
let current = ROOMS.includes(params.get("room")) ? params.get("room") : ROOMS[0];

/**
 * Per room: messages by seq, sends not yet acknowledged, paging state, and the chat signals:
 * read position (null until the server's `rooms` answer or our own mark), highest seq known
 * (changes included), messages pushed while the read position was unknown, the server's unread
 * count and the seq it was counted up to (from `rooms`), who is typing, who is online, and the
 * seq of the message in the sidebar preview (the newest known).
 */
const rooms = new Map();
function roomState(room) {
  let st = rooms.get(room);
  if (!st) {
    st = {
      messages: new Map(), pending: new Map(), nextBefore: null, loaded: false, handler: null,
      readSeq: null, lastSeq: 0, unseen: 0, baseSeq: null, baseUnread: 0, typers: new Map(),
      online: null, onlineUsers: new Map(), previewSeq: null,
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
/**
 * What the composer is doing besides writing a new message: editing one of ours
 * (`{kind: "edit", room, seq}`) or replying (`{kind: "reply", room, seq, name, excerpt}`).
 */
let composing = null;

// ---- 1. wire the static layout (no network) ----------------------------------------------

$("name").value = userName;
$("me").textContent = `signed in as ${userName}`;
for (const button of document.querySelectorAll(".room")) {
  button.addEventListener("click", () => enterRoom(button.dataset.room));
}
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (composing?.kind === "edit") {
    saveEdit(composing, text);
    return;
  }
  if (!text) return;
  $("input").value = "";
  const replyTo = composing?.kind === "reply" ? composing : null;
  setComposing(null);
  sendMessage(current, text, undefined, replyTo); // the SDK ends the typing signal on send
});
$("input").addEventListener("keydown", (event) => {
  // Up in an empty box edits our last message; Escape leaves an edit or a reply.
  if (event.key === "ArrowUp" && $("input").value === "" && !composing) {
    const m = lastOwnMessage(current);
    if (m) {
      event.preventDefault();
      startEdit(current, m);
    }
  } else if (event.key === "Escape" && composing) {
    event.preventDefault();
    if (composing.kind === "edit") $("input").value = "";
    setComposing(null);
  }
});
$("composing-cancel").addEventListener("click", () => {
  if (composing?.kind === "edit") $("input").value = "";
  setComposing(null);
  $("input").focus();
});
// Message actions (react, reply, edit, delete), reaction chips and quotes: one listener for all.
$("list").addEventListener("click", onListClick);
// Typing on while the box has new text (not an edit); the SDK keeps it alive and ends it on send.
$("input").addEventListener("input", () => composing?.kind !== "edit" && client?.typing(current, $("input").value.trim() !== ""));
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
  if (composing && composing.room !== room) {
    if (composing.kind === "edit") $("input").value = "";
    setComposing(null);
  }
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
    // Edited, deleted, reacted to, moderated: the SDK hands the message as it now is (and the
    // replies whose quote of it changed); messages this page does not show are left alone.
    onChange: ({ change, message, replies }) => {
      if (change.seq > st.lastSeq) st.lastSeq = change.seq;
      const shown = [message, ...replies].filter((m) => m && st.messages.has(m.seq));
      if (shown.length === 0) return;
      for (const m of shown) {
        if (m.moderationStatus === "REJECTED") st.messages.delete(m.seq);
        else putMessage(st, m);
      }
      const gone = message?.deletedAt != null || message?.moderationStatus === "REJECTED";
      if (gone && composing?.room === room && composing.seq === message.seq) {
        if (composing.kind === "edit") $("input").value = "";
        setComposing(null);
      }
      if (st.previewSeq != null && shown.some((m) => m.seq === st.previewSeq)) refreshPreview(room);
      if (room === current) renderList(room);
      renderBadge(room);
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

/**
 * Optimistic send: shown at once as pending, replaced by the stored message when it arrives.
 * `replyTo`: the message it replies to (`{seq, name, excerpt}`), quoted while pending.
 */
function sendMessage(room, text, clientMsgId, replyTo = null) {
  const st = roomState(room);
  const send = client.send(room, text, { clientMsgId, replyTo: replyTo?.seq });
  st.pending.set(send.clientMsgId, { content: text, state: "sending…", replyTo });
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
        setTimeout(() => sendMessage(room, text, send.clientMsgId, replyTo), e.retryAfterMs);
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
    putMessage(st, m);
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

/** Shows `m` unless the page shows it in a newer version already (the protocol's rule). */
function putMessage(st, m) {
  const shown = st.messages.get(m.seq);
  if (!shown || shown.version <= m.version) st.messages.set(m.seq, m);
}

// ---- messages that change: edit, delete, react, reply -------------------------------------

/** Our newest message of `room` that can still be edited (not deleted). */
function lastOwnMessage(room) {
  let last = null;
  for (const m of roomState(room).messages.values()) {
    if (m.senderId === client?.userId && m.deletedAt == null && (!last || m.seq > last.seq)) last = m;
  }
  return last;
}

function startEdit(room, m) {
  client?.typing(room, false);
  setComposing({ kind: "edit", room, seq: m.seq });
  $("input").value = m.content;
  $("input").focus();
}

/** Saves the edit in the composer: the change shows when its push arrives (or the result). */
function saveEdit(edit, text) {
  const shown = roomState(edit.room).messages.get(edit.seq);
  setComposing(null);
  $("input").value = "";
  if (!text || text === shown?.content) return; // nothing to save (delete removes a message)
  client
    .edit(edit.room, edit.seq, text)
    .then(({ message }) => showChanged(edit.room, message))
    .catch((e) => showNotice(`Could not edit: ${e.code}${e.code === "edit_window_closed" ? " (too late to edit)" : ""}`));
}

/** A change's result: shown at once, if the page still shows the message in an older version. */
function showChanged(room, message) {
  const st = roomState(room);
  if (!st.messages.has(message.seq)) return;
  putMessage(st, message);
  if (st.previewSeq === message.seq) refreshPreview(room);
  if (room === current) renderList(room);
}

/** Sets (or clears, with null) what the composer does besides a new message, and its bar. */
function setComposing(next) {
  composing = next;
  const bar = $("composing");
  bar.hidden = !next;
  $("composer").classList.toggle("editing", next?.kind === "edit");
  if (!next) return;
  const label = $("composing-label");
  if (next.kind === "edit") {
    label.textContent = "Editing your message · Enter to save, Escape to cancel";
  } else {
    const who = el("strong");
    who.textContent = next.name;
    label.replaceChildren("Replying to ", who, `: ${next.excerpt}`);
  }
}

function onListClick(event) {
  const target = event.target.closest("button");
  const li = event.target.closest("li.msg");
  if (!target || !li || !li.dataset.seq || !client) return;
  const room = current;
  const seq = Number(li.dataset.seq);
  const m = roomState(room).messages.get(seq);
  if (!m) return;
  if (target.dataset.emoji) toggleReaction(room, m, target.dataset.emoji);
  else if (target.classList.contains("reply")) {
    setComposing({ kind: "reply", room, seq, name: m.senderName || m.senderId, excerpt: excerpt(m.content) });
    $("input").focus();
  } else if (target.classList.contains("edit")) startEdit(room, m);
  else if (target.classList.contains("delete")) {
    if (!confirm("Delete this message? Everyone will see it as deleted.")) return;
    client
      .delete(room, seq)
      .then(({ message }) => showChanged(room, message))
      .catch((e) => showNotice(`Could not delete: ${e.code}`));
  } else if (target.classList.contains("quote")) showOriginal(Number(target.dataset.target));
}

/** Our reaction `emoji` on `m`: added when we have not reacted with it, removed when we have. */
function toggleReaction(room, m, emoji) {
  const request = m.myReactions.includes(emoji) ? client.unreact(room, m.seq, emoji) : client.react(room, m.seq, emoji);
  request
    .then(({ message }) => showChanged(room, message))
    .catch((e) =>
      showNotice(e.code === "rate_limited" ? `Slow down: try again in ${e.retryAfterMs} ms.` : `Could not react: ${e.code}`),
    );
}

/** Scrolls to the message a quote names, if it is loaded, and makes it flash. */
function showOriginal(seq) {
  const li = $("list").querySelector(`li.msg[data-seq="${seq}"]`);
  if (!li) {
    showNotice("The original is not loaded: load older messages to see it.");
    return;
  }
  li.scrollIntoView({ block: "center", behavior: "smooth" });
  li.classList.remove("flash");
  void li.offsetWidth; // restart the animation
  li.classList.add("flash");
}

/** The start of a message, as a reply's bar shows it. */
function excerpt(text) {
  const chars = Array.from(text);
  return chars.length > 80 ? `${chars.slice(0, 80).join("")}…` : text;
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
      // The server counts the messages (not the changes) after the read position up to lastSeq;
      // the page counts the ones pushed after that.
      st.baseSeq = r.lastSeq;
      st.baseUnread = r.unread;
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

/**
 * The room's unread count: messages past the read position (changes take seqs too, so seqs are
 * not counted), as the server counted them up to `baseSeq` plus those the page has after it; or
 * pushes counted while the read position is unknown.
 */
function renderBadge(room) {
  const st = roomState(room);
  const unread = st.readSeq != null ? unreadCount(st) : st.unseen;
  const b = document.querySelector(`.room[data-room="${CSS.escape(room)}"] .badge`);
  if (!b) return;
  b.textContent = unread > 99 ? "99+" : String(unread);
  b.hidden = unread === 0;
}

function unreadCount(st) {
  const counted = st.baseSeq != null && st.readSeq < st.baseSeq;
  const after = Math.max(st.readSeq, st.baseSeq ?? 0);
  let n = counted ? st.baseUnread : 0;
  for (const seq of st.messages.keys()) if (seq > after) n++;
  return n;
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
  const mine = client && m.senderId === client.userId;
  if (mine) li.classList.add("mine");
  const deleted = m.deletedAt != null;
  if (deleted) li.classList.add("deleted");
  const name = m.senderName || m.senderId;
  const time = el("time");
  time.dateTime = m.createdAt;
  time.textContent = new Date(m.createdAt).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  const after = [time];
  if (m.editedAt && !deleted) {
    const edited = el("span", "edited");
    edited.textContent = "(edited)";
    edited.title = `edited ${new Date(m.editedAt).toLocaleString()}`;
    after.push(edited);
  }
  const b = body(name, after, deleted ? "message deleted" : m.content, m.replyTo);
  if (!deleted) b.append(reactionChips(m));
  li.append(avatar(name, m.senderId, m.senderAvatarUrl), b);
  if (!deleted) li.append(actions(mine));
  return li;
}

function pendingItem(clientMsgId, p) {
  const li = el("li", p.failed ? "msg mine pending failed" : "msg mine pending");
  li.dataset.clientMsgId = clientMsgId;
  const state = el("span", "state");
  state.textContent = p.state;
  const quote = p.replyTo && { seq: p.replyTo.seq, name: p.replyTo.name, excerpt: p.replyTo.excerpt, deleted: false };
  li.append(avatar(userName, client?.userId ?? userName, null), body(userName, [state], p.content, quote));
  return li;
}

function body(name, after, content, replyTo = null) {
  const b = el("div", "body");
  const meta = el("div", "meta");
  const n = el("span", "name");
  n.textContent = name;
  meta.append(n, ...after);
  b.append(meta);
  if (replyTo) b.append(quoteOf(replyTo));
  const c = el("div", "content");
  c.textContent = content;
  b.append(c);
  return b;
}

/** A reply's quote of its original: a button that scrolls to it. */
function quoteOf(q) {
  const quote = el("button", q.deleted ? "quote gone" : "quote");
  quote.type = "button";
  quote.dataset.target = q.seq;
  quote.title = "Show the original";
  const who = el("span", "who");
  who.textContent = q.name || q.senderId;
  const what = el("span", "what");
  what.textContent = q.deleted ? "message deleted" : q.excerpt;
  quote.append(who, what);
  return quote;
}

/** The reaction chips under a message: emoji and count, ours highlighted; a click toggles ours. */
function reactionChips(m) {
  const chips = el("div", "reactions");
  for (const [emoji, count] of Object.entries(m.reactions)) {
    const chip = el("button", m.myReactions.includes(emoji) ? "chip mine" : "chip");
    chip.type = "button";
    chip.dataset.emoji = emoji;
    chip.setAttribute("aria-pressed", String(m.myReactions.includes(emoji)));
    chip.textContent = `${emoji} ${count}`;
    chips.append(chip);
  }
  return chips;
}

/** The bar a hovered message shows: reactions, reply, and for ours edit and delete. */
function actions(mine) {
  const bar = el("div", "actions");
  for (const emoji of REACTIONS) {
    const b = el("button", "react");
    b.type = "button";
    b.dataset.emoji = emoji;
    b.title = `React with ${emoji}`;
    b.textContent = emoji;
    bar.append(b);
  }
  const buttons = [["reply", "Reply"], ...(mine ? [["edit", "Edit"], ["delete", "Delete"]] : [])];
  for (const [what, label] of buttons) {
    const b = el("button", what);
    b.type = "button";
    b.textContent = label;
    bar.append(b);
  }
  return bar;
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
  if (b) b.textContent = m.deletedAt != null ? "message deleted" : m.content;
}

/** The preview again after its message changed: the newest message still shown. */
function refreshPreview(room) {
  const st = roomState(room);
  const newest = [...st.messages.values()].reduce((a, m) => (!a || m.seq > a.seq ? m : a), null);
  st.previewSeq = null;
  if (newest) setPreview(room, newest);
  else {
    const b = document.querySelector(`.room[data-room="${CSS.escape(room)}"] .preview`);
    if (b) b.textContent = "";
  }
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
