-- Removes the gateway's sequence and idempotency key. "senderName", "senderAvatarUrl" and the
-- ("roomId", "createdAt") index are the seed's and stay (the maintenance rollback drops them).
DROP INDEX IF EXISTS "ChatMessage_unsequenced_idx";
DROP INDEX IF EXISTS "ChatMessage_roomId_senderId_clientMsgId_key";
DROP INDEX IF EXISTS "ChatMessage_roomId_seq_key";
ALTER TABLE "ChatMessage" DROP COLUMN IF EXISTS "clientMsgId";
ALTER TABLE "ChatMessage" DROP COLUMN IF EXISTS seq;
ALTER TABLE "ChatRoom" DROP COLUMN IF EXISTS "lastSeq";
