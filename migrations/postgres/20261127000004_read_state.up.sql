-- Read state: the highest sequence a member has read in the room. Unread count = the room's
-- "lastSeq" minus this, served without counting rows. A constant default: no table rewrite.
ALTER TABLE "ChatRoomMember" ADD COLUMN IF NOT EXISTS "lastReadSeq" BIGINT NOT NULL DEFAULT 0;
