// The demo page's room list: each room's preview is its newest message and its badge counts
// live, whatever order messages arrive in and whoever is signed in.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { allRoomsJoined, Gateway, launchBrowser, openDemo, waitFor } from "./harness.js";

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

/** The unread count of `room` the server keeps for the holder of `token`. */
async function serverUnread(token, room) {
  const r = await fetch(`${gateway.url}/api/chat/rooms`, { headers: { authorization: `Bearer ${token}` } });
  assert.equal(r.status, 200);
  return (await r.json()).rooms.find((x) => x.id === room)?.unread ?? 0;
}

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

test("after picking a name, the other rooms of the list are joined again: their badges and previews count live", async () => {
  const { token: frank } = await gateway.devToken("Frank");
  const { token: hana } = await gateway.devToken("Hana");
  const { token: ivo } = await gateway.devToken("Ivo");
  const { context, page, errors } = await openDemo(browser, gateway, { name: "Hana", room: "general" });
  await page.locator('#conn[data-state="open"]').waitFor();
  await allRoomsJoined(page);
  await gateway.restSend(frank, "help", "in help, before the name");
  await shows(page, "help", "in help, before the name", hana);

  await page.fill("#name", "Ivo");
  await page.press("#name", "Enter");
  await page.locator('#me:text-is("signed in as Ivo")').waitFor();
  await page.locator('#conn[data-state="open"]').waitFor();
  // A new session, as at start-up: the open room at once, the rest of the list soon after.
  await allRoomsJoined(page);
  await gateway.restSend(frank, "help", "in help, after the name");
  await shows(page, "help", "in help, after the name", ivo);
  await gateway.restSend(frank, "random", "in random, after the name");
  await shows(page, "random", "in random, after the name", ivo);
  assert.deepEqual(errors, []);
  await context.close();
});

/**
 * Waits until the sidebar of `page` shows `text` as the preview of `room` and, as its badge, the
 * unread count the server keeps for the holder of `token`.
 */
async function shows(page, room, text, token) {
  await page.locator(`.room[data-room="${room}"] .preview:text-is("${text}")`).waitFor();
  await waitFor(
    async () => {
      const unread = await serverUnread(token, room);
      const b = page.locator(`.room[data-room="${room}"] .badge`);
      return unread > 0 && (await b.isVisible()) && (await b.textContent()) === String(unread);
    },
    { what: `the badge of #${room} showing the server's unread count` },
  );
}
