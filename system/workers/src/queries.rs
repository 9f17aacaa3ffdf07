//! The read side of the projections: the seeds' audit queries (by user; by conversation,
//! in order; errors in the last N hours; counts by event type), full-text search, and a
//! digest of a projection so a rebuilt one can be compared with the live one.

use serde::Serialize;
use sqlx::{PgPool, Row};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditRow {
    pub event_id: String,
    pub event_type: String,
    pub user_id: Option<String>,
    pub conversation_id: Option<String>,
    pub session_id: Option<String>,
    pub source_node: String,
    pub ts_ms: i64,
    pub payload: serde_json::Value,
}

fn audit_rows(rows: Vec<sqlx::postgres::PgRow>) -> Result<Vec<AuditRow>, sqlx::Error> {
    rows.into_iter()
        .map(|r| {
            Ok(AuditRow {
                event_id: r.try_get("event_id")?,
                event_type: r.try_get("event_type")?,
                user_id: r.try_get("user_id")?,
                conversation_id: r.try_get("conversation_id")?,
                session_id: r.try_get("session_id")?,
                source_node: r.try_get("source_node")?,
                ts_ms: r.try_get("ts_ms")?,
                payload: r.try_get("payload")?,
            })
        })
        .collect()
}

const COLUMNS: &str =
    "event_id, event_type, user_id, conversation_id, session_id, source_node, ts_ms, payload";

/// A user's events, newest first.
pub async fn audit_by_user(
    pool: &PgPool,
    user: &str,
    limit: i64,
) -> Result<Vec<AuditRow>, sqlx::Error> {
    let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM audit_logs WHERE user_id = $1 ORDER BY ts_ms DESC, event_id LIMIT $2"))
        .bind(user)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    audit_rows(rows)
}

/// A conversation's events in order (time, then Kafka position).
pub async fn audit_by_conversation(
    pool: &PgPool,
    conversation: &str,
    limit: i64,
) -> Result<Vec<AuditRow>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM audit_logs WHERE conversation_id = $1 ORDER BY ts_ms, kafka_partition, kafka_offset LIMIT $2"
    ))
    .bind(conversation)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    audit_rows(rows)
}

/// STREAM_ERROR events of the last `hours` hours, newest first.
pub async fn audit_errors(
    pool: &PgPool,
    hours: i64,
    now_ms: i64,
    limit: i64,
) -> Result<Vec<AuditRow>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM audit_logs WHERE event_type = 'STREAM_ERROR' AND ts_ms >= $1 ORDER BY ts_ms DESC LIMIT $2"
    ))
    .bind(now_ms - hours * 3_600_000)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    audit_rows(rows)
}

/// How many events of each type the audit trail holds.
pub async fn audit_counts(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT event_type, count(*) FROM audit_logs GROUP BY event_type ORDER BY event_type",
    )
    .fetch_all(pool)
    .await
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SearchHit {
    pub message_id: String,
    pub conversation_id: String,
    pub sender_id: String,
    pub seq: i64,
    pub body: String,
    pub rank: f32,
}

/// Matches a search ranks at most: the newest this many of a tenant, so a word in every
/// message costs as much as a rare one (ranking every match of a common word read and
/// ranked the whole table).
pub const SEARCH_CANDIDATES: i64 = 1_000;

/// How many of a tenant's newest messages the first, index-free look at a search reads.
pub const SEARCH_RECENT_WINDOW: i64 = 10_000;

type HitRow = (String, String, String, i64, String, f32, i64);

/// Full-text search over chat messages of a tenant (`websearch_to_tsquery` syntax:
/// words, "phrases", -exclusions, OR): the best-ranked of its newest
/// [`SEARCH_CANDIDATES`] matches, newest first among equal ranks.
///
/// Two steps, so that a common word's plan does not depend on statistics. The table
/// grows by thousands of rows a second and autovacuum's ANALYZE lags far behind; planned
/// from such statistics, one query choosing between the GIN index and the walk from the
/// newest took 0.36-0.45 s on average per search in `steady` (2 s at worst), a word in
/// every message included (in 1 ms once the table was analyzed). First the newest
/// matches among the newest [`SEARCH_RECENT_WINDOW`] messages, walking back from the
/// newest (it stops at the [`SEARCH_CANDIDATES`]th match): if they are that many, they
/// are the newest matches of all. Only a rarer word (fewer there) goes to the query that
/// may use the GIN index, where its matches are few.
pub async fn search(
    pool: &PgPool,
    tenant: &str,
    query: &str,
    limit: i64,
) -> Result<Vec<SearchHit>, sqlx::Error> {
    match search_recent(pool, tenant, query, limit).await? {
        Some(found) => Ok(found),
        None => search_indexed(pool, tenant, query, limit).await,
    }
}

/// The first step of [`search`]: its answer if the newest [`SEARCH_RECENT_WINDOW`]
/// messages hold at least [`SEARCH_CANDIDATES`] matches, None otherwise.
pub async fn search_recent(
    pool: &PgPool,
    tenant: &str,
    query: &str,
    limit: i64,
) -> Result<Option<Vec<SearchHit>>, sqlx::Error> {
    let sql = ranked(
        "(SELECT tenant, message_id, conversation_id, sender_id, seq, body, document, created_at_ms
          FROM search_messages WHERE tenant = $1
          ORDER BY created_at_ms DESC LIMIT $5) AS newest",
    );
    let recent: Vec<HitRow> = sqlx::query_as(&sql)
        .bind(tenant)
        .bind(query)
        .bind(limit)
        .bind(SEARCH_CANDIDATES)
        .bind(SEARCH_RECENT_WINDOW)
        .fetch_all(pool)
        .await?;
    Ok(recent
        .first()
        .is_some_and(|r| r.6 >= SEARCH_CANDIDATES)
        .then(|| hits(recent)))
}

/// The second step of [`search`]: the newest matches through the GIN index.
async fn search_indexed(
    pool: &PgPool,
    tenant: &str,
    query: &str,
    limit: i64,
) -> Result<Vec<SearchHit>, sqlx::Error> {
    let sql = ranked("search_messages");
    let rows: Vec<HitRow> = sqlx::query_as(&sql)
        // Planned with the query's words each time (not a cached generic plan).
        .persistent(false)
        .bind(tenant)
        .bind(query)
        .bind(limit)
        .bind(SEARCH_CANDIDATES)
        .fetch_all(pool)
        .await?;
    Ok(hits(rows))
}

/// Both steps' statement: the newest [`SEARCH_CANDIDATES`] (`$4`) matches of `$2` among
/// the rows of tenant `$1` in `source`, ranked, the best `$3`; `candidates` (counted
/// before the ranking's LIMIT) says how many matches there were.
fn ranked(source: &str) -> String {
    format!(
        "SELECT message_id, conversation_id, sender_id, seq, body, ts_rank(document, q) AS rank,
                count(*) OVER () AS candidates
         FROM (SELECT message_id, conversation_id, sender_id, seq, body, document, created_at_ms
               FROM {source}
               WHERE tenant = $1 AND document @@ websearch_to_tsquery('simple', $2)
               ORDER BY created_at_ms DESC
               LIMIT $4) AS matches,
              websearch_to_tsquery('simple', $2) AS q
         ORDER BY rank DESC, created_at_ms DESC LIMIT $3"
    )
}

fn hits(rows: Vec<HitRow>) -> Vec<SearchHit> {
    rows.into_iter()
        .map(
            |(message_id, conversation_id, sender_id, seq, body, rank, _)| SearchHit {
                message_id,
                conversation_id,
                sender_id,
                seq,
                body,
                rank,
            },
        )
        .collect()
}

/// One minute of one event type, as the analytics worker aggregated it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MinuteStats {
    pub minute_ms: i64,
    pub event_type: String,
    pub events: i64,
    pub errors: i64,
    pub error_rate: f64,
    /// Upper bounds of the latency buckets holding these quantiles (None: no latency).
    pub p50_ms: Option<i64>,
    pub p95_ms: Option<i64>,
    pub p99_ms: Option<i64>,
}

/// Per-minute volume, error rate and latency percentiles since `since_ms`.
pub async fn analytics_minutes(
    pool: &PgPool,
    since_ms: i64,
    limit: i64,
) -> Result<Vec<MinuteStats>, sqlx::Error> {
    let rows: Vec<(i64, String, i64, i64, Vec<i64>)> = sqlx::query_as(
        "SELECT minute_ms, event_type, events, errors, latency_buckets FROM analytics_minutes
         WHERE minute_ms >= $1 ORDER BY minute_ms, event_type LIMIT $2",
    )
    .bind(since_ms)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(minute_ms, event_type, events, errors, buckets)| {
            let q = |x| crate::handlers::bucket_quantile(&buckets, x);
            MinuteStats {
                minute_ms,
                event_type,
                events,
                errors,
                error_rate: if events > 0 {
                    errors as f64 / events as f64
                } else {
                    0.0
                },
                p50_ms: q(0.50),
                p95_ms: q(0.95),
                p99_ms: q(0.99),
            }
        })
        .collect())
}

/// An order-independent digest (md5 of the sorted rows) of a projection's content.
pub async fn digest(pool: &PgPool, projection: &str) -> Result<String, sqlx::Error> {
    let sql = match projection {
        "audit" => "SELECT md5(coalesce(string_agg(event_id || '|' || event_type || '|' || ts_ms || '|' || payload::text, ',' ORDER BY event_id), '')) FROM audit_logs",
        "search" => "SELECT md5(coalesce(string_agg(message_id || '|' || conversation_id || '|' || seq || '|' || body, ',' ORDER BY message_id), '')) FROM search_messages",
        "analytics" => "SELECT md5(coalesce(string_agg(minute_ms || '|' || event_type || '|' || events || '|' || errors, ',' ORDER BY minute_ms, event_type), '')) FROM analytics_minutes",
        other => return Err(sqlx::Error::Protocol(format!("unknown projection {other:?}; use audit, search or analytics"))),
    };
    sqlx::query_scalar(sql).fetch_one(pool).await
}
