-- The floor under the batch statement: three sends to three rooms as one UPDATE of their rooms and one
-- multi-row INSERT, with none of the batch statement's rules (no clientMsgId check, no lock order, one
-- message per room, no answer rows). Not a statement the gateway could run; what its rules cost.
\set room random(1, 100)
WITH input AS (SELECT * FROM unnest(ARRAY[gen_random_uuid()::text,gen_random_uuid()::text,gen_random_uuid()::text]::text[], ARRAY['r' || ((:room + 0) % 100 + 1),'r' || ((:room + 7) % 100 + 1),'r' || ((:room + 14) % 100 + 1)]::text[], ARRAY[gen_random_uuid()::text,gen_random_uuid()::text,gen_random_uuid()::text]::text[]) AS t(in_id, in_room, in_cmid)),
rooms AS (UPDATE "ChatRoom" r SET "lastSeq" = r."lastSeq" + 1, "lastMessageAt" = now()::timestamp, "updatedAt" = now()::timestamp WHERE r.id IN (SELECT in_room FROM input) RETURNING r.id, r."lastSeq")
INSERT INTO "ChatMessage" (id, "roomId", seq, "senderId", "senderName", "senderAvatarUrl", content, "contentType", status, "moderationStatus", "createdAt", "clientMsgId")
SELECT in_id, in_room, rooms."lastSeq", 'u0', 'name', 'https://example.com/avatars/0123456789012345678901234567890123456789.png', 'hello world some content of eighty chars or so, hello world some content', 'TEXT', 'SENT', 'APPROVED', now()::timestamp, in_cmid FROM input JOIN rooms ON rooms.id = input.in_room;
