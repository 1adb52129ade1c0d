-- MAINTENANCE WINDOW, RUN BY HAND: rollback of 20261127000100_live_database.sql.
--
-- Run it with every gateway stopped, before reverting the automatic migrations (whose own DROPs
-- then find nothing left to drop), one statement at a time outside a transaction, for example:
--   psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -f migrations/postgres-maintenance/20261127000100_live_database.down.sql
-- (psql runs each statement in its own transaction unless given -1 / --single-transaction, which
-- DROP INDEX CONCURRENTLY refuses.) The app does not read any of these columns, so rolling the
-- gateway back does not require this file; it removes the columns' data (the denormalized
-- sender, which the backfill can recompute, and the gateway's sequence and idempotency keys).

DROP INDEX CONCURRENTLY IF EXISTS "ChatMessage_unsequenced_idx";
DROP INDEX CONCURRENTLY IF EXISTS "ChatMessage_roomId_senderId_clientMsgId_key";
DROP INDEX CONCURRENTLY IF EXISTS "ChatMessage_roomId_seq_key";
DROP INDEX CONCURRENTLY IF EXISTS "ChatMessage_roomId_createdAt_idx";
SET lock_timeout = '5s';
ALTER TABLE "ChatRoom" DROP COLUMN IF EXISTS "lastSeq";
ALTER TABLE "ChatMessage" DROP COLUMN IF EXISTS "clientMsgId";
ALTER TABLE "ChatMessage" DROP COLUMN IF EXISTS seq;
ALTER TABLE "ChatMessage" DROP COLUMN IF EXISTS "senderAvatarUrl";
ALTER TABLE "ChatMessage" DROP COLUMN IF EXISTS "senderName";
RESET lock_timeout;
