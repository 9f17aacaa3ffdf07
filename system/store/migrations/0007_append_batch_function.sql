-- A group-commit batch of message appends as one call (`batch.rs`), so the send path's
-- transaction costs one round trip instead of five (BEGIN, the conversation locks, the
-- membership and idempotency checks, the inserts, COMMIT). On a machine with no idle core
-- every round trip is two more waits for a core, and every statement sent on its own is
-- parsed, planned and answered on its own. Called outside a transaction block: the call
-- returning is the commit.
--
-- p_* arrays hold the batch's messages in submission order (index i, from 1); o_* arrays
-- hold outbox rows, each naming in o_msg the message it belongs to. A payload built before
-- its message's seq was known carries p_seq_mark (`"seq":<placeholder>`), replaced here
-- with the seq the message gets.
--
-- Every message comes back once, in order, with its kind:
--   'n' stored now, as seq r_seq;
--   'x' refused: the sender is not a member, or the conversation is not in its tenant;
--   'd' its idempotency key was stored before: r_* describe the stored message;
--   's' the same key as message r_same_as of this batch, stored once, as that one.
CREATE OR REPLACE FUNCTION chatstream_append_batch(
    p_conversation_id TEXT[], p_tenant TEXT[], p_sender_id TEXT[], p_client_msg_id TEXT[],
    p_message_id TEXT[], p_body TEXT[], p_trace_id TEXT[], p_node_id TEXT[],
    p_created_at_ms BIGINT[],
    o_msg BIGINT[], o_event_id TEXT[], o_shard INT[], o_topic TEXT[], o_key TEXT[],
    o_payload TEXT[], o_node_id TEXT[], o_created_at_ms BIGINT[],
    p_seq_mark TEXT)
RETURNS TABLE (r_i BIGINT, r_kind TEXT, r_seq BIGINT, r_message_id TEXT, r_body TEXT,
               r_trace_id TEXT, r_created_at_ms BIGINT, r_same_as BIGINT)
LANGUAGE plpgsql
-- Planned once per connection: planning the statement below for every call cost more than
-- running it (0.57 ms against 0.34 ms for one message). A generic plan made on a run's
-- first, tiny tables used to be kept as they grew (README, "Generic plans"); with
-- sequential scans ruled out its only shape is index lookups, one per message, which is
-- right at any table size for a batch of at most a few hundred. (A generic plan expects
-- ten messages, so nothing below joins the batch with itself: that would be a nested loop,
-- quadratic in the batch.)
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $fn$
#variable_conflict use_column
BEGIN
    -- Sorted by id, as every batcher on every node locks: batches cannot deadlock.
    PERFORM 1 FROM conversations WHERE id = ANY(p_conversation_id) ORDER BY id FOR UPDATE;

    -- A statement of its own, so its snapshot is taken after the locks: a membership
    -- change or a same-key append that committed while this call waited is seen. Seqs are
    -- dense per conversation, in submission order.
    RETURN QUERY
    WITH r AS (
        SELECT * FROM UNNEST(p_conversation_id, p_tenant, p_sender_id, p_client_msg_id,
                             p_message_id, p_body, p_trace_id, p_node_id, p_created_at_ms)
             WITH ORDINALITY AS r(conversation_id, tenant, sender_id, client_msg_id, id,
                                  body, trace_id, node_id, created_at_ms, i)
    ), checked AS (
        SELECT r.*, c.last_seq,
               CASE WHEN c.id IS NULL OR m.user_id IS NULL THEN 'x'
                    WHEN e.id IS NOT NULL THEN 'd'
                    WHEN min(r.i) OVER same_key < r.i THEN 's'
                    ELSE 'n' END AS kind,
               min(r.i) OVER same_key AS first_i,
               e.id AS stored_id, e.seq AS stored_seq, e.body AS stored_body,
               e.trace_id AS stored_trace_id, e.created_at_ms AS stored_created_at_ms
        FROM r
        LEFT JOIN conversations c ON c.id = r.conversation_id AND c.tenant = r.tenant
        -- A member row has its conversation's tenant, which c has checked; leaving the
        -- tenant out lets the lookup take the primary key, not every conversation of the
        -- user (conversation_members_by_user).
        LEFT JOIN conversation_members m
               ON m.conversation_id = r.conversation_id AND m.user_id = r.sender_id
        LEFT JOIN messages e
               ON e.tenant = r.tenant AND e.sender_id = r.sender_id
              AND e.conversation_id = r.conversation_id AND e.client_msg_id = r.client_msg_id
        WINDOW same_key AS (PARTITION BY r.tenant, r.sender_id, r.conversation_id,
                                         r.client_msg_id)
    ), numbered AS (
        SELECT checked.*,
               CASE WHEN kind = 'n' THEN last_seq + row_number() OVER (
                   PARTITION BY conversation_id, kind = 'n' ORDER BY i) END AS seq
        FROM checked
    ), stored AS (
        -- No ON CONFLICT: a key stored since the check could not have been (it takes the
        -- same conversation lock); should it be anyway, the unique violation undoes the
        -- whole call, no seq is burnt, and the batch is tried again.
        INSERT INTO messages (id, conversation_id, seq, sender_id, client_msg_id, body,
                              trace_id, node_id, created_at_ms, tenant)
        SELECT id, conversation_id, seq, sender_id, client_msg_id, body, trace_id,
               node_id, created_at_ms, tenant
        FROM numbered WHERE kind = 'n'
    ), published AS (
        INSERT INTO outbox (event_id, shard, topic, key, payload, node_id, created_at_ms)
        SELECT o.event_id, o.shard, o.topic, o.key,
               replace(o.payload, p_seq_mark, '"seq":' || s.seqs[o.msg]), o.node_id,
               o.created_at_ms
        FROM UNNEST(o_msg, o_event_id, o_shard, o_topic, o_key, o_payload, o_node_id,
                    o_created_at_ms)
             AS o(msg, event_id, shard, topic, key, payload, node_id, created_at_ms),
             -- seqs[i]: message i's seq, null unless stored now.
             (SELECT array_agg(seq ORDER BY i) AS seqs FROM numbered) AS s
        WHERE s.seqs[o.msg] IS NOT NULL
        ON CONFLICT (event_id) DO NOTHING
    ), advanced AS (
        UPDATE conversations SET last_seq = top.seq
        FROM (SELECT conversation_id, max(seq) AS seq FROM numbered WHERE kind = 'n'
              GROUP BY conversation_id) AS top
        WHERE conversations.id = top.conversation_id
    )
    SELECT i, kind, CASE kind WHEN 'n' THEN seq WHEN 'd' THEN stored_seq END,
           stored_id, stored_body, stored_trace_id, stored_created_at_ms, first_i
    FROM numbered ORDER BY i;
END
$fn$;
