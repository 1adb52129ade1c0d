// The SDK as an npm package: what `npm pack` ships, and that the packed files, installed in a
// fresh project, chat against the real gateway from Node (with Node's global WebSocket and with
// one passed in), from a plain page's <script type=module>, bundled by esbuild, and built by a
// fresh Vite project: both bundlers resolve the package by name through its `exports` map.
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { after, before, test } from "node:test";
import { build } from "esbuild";
import { Gateway, launchBrowser } from "./harness.js";

const here = dirname(fileURLToPath(import.meta.url));
const SDK_DIR = resolve(here, "../../sdk");
const NAME = JSON.parse(readFileSync(join(SDK_DIR, "package.json"), "utf8")).name;
/** What the package ships: the module, its types, and what npm always adds. */
const SHIPPED = ["README.md", "chat-gateway.d.ts", "chat-gateway.js", "package.json"];
/** `ws` from this suite's devDependencies, for the Node client that is handed its WebSocket. */
const WS_MODULE = import.meta.resolve("ws");
const run = promisify(execFile);

let gateway;
let browser;
let work; // temp dir: the tarball, the consumer project
let tarball;
let packedFiles; // what npm says it packed
let project; // a fresh project with the tarball installed
let installed; // the package as installed there: the unpacked tarball
let site; // a static server on 127.0.0.1 for the pages

before(async () => {
  work = mkdtempSync(join(tmpdir(), "chat-gateway-sdk-package-"));
  const [packed] = JSON.parse(
    (await run("npm", ["pack", "--json", "--pack-destination", work], { cwd: SDK_DIR, timeout: 60_000 })).stdout,
  );
  tarball = join(work, packed.filename);
  packedFiles = packed.files.map((f) => f.path).sort();

  project = join(work, "consumer");
  mkdirSync(project);
  writeFileSync(join(project, "package.json"), JSON.stringify({ name: "consumer", private: true, type: "module" }));
  // The package has no dependencies: installing its tarball needs no registry.
  await run("npm", ["install", "--offline", "--no-audit", "--no-fund", "--no-package-lock", tarball], {
    cwd: project,
    timeout: 60_000,
  });
  installed = join(project, "node_modules", ...NAME.split("/"));

  gateway = await Gateway.start();
  browser = await launchBrowser();
  site = await startSite();
});

after(async () => {
  await browser?.close();
  await gateway?.dispose();
  await new Promise((res) => (site ? site.server.close(res) : res()));
  if (work) rmSync(work, { recursive: true, force: true });
});

test("npm pack ships exactly the module, its types, README.md and package.json", async () => {
  assert.deepEqual(packedFiles, SHIPPED);
  // The tarball itself, read by tar rather than by npm.
  const { stdout } = await run("tar", ["-tzf", tarball], { timeout: 10_000 });
  assert.deepEqual(stdout.trim().split("\n").sort(), SHIPPED.map((f) => `package/${f}`));

  const manifest = JSON.parse(readFileSync(join(installed, "package.json"), "utf8"));
  assert.equal(manifest.version, "0.1.0");
  assert.equal(manifest.type, "module");
  assert.equal(manifest.sideEffects, false);
  assert.deepEqual(manifest.exports["."], {
    types: "./chat-gateway.d.ts",
    import: "./chat-gateway.js",
    default: "./chat-gateway.js",
  });
  // The module shipped is the one in the repository, and the one the gateway serves at /sdk.
  const shipped = readFileSync(join(installed, "chat-gateway.js"), "utf8");
  assert.equal(shipped, readFileSync(join(SDK_DIR, "chat-gateway.js"), "utf8"));
  const served = await (await fetch(`${gateway.url}/sdk/chat-gateway.js`)).text();
  assert.equal(served, shipped, "the gateway binary embeds this SDK (rebuild it after editing sdk/)");
});

for (const how of ["global", "passed"]) {
  const title =
    how === "global"
      ? "Node: the installed package chats with Node's global WebSocket"
      : "Node: the installed package chats with a WebSocket passed in (ws), where there is no global one";
  test(title, async (t) => {
    const flags = [];
    if (how === "global" && typeof WebSocket !== "function") {
      // Node 20 has the global behind a flag (Node 22 has it by default).
      if (!process.allowedNodeEnvironmentFlags.has("--experimental-websocket")) {
        t.skip(`Node ${process.version} has no global WebSocket`);
        return;
      }
      flags.push("--experimental-websocket");
    }
    const room = `node-${how}`;
    const { token } = await gateway.devToken(`Node ${how}`);
    const { token: bob } = await gateway.devToken("Bob");
    const env = { GATEWAY_WS: `ws://127.0.0.1:${gateway.port}/ws`, TOKEN: token, ROOM: room };
    if (how === "passed") Object.assign(env, { WS_MODULE, NO_GLOBAL: "1" });
    const node = nodeApp(flags, env);
    try {
      const joined = await node.next();
      assert.equal(joined.step, "joined");
      assert.equal(joined.globalWebSocket, how === "global");
      const sent = await node.next();
      assert.deepEqual(sent, { step: "sent", seq: 1, content: "hello from Node", senderName: `Node ${how}` });
      await gateway.restSend(bob, room, "hello, Node");
      const done = await node.next();
      assert.deepEqual(done.received, [
        [1, `Node ${how}`, "hello from Node"],
        [2, "Bob", "hello, Node"],
      ]);
      assert.deepEqual(done.states, ["open", "closed"]);
      if (how === "passed") assert.equal(done.constructed, 1, "one socket, of the class passed in");
      // Closed, nothing keeps the process alive: it ends by itself.
      assert.deepEqual(await node.exit, { code: 0, signal: null });
    } finally {
      node.kill();
    }
  });
}

test("Node: a relative URL, or no WebSocket at all, fails at connect with a TypeError that says why", async () => {
  const node = nodeApp([], { CHECK_ERRORS: "1" });
  try {
    const r = await node.next();
    assert.equal(r.relative.name, "TypeError");
    assert.match(r.relative.message, /"\/ws" is not an absolute URL.*ws:\/\/127\.0\.0\.1:8080\/ws/);
    assert.equal(r.noWebSocket.name, "TypeError");
    assert.match(r.noWebSocket.message, /no WebSocket implementation.*options\.WebSocket/);
    assert.deepEqual(await node.exit, { code: 0, signal: null });
  } finally {
    node.kill();
  }
});

test("a plain page imports the packed module from <script type=module> (an import map names it) and chats", async () => {
  await chatInPage("plain", "/plain.html");
});

test("an app bundled by esbuild, importing the package by name, chats in the browser", async () => {
  const entry = join(project, "app.js");
  writeFileSync(entry, PAGE_APP);
  const result = await build({
    entryPoints: [entry],
    absWorkingDir: project,
    bundle: true,
    format: "esm",
    platform: "browser",
    minify: true,
    write: false,
    logLevel: "silent",
  });
  const bundle = result.outputFiles[0].text;
  assert.doesNotMatch(bundle, new RegExp(NAME), "the package is inside the bundle, not imported from it");
  site.routes.set("/bundle.js", ["text/javascript", bundle]);
  const { requested } = await chatInPage("bundled", "/bundled.html");
  assert.ok(!requested.some((p) => p.startsWith("/pkg/")), `the bundle alone: ${requested}`);
});

test("a fresh Vite project importing the package by name builds, and its page chats", async () => {
  const app = join(work, "vite-app");
  mkdirSync(app);
  writeFileSync(join(app, "package.json"), JSON.stringify({ name: "vite-app", private: true, type: "module" }));
  await run("npm", ["install", "--offline", "--no-audit", "--no-fund", "--no-package-lock", tarball], {
    cwd: app,
    timeout: 60_000,
  });
  writeFileSync(join(app, "main.js"), PAGE_APP);
  writeFileSync(
    join(app, "index.html"),
    `<!doctype html><title>vite</title><ol id="log"></ol><script type="module" src="/main.js"></script>`,
  );
  // Vite from this suite's devDependencies, run on the app's root as `vite build` would.
  const { build: viteBuild } = await import("vite");
  const outDir = join(app, "dist");
  await viteBuild({
    root: app,
    configFile: false,
    logLevel: "silent",
    base: "/vite/",
    // The app awaits at its top level, as apps for current browsers do.
    build: { outDir, emptyOutDir: true, target: "esnext" },
  });
  const html = readFileSync(join(outDir, "index.html"), "utf8");
  const scripts = [...html.matchAll(/src="\/vite\/([^"]+\.js)"/g)].map((m) => m[1]);
  assert.equal(scripts.length, 1, html);
  const bundle = readFileSync(join(outDir, scripts[0]), "utf8");
  assert.doesNotMatch(bundle, new RegExp(NAME), "the package is inside the bundle, not imported from it");
  site.routes.set("/vite/index.html", ["text/html", html]);
  site.routes.set(`/vite/${scripts[0]}`, ["text/javascript", bundle]);
  const { requested } = await chatInPage("vite", "/vite/index.html");
  assert.ok(!requested.some((p) => p.startsWith("/pkg/")), `the bundle alone: ${requested}`);
});

// ---- helpers ---------------------------------------------------------------------------------

/**
 * The app a page runs, as an app would write it: imports the package by name, joins, sends, and
 * lists what the room pushes. The gateway, token, room and text come in the page's query.
 */
const PAGE_APP = `import { connect } from "${NAME}";

const q = new URLSearchParams(location.search);
const log = document.getElementById("log");
const client = connect(q.get("gw"), { token: q.get("token") });
client.on("state", (e) => (document.body.dataset.state = e.state));
await client.join(q.get("room"), (m) => {
  const li = document.createElement("li");
  li.textContent = m.senderName + ": " + m.content;
  log.append(li);
});
await client.send(q.get("room"), q.get("say"));
`;

/** Pages and files the browser tests load, from a server of their own on 127.0.0.1. */
async function startSite() {
  const routes = new Map([
    [
      "/plain.html",
      [
        "text/html",
        `<!doctype html><title>plain</title><ol id="log"></ol>
<script type="importmap">{ "imports": { "${NAME}": "/pkg/chat-gateway.js" } }</script>
<script type="module">${PAGE_APP}</script>`,
      ],
    ],
    ["/bundled.html", ["text/html", `<!doctype html><title>bundled</title><ol id="log"></ol><script type="module" src="/bundle.js"></script>`]],
  ]);
  const server = createServer((req, res) => {
    const path = new URL(req.url, "http://x").pathname;
    let route = routes.get(path);
    if (!route && path.startsWith("/pkg/") && SHIPPED.includes(path.slice(5))) {
      // The unpacked tarball, as installed.
      const type = path.endsWith(".js") ? "text/javascript" : "text/plain";
      route = [type, readFileSync(join(installed, path.slice(5)))];
    }
    if (!route) return res.writeHead(404).end();
    res.writeHead(200, { "content-type": `${route[0]}; charset=utf-8` }).end(route[1]);
  });
  await new Promise((res) => server.listen(0, "127.0.0.1", res));
  return { server, routes, url: `http://127.0.0.1:${server.address().port}` };
}

/**
 * Opens `path` of the site as a user of its own; the page sends a message, then Bob sends one
 * over REST: both are listed, once, in order. Returns the paths the page requested.
 */
async function chatInPage(who, path) {
  const room = `page-${who}`;
  const name = `Page ${who}`;
  const { token } = await gateway.devToken(name);
  const { token: bob } = await gateway.devToken("Bob");
  const context = await browser.newContext();
  context.setDefaultTimeout(10_000);
  try {
    const page = await context.newPage();
    const errors = [];
    const sockets = [];
    const requested = [];
    page.on("pageerror", (e) => errors.push(e));
    page.on("websocket", (ws) => sockets.push(ws.url()));
    page.on("request", (r) => requested.push(new URL(r.url()).pathname));
    const q = new URLSearchParams({ gw: `ws://127.0.0.1:${gateway.port}/ws`, token, room, say: `hello from ${who}` });
    await page.goto(`${site.url}${path}?${q}`);
    await page.locator(`#log li:text-is("${name}: hello from ${who}")`).waitFor();
    await gateway.restSend(bob, room, `hello, ${who} page`);
    await page.locator(`#log li:text-is("Bob: hello, ${who} page")`).waitFor();
    assert.deepEqual(await page.locator("#log li").allTextContents(), [
      `${name}: hello from ${who}`,
      `Bob: hello, ${who} page`,
    ]);
    assert.equal(await page.evaluate(() => document.body.dataset.state), "open");
    assert.deepEqual(sockets, [`ws://127.0.0.1:${gateway.port}/ws`]);
    assert.deepEqual(errors, []);
    return { requested };
  } finally {
    await context.close();
  }
}

/**
 * The Node side of the consumer project: `chat.js` imports the package by name. With
 * CHECK_ERRORS it reports how connect fails without a page and without a WebSocket; otherwise it
 * joins ROOM, sends, waits for its own message and one more, closes, and reports each step as a
 * line of JSON. `next()` reads the next line (10 s at most); `exit` resolves when it ends.
 */
function nodeApp(flags, env) {
  const script = join(project, "chat.js");
  writeFileSync(script, NODE_APP);
  const proc = spawn(process.execPath, [...flags, script], {
    cwd: project,
    env: { PATH: process.env.PATH, ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  proc.stderr.on("data", (d) => (stderr += d));
  const exit = new Promise((res) => proc.once("exit", (code, signal) => res({ code, signal })));
  const lines = createInterface({ input: proc.stdout })[Symbol.asyncIterator]();
  const timer = setTimeout(() => proc.kill("SIGKILL"), 20_000);
  exit.then(() => clearTimeout(timer));
  return {
    exit,
    async next() {
      let timeout;
      const line = await Promise.race([
        lines.next(),
        new Promise((_, rej) => (timeout = setTimeout(() => rej(new Error(`no line from node in 10 s: ${stderr}`)), 10_000))),
      ]).finally(() => clearTimeout(timeout));
      if (line.done) throw new Error(`node ended: ${JSON.stringify(await exit)} ${stderr}`);
      return JSON.parse(line.value);
    },
    kill() {
      clearTimeout(timer);
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
    },
  };
}

const NODE_APP = `import { connect } from "${NAME}";

const say = (o) => console.log(JSON.stringify(o));
const { GATEWAY_WS, TOKEN, ROOM, WS_MODULE, NO_GLOBAL, CHECK_ERRORS } = process.env;
if (NO_GLOBAL || CHECK_ERRORS) delete globalThis.WebSocket; // as on Node before 22

if (CHECK_ERRORS) {
  const error = (f) => {
    try {
      f();
      return null;
    } catch (e) {
      return { name: e.name, message: e.message };
    }
  };
  say({
    relative: error(() => connect("/ws", { token: "t" })),
    noWebSocket: error(() => connect("ws://127.0.0.1:9/ws", { token: "t" })),
  });
} else {
  const options = { token: TOKEN };
  let constructed = 0;
  if (WS_MODULE) {
    const { WebSocket } = await import(WS_MODULE);
    options.WebSocket = class extends WebSocket {
      constructor(url) {
        super(url);
        constructed++;
      }
    };
  }
  const client = connect(GATEWAY_WS, options);
  const states = [];
  client.on("state", (e) => states.push(e.state));
  const received = [];
  let resolveTwo;
  const two = new Promise((res) => (resolveTwo = res));
  await client.join(ROOM, (m) => {
    received.push([m.seq, m.senderName, m.content]);
    if (received.length === 1) say({ step: "sent", seq: m.seq, content: m.content, senderName: m.senderName });
    if (received.length === 2) resolveTwo();
  });
  say({ step: "joined", globalWebSocket: typeof globalThis.WebSocket === "function" });
  await client.send(ROOM, "hello from Node");
  await two;
  client.close();
  say({ step: "done", received, states, constructed });
}
`;
