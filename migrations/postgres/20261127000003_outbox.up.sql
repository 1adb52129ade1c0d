-- Transactional outbox: every stored message writes one row here in the same statement as the
-- message itself. A relay moves rows to the job queue and deletes them once queued, so a process
-- that dies between committing a message and queueing its side effects loses none of them.
-- "claimedUntil" is a lease: a relay that claimed rows and died releases them when it expires.
CREATE TABLE IF NOT EXISTS "ChatOutbox" (
    id             BIGINT GENERATED ALWAYS AS IDENTITY,
    "roomId"       TEXT NOT NULL,
    seq            BIGINT NOT NULL,
    "messageId"    TEXT NOT NULL,
    "createdAt"    TIMESTAMP(3) NOT NULL,
    "claimedUntil" TIMESTAMP(3),
    CONSTRAINT "ChatOutbox_pkey" PRIMARY KEY (id)
);
