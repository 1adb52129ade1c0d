// The demo page's room list: each room's preview is its newest message, whatever order messages
// arrive in.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { allRoomsJoined, Gateway, launchBrowser, openDemo } from "./harness.js";

let gateway;
let browser;

before(async () => {
  // Rooms with more than a page of history, written in one go.
  gateway = await Gateway.start({ CHAT_GATEWAY__RATE_LIMIT__ENABLED: "false" });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await gateway?.dispose();
});

const preview = (page, room) => page.locator(`.room[data-room="${room}"] .preview`);

test("the preview stays on the newest message when older ones load (Load older messages)", async () => {
  const { token: frank } = await gateway.devToken("Frank");
  for (let i = 1; i <= 35; i++) await gateway.restSend(frank, "help", `help ${i}`);
  const { context, page, errors } = await openDemo(browser, gateway, { name: "Jo", room: "help" });
  await page.locator('#list .content:text-is("help 35")').waitFor();
  await page.locator("#older").waitFor();
  assert.equal(await preview(page, "help").textContent(), "help 35");

  await page.click("#older");
  await page.locator('#list .content:text-is("help 1")').waitFor();
  assert.equal(await page.locator("#list .msg").count(), 35);
  assert.equal(await preview(page, "help").textContent(), "help 35");
  assert.deepEqual(errors, []);
  await context.close();
});

test("the preview stays on the newest message when a room's history loads after a live one", async () => {
  const { token: frank } = await gateway.devToken("Frank");
  for (let i = 1; i <= 3; i++) await gateway.restSend(frank, "random", `random ${i}`);
  const { context, page, errors } = await openDemo(browser, gateway, { name: "Kai", room: "general" });
  await page.locator('#conn[data-state="open"]').waitFor();
  await allRoomsJoined(page);
  // Pushed while #random is not open: the page has this one message of the room...
  await gateway.restSend(frank, "random", "random 4");
  await page.locator('.room[data-room="random"] .preview:text-is("random 4")').waitFor();
  // ...and opening it loads the page of history that ends with it.
  await page.click('.room[data-room="random"]');
  await page.locator('#list .content:text-is("random 1")').waitFor();
  assert.deepEqual(await page.locator("#list .content").allTextContents(), ["random 1", "random 2", "random 3", "random 4"]);
  assert.equal(await preview(page, "random").textContent(), "random 4");
  assert.deepEqual(errors, []);
  await context.close();
});
