-- Rows still here are side effects ("lastMessageAt") not yet queued: stop the gateways first, they
-- drain the outbox on shutdown.
DROP TABLE IF EXISTS "ChatOutbox";
