-- Only edits carry a clientChangeId; reactions, deletions and moderation store NULL, and NULL keys
-- never collide. A partial index holds the keyed rows alone, so a reaction's change row is written
-- to one B-tree (the table's) instead of two. The batch read's key lookup ("clientChangeId" = ?)
-- implies NOT NULL, so SQLite still answers it from this index.
DROP INDEX IF EXISTS "ChatMessageChange_roomId_actorId_clientChangeId_key";
CREATE UNIQUE INDEX IF NOT EXISTS "ChatMessageChange_roomId_actorId_clientChangeId_key"
    ON "ChatMessageChange"("roomId", "actorId", "clientChangeId")
    WHERE "clientChangeId" IS NOT NULL;
