// Two people chat through the gateway, each in their own browser context (like two tabs).
import assert from "node:assert/strict";
import { statSync } from "node:fs";
import { after, before, test } from "node:test";
import { artifactPath, Gateway, launchBrowser, openDemo, shownMessages } from "./harness.js";

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

test("two pages chat with each other through the gateway", async () => {
  const alice = await openDemo(browser, gateway, { name: "Alice" });
  const bob = await openDemo(browser, gateway, { name: "Bob" });
  for (const p of [alice.page, bob.page]) {
    await p.locator('#conn[data-state="open"]').waitFor();
  }

  await alice.page.fill("#input", "Hi Bob, can you see this?");
  await alice.page.press("#input", "Enter");
  await bob.page.locator("#list .msg:not(.pending) .content", { hasText: "Hi Bob, can you see this?" }).waitFor();

  await bob.page.fill("#input", "Loud and clear, Alice.");
  await bob.page.click("#composer button");
  await alice.page.locator("#list .msg:not(.pending) .content", { hasText: "Loud and clear, Alice." }).waitFor();

  await alice.page.fill("#input", "Great, the gateway works.");
  await alice.page.press("#input", "Enter");
  await bob.page.locator("#list .msg:not(.pending) .content", { hasText: "Great, the gateway works." }).waitFor();

  // Each message once on each page, in order, none left pending, attributed to its sender.
  const expected = ["Hi Bob, can you see this?", "Loud and clear, Alice.", "Great, the gateway works."];
  for (const p of [alice.page, bob.page]) {
    await p.locator("#list .msg.pending").first().waitFor({ state: "detached" });
    assert.deepEqual(await shownMessages(p), expected);
    assert.deepEqual(await p.locator("#list .msg .name").allTextContents(), ["Alice", "Bob", "Alice"]);
  }
  // Own messages are marked as such; avatars fall back to initials.
  assert.equal(await alice.page.locator("#list .msg.mine").count(), 2);
  assert.deepEqual(await bob.page.locator("#list .msg .avatar").allTextContents(), ["A", "B", "A"]);
  assert.equal(await alice.page.locator("#skeleton").isHidden(), true);

  // One socket per page, nothing thrown.
  assert.equal(alice.sockets.length, 1);
  assert.equal(bob.sockets.length, 1);
  assert.deepEqual([...alice.errors, ...bob.errors], []);

  const shot = artifactPath("chat.png");
  await alice.page.screenshot({ path: shot });
  assert.ok(statSync(shot).size > 10_000, "the screenshot has content");

  await alice.context.close();
  await bob.context.close();
});

test("avatars: lazy, async-decoded pictures through the resize template; initials when there is none or it fails", async () => {
  const pixel = "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' width='8' height='8'%3E%3Crect width='8' height='8' fill='%23f80'/%3E%3C/svg%3E";
  const withPicture = gateway.signToken({ sub: "pia", name: "Pia Picture", avatar: pixel });
  const broken = gateway.signToken({ sub: "bo", name: "Bo Broken", avatar: `${gateway.url}/no-such-avatar.png` });
  const plain = (await gateway.devToken("Cy")).token;
  await gateway.restSend(withPicture, "help", "I have a picture");
  await gateway.restSend(broken, "help", "My picture is gone");
  await gateway.restSend(plain, "help", "I never had one");

  const { context, page, errors } = await openDemo(browser, gateway, { name: "Viewer", room: "help" });
  await page.locator("#list .content", { hasText: "I never had one" }).waitFor();
  const avatars = page.locator("#list .msg .avatar");
  const img = avatars.nth(0).locator("img");
  assert.equal(await img.getAttribute("loading"), "lazy");
  assert.equal(await img.getAttribute("decoding"), "async");
  assert.equal(await img.getAttribute("src"), pixel, "the default template {url} is the URL itself");
  await page.waitForFunction(() => document.querySelector("#list .msg .avatar img")?.complete);
  // The failed picture is removed: its initials show instead.
  await avatars.nth(1).locator("img").waitFor({ state: "detached" });
  assert.deepEqual(await avatars.allTextContents(), ["PP", "BB", "C"]);
  assert.deepEqual(errors, []);
  await context.close();
});
