-- The idempotency key's index led by the key instead of the room. Its lookups are equalities on
-- all three columns, served by either order. What changes is where a send's entry lands: led by
-- the room, every message of a group commit over many rooms dirtied its room's page of this
-- index, a page of write-ahead log each; led by the key, keys that begin with their time (the
-- SDK's, see proto-docs/protocol.md) land together at the index's right edge, a page or two for
-- the whole commit. Keys in any other form cost what they did.
DROP INDEX IF EXISTS "ChatMessage_roomId_senderId_clientMsgId_key";
CREATE UNIQUE INDEX IF NOT EXISTS "ChatMessage_clientMsgId_roomId_senderId_key"
    ON "ChatMessage"("clientMsgId", "roomId", "senderId");
