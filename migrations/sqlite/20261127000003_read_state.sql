-- Read state: the highest sequence a member has read in the room. Unread count = the room's
-- "lastSeq" minus this, served without counting rows.
ALTER TABLE "ChatRoomMember" ADD COLUMN "lastReadSeq" INTEGER NOT NULL DEFAULT 0;
