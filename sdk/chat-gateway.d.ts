/**
 * chat-gateway client: one multiplexed WebSocket per page (per process in Node).
 * Wire contract: proto-docs/protocol.md.
 */

/**
 * A message, as the client hands it to the app: the REST message object (protocol section 4),
 * whatever the socket sent. Live pushes are lean on the wire; the client fills in the sender's
 * profile from what the server told it, and leaves `id` and `clientMsgId` null (a push is
 * identified by its room and `seq`; history and send results carry both). The fields of
 * messages that change (section 15) are always there: null, `{}` or `[]` when they do not apply.
 */
export interface ChatMessage {
  /** The message id; null in live pushes (use roomId + seq). */
  id: string | null;
  roomId: string;
  /** Per-room sequence: strictly increasing. A jump is not a loss (moderation). */
  seq: number;
  senderId: string;
  senderName: string | null;
  senderAvatarUrl: string | null;
  sender: { id: string; name: string | null; avatarUrl: string | null };
  content: string;
  contentType: string;
  status: string;
  moderationStatus: string;
  /** RFC 3339 UTC with milliseconds (from the socket's `ts`). */
  createdAt: string;
  /** The sender's idempotency key; null in live pushes. */
  clientMsgId: string | null;
  /** The message this one replies to; kept current for the replies the client holds. */
  replyTo: Quote | null;
  /** When it was last edited (RFC 3339), or null. */
  editedAt: string | null;
  /** When it was deleted (RFC 3339), or null; a deleted message's `content` is "". */
  deletedAt: string | null;
  /** The seq of its latest change; its own `seq` while it never changed. */
  version: number;
  /** Emoji -> how many users react with it, in the order the keys were first used. */
  reactions: Record<string, number>;
  /** The emoji the current user reacts with (from history, and the user's reaction changes). */
  myReactions: string[];
}

/** A reply's quote of the message it replies to. */
export interface Quote {
  /** The original's seq: scroll to it when it is loaded. */
  seq: number;
  senderId: string;
  /** The original sender's name. */
  name: string | null;
  /** The original's first 100 characters; null when it is deleted or rejected. */
  excerpt: string | null;
  deleted: boolean;
}

/** A change of a message (protocol section 15), as the `change` push carries it. */
export type Change = EditChange | DeleteChange | ReactionChange | ModerationChange;

interface ChangeBase {
  /** Its place in the room's sequence; the changed message's new `version`. */
  seq: number;
  /** The seq of the message it changes. */
  target: number;
  /** Who made it (the reacting user; the service for moderation). */
  by: string;
  /** When it was stored: milliseconds since the Unix epoch. */
  ts: number;
}

export interface EditChange extends ChangeBase {
  kind: "edit";
  content: string;
  /** Milliseconds since the Unix epoch. */
  editedAt: number;
}

export interface DeleteChange extends ChangeBase {
  kind: "delete";
  /** Milliseconds since the Unix epoch. */
  deletedAt: number;
}

export interface ReactionChange extends ChangeBase {
  kind: "reaction";
  emoji: string;
  /** `by` added the reaction (true) or removed it. */
  added: boolean;
  /** How many users now react with `emoji` (0: the key is gone). */
  count: number;
}

export interface ModerationChange extends ChangeBase {
  kind: "moderation";
  /** "REJECTED": remove the message from the screen. "APPROVED": it is served again. */
  moderationStatus: string;
}

/** What a room handler's `onChange` gets: each change of the room once, in seq order. */
export interface ChangeInfo {
  room: string;
  change: Change;
  /**
   * The changed message as the client now holds it (the change applied when its seq is above
   * the message's version), or null when the client does not hold it (never handed out, or no
   * longer kept): history serves it in its current state.
   */
  message: ChatMessage | null;
  /** The replies to it the client holds whose quote this edit, delete or rejection changed. */
  replies: ChatMessage[];
}

/** What an edit, delete, react or unreact resolves with. */
export interface ChangeResult {
  /** The message in its current state. */
  message: ChatMessage;
  /** The change this request stored; null when it stored nothing. */
  change: Change | null;
  /** Nothing new was stored: a retry, a repeated reaction, the content already so. */
  duplicate: boolean;
}

/** An edit's promise, carrying its idempotency key from the start. */
export type EditPromise = Promise<ChangeResult> & { clientChangeId: string };

export type ConnectionStateName = "connecting" | "open" | "reconnecting" | "closed";

export declare const ConnectionState: Readonly<{
  CONNECTING: "connecting";
  OPEN: "open";
  RECONNECTING: "reconnecting";
  CLOSED: "closed";
}>;

/** Close codes after which the same token is never used again (4002, 4003). */
export declare const TOKEN_CLOSE_CODES: readonly number[];

/** Why the token provider is asked for a token. */
export type TokenReason = "initial" | "expiring" | "expired" | "rejected" | "reconnect";

export type TokenProvider = (ctx: { reason: TokenReason }) => string | Promise<string>;

export interface ClientOptions {
  /** A fixed token, or a provider asked whenever a (fresh) token is needed. */
  token: string | TokenProvider;
  /** How long a request waits for its answer; history waits this long in total. Default 10 000. */
  requestTimeoutMs?: number;
  /**
   * How long opening the socket and authenticating may take before the attempt is abandoned and
   * retried. During a reconnect storm the gateway upgrades connections at its accept pace, so a
   * connect can take seconds. Default 30 000.
   */
  connectTimeoutMs?: number;
  /** How long a send or a change keeps being retried before rejecting with `timeout`. Default 30 000. */
  sendTimeoutMs?: number;
  /**
   * How many of the messages it handed out the client keeps per room, to apply changes to; the
   * least recently handed out or changed are forgotten first. Default 1000.
   */
  keptMessagesPerRoom?: number;
  /** Reconnect delays: initialMs * factor^attempt, capped at maxMs, with jitter. */
  backoff?: { initialMs?: number; maxMs?: number; factor?: number };
  /** The server's `limits.max_frame_bytes`; larger requests are refused locally. Default 65 536. */
  maxFrameBytes?: number;
  /**
   * WebSocket implementation (default: the global one). Where there is none (Node before 22),
   * pass one, e.g. `WebSocket` from the `ws` package; `connect` throws a TypeError otherwise.
   */
  WebSocket?: WebSocketConstructor;
}

/**
 * What the client needs of a WebSocket: the browsers', Node's (22 and later) and the `ws`
 * package's all fit. Text frames must reach `onmessage` as strings in `event.data`.
 */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface StateEvent {
  state: ConnectionStateName;
  previous: ConnectionStateName;
  /** Reconnecting: the attempt number (1-based) and the wait before it. */
  attempt?: number;
  delayMs?: number;
  /** Reconnecting: the close code (1006 on network loss, 0 when no socket was opened). */
  code?: number;
  reason?: string;
}

export interface JoinResult {
  room: string;
  /** Live pushes continue after this seq. */
  head: number;
  /** How many catch-up messages follow (delivered to the handler). */
  missed: number;
  /** Too much was missed to replay: the handler's onReload was called. */
  reload: boolean;
  /** The sender profiles the room's pushes may leave out (the client applies them itself). */
  senders: Record<string, { senderName: string | null; senderAvatarUrl: string | null }>;
}

export type RoomHandler =
  | ((message: ChatMessage) => void)
  | {
      /** Each new message of the room, once, in seq order (the user's own included). */
      onMessage?: (message: ChatMessage) => void;
      /** Too much was missed while away: fetch the latest history page and merge by seq. */
      onReload?: (info: { room: string; head: number }) => void;
      /** The server stopped delivering the room (membership removed, or a re-join refused). */
      onRemoved?: (info: { room: string; reason: string }) => void;
      /** Another member started or stopped typing; a start not refreshed in time ends by itself. */
      onTyping?: (info: TypingInfo) => void;
      /** A member (or this user on another device) marked the room read up to `seq`. */
      onRead?: (info: { room: string; userId: string; seq: number }) => void;
      /** Who came online and who left (coalesced by the server, at most once a second). */
      onPresence?: (info: PresenceChange) => void;
      /** A message of the room changed (edited, deleted, reacted to, moderated): once, in order. */
      onChange?: (info: ChangeInfo) => void;
    };

export interface TypingInfo {
  room: string;
  userId: string;
  name: string | null;
  typing: boolean;
  /** Starts only: the start ends by itself unless repeated within this many ms. */
  expiresInMs?: number;
  /** A stop the SDK made because the start was not refreshed within `expiresInMs`. */
  expired?: boolean;
}

export interface PresenceUser {
  userId: string;
  name: string | null;
}

export interface PresenceChange {
  room: string;
  /** Users online in the room now (a user with several tabs counts once). */
  online: number;
  joined: PresenceUser[];
  /** User ids that went offline. */
  left: string[];
}

export interface PresencePage {
  room: string;
  online: number;
  /** One page of the online users. */
  users: PresenceUser[];
  /** Pass as `cursor` for the next page; null when there is none. */
  nextCursor: string | null;
}

export interface RoomSummary {
  id: string;
  name: string | null;
  /** The room's last seq, changes included: pass the highest seq seen to markRead. */
  lastSeq: number;
  lastReadSeq: number;
  /** The visible messages after lastReadSeq (changes do not count; at most 1000). */
  unread: number;
  /** The newest visible message (a deleted one as its tombstone), or null. */
  lastMessage: ChatMessage | null;
}

export interface SendAck {
  id: string;
  seq: number;
  message: ChatMessage;
  /** The clientMsgId was already stored: this is the original message. */
  duplicate: boolean;
}

/** A send's promise, carrying its idempotency key from the start (for optimistic rendering). */
export type SendPromise = Promise<SendAck> & { clientMsgId: string };

export interface HistoryPage {
  room: string;
  /** Oldest first. */
  messages: ChatMessage[];
  /** Pass as `before` for the next older page; null when there is none. */
  nextBefore: number | null;
}

/** The protocol's error codes (section 11). */
export type ProtocolErrorCode =
  | "bad_frame"
  | "unknown_type"
  | "bad_request"
  | "content_empty"
  | "content_too_long"
  | "not_authenticated"
  | "invalid_token"
  | "token_expired"
  | "forbidden"
  | "room_not_found"
  | "not_found"
  | "conflict"
  | "too_many_rooms"
  | "not_joined"
  | "message_not_found"
  | "message_deleted"
  | "edit_window_closed"
  | "unknown_reaction"
  | "too_many_reactions"
  | "too_large"
  | "rate_limited"
  | "unavailable"
  | "internal";

/** The client's own error codes. */
export type ClientErrorCode =
  | "timeout"
  | "closed"
  | "not_connected"
  | "left"
  | "frame_too_large"
  | "auth_failed"
  | "token_provider_failed";

/** Any error code; a newer server may send codes not listed here. */
export type ErrorCode = ProtocolErrorCode | ClientErrorCode | (string & {});

/**
 * Error codes: the protocol's (`rate_limited`, `forbidden`, `message_deleted`, ...) and the
 * client's own: `timeout`, `closed`, `not_connected`, `left`, `frame_too_large`, `auth_failed`,
 * `token_provider_failed`.
 */
export declare class ChatGatewayError extends Error {
  constructor(
    code: ErrorCode,
    message: string,
    details?: { retryAfterMs?: number; clientMsgId?: string; clientChangeId?: string; room?: string },
  );
  readonly code: ErrorCode;
  /** Wait this long before retrying (`rate_limited`, `unavailable`). */
  readonly retryAfterMs?: number;
  /** Send errors: the key to retry with. */
  readonly clientMsgId?: string;
  /** Edit errors: the key to retry with. */
  readonly clientChangeId?: string;
  readonly room?: string;
}

export declare class ChatClient {
  private constructor(url: string, options: ClientOptions);
  /** The absolute ws(s) URL this client is connected to. */
  readonly url: string;
  readonly state: ConnectionStateName;
  /** The authenticated user id, once known. */
  readonly userId: string | null;

  on(event: "state", listener: (e: StateEvent) => void): () => void;
  on(event: "error", listener: (e: ChatGatewayError) => void): () => void;
  /** Resolves once authenticated. */
  ready(): Promise<void>;
  /** Joins a room (once per room; later calls add handlers and share the promise). */
  join(room: string, handler?: RoomHandler): Promise<JoinResult>;
  /** Leaves a room; its last seen seq is kept for a later join. */
  leave(room: string): Promise<void>;
  /**
   * Optimistic, idempotent send; retried across reconnects with the same clientMsgId.
   * `replyTo`: the seq of the message this one replies to.
   */
  send(room: string, content: string, options?: { clientMsgId?: string; replyTo?: number }): SendPromise;
  /** Edits the user's own message; idempotent by clientChangeId, retried across reconnects. */
  edit(room: string, seq: number, content: string, options?: { clientChangeId?: string }): EditPromise;
  /** Deletes a message (own; any, for ADMIN): it becomes a tombstone. */
  delete(room: string, seq: number): Promise<ChangeResult>;
  /** Adds the user's reaction (one emoji). */
  react(room: string, seq: number, emoji: string): Promise<ChangeResult>;
  /** Removes the user's reaction. */
  unreact(room: string, seq: number, emoji: string): Promise<ChangeResult>;
  /**
   * One page of history; identical requests in flight share one promise. In a joined room its
   * messages are held and kept current by the room's changes.
   */
  history(room: string, page?: { before?: number; limit?: number }): Promise<HistoryPage>;
  ping(): Promise<{ serverTime: string; rttMs: number }>;
  /** Rooms joined or being joined on this client. */
  joinedRooms(): string[];
  /** The user's rooms, most recently active first, with unread counts and last message. */
  rooms(options?: { limit?: number }): Promise<{ rooms: RoomSummary[] }>;
  /** Typing on/off in a joined room; repeated while on, ended on send and leave. Never throws. */
  typing(room: string, isTyping?: boolean): void;
  /** Marks a room read up to seq; at most one mark per room per 500 ms (the highest seq). */
  markRead(room: string, seq: number): Promise<void>;
  /** One page of the users online in a room, with the full online count. */
  presence(room: string, page?: { cursor?: string; limit?: number }): Promise<PresencePage>;
  /** Closes for good; the next connect() creates a new client. */
  close(): void;
}

/**
 * The page's one client for `url` (default `/ws` on the page's host). Where there is no page
 * (Node), `url` must be absolute: `ws://host:port/ws` (or `wss:`, `http:`, `https:`).
 * Throws a TypeError without `options.token` on the first call for a URL, for a URL it cannot
 * use, and when there is no WebSocket implementation.
 */
export declare function connect(url?: string, options?: ClientOptions): ChatClient;
/** Same as connect. */
export declare const getClient: typeof connect;
/** The absolute ws(s) URL that keys the client registry; relative URLs need a page. */
export declare function normalizeUrl(url?: string): string;
/** A new idempotency key for a send: the time first (milliseconds, 12 hex digits), then random. */
export declare function newClientMsgId(): string;
/** Reconnect delay for a 0-based attempt: exponential, capped, equal jitter. */
export declare function backoffDelay(
  attempt: number,
  backoff: { initialMs: number; maxMs: number; factor: number },
  random?: () => number,
): number;
