//! What each worker does with an event. Every projection write happens in one PostgreSQL
//! transaction with the event's processed marker (consumer group, event id), so a
//! redelivered event is skipped and nothing is counted twice. Database errors are sorted
//! by SQLSTATE ([`db_error`]): the event refused for good, or the database unwell.

use chatstream_protocol::events::{topic, EventBody};
use chatstream_protocol::EventEnvelope;
use sqlx::{PgPool, Postgres, Transaction};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use crate::bulk;
use crate::consumer::{BatchOutcome, HandleError, Handled, Handler, RecordMeta};

fn transient(e: impl std::fmt::Display) -> HandleError {
    HandleError::Transient(e.to_string())
}

/// SQLSTATE classes that mean the database refused this event's data, not that it is
/// unwell: 22 data exception (e.g. a NUL byte in text or JSONB, a number out of range),
/// 23 integrity constraint violation, 54 program limit exceeded (e.g. a tsvector or an
/// index row too large). Retrying the same event cannot succeed.
pub fn is_permanent_sqlstate(code: &str) -> bool {
    matches!(code.get(..2), Some("22" | "23" | "54"))
}

/// Sorts a database error: the event refused ([`is_permanent_sqlstate`], or a value that
/// cannot be encoded) is [`HandleError::Permanent`] (tried a few times, then
/// dead-lettered); anything else — connection, pool, timeout, serialization failure,
/// shutdown, a table missing before migrations — is [`HandleError::Transient`].
pub fn db_error(e: sqlx::Error) -> HandleError {
    match &e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) if is_permanent_sqlstate(&code) => HandleError::Permanent(format!(
                "database refused the event (SQLSTATE {code}): {}",
                db.message()
            )),
            Some(code) => HandleError::Transient(format!("SQLSTATE {code}: {}", db.message())),
            None => HandleError::Transient(e.to_string()),
        },
        sqlx::Error::Encode(_) => HandleError::Permanent(format!("cannot encode the event: {e}")),
        _ => HandleError::Transient(e.to_string()),
    }
}

/// Now, as the processed markers record it: retention prunes markers by when they were
/// written (an event's own timestamp may be far older than its handling).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Claims `event_id` for `group` inside `tx`; false when it was already processed.
pub async fn claim(
    tx: &mut Transaction<'_, Postgres>,
    group: &str,
    event_id: &str,
) -> Result<bool, sqlx::Error> {
    let now = now_ms();
    let r = sqlx::query(
        "INSERT INTO processed_events (consumer_group, event_id, processed_at_ms) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(group)
    .bind(event_id)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Checks what every projection relies on; failures are poison (dead-lettered).
fn validate(e: &EventEnvelope) -> Result<(), HandleError> {
    if e.id.is_empty() || e.tenant.is_empty() {
        return Err(HandleError::Poison("event without id or tenant".into()));
    }
    if e.timestamp_ms <= 0 {
        return Err(HandleError::Poison(format!(
            "event {} has no valid timestamp_ms",
            e.id
        )));
    }
    Ok(())
}

/// The audit trail: every event except CHUNK_RECEIVED (too many, as the seeds say) and
/// typing, into `audit_logs`.
pub struct Audit {
    pub pool: PgPool,
    pub group: String,
}

impl Handler for Audit {
    fn name(&self) -> &str {
        "audit"
    }

    fn topics(&self) -> Vec<String> {
        [
            topic::CHAT_EVENTS,
            topic::STREAM_EVENTS,
            topic::MESSAGE_STATUS_EVENTS,
            topic::NOTIFICATIONS,
        ]
        .map(String::from)
        .to_vec()
    }

    async fn handle(&self, e: &EventEnvelope, meta: &RecordMeta) -> Result<Handled, HandleError> {
        validate(e)?;
        if matches!(e.body, EventBody::ChunkReceived(_) | EventBody::Typing(_)) {
            return Ok(Handled::Skipped);
        }
        let payload =
            serde_json::to_value(&e.body).map_err(|err| HandleError::Poison(err.to_string()))?;
        // One statement (one round trip): the processed marker and the row together.
        let inserted = sqlx::query(
            "WITH claimed AS (
                INSERT INTO processed_events (consumer_group, event_id, processed_at_ms) VALUES ($15, $1, $16)
                ON CONFLICT DO NOTHING RETURNING 1
             )
             INSERT INTO audit_logs (event_id, event_type, tenant, user_id, conversation_id, session_id, message_id,
                                     source_node, trace_id, ts_ms, kafka_topic, kafka_partition, kafka_offset, payload)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14 WHERE EXISTS (SELECT 1 FROM claimed)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(&e.id)
        .bind(e.body.type_name())
        .bind(&e.tenant)
        .bind(&e.user_id)
        .bind(&e.conversation_id)
        .bind(&e.session_id)
        .bind(&e.message_id)
        .bind(&e.source_node)
        .bind(&e.trace_id)
        .bind(e.timestamp_ms)
        .bind(&meta.topic)
        .bind(meta.partition)
        .bind(meta.offset)
        .bind(payload)
        .bind(&self.group)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(if inserted.rows_affected() == 1 {
            Handled::Applied
        } else {
            Handled::Skipped
        })
    }

    const BATCHES: bool = true;

    async fn handle_batch(
        &self,
        events: &[(EventEnvelope, RecordMeta)],
    ) -> Result<BatchOutcome, HandleError> {
        for (e, _) in events {
            validate(e)?;
        }
        let mut seen = HashSet::new();
        let rows = events
            .iter()
            .filter(|(e, _)| bulk::auditable(e) && seen.insert(e.id.as_str()))
            .map(|(e, meta)| (e, meta.position()));
        let columns =
            bulk::AuditColumns::new(rows).map_err(|err| HandleError::Poison(err.to_string()))?;
        if columns.is_empty() {
            return Ok(BatchOutcome::skipped(events.len()));
        }
        // One statement: the markers of the batch and the rows of the events it claimed.
        let sql = format!(
            "WITH input AS (SELECT * FROM {input}),
                  claimed AS (
                    INSERT INTO processed_events (consumer_group, event_id, processed_at_ms)
                    SELECT $15, e, $16 FROM input ON CONFLICT DO NOTHING RETURNING event_id
                  )
             INSERT INTO audit_logs ({columns})
             SELECT e, t, te, u, c, s, m, n, tr, ts, kt, kp, ko, p::jsonb
             FROM input JOIN claimed ON claimed.event_id = input.e
             ON CONFLICT (event_id) DO NOTHING",
            input = bulk::AUDIT_INPUT,
            columns = bulk::AUDIT_COLUMNS,
        );
        let inserted = columns
            .bind(sqlx::query(&sql))
            .bind(&self.group)
            .bind(now_ms())
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(BatchOutcome::applied(
            inserted.rows_affected(),
            events.len(),
        ))
    }
}

/// Analytics: the seeds' metric set as Prometheus metrics, and per-minute aggregates
/// (volume, latency samples for percentiles, errors) in `analytics_minutes`.
pub struct Analytics {
    pub pool: PgPool,
    pub group: String,
    /// Test sabotage: skip the processed marker, so a redelivery counts twice.
    pub unsafe_no_dedupe: bool,
}

impl Analytics {
    fn record_metrics(e: &EventEnvelope) {
        match &e.body {
            EventBody::SessionStarted(_) => metrics::counter!("sessions.started").increment(1),
            EventBody::StreamCompleted(c) => {
                metrics::counter!("streams.completed").increment(1);
                metrics::histogram!("stream.duration").record(c.total_latency_ms as f64 / 1000.0);
                if c.total_latency_ms > 0 {
                    metrics::histogram!("stream.words_per_second")
                        .record(c.words as f64 * 1000.0 / c.total_latency_ms as f64);
                }
                metrics::histogram!("message.length").record(c.content_length as f64);
                metrics::histogram!("message.chunks").record(c.total_chunks as f64);
            }
            EventBody::ChunkReceived(c) => {
                metrics::counter!("chunks.received").increment(1);
                metrics::histogram!("chunk.size").record(c.content_length as f64);
            }
            EventBody::StreamError(err) => {
                metrics::counter!("errors.stream", "type" => err.error_code.clone()).increment(1)
            }
            EventBody::RecoveryAttempt(r) if r.success => {
                metrics::counter!("recovery.success").increment(1)
            }
            EventBody::RecoveryAttempt(_) => metrics::counter!("recovery.failed").increment(1),
            _ => {}
        }
    }

    fn latency_ms(e: &EventEnvelope) -> Option<i64> {
        match &e.body {
            EventBody::StreamCompleted(c) => Some(c.total_latency_ms as i64),
            EventBody::ChunkReceived(c) => Some(c.latency_ms as i64),
            _ => None,
        }
    }
}

impl Handler for Analytics {
    fn name(&self) -> &str {
        "analytics"
    }

    fn topics(&self) -> Vec<String> {
        [topic::CHAT_EVENTS, topic::STREAM_EVENTS]
            .map(String::from)
            .to_vec()
    }

    async fn handle(&self, e: &EventEnvelope, _meta: &RecordMeta) -> Result<Handled, HandleError> {
        validate(e)?;
        let minute = e.timestamp_ms - e.timestamp_ms.rem_euclid(60_000);
        let is_error = matches!(e.body, EventBody::StreamError(_)) as i64;
        let mut buckets = vec![0i64; LATENCY_BUCKETS_MS.len() + 1];
        if let Some(ms) = Self::latency_ms(e) {
            buckets[latency_bucket(ms)] = 1;
        }
        // One statement: the processed marker (unless sabotaged) and the aggregate together.
        let claim = if self.unsafe_no_dedupe {
            "SELECT 1"
        } else {
            "INSERT INTO processed_events (consumer_group, event_id, processed_at_ms) VALUES ($5, $6, $7)
             ON CONFLICT DO NOTHING RETURNING 1"
        };
        let applied = sqlx::query(&format!(
            "WITH claimed AS ({claim})
             INSERT INTO analytics_minutes (minute_ms, event_type, events, errors, latency_buckets)
             SELECT $1, $2, 1, $3, $4 WHERE EXISTS (SELECT 1 FROM claimed)
             ON CONFLICT (minute_ms, event_type) DO UPDATE SET
               events = analytics_minutes.events + 1,
               errors = analytics_minutes.errors + EXCLUDED.errors,
               latency_buckets = ARRAY(
                 SELECT coalesce(a, 0) + coalesce(b, 0)
                 FROM UNNEST(analytics_minutes.latency_buckets, EXCLUDED.latency_buckets) AS t(a, b))"
        ))
        .bind(minute)
        .bind(e.body.type_name())
        .bind(is_error)
        .bind(&buckets)
        .bind(&self.group)
        .bind(&e.id)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        if applied.rows_affected() == 0 {
            return Ok(Handled::Skipped);
        }
        Self::record_metrics(e);
        Ok(Handled::Applied)
    }

    const BATCHES: bool = true;

    async fn handle_batch(
        &self,
        events: &[(EventEnvelope, RecordMeta)],
    ) -> Result<BatchOutcome, HandleError> {
        for (e, _) in events {
            validate(e)?;
        }
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        let counted: Vec<&EventEnvelope> = if self.unsafe_no_dedupe {
            events.iter().map(|(e, _)| e).collect()
        } else {
            let ids: Vec<&str> = events.iter().map(|(e, _)| e.id.as_str()).collect();
            let claimed: HashSet<String> = sqlx::query_scalar(
                "INSERT INTO processed_events (consumer_group, event_id, processed_at_ms)
                 SELECT $1, id, $2 FROM UNNEST($3::text[]) AS id
                 ON CONFLICT DO NOTHING RETURNING event_id",
            )
            .bind(&self.group)
            .bind(now_ms())
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?
            .into_iter()
            .collect();
            // Each claimed id counts once, even when the batch holds it twice.
            let mut first = HashSet::new();
            events
                .iter()
                .map(|(e, _)| e)
                .filter(|e| claimed.contains(&e.id) && first.insert(e.id.as_str()))
                .collect()
        };
        let minutes = MinuteAggregates::of(counted.iter().copied());
        if !minutes.is_empty() {
            minutes
                .bind(sqlx::query(UPSERT_MINUTES))
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        for e in &counted {
            Self::record_metrics(e);
        }
        Ok(BatchOutcome::applied(counted.len() as u64, events.len()))
    }
}

/// `[1, 0, 2]` as PostgreSQL's array literal `{1,0,2}` (bound as text and cast, since an
/// UNNEST of a two-dimensional array would yield numbers, not rows of arrays).
fn array_literal(values: &[i64]) -> String {
    let items: Vec<String> = values.iter().map(i64::to_string).collect();
    format!("{{{}}}", items.join(","))
}

/// Adds a batch's per-minute aggregates to `analytics_minutes`.
const UPSERT_MINUTES: &str = "INSERT INTO analytics_minutes (minute_ms, event_type, events, errors, latency_buckets)
     SELECT m, t, n, er, b::bigint[] FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $5::text[])
       AS x(m, t, n, er, b)
     ON CONFLICT (minute_ms, event_type) DO UPDATE SET
       events = analytics_minutes.events + EXCLUDED.events,
       errors = analytics_minutes.errors + EXCLUDED.errors,
       latency_buckets = ARRAY(
         SELECT coalesce(a, 0) + coalesce(b, 0)
         FROM UNNEST(analytics_minutes.latency_buckets, EXCLUDED.latency_buckets) AS t(a, b))";

/// Events, errors and latency buckets per (minute, event type), summed in memory so that
/// one statement adds a whole batch (one row may be upserted only once per statement).
#[derive(Default)]
struct MinuteAggregates(BTreeMap<(i64, &'static str), (i64, i64, Vec<i64>)>);

impl MinuteAggregates {
    fn of<'a>(events: impl IntoIterator<Item = &'a EventEnvelope>) -> Self {
        let mut agg = MinuteAggregates::default();
        for e in events {
            let minute = e.timestamp_ms - e.timestamp_ms.rem_euclid(60_000);
            let (n, errors, buckets) = agg
                .0
                .entry((minute, e.body.type_name()))
                .or_insert_with(|| (0, 0, vec![0; LATENCY_BUCKETS_MS.len() + 1]));
            *n += 1;
            *errors += matches!(e.body, EventBody::StreamError(_)) as i64;
            if let Some(ms) = Analytics::latency_ms(e) {
                buckets[latency_bucket(ms)] += 1;
            }
        }
        agg
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Binds `$1`..`$5` of [`UPSERT_MINUTES`] (each bucket array as a `{..}` literal).
    fn bind<'q>(
        self,
        q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
        let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((minute, kind), (n, errors, buckets)) in self.0 {
            cols.0.push(minute);
            cols.1.push(kind.to_string());
            cols.2.push(n);
            cols.3.push(errors);
            cols.4.push(array_literal(&buckets));
        }
        q.bind(cols.0)
            .bind(cols.1)
            .bind(cols.2)
            .bind(cols.3)
            .bind(cols.4)
    }
}

/// Upper bounds (ms) of the analytics latency buckets; a last, open bucket follows.
pub const LATENCY_BUCKETS_MS: &[i64] = &[
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000,
];

pub fn latency_bucket(ms: i64) -> usize {
    LATENCY_BUCKETS_MS
        .iter()
        .position(|b| ms <= *b)
        .unwrap_or(LATENCY_BUCKETS_MS.len())
}

/// The upper bound of the bucket holding quantile `q` of `buckets` (None when empty; the
/// open last bucket reports i64::MAX).
pub fn bucket_quantile(buckets: &[i64], q: f64) -> Option<i64> {
    let total: i64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as i64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(LATENCY_BUCKETS_MS.get(i).copied().unwrap_or(i64::MAX));
        }
    }
    None
}

/// The one-by-one search write: idempotent by message id (the last version wins; a
/// redelivery of the same text rewrites no row and no index entry).
const SEARCH_UPSERT: &str =
    "INSERT INTO search_messages (message_id, tenant, conversation_id, sender_id, seq, body, created_at_ms)
     VALUES ($1, $2, $3, $4, $5, $6, $7)
     ON CONFLICT (message_id) DO UPDATE SET body = EXCLUDED.body
       WHERE search_messages.body IS DISTINCT FROM EXCLUDED.body";

/// Writes one CHAT_MESSAGE event to `search_messages` with `sql` (`$1`..`$7`: message id,
/// tenant, conversation, sender, seq, body, created at); other events are skipped.
async fn index_one(pool: &PgPool, e: &EventEnvelope, sql: &str) -> Result<Handled, HandleError> {
    validate(e)?;
    let EventBody::ChatMessage(m) = &e.body else {
        return Ok(Handled::Skipped);
    };
    if m.message_id.is_empty() || m.conversation_id.is_empty() {
        return Err(HandleError::Poison(
            "CHAT_MESSAGE without message or conversation id".into(),
        ));
    }
    sqlx::query(sql)
        .bind(&m.message_id)
        .bind(&e.tenant)
        .bind(&m.conversation_id)
        .bind(&m.sender_id)
        .bind(m.seq)
        .bind(&m.body)
        .bind(m.created_at_ms)
        .execute(pool)
        .await
        .map_err(db_error)?;
    Ok(Handled::Applied)
}

/// Search: CHAT_MESSAGE events into a PostgreSQL full-text index (`search_messages`).
pub struct Search {
    pub pool: PgPool,
    pub group: String,
}

impl Handler for Search {
    fn name(&self) -> &str {
        "search"
    }

    fn topics(&self) -> Vec<String> {
        vec![topic::CHAT_EVENTS.to_string()]
    }

    async fn handle(&self, e: &EventEnvelope, _meta: &RecordMeta) -> Result<Handled, HandleError> {
        index_one(&self.pool, e, SEARCH_UPSERT).await
    }

    const BATCHES: bool = true;

    async fn handle_batch(
        &self,
        events: &[(EventEnvelope, RecordMeta)],
    ) -> Result<BatchOutcome, HandleError> {
        let mut messages = 0;
        for (e, _) in events {
            validate(e)?;
            if let EventBody::ChatMessage(m) = &e.body {
                if m.message_id.is_empty() || m.conversation_id.is_empty() {
                    return Err(HandleError::Poison(
                        "CHAT_MESSAGE without message or conversation id".into(),
                    ));
                }
                messages += 1;
            }
        }
        // The upsert is idempotent by message id: no marker needed, as one by one.
        bulk::search(&self.pool, events.iter().map(|(e, _)| e))
            .await
            .map_err(db_error)?;
        Ok(BatchOutcome::applied(messages, events.len()))
    }
}

/// SABOTAGE, never for production (the hidden `--unsafe-search-no-idempotency` of
/// `chatstream workers`): the search indexer without idempotency. It keeps no processed
/// marker and, instead of upserting the message's row, appends the message's text to the
/// row's document on every delivery (as an indexer that accumulates terms would). A
/// redelivery — after a crash between handling and commit, or an event published twice —
/// indexes the text again, so the live `search_messages` no longer equals a rebuild from
/// the topic (which the `replay` checker must catch). Same name, group and topics as
/// [`Search`].
pub struct SearchWithoutIdempotency {
    pub pool: PgPool,
    pub group: String,
}

impl Handler for SearchWithoutIdempotency {
    fn name(&self) -> &str {
        "search"
    }

    fn topics(&self) -> Vec<String> {
        vec![topic::CHAT_EVENTS.to_string()]
    }

    async fn handle(&self, e: &EventEnvelope, _meta: &RecordMeta) -> Result<Handled, HandleError> {
        index_one(&self.pool, e, UNSAFE_SEARCH_APPEND).await
    }
}

/// The sabotaged indexer's write: a second delivery of a message appends its text again.
pub const UNSAFE_SEARCH_APPEND: &str =
    "INSERT INTO search_messages (message_id, tenant, conversation_id, sender_id, seq, body, created_at_ms)
     VALUES ($1, $2, $3, $4, $5, $6, $7)
     ON CONFLICT (message_id) DO UPDATE SET body = search_messages.body || ' ' || EXCLUDED.body";

/// Alerts: STREAM_ERROR, and STREAM_COMPLETED slower than the SLA, are POSTed to a
/// webhook (retried through the consumer's backoff); replayed events never alert.
pub struct Alerts {
    pub pool: PgPool,
    pub group: String,
    pub webhook: String,
    pub sla_ms: u64,
    pub http: reqwest::Client,
}

impl Handler for Alerts {
    fn name(&self) -> &str {
        "alerts"
    }

    fn topics(&self) -> Vec<String> {
        vec![topic::STREAM_EVENTS.to_string()]
    }

    async fn handle(&self, e: &EventEnvelope, _meta: &RecordMeta) -> Result<Handled, HandleError> {
        validate(e)?;
        if e.replayed {
            return Ok(Handled::Skipped);
        }
        let alert = match &e.body {
            EventBody::StreamError(err) => serde_json::json!({
                "kind": "STREAM_ERROR", "session_id": err.session_id, "error": err.error, "error_code": err.error_code,
            }),
            EventBody::StreamCompleted(c) if c.total_latency_ms > self.sla_ms => {
                serde_json::json!({
                    "kind": "SLA_BREACH", "session_id": c.session_id, "total_latency_ms": c.total_latency_ms, "sla_ms": self.sla_ms,
                })
            }
            _ => return Ok(Handled::Skipped),
        };
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        if !claim(&mut tx, &self.group, &e.id).await.map_err(db_error)? {
            return Ok(Handled::Skipped);
        }
        let body = serde_json::json!({ "event_id": e.id, "tenant": e.tenant, "trace_id": e.trace_id, "alert": alert });
        let resp = self
            .http
            .post(&self.webhook)
            .header("Idempotency-Key", &e.id)
            .timeout(Duration::from_secs(5))
            .json(&body)
            .send()
            .await
            .map_err(transient)?;
        let status = resp.status();
        if !status.is_success() {
            let error = format!("webhook answered {status}");
            // A 4xx other than a timeout or a rate limit is the webhook refusing this alert.
            let refused = status.is_client_error()
                && status != reqwest::StatusCode::REQUEST_TIMEOUT
                && status != reqwest::StatusCode::TOO_MANY_REQUESTS;
            return Err(if refused {
                HandleError::Permanent(error)
            } else {
                HandleError::Transient(error)
            });
        }
        // Marked only once the webhook took it: a failure retries the POST.
        tx.commit().await.map_err(db_error)?;
        metrics::counter!("chatstream_alerts_sent_total").increment(1);
        Ok(Handled::Applied)
    }
}

/// Training export: each completed stream becomes one JSONL line (prompt, response) in
/// `<dir>/<YYYY-MM-DD>.jsonl` by the event's date. Prompts are kept from SESSION_STARTED.
pub struct Export {
    pub pool: PgPool,
    pub group: String,
    pub dir: std::path::PathBuf,
}

impl Handler for Export {
    fn name(&self) -> &str {
        "export"
    }

    fn topics(&self) -> Vec<String> {
        vec![topic::STREAM_EVENTS.to_string()]
    }

    async fn handle(&self, e: &EventEnvelope, _meta: &RecordMeta) -> Result<Handled, HandleError> {
        validate(e)?;
        match &e.body {
            EventBody::SessionStarted(s) => {
                sqlx::query(
                    "INSERT INTO export_prompts (session_id, prompt, user_id, created_at_ms) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (session_id) DO NOTHING",
                )
                .bind(&s.session_id)
                .bind(&s.prompt)
                .bind(&s.user_id)
                .bind(e.timestamp_ms)
                .execute(&self.pool)
                .await
                .map_err(db_error)?;
                Ok(Handled::Applied)
            }
            EventBody::StreamCompleted(c) => {
                let mut tx = self.pool.begin().await.map_err(db_error)?;
                if !claim(&mut tx, &self.group, &e.id).await.map_err(db_error)? {
                    return Ok(Handled::Skipped);
                }
                let prompt: Option<String> =
                    sqlx::query_scalar("SELECT prompt FROM export_prompts WHERE session_id = $1")
                        .bind(&c.session_id)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(db_error)?;
                let Some(prompt) = prompt else {
                    return Err(HandleError::Poison(format!(
                        "STREAM_COMPLETED for {} without its SESSION_STARTED",
                        c.session_id
                    )));
                };
                let line = serde_json::json!({
                    "session_id": c.session_id, "message_id": c.message_id, "conversation_id": c.conversation_id,
                    "tenant": e.tenant, "prompt": prompt, "response": c.response, "chunks": c.total_chunks,
                    "latency_ms": c.total_latency_ms, "timestamp": e.timestamp,
                });
                let date = e.timestamp.get(..10).unwrap_or("unknown-date");
                let path = self.dir.join(format!("{date}.jsonl"));
                append_line(&path, &line.to_string())
                    .await
                    .map_err(transient)?;
                tx.commit().await.map_err(db_error)?;
                Ok(Handled::Applied)
            }
            _ => Ok(Handled::Skipped),
        }
    }
}

async fn append_line(path: &std::path::Path, line: &str) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await?;
    f.write_all(format!("{line}\n").as_bytes()).await?;
    f.sync_data().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_sabotaged_indexer_is_the_search_worker_and_appends_on_redelivery() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap();
        let (safe, unsafe_) = (
            Search {
                pool: pool.clone(),
                group: "g".into(),
            },
            SearchWithoutIdempotency {
                pool,
                group: "g".into(),
            },
        );
        assert_eq!(safe.name(), unsafe_.name());
        assert_eq!(safe.topics(), unsafe_.topics());
        // No processed marker, and a second write of a message changes its row.
        assert!(!UNSAFE_SEARCH_APPEND.contains("processed_events"));
        assert!(
            UNSAFE_SEARCH_APPEND.contains("body = search_messages.body || ' ' || EXCLUDED.body")
        );
    }

    fn completed(id: &str, ts_ms: i64, latency_ms: u64) -> EventEnvelope {
        EventEnvelope {
            id: id.into(),
            version: chatstream_protocol::EVENT_VERSION,
            timestamp: "2026-01-01T00:00:00.000Z".into(),
            timestamp_ms: ts_ms,
            tenant: "t".into(),
            trace_id: "tr".into(),
            source_node: "n".into(),
            conversation_id: Some("c".into()),
            session_id: Some("s".into()),
            user_id: Some("u".into()),
            message_id: Some("m".into()),
            replayed: false,
            body: EventBody::StreamCompleted(chatstream_protocol::events::StreamCompleted {
                session_id: "s".into(),
                message_id: "m".into(),
                conversation_id: "c".into(),
                total_chunks: 3,
                content_length: 10,
                total_latency_ms: latency_ms,
                words: 2,
                tokens_used: 2,
                response: "hi there".into(),
            }),
        }
    }

    #[test]
    fn a_batch_adds_up_per_minute_and_type_as_one_by_one_would() {
        let events = [
            completed("a", 60_000, 1),
            completed("b", 119_999, 7),
            completed("c", 120_000, 7),
            completed("d", 120_001, 1_000_000),
        ];
        let agg = MinuteAggregates::of(events.iter());
        let rows: Vec<_> = agg.0.into_iter().collect();
        assert_eq!(rows.len(), 2, "two minutes, one event type");
        let ((m1, t1), (n1, e1, b1)) = &rows[0];
        assert_eq!((*m1, *t1, *n1, *e1), (60_000, "STREAM_COMPLETED", 2, 0));
        assert_eq!(b1[latency_bucket(1)], 1);
        assert_eq!(b1[latency_bucket(7)], 1);
        let ((m2, _), (n2, _, b2)) = &rows[1];
        assert_eq!((*m2, *n2), (120_000, 2));
        assert_eq!(
            b2[LATENCY_BUCKETS_MS.len()],
            1,
            "past the last bound: the open bucket"
        );
        assert_eq!(b2.iter().sum::<i64>(), 2);
        assert_eq!(array_literal(&[1, 0, 2]), "{1,0,2}");
        assert_eq!(array_literal(&[]), "{}");
    }

    #[test]
    fn data_and_constraint_errors_are_permanent_and_the_rest_transient() {
        // 22021: invalid byte sequence (a NUL in text); 22P05: untranslatable character
        // (\u0000 in JSONB); 23505: unique violation; 54000: e.g. tsvector too long.
        for code in ["22021", "22P05", "23505", "54000"] {
            assert!(is_permanent_sqlstate(code), "{code}");
        }
        // 08006 connection failure, 40001 serialization failure, 57P01 admin shutdown,
        // 53300 too many connections, 42P01 undefined table (migrations not run yet).
        for code in ["08006", "40001", "57P01", "53300", "42P01", "", "2"] {
            assert!(!is_permanent_sqlstate(code), "{code}");
        }
        assert!(matches!(
            db_error(sqlx::Error::PoolTimedOut),
            HandleError::Transient(_)
        ));
    }

    #[test]
    fn latency_buckets_give_quantiles() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(7), 3);
        assert_eq!(latency_bucket(999_999), LATENCY_BUCKETS_MS.len());
        let mut b = vec![0i64; LATENCY_BUCKETS_MS.len() + 1];
        for ms in [3, 4, 4, 8, 150] {
            b[latency_bucket(ms)] += 1;
        }
        assert_eq!(bucket_quantile(&b, 0.5), Some(5));
        assert_eq!(bucket_quantile(&b, 0.99), Some(200));
        assert_eq!(bucket_quantile(&[0, 0], 0.5), None);
    }
}
