//! Bulk projection writes: a rebuild feeds thousands of events per statement, and the
//! live workers' batch path writes each polled batch with the same columns. Same rows as
//! the one-by-one handlers write.

use chatstream_protocol::events::{ChatMessage, EventBody};
use chatstream_protocol::EventEnvelope;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgPool, Postgres};

/// Where an event was read from (the audit trail records it).
#[derive(Debug, Clone, Copy)]
pub struct Position<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// Inserts the CHAT_MESSAGE events of `events` into `search_messages` (one statement).
pub async fn search<'a>(
    pool: &PgPool,
    events: impl IntoIterator<Item = &'a EventEnvelope>,
) -> Result<u64, sqlx::Error> {
    let msgs: Vec<(&EventEnvelope, &ChatMessage)> = events
        .into_iter()
        .filter(|e| !e.id.is_empty() && !e.tenant.is_empty() && e.timestamp_ms > 0)
        .filter_map(|e| match &e.body {
            EventBody::ChatMessage(m)
                if !m.message_id.is_empty() && !m.conversation_id.is_empty() =>
            {
                Some((e, m))
            }
            _ => None,
        })
        .collect();
    // At-least-once delivery can put one message in a batch twice; one row may be
    // upserted only once per statement, so keep its last version (as one-by-one upserts
    // in order would leave it).
    let mut last = std::collections::HashMap::new();
    for (i, (_, m)) in msgs.iter().enumerate() {
        last.insert(m.message_id.as_str(), i);
    }
    let msgs: Vec<_> = msgs
        .iter()
        .enumerate()
        .filter(|(i, (_, m))| last.get(m.message_id.as_str()) == Some(i))
        .map(|(_, x)| *x)
        .collect();
    if msgs.is_empty() {
        return Ok(0);
    }
    let col =
        |f: fn(&(&EventEnvelope, &ChatMessage)) -> String| msgs.iter().map(f).collect::<Vec<_>>();
    let r = sqlx::query(
        "INSERT INTO search_messages (message_id, tenant, conversation_id, sender_id, seq, body, created_at_ms)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::bigint[])
         ON CONFLICT (message_id) DO UPDATE SET body = EXCLUDED.body
           WHERE search_messages.body IS DISTINCT FROM EXCLUDED.body",
    )
    .bind(col(|(_, m)| m.message_id.clone()))
    .bind(col(|(e, _)| e.tenant.clone()))
    .bind(col(|(_, m)| m.conversation_id.clone()))
    .bind(col(|(_, m)| m.sender_id.clone()))
    .bind(msgs.iter().map(|(_, m)| m.seq).collect::<Vec<_>>())
    .bind(col(|(_, m)| m.body.clone()))
    .bind(msgs.iter().map(|(_, m)| m.created_at_ms).collect::<Vec<_>>())
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// Whether the audit trail keeps this event (CHUNK_RECEIVED and typing are too many, as
/// the seeds say).
pub fn auditable(e: &EventEnvelope) -> bool {
    !matches!(e.body, EventBody::ChunkReceived(_) | EventBody::Typing(_))
}

/// The audit row of each event, as one array per column for an UNNEST; `$1`..`$14` of
/// [`AUDIT_INPUT`].
pub struct AuditColumns {
    ids: Vec<String>,
    types: Vec<String>,
    tenants: Vec<String>,
    users: Vec<Option<String>>,
    conversations: Vec<Option<String>>,
    sessions: Vec<Option<String>>,
    messages: Vec<Option<String>>,
    nodes: Vec<String>,
    traces: Vec<String>,
    timestamps: Vec<i64>,
    topics: Vec<String>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    payloads: Vec<String>,
}

/// The rows of [`AuditColumns`] as a relation `x(e, t, te, u, c, s, m, n, tr, ts, kt, kp,
/// ko, p)` (`p` is the payload as text: cast it to jsonb).
pub const AUDIT_INPUT: &str =
    "UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
            $9::text[], $10::bigint[], $11::text[], $12::int[], $13::bigint[], $14::text[])
     AS x(e, t, te, u, c, s, m, n, tr, ts, kt, kp, ko, p)";

/// The `audit_logs` columns, in [`AUDIT_INPUT`]'s order.
pub const AUDIT_COLUMNS: &str =
    "event_id, event_type, tenant, user_id, conversation_id, session_id, message_id,
     source_node, trace_id, ts_ms, kafka_topic, kafka_partition, kafka_offset, payload";

impl AuditColumns {
    pub fn new<'a>(
        rows: impl IntoIterator<Item = (&'a EventEnvelope, Position<'a>)>,
    ) -> Result<Self, serde_json::Error> {
        let mut c = AuditColumns {
            ids: Vec::new(),
            types: Vec::new(),
            tenants: Vec::new(),
            users: Vec::new(),
            conversations: Vec::new(),
            sessions: Vec::new(),
            messages: Vec::new(),
            nodes: Vec::new(),
            traces: Vec::new(),
            timestamps: Vec::new(),
            topics: Vec::new(),
            partitions: Vec::new(),
            offsets: Vec::new(),
            payloads: Vec::new(),
        };
        for (e, p) in rows {
            c.payloads.push(serde_json::to_string(&e.body)?);
            c.ids.push(e.id.clone());
            c.types.push(e.body.type_name().to_string());
            c.tenants.push(e.tenant.clone());
            c.users.push(e.user_id.clone());
            c.conversations.push(e.conversation_id.clone());
            c.sessions.push(e.session_id.clone());
            c.messages.push(e.message_id.clone());
            c.nodes.push(e.source_node.clone());
            c.traces.push(e.trace_id.clone());
            c.timestamps.push(e.timestamp_ms);
            c.topics.push(p.topic.to_string());
            c.partitions.push(p.partition);
            c.offsets.push(p.offset);
        }
        Ok(c)
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Binds the columns as `$1`..`$14`.
    pub fn bind<'q>(self, q: Query<'q, Postgres, PgArguments>) -> Query<'q, Postgres, PgArguments> {
        q.bind(self.ids)
            .bind(self.types)
            .bind(self.tenants)
            .bind(self.users)
            .bind(self.conversations)
            .bind(self.sessions)
            .bind(self.messages)
            .bind(self.nodes)
            .bind(self.traces)
            .bind(self.timestamps)
            .bind(self.topics)
            .bind(self.partitions)
            .bind(self.offsets)
            .bind(self.payloads)
    }
}

/// Inserts the auditable events of `events` (with their Kafka positions) into `audit_logs`.
pub async fn audit(
    pool: &PgPool,
    events: &[(EventEnvelope, Position<'_>)],
) -> Result<u64, sqlx::Error> {
    let rows = events
        .iter()
        .filter(|(e, _)| !e.id.is_empty() && !e.tenant.is_empty() && e.timestamp_ms > 0)
        .filter(|(e, _)| auditable(e))
        .map(|(e, p)| (e, *p));
    let columns = AuditColumns::new(rows).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    if columns.is_empty() {
        return Ok(0);
    }
    let sql = format!(
        "INSERT INTO audit_logs ({AUDIT_COLUMNS})
         SELECT e, t, te, u, c, s, m, n, tr, ts, kt, kp, ko, p::jsonb FROM {AUDIT_INPUT}
         ON CONFLICT (event_id) DO NOTHING"
    );
    let r = columns.bind(sqlx::query(&sql)).execute(pool).await?;
    Ok(r.rows_affected())
}
