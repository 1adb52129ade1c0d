// The changes scenario (protocol section 15): as ws-chat.js, every virtual user holds exactly one
// socket, authenticates with a first `auth` frame and joins its room; it then sends one message
// of its own and, instead of sending more, makes changes at a set rate: edits of that message
// (with a `clientChangeId`) and reactions toggled on the room's newest messages: three
// (message, emoji) pairs per user, `react` one time round and `unreact` the next. Every member receives every
// change of its room as a `change` push, in seq order, once.
//
// Latency: an edit carries its request time in its content, so every receiver measures it
// (send -> push, as ws-chat.js does for messages); a reaction carries no time, so only the
// reacting socket measures it, from the request to its own push (matched by the change's seq from
// the result, whichever of the two arrives first).
//
// Environment:
//   WS_URL        gateway WebSocket URL (default ws://127.0.0.1:8080/ws)
//   TOKENS / TOKENS_FILE   as in chat-load-test.js (`<userId> <jwt>` lines)
//   ROOM_IDS      comma-separated room ids; VU n joins room (n-1) % len. The users must be
//                 members (see k6/README.md) unless the gateway runs in dev mode.
//   VUS           virtual users = sockets (default 100)
//   DURATION_S    how long each socket makes changes (default 60)
//   RATE_PER_VU   changes per second per socket (default 0.5); reactions are rate limited per
//                 user (`rate_limit.reaction_per_second`, 5 by default)
//   EDIT_PERCENT  percent of the changes that are edits, the rest reactions (default 25)
//
// Mirrored by `chat-gateway-bench changes` (src/bin/chat-gateway-bench/changes.rs).
import ws from 'k6/ws';
import { check } from 'k6';
import { SharedArray } from 'k6/data';
import { Counter, Rate, Trend } from 'k6/metrics';

const WS_URL = __ENV.WS_URL || 'ws://127.0.0.1:8080/ws';
const ROOM_IDS = (__ENV.ROOM_IDS || 'load-1').split(',').map((r) => r.trim()).filter((r) => r);
const VUS = Number(__ENV.VUS || '100');
const DURATION_S = Number(__ENV.DURATION_S || '60');
const RATE_PER_VU = Number(__ENV.RATE_PER_VU || '0.5');
const EDIT_PERCENT = Math.min(100, Math.max(0, Number(__ENV.EDIT_PERCENT || '25')));
// After the last change, wait this long for the last pushes before closing.
const DRAIN_MS = 2000;
// Reactions toggled, and how many of the room's newest messages they are spread over.
const EMOJI = ['\u{1F44D}', '\u{1F389}', '\u{1F602}'];
const RECENT = 5;

const USERS = new SharedArray('users', function () {
  if (__ENV.TOKENS_FILE) {
    return open(__ENV.TOKENS_FILE)
      .split('\n')
      .map((line) => line.trim())
      .filter((line) => line)
      .map((line) => {
        const parts = line.split(/\s+/);
        return parts.length > 1 ? { user: parts[0], token: parts[1] } : { user: '', token: parts[0] };
      });
  }
  return (__ENV.TOKENS || '')
    .split(',')
    .map((t) => t.trim())
    .filter((t) => t)
    .map((token) => ({ user: '', token: token }));
});

if (USERS.length === 0) {
  throw new Error('set TOKENS or TOKENS_FILE (see k6/README.md)');
}

// Edit -> its push at any member socket; reaction -> its push at the reacting socket.
const deliveryLatency = new Trend('chat_change_delivery_latency', true);
// Change request -> its `result`.
const ackLatency = new Trend('chat_change_ack_latency', true);
const errors = new Rate('chat_errors');
const changesSent = new Counter('chat_changes_sent');
// Results that stored nothing (`duplicate: true`): the toggling went wrong.
const noops = new Counter('chat_changes_noop');
const ownLost = new Counter('chat_own_changes_lost');
const duplicates = new Counter('chat_duplicates');

export const options = {
  scenarios: {
    sockets: {
      // One iteration per virtual user, and that iteration holds one socket for the whole test.
      executor: 'per-vu-iterations',
      vus: VUS,
      iterations: 1,
      maxDuration: `${DURATION_S + 60}s`,
    },
  },
  thresholds: {
    chat_change_delivery_latency: ['p(95)<200', 'p(99)<500'],
    chat_change_ack_latency: ['p(95)<200'],
    chat_errors: ['rate<0.01'],
    chat_changes_noop: ['count<1'],
    chat_own_changes_lost: ['count<1'],
    chat_duplicates: ['count<1'],
    ws_connecting: ['p(95)<1000'],
  },
};

export default function () {
  const me = USERS[(__VU - 1) % USERS.length];
  const room = ROOM_IDS[(__VU - 1) % ROOM_IDS.length];
  let nextId = 1;
  let counter = 0;
  let reactions = 0;
  // request id -> { kind, at }
  const pending = {};
  // highest seq seen in the room: messages and changes share the sequence, each pushed once
  let lastSeq = 0;
  // the seq of my own message (the edits' target), and the room's newest message seqs
  let ownSeq = 0;
  const recent = [];
  // "seq emoji" -> true while I react with it
  const reacted = {};
  // my stored changes not yet seen as a push: change seq -> request time (ms)
  const awaiting = {};
  // change pushes seen before their result: change seq -> arrival time (ms)
  const early = {};

  let changing = false;

  const res = ws.connect(WS_URL, { tags: { scenario: 'ws-changes' } }, function (socket) {
    function request(frame) {
      const id = nextId++;
      frame.id = id;
      pending[id] = { kind: frame.type, at: Date.now() };
      socket.send(JSON.stringify(frame));
    }

    function change() {
      counter += 1;
      // Edits spread evenly: EDIT_PERCENT of every 100 changes.
      const edit = Math.floor((counter * EDIT_PERCENT) / 100) !== Math.floor(((counter - 1) * EDIT_PERCENT) / 100);
      if (edit) {
        // The request time travels in the content, so every receiver can measure delivery.
        request({
          type: 'edit',
          room: room,
          seq: ownSeq,
          content: `t=${Date.now()} from ${__VU} #${counter}`,
          clientChangeId: `k6-${__VU}-e${counter}`,
        });
      } else if (recent.length > 0) {
        // Three (message, emoji) keys per user, each on another of the room's recent messages
        // (offset by VU), added one time round and removed the next.
        const e = reactions % EMOJI.length;
        const seq = recent[(__VU + e) % recent.length];
        const emoji = EMOJI[e];
        reactions += 1;
        const key = `${seq} ${emoji}`;
        const kind = reacted[key] ? 'unreact' : 'react';
        if (kind === 'react') {
          reacted[key] = true;
        } else {
          delete reacted[key];
        }
        request({ type: kind, room: room, seq: seq, emoji: emoji });
      } else {
        return;
      }
      changesSent.add(1);
    }

    function startChanging() {
      changing = true;
      const interval = Math.max(1, Math.round(1000 / RATE_PER_VU));
      socket.setInterval(change, interval);
      socket.setTimeout(function () {
        // Stop: close after the drain period (close cancels the interval).
        socket.setTimeout(function () {
          socket.close();
        }, DRAIN_MS);
      }, DURATION_S * 1000);
    }

    socket.on('open', function () {
      request({ type: 'auth', token: me.token });
    });

    socket.on('message', function (data) {
      const frame = JSON.parse(data);
      const now = Date.now();
      if (frame.type === 'result' || frame.type === 'error') {
        const req = pending[frame.id];
        delete pending[frame.id];
        const ok = frame.type === 'result';
        errors.add(!ok);
        if (!ok) {
          console.warn(`VU ${__VU}: ${req ? req.kind : '?'} failed: ${JSON.stringify(frame.error)}`);
        }
        if (!req || !ok) {
          return;
        }
        if (req.kind === 'auth') {
          request({ type: 'join', room: room });
        } else if (req.kind === 'join') {
          // The message this user's edits change.
          request({ type: 'send', room: room, content: `seed from ${__VU}`, clientMsgId: `k6-${__VU}-seed` });
        } else if (req.kind === 'send') {
          check(frame, { 'send result has seq': (f) => typeof f.result.message.seq === 'number' });
          ownSeq = frame.result.message.seq;
          if (!changing) {
            startChanging();
          }
        } else {
          ackLatency.add(now - req.at);
          const stored = frame.result.change;
          if (!stored || frame.result.duplicate) {
            noops.add(1);
            return;
          }
          if (stored.seq in early) {
            if (req.kind !== 'edit') {
              deliveryLatency.add(early[stored.seq] - req.at);
            }
            delete early[stored.seq];
          } else {
            awaiting[stored.seq] = req;
          }
        }
        return;
      }
      if ((frame.type !== 'message' && frame.type !== 'change') || frame.room !== room) {
        return;
      }
      const seq = frame.type === 'message' ? frame.message.seq : frame.change.seq;
      if (typeof seq !== 'number' || seq <= lastSeq) {
        duplicates.add(1);
        return;
      }
      lastSeq = seq;
      if (frame.type === 'message') {
        recent.push(seq);
        if (recent.length > RECENT) {
          recent.shift();
        }
        return;
      }
      const c = frame.change;
      if (c.kind === 'edit') {
        const m = /^t=(\d+) /.exec(c.content || '');
        if (m) {
          deliveryLatency.add(now - Number(m[1]));
        }
      }
      if (c.seq in awaiting) {
        if (awaiting[c.seq].kind !== 'edit') {
          deliveryLatency.add(now - awaiting[c.seq].at);
        }
        delete awaiting[c.seq];
      } else if (me.user === '' || c.by === me.user) {
        // Possibly mine, its result not read yet.
        early[c.seq] = now;
      }
    });

    socket.on('error', function (e) {
      errors.add(true);
      console.error(`VU ${__VU}: socket error: ${e.error()}`);
    });

    socket.on('close', function () {
      ownLost.add(Object.keys(awaiting).length);
    });
  });

  check(res, { 'upgraded (101)': (r) => r && r.status === 101 });
}
