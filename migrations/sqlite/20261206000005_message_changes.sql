-- Messages that change (proto-docs/protocol.md section 15): edits, deletions, reactions, replies
-- and moderation, each an event in the room's sequence.
-- The message's current state: "version" is the seq of its latest change (NULL: its own seq),
-- "reactions" a JSON object emoji -> count (NULL: none), "replyToSeq" the seq it replies to.
ALTER TABLE "ChatMessage" ADD COLUMN "editedAt" TEXT;
ALTER TABLE "ChatMessage" ADD COLUMN "deletedAt" TEXT;
ALTER TABLE "ChatMessage" ADD COLUMN version INTEGER;
ALTER TABLE "ChatMessage" ADD COLUMN "replyToSeq" INTEGER;
ALTER TABLE "ChatMessage" ADD COLUMN reactions TEXT;

-- One row per change, under the seq it took from the room ("ChatRoom"."lastSeq", like a
-- message): what resume and gap repair replay. "change" is the change object as pushed.
CREATE TABLE IF NOT EXISTS "ChatMessageChange" (
    "roomId"         TEXT NOT NULL REFERENCES "ChatRoom"(id) ON DELETE CASCADE,
    seq              INTEGER NOT NULL,
    "messageSeq"     INTEGER NOT NULL,
    kind             TEXT NOT NULL,
    "actorId"        TEXT NOT NULL,
    "clientChangeId" TEXT,
    change           TEXT NOT NULL,
    "createdAt"      TEXT NOT NULL,
    PRIMARY KEY ("roomId", seq)
) WITHOUT ROWID;
-- Idempotent edits: one change per (room, actor, clientChangeId). NULL keys never collide.
CREATE UNIQUE INDEX IF NOT EXISTS "ChatMessageChange_roomId_actorId_clientChangeId_key"
    ON "ChatMessageChange"("roomId", "actorId", "clientChangeId");

-- Who reacts with what: one row per (message, emoji, user).
CREATE TABLE IF NOT EXISTS "ChatReaction" (
    "roomId"     TEXT NOT NULL REFERENCES "ChatRoom"(id) ON DELETE CASCADE,
    "messageSeq" INTEGER NOT NULL,
    emoji        TEXT NOT NULL,
    "userId"     TEXT NOT NULL,
    "createdAt"  TEXT NOT NULL,
    PRIMARY KEY ("roomId", "messageSeq", emoji, "userId")
) WITHOUT ROWID;
-- A reader's own reactions on a history page.
CREATE INDEX IF NOT EXISTS "ChatReaction_roomId_userId_messageSeq_idx"
    ON "ChatReaction"("roomId", "userId", "messageSeq");
