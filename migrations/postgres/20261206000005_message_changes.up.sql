-- Messages that change (proto-docs/protocol.md section 15): edits, deletions, reactions, replies
-- and moderation, each an event in the room's sequence.
--
-- Safe on a live "ChatMessage": nullable columns without a default are a catalog change (no table
-- rewrite, no scan), and the new tables and their indexes are empty. The ALTERs still take an
-- ACCESS EXCLUSIVE lock for an instant; `lock_timeout` makes them give up (and the migration
-- fail, to be run again) rather than queue behind a long transaction, which would block every
-- reader and writer of the table behind them (docs/migration-runbook.md).
SET LOCAL lock_timeout = '3s';

-- The message's current state: "version" is the seq of its latest change (NULL: its own seq),
-- "reactions" a JSON object emoji -> count (NULL: none), "replyToSeq" the seq it replies to.
ALTER TABLE "ChatMessage"
    ADD COLUMN IF NOT EXISTS "editedAt" TIMESTAMP(3),
    ADD COLUMN IF NOT EXISTS "deletedAt" TIMESTAMP(3),
    ADD COLUMN IF NOT EXISTS version BIGINT,
    ADD COLUMN IF NOT EXISTS "replyToSeq" BIGINT,
    ADD COLUMN IF NOT EXISTS reactions TEXT;

-- One row per change, under the seq it took from the room ("ChatRoom"."lastSeq", like a
-- message): what resume and gap repair replay. "change" is the change object as pushed.
CREATE TABLE IF NOT EXISTS "ChatMessageChange" (
    "roomId"         TEXT NOT NULL REFERENCES "ChatRoom"(id) ON DELETE CASCADE,
    seq              BIGINT NOT NULL,
    "messageSeq"     BIGINT NOT NULL,
    kind             TEXT NOT NULL,
    "actorId"        TEXT NOT NULL,
    "clientChangeId" TEXT,
    change           TEXT NOT NULL,
    "createdAt"      TIMESTAMP(3) NOT NULL,
    PRIMARY KEY ("roomId", seq)
);
-- Idempotent edits: one change per (room, actor, clientChangeId). NULL keys never collide.
CREATE UNIQUE INDEX IF NOT EXISTS "ChatMessageChange_roomId_actorId_clientChangeId_key"
    ON "ChatMessageChange"("roomId", "actorId", "clientChangeId");

-- Who reacts with what: one row per (message, emoji, user).
CREATE TABLE IF NOT EXISTS "ChatReaction" (
    "roomId"     TEXT NOT NULL REFERENCES "ChatRoom"(id) ON DELETE CASCADE,
    "messageSeq" BIGINT NOT NULL,
    emoji        TEXT NOT NULL,
    "userId"     TEXT NOT NULL,
    "createdAt"  TIMESTAMP(3) NOT NULL,
    PRIMARY KEY ("roomId", "messageSeq", emoji, "userId")
);
-- A reader's own reactions on a history page.
CREATE INDEX IF NOT EXISTS "ChatReaction_roomId_userId_messageSeq_idx"
    ON "ChatReaction"("roomId", "userId", "messageSeq");
