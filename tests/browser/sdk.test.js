// The SDK's guarantees, exercised in the browser against the real gateway: init-once and
// request locks, rate-limit errors, a send retried across a reconnect, token refresh and
// refused tokens, request timeouts.
import assert from "node:assert/strict";
import { after, before, beforeEach, afterEach, test } from "node:test";
import { Gateway, launchBrowser, waitFor } from "./harness.js";

let gateway;
let browser;
let context;
let page;
let sockets;
let sent;

before(async () => {
  gateway = await Gateway.start();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await gateway?.dispose();
});

beforeEach(async () => {
  context = await browser.newContext();
  context.setDefaultTimeout(10_000);
  page = await context.newPage();
  sockets = [];
  sent = [];
  page.on("websocket", (ws) => {
    sockets.push(ws.url());
    ws.on("framesent", (f) => sent.push(JSON.parse(f.payload)));
  });
  // A plain same-origin page: the SDK alone, no demo app.
  await page.goto(`${gateway.url}/healthz`);
  await page.evaluate(async () => {
    window.sdk = await import("/sdk/chat-gateway.js");
    window.devToken = async (name, extra = {}) => {
      const r = await fetch("/dev/token", { method: "POST", body: JSON.stringify({ name, ...extra }) });
      return (await r.json()).token;
    };
    // A WebSocket that can lose chosen frames from the server, as a flaky network would.
    window.drop = null; // (frame, socket) => "swallow" | "swallow-and-close" | undefined
    window.LossyWebSocket = class extends WebSocket {
      set onmessage(fn) {
        super.onmessage =
          fn &&
          ((ev) => {
            const what = window.drop?.(JSON.parse(ev.data));
            if (what === "swallow-and-close") this.close();
            if (what) return;
            fn(ev);
          });
      }
      get onmessage() {
        return super.onmessage;
      }
    };
  });
});

afterEach(async () => {
  await context.close();
});

test("init once: every connect/getClient for the URL is the same client; joins and identical history requests share one frame", async () => {
  const r = await page.evaluate(async () => {
    let calls = 0;
    const token = async () => (calls++, await devToken("Jack"));
    const a = sdk.connect("/ws", { token });
    const b = sdk.getClient("/ws");
    const c = sdk.connect(`ws://${location.host}/ws`, { token });
    await Promise.all([a.ready(), b.ready()]);
    const j1 = a.join("lobby", () => {});
    const j2 = b.join("lobby", () => {});
    await j1;
    await a.send("lobby", "one message");
    const h1 = a.history("lobby", { limit: 5 });
    const h2 = c.history("lobby", { limit: 5 });
    const [p1, p2] = await Promise.all([h1, h2]);
    return { same: a === b && b === c, joinShared: j1 === j2, historyShared: h1 === h2, page: p1.messages.length, equal: p1 === p2, calls, state: a.state };
  });
  assert.deepEqual(r, { same: true, joinShared: true, historyShared: true, page: 1, equal: true, calls: 1, state: "open" });
  const count = (type) => sent.filter((f) => f.type === type).length;
  assert.equal(sockets.length, 1);
  assert.deepEqual([count("auth"), count("join"), count("history")], [1, 1, 1]);
});

test("rate limit: refused sends carry retryAfterMs; retried with the same clientMsgId, each is stored once", async () => {
  const r = await page.evaluate(async () => {
    const client = sdk.connect("/ws", { token: () => devToken("Kim") });
    const seen = [];
    await client.join("fast", (m) => seen.push(m.content));
    const sends = Array.from({ length: 8 }, (_, i) => client.send("fast", `burst ${i}`));
    const outcomes = await Promise.allSettled(sends);
    const limited = outcomes.filter((o) => o.status === "rejected");
    const errors = limited.map((o) => ({ code: o.reason.code, retryAfterMs: o.reason.retryAfterMs }));
    // The app's retry: wait as told, same clientMsgId (retrying until it fits the limit).
    for (const [i, o] of outcomes.entries()) {
      if (o.status === "fulfilled") continue;
      let wait = o.reason.retryAfterMs;
      for (;;) {
        await new Promise((res) => setTimeout(res, wait));
        try {
          await client.send("fast", `burst ${i}`, { clientMsgId: sends[i].clientMsgId });
          break;
        } catch (e) {
          if (e.code !== "rate_limited") throw e;
          wait = e.retryAfterMs;
        }
      }
    }
    const page = await client.history("fast", { limit: 50 });
    await new Promise((res) => setTimeout(res, 200));
    return { errors, stored: page.messages.map((m) => m.content).sort(), seen: seen.sort() };
  });
  assert.ok(r.errors.length >= 1, "the burst went over the limit");
  for (const e of r.errors) {
    assert.equal(e.code, "rate_limited");
    assert.ok(e.retryAfterMs > 0 && e.retryAfterMs <= 1000, `retryAfterMs ${e.retryAfterMs}`);
  }
  const all = Array.from({ length: 8 }, (_, i) => `burst ${i}`).sort();
  assert.deepEqual(r.stored, all);
  assert.deepEqual(r.seen, all, "the room handler saw each message once");
});

test("a send whose ack is lost is retried after the reconnect and stored once", async () => {
  const r = await page.evaluate(async () => {
    const client = sdk.connect("/ws?lossy", { token: () => devToken("Lena"), WebSocket: LossyWebSocket });
    const seen = [];
    const states = [];
    client.on("state", (e) => states.push(e.state));
    await client.join("acks", (m) => seen.push(m.seq));
    // The server stores the message, but its ack never reaches the client: the socket dies.
    window.drop = (f) => (f.type === "result" && f.result?.message && ((window.drop = null), "swallow-and-close"));
    const ack = await client.send("acks", "exactly once");
    await new Promise((res) => setTimeout(res, 300));
    const page = await client.history("acks");
    return { duplicate: ack.duplicate, seq: ack.seq, seen, stored: page.messages.length, states };
  });
  assert.equal(r.duplicate, true, "the retry was answered with the original message");
  assert.equal(r.seq, 1);
  assert.equal(r.stored, 1);
  assert.deepEqual(r.seen, [1], "the handler saw it once");
  assert.deepEqual(r.states, ["open", "reconnecting", "open"]);
  assert.equal(sockets.length, 2);
  const sends = sent.filter((f) => f.type === "send");
  assert.equal(sends.length, 2);
  assert.equal(sends[0].clientMsgId, sends[1].clientMsgId);
  assert.equal(sent.filter((f) => f.type === "join").at(-1).since, 1, "resumed from the last seen seq");
});

test("send keys begin with their time (protocol section 6): later sends sort after earlier ones", async () => {
  const r = await page.evaluate(async () => {
    const client = sdk.connect("/ws", { token: () => devToken("Kai") });
    await client.join("keys", () => {});
    const before = Date.now();
    const keys = [];
    for (let i = 0; i < 3; i++) {
      const sending = client.send("keys", `key ${i}`);
      keys.push(sending.clientMsgId);
      await sending;
      await new Promise((res) => setTimeout(res, 5));
    }
    return { before, after: Date.now(), keys };
  });
  for (const key of r.keys) {
    const m = /^c-([0-9a-f]{12})-[0-9a-f-]{36}$/.exec(key);
    assert.ok(m, `the key ${key} is c-<ms as 12 hex digits>-<uuid>`);
    const at = parseInt(m[1], 16);
    assert.ok(at >= r.before && at <= r.after, `the key's time ${at} is when it was sent`);
  }
  assert.deepEqual([...r.keys].sort(), r.keys, "keys made later sort later");
  const sends = sent.filter((f) => f.type === "send").map((f) => f.clientMsgId);
  assert.deepEqual(sends, r.keys, "the keys on the wire");
});

test("session_expiring: the token is refreshed on the same socket", async () => {
  const reasons = await page.evaluate(async () => {
    const reasons = [];
    // 61 s tokens: the server warns 60 s before expiry, so about a second after auth.
    const client = sdk.connect("/ws", { token: ({ reason }) => (reasons.push(reason), devToken("Max", { ttlSecs: 61 })) });
    await client.ready();
    const deadline = Date.now() + 5000;
    while (!reasons.includes("expiring") && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    await new Promise((r) => setTimeout(r, 300));
    return { reasons, state: client.state };
  });
  assert.equal(reasons.reasons[0], "initial");
  assert.ok(reasons.reasons.includes("expiring"), `reasons: ${reasons.reasons}`);
  assert.equal(reasons.state, "open");
  await waitFor(() => sent.filter((f) => f.type === "auth").length >= 2, { timeoutMs: 3000, what: "refresh auth frame" });
  assert.equal(sockets.length, 1, "refreshed on the same socket");
});

test("a refused token (4002) is never sent again: a fresh one is asked for; a fixed bad token ends closed", async () => {
  const r = await page.evaluate(async () => {
    const reasons = [];
    const good = await devToken("Nora");
    const provider = ({ reason }) => (reasons.push(reason), reasons.length === 1 ? "not-a-jwt" : good);
    const client = sdk.connect("/ws", { token: provider, backoff: { initialMs: 50 } });
    const codes = [];
    client.on("state", (e) => e.code && codes.push(e.code));
    await client.ready();

    const fixed = sdk.connect("/ws?fixed", { token: "not-a-jwt-either", backoff: { initialMs: 50 } });
    const errors = [];
    fixed.on("error", (e) => errors.push(e.code));
    const deadline = Date.now() + 5000;
    while (fixed.state !== "closed" && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    return { reasons, codes, state: client.state, fixedState: fixed.state, errors };
  });
  assert.deepEqual(r.reasons, ["initial", "rejected"]);
  assert.deepEqual(r.codes, [4002]);
  assert.equal(r.state, "open");
  assert.equal(r.fixedState, "closed");
  assert.deepEqual(r.errors, ["invalid_token", "auth_failed"]);
  const tokens = sent.filter((f) => f.type === "auth").map((f) => f.token);
  assert.equal(tokens.filter((t) => t === "not-a-jwt-either").length, 1, "the refused fixed token was sent once");
});

test("a request with no answer times out; the client stays usable", async () => {
  const r = await page.evaluate(async () => {
    const client = sdk.connect("/ws?slow", { token: () => devToken("Omar"), WebSocket: LossyWebSocket, requestTimeoutMs: 400 });
    await client.ready();
    window.drop = (f) => (f.type === "result" && f.result?.messages && ((window.drop = null), "swallow"));
    const started = performance.now();
    const error = await client.history("quiet").then(() => null, (e) => e.code);
    const took = performance.now() - started;
    const again = await client.history("quiet");
    return { error, took, again: again.messages.length, state: client.state };
  });
  assert.equal(r.error, "timeout");
  assert.ok(r.took >= 350 && r.took < 2000, `timed out after ${r.took} ms`);
  assert.deepEqual([r.again, r.state], [0, "open"]);
});

test("too much missed while away: the handler is told to reload, then live messages continue", async () => {
  const small = await Gateway.start({
    CHAT_GATEWAY__LIMITS__CATCH_UP_LIMIT: "2",
    CHAT_GATEWAY__RATE_LIMIT__ENABLED: "false",
  });
  try {
    const { token: pat } = await small.devToken("Pat");
    await page.goto(`${small.url}/healthz`);
    await page.evaluate(async () => {
      window.sdk = await import("/sdk/chat-gateway.js");
      const token = await (await fetch("/dev/token", { method: "POST", body: '{"name":"Quinn"}' })).json();
      window.client = sdk.connect("/ws", { token: () => token.token });
      window.events = [];
      window.handler = {
        onMessage: (m) => events.push(`message ${m.seq}`),
        onReload: ({ head }) => events.push(`reload at ${head}`),
      };
      await client.join("busy", handler);
      await client.send("busy", "first");
    });
    await waitFor(() => page.evaluate(() => events.length === 1), { what: "the first message" });
    await page.evaluate(() => client.leave("busy"));
    for (let i = 0; i < 5; i++) await small.restSend(pat, "busy", `while away ${i}`, `pat-${i}`);
    const result = await page.evaluate(() => client.join("busy", handler));
    assert.deepEqual(result, { room: "busy", head: 6, missed: 0, reload: true, senders: {} });
    await small.restSend(pat, "busy", "after the reload", "pat-live");
    await waitFor(() => page.evaluate(() => events.length === 3), { what: "the live message" });
    assert.deepEqual(await page.evaluate(() => events), ["message 1", "reload at 6", "message 7"]);
    assert.equal(sent.filter((f) => f.type === "join").at(-1).since, 1, "asked to resume from seq 1");
  } finally {
    await small.dispose();
  }
});

test("messages reach the app in one shape: lean pushes get their sender's profile from what the room told the client", async () => {
  // Bob has an avatar, and speaks over REST.
  const bob = { id: "bob", name: "Bob", avatarUrl: "https://cdn.example.com/bob.png" };
  const bobToken = gateway.signToken({ sub: bob.id, name: bob.name, avatar: bob.avatarUrl });
  const listen = async (p, name) =>
    await p.evaluate(async (name) => {
      const client = sdk.connect("/ws", { token: () => devToken(name) });
      window.got = [];
      return await client.join("shape", (m) => window.got.push(m));
    }, name);
  const received = (p, n) =>
    waitFor(() => p.evaluate((n) => (window.got.length >= n ? window.got : null), n), { what: `${n} messages` });

  await listen(page, "Alice");
  // His first message in the room carries his profile on the wire; Carol, who joins after it,
  // is told it in her join result, and his next push to both of them leaves it out.
  await gateway.restSend(bobToken, "shape", "first");
  await received(page, 1);
  const carol = await context.newPage();
  await carol.goto(`${gateway.url}/healthz`);
  await carol.evaluate(async () => {
    window.sdk = await import("/sdk/chat-gateway.js");
    window.devToken = async (name) =>
      (await (await fetch("/dev/token", { method: "POST", body: JSON.stringify({ name }) })).json()).token;
  });
  const joined = await listen(carol, "Carol");
  assert.deepEqual(joined.senders.bob, { senderName: bob.name, senderAvatarUrl: bob.avatarUrl });
  await gateway.restSend(bobToken, "shape", "second");
  for (const [p, expected] of [
    [page, [[1, "first"], [2, "second"]]],
    [carol, [[2, "second"]]],
  ]) {
    const got = await received(p, expected.length);
    assert.deepEqual(
      got.map((m) => [m.seq, m.content]),
      expected,
    );
    for (const m of got) {
      assert.equal(m.senderName, bob.name);
      assert.equal(m.senderAvatarUrl, bob.avatarUrl);
      assert.deepEqual(m.sender, bob);
      assert.equal(m.roomId, "shape");
      assert.equal(m.id, null, "a push is identified by its room and seq");
      assert.match(m.createdAt, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/);
      assert.equal(m.contentType, "TEXT");
    }
  }
  // History carries ids, in the same shape.
  const history = await carol.evaluate(async () => sdk.getClient("/ws").history("shape"));
  assert.deepEqual(
    history.messages.map((m) => [m.seq, typeof m.id, m.senderName]),
    [
      [1, "string", "Bob"],
      [2, "string", "Bob"],
    ],
  );
});
