-- Rollback of messages that change: edits already made stay in "content"; the change log,
-- reactions, reply links, edit and deletion times are lost (deleted messages stay empty).
SET LOCAL lock_timeout = '3s';
DROP TABLE IF EXISTS "ChatReaction";
DROP TABLE IF EXISTS "ChatMessageChange";
ALTER TABLE "ChatMessage"
    DROP COLUMN IF EXISTS reactions,
    DROP COLUMN IF EXISTS "replyToSeq",
    DROP COLUMN IF EXISTS version,
    DROP COLUMN IF EXISTS "deletedAt",
    DROP COLUMN IF EXISTS "editedAt";
