-- Rollback of the read state column (read positions are lost; "lastReadAt" stays).
ALTER TABLE "ChatRoomMember" DROP COLUMN IF EXISTS "lastReadSeq";
