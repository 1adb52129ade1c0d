/**
 * chat-gateway client: one multiplexed WebSocket per page (per process in Node).
 *
 * A dependency-free ES module. It speaks the wire protocol of proto-docs/protocol.md, in
 * browsers and in Node (with Node's global `WebSocket`, from Node 22 on, or one passed in as
 * `options.WebSocket`; a URL relative to the page needs a page, so Node gives an absolute one):
 *
 * - **One socket per page.** {@link connect} (alias {@link getClient}) returns the same live
 *   {@link ChatClient} for the same URL, however often it is called. Joining and leaving rooms
 *   never opens another socket.
 * - **Rooms** are multiplexed: {@link ChatClient#join}, {@link ChatClient#leave},
 *   {@link ChatClient#send}, {@link ChatClient#history}.
 * - **Reconnect and resume.** A dropped socket is reopened with exponential backoff and jitter;
 *   every joined room is joined again with `since` = the highest `seq` seen, so the app gets the
 *   missed messages, in order, with no gap and no duplicate (pushes are deduplicated by `seq`).
 *   When too much was missed the room handler is told to reload its history.
 * - **Tokens** come from a provider callback: asked on first connect, on a `session_expiring`
 *   push (the token is refreshed on the same socket), and after a close that says the token is no
 *   longer good (4002, 4003).
 * - **Sends** are optimistic: each gets a `clientMsgId` at once, and is retried with that id
 *   across reconnects until acknowledged; the server deduplicates by it, so a retry never creates
 *   a second message.
 * - **Guards.** Init-once (same client per URL, one in-flight join per room) and request locks
 *   (identical history requests in flight share one promise).
 * - **Chat signals.** {@link ChatClient#typing} (kept alive while on, ended on send and leave),
 *   {@link ChatClient#markRead} (coalesced), {@link ChatClient#rooms} (unread counts),
 *   {@link ChatClient#presence}; the room handler gets `onTyping`, `onRead` and `onPresence`.
 * - **Messages** reach the app in one shape (the REST message object, protocol section 4),
 *   whatever the socket sent: pushes are lean (no `id`, the sender's profile only when it is
 *   news to the room), and the client fills in each sender's name and avatar from the profiles
 *   the server told it (in join results, history, pushes).
 * - **Messages that change** (protocol section 15). {@link ChatClient#edit} (idempotent by its
 *   `clientChangeId`, retried across reconnects like a send), {@link ChatClient#delete},
 *   {@link ChatClient#react}, {@link ChatClient#unreact}, and replies (`send` with `replyTo`).
 *   `change` pushes are in the room's sequence with its messages (deduplicated and resumed the
 *   same way); the room handler's `onChange` gets each once, in order, with the message it
 *   changed in its new state when the client holds it: the client keeps the messages it handed
 *   out current by the protocol's rule (a change applies when its seq is above the message's
 *   `version`), their reactions and the user's own among them, and the quotes of loaded replies.
 *
 * @module chat-gateway
 */

/** Connection states, in the order a client usually goes through them. */
export const ConnectionState = Object.freeze({
  /** First connection attempt (socket opening or authenticating). */
  CONNECTING: "connecting",
  /** Authenticated: requests flow. */
  OPEN: "open",
  /** The socket dropped; waiting to reconnect, or reconnecting. Joined rooms will resume. */
  RECONNECTING: "reconnecting",
  /** Closed for good: {@link ChatClient#close} was called, or the token provider gave up. */
  CLOSED: "closed",
});

/**
 * Close codes (protocol section 10) after which the same token must not be used again: get a
 * fresh one from the provider, then reconnect and resume.
 */
export const TOKEN_CLOSE_CODES = Object.freeze([4002, 4003]);

/**
 * Close codes after which the client reconnects at once (jitter only) rather than backing off.
 * 1012: the node is draining; 4003: the session expired (a fresh token fixes it).
 */
const IMMEDIATE_RECONNECT_CODES = new Set([1012, 4003]);

/** 4029: too many sockets for this user. Retry, but never faster than this. */
const TOO_MANY_CONNECTIONS_CODE = 4029;
const TOO_MANY_CONNECTIONS_MIN_DELAY_MS = 5000;

/** The code the client closes a socket with when it stopped answering. */
const CLIENT_GIVE_UP_CODE = 4900;

/** While typing is on, `typing: true` is repeated this often (the server wants 2-3 s). */
const TYPING_REPEAT_MS = 2500;
/** A `typing: true` push without `expiresInMs` ends after this long (the server's default). */
const TYPING_DEFAULT_EXPIRY_MS = 6000;
/** At most one `mark_read` per room per this interval (the highest seq asked for). */
const MARK_READ_INTERVAL_MS = 500;

/** Send and change errors worth retrying with the same key (protocol section 11). */
const RETRIABLE_SEND_CODES = new Set(["unavailable", "internal"]);

/** How much of the original a reply's quote shows: characters (Unicode scalar values). */
const QUOTE_CHARS = 100;
/**
 * Per room, the newest changes are kept this long (a count): a history page answered after a
 * change's push can still show the message without it, and gets it applied on arrival.
 */
const RECENT_CHANGES = 256;

/** Join errors after which the room is dropped: the server will not let this user in. */
const TERMINAL_JOIN_CODES = new Set([
  "forbidden",
  "room_not_found",
  "too_many_rooms",
  "bad_request",
]);

/**
 * An error from the gateway (its `code` is the protocol's error code) or from the client
 * (`timeout`, `closed`, `frame_too_large`, `auth_failed`, `token_provider_failed`).
 */
export class ChatGatewayError extends Error {
  /**
   * @param {string} code stable, machine-readable code; branch on it
   * @param {string} message for humans
   * @param {{retryAfterMs?: number, clientMsgId?: string, clientChangeId?: string, room?: string}} [details]
   */
  constructor(code, message, details = {}) {
    super(message);
    this.name = "ChatGatewayError";
    /** @type {string} */
    this.code = code;
    /** Milliseconds to wait before retrying (`rate_limited`, `unavailable`), else undefined. */
    this.retryAfterMs = details.retryAfterMs;
    /** For send errors: the idempotency key to retry with. */
    this.clientMsgId = details.clientMsgId;
    /** For edit errors: the idempotency key to retry with. */
    this.clientChangeId = details.clientChangeId;
    /** The room the request was about, when there is one. */
    this.room = details.room;
  }
}

/**
 * A new idempotency key for a send: the time first (milliseconds, 12 hex digits), then random, so
 * two tabs never collide and keys sort by when they were made. Keys made at about the same time
 * land together in the store's index of keys (proto-docs/protocol.md, section 6).
 * @returns {string}
 */
export function newClientMsgId() {
  return randomKey(`c-${Date.now().toString(16).padStart(12, "0")}`);
}

/** A random key with `prefix`: a UUID where the runtime has one. */
function randomKey(prefix) {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return `${prefix}-${c.randomUUID()}`;
  const bytes = new Uint8Array(16);
  if (c && typeof c.getRandomValues === "function") c.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return `${prefix}-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

/**
 * The delay before reconnect attempt `attempt` (0-based): exponential, capped, with "equal
 * jitter" (half fixed, half random) so that many clients dropped at once do not return at once.
 * @param {number} attempt
 * @param {{initialMs: number, maxMs: number, factor: number}} backoff
 * @param {() => number} [random]
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, backoff, random = Math.random) {
  const ceiling = Math.min(backoff.maxMs, backoff.initialMs * backoff.factor ** attempt);
  return Math.round(ceiling / 2 + random() * (ceiling / 2));
}

/** Live clients by normalized URL: the one-socket-per-page guarantee. */
const clients = new Map();

/**
 * The page's client for `url`, created on the first call and returned by every later call with
 * the same URL (options of later calls are ignored). A client that was closed with
 * {@link ChatClient#close} is forgotten, so the next call creates a new one.
 *
 * @param {string} [url] `ws(s)://` or `http(s)://` URL of the gateway's `/ws`, or a path
 *   relative to the page. Default: `/ws` on the page's host. Where there is no page (Node),
 *   an absolute URL is required.
 * @param {ClientOptions} [options] required on the first call (for `token`)
 * @returns {ChatClient}
 * @throws {TypeError} without `options.token` on the first call, for a URL that is not a
 *   WebSocket URL or is relative with no page to resolve it against, and when there is no
 *   WebSocket implementation (no global one and none in `options.WebSocket`)
 */
export function connect(url, options) {
  const key = normalizeUrl(url);
  let client = clients.get(key);
  if (!client) {
    if (!options || options.token == null) {
      throw new TypeError("connect: the first call for a URL needs options.token");
    }
    client = new ChatClient(key, options);
    clients.set(key, client);
  }
  return client;
}

/** Same as {@link connect}: the page's one client for `url`. */
export const getClient = connect;

/**
 * Turns `url` into the absolute `ws:`/`wss:` URL that keys the client registry.
 * @param {string} [url]
 * @returns {string}
 */
export function normalizeUrl(url) {
  const base = globalThis.location?.href;
  let u;
  try {
    u = new URL(url ?? "/ws", base);
  } catch {
    throw new TypeError(
      base
        ? `not a WebSocket URL: ${url}`
        : `"${url ?? "/ws"}" is not an absolute URL, and there is no page to resolve it against: ` +
            "give the gateway's full URL, e.g. ws://127.0.0.1:8080/ws",
    );
  }
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  if (u.protocol !== "ws:" && u.protocol !== "wss:") {
    throw new TypeError(`not a WebSocket URL: ${url}`);
  }
  u.hash = "";
  return u.toString();
}

/**
 * @typedef {object} ClientOptions
 * @property {string | ((ctx: {reason: TokenReason}) => string | Promise<string>)} token
 *   The token, or a provider called whenever a token is needed (see {@link TokenReason}).
 * @property {number} [requestTimeoutMs=10000] how long a request waits for its answer
 *   (history waits this long in total, connection included)
 * @property {number} [connectTimeoutMs=30000] how long opening the socket and authenticating may
 *   take before the attempt is abandoned and retried (a gateway in a reconnect storm upgrades new
 *   connections at its accept pace, so a connect can take seconds; giving up early loses the turn)
 * @property {number} [sendTimeoutMs=30000] how long a send (or an edit, delete, react, unreact)
 *   keeps being retried before its promise rejects with `timeout` (the outcome is then unknown:
 *   retry with the same clientMsgId, or clientChangeId)
 * @property {number} [keptMessagesPerRoom=1000] how many of the messages it handed out the
 *   client keeps per room, to apply changes to (the least recently handed out or changed go
 *   first; a change to one no longer kept reaches `onChange` with `message: null`)
 * @property {{initialMs?: number, maxMs?: number, factor?: number}} [backoff] reconnect delays
 *   (defaults 250 ms doubling up to 30 s)
 * @property {number} [maxFrameBytes=65536] frames larger than the server's limit are refused
 *   locally (the server would close the socket with 1009)
 * @property {WebSocketConstructor} [WebSocket] WebSocket implementation (default: the global
 *   one). Where there is none (Node before 22), pass one, e.g. the `ws` package's `WebSocket`.
 */

/**
 * What the client needs of a WebSocket class: `new WebSocket(url)` with `readyState`, `send`,
 * `close` and the `onopen`/`onmessage`/`onerror`/`onclose` properties (text frames as strings in
 * `event.data`). The browsers', Node's and the `ws` package's all fit.
 * @typedef {new (url: string) => any} WebSocketConstructor
 */

/**
 * Why the token provider is called: `initial` (first connect), `expiring` (a `session_expiring`
 * push: refresh on the open socket), `expired` (closed with 4003), `rejected` (the last token was
 * refused: 4002 or a failed refresh), `reconnect` (the cached token is about to expire).
 * @typedef {"initial" | "expiring" | "expired" | "rejected" | "reconnect"} TokenReason
 */

/**
 * What a room handler receives: a function (called with each new message), or an object with
 * any of the callbacks.
 * @typedef {((message: object) => void) | {
 *   onMessage?: (message: object) => void,
 *   onReload?: (info: {room: string, head: number}) => void,
 *   onRemoved?: (info: {room: string, reason: string}) => void,
 *   onTyping?: (info: {room: string, userId: string, name: string | null, typing: boolean,
 *     expiresInMs?: number, expired?: boolean}) => void,
 *   onRead?: (info: {room: string, userId: string, seq: number}) => void,
 *   onPresence?: (info: {room: string, online: number, joined: {userId: string, name: string | null}[],
 *     left: string[]}) => void,
 *   onChange?: (info: {room: string, change: object, message: object | null, replies: object[]}) => void,
 * }} RoomHandler
 */

/**
 * What an edit, delete, react or unreact resolves with: the message in its current state (in the
 * shape the app gets every message in), the change the request stored (null when it stored
 * nothing), and whether it stored nothing new (a retry, a repeat, content already so).
 * @typedef {{message: object, change: object | null, duplicate: boolean}} ChangeResult
 */

/**
 * One page's connection to the gateway. Create it with {@link connect}, not `new`.
 */
export class ChatClient {
  /**
   * @param {string} url absolute ws(s) URL
   * @param {ClientOptions} options
   */
  constructor(url, options) {
    const WebSocketImpl = options.WebSocket ?? globalThis.WebSocket;
    if (typeof WebSocketImpl !== "function") {
      throw new TypeError(
        "no WebSocket implementation: this runtime has no global WebSocket (Node has one from " +
          "version 22); pass one as options.WebSocket, e.g. the ws package's WebSocket",
      );
    }
    /** The gateway URL this client is connected to. */
    this.url = url;
    this._tokenSource = options.token;
    this._requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
    this._connectTimeoutMs = options.connectTimeoutMs ?? 30_000;
    this._sendTimeoutMs = options.sendTimeoutMs ?? 30_000;
    this._keptMessages = Math.max(1, options.keptMessagesPerRoom ?? 1000);
    this._backoff = { initialMs: 250, maxMs: 30_000, factor: 2, ...options.backoff };
    this._maxFrameBytes = options.maxFrameBytes ?? 65_536;
    this._WebSocket = WebSocketImpl;

    /** @type {string} one of {@link ConnectionState} */
    this.state = ConnectionState.CONNECTING;
    /** The authenticated user id, once known. */
    this.userId = null;

    this._listeners = new Map(); // event name -> Set of listeners
    this._socket = null;
    this._ready = false; // authenticated on the current socket
    this._nextId = 1;
    this._pending = new Map(); // request id -> {frame, resolve, reject, timer, kind}
    this._waiting = []; // requests queued until the socket is ready
    this._rooms = new Map(); // room -> RoomState (rooms the app wants joined)
    this._lastSeq = new Map(); // room -> highest seq the app has seen (kept across leave)
    this._profiles = new Map(); // room -> Map(userId -> {name, avatarUrl}) the server told us
    this._historyLocks = new Map(); // "room|before|limit" -> in-flight promise
    this._outbox = new Map(); // "send:<clientMsgId>", "edit:<clientChangeId>", ... -> pending send or change
    // The messages handed out (onMessage, history), kept current by the change pushes: room ->
    // Map(seq -> message), least recently handed out or changed first (evicted first).
    this._held = new Map();
    this._recentChanges = new Map(); // room -> the newest RECENT_CHANGES changes, oldest first
    // room -> seqs of messages the newest history page handed out above the last seen seq:
    // their pushes are not delivered again. Emptied as the last seen seq passes them.
    this._historyAhead = new Map();
    this._typingOut = new Map(); // room -> repeat timer while this user is typing there
    this._typingIn = new Map(); // room -> Map(userId -> expiry timer) of others typing there
    this._marks = new Map(); // room -> {sentSeq, wantSeq, lastAt, timer, waiters}
    this._token = null;
    this._tokenExpiresAt = 0; // unix seconds, from the auth result
    this._tokenStale = false; // the server refused or expired the cached token
    this._rejectedToken = null; // never authenticate with this one again
    this._handshakeTimer = null; // bounds socket opening + first auth
    this._attempt = 0; // reconnect attempts since the last successful auth
    this._reconnectTimer = null;
    this._lastReceivedAt = 0;
    this._closed = false;
    this._readyPromise = null;
    this._onOnline = () => this._reconnectNow();
    if (globalThis.addEventListener) globalThis.addEventListener("online", this._onOnline);

    this._open("initial");
  }

  // ---- public API -------------------------------------------------------------------------

  /**
   * Subscribes to client events. Returns a function that unsubscribes.
   * - `state`: `{state, previous, attempt?, delayMs?, code?, reason?}` on every state change.
   * - `error`: a {@link ChatGatewayError} nobody else will see (a failed token refresh, an
   *   error frame without id, a room that could not be re-joined).
   * @param {"state" | "error"} event
   * @param {(payload: any) => void} listener
   * @returns {() => void}
   */
  on(event, listener) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => set.delete(listener);
  }

  /**
   * Resolves once the socket is authenticated (at once if it is). The same promise is returned
   * until the next disconnect. Rejects if the client is closed first.
   * @returns {Promise<void>}
   */
  ready() {
    if (this._closed) return Promise.reject(this._closedError());
    if (this._ready) return Promise.resolve();
    if (!this._readyPromise) {
      let resolve, reject;
      const promise = new Promise((res, rej) => ((resolve = res), (reject = rej)));
      this._readyPromise = { promise, resolve, reject };
    }
    return this._readyPromise.promise;
  }

  /**
   * Joins `room` and delivers its messages to `handler`, each once and in `seq` order. Calling
   * it again for a room already joined (or joining) adds the handler and returns the same
   * promise: one join frame. After a reconnect the room is joined again automatically, resuming
   * from the last `seq` seen; so is a room joined earlier on this page and left since.
   *
   * @param {string} room
   * @param {RoomHandler} handler
   * @returns {Promise<{room: string, head: number, missed: number, reload: boolean}>} the first
   *   join's result. Rejects with `forbidden`, `room_not_found`, `too_many_rooms`, `bad_request`
   *   (the room is then dropped), or `closed`.
   */
  join(room, handler) {
    if (this._closed) return Promise.reject(this._closedError());
    let state = this._rooms.get(room);
    if (!state) {
      let resolve, reject;
      const joined = new Promise((res, rej) => ((resolve = res), (reject = rej)));
      // The app may only care about messages; keep a rejected join from being "unhandled".
      joined.catch(() => {});
      state = { room, handlers: new Set(), joined, resolve, reject, settled: false, inFlight: false };
      this._rooms.set(room, state);
      if (this._ready) this._sendJoin(state);
    }
    if (handler) state.handlers.add(normalizeHandler(handler));
    return state.joined;
  }

  /**
   * Stops receiving `room`: drops its handlers and tells the server (when connected). Leaving a
   * room that is not joined does nothing. The last seen `seq` is kept, so joining again later
   * replays what was missed meanwhile.
   * @param {string} room
   * @returns {Promise<void>}
   */
  async leave(room) {
    const state = this._rooms.get(room);
    if (!state) return;
    this._rooms.delete(room);
    this._stopTyping(room); // the server ends the signal on leave
    this._forgetTypers(room);
    if (!state.settled) {
      state.settled = true;
      state.reject(new ChatGatewayError("left", "left the room before the join completed", { room }));
    }
    if (!this._ready) return; // the server forgets the socket's rooms when the socket drops
    try {
      await this._request({ type: "leave", room }, { queue: false });
    } catch (e) {
      // A leave that does not arrive is harmless: the next reconnect does not re-join the room.
      if (e.code !== "closed" && e.code !== "not_connected") this._emit("error", e);
    }
  }

  /**
   * Sends `content` to `room`. The returned promise carries `clientMsgId` at once, so the app
   * can show the message as pending and match it to its push or ack. Until the server answers,
   * the send is retried with the same `clientMsgId` on every (re)connection, which the server
   * deduplicates: the message is stored once.
   *
   * Rejects with a {@link ChatGatewayError}: `rate_limited` (see `retryAfterMs`; retry with the
   * same `clientMsgId`), `content_empty`, `content_too_long`, `forbidden`, `room_not_found`,
   * `message_not_found` and `message_deleted` (the message `replyTo` names), `frame_too_large`,
   * `timeout` (outcome unknown after `sendTimeoutMs`), `closed`.
   *
   * @param {string} room
   * @param {string} content
   * @param {{clientMsgId?: string, replyTo?: number}} [options] `clientMsgId`: pass the previous
   *   one to retry a send; `replyTo`: the `seq` of the message this one replies to (the message
   *   then carries its quote)
   * @returns {Promise<{id: string, seq: number, message: object, duplicate: boolean}> & {clientMsgId: string}}
   */
  send(room, content, options = {}) {
    const clientMsgId = options.clientMsgId ?? newClientMsgId();
    this._stopTyping(room); // the server ends the signal when the message is stored
    const frame = { type: "send", room, content, clientMsgId };
    if (options.replyTo != null) frame.replyTo = options.replyTo;
    const promise = this._enqueue(`send:${clientMsgId}`, frame, (result) => {
      // Not held or marked as seen: the room's handler still gets the push, so every handler
      // sees every message of its room exactly once, the user's own included.
      const m = this._message(room, result.message);
      return { id: m.id, seq: m.seq, message: m, duplicate: !!result.duplicate };
    });
    promise.clientMsgId = clientMsgId;
    return promise;
  }

  /**
   * Edits the user's own message `seq` of `room` (within the server's edit window). Like a send,
   * the returned promise carries its idempotency key, `clientChangeId`, at once, and the edit is
   * retried with it on every (re)connection until answered: it is stored once.
   *
   * Resolves with `{message, change, duplicate}`: the message in its current state and the change
   * stored (`duplicate: true` for a retry, or `change: null` when the content was already this).
   * The room's handler gets the change through `onChange` too, like everyone's. Rejects with
   * `forbidden` (not the sender), `message_not_found`, `message_deleted`, `edit_window_closed`,
   * `content_empty`, `content_too_long`, `room_not_found`, `frame_too_large`, `timeout`, `closed`.
   *
   * @param {string} room
   * @param {number} seq
   * @param {string} content
   * @param {{clientChangeId?: string}} [options] pass the previous `clientChangeId` to retry
   * @returns {Promise<ChangeResult> & {clientChangeId: string}}
   */
  edit(room, seq, content, options = {}) {
    const clientChangeId = options.clientChangeId ?? randomKey("e");
    const frame = { type: "edit", room, seq, content, clientChangeId };
    const promise = this._enqueue(`edit:${clientChangeId}`, frame, (result) => this._changeResult(frame, result));
    promise.clientChangeId = clientChangeId;
    return promise;
  }

  /**
   * Deletes message `seq` of `room` (the user's own; any, for ADMIN): it becomes a tombstone.
   * Retried across reconnects until answered (deleting twice stores nothing). Resolves and
   * rejects as {@link ChatClient#edit} does (`forbidden`, `message_not_found`, ...).
   * @param {string} room
   * @param {number} seq
   * @returns {Promise<ChangeResult>}
   */
  delete(room, seq) {
    const frame = { type: "delete", room, seq };
    return this._enqueue(`delete:${this._nextId++}`, frame, (result) => this._changeResult(frame, result));
  }

  /**
   * Adds the user's reaction `emoji` (one emoji) to message `seq` of `room`. Retried across
   * reconnects until answered (a repeated reaction stores nothing). Rejects with
   * `unknown_reaction`, `too_many_reactions`, `rate_limited` (see `retryAfterMs`),
   * `message_not_found`, `message_deleted`, `forbidden`, `room_not_found`, `timeout`, `closed`.
   * @param {string} room
   * @param {number} seq
   * @param {string} emoji
   * @returns {Promise<ChangeResult>}
   */
  react(room, seq, emoji) {
    const frame = { type: "react", room, seq, emoji };
    return this._enqueue(`react:${this._nextId++}`, frame, (result) => this._changeResult(frame, result));
  }

  /**
   * Removes the user's reaction `emoji` from message `seq` of `room` (one it does not have:
   * nothing is stored). As {@link ChatClient#react}.
   * @param {string} room
   * @param {number} seq
   * @param {string} emoji
   * @returns {Promise<ChangeResult>}
   */
  unreact(room, seq, emoji) {
    const frame = { type: "unreact", room, seq, emoji };
    return this._enqueue(`unreact:${this._nextId++}`, frame, (result) => this._changeResult(frame, result));
  }

  /**
   * One page of `room`'s history, oldest first. Identical requests in flight share one promise
   * (one frame). Waits for the connection when needed, `requestTimeoutMs` in total. Messages
   * returned count as seen: their pushes are not delivered again. In a joined room they are
   * held and kept current by its changes; a message the client holds in a newer version than
   * the page's (a change pushed before the page was answered) is returned as it holds it.
   * @param {string} room
   * @param {{before?: number, limit?: number}} [page] `before`: a seq (from `nextBefore`)
   * @returns {Promise<{room: string, messages: object[], nextBefore: number | null}>}
   */
  history(room, page = {}) {
    const key = `${room}|${page.before ?? ""}|${page.limit ?? ""}`;
    const inFlight = this._historyLocks.get(key);
    if (inFlight) return inFlight;
    const frame = { type: "history", room };
    if (page.before != null) frame.before = page.before;
    if (page.limit != null) frame.limit = page.limit;
    const promise = this._request(frame)
      .then((result) => {
        const joined = this._rooms.has(room);
        const mine = result.myReactions ?? {};
        const messages = result.messages.map((m) => {
          const message = this._message(room, m, mine[m.seq] ?? []);
          return joined ? this._hold(room, message, { authoritative: true }) : message;
        });
        // The newest page can hold messages whose pushes are still on their way: they are not
        // delivered again. The resume point stays where the pushes are, so that the changes
        // between them are still received.
        if (page.before == null && joined) {
          const last = this._lastSeq.get(room) ?? -Infinity;
          let ahead = this._historyAhead.get(room);
          for (const m of messages) {
            if (m.seq <= last) continue;
            if (!ahead) this._historyAhead.set(room, (ahead = new Set()));
            ahead.add(m.seq);
          }
        }
        const { myReactions, ...rest } = result;
        return { ...rest, messages };
      })
      .finally(() => this._historyLocks.delete(key));
    this._historyLocks.set(key, promise);
    return promise;
  }

  /**
   * Application-level round trip (the socket does not need it to stay alive).
   * @returns {Promise<{serverTime: string, rttMs: number}>}
   */
  async ping() {
    const started = performance.now();
    const result = await this._request({ type: "ping" });
    return { ...result, rttMs: Math.round(performance.now() - started) };
  }

  /** The rooms this client is joined to (or joining). @returns {string[]} */
  joinedRooms() {
    return [...this._rooms.keys()];
  }

  /**
   * The user's rooms (memberships), most recently active first, with unread counts and the
   * last message: `{rooms: [{id, name, lastSeq, lastReadSeq, unread, lastMessage}]}`.
   * Waits for the connection when needed.
   * @param {{limit?: number}} [options]
   * @returns {Promise<{rooms: Array<{id: string, name: string | null, lastSeq: number,
   *   lastReadSeq: number, unread: number, lastMessage: object | null}>}>}
   */
  rooms(options = {}) {
    const frame = { type: "rooms" };
    if (options.limit != null) frame.limit = options.limit;
    return this._request(frame).then((result) => ({
      rooms: result.rooms.map((r) => ({
        ...r,
        lastMessage: r.lastMessage ? this._message(r.id, r.lastMessage) : null,
      })),
    }));
  }

  /**
   * Signals that this user is typing in the joined `room` (`true`) or stopped (`false`). While
   * on, `typing: true` is repeated every 2.5 s; it stops on `typing(room, false)`, on a send to
   * the room and on leaving it. Best effort: never rejects (a refused signal is dropped).
   * @param {string} room
   * @param {boolean} [isTyping=true]
   */
  typing(room, isTyping = true) {
    if (this._closed) return;
    if (!isTyping) {
      if (this._stopTyping(room)) this._sendTyping(room, false);
      return;
    }
    if (this._typingOut.has(room)) return; // already on: the repeat timer keeps it alive
    this._typingOut.set(
      room,
      setInterval(() => this._sendTyping(room, true), TYPING_REPEAT_MS),
    );
    this._sendTyping(room, true);
  }

  /**
   * Marks `room` read up to `seq` (the highest seq shown). Coalesced: at most one `mark_read`
   * per room every 500 ms, carrying the highest seq asked for; lower or equal seqs than one
   * already sent are dropped. Resolves once a mark covering `seq` is acknowledged.
   * @param {string} room
   * @param {number} seq
   * @returns {Promise<void>}
   */
  markRead(room, seq) {
    if (this._closed) return Promise.reject(this._closedError());
    let m = this._marks.get(room);
    if (!m) this._marks.set(room, (m = { sentSeq: -1, wantSeq: -1, lastAt: 0, timer: null, waiters: [] }));
    if (seq <= m.sentSeq && m.wantSeq <= m.sentSeq) return Promise.resolve();
    const promise = new Promise((resolve, reject) => m.waiters.push({ seq, resolve, reject }));
    promise.catch(() => {}); // callers may fire and forget
    if (seq > m.wantSeq) m.wantSeq = seq;
    if (m.timer == null) {
      const wait = Math.max(0, m.lastAt + MARK_READ_INTERVAL_MS - Date.now());
      m.timer = setTimeout(() => this._flushMark(room, m), wait);
    }
    return promise;
  }

  /**
   * Who is online in `room`: `{room, online, users: [{userId, name}], nextCursor}`. `online` is
   * the full count; `users` is one page (pass `nextCursor` as `cursor` for the next).
   * @param {string} room
   * @param {{cursor?: string, limit?: number}} [page]
   * @returns {Promise<{room: string, online: number, users: {userId: string, name: string | null}[],
   *   nextCursor: string | null}>}
   */
  presence(room, page = {}) {
    const frame = { type: "presence", room };
    if (page.cursor != null) frame.cursor = page.cursor;
    if (page.limit != null) frame.limit = page.limit;
    return this._request(frame);
  }

  /**
   * Closes the socket for good and forgets this client, so {@link connect} makes a new one.
   * Pending requests and sends reject with `closed`.
   */
  close() {
    if (this._closed) return;
    this._closed = true;
    if (clients.get(this.url) === this) clients.delete(this.url);
    if (globalThis.removeEventListener) globalThis.removeEventListener("online", this._onOnline);
    clearTimeout(this._reconnectTimer);
    for (const room of [...this._typingOut.keys()]) this._stopTyping(room);
    for (const room of [...this._typingIn.keys()]) this._forgetTypers(room);
    for (const m of this._marks.values()) clearTimeout(m.timer);
    const socket = this._socket;
    const err = this._closedError();
    this._detach(err);
    if (socket && socket.readyState <= 1) socket.close(1000, "client closed");
    for (const entry of [...this._outbox.values()]) this._settle(entry, err);
    for (const w of this._waiting.splice(0)) w.reject(err);
    for (const m of this._marks.values()) for (const w of m.waiters.splice(0)) w.reject(err);
    for (const state of this._rooms.values()) {
      if (!state.settled) {
        state.settled = true;
        state.reject(err);
      }
    }
    this._rooms.clear();
    this._held.clear();
    this._recentChanges.clear();
    this._historyAhead.clear();
    if (this._readyPromise) this._readyPromise.reject(err);
    this._readyPromise = null;
    this._setState(ConnectionState.CLOSED);
  }

  // ---- connection life ----------------------------------------------------------------------

  /** Opens a socket and authenticates on it. `reason` is for the token provider. */
  async _open(reason) {
    if (this._closed) return;
    let token;
    try {
      token = await this._getToken(reason);
    } catch (e) {
      const err =
        e instanceof ChatGatewayError
          ? e
          : new ChatGatewayError("token_provider_failed", `token provider failed: ${e?.message ?? e}`);
      this._emit("error", err);
      this._scheduleReconnect({ code: 0, reason: err.message });
      return;
    }
    if (this._closed) return;
    let socket;
    try {
      socket = new this._WebSocket(this.url);
    } catch (e) {
      this._scheduleReconnect({ code: 0, reason: String(e?.message ?? e) });
      return;
    }
    this._socket = socket;
    this._lastReceivedAt = Date.now();
    this._handshakeTimer = setTimeout(() => this._giveUp(socket, "connect timed out"), this._connectTimeoutMs);
    socket.onopen = () => this._authenticate(socket, token);
    socket.onmessage = (event) => this._onFrame(socket, event.data);
    // `error` is always followed by `close`, which carries the code; nothing to do here.
    socket.onerror = () => {};
    socket.onclose = (event) => this._onClose(socket, event);
  }

  /** Sends the first `auth` frame; on success re-joins rooms and flushes queued work. */
  _authenticate(socket, token) {
    const id = this._nextId++;
    this._pending.set(id, {
      kind: "handshake",
      timer: null, // bounded by the handshake timer
      resolve: (result) => {
        if (socket !== this._socket) return;
        clearTimeout(this._handshakeTimer);
        this._handshakeTimer = null;
        this._token = token;
        this._tokenExpiresAt = result.expiresAt ?? 0;
        this._tokenStale = false;
        this.userId = result.userId ?? this.userId;
        this._attempt = 0;
        this._ready = true;
        this._setState(ConnectionState.OPEN);
        this._resumeAll();
        if (this._readyPromise) this._readyPromise.resolve();
        this._readyPromise = null;
      },
      // The server closes with 4002 after this error; _onClose reconnects with a new token.
      reject: (err) => {
        this._tokenStale = true;
        this._rejectedToken = token;
        this._emit("error", err);
      },
    });
    this._write(socket, { type: "auth", id, token });
  }

  /** After authentication: join every wanted room again, then send queued requests and sends. */
  _resumeAll() {
    for (const state of this._rooms.values()) this._sendJoin(state);
    for (const w of this._waiting.splice(0)) w.transmit();
    for (const entry of this._outbox.values()) {
      if (entry.requestId == null && entry.retryTimer == null) this._transmit(entry);
    }
  }

  /** Handles the end of `socket`: fails what cannot survive it and plans the reconnect. */
  _onClose(socket, event) {
    if (socket !== this._socket) return;
    this._detach();
    if (this._closed) return;
    const code = event.code;
    if (TOKEN_CLOSE_CODES.includes(code)) this._tokenStale = true;
    this._scheduleReconnect({ code, reason: event.reason });
  }

  /** Forgets the current socket: pending requests either wait for the next one or fail. */
  _detach(error = new ChatGatewayError("not_connected", "connection lost before the answer")) {
    clearTimeout(this._handshakeTimer);
    this._handshakeTimer = null;
    const socket = this._socket;
    if (socket) {
      socket.onopen = socket.onmessage = socket.onclose = null;
      socket.onerror = () => {};
    }
    this._socket = null;
    this._ready = false;
    for (const [id, p] of this._pending) {
      clearTimeout(p.timer);
      this._pending.delete(id);
      // Sends, changes and joins are retried on the next socket; everything else fails now.
      if (p.kind === "outbox" || p.kind === "join") p.onDrop();
      else if (p.kind !== "handshake") p.reject(error);
    }
    for (const state of this._rooms.values()) state.inFlight = false;
  }

  /** Waits (backoff + jitter) and reconnects. */
  _scheduleReconnect({ code, reason }) {
    if (this._closed) return;
    clearTimeout(this._reconnectTimer);
    let delayMs;
    if (IMMEDIATE_RECONNECT_CODES.has(code) && this._attempt === 0) {
      delayMs = Math.round(Math.random() * 100);
    } else {
      delayMs = backoffDelay(this._attempt, this._backoff);
      if (code === TOO_MANY_CONNECTIONS_CODE) delayMs = Math.max(delayMs, TOO_MANY_CONNECTIONS_MIN_DELAY_MS);
    }
    const attempt = ++this._attempt;
    this._setState(ConnectionState.RECONNECTING, { attempt, delayMs, code, reason });
    const why = code === 4003 ? "expired" : this._tokenStale ? "rejected" : "reconnect";
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      this._open(why);
    }, delayMs);
  }

  /** Skips the backoff wait (the browser came back online). */
  _reconnectNow() {
    if (this._closed || this._socket || this._reconnectTimer == null) return;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._open(this._tokenStale ? "rejected" : "reconnect");
  }

  /** Closes a socket that stopped answering; the close handler reconnects. */
  _giveUp(socket, why) {
    if (socket !== this._socket) return;
    try {
      socket.close(CLIENT_GIVE_UP_CODE, why);
    } catch {
      // already closing
    }
    // Do not wait for the closing handshake of a dead peer.
    this._onClose(socket, { code: CLIENT_GIVE_UP_CODE, reason: why });
  }

  /**
   * A token for the next auth: the cached one unless it was refused, expired or is about to;
   * otherwise the provider's. A token the server refused is never sent again (close 4002 means
   * "do not retry with the same token").
   */
  async _getToken(reason) {
    const source = this._tokenSource;
    const nearExpiry = this._tokenExpiresAt && this._tokenExpiresAt * 1000 - Date.now() < 30_000;
    if (this._token && !this._tokenStale && !nearExpiry && reason === "reconnect") return this._token;
    const token = typeof source === "string" ? source : await source({ reason });
    if (typeof token !== "string" || token === "") {
      throw new ChatGatewayError("token_provider_failed", "the token provider returned no token");
    }
    if (token === this._rejectedToken) {
      if (typeof source === "string") this.close();
      throw new ChatGatewayError("auth_failed", "the server refused this token; the provider must return a new one");
    }
    return token;
  }

  /** `session_expiring`: ask for a fresh token and refresh on the same socket. */
  async _refresh() {
    const socket = this._socket;
    try {
      const token = await this._tokenSource({ reason: "expiring" });
      if (socket !== this._socket || !this._ready) return;
      const result = await this._request({ type: "auth", token }, { queue: false });
      this._token = token;
      this._tokenExpiresAt = result.expiresAt ?? this._tokenExpiresAt;
    } catch (e) {
      // Still on the old session; if it expires the server closes with 4003 and we reconnect.
      this._emit("error", e instanceof ChatGatewayError ? e : new ChatGatewayError("token_provider_failed", String(e?.message ?? e)));
    }
  }

  // ---- frames -------------------------------------------------------------------------------

  _onFrame(socket, data) {
    if (socket !== this._socket) return;
    this._lastReceivedAt = Date.now();
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return; // the server only sends JSON; ignore anything else
    }
    switch (frame.type) {
      case "result":
      case "error": {
        const p = this._pending.get(frame.id);
        if (!p) {
          if (frame.type === "error") this._emit("error", toError(frame.error));
          return;
        }
        this._pending.delete(frame.id);
        clearTimeout(p.timer);
        if (frame.type === "result") p.resolve(frame.result);
        else p.reject(toError(frame.error));
        return;
      }
      case "message":
        if (frame.message) this._onMessage(frame.room, this._message(frame.room, frame.message));
        return;
      case "change":
        if (frame.change) this._onChange(frame.room, frame.change);
        return;
      case "removed": {
        const state = this._rooms.get(frame.room);
        if (!state) return;
        this._rooms.delete(frame.room);
        this._forgetMessages(frame.room);
        this._stopTyping(frame.room);
        this._forgetTypers(frame.room);
        for (const h of state.handlers) h.onRemoved?.({ room: frame.room, reason: frame.reason });
        return;
      }
      case "typing":
        this._onTyping(frame);
        return;
      case "read":
        this._deliver(frame.room, "onRead", { room: frame.room, userId: frame.userId, seq: frame.seq });
        return;
      case "presence":
        this._deliver(frame.room, "onPresence", {
          room: frame.room,
          online: frame.online,
          joined: frame.joined ?? [],
          left: frame.left ?? [],
        });
        return;
      case "session_expiring":
        if (typeof this._tokenSource === "function") this._refresh();
        return;
      default:
        return; // a push type this client does not know: newer server, ignore
    }
  }

  /**
   * Delivers a pushed message once: anything at or below the room's last seen seq is a duplicate,
   * and so is one the newest history page handed out already.
   */
  _onMessage(room, message) {
    const state = this._rooms.get(room);
    if (!state || !message) return;
    const handedOut = this._historyAhead.get(room)?.has(message.seq);
    if (!this._markSeen(room, message.seq)) return;
    const held = this._hold(room, message);
    if (handedOut) return;
    this._deliver(room, "onMessage", held);
  }

  /**
   * A change push: in the room's sequence, so deduplicated like a message. Applied to the message
   * the client holds by the protocol's rule, and to the quotes of the replies it holds; then
   * delivered to `onChange` once, with the message as it now is (null when not held).
   */
  _onChange(room, change) {
    if (!this._rooms.has(room)) return;
    if (!this._markSeen(room, change.seq)) return;
    let recent = this._recentChanges.get(room);
    if (!recent) this._recentChanges.set(room, (recent = []));
    recent.push(change);
    if (recent.length > RECENT_CHANGES) recent.shift();

    const held = this._held.get(room);
    const before = held?.get(change.target);
    let message = null;
    if (before) {
      message = applyChange(before, change, this.userId);
      if (message !== before) this._keep(room, message);
    }
    const replies = [];
    if (held && change.kind !== "reaction") {
      for (const reply of [...held.values()]) {
        if (reply.replyTo?.seq !== change.target) continue;
        const replyTo = message ? quoteOf(reply.replyTo, message) : quoteAfter(reply.replyTo, change);
        if (sameQuote(replyTo, reply.replyTo)) continue;
        const updated = { ...reply, replyTo };
        this._keep(room, updated);
        replies.push(updated);
      }
    }
    this._deliver(room, "onChange", { room, change, message, replies });
  }

  /** Calls `callback` of every handler of the joined `room` with `info`. */
  _deliver(room, callback, info) {
    const state = this._rooms.get(room);
    if (!state) return;
    for (const h of state.handlers) {
      try {
        h[callback]?.(info);
      } catch (e) {
        console.error("chat-gateway: room handler threw", e);
      }
    }
  }

  /**
   * A typing push. A start is delivered, and ends by itself (delivered as a stop with
   * `expired: true`) unless repeated or stopped within `expiresInMs`.
   */
  _onTyping(frame) {
    const room = frame.room;
    if (!this._rooms.has(room) || !frame.userId) return;
    let typers = this._typingIn.get(room);
    if (!typers) this._typingIn.set(room, (typers = new Map()));
    clearTimeout(typers.get(frame.userId));
    typers.delete(frame.userId);
    const info = { room, userId: frame.userId, name: frame.name ?? null, typing: !!frame.typing };
    if (info.typing) {
      info.expiresInMs = frame.expiresInMs ?? TYPING_DEFAULT_EXPIRY_MS;
      typers.set(
        frame.userId,
        setTimeout(() => {
          typers.delete(frame.userId);
          this._deliver(room, "onTyping", { ...info, typing: false, expired: true });
        }, info.expiresInMs),
      );
    }
    this._deliver(room, "onTyping", info);
  }

  /** Forgets the typers of `room` (left or removed): no expiry fires later. */
  _forgetTypers(room) {
    const typers = this._typingIn.get(room);
    if (!typers) return;
    for (const timer of typers.values()) clearTimeout(timer);
    this._typingIn.delete(room);
  }

  /** Stops repeating this user's typing in `room`; true when it was on. */
  _stopTyping(room) {
    const timer = this._typingOut.get(room);
    if (timer == null) return false;
    clearInterval(timer);
    this._typingOut.delete(room);
    return true;
  }

  /** One typing signal, when connected (a signal is worthless once late). Errors are dropped. */
  _sendTyping(room, typing) {
    if (!this._ready) return;
    this._request({ type: "typing", room, typing }, { queue: false }).catch(() => {});
  }

  /** Sends the highest wanted read mark of `room`; later marks wait for the next slot. */
  _flushMark(room, m) {
    m.timer = null;
    if (this._closed || m.wantSeq <= m.sentSeq) return;
    const seq = m.wantSeq;
    const before = m.sentSeq;
    m.lastAt = Date.now();
    const covered = m.waiters.filter((w) => w.seq <= seq);
    m.waiters = m.waiters.filter((w) => w.seq > seq);
    this._request({ type: "mark_read", room, seq }).then(
      () => {
        if (seq > m.sentSeq) m.sentSeq = seq;
        for (const w of covered) w.resolve();
      },
      (e) => {
        if (m.sentSeq === seq) m.sentSeq = before; // not stored: a later mark may send it again
        for (const w of covered) w.reject(e);
      },
    );
    // Counted as sent now, so that a burst of marks while this one flies coalesces behind it.
    m.sentSeq = Math.max(m.sentSeq, seq);
  }

  /**
   * A message of `room` as the app gets it: the socket's object (lean in pushes) in the REST
   * message object's shape (protocol section 4), with the fields of section 15 always there.
   * A profile the message carries is remembered for the sender's later messages, which leave it
   * out. `myReactions`: the user's own reactions, when known (history tells them).
   */
  _message(room, m, myReactions = []) {
    let profiles = this._profiles.get(room);
    if (!profiles) this._profiles.set(room, (profiles = new Map()));
    if ("senderName" in m || "senderAvatarUrl" in m) {
      profiles.set(m.senderId, { name: m.senderName ?? null, avatarUrl: m.senderAvatarUrl ?? null });
    }
    const profile = profiles.get(m.senderId) ?? { name: null, avatarUrl: null };
    return {
      id: m.id ?? null,
      roomId: room,
      seq: m.seq,
      senderId: m.senderId,
      senderName: profile.name,
      senderAvatarUrl: profile.avatarUrl,
      sender: { id: m.senderId, name: profile.name, avatarUrl: profile.avatarUrl },
      content: m.content,
      contentType: m.contentType ?? "TEXT",
      status: m.status ?? "SENT",
      moderationStatus: m.moderationStatus ?? "APPROVED",
      createdAt: new Date(m.ts).toISOString(),
      clientMsgId: m.clientMsgId ?? null,
      replyTo: m.replyTo ? toQuote(m.replyTo) : null,
      editedAt: m.editedAt != null ? new Date(m.editedAt).toISOString() : null,
      deletedAt: m.deletedAt != null ? new Date(m.deletedAt).toISOString() : null,
      version: m.version ?? m.seq,
      reactions: { ...m.reactions },
      myReactions: [...myReactions],
    };
  }

  /**
   * Takes `incoming` (from a push or a history page) into the messages held for `room` and
   * returns the message to hand out. By the protocol's rule the newer version wins: one held in
   * a newer version than `incoming` stays. Changes already received that `incoming` does not
   * reflect yet (a page answered after their push) are applied, and a reply's quote follows its
   * original when that is held. `authoritative`: `incoming.myReactions` is the server's word
   * (history); otherwise the user's reactions held so far are kept.
   */
  _hold(room, incoming, { authoritative = false } = {}) {
    const old = this._held.get(room)?.get(incoming.seq);
    let m = incoming;
    if (old && old.version > incoming.version) {
      m = old;
    } else {
      if (old && !authoritative) m = { ...m, myReactions: [...old.myReactions] };
      for (const change of this._recentChanges.get(room) ?? []) {
        if (change.target === m.seq && change.seq > incoming.version) m = applyChange(m, change, this.userId);
      }
    }
    if (m.replyTo) {
      const original = this._held.get(room)?.get(m.replyTo.seq);
      let replyTo = m.replyTo;
      if (original) replyTo = quoteOf(replyTo, original);
      else {
        for (const change of this._recentChanges.get(room) ?? []) {
          if (change.target === replyTo.seq) replyTo = quoteAfter(replyTo, change);
        }
      }
      if (!sameQuote(replyTo, m.replyTo)) m = { ...m, replyTo };
    }
    this._keep(room, m);
    return m;
  }

  /** Holds `m` as the newest handed out of its room, forgetting the least recent past the bound. */
  _keep(room, m) {
    let held = this._held.get(room);
    if (!held) this._held.set(room, (held = new Map()));
    held.delete(m.seq);
    held.set(m.seq, m);
    if (held.size > this._keptMessages) held.delete(held.keys().next().value);
  }

  /** Forgets what the client holds of `room`'s messages (left for good, or too much missed). */
  _forgetMessages(room) {
    this._held.delete(room);
    this._recentChanges.delete(room);
    this._historyAhead.delete(room);
  }

  /**
   * The result of an edit, delete, react or unreact (`frame`) as the app gets it: the message in
   * its current state (the one held, when that is as new), with the user's own reaction as the
   * request left it.
   */
  _changeResult(frame, result) {
    const room = frame.room;
    const held = this._held.get(room)?.get(result.message.seq);
    let message = this._message(room, result.message, held?.myReactions);
    if (held && held.version >= message.version) message = held;
    else if (message.replyTo) {
      const original = this._held.get(room)?.get(message.replyTo.seq);
      if (original) message.replyTo = quoteOf(message.replyTo, original);
    }
    if ((frame.type === "react" || frame.type === "unreact") && message.deletedAt == null) {
      const has = message.myReactions.includes(frame.emoji);
      if (frame.type === "react" && !has) message = { ...message, myReactions: [...message.myReactions, frame.emoji] };
      if (frame.type === "unreact" && has) {
        message = { ...message, myReactions: message.myReactions.filter((e) => e !== frame.emoji) };
      }
    }
    return { message, change: result.change ?? null, duplicate: !!result.duplicate };
  }

  /** Remembers the sender profiles a join result told (`{userId: {senderName, senderAvatarUrl}}`). */
  _learnProfiles(room, senders) {
    if (!senders) return;
    let profiles = this._profiles.get(room);
    if (!profiles) this._profiles.set(room, (profiles = new Map()));
    for (const [userId, p] of Object.entries(senders)) {
      profiles.set(userId, { name: p.senderName ?? null, avatarUrl: p.senderAvatarUrl ?? null });
    }
  }

  /** Records `seq` as seen; false when it was seen already. */
  _markSeen(room, seq) {
    const last = this._lastSeq.get(room);
    if (last != null && seq <= last) return false;
    this._setLastSeq(room, seq);
    return true;
  }

  /** Moves the room's resume point to `seq`, forgetting the history seqs it passes. */
  _setLastSeq(room, seq) {
    this._lastSeq.set(room, seq);
    const ahead = this._historyAhead.get(room);
    if (!ahead) return;
    for (const s of ahead) if (s <= seq) ahead.delete(s);
    if (ahead.size === 0) this._historyAhead.delete(room);
  }

  // ---- requests -----------------------------------------------------------------------------

  /** Sends a `join` for `state`, with `since` when this page has seen the room before. */
  _sendJoin(state) {
    if (state.inFlight || !this._ready) return;
    const frame = { type: "join", room: state.room };
    const since = this._lastSeq.get(state.room);
    if (since != null) frame.since = since;
    state.inFlight = true;
    const socket = this._socket;
    const id = this._nextId++;
    const current = () => this._rooms.get(state.room) === state && socket === this._socket;
    this._pending.set(id, {
      kind: "join",
      timer: setTimeout(() => this._checkAlive(socket, id), this._requestTimeoutMs),
      onDrop: () => {}, // re-sent by _resumeAll on the next socket
      resolve: (result) => {
        state.inFlight = false;
        if (!current()) return;
        this._learnProfiles(state.room, result.senders);
        // With missed > 0 the catch-up pushes follow and move the resume point themselves.
        if (result.missed === 0 && result.head != null) {
          const last = this._lastSeq.get(state.room);
          if (last == null || result.head > last) this._setLastSeq(state.room, result.head);
        }
        if (result.reload) {
          // What the client held missed changes: the app reloads the room from history.
          this._forgetMessages(state.room);
          for (const h of state.handlers) h.onReload?.({ room: state.room, head: result.head });
        }
        if (!state.settled) {
          state.settled = true;
          state.resolve(result);
        }
      },
      reject: (err) => {
        state.inFlight = false;
        if (!current()) return;
        if (TERMINAL_JOIN_CODES.has(err.code)) {
          this._rooms.delete(state.room);
          this._forgetMessages(state.room);
          if (state.settled) {
            for (const h of state.handlers) h.onRemoved?.({ room: state.room, reason: err.code });
            this._emit("error", err);
          } else {
            state.settled = true;
            state.reject(err);
          }
          return;
        }
        // unavailable / internal: the room stays wanted; try again after the advised wait.
        setTimeout(() => current() && this._sendJoin(state), err.retryAfterMs ?? 1000);
      },
    });
    this._write(socket, { ...frame, id });
  }

  /**
   * Queues a send or a change (`frame`) under `key` until the server answers it: transmitted now
   * when connected, again on every reconnection, and after `unavailable`/`internal`, until
   * answered or `sendTimeoutMs` passes. A second call with the same key shares the outcome.
   * `toResult` makes the promise's value from the server's result.
   */
  _enqueue(key, frame, toResult) {
    const details = { room: frame.room, clientMsgId: frame.clientMsgId, clientChangeId: frame.clientChangeId };
    if (this._closed) return Promise.reject(this._closedError());
    return new Promise((resolve, reject) => {
      const existing = this._outbox.get(key);
      if (existing) {
        // Already on its way: share the outcome instead of sending twice.
        existing.waiters.push({ resolve, reject });
        return;
      }
      if (!this._fits(frame)) {
        reject(new ChatGatewayError("frame_too_large", `${frame.type} too large to send`, details));
        return;
      }
      const retryWith = frame.clientMsgId ? "; retry with the same clientMsgId"
        : frame.clientChangeId ? "; retry with the same clientChangeId" : "";
      const entry = {
        key,
        frame,
        details,
        toResult,
        waiters: [{ resolve, reject }],
        deadline: setTimeout(() => {
          this._settle(entry, new ChatGatewayError("timeout", `${frame.type} not acknowledged in time${retryWith}`, details));
        }, this._sendTimeoutMs),
        requestId: null,
        retryTimer: null,
      };
      this._outbox.set(key, entry);
      if (this._ready) this._transmit(entry);
    });
  }

  /** Transmits a pending send or change on the current socket. */
  _transmit(entry) {
    if (!this._ready || this._outbox.get(entry.key) !== entry) return;
    const socket = this._socket;
    const id = this._nextId++;
    entry.requestId = id;
    this._pending.set(id, {
      kind: "outbox",
      timer: setTimeout(() => this._checkAlive(socket, id), this._requestTimeoutMs),
      onDrop: () => {
        entry.requestId = null; // re-sent by _resumeAll with the same key
      },
      resolve: (result) => {
        entry.requestId = null;
        this._settle(entry, null, entry.toResult(result));
      },
      reject: (err) => {
        entry.requestId = null;
        for (const [k, v] of Object.entries(entry.details)) if (v !== undefined) err[k] = v;
        if (RETRIABLE_SEND_CODES.has(err.code)) {
          const wait = err.retryAfterMs ?? backoffDelay(0, this._backoff);
          entry.retryTimer = setTimeout(() => {
            entry.retryTimer = null;
            this._transmit(entry);
          }, wait);
          return;
        }
        this._settle(entry, err);
      },
    });
    this._write(socket, { ...entry.frame, id });
  }

  _settle(entry, err, value) {
    if (this._outbox.get(entry.key) !== entry) return;
    this._outbox.delete(entry.key);
    clearTimeout(entry.deadline);
    clearTimeout(entry.retryTimer);
    if (entry.requestId != null) {
      const p = this._pending.get(entry.requestId);
      if (p) clearTimeout(p.timer);
      this._pending.delete(entry.requestId);
    }
    for (const w of entry.waiters) (err ? w.reject(err) : w.resolve(value));
  }

  /**
   * A join, send or change got no answer in time. If the socket has been silent all that while it is
   * presumed dead and reopened (the request is retried there); otherwise the server is just busy
   * and we keep waiting.
   */
  _checkAlive(socket, id) {
    const p = this._pending.get(id);
    if (!p || socket !== this._socket) return;
    if (Date.now() - this._lastReceivedAt >= this._requestTimeoutMs) {
      this._giveUp(socket, "request timed out");
    } else {
      p.timer = setTimeout(() => this._checkAlive(socket, id), this._requestTimeoutMs);
    }
  }

  /**
   * A one-shot request (history, leave, ping, refresh). Waits for the connection when
   * `queue` is true; times out after `requestTimeoutMs` in total.
   */
  _request(frame, { queue = true } = {}) {
    if (this._closed) return Promise.reject(this._closedError());
    if (!this._fits(frame)) {
      return Promise.reject(new ChatGatewayError("frame_too_large", "request too large", { room: frame.room }));
    }
    return new Promise((resolve, reject) => {
      let waiter = null;
      const deadline = setTimeout(() => {
        if (waiter) this._waiting = this._waiting.filter((w) => w !== waiter);
        if (id != null) this._pending.delete(id);
        reject(new ChatGatewayError("timeout", `${frame.type} timed out`, { room: frame.room }));
      }, this._requestTimeoutMs);
      let id = null;
      const transmit = () => {
        id = this._nextId++;
        this._pending.set(id, {
          kind: frame.type,
          timer: deadline,
          resolve,
          reject: (e) => {
            clearTimeout(deadline);
            reject(e);
          },
        });
        this._write(this._socket, { ...frame, id });
      };
      if (this._ready) transmit();
      else if (!queue) {
        clearTimeout(deadline);
        reject(new ChatGatewayError("not_connected", "not connected"));
      } else {
        waiter = {
          transmit,
          reject: (e) => {
            clearTimeout(deadline);
            reject(e);
          },
        };
        this._waiting.push(waiter);
      }
    });
  }

  _write(socket, frame) {
    try {
      socket.send(JSON.stringify(frame));
    } catch {
      // The socket is closing; its close event re-sends what must survive.
    }
  }

  /** Whether `frame` (plus a request id) stays under the server's frame limit. */
  _fits(frame) {
    const json = JSON.stringify({ ...frame, id: Number.MAX_SAFE_INTEGER });
    // Cheap bound first: UTF-8 uses at most 3 bytes per UTF-16 code unit.
    if (json.length * 3 <= this._maxFrameBytes) return true;
    return new TextEncoder().encode(json).length <= this._maxFrameBytes;
  }

  // ---- events -------------------------------------------------------------------------------

  _setState(state, details = {}) {
    const previous = this.state;
    this.state = state;
    if (previous === state && state !== ConnectionState.RECONNECTING) return;
    this._emit("state", { state, previous, ...details });
  }

  _emit(event, payload) {
    const set = this._listeners.get(event);
    if (!set || set.size === 0) {
      if (event === "error") console.warn("chat-gateway:", payload?.code, payload?.message);
      return;
    }
    for (const listener of [...set]) {
      try {
        listener(payload);
      } catch (e) {
        console.error("chat-gateway: listener threw", e);
      }
    }
  }

  _closedError() {
    return new ChatGatewayError("closed", "the client was closed");
  }
}

function normalizeHandler(handler) {
  return typeof handler === "function" ? { onMessage: handler } : handler;
}

function toError(e) {
  return new ChatGatewayError(e?.code ?? "internal", e?.message ?? "unknown error", {
    retryAfterMs: e?.retryAfterMs ?? undefined,
  });
}

/** A reply's quote in the client's shape: `excerpt` null and `deleted` true once the original is gone. */
function toQuote(q) {
  return { seq: q.seq, senderId: q.senderId, name: q.name ?? null, excerpt: q.excerpt ?? null, deleted: !!q.deleted };
}

/** The first characters of `content` a quote shows, counted as the server counts them. */
function excerptOf(content) {
  return Array.from(content).slice(0, QUOTE_CHARS).join("");
}

/** `quote` as of `original`, a message the client holds (in its newest known version). */
function quoteOf(quote, original) {
  const gone = original.deletedAt != null || original.moderationStatus === "REJECTED";
  return { ...quote, excerpt: gone ? null : excerptOf(original.content), deleted: gone };
}

/** `quote` after `change` of its original, when the original itself is not held. */
function quoteAfter(quote, change) {
  if (change.target !== quote.seq) return quote;
  if (change.kind === "edit") return { ...quote, excerpt: excerptOf(change.content), deleted: false };
  if (change.kind === "delete" || (change.kind === "moderation" && change.moderationStatus === "REJECTED")) {
    return { ...quote, excerpt: null, deleted: true };
  }
  return quote; // approved again: its content is not in the change; history shows it
}

function sameQuote(a, b) {
  return a.excerpt === b.excerpt && a.deleted === b.deleted;
}

/**
 * `m` after `change`, a new object (or `m` itself when nothing changes). The protocol's rule:
 * the change applies when its seq is above the message's version, which then becomes that seq.
 * The user's own reactions are a set the user's reaction changes add to and remove from, in
 * the order they come, whatever the version (history told the set as of its version; pushes
 * that follow it may be older, and leave the set as the newest of them does).
 */
function applyChange(m, change, userId) {
  const fresh = change.seq > m.version;
  const mine = change.kind === "reaction" && change.by === userId && userId != null;
  if (!fresh && !mine) return m;
  const next = { ...m, reactions: { ...m.reactions }, myReactions: [...m.myReactions] };
  if (mine) {
    const has = next.myReactions.includes(change.emoji);
    if (change.added && !has) next.myReactions.push(change.emoji);
    if (!change.added && has) next.myReactions = next.myReactions.filter((e) => e !== change.emoji);
  }
  if (fresh) {
    next.version = change.seq;
    switch (change.kind) {
      case "edit":
        next.content = change.content;
        next.editedAt = new Date(change.editedAt ?? change.ts).toISOString();
        break;
      case "delete":
        next.content = "";
        next.deletedAt = new Date(change.deletedAt ?? change.ts).toISOString();
        next.reactions = {};
        break;
      case "reaction":
        if (change.count > 0) next.reactions[change.emoji] = change.count;
        else delete next.reactions[change.emoji];
        break;
      case "moderation":
        next.moderationStatus = change.moderationStatus;
        break;
      default:
        break; // a kind this client does not know: newer server; history has it
    }
  }
  if (next.deletedAt != null) next.myReactions = [];
  return next;
}
