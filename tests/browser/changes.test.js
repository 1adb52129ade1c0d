// Messages that change (protocol section 15) through the SDK, in real Chromium against the real
// gateway: two users edit, delete, react and reply and see each other's changes live; a user who
// was away receives the changes it missed exactly once, in order; the error codes reach the app.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Gateway, launchBrowser, waitFor } from "./harness.js";

let gateway;
let browser;
const contexts = [];

before(async () => {
  // Many changes in a row: the rate limits have a test of their own below.
  gateway = await Gateway.start({ CHAT_GATEWAY__RATE_LIMIT__ENABLED: "false" });
  browser = await launchBrowser();
});

after(async () => {
  for (const c of contexts) await c.close().catch(() => {});
  await browser?.close();
  await gateway?.dispose();
});

/**
 * A plain page of `gw` (no demo app) where `name` uses the SDK. In the page: `client`, joined to
 * `room` with a handler that keeps what it was handed in `shown` (seq -> message) and logs
 * `delivered` (message seqs) and `changes` (one entry per onChange); `cut(true)` closes the socket
 * and makes the reconnects fail until `cut(false)`; `drop(frame)` may swallow frames from the
 * server ("swallow", or "swallow-and-close" to end the socket too) or hold them back ("hold",
 * until `release()`); `state(messages)` is what the tests compare.
 */
async function openUser(name, room, gw = gateway) {
  const context = await browser.newContext();
  contexts.push(context);
  context.setDefaultTimeout(10_000);
  const page = await context.newPage();
  const sent = [];
  const joins = [];
  page.on("websocket", (ws) => {
    ws.on("framesent", (f) => sent.push(JSON.parse(f.payload)));
    ws.on("framereceived", (f) => {
      const frame = JSON.parse(f.payload);
      if (frame.type === "result" && frame.result?.head != null) joins.push(frame.result);
    });
  });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e));
  await page.goto(`${gw.url}/healthz`);
  await page.evaluate(setUp, { name, room });
  return { context, page, sent, joins, errors };
}

async function setUp({ name, room }) {
  window.sdk = await import("/sdk/chat-gateway.js");
  const token = async () =>
    (await (await fetch("/dev/token", { method: "POST", body: JSON.stringify({ name }) })).json()).token;
  let cutOff = false;
  let socket = null;
  window.drop = null;
  window.heldBack = [];
  window.release = () => {
    for (const deliver of heldBack.splice(0)) deliver();
  };
  class TestSocket extends WebSocket {
    constructor(url) {
      super(cutOff ? url.replace("/ws", "/no-socket-here") : url);
      socket = this;
    }
    set onmessage(fn) {
      super.onmessage =
        fn &&
        ((ev) => {
          const what = window.drop?.(JSON.parse(ev.data));
          if (what === "swallow-and-close") this.close();
          if (what === "hold") heldBack.push(() => fn(ev));
          if (what) return;
          fn(ev);
        });
    }
    get onmessage() {
      return super.onmessage;
    }
  }
  window.cut = (on) => {
    cutOff = on;
    if (on) socket?.close(3000, "cut");
  };
  window.client = sdk.connect("/ws", { token, WebSocket: TestSocket, backoff: { initialMs: 50, maxMs: 300 } });
  window.shown = new Map();
  window.delivered = [];
  window.changes = [];
  window.removed = [];
  window.handler = {
    onMessage: (m) => {
      delivered.push(m.seq);
      shown.set(m.seq, m);
    },
    onChange: ({ room: r, change, message, replies }) => {
      changes.push({
        room: r,
        seq: change.seq,
        kind: change.kind,
        target: change.target,
        by: change.by,
        held: message != null,
        version: message?.version ?? null,
        replies: replies.map((m) => [m.seq, m.replyTo]),
      });
      if (message) shown.set(message.seq, message);
      for (const m of replies) shown.set(m.seq, m);
    },
    onRemoved: (info) => removed.push(info),
  };
  window.state = (messages) =>
    [...messages]
      .sort((a, b) => a.seq - b.seq)
      .map((m) => ({
        seq: m.seq,
        content: m.content,
        edited: m.editedAt != null,
        deleted: m.deletedAt != null,
        version: m.version,
        reactions: m.reactions,
        myReactions: [...m.myReactions].sort(),
        replyTo: m.replyTo,
      }));
  window.shownState = () => state(shown.values());
  window.historyState = async (r) => state((await client.history(r, { limit: 50 })).messages);
  window.failure = (promise) => promise.then(() => null, (e) => ({ code: e.code, retryAfterMs: e.retryAfterMs }));
  await client.join(room, handler);
}

const run = (user, fn, arg) => user.page.evaluate(fn, arg);
/** Waits until the page's handler has been handed the change (or message) with seq `seq`. */
const seen = (user, seq) =>
  waitFor(
    () => user.page.evaluate((seq) => window.changes.some((c) => c.seq === seq) || window.delivered.includes(seq), seq),
    { what: `seq ${seq}` },
  );
const withoutMine = (state) => state.map(({ myReactions, ...rest }) => rest);

/** The gateway's count of resumes replayed from memory and from the store. */
async function resumes() {
  const text = await (await fetch(`${gateway.url}/metrics`)).text();
  const count = (from) => Number(text.match(new RegExp(`^chat_resumes_total\\{from="${from}"\\} (\\d+)`, "m"))?.[1] ?? 0);
  return { memory: count("memory"), store: count("store") };
}

test("two users edit, delete, react and reply, and each sees the other's changes live", async () => {
  const room = "live";
  const alice = await openUser("Alice", room);
  const bob = await openUser("Bob", room);

  const first = await run(alice, (room) => client.send(room, "helo wrold").then((a) => a.seq), room);
  await seen(bob, first);
  const edited = await run(alice, ([room, seq]) => client.edit(room, seq, "hello world"), [room, first]);
  assert.equal(edited.duplicate, false);
  assert.equal(edited.change.kind, "edit");
  assert.equal(edited.message.content, "hello world");
  assert.equal(edited.message.version, edited.change.seq);
  assert.ok(edited.message.editedAt.endsWith("Z"));
  await seen(bob, edited.change.seq);
  assert.equal(await run(bob, (seq) => shown.get(seq).content, first), "hello world", "Bob sees the edit live");

  // Reactions: the counts are everyone's, `myReactions` each user's own.
  const bobThumb = await run(bob, ([room, seq]) => client.react(room, seq, "👍"), [room, first]);
  assert.deepEqual([bobThumb.message.reactions, bobThumb.message.myReactions], [{ "👍": 1 }, ["👍"]]);
  await run(alice, ([room, seq]) => client.react(room, seq, "👍"), [room, first]);
  const tada = await run(alice, ([room, seq]) => client.react(room, seq, "🎉"), [room, first]);
  const unthumb = await run(bob, ([room, seq]) => client.unreact(room, seq, "👍"), [room, first]);
  assert.deepEqual(unthumb.message.myReactions, []);
  await seen(alice, unthumb.change.seq);
  await seen(bob, unthumb.change.seq);
  for (const [user, mine] of [
    [alice, ["🎉", "👍"]],
    [bob, []],
  ]) {
    const m = await run(user, (seq) => shown.get(seq), first);
    assert.deepEqual(m.reactions, { "👍": 1, "🎉": 1 });
    assert.deepEqual([...m.myReactions].sort(), mine);
    assert.equal(m.version, unthumb.change.seq);
  }
  assert.equal(tada.change.count, 1);

  // A reply carries its quote; editing, then deleting the original updates the quote of the
  // loaded reply on both pages.
  const reply = await run(bob, ([room, seq]) => client.send(room, "agreed", { replyTo: seq }), [room, first]);
  assert.deepEqual(reply.message.replyTo, { seq: first, senderId: "alice", name: "Alice", excerpt: "hello world", deleted: false });
  await seen(alice, reply.seq);
  const again = await run(alice, ([room, seq]) => client.edit(room, seq, "hello, world"), [room, first]);
  for (const user of [alice, bob]) {
    await seen(user, again.change.seq);
    const entry = await run(user, (seq) => changes.find((c) => c.seq === seq), again.change.seq);
    assert.deepEqual(entry.replies, [[reply.seq, { seq: first, senderId: "alice", name: "Alice", excerpt: "hello, world", deleted: false }]]);
  }

  // Errors reach the app with their codes, and change nothing.
  const codes = await run(bob, async ([room, seq, mine]) => ({
    notYours: await failure(client.edit(room, seq, "hijack")),
    notYoursToDelete: await failure(client.delete(room, seq)),
    notAnEmoji: await failure(client.react(room, seq, "+1")),
    noSuchMessage: await failure(client.react(room, seq + 1000, "👍")),
    noSuchOriginal: await failure(client.send(room, "re", { replyTo: seq + 1000 })),
    empty: await failure(client.edit(room, mine, "   ")),
  }), [room, first, reply.seq]);
  assert.deepEqual(codes, {
    notYours: { code: "forbidden", retryAfterMs: undefined },
    notYoursToDelete: { code: "forbidden", retryAfterMs: undefined },
    notAnEmoji: { code: "unknown_reaction", retryAfterMs: undefined },
    noSuchMessage: { code: "message_not_found", retryAfterMs: undefined },
    noSuchOriginal: { code: "message_not_found", retryAfterMs: undefined },
    empty: { code: "content_empty", retryAfterMs: undefined },
  });

  const oops = await run(alice, (room) => client.send(room, "oops").then((a) => a.seq), room);
  const gone = await run(alice, ([room, seq]) => client.delete(room, seq), [room, oops]);
  assert.equal(gone.message.content, "");
  assert.ok(gone.message.deletedAt);
  const goneTwice = await run(alice, ([room, seq]) => client.delete(room, seq), [room, oops]);
  assert.deepEqual([goneTwice.duplicate, goneTwice.change], [true, null]);
  const original = await run(alice, ([room, seq]) => client.delete(room, seq), [room, first]);
  const afterDelete = await run(bob, async ([room, seq]) => ({
    edit: await failure(client.edit(room, seq, "x")),
    react: await failure(client.react(room, seq, "👍")),
    reply: await failure(client.send(room, "re", { replyTo: seq })),
  }), [room, first]);
  assert.deepEqual(
    Object.values(afterDelete).map((e) => e.code),
    ["forbidden", "message_deleted", "message_deleted"],
  );

  for (const user of [alice, bob]) {
    await seen(user, original.change.seq);
    const m = await run(user, (seq) => shown.get(seq), first);
    assert.deepEqual([m.content, m.reactions, m.myReactions, m.version], ["", {}, [], original.change.seq]);
    const quote = await run(user, (seq) => shown.get(seq).replyTo, reply.seq);
    assert.deepEqual(quote, { seq: first, senderId: "alice", name: "Alice", excerpt: null, deleted: true });
  }

  // Every change once, in seq order, on both pages; the refused requests spent no seq.
  const head = original.change.seq;
  for (const user of [alice, bob]) {
    const { delivered, changes } = await run(user, () => ({ delivered, changes }));
    const all = [...delivered, ...changes.map((c) => c.seq)].sort((a, b) => a - b);
    assert.deepEqual(all, Array.from({ length: head }, (_, i) => i + 1), "messages and changes: each seq once");
    assert.deepEqual(changes.map((c) => c.seq), [...changes.map((c) => c.seq)].sort((a, b) => a - b), "in order");
    assert.equal(changes.length, 8);
    assert.ok(changes.every((c) => c.held), "each change came with the message it changed");
    // What the pushes built is what history shows.
    assert.deepEqual(await run(user, () => shownState()), await run(user, (room) => historyState(room), room));
    assert.deepEqual(await run(user, () => removed), [], "a refused change does not detach the room");
  }
  assert.deepEqual(withoutMine(await run(alice, () => shownState())), withoutMine(await run(bob, () => shownState())));
  assert.deepEqual([...alice.errors, ...bob.errors], []);
});

test("away and back: the changes missed are received exactly once, in order, from memory and from the store; a reload shows the same", async () => {
  const room = "away";
  const alice = await openUser("Alice", room);
  const bob = await openUser("Bob", room);
  const bobsPhone = await openUser("Bob", room); // the same user on another device

  const send = (content, replyTo) =>
    run(alice, ([room, content, replyTo]) => client.send(room, content, replyTo ? { replyTo } : {}).then((a) => a.seq), [room, content, replyTo]);
  const keep = await send("keep me");
  const doomed = await send("delete me");
  const reply = await send("a reply to keep me", keep);
  await seen(bob, reply);

  // A short absence: fewer changes than the gateway keeps in memory per room (32).
  const resumed = await resumes();
  await run(bob, () => cut(true));
  const away = [];
  const change = async (user, fn, arg) => away.push((await run(user, fn, arg)).change.seq);
  await change(alice, ([room, seq]) => client.edit(room, seq, "keep me, edited"), [room, keep]);
  await change(alice, ([room, seq]) => client.delete(room, seq), [room, doomed]);
  await change(alice, ([room, seq]) => client.react(room, seq, "👍"), [room, keep]);
  await change(bobsPhone, ([room, seq]) => client.react(room, seq, "🎉"), [room, keep]);
  await change(bobsPhone, ([room, seq]) => client.react(room, seq, "👍"), [room, reply]);
  const later = await send("sent while Bob was away");
  await run(bob, () => cut(false));
  await seen(bob, later);
  await bob.page.waitForTimeout(200); // room for a duplicate, if there were one

  let log = await run(bob, () => changes);
  assert.deepEqual(log.map((c) => c.seq), away, "each missed change once, in order");
  assert.deepEqual(bob.joins.at(-1).missed, away.length + 1, "the changes count in `missed`, with the message");
  assert.equal(bob.sent.filter((f) => f.type === "join").at(-1).since, reply, "resumed from the last seq seen");
  assert.deepEqual(log[0].replies, [[reply, { seq: keep, senderId: "alice", name: "Alice", excerpt: "keep me, edited", deleted: false }]]);
  const kept = await run(bob, (seq) => shown.get(seq), keep);
  assert.deepEqual([kept.content, kept.reactions, kept.myReactions], ["keep me, edited", { "👍": 1, "🎉": 1 }, ["🎉"]]);

  // A longer absence: more changes than the memory keeps, replayed from the store.
  await run(bob, () => cut(true));
  const burst = [];
  for (let i = 0; i < 20; i++) {
    for (const fn of [
      ([room, seq]) => client.react(room, seq, "👀"),
      ([room, seq]) => client.unreact(room, seq, "👀"),
    ]) burst.push((await run(alice, fn, [room, keep])).change.seq);
  }
  burst.push((await run(bobsPhone, ([room, seq]) => client.unreact(room, seq, "🎉"), [room, keep])).change.seq);
  burst.push((await run(alice, ([room, seq]) => client.edit(room, seq, "keep me, edited twice"), [room, keep])).change.seq);
  await run(bob, () => cut(false));
  await seen(bob, burst.at(-1));
  await bob.page.waitForTimeout(200);
  log = await run(bob, () => changes);
  assert.deepEqual(log.map((c) => c.seq), [...away, ...burst], "each missed change once, in order");
  assert.equal(bob.joins.at(-1).missed, burst.length);
  assert.ok(burst.length > 32, "more than the gateway keeps in memory");
  const now = await resumes();
  assert.deepEqual({ memory: now.memory - resumed.memory, store: now.store - resumed.store }, { memory: 1, store: 1 });

  const bobState = await run(bob, () => shownState());
  assert.deepEqual(bobState, await run(bob, (room) => historyState(room), room), "what the pushes built is what history shows");
  assert.deepEqual(bobState.find((m) => m.seq === keep), {
    seq: keep,
    content: "keep me, edited twice",
    edited: true,
    deleted: false,
    version: burst.at(-1),
    reactions: { "👍": 1 },
    myReactions: [],
    replyTo: null,
  });
  assert.deepEqual(bobState.find((m) => m.seq === reply).myReactions, ["👍"], "reacted from the other device");
  assert.deepEqual(withoutMine(bobState), withoutMine(await run(alice, () => shownState())));

  // A reload starts afresh from history: the same state, the user's own reactions included.
  await bob.page.reload();
  await bob.page.evaluate(setUp, { name: "Bob", room });
  assert.deepEqual(await run(bob, (room) => historyState(room), room), bobState);
  assert.deepEqual([...alice.errors, ...bob.errors, ...bobsPhone.errors], []);
});

test("a history page answered before a change, but received after its push, is handed out with the change applied", async () => {
  const room = "race";
  const alice = await openUser("Alice", room);
  const original = await run(alice, (room) => client.send(room, "as first written").then((a) => a.seq), room);
  const reply = (await run(alice, ([room, seq]) => client.send(room, "quoting it", { replyTo: seq }), [room, original])).seq;
  const bob = await openUser("Bob", room);
  // Bob's page asks for history; its answer is held back on the way.
  await run(bob, (room) => {
    window.drop = (f) => (f.type === "result" && f.result?.messages ? ((window.drop = null), "hold") : undefined);
    window.page = client.history(room);
  }, room);
  await waitFor(() => run(bob, () => heldBack.length === 1), { what: "the history answer held back" });
  // The edit's push reaches Bob first: he does not hold the message yet.
  const edit = await run(alice, ([room, seq]) => client.edit(room, seq, "as edited"), [room, original]);
  await seen(bob, edit.change.seq);
  assert.deepEqual(
    (await run(bob, () => changes)).map((c) => [c.seq, c.held]),
    [[edit.change.seq, false]],
  );
  const page = await run(bob, async () => (release(), state((await window.page).messages)));
  assert.deepEqual(
    page.map((m) => [m.seq, m.content, m.version, m.replyTo?.excerpt ?? null]),
    [
      [original, "as edited", edit.change.seq, null],
      [reply, "quoting it", reply, "as edited"],
    ],
    "the page as the client knows it now, the quote included",
  );
  // Held from now on: the next change comes with the message.
  const thumb = await run(alice, ([room, seq]) => client.react(room, seq, "👍"), [room, original]);
  await seen(bob, thumb.change.seq);
  const last = (await run(bob, () => changes)).at(-1);
  assert.deepEqual([last.held, last.version], [true, thumb.change.seq]);
});

test("an edit whose result is lost is retried with the same clientChangeId after the reconnect, and stored once", async () => {
  const room = "retry";
  const alice = await openUser("Alice", room);
  const seq = await run(alice, (room) => client.send(room, "draft").then((a) => a.seq), room);
  await seen(alice, seq);
  const r = await run(alice, async ([room, seq]) => {
    // The edit is stored, but its result never arrives: the socket dies with it.
    window.drop = (f) => f.type === "result" && f.result?.change && ((window.drop = null), "swallow-and-close");
    const editing = client.edit(room, seq, "final");
    const result = await editing;
    await new Promise((res) => setTimeout(res, 200));
    return { key: editing.clientChangeId, result, changes };
  }, [room, seq]);
  assert.equal(r.result.duplicate, true, "the retry was answered with the change stored the first time");
  assert.equal(r.result.change.seq, seq + 1);
  assert.equal(r.result.message.content, "final");
  const edits = alice.sent.filter((f) => f.type === "edit");
  assert.equal(edits.length, 2);
  assert.deepEqual(edits.map((f) => f.clientChangeId), [r.key, r.key]);
  assert.deepEqual(r.changes.map((c) => c.seq), [seq + 1], "onChange once");
  // Its push counts for the resume point, like a message's.
  const joins = alice.sent.filter((f) => f.type === "join").length;
  await run(alice, () => (cut(true), cut(false)));
  await waitFor(() => alice.sent.filter((f) => f.type === "join").length > joins, { what: "the join after the reconnect" });
  assert.equal(alice.sent.filter((f) => f.type === "join").at(-1).since, seq + 1);
});

test("reactions past the limit reject with rate_limited and retryAfterMs", async () => {
  const limited = await Gateway.start({ CHAT_GATEWAY__RATE_LIMIT__REACTION_BURST: "3" });
  try {
    const alice = await openUser("Alice", "limits", limited);
    const outcomes = await run(alice, async () => {
      const { seq } = await client.send("limits", "react to me");
      const emoji = ["👍", "🎉", "🔥", "👀", "😂", "❤️"];
      return await Promise.all(emoji.map((e) => failure(client.react("limits", seq, e))));
    });
    const refused = outcomes.filter(Boolean);
    assert.ok(refused.length >= 1, "the burst went over the limit");
    for (const e of refused) {
      assert.equal(e.code, "rate_limited");
      assert.ok(e.retryAfterMs > 0 && e.retryAfterMs <= 1000, `retryAfterMs ${e.retryAfterMs}`);
    }
  } finally {
    await limited.dispose();
  }
});
