-- The chat app's schema, as Prisma creates it: quoted camelCase tables, TEXT ids, TIMESTAMP(3)
-- holding UTC. On a database the gateway is put in front of these tables already exist and every
-- CREATE here is skipped; on an empty database they are created, so the gateway also runs alone.

-- Which of the tables this migration created, so that its rollback drops those and never the
-- app's own tables (or their data).
CREATE TABLE IF NOT EXISTS "_chat_gateway_created" ("table" TEXT PRIMARY KEY);
INSERT INTO "_chat_gateway_created" ("table")
SELECT t FROM unnest(ARRAY['User', 'ChatRoom', 'ChatRoomMember', 'ChatMessage']) AS t
WHERE to_regclass(format('%I', t)) IS NULL
ON CONFLICT DO NOTHING;

-- Users are owned by the identity provider; the gateway only reads them (the backfill).
CREATE TABLE IF NOT EXISTS "User" (
    id          TEXT NOT NULL,
    name        TEXT,
    email       TEXT,
    image       TEXT,
    role        TEXT NOT NULL DEFAULT 'USER',
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "User_pkey" PRIMARY KEY (id)
);

-- "updatedAt" has no default, as with Prisma's @updatedAt: writers set it.
CREATE TABLE IF NOT EXISTS "ChatRoom" (
    id              TEXT NOT NULL,
    name            TEXT NOT NULL,
    "lastMessageAt" TIMESTAMP(3),
    "createdAt"     TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "updatedAt"     TIMESTAMP(3) NOT NULL,
    CONSTRAINT "ChatRoom_pkey" PRIMARY KEY (id)
);

CREATE TABLE IF NOT EXISTS "ChatRoomMember" (
    id           TEXT NOT NULL,
    "roomId"     TEXT NOT NULL,
    "userId"     TEXT NOT NULL,
    "lastReadAt" TIMESTAMP(3),
    "joinedAt"   TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "ChatRoomMember_pkey" PRIMARY KEY (id),
    CONSTRAINT "ChatRoomMember_roomId_fkey" FOREIGN KEY ("roomId")
        REFERENCES "ChatRoom"(id) ON DELETE CASCADE ON UPDATE CASCADE
);
CREATE UNIQUE INDEX IF NOT EXISTS "ChatRoomMember_roomId_userId_key"
    ON "ChatRoomMember"("roomId", "userId");
CREATE INDEX IF NOT EXISTS "ChatRoomMember_userId_idx" ON "ChatRoomMember"("userId");

-- "senderName" / "senderAvatarUrl" are the seed's denormalized sender (filled by the backfill for
-- rows written before them). Messages with "moderationStatus" = 'REJECTED' are never served.
CREATE TABLE IF NOT EXISTS "ChatMessage" (
    id                 TEXT NOT NULL,
    "roomId"           TEXT NOT NULL,
    "senderId"         TEXT NOT NULL,
    "senderName"       TEXT,
    "senderAvatarUrl"  TEXT,
    content            TEXT NOT NULL,
    "contentType"      TEXT NOT NULL DEFAULT 'TEXT',
    status             TEXT NOT NULL DEFAULT 'SENT',
    "moderationStatus" TEXT NOT NULL DEFAULT 'APPROVED',
    "createdAt"        TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "ChatMessage_pkey" PRIMARY KEY (id),
    CONSTRAINT "ChatMessage_roomId_fkey" FOREIGN KEY ("roomId")
        REFERENCES "ChatRoom"(id) ON DELETE CASCADE ON UPDATE CASCADE
);
