-- Drops the tables the up migration created, children first, and only those: on a database the
-- gateway was put in front of, the app's tables and their data stay.
DO $$
DECLARE
    t TEXT;
BEGIN
    FOREACH t IN ARRAY ARRAY['ChatMessage', 'ChatRoomMember', 'ChatRoom', 'User'] LOOP
        IF EXISTS (SELECT 1 FROM "_chat_gateway_created" WHERE "table" = t) THEN
            EXECUTE format('DROP TABLE IF EXISTS %I', t);
        END IF;
    END LOOP;
END
$$;
DROP TABLE "_chat_gateway_created";
