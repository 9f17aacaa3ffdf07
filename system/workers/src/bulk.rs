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

/// Whether an event has what every projection row needs (id, tenant, timestamp).
fn well_formed(e: &EventEnvelope) -> bool {
    !e.id.is_empty() && !e.tenant.is_empty() && e.timestamp_ms > 0
}

/// The message a search row is made of, if `e` makes one.
pub fn searchable(e: &EventEnvelope) -> Option<&ChatMessage> {
    match &e.body {
        EventBody::ChatMessage(m)
            if well_formed(e) && !m.message_id.is_empty() && !m.conversation_id.is_empty() =>
        {
            Some(m)
        }
        _ => None,
    }
}

/// The `search_messages` columns a row is written with (`document` is generated).
pub const SEARCH_COLUMNS: &str =
    "message_id, tenant, conversation_id, sender_id, seq, body, created_at_ms";

/// Appends `m`'s search row to `out` in COPY's text format, [`SEARCH_COLUMNS`]' order.
pub fn copy_search_row(out: &mut Vec<u8>, e: &EventEnvelope, m: &ChatMessage) {
    copy_text(out, &m.message_id);
    copy_text(out, &e.tenant);
    copy_text(out, &m.conversation_id);
    copy_text(out, &m.sender_id);
    copy_int(out, m.seq);
    copy_text(out, &m.body);
    copy_int(out, m.created_at_ms);
    end_row(out);
}

/// Inserts the CHAT_MESSAGE events of `events` into `search_messages` (one statement).
pub async fn search<'a>(
    pool: &PgPool,
    events: impl IntoIterator<Item = &'a EventEnvelope>,
) -> Result<u64, sqlx::Error> {
    let msgs: Vec<(&EventEnvelope, &ChatMessage)> = events
        .into_iter()
        .filter_map(|e| searchable(e).map(|m| (e, m)))
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
    let r = sqlx::query(&format!(
        "INSERT INTO search_messages ({SEARCH_COLUMNS})
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::bigint[])
         ON CONFLICT (message_id) DO UPDATE SET body = EXCLUDED.body
           WHERE search_messages.body IS DISTINCT FROM EXCLUDED.body"
    ))
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

/// Appends `e`'s audit row to `out` in COPY's text format, [`AUDIT_COLUMNS`]' order.
pub fn copy_audit_row(
    out: &mut Vec<u8>,
    e: &EventEnvelope,
    p: Position<'_>,
) -> Result<(), serde_json::Error> {
    let payload = serde_json::to_string(&e.body)?;
    copy_text(out, &e.id);
    copy_text(out, e.body.type_name());
    copy_text(out, &e.tenant);
    copy_opt(out, e.user_id.as_deref());
    copy_opt(out, e.conversation_id.as_deref());
    copy_opt(out, e.session_id.as_deref());
    copy_opt(out, e.message_id.as_deref());
    copy_text(out, &e.source_node);
    copy_text(out, &e.trace_id);
    copy_int(out, e.timestamp_ms);
    copy_text(out, p.topic);
    copy_int(out, i64::from(p.partition));
    copy_int(out, p.offset);
    copy_text(out, &payload);
    end_row(out);
    Ok(())
}

/// Whether the audit trail has a row for `e` (the rows [`audit`] writes).
pub fn audit_row_of(e: &EventEnvelope) -> bool {
    well_formed(e) && auditable(e)
}

/// One text field of a COPY row (tab-separated; backslash, tab, newline and carriage
/// return escaped, as COPY's text format requires).
fn copy_text(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escaped);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'\t');
}

fn copy_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => copy_text(out, s),
        None => out.extend_from_slice(b"\\N\t"),
    }
}

fn copy_int(out: &mut Vec<u8>, n: i64) {
    use std::io::Write;
    let _ = write!(out, "{n}\t");
}

/// Ends a row: its last field's tab becomes the newline.
fn end_row(out: &mut [u8]) {
    if let Some(last) = out.last_mut() {
        *last = b'\n';
    }
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
        .filter(|(e, _)| audit_row_of(e))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &str) -> EventEnvelope {
        EventEnvelope {
            id: "e1".into(),
            version: 1,
            timestamp: "2026-01-01T00:00:00.000Z".into(),
            timestamp_ms: 1_000,
            tenant: "t1".into(),
            trace_id: "tr".into(),
            source_node: "node-1".into(),
            conversation_id: Some("conv".into()),
            session_id: None,
            user_id: Some("alice".into()),
            message_id: Some("m1".into()),
            replayed: false,
            body: EventBody::ChatMessage(ChatMessage {
                message_id: "m1".into(),
                client_msg_id: "c1".into(),
                conversation_id: "conv".into(),
                sender_id: "alice".into(),
                seq: 7,
                body: body.into(),
                created_at_ms: 1_000,
            }),
        }
    }

    #[test]
    fn copy_rows_escape_what_the_text_format_reads_as_special() {
        let e = message("a\tb\nc\\N\rd\\.");
        let m = searchable(&e).expect("a chat message makes a search row");
        let mut out = Vec::new();
        copy_search_row(&mut out, &e, m);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "m1\tt1\tconv\talice\t7\ta\\tb\\nc\\\\N\\rd\\\\.\t1000\n"
        );
    }

    #[test]
    fn an_absent_audit_field_is_copied_as_null() {
        let mut e = message("hi");
        e.user_id = None;
        let at = Position {
            topic: "chat-events",
            partition: 2,
            offset: 40,
        };
        let mut out = Vec::new();
        copy_audit_row(&mut out, &e, at).unwrap();
        let line = String::from_utf8(out).unwrap();
        let fields: Vec<&str> = line.trim_end_matches('\n').split('\t').collect();
        assert_eq!(fields.len(), 14, "{line}");
        assert_eq!(fields[0], "e1");
        assert_eq!(fields[1], "CHAT_MESSAGE");
        assert_eq!(fields[3], "\\N", "user_id");
        assert_eq!(&fields[10..13], ["chat-events", "2", "40"]);
        assert!(
            fields[13].contains("\"body\":\"hi\""),
            "payload: {}",
            fields[13]
        );
    }
}
