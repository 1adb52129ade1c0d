// The WebSocket scenario: every virtual user holds exactly one socket for the whole test,
// authenticates with a first `auth` frame, joins its room, sends at a set rate with a
// clientMsgId, checks that its own messages come back with a `seq`, and records end-to-end
// delivery latency (send -> push received, for every receiver) as a custom Trend.
//
// Environment:
//   WS_URL        gateway WebSocket URL (default ws://127.0.0.1:8080/ws)
//   TOKENS / TOKENS_FILE   as in chat-load-test.js (`<userId> <jwt>` lines)
//   ROOM_IDS      comma-separated room ids; VU n joins room (n-1) % len. The users must be
//                 members (see k6/README.md) unless the gateway runs in dev mode.
//   VUS           virtual users = sockets (default 100)
//   DURATION_S    how long each socket sends (default 60)
//   RATE_PER_VU   messages per second per socket (default 0.5)
//
// Mirrored by `chat-gateway-bench chat` (src/bin/chat-gateway-bench/rooms.rs).
import ws from 'k6/ws';
import { check } from 'k6';
import { SharedArray } from 'k6/data';
import { Counter, Rate, Trend } from 'k6/metrics';

const WS_URL = __ENV.WS_URL || 'ws://127.0.0.1:8080/ws';
const ROOM_IDS = (__ENV.ROOM_IDS || 'load-1').split(',').map((r) => r.trim()).filter((r) => r);
const VUS = Number(__ENV.VUS || '100');
const DURATION_S = Number(__ENV.DURATION_S || '60');
const RATE_PER_VU = Number(__ENV.RATE_PER_VU || '0.5');
// After the last send, wait this long for the last pushes before closing.
const DRAIN_MS = 2000;

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

// Send -> the push of that message received by any member socket (the sender's included).
const deliveryLatency = new Trend('chat_delivery_latency', true);
// Send -> the `result` of that send on the sender's socket.
const ackLatency = new Trend('chat_send_ack_latency', true);
const errors = new Rate('chat_errors');
const sent = new Counter('chat_sent');
const ownEchoes = new Counter('chat_own_echoes');
const lost = new Counter('chat_own_lost');
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
    chat_delivery_latency: ['p(95)<200', 'p(99)<500'],
    chat_send_ack_latency: ['p(95)<200'],
    chat_errors: ['rate<0.01'],
    chat_own_lost: ['count<1'],
    chat_duplicates: ['count<1'],
    ws_connecting: ['p(95)<1000'],
  },
};

export default function () {
  const me = USERS[(__VU - 1) % USERS.length];
  const room = ROOM_IDS[(__VU - 1) % ROOM_IDS.length];
  let nextId = 1;
  let counter = 0;
  // request id -> { kind, clientMsgId, at }
  const pending = {};
  // content -> sent-at (ms) for my own messages not yet seen back as a push (pushes carry no
  // clientMsgId: the content, unique per send here, is the key)
  const mine = {};
  // highest seq seen in the room: pushes arrive in seq order, each once
  let lastSeq = 0;

  let sendingStopped = false;

  const res = ws.connect(WS_URL, { tags: { scenario: 'ws-chat' } }, function (socket) {
    function request(frame, extra) {
      const id = nextId++;
      frame.id = id;
      pending[id] = Object.assign({ kind: frame.type, at: Date.now() }, extra || {});
      socket.send(JSON.stringify(frame));
    }

    function startSending() {
      const interval = Math.max(1, Math.round(1000 / RATE_PER_VU));
      socket.setInterval(function () {
        // Time first, as the SDK's keys (protocol section 6): a commit's keys land together.
        const clientMsgId = `c-${Date.now().toString(16).padStart(12, '0')}-${__VU}-${counter++}`;
        const at = Date.now();
        const content = `t=${at} from ${__VU} #${counter}`;
        mine[content] = at;
        sent.add(1);
        // The send time travels in the content so every receiver can measure delivery.
        request(
          { type: 'send', room: room, content: content, clientMsgId: clientMsgId },
          { clientMsgId: clientMsgId },
        );
      }, interval);
      socket.setTimeout(function () {
        // Stop sending: close after the drain period (close cancels the interval).
        socket.setTimeout(function () {
          socket.close();
        }, DRAIN_MS);
        sendingStopped = true;
      }, DURATION_S * 1000);
    }

    socket.on('open', function () {
      request({ type: 'auth', token: me.token });
    });

    socket.on('message', function (data) {
      const frame = JSON.parse(data);
      if (frame.type === 'result' || frame.type === 'error') {
        const req = pending[frame.id];
        delete pending[frame.id];
        const ok = frame.type === 'result';
        errors.add(!ok);
        if (!ok) {
          console.warn(`VU ${__VU}: ${req ? req.kind : '?'} failed: ${JSON.stringify(frame.error)}`);
        }
        if (!req) {
          return;
        }
        if (req.kind === 'auth' && ok) {
          request({ type: 'join', room: room });
        } else if (req.kind === 'join' && ok) {
          if (!sendingStopped) {
            startSending();
          }
        } else if (req.kind === 'send') {
          ackLatency.add(Date.now() - req.at);
          check(frame, { 'send result has seq': (f) => ok && typeof f.result.message.seq === 'number' });
        }
        return;
      }
      if (frame.type === 'message' && frame.room === room) {
        const msg = frame.message;
        if (typeof msg.seq !== 'number' || msg.seq <= lastSeq) {
          duplicates.add(1);
          return;
        }
        lastSeq = msg.seq;
        const m = /^t=(\d+) /.exec(msg.content);
        if (m) {
          deliveryLatency.add(Date.now() - Number(m[1]));
        }
        // My own message came back as a push, with its seq.
        if (msg.content in mine) {
          delete mine[msg.content];
          ownEchoes.add(1);
        }
      }
    });

    socket.on('error', function (e) {
      errors.add(true);
      console.error(`VU ${__VU}: socket error: ${e.error()}`);
    });

    socket.on('close', function () {
      lost.add(Object.keys(mine).length);
    });
  });

  check(res, { 'upgraded (101)': (r) => r && r.status === 101 });
}
