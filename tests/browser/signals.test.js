// Chat signals in the demo page: typing indicators and unread badges, between real pages.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { allRoomsJoined, Gateway, launchBrowser, openDemo, waitFor } from "./harness.js";

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

/** The caller's unread count in `room`, from the server (REST, as the socket's `rooms`). */
async function serverUnread(token, room) {
  const r = await fetch(`${gateway.url}/api/chat/rooms`, { headers: { authorization: `Bearer ${token}` } });
  assert.equal(r.status, 200);
  return (await r.json()).rooms.find((x) => x.id === room)?.unread;
}

test("typing in one page shows in the other, and ends when the typer sends", async () => {
  const alice = await openDemo(browser, gateway, { name: "Tess" });
  const bob = await openDemo(browser, gateway, { name: "Tom" });
  for (const p of [alice.page, bob.page]) await p.locator('#conn[data-state="open"]').waitFor();
  // Both are joined to the room before the typing starts (signals are not replayed).
  await alice.page.evaluate(async () => (await import("/sdk/chat-gateway.js")).getClient("/ws").join("general"));
  await bob.page.evaluate(async () => (await import("/sdk/chat-gateway.js")).getClient("/ws").join("general"));

  await alice.page.locator("#input").pressSequentially("Hello there", { delay: 20 });
  await bob.page.locator('#typing:text-is("Tess is typing…")').waitFor();
  // The typer does not see themselves typing.
  assert.equal(await alice.page.locator("#typing").textContent(), "");

  // Still shown while Tess keeps typing past the server's timeout: the SDK repeats the signal.
  await new Promise((r) => setTimeout(r, 7000));
  assert.equal(await bob.page.locator("#typing").textContent(), "Tess is typing…");

  await alice.page.press("#input", "Enter");
  await bob.page.locator("#list .msg:not(.pending) .content", { hasText: "Hello there" }).waitFor();
  await bob.page.locator('#typing:text-is("")').waitFor();

  // Typing, then clearing the box, ends it too.
  await alice.page.locator("#input").pressSequentially("hm", { delay: 20 });
  await bob.page.locator('#typing:text-is("Tess is typing…")').waitFor();
  await alice.page.fill("#input", "");
  await bob.page.locator('#typing:text-is("")').waitFor();

  assert.deepEqual([...alice.errors, ...bob.errors], []);
  await alice.context.close();
  await bob.context.close();
});

test("unread badge: counts messages of a room not open, clears when it is opened", async () => {
  const { token: bobToken } = await gateway.devToken("Ulla");
  // Ulla is a member of general with all of it read (earlier tests wrote there).
  const h = await fetch(`${gateway.url}/api/chat/rooms/general/messages?limit=1`, {
    headers: { authorization: `Bearer ${bobToken}` },
  });
  const head = (await h.json()).messages.at(-1)?.seq ?? 0;
  const read = await fetch(`${gateway.url}/api/chat/rooms/general/read`, {
    method: "POST",
    headers: { authorization: `Bearer ${bobToken}`, "content-type": "application/json" },
    body: JSON.stringify({ seq: head }),
  });
  assert.equal(read.status, 200);
  await waitFor(async () => (await serverUnread(bobToken, "general")) === 0, { what: "general read for Ulla" });
  const alice = await openDemo(browser, gateway, { name: "Uwe", room: "general" });
  const bob = await openDemo(browser, gateway, { name: "Ulla", room: "random" });
  for (const p of [alice.page, bob.page]) await p.locator('#conn[data-state="open"]').waitFor();
  await allRoomsJoined(bob.page);
  const badge = bob.page.locator('.room[data-room="general"] .badge');
  assert.equal(await badge.isHidden(), true);

  for (const text of ["first unread", "second unread"]) {
    await alice.page.fill("#input", text);
    await alice.page.press("#input", "Enter");
  }
  await bob.page.locator('.room[data-room="general"] .badge:text-is("2")').waitFor();
  assert.equal(await badge.isVisible(), true);
  // The open room has no badge, nor does the room nobody wrote in.
  assert.equal(await bob.page.locator('.room[data-room="random"] .badge').isHidden(), true);
  assert.equal(await bob.page.locator('.room[data-room="help"] .badge').isHidden(), true);

  await bob.page.click('.room[data-room="general"]');
  await bob.page.locator("#list .msg .content", { hasText: "second unread" }).waitFor();
  await badge.waitFor({ state: "hidden" });
  // The mark reached the server: the rooms list says 0 unread for Ulla (marks are written
  // within about half a second).
  await waitFor(async () => (await serverUnread(bobToken, "general")) === 0, {
    what: "0 unread in general for Ulla on the server",
  });

  // Away: a fresh page learns the count from the rooms list (deferred, about a second in).
  await bob.context.close();
  await alice.page.fill("#input", "while you were away");
  await alice.page.press("#input", "Enter");
  await alice.page.locator("#list .msg:not(.pending) .content", { hasText: "while you were away" }).waitFor();
  assert.equal(await serverUnread(bobToken, "general"), 1);
  const again = await openDemo(browser, gateway, { name: "Ulla", room: "help" });
  await again.page.locator('.room[data-room="general"] .badge:text-is("1")').waitFor();
  await again.page.click('.room[data-room="general"]');
  await again.page.locator('.room[data-room="general"] .badge').waitFor({ state: "hidden" });
  await waitFor(async () => (await serverUnread(bobToken, "general")) === 0, { what: "0 unread again" });

  assert.deepEqual([...alice.errors, ...bob.errors, ...again.errors], []);
  await alice.context.close();
  await again.context.close();
});

test("SDK: a burst of markRead is one mark_read with the highest seq; a lost typing stop expires", async () => {
  const context = await browser.newContext();
  context.setDefaultTimeout(10_000);
  const page = await context.newPage();
  const sent = [];
  page.on("websocket", (ws) => ws.on("framesent", (f) => sent.push({ url: ws.url(), ...JSON.parse(f.payload) })));
  await page.goto(`${gateway.url}/healthz`);
  const r = await page.evaluate(async () => {
    const sdk = await import("/sdk/chat-gateway.js");
    const token = async (name) =>
      (await (await fetch("/dev/token", { method: "POST", body: JSON.stringify({ name }) })).json()).token;
    // Vic's socket loses every typing stop, as if Wes vanished without one.
    class NoStops extends WebSocket {
      set onmessage(fn) {
        super.onmessage = fn && ((ev) => (JSON.parse(ev.data).type === "typing" && !JSON.parse(ev.data).typing ? null : fn(ev)));
      }
      get onmessage() {
        return super.onmessage;
      }
    }
    const vic = sdk.connect("/ws?vic", { token: await token("Vic"), WebSocket: NoStops });
    const wes = sdk.connect("/ws?wes", { token: await token("Wes") });
    const typing = [];
    await vic.join("sig", { onTyping: (t) => typing.push({ ...t, at: performance.now() }) });
    await wes.join("sig");
    for (const text of ["a", "b", "c"]) await wes.send("sig", text);

    await Promise.all([vic.markRead("sig", 1), vic.markRead("sig", 3), vic.markRead("sig", 2)]);
    await vic.markRead("sig", 2); // below what was sent: nothing to send
    const unread = (await vic.rooms()).rooms.find((x) => x.id === "sig");

    const started = performance.now();
    wes.typing("sig", true);
    while (!typing.length && performance.now() - started < 5000) await new Promise((r) => setTimeout(r, 20));
    wes.typing("sig", false); // the stop is lost on Vic's side
    while (typing.length < 2 && performance.now() - started < 10000) await new Promise((r) => setTimeout(r, 50));
    vic.close();
    wes.close();
    return { typing: typing.map(({ at, ...t }) => ({ ...t, afterMs: Math.round(at - typing[0].at) })), unread };
  });
  const marks = sent.filter((f) => f.type === "mark_read");
  assert.deepEqual(marks.map((f) => f.seq), [3], "one mark, the highest seq");
  // rooms(): the summary of the room (the mark itself is written within about half a second).
  assert.equal(r.unread.lastSeq, 3);
  assert.equal(r.unread.lastMessage.content, "c");
  assert.equal(r.typing.length, 2, JSON.stringify(r.typing));
  assert.deepEqual(
    { ...r.typing[0], afterMs: 0 },
    { room: "sig", userId: "wes", name: "Wes", typing: true, expiresInMs: 6000, afterMs: 0 },
  );
  assert.equal(r.typing[1].typing, false);
  assert.equal(r.typing[1].expired, true);
  assert.ok(r.typing[1].afterMs >= 5900, `expired after ${r.typing[1].afterMs} ms`);
  // Wes's typing: one start, one stop, nothing repeated within the 2.5 s repeat interval.
  assert.deepEqual(sent.filter((f) => f.type === "typing").map((f) => f.typing), [true, false]);
  await context.close();
});
