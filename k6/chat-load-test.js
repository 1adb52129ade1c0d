// The seed's HTTP scenario against the REST fallback: every iteration reads a room's latest
// history page, then sends one message to it. 0 -> 50 -> 100 -> 0 virtual users.
//
// Environment:
//   BASE_URL       gateway base URL (default http://127.0.0.1:8080)
//   TOKENS         comma-separated user JWTs, or
//   TOKENS_FILE    a file of `<userId> <jwt>` lines, as printed by
//                  `chat-gateway token --user load --count 100`
//   ROOM_IDS       comma-separated room ids (default `load-1`); VU n uses room (n-1) % len
//   SERVICE_TOKEN  optional SERVICE-role JWT: setup() then creates the rooms and makes every
//                  user of TOKENS_FILE a member of the room its virtual user will use
//   SLEEP_S        pause between iterations in seconds (default 1)
//
// Mirrored by `chat-gateway-bench seed` (src/bin/chat-gateway-bench/seed.rs).
import http from 'k6/http';
import { check, sleep } from 'k6';
import { SharedArray } from 'k6/data';
import { Rate, Trend, Counter } from 'k6/metrics';

const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8080').replace(/\/$/, '');
const ROOM_IDS = (__ENV.ROOM_IDS || 'load-1').split(',').map((r) => r.trim()).filter((r) => r);
const SLEEP_S = Number(__ENV.SLEEP_S || '1');

// [{ user, token }], shared by every virtual user.
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

const errors = new Rate('chat_errors');
const historyDuration = new Trend('chat_history_duration', true);
const sendDuration = new Trend('chat_send_duration', true);
const rateLimited = new Counter('chat_rate_limited');

export const options = {
  stages: [
    { duration: __ENV.RAMP_UP || '30s', target: 50 },
    { duration: __ENV.STEADY || '1m', target: 100 },
    { duration: __ENV.RAMP_DOWN || '30s', target: 0 },
  ],
  thresholds: {
    http_req_duration: ['p(95)<500'],
    http_req_failed: ['rate<0.01'],
    chat_errors: ['rate<0.01'],
  },
};

function roomFor(vu) {
  return ROOM_IDS[(vu - 1) % ROOM_IDS.length];
}

export function setup() {
  const service = __ENV.SERVICE_TOKEN;
  if (!service) {
    return;
  }
  const headers = { Authorization: `Bearer ${service}`, 'Content-Type': 'application/json' };
  for (const room of ROOM_IDS) {
    const res = http.post(`${BASE_URL}/api/chat/rooms`, JSON.stringify({ id: room, name: room }), {
      headers: headers,
      responseCallback: http.expectedStatuses(201, 409),
    });
    check(res, { 'room created (or exists)': (r) => r.status === 201 || r.status === 409 });
  }
  // Virtual user n uses user (n-1) % USERS.length and room (n-1) % ROOM_IDS.length; make every
  // pairing that can occur (up to 100 virtual users) a membership.
  for (let vu = 1; vu <= 100; vu++) {
    const user = USERS[(vu - 1) % USERS.length].user;
    if (!user) {
      continue;
    }
    const room = roomFor(vu);
    const res = http.put(
      `${BASE_URL}/api/chat/rooms/${encodeURIComponent(room)}/members/${encodeURIComponent(user)}`,
      null,
      { headers: headers, responseCallback: http.expectedStatuses(200, 201) },
    );
    check(res, { 'member added': (r) => r.status === 200 || r.status === 201 });
  }
}

export default function () {
  const me = USERS[(__VU - 1) % USERS.length];
  const room = encodeURIComponent(roomFor(__VU));
  const url = `${BASE_URL}/api/chat/rooms/${room}/messages`;
  const auth = { Authorization: `Bearer ${me.token}` };

  const history = http.get(`${url}?limit=30`, { headers: auth, tags: { name: 'history' } });
  const historyOk = check(history, {
    'history 200': (r) => r.status === 200,
    'history has messages array': (r) => r.status === 200 && Array.isArray(r.json('messages')),
  });
  errors.add(!historyOk);
  historyDuration.add(history.timings.duration);

  const body = JSON.stringify({
    content: `load ${__VU}/${__ITER}`,
    // Time first, as the SDK's keys (protocol section 6).
    clientMsgId: `c-${Date.now().toString(16).padStart(12, '0')}-${__VU}-${__ITER}`,
  });
  const sent = http.post(url, body, {
    headers: Object.assign({ 'Content-Type': 'application/json' }, auth),
    tags: { name: 'send' },
  });
  if (sent.status === 429) {
    rateLimited.add(1);
  }
  const sendOk = check(sent, {
    'send 201': (r) => r.status === 201,
    'send has seq': (r) => r.status === 201 && typeof r.json('message.seq') === 'number',
  });
  errors.add(!sendOk);
  sendDuration.add(sent.timings.duration);

  sleep(SLEEP_S);
}
