-- MAINTENANCE WINDOW, RUN BY HAND: `chat-gateway migrate --maintenance` (never by plain `migrate`).
--
-- The seed's change for a live database, plus the gateway's columns and indexes, written so that
-- nothing holds a write-blocking lock for long:
-- - each statement runs on its own, outside any transaction (CREATE INDEX CONCURRENTLY cannot run
--   inside one), in the order below; `migrate --maintenance` then applies the automatic
--   migrations, which find everything here already present and skip it;
-- - ADD COLUMN of a nullable column, or with a constant default, only changes the catalog, but
--   it needs a brief exclusive lock: lock_timeout makes it give up (and be retried) rather than
--   queue behind a long transaction while every other query queues behind it;
-- - a CONCURRENTLY build that fails leaves an INVALID index of that name: `migrate --maintenance`
--   drops it (DROP INDEX CONCURRENTLY) before building it again.
-- Every statement is idempotent; rerun the whole file after any failure. Rollback: the .down.sql
-- file beside this one. Runbook: docs/migration-runbook.md.
-- Format: one statement per `;` at the end of a line; `--` comments on their own lines only.

SET lock_timeout = '5s';
ALTER TABLE "ChatMessage" ADD COLUMN IF NOT EXISTS "senderName" TEXT;
ALTER TABLE "ChatMessage" ADD COLUMN IF NOT EXISTS "senderAvatarUrl" TEXT;
ALTER TABLE "ChatMessage" ADD COLUMN IF NOT EXISTS seq BIGINT;
ALTER TABLE "ChatMessage" ADD COLUMN IF NOT EXISTS "clientMsgId" TEXT;
ALTER TABLE "ChatRoom" ADD COLUMN IF NOT EXISTS "lastSeq" BIGINT NOT NULL DEFAULT 0;
RESET lock_timeout;

-- The seed's index, for the app's readers that page by time.
CREATE INDEX CONCURRENTLY IF NOT EXISTS "ChatMessage_roomId_createdAt_idx"
    ON "ChatMessage"("roomId", "createdAt" DESC);
-- The gateway's history and resume index (per-room sequence, unique).
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS "ChatMessage_roomId_seq_key"
    ON "ChatMessage"("roomId", seq);
-- Idempotent sends.
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS "ChatMessage_roomId_senderId_clientMsgId_key"
    ON "ChatMessage"("roomId", "senderId", "clientMsgId") WHERE "clientMsgId" IS NOT NULL;
-- The backfill's work list: rows not yet numbered.
CREATE INDEX CONCURRENTLY IF NOT EXISTS "ChatMessage_unsequenced_idx"
    ON "ChatMessage"("roomId", "createdAt", id) WHERE seq IS NULL;
