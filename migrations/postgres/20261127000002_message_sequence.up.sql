-- What the gateway adds to the chat schema. Every statement is a no-op where it already exists, so
-- this is safe to run twice and after the maintenance-window file
-- (migrations/postgres-maintenance), which adds the same columns and builds the same indexes
-- CONCURRENTLY on a live table. `chat-gateway migrate` refuses to run this on a "ChatMessage" that
-- holds rows but lacks the sequence index: a plain CREATE INDEX would block writes while it builds.

-- The room's last allocated message sequence. A send increments it and inserts the message in one
-- statement; the row lock taken by that UPDATE is what keeps a room's sequence gap-free.
ALTER TABLE "ChatRoom" ADD COLUMN IF NOT EXISTS "lastSeq" BIGINT NOT NULL DEFAULT 0;

-- Nullable: rows written by the app before the gateway have none until `chat-gateway backfill`
-- numbers them. The gateway's own inserts always set it.
ALTER TABLE "ChatMessage" ADD COLUMN IF NOT EXISTS seq BIGINT;
-- The client's idempotency key: a retried send returns the stored original.
ALTER TABLE "ChatMessage" ADD COLUMN IF NOT EXISTS "clientMsgId" TEXT;
-- Present already on a fresh database (migration 1); added here for an empty app schema that
-- predates the seed. They are the seed's columns: the maintenance rollback drops them, not ours.
ALTER TABLE "ChatMessage" ADD COLUMN IF NOT EXISTS "senderName" TEXT;
ALTER TABLE "ChatMessage" ADD COLUMN IF NOT EXISTS "senderAvatarUrl" TEXT;

-- Per-room sequence: unique, and the index every history page and resume walks.
CREATE UNIQUE INDEX IF NOT EXISTS "ChatMessage_roomId_seq_key" ON "ChatMessage"("roomId", seq);
-- One message per (room, sender, clientMsgId). Partial: legacy rows have no key.
CREATE UNIQUE INDEX IF NOT EXISTS "ChatMessage_roomId_senderId_clientMsgId_key"
    ON "ChatMessage"("roomId", "senderId", "clientMsgId") WHERE "clientMsgId" IS NOT NULL;
-- The seed's index, for the app's readers that page by time (the gateway pages by seq).
CREATE INDEX IF NOT EXISTS "ChatMessage_roomId_createdAt_idx"
    ON "ChatMessage"("roomId", "createdAt" DESC);
-- The rows the backfill still has to number, in the order it numbers them. Empty once it is done.
CREATE INDEX IF NOT EXISTS "ChatMessage_unsequenced_idx"
    ON "ChatMessage"("roomId", "createdAt", id) WHERE seq IS NULL;
