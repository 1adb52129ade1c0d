// Switching rooms happens on the one socket: never a second WebSocket.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Gateway, launchBrowser, openDemo, shownMessages, waitFor } from "./harness.js";

let gateway;
let browser;

before(async () => {
  gateway = await Gateway.start();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await gateway?.dispose();
});

test("switching among three rooms several times opens exactly one WebSocket", async () => {
  const { context, page, sockets, errors } = await openDemo(browser, gateway, { name: "Erin" });
  // Frames the page sends, as the browser saw them.
  const sent = [];
  page.on("websocket", (ws) => ws.on("framesent", (f) => sent.push(JSON.parse(f.payload))));
  await page.locator('#conn[data-state="open"]').waitFor();
  const { token: frank } = await gateway.devToken("Frank");

  const rooms = ["general", "random", "help"];
  for (let round = 1; round <= 3; round++) {
    for (const room of rooms) {
      await page.click(`.room[data-room="${room}"]`);
      await page.locator(`#room-title:text-is("# ${room}")`).waitFor();
      const text = `round ${round} in ${room}`;
      await page.fill("#input", text);
      await page.press("#input", "Enter");
      await page.locator(`#list .msg:not(.pending) .content:text-is("${text}")`).waitFor();
    }
    // While the page is elsewhere, someone else writes in "random": seen on return, once.
    await gateway.restSend(frank, "random", `Frank was here (${round})`);
  }
  await page.click('.room[data-room="random"]');
  await page.locator('#list .content:text-is("Frank was here (3)")').waitFor();
  const random = await shownMessages(page);
  assert.deepEqual(random, [
    "round 1 in random",
    "Frank was here (1)",
    "round 2 in random",
    "Frank was here (2)",
    "round 3 in random",
    "Frank was here (3)",
  ]);

  // The browser's own network events: one socket, ever.
  assert.deepEqual(sockets, [`ws://127.0.0.1:${gateway.port}/ws`]);
  // And the server's count of accepted sockets agrees.
  assert.equal(await gateway.metric("chat_connections_opened_total"), 1);
  // Rooms stay joined on that socket (their unread badges count live): each joined once, no
  // join/leave churn however often the view switches.
  assert.equal(sent.filter((f) => f.type === "auth").length, 1);
  assert.deepEqual(sent.filter((f) => f.type === "join").map((f) => f.room).sort(), ["general", "help", "random"]);
  assert.equal(sent.filter((f) => f.type === "leave").length, 0);
  assert.deepEqual(errors, []);
  await context.close();
});

test("non-essential calls wait about a second; the current room's history does not", async () => {
  const { context, page } = await openDemo(browser, gateway, { name: "Gina" });
  // Watch a fresh load from its first frame.
  const frames = [];
  page.on("websocket", (ws) => ws.on("framesent", (f) => frames.push({ at: Date.now(), ...JSON.parse(f.payload) })));
  const navigated = Date.now();
  await page.reload();
  await waitFor(() => frames.some((f) => f.type === "ping"), { timeoutMs: 5000, what: "the deferred ping" });
  const first = (type) => frames.find((f) => f.type === type).at - navigated;
  // The room's history goes out as soon as the socket is up; the ping waits its second.
  const history = frames.find((f) => f.type === "history" && f.limit === 30);
  assert.ok(history.at - navigated < first("ping"), `history at ${history.at - navigated} ms, ping at ${first("ping")} ms`);
  assert.ok(first("ping") >= 900, `ping deferred (${first("ping")} ms)`);
  await context.close();
});
