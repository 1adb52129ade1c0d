-- The chat schema for the embedded SQLite default.
-- Same tables and column names as the Postgres schema of the app the gateway replaces
-- (quoted camelCase, TEXT ids), so the same SQL reads both. Timestamps are RFC 3339 TEXT.

-- Users are owned by the identity provider; the gateway only reads them (backfill).
CREATE TABLE IF NOT EXISTS "User" (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT,
    email       TEXT,
    image       TEXT,
    role        TEXT NOT NULL DEFAULT 'USER',
    "createdAt" TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- "lastSeq" is the room's last allocated message sequence: the next message gets lastSeq + 1,
-- allocated in the same transaction as its insert, which is what keeps sequences gap-free.
CREATE TABLE IF NOT EXISTS "ChatRoom" (
    id              TEXT PRIMARY KEY NOT NULL,
    name            TEXT NOT NULL,
    "lastMessageAt" TEXT,
    "lastSeq"       INTEGER NOT NULL DEFAULT 0,
    "createdAt"     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    "updatedAt"     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE IF NOT EXISTS "ChatRoomMember" (
    id           TEXT PRIMARY KEY NOT NULL,
    "roomId"     TEXT NOT NULL REFERENCES "ChatRoom"(id) ON DELETE CASCADE,
    "userId"     TEXT NOT NULL,
    "lastReadAt" TEXT,
    "joinedAt"   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE UNIQUE INDEX IF NOT EXISTS "ChatRoomMember_roomId_userId_key"
    ON "ChatRoomMember"("roomId", "userId");
CREATE INDEX IF NOT EXISTS "ChatRoomMember_userId_idx" ON "ChatRoomMember"("userId");

CREATE TABLE IF NOT EXISTS "ChatMessage" (
    id                 TEXT PRIMARY KEY NOT NULL,
    "roomId"           TEXT NOT NULL REFERENCES "ChatRoom"(id) ON DELETE CASCADE,
    "senderId"         TEXT NOT NULL,
    "senderName"       TEXT,
    "senderAvatarUrl"  TEXT,
    content            TEXT NOT NULL,
    "contentType"      TEXT NOT NULL DEFAULT 'TEXT',
    status             TEXT NOT NULL DEFAULT 'SENT',
    "moderationStatus" TEXT NOT NULL DEFAULT 'APPROVED',
    "createdAt"        TEXT NOT NULL,
    seq                INTEGER NOT NULL,
    "clientMsgId"      TEXT
);
-- Per-room sequence: unique, and the index every history and resume read walks.
CREATE UNIQUE INDEX IF NOT EXISTS "ChatMessage_roomId_seq_key" ON "ChatMessage"("roomId", seq);
-- Idempotent send: one message per (room, sender, clientMsgId). NULL keys never collide.
CREATE UNIQUE INDEX IF NOT EXISTS "ChatMessage_roomId_senderId_clientMsgId_key"
    ON "ChatMessage"("roomId", "senderId", "clientMsgId");
-- The seed's index, for readers that page by time.
CREATE INDEX IF NOT EXISTS "ChatMessage_roomId_createdAt_idx" ON "ChatMessage"("roomId", "createdAt" DESC);
