-- The seed's ("roomId", "createdAt" DESC) index serves the replaced app's readers, which page by
-- time, on its Postgres database. The embedded store pages by sequence ("ChatMessage_roomId_seq_key")
-- and never reads messages by time, so the index only made every send insert into one more B-tree,
-- at its room's page: in a group commit over many rooms, a page of write-ahead log per room.
DROP INDEX IF EXISTS "ChatMessage_roomId_createdAt_idx";
