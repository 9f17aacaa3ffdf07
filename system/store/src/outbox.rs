//! The transactional outbox: rows written in the same transaction as the state they
//! describe, published later by a relay. Rows are spread over shards by key; one relay at a
//! time owns a shard (a transaction-scoped advisory lock), so per-key order holds across
//! nodes and a crashed node's shards are free again the moment its session ends. A row
//! Kafka refuses for good (too large) is moved to `outbox_rejected` so its shard goes on.

use sqlx::postgres::PgPool;
use sqlx::{Postgres, Row, Transaction};

use crate::Result;

/// Number of outbox shards (relay parallelism across nodes).
pub const OUTBOX_SHARDS: i32 = 16;
/// Advisory lock ids are this base plus the shard number.
pub(crate) const ADVISORY_BASE: i64 = 0x5157_4c4c_0000; // "SQLL"

/// An event to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    pub event_id: String,
    pub topic: String,
    pub key: String,
    pub payload: String,
    pub node_id: String,
    pub created_at_ms: i64,
}

/// A queued event handed to the relay's publish function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEvent {
    pub id: i64,
    pub event_id: String,
    pub topic: String,
    pub key: String,
    pub payload: String,
}

/// The shard of a key (FNV-1a; stable across processes and releases).
pub fn shard_of(key: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % OUTBOX_SHARDS as u32) as i32
}

pub(crate) async fn insert(tx: &mut Transaction<'_, Postgres>, rows: &[OutboxRow]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let shards: Vec<i32> = rows.iter().map(|r| shard_of(&r.key)).collect();
    let col = |f: fn(&OutboxRow) -> &String| rows.iter().map(f).cloned().collect::<Vec<String>>();
    let created: Vec<i64> = rows.iter().map(|r| r.created_at_ms).collect();
    sqlx::query(
        "INSERT INTO outbox (event_id, shard, topic, key, payload, node_id, created_at_ms)
         SELECT * FROM UNNEST($1::text[], $2::int[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[])
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(col(|r| &r.event_id))
    .bind(shards)
    .bind(col(|r| &r.topic))
    .bind(col(|r| &r.key))
    .bind(col(|r| &r.payload))
    .bind(col(|r| &r.node_id))
    .bind(created)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Inserts the message and, only if it was new, its outbox rows: one statement. Returns
/// false when its idempotency key (tenant, sender, conversation, client_msg_id) existed.
pub(crate) async fn insert_message_with_events(
    tx: &mut Transaction<'_, Postgres>,
    msg: &crate::NewMessage,
    seq: i64,
    rows: &[OutboxRow],
) -> Result<bool> {
    let shards: Vec<i32> = rows.iter().map(|r| shard_of(&r.key)).collect();
    let col = |f: fn(&OutboxRow) -> &String| rows.iter().map(f).cloned().collect::<Vec<String>>();
    let created: Vec<i64> = rows.iter().map(|r| r.created_at_ms).collect();
    let inserted: i64 = sqlx::query_scalar(
        "WITH m AS (
            INSERT INTO messages (id, conversation_id, seq, sender_id, client_msg_id, body, trace_id, node_id, created_at_ms, tenant)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $17)
            ON CONFLICT (tenant, sender_id, conversation_id, client_msg_id) DO NOTHING
            RETURNING id
         ), o AS (
            INSERT INTO outbox (event_id, shard, topic, key, payload, node_id, created_at_ms)
            SELECT * FROM UNNEST($10::text[], $11::int[], $12::text[], $13::text[], $14::text[], $15::text[], $16::bigint[])
            WHERE EXISTS (SELECT 1 FROM m)
            ON CONFLICT (event_id) DO NOTHING
            RETURNING 1
         )
         SELECT count(*) FROM m",
    )
    .bind(&msg.message_id)
    .bind(&msg.conversation_id)
    .bind(seq)
    .bind(&msg.sender_id)
    .bind(&msg.client_msg_id)
    .bind(&msg.body)
    .bind(&msg.trace_id)
    .bind(&msg.node_id)
    .bind(msg.created_at_ms)
    .bind(col(|r| &r.event_id))
    .bind(shards)
    .bind(col(|r| &r.topic))
    .bind(col(|r| &r.key))
    .bind(col(|r| &r.payload))
    .bind(col(|r| &r.node_id))
    .bind(created)
    .bind(&msg.tenant)
    .fetch_one(&mut **tx)
    .await?;
    Ok(inserted == 1)
}

/// An event `publish` found Kafka refusing for good (e.g. larger than the broker or the
/// topic accepts): retrying can never succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The outbox row's id ([`PendingEvent::id`]).
    pub id: i64,
    pub error: String,
}

/// An outbox row moved aside to `outbox_rejected`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedEvent {
    pub id: i64,
    pub event_id: String,
    pub topic: String,
    pub key: String,
    pub payload_bytes: usize,
    pub error: String,
}

/// What one pass over a shard did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Rows published and marked.
    pub published: usize,
    /// Rows Kafka refused for good, moved to `outbox_rejected` (the shard goes on past them).
    pub rejected: Vec<RejectedEvent>,
}

pub(crate) async fn relay_shard<F, Fut, E>(
    pool: &PgPool,
    shard: i32,
    limit: i64,
    now_ms: i64,
    publish: F,
) -> Result<std::result::Result<Relayed, E>>
where
    F: FnOnce(Vec<PendingEvent>) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<Vec<Refusal>, E>>,
{
    let mut tx = pool.begin().await?;
    let owned: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(ADVISORY_BASE + i64::from(shard))
        .fetch_one(&mut *tx)
        .await?;
    if !owned {
        tx.rollback().await?;
        return Ok(Ok(Relayed::default()));
    }
    let rows = sqlx::query(
        "SELECT id, event_id, topic, key, payload FROM outbox
         WHERE shard = $1 AND published_at_ms IS NULL ORDER BY id LIMIT $2",
    )
    .bind(shard)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(Ok(Relayed::default()));
    }
    let events = rows
        .iter()
        .map(|r| {
            Ok(PendingEvent {
                id: r.try_get("id")?,
                event_id: r.try_get("event_id")?,
                topic: r.try_get("topic")?,
                key: r.try_get("key")?,
                payload: r.try_get("payload")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // What a refusal names, kept for the caller's log (the events move into `publish`).
    let described: std::collections::HashMap<i64, (String, String, String, usize)> = events
        .iter()
        .map(|e| {
            (
                e.id,
                (
                    e.event_id.clone(),
                    e.topic.clone(),
                    e.key.clone(),
                    e.payload.len(),
                ),
            )
        })
        .collect();
    let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
    let refusals = match publish(events).await {
        Ok(r) => r,
        Err(e) => {
            tx.rollback().await?;
            return Ok(Err(e));
        }
    };
    let refused: Vec<i64> = refusals
        .iter()
        .map(|r| r.id)
        .filter(|id| described.contains_key(id))
        .collect();
    let published: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|id| !refused.contains(id))
        .collect();
    if !refused.is_empty() {
        let errors: Vec<String> = refusals
            .iter()
            .filter(|r| described.contains_key(&r.id))
            .map(|r| r.error.clone())
            .collect();
        // Moved, not marked: a refused row must never count as published, and the shard's
        // next pass must not pick it up again.
        sqlx::query(
            "WITH moved AS (
                DELETE FROM outbox WHERE id = ANY($1)
                RETURNING id, event_id, shard, topic, key, payload, node_id, created_at_ms
             )
             INSERT INTO outbox_rejected (id, event_id, shard, topic, key, payload, node_id,
                                          created_at_ms, rejected_at_ms, error)
             SELECT m.id, m.event_id, m.shard, m.topic, m.key, m.payload, m.node_id,
                    m.created_at_ms, $3, r.error
             FROM moved m JOIN UNNEST($1::bigint[], $2::text[]) AS r(id, error) ON r.id = m.id
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&refused)
        .bind(&errors)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
    }
    if !published.is_empty() {
        sqlx::query("UPDATE outbox SET published_at_ms = $2 WHERE id = ANY($1)")
            .bind(&published)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    let rejected = refusals
        .into_iter()
        .filter_map(|r| {
            let (event_id, topic, key, payload_bytes) = described.get(&r.id)?.clone();
            Some(RejectedEvent {
                id: r.id,
                event_id,
                topic,
                key,
                payload_bytes,
                error: r.error,
            })
        })
        .collect();
    Ok(Ok(Relayed {
        published: published.len(),
        rejected,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_in_range() {
        assert_eq!(shard_of("conversation-1"), shard_of("conversation-1"));
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..1000 {
            let s = shard_of(&format!("c{i}"));
            assert!((0..OUTBOX_SHARDS).contains(&s));
            seen.insert(s);
        }
        assert_eq!(
            seen.len(),
            OUTBOX_SHARDS as usize,
            "keys spread over every shard"
        );
    }
}
