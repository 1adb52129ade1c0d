// Test harness: a real gateway process (dev mode, own port and data dir) and headless Chromium.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, mkdirSync, readFileSync, rmSync, existsSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "../..");
export const ARTIFACTS = join(here, "artifacts");

/** The gateway binary cargo built: $CHAT_GATEWAY_BIN, else $CARGO_TARGET_DIR or target/, debug. */
export function gatewayBinary() {
  const bin =
    process.env.CHAT_GATEWAY_BIN ??
    join(process.env.CARGO_TARGET_DIR ?? join(repo, "target"), "debug", "chat-gateway");
  if (!existsSync(bin)) throw new Error(`gateway binary not found at ${bin}: run \`cargo build\` first`);
  return bin;
}

/** A port nobody listens on right now. */
export async function freePort() {
  return await new Promise((res, rej) => {
    const srv = createServer();
    srv.once("error", rej);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => res(port));
    });
  });
}

/** Waits for `check()` to return a truthy value, polling, at most `timeoutMs`. */
export async function waitFor(check, { timeoutMs = 5000, intervalMs = 25, what = "condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/**
 * One gateway process in dev mode. `restart()` stops it (SIGTERM: sockets closed with 1012) and
 * starts it again on the same port with the same data dir.
 */
export class Gateway {
  /** @param {Record<string, string>} [env] extra settings, e.g. CHAT_GATEWAY__LIMITS__CATCH_UP_LIMIT */
  static async start(env = {}) {
    const gw = new Gateway(await freePort(), mkdtempSync(join(tmpdir(), "chat-gateway-browser-")), env);
    await gw.spawn();
    return gw;
  }

  constructor(port, dataDir, env = {}) {
    this.port = port;
    this.env = env;
    this.dataDir = dataDir;
    this.url = `http://127.0.0.1:${port}`;
    this.proc = null;
    this.log = [];
  }

  async spawn() {
    const env = { ...process.env };
    for (const k of ["JWT_SECRET", "JWT_PUBLIC_KEY_FILE", "DATABASE_URL", "REDIS_URL", "CHAT_GATEWAY_CONFIG"]) delete env[k];
    Object.assign(env, {
      BIND_ADDR: `127.0.0.1:${this.port}`,
      CHAT_GATEWAY__SERVER__DATA_DIR: this.dataDir,
      CHAT_GATEWAY__SERVER__SHUTDOWN_GRACE_SECS: "3",
      RUST_LOG: process.env.GATEWAY_LOG ?? "warn",
      LOG_FORMAT: "pretty",
      ...this.env,
    });
    const proc = spawn(gatewayBinary(), ["serve"], { env, cwd: repo, stdio: ["ignore", "pipe", "pipe"] });
    this.proc = proc;
    const keep = (chunk) => {
      this.log.push(chunk.toString());
      if (this.log.length > 200) this.log.shift();
    };
    proc.stdout.on("data", keep);
    proc.stderr.on("data", keep);
    const exited = new Promise((res) => proc.once("exit", (code, signal) => res({ code, signal })));
    this.exited = exited;
    await waitFor(
      async () => {
        if (proc.exitCode !== null) throw new Error(`gateway exited early:\n${this.log.join("")}`);
        const r = await fetch(`${this.url}/readyz`);
        return r.ok;
      },
      { timeoutMs: 15_000, what: "gateway /readyz" },
    ).catch((e) => {
      proc.kill("SIGKILL");
      throw e;
    });
  }

  /** SIGTERM, then wait for a clean exit (SIGKILL after 10 s). */
  async stop() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill("SIGTERM");
    const timeout = new Promise((res) => setTimeout(() => res(null), 10_000));
    const exit = await Promise.race([this.exited, timeout]);
    if (!exit) {
      proc.kill("SIGKILL");
      await this.exited;
      throw new Error("gateway did not stop within 10 s of SIGTERM");
    }
    if (exit.code !== 0) throw new Error(`gateway exited with ${JSON.stringify(exit)}:\n${this.log.join("")}`);
  }

  async restart() {
    await this.stop();
    await this.spawn();
  }

  async dispose() {
    try {
      await this.stop();
    } finally {
      rmSync(this.dataDir, { recursive: true, force: true });
    }
  }

  /** A dev token for `name`: {token, userId}. */
  async devToken(name) {
    const r = await fetch(`${this.url}/dev/token`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ name }),
    });
    if (!r.ok) throw new Error(`POST /dev/token: ${r.status}`);
    return await r.json();
  }

  /**
   * A token with any claims (an `avatar`, say, which /dev/token does not set), signed with the
   * dev secret the gateway generated in its data dir.
   */
  signToken(claims) {
    const secret = readFileSync(join(this.dataDir, "dev-jwt-secret"), "utf8").trim();
    const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
    const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ exp: Math.floor(Date.now() / 1000) + 3600, ...claims })}`;
    return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
  }

  /** Sends over REST (the fallback door), as another client would. */
  async restSend(token, room, content, clientMsgId) {
    const r = await fetch(`${this.url}/api/chat/rooms/${encodeURIComponent(room)}/messages`, {
      method: "POST",
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
      body: JSON.stringify({ content, clientMsgId }),
    });
    if (r.status !== 201 && r.status !== 200) throw new Error(`REST send: ${r.status} ${await r.text()}`);
    return (await r.json()).message;
  }

  /** The value of a counter (or gauge) in /metrics, summed over its label sets. */
  async metric(name) {
    const text = await (await fetch(`${this.url}/metrics`)).text();
    let sum = 0;
    let found = false;
    for (const line of text.split("\n")) {
      const m = line.match(/^([a-zA-Z_:][\w:]*)(\{[^}]*\})? ([0-9.eE+-]+)/);
      if (m && m[1] === name) {
        sum += Number(m[3]);
        found = true;
      }
    }
    if (!found) throw new Error(`metric ${name} not in /metrics`);
    return sum;
  }
}

/** Debian's Chromium, headless, never a downloaded browser. */
export async function launchBrowser() {
  return await chromium.launch({
    executablePath: process.env.CHROMIUM_PATH ?? "/usr/bin/chromium",
    headless: true,
    timeout: 30_000,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--no-first-run",
      "--disable-sync",
      "--disable-quic",
    ],
  });
}

/**
 * A page with the demo open as `name`, counting the WebSockets the browser itself opens.
 * Every wait in the tests is bounded: actions and expectations time out after 10 s.
 */
export async function openDemo(browser, gateway, { name, room, viewport = { width: 1100, height: 700 } } = {}) {
  const context = await browser.newContext({ viewport });
  context.setDefaultTimeout(10_000);
  const page = await context.newPage();
  // Every WebSocket the page opened (attempts included), and those the server talked on.
  const sockets = [];
  const talked = new Set();
  page.on("websocket", (ws) => {
    sockets.push(ws.url());
    ws.on("framereceived", () => talked.add(ws));
  });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e));
  const url = new URL(gateway.url);
  if (name) url.searchParams.set("name", name);
  if (room) url.searchParams.set("room", room);
  await page.goto(url.toString());
  return { context, page, sockets, talked, errors };
}

/**
 * Waits until the demo page's client has joined every room of its list (its deferred work, about
 * a second after start-up) and the joins are answered.
 */
export async function allRoomsJoined(page, { timeoutMs = 10_000 } = {}) {
  // Polled from here: page.waitForFunction would take the async predicate's promise for "true".
  await waitFor(
    () =>
      page.evaluate(async () => {
        const { getClient } = await import("/sdk/chat-gateway.js");
        return getClient("/ws").joinedRooms().length === document.querySelectorAll(".room").length;
      }),
    { timeoutMs, what: "every room of the list joined" },
  );
  await page.evaluate(async () => {
    const { getClient } = await import("/sdk/chat-gateway.js");
    const client = getClient("/ws");
    await Promise.all(client.joinedRooms().map((room) => client.join(room)));
  });
}

/** The texts of the messages shown in the page (pending ones included). */
export async function shownMessages(page) {
  return await page.locator("#list .msg .content").allTextContents();
}

export function artifactPath(file) {
  mkdirSync(ARTIFACTS, { recursive: true });
  return join(ARTIFACTS, file);
}
