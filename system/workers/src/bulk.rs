//! Bulk projection writes for rebuilds: a replay feeds thousands of events per statement
//! instead of one transaction per event. Same rows as the live handlers write.

use chatstream_protocol::events::EventBody;
use chatstream_protocol::EventEnvelope;
use sqlx::PgPool;

/// Where an event was read from (the audit trail records it).
#[derive(Debug, Clone, Copy)]
pub struct Position<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// Inserts the CHAT_MESSAGE events of `events` into `search_messages`.
pub async fn search(pool: &PgPool, events: &[EventEnvelope]) -> Result<u64, sqlx::Error> {
    let msgs: Vec<(&EventEnvelope, &chatstream_protocol::events::ChatMessage)> = events
        .iter()
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
    // upserted only once per statement, so keep its last version.
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
    let col = |f: fn(&(&EventEnvelope, &chatstream_protocol::events::ChatMessage)) -> String| {
        msgs.iter().map(f).collect::<Vec<_>>()
    };
    let r = sqlx::query(
        "INSERT INTO search_messages (message_id, tenant, conversation_id, sender_id, seq, body, created_at_ms)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::bigint[])
         ON CONFLICT (message_id) DO UPDATE SET body = EXCLUDED.body",
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

/// Inserts the auditable events of `events` (with their Kafka positions) into `audit_logs`.
pub async fn audit(
    pool: &PgPool,
    events: &[(EventEnvelope, Position<'_>)],
) -> Result<u64, sqlx::Error> {
    let rows: Vec<&(EventEnvelope, Position<'_>)> = events
        .iter()
        .filter(|(e, _)| !e.id.is_empty() && !e.tenant.is_empty() && e.timestamp_ms > 0)
        .filter(|(e, _)| !matches!(e.body, EventBody::ChunkReceived(_) | EventBody::Typing(_)))
        .collect();
    if rows.is_empty() {
        return Ok(0);
    }
    let text = |f: fn(&EventEnvelope) -> String| rows.iter().map(|(e, _)| f(e)).collect::<Vec<_>>();
    let opt = |f: fn(&EventEnvelope) -> Option<String>| {
        rows.iter().map(|(e, _)| f(e)).collect::<Vec<_>>()
    };
    let payloads: Vec<String> = rows
        .iter()
        .map(|(e, _)| serde_json::to_string(&e.body).unwrap_or_else(|_| "null".into()))
        .collect();
    let r = sqlx::query(
        "INSERT INTO audit_logs (event_id, event_type, tenant, user_id, conversation_id, session_id, message_id,
                                 source_node, trace_id, ts_ms, kafka_topic, kafka_partition, kafka_offset, payload)
         SELECT e, t, te, u, c, s, m, n, tr, ts, kt, kp, ko, p::jsonb
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                     $9::text[], $10::bigint[], $11::text[], $12::int[], $13::bigint[], $14::text[])
              AS x(e, t, te, u, c, s, m, n, tr, ts, kt, kp, ko, p)
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(text(|e| e.id.clone()))
    .bind(text(|e| e.body.type_name().to_string()))
    .bind(text(|e| e.tenant.clone()))
    .bind(opt(|e| e.user_id.clone()))
    .bind(opt(|e| e.conversation_id.clone()))
    .bind(opt(|e| e.session_id.clone()))
    .bind(opt(|e| e.message_id.clone()))
    .bind(text(|e| e.source_node.clone()))
    .bind(text(|e| e.trace_id.clone()))
    .bind(rows.iter().map(|(e, _)| e.timestamp_ms).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, p)| p.topic.to_string()).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, p)| p.partition).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, p)| p.offset).collect::<Vec<_>>())
    .bind(payloads)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}
