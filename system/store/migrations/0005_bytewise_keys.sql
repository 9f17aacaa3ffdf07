-- Byte-order ("C") collation for the workers' text keys.
--
-- These columns hold identifiers (event, message, session, conversation and user ids,
-- event types, group names), compared for equality and sorted only by the B-trees that
-- index them. PostgreSQL 15 compares text in any other collation through the C library
-- (C.UTF-8 included, and without abbreviated sort keys), which made every index build of a
-- projection rebuild and every marker or row insert of the live workers pay for it: the
-- five audit_logs index builds took about a fifth longer. Equality is unchanged (both
-- collations are deterministic), and for UTF-8 text byte order is code point order, which
-- is also what C.UTF-8 sorts by.
ALTER TABLE processed_events
    ALTER COLUMN consumer_group TYPE TEXT COLLATE "C",
    ALTER COLUMN event_id TYPE TEXT COLLATE "C";

ALTER TABLE audit_logs
    ALTER COLUMN event_id TYPE TEXT COLLATE "C",
    ALTER COLUMN event_type TYPE TEXT COLLATE "C",
    ALTER COLUMN user_id TYPE TEXT COLLATE "C",
    ALTER COLUMN conversation_id TYPE TEXT COLLATE "C",
    ALTER COLUMN session_id TYPE TEXT COLLATE "C";

ALTER TABLE search_messages
    ALTER COLUMN message_id TYPE TEXT COLLATE "C",
    ALTER COLUMN conversation_id TYPE TEXT COLLATE "C";

ALTER TABLE export_prompts
    ALTER COLUMN session_id TYPE TEXT COLLATE "C";
