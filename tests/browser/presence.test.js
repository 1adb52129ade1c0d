// Presence in the demo page: the open room's online count and names, across real pages.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { Gateway, launchBrowser, openDemo } from "./harness.js";

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

const pause = (ms) => new Promise((r) => setTimeout(r, ms));

test("presence: the online count of the open room; a user with two tabs counts once", async () => {
  const bob = await openDemo(browser, gateway, { name: "Quinn", room: "help" });
  const count = bob.page.locator("#online-count");
  await bob.page.locator('#online-count:text-is("1 online")').waitFor();
  assert.deepEqual(await bob.page.locator("#online-users .u").allTextContents(), ["Quinn"]);

  // Pat opens the room in one tab: two people online, Pat's name with a dot.
  const tab1 = await openDemo(browser, gateway, { name: "Pat", room: "help" });
  await bob.page.locator('#online-count:text-is("2 online")').waitFor();
  await bob.page.locator('#online-users .u:text-is("Pat")').waitFor();
  await tab1.page.locator('#online-count:text-is("2 online")').waitFor();

  // A second tab of the same user: still two (pushes are coalesced per second: wait past one).
  const tab2 = await openDemo(browser, gateway, { name: "Pat", room: "help" });
  await tab2.page.locator('#online-count:text-is("2 online")').waitFor();
  await pause(2500);
  assert.equal(await count.textContent(), "2 online");
  assert.equal(await bob.page.locator("#online-users .u").count(), 2);

  // One tab closed: Pat is still online in the other.
  await tab1.context.close();
  await pause(2500);
  assert.equal(await count.textContent(), "2 online");

  // The last tab closed: Pat is gone.
  await tab2.context.close();
  await bob.page.locator('#online-count:text-is("1 online")').waitFor();
  assert.deepEqual(await bob.page.locator("#online-users .u").allTextContents(), ["Quinn"]);

  assert.deepEqual([...bob.errors, ...tab1.errors, ...tab2.errors], []);
  await bob.context.close();
});
