// The gateway restarts under an open page: what was sent meanwhile shows up after the
// reconnect, once each, and so does what the user typed while the page was disconnected.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Gateway, launchBrowser, openDemo, shownMessages } from "./harness.js";

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

test("gateway restart: messages sent meanwhile appear after reconnect, once each", async () => {
  const { context, page, talked, errors } = await openDemo(browser, gateway, { name: "Hana" });
  const states = [];
  await page.exposeFunction("__state", (s) => states.push(s));
  await page.evaluate(async () => {
    const { getClient } = await import("/sdk/chat-gateway.js");
    getClient("/ws").on("state", (e) => window.__state(e.state));
  });
  await page.locator('#conn[data-state="open"]').waitFor();
  await page.fill("#input", "before the restart");
  await page.press("#input", "Enter");
  await page.locator("#list .msg:not(.pending) .content", { hasText: "before the restart" }).waitFor();
  const { token: ivan } = await gateway.devToken("Ivan");

  // SIGTERM: the gateway drains and closes the socket with 1012; the page starts reconnecting.
  await gateway.stop();
  await page.locator('#conn[data-state="reconnecting"]').waitFor();
  // Keep the page away from the new process until the other client has written.
  await context.setOffline(true);
  await page.fill("#input", "typed while disconnected");
  await page.press("#input", "Enter");
  await page.locator("#list .msg.pending .content", { hasText: "typed while disconnected" }).waitFor();

  await gateway.spawn(); // same port, same data dir
  for (let i = 1; i <= 3; i++) await gateway.restSend(ivan, "general", `sent during the restart ${i}`, `ivan-${i}`);
  await page.waitForTimeout(300);
  assert.equal(await page.locator("#list .content", { hasText: "sent during the restart" }).count(), 0, "not before the reconnect");

  await context.setOffline(false); // the SDK reconnects at once on "online"
  await page.locator('#conn[data-state="open"]').waitFor();
  await page.locator("#list .msg:not(.pending) .content", { hasText: "typed while disconnected" }).waitFor();
  await page.waitForTimeout(300); // room for a duplicate to show up, if there were one
  assert.deepEqual(await shownMessages(page), [
    "before the restart",
    "sent during the restart 1",
    "sent during the restart 2",
    "sent during the restart 3",
    "typed while disconnected",
  ]);
  assert.deepEqual(
    await page.locator("#list .msg").evaluateAll((els) => els.map((e) => Number(e.dataset.seq))),
    [1, 2, 3, 4, 5],
  );

  // The store agrees: the queued send was stored once.
  const history = await (
    await fetch(`${gateway.url}/api/chat/rooms/general/messages`, { headers: { authorization: `Bearer ${ivan}` } })
  ).json();
  assert.equal(history.messages.filter((m) => m.content === "typed while disconnected").length, 1);
  assert.ok(states.includes("reconnecting") && states.at(-1) === "open", `states: ${states}`);
  // Attempts made while the gateway was down failed; two sockets carried traffic.
  assert.equal(talked.size, 2, "one socket before the restart, one after");
  assert.equal(await gateway.metric("chat_connections_opened_total"), 1, "the new process saw one socket");
  assert.deepEqual(errors, []);
  await context.close();
});
