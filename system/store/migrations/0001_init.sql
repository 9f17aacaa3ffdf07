-- Conversations, membership, messages and the transactional outbox.

CREATE TABLE IF NOT EXISTS conversations (
    id            TEXT PRIMARY KEY,
    tenant        TEXT NOT NULL,
    last_seq      BIGINT NOT NULL DEFAULT 0,
    created_at_ms BIGINT NOT NULL
);

CREATE TABLE IF NOT EXISTS conversation_members (
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    user_id         TEXT NOT NULL,
    last_read_seq   BIGINT NOT NULL DEFAULT 0,
    joined_at_ms    BIGINT NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
);
CREATE INDEX IF NOT EXISTS conversation_members_by_user ON conversation_members (user_id);

CREATE TABLE IF NOT EXISTS messages (
    id              TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    seq             BIGINT NOT NULL,
    sender_id       TEXT NOT NULL,
    client_msg_id   TEXT NOT NULL,
    body            TEXT NOT NULL,
    trace_id        TEXT NOT NULL,
    node_id         TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    UNIQUE (conversation_id, seq),
    -- The idempotency key: a retried send finds the first one.
    UNIQUE (sender_id, client_msg_id)
);

-- Events waiting to be published to Kafka. A relay on any node publishes a shard's rows
-- in id order while holding that shard's advisory lock, so per-key order holds and a dead
-- node's rows are taken over as soon as its session (and lock) is gone.
CREATE TABLE IF NOT EXISTS outbox (
    id              BIGSERIAL PRIMARY KEY,
    event_id        TEXT NOT NULL UNIQUE,
    shard           INT NOT NULL,
    topic           TEXT NOT NULL,
    key             TEXT NOT NULL,
    payload         TEXT NOT NULL,
    node_id         TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    published_at_ms BIGINT
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (shard, id) WHERE published_at_ms IS NULL;
