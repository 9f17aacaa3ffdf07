-- Worker projections: processed-event markers (idempotency), the audit trail, per-minute
-- analytics, the full-text search index, and pending prompts for the training export.

CREATE TABLE IF NOT EXISTS processed_events (
    consumer_group TEXT NOT NULL,
    event_id       TEXT NOT NULL,
    processed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (consumer_group, event_id)
);

CREATE TABLE IF NOT EXISTS audit_logs (
    event_id        TEXT PRIMARY KEY,
    event_type      TEXT NOT NULL,
    tenant          TEXT NOT NULL,
    user_id         TEXT,
    conversation_id TEXT,
    session_id      TEXT,
    message_id      TEXT,
    source_node     TEXT NOT NULL,
    trace_id        TEXT NOT NULL,
    ts_ms           BIGINT NOT NULL,
    kafka_topic     TEXT NOT NULL,
    kafka_partition INT NOT NULL,
    kafka_offset    BIGINT NOT NULL,
    payload         JSONB NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_logs_user ON audit_logs (user_id, ts_ms);
CREATE INDEX IF NOT EXISTS audit_logs_conversation ON audit_logs (conversation_id, ts_ms);
CREATE INDEX IF NOT EXISTS audit_logs_session ON audit_logs (session_id, ts_ms);
CREATE INDEX IF NOT EXISTS audit_logs_type_ts ON audit_logs (event_type, ts_ms);

CREATE TABLE IF NOT EXISTS analytics_minutes (
    minute_ms        BIGINT NOT NULL,
    event_type       TEXT NOT NULL,
    events           BIGINT NOT NULL DEFAULT 0,
    errors           BIGINT NOT NULL DEFAULT 0,
    -- Latency histogram of the minute: counts per bucket, upper bounds in ms given by
    -- chatstream_workers::handlers::LATENCY_BUCKETS_MS (the last bucket is open).
    latency_buckets  BIGINT[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (minute_ms, event_type)
);

CREATE TABLE IF NOT EXISTS search_messages (
    message_id      TEXT PRIMARY KEY,
    tenant          TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    sender_id       TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    body            TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    document        TSVECTOR GENERATED ALWAYS AS (to_tsvector('simple', body)) STORED
);
CREATE INDEX IF NOT EXISTS search_messages_document ON search_messages USING GIN (document);
CREATE INDEX IF NOT EXISTS search_messages_conversation ON search_messages (conversation_id, seq);

CREATE TABLE IF NOT EXISTS export_prompts (
    session_id    TEXT PRIMARY KEY,
    prompt        TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
