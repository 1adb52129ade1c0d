-- The least a send can be: the room moved and the message inserted, one statement, one commit.
\set room random(1, 100)
\set n random(1, 9000000000000000)
WITH room AS (UPDATE "ChatRoom" SET "lastSeq" = "lastSeq" + 1 WHERE id = 'r' || :room RETURNING "lastSeq") INSERT INTO "ChatMessage" (id, "roomId", seq, "senderId", "senderName", "senderAvatarUrl", content, "createdAt", "clientMsgId")     SELECT 'm' || :n, 'r' || :room, "lastSeq", 'u' || :room, 'name', 'https://example.com/avatars/0123456789012345678901234567890123456789.png', 'hello world some content of eighty chars or so, hello world some content', now()::timestamp, 'c' || :n FROM room;
