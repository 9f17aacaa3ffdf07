-- Retention and refused events.
--
-- outbox_rejected: outbox rows Kafka refused for good (the record is larger than the
-- broker or the topic accepts). The relay moves such a row here, in the transaction that
-- marks the rest of its batch published, so its shard keeps going; the row keeps its
-- payload and the error for a person to inspect (and re-queue once fixed).
CREATE TABLE IF NOT EXISTS outbox_rejected (
    id              BIGINT PRIMARY KEY,
    event_id        TEXT NOT NULL,
    shard           INT NOT NULL,
    topic           TEXT NOT NULL,
    key             TEXT NOT NULL,
    payload         TEXT NOT NULL,
    node_id         TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    rejected_at_ms  BIGINT NOT NULL,
    error           TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_rejected_event ON outbox_rejected (event_id);

-- Retention prunes processed markers by age. Markers are appended in time order, so a
-- BRIN index finds the old ones for almost nothing on the workers' write path (a B-tree
-- would add a second index insert to every handled event).
CREATE INDEX IF NOT EXISTS processed_events_processed_at
    ON processed_events USING BRIN (processed_at_ms);
