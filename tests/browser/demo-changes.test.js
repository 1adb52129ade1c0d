// The demo page's messages that change, driven as a user would, with a second user watching:
// edit the last message with the Up arrow, delete with a confirmation, react from the hover bar
// and with the chips, reply with a quote; the other page shows each.
import assert from "node:assert/strict";
import { statSync } from "node:fs";
import { after, before, test } from "node:test";
import { allRoomsJoined, artifactPath, Gateway, launchBrowser, openDemo, waitFor } from "./harness.js";

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

/** The message with `seq` in the page's list. */
const message = (page, seq) => page.locator(`#list li.msg[data-seq="${seq}"]`);

/** Hovers the message and clicks one of its actions (`.actions <selector>`). */
async function act(page, seq, selector) {
  await message(page, seq).hover();
  await message(page, seq).locator(`.actions ${selector}`).click();
}

test("edit with Up, delete with a confirmation, react on hover, reply with a quote: the other user sees each", async () => {
  const alice = await openDemo(browser, gateway, { name: "Alice" });
  const bob = await openDemo(browser, gateway, { name: "Bob" });
  const [a, b] = [alice.page, bob.page];
  for (const p of [a, b]) await p.locator('#conn[data-state="open"]').waitFor();

  await a.fill("#input", "helo wrold");
  await a.press("#input", "Enter");
  const sent = a.locator("#list .msg:not(.pending)", { hasText: "helo wrold" });
  await sent.waitFor();
  const seq = Number(await sent.getAttribute("data-seq"));
  await message(b, seq).locator(".content", { hasText: "helo wrold" }).waitFor();

  // Up in the empty box edits the last message; Escape leaves it as it was.
  await a.focus("#input");
  await a.press("#input", "ArrowUp");
  assert.equal(await a.inputValue("#input"), "helo wrold");
  await a.locator("#composing", { hasText: "Editing your message" }).waitFor();
  await a.press("#input", "Escape");
  assert.equal(await a.inputValue("#input"), "");
  assert.equal(await a.locator("#composing").isHidden(), true);
  // Up again, fix the typo, Enter saves.
  await a.press("#input", "ArrowUp");
  await a.fill("#input", "hello world");
  await a.press("#input", "Enter");
  for (const p of [a, b]) {
    await message(p, seq).locator(".content:text-is('hello world')").waitFor();
    await message(p, seq).locator(".edited:text-is('(edited)')").waitFor();
  }
  assert.equal(await a.inputValue("#input"), "");

  // Bob reacts from the hover bar; the chip counts everyone and highlights one's own.
  await act(b, seq, '[data-emoji="👍"]');
  await message(b, seq).locator(".chip.mine:text-is('👍 1')").waitFor();
  await message(a, seq).locator(".chip:not(.mine):text-is('👍 1')").waitFor();
  // Alice adds hers with the chip; Bob takes his back with his.
  await message(a, seq).locator(".chip", { hasText: "👍" }).click();
  await message(a, seq).locator(".chip.mine:text-is('👍 2')").waitFor();
  await message(b, seq).locator(".chip.mine:text-is('👍 2')").waitFor();
  await message(b, seq).locator(".chip", { hasText: "👍" }).click();
  await message(b, seq).locator(".chip:not(.mine):text-is('👍 1')").waitFor();
  await message(a, seq).locator(".chip.mine:text-is('👍 1')").waitFor();

  // Bob replies: the composer says to whom, the sent reply quotes the original on both pages.
  await act(b, seq, ".reply");
  await b.locator("#composing", { hasText: "Replying to Alice: hello world" }).waitFor();
  await b.fill("#input", "agreed");
  await b.press("#input", "Enter");
  assert.equal(await b.locator("#composing").isHidden(), true);
  const reply = a.locator("#list .msg:not(.pending)", { hasText: "agreed" });
  await reply.waitFor();
  const replySeq = Number(await reply.getAttribute("data-seq"));
  for (const p of [a, b]) {
    const quote = message(p, replySeq).locator(".quote");
    await quote.locator(".who:text-is('Alice')").waitFor();
    await quote.locator(".what:text-is('hello world')").waitFor();
  }
  // The quote leads to the original.
  await message(a, replySeq).locator(".quote").click();
  await a.locator(`#list li.msg.flash[data-seq="${seq}"]`).waitFor();

  // Alice edits again: the quote on Bob's page follows.
  await a.focus("#input");
  await a.press("#input", "ArrowUp");
  assert.equal(await a.inputValue("#input"), "hello world");
  await a.fill("#input", "hello, world");
  await a.press("#input", "Enter");
  await message(b, replySeq).locator(".quote .what:text-is('hello, world')").waitFor();
  await message(b, replySeq).hover();
  const shot = artifactPath("changes.png");
  await b.screenshot({ path: shot });
  assert.ok(statSync(shot).size > 10_000, "the screenshot has content");

  // Delete asks first: dismissed, nothing happens; accepted, both pages show the tombstone and
  // the quote of the deleted original.
  const dialogs = [];
  a.once("dialog", (d) => (dialogs.push(d.message()), d.dismiss()));
  await act(a, seq, ".delete");
  await a.waitForTimeout(200);
  assert.equal(await message(b, seq).locator(".content").textContent(), "hello, world");
  a.once("dialog", (d) => (dialogs.push(d.message()), d.accept()));
  await act(a, seq, ".delete");
  for (const p of [a, b]) {
    await message(p, seq).locator(".content:text-is('message deleted')").waitFor();
    assert.equal(await message(p, seq).evaluate((li) => li.classList.contains("deleted")), true);
    assert.equal(await message(p, seq).locator(".chip").count(), 0, "a deleted message has no reactions");
    assert.equal(await message(p, seq).locator(".edited").count(), 0);
    await message(p, replySeq).locator(".quote.gone .what:text-is('message deleted')").waitFor();
  }
  assert.equal(dialogs.length, 2);
  assert.match(dialogs[0], /Delete this message/);
  // Nothing left of Alice's to edit: Up does nothing.
  await a.focus("#input");
  await a.press("#input", "ArrowUp");
  assert.equal(await a.inputValue("#input"), "");
  assert.equal(await a.locator("#composing").isHidden(), true);

  // The messages of the room once each, in order, on both pages.
  for (const p of [a, b]) {
    assert.deepEqual(
      await p.locator("#list .msg").evaluateAll((els) => els.map((e) => Number(e.dataset.seq))),
      [seq, replySeq],
    );
  }
  assert.deepEqual([...alice.errors, ...bob.errors], []);
  await alice.context.close();
  await bob.context.close();
});

test("a room not open: its badge counts messages, not their changes; its preview follows an edit and a deletion", async () => {
  const { token: frank } = await gateway.devToken("Frank");
  const { token: gus } = await gateway.devToken("Gus");
  const rest = async (room, id, method, path, body) => {
    const r = await fetch(`${gateway.url}/api/chat/rooms/${room}/messages/${id}${path}`, {
      method,
      headers: { authorization: `Bearer ${frank}`, "content-type": "application/json" },
      body: body && JSON.stringify(body),
    });
    assert.equal(r.status, 200, `${method} ${path}: ${await r.text()}`);
  };
  const serverUnread = async (room) => {
    const r = await fetch(`${gateway.url}/api/chat/rooms`, { headers: { authorization: `Bearer ${gus}` } });
    return (await r.json()).rooms.find((x) => x.id === room)?.unread ?? 0;
  };
  const badge = (room) => page.locator(`.room[data-room="${room}"] .badge`);
  const preview = (room) => page.locator(`.room[data-room="${room}"] .preview`);
  const showsServerUnread = (room) =>
    waitFor(async () => (await badge(room).isVisible()) && (await badge(room).textContent()) === String(await serverUnread(room)), {
      what: `the badge of #${room} showing the server's unread count`,
    });

  // Changed before the page opens: the room's last seq is past its last message.
  await gateway.restSend(gus, "help", "a question", "gus-1");
  const before = await gateway.restSend(frank, "help", "an answer", "frank-0");
  await rest("help", before.id, "PATCH", "", { content: "a better answer" });
  await rest("help", before.id, "PUT", `/reactions/${encodeURIComponent("👍")}`);
  const { context, page, errors } = await openDemo(browser, gateway, { name: "Gus", room: "general" });
  await page.locator('#conn[data-state="open"]').waitFor();
  await allRoomsJoined(page);
  await preview("help").locator(":scope:text-is('a better answer')").waitFor();
  await showsServerUnread("help");
  assert.equal(await badge("help").textContent(), "2");

  // Changed while the page is open, over REST: changes in the room's sequence, none unread.
  const sent = await gateway.restSend(frank, "random", "one", "frank-1");
  await preview("random").locator(":scope:text-is('one')").waitFor();
  await rest("random", sent.id, "PATCH", "", { content: "one, edited" });
  for (const emoji of ["👍", "🎉", "🔥"]) await rest("random", sent.id, "PUT", `/reactions/${encodeURIComponent(emoji)}`);
  await preview("random").locator(":scope:text-is('one, edited')").waitFor();
  await rest("random", sent.id, "DELETE", "");
  await preview("random").locator(":scope:text-is('message deleted')").waitFor();
  await showsServerUnread("random");
  assert.ok((await serverUnread("random")) >= 1);
  // Opening the room reads it all: the changes too, so the badge stays clear.
  await page.click('.room[data-room="random"]');
  await page.locator("#list .msg.deleted .content:text-is('message deleted')").waitFor();
  await badge("random").waitFor({ state: "hidden" });
  await waitFor(async () => (await serverUnread("random")) === 0, { what: "the server's unread count at 0" });
  assert.deepEqual(errors, []);
  await context.close();
});
