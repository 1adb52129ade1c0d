// A browser app on its own origin: a page served by a server of its own (http://localhost:<port>,
// another origin than the gateway's http://127.0.0.1:<port>) loads the SDK from that server, opens
// the socket with it and calls the REST fallback (send, history) against the gateway. Allowed by
// server.allowed_origins (given in the environment, as operators do), it all works; not allowed,
// the upgrade is refused (HTTP 403, never authenticated) and the browser blocks the REST calls.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { after, before, beforeEach, afterEach, test } from "node:test";
import { Gateway, launchBrowser } from "./harness.js";

const SDK = readFileSync(new URL("../../sdk/chat-gateway.js", import.meta.url));

let app; // the app's own server
let browser;
let gateway;
let context;
let page;
let sockets;
let errors;

/** The app's server: an empty page and the SDK, as an app bundles it. */
async function startAppServer() {
  const server = createServer((req, res) => {
    if (req.url === "/sdk/chat-gateway.js") {
      res.writeHead(200, { "content-type": "text/javascript; charset=utf-8" }).end(SDK);
    } else if (req.url === "/") {
      res.writeHead(200, { "content-type": "text/html; charset=utf-8" }).end("<!doctype html><title>app</title>");
    } else {
      res.writeHead(404).end();
    }
  });
  await new Promise((res) => server.listen(0, "127.0.0.1", res));
  return { server, origin: `http://localhost:${server.address().port}` };
}

/** One sample of /metrics, labels included, e.g. `chat_upgrades_refused_total{reason="origin"}`. */
async function metric(key) {
  const text = await (await fetch(`${gateway.url}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${key} `));
  assert.ok(line, `${key} in /metrics`);
  return Number(line.slice(key.length + 1));
}

before(async () => {
  app = await startAppServer();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await new Promise((res) => app?.server.close(res));
});

beforeEach(async () => {
  context = await browser.newContext();
  context.setDefaultTimeout(10_000);
  page = await context.newPage();
  sockets = [];
  page.on("websocket", (ws) => sockets.push(ws.url()));
  errors = [];
  page.on("pageerror", (e) => errors.push(e));
  await page.goto(`${app.origin}/`);
  await page.evaluate(async () => {
    window.sdk = await import("/sdk/chat-gateway.js");
  });
});

afterEach(async () => {
  await context?.close();
  await gateway?.dispose();
  gateway = null;
});

/** The app's chat: socket and REST fallback against the gateway at `gw`, as the page does it. */
async function chatFromThePage(token) {
  return await page.evaluate(
    async ({ gw, token }) => {
      const rest = (path, init = {}) =>
        fetch(`${gw}${path}`, {
          ...init,
          headers: { authorization: `Bearer ${token}`, "content-type": "application/json", ...init.headers },
        });
      const client = sdk.connect(`${gw.replace("http", "ws")}/ws`, { token });
      const seen = [];
      const arrived = new Promise((res) =>
        client.join("general", (m) => {
          seen.push(m.content);
          if (seen.length === 2) res(seen.slice());
        }),
      );
      await client.ready();
      await client.send("general", "over the socket");
      const sent = await rest("/api/chat/rooms/general/messages", {
        method: "POST",
        body: JSON.stringify({ content: "over REST", clientMsgId: "rest-1" }),
      });
      const pushed = await arrived; // the REST send reached the socket too
      const history = await (await rest("/api/chat/rooms/general/messages?limit=10")).json();
      // Over the limit (burst 5 per user, both doors): the page reads the 429's Retry-After.
      let limited = null;
      for (let i = 0; i < 10 && !limited; i++) {
        const r = await rest("/api/chat/rooms/general/messages", {
          method: "POST",
          body: JSON.stringify({ content: `burst ${i}` }),
        });
        if (r.status === 429) limited = { retryAfter: r.headers.get("retry-after"), code: (await r.json()).error.code };
      }
      client.close();
      return {
        state: client.state,
        sentStatus: sent.status,
        pushed,
        history: history.messages.map((m) => m.content),
        limited,
      };
    },
    { gw: gateway.url, token },
  );
}

for (const [how, env] of [
  ["listed in server.allowed_origins", (origin) => ({ CHAT_GATEWAY__SERVER__ALLOWED_ORIGINS: `https://app.example.com,${origin}` })],
  ["allowed by dev mode's default (any port of localhost)", () => ({})],
]) {
  test(`a page from another origin, ${how}, chats over the socket and the REST fallback`, async () => {
    gateway = await Gateway.start(env(app.origin));
    assert.notEqual(new URL(gateway.url).origin, app.origin, "the page is not the gateway's");
    const { token } = await gateway.devToken("Ana");
    const r = await chatFromThePage(token);
    assert.equal(r.state, "closed");
    assert.equal(r.sentStatus, 201);
    assert.deepEqual(r.pushed, ["over the socket", "over REST"]);
    assert.deepEqual(r.history, ["over the socket", "over REST"]);
    assert.equal(r.limited?.code, "rate_limited");
    assert.ok(Number(r.limited.retryAfter) >= 1, `Retry-After readable: ${r.limited.retryAfter}`);
    assert.equal(sockets.length, 1);
    assert.equal(await metric('chat_upgrades_refused_total{reason="origin"}'), 0);

    // In dev mode an app under development can also mint its tokens and load the SDK here.
    const dev = await page.evaluate(async (gw) => {
      const minted = await (await fetch(`${gw}/dev/token`, { method: "POST", headers: { "content-type": "application/json" }, body: "{}" })).json();
      const served = await import(`${gw}/sdk/chat-gateway.js`);
      return { token: typeof minted.token, connect: typeof served.connect };
    }, gateway.url);
    assert.deepEqual(dev, { token: "string", connect: "function" });
    assert.deepEqual(errors, []);
  });
}

test("a page from an origin not allowed: the socket is refused before authentication and the browser blocks REST", async () => {
  gateway = await Gateway.start({ CHAT_GATEWAY__SERVER__ALLOWED_ORIGINS: "https://app.example.com" });
  const { token } = await gateway.devToken("Eve");
  const r = await page.evaluate(
    async ({ gw, token }) => {
      const outcome = async (request) => {
        try {
          return `answered ${(await request).status}`;
        } catch (e) {
          return e.name; // the browser's CORS refusal: a TypeError, nothing readable
        }
      };
      const client = sdk.connect(`${gw.replace("http", "ws")}/ws`, { token });
      let opened = false;
      client.ready().then(() => (opened = true), () => {});
      // The refused upgrade reaches the page as a socket closed without a handshake (1006).
      const dropped = await new Promise((res) => {
        const timer = setTimeout(() => res(null), 5000);
        client.on("state", (e) => {
          if (e.state === "reconnecting") {
            clearTimeout(timer);
            res({ code: e.code });
          }
        });
      });
      client.close();
      const headers = { authorization: `Bearer ${token}`, "content-type": "application/json" };
      const send = await outcome(
        fetch(`${gw}/api/chat/rooms/general/messages`, {
          method: "POST",
          headers,
          body: JSON.stringify({ content: "from elsewhere" }),
        }),
      );
      const history = await outcome(fetch(`${gw}/api/chat/rooms/general/messages`, { headers }));
      return { dropped, opened, send, history };
    },
    { gw: gateway.url, token },
  );
  assert.deepEqual(r, { dropped: { code: 1006 }, opened: false, send: "TypeError", history: "TypeError" });
  assert.ok(sockets.length >= 1, "the page tried the socket");
  assert.ok((await metric('chat_upgrades_refused_total{reason="origin"}')) >= 1);
  assert.equal(await metric("chat_connections_opened_total"), 0, "no socket reached authentication");
  // The preflight failed, so the send never left the browser: nothing was stored.
  const stored = await fetch(`${gateway.url}/api/chat/rooms/general/messages`, {
    headers: { authorization: `Bearer ${token}` },
  });
  assert.deepEqual((await stored.json()).messages, []);
  assert.deepEqual(errors, []);
});
