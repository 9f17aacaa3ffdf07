//! The audit pipeline probe: samples acknowledged messages from the load (a few per
//! second, through the load's ack tap) and polls PostgreSQL until each one's audit row
//! is visible, recording ack → visible as `pipeline_audit`. It measures the whole
//! event path a user does not wait for: outbox relay, Kafka, the audit worker, its
//! commit. One query a poll asks for every sample still pending, each looked up by its
//! conversation and the few milliseconds its events can carry (the audit table's
//! conversation index), and polls come less often as the wait grows (a twentieth of the
//! oldest wait): the probe's own load on the database stays small however far the
//! pipeline lags — it once scanned every audit row of each pending conversation a
//! hundred times a second, which made a lagging pipeline lag more.

use squall_load::metrics::names;
use squall_load::tap::AckSample;
use squall_load::Metrics;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Samples asked for per second.
const SAMPLES_PER_S: u32 = 10;
/// Samples followed at once; beyond this, new ones are not taken (and counted).
const MAX_PENDING: usize = 1000;
/// A sample not visible by then is counted as unseen, not as a latency.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);
/// Time between two polls of the pending samples (the latency's resolution, plus the
/// query's own time) while they are fresh; then a twentieth of the oldest one's wait,
/// at most [`POLL_AT_MOST_EVERY`] (a resolution of 5 % of what is measured).
const POLL_EVERY: Duration = Duration::from_millis(10);
const POLL_AT_MOST_EVERY: Duration = Duration::from_millis(500);

/// The pause before the next poll of `pending`.
fn poll_pause(pending: &[AckSample]) -> Duration {
    let oldest = pending
        .iter()
        .map(|s| s.acked.elapsed())
        .max()
        .unwrap_or_default();
    (oldest / 20).clamp(POLL_EVERY, POLL_AT_MOST_EVERY)
}

pub struct Probe {
    task: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Probe {
    /// Starts sampling; `None` when the load's tap already serves another probe.
    pub fn start(metrics: Arc<Metrics>, pool: sqlx::PgPool) -> Option<Probe> {
        let samples = metrics.ack_tap.subscribe(64)?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(sample_loop(metrics, pool, samples, stopped));
        Some(Probe { task, stop })
    }

    /// Stops asking for samples and gives the pending ones until `grace` to show up
    /// (the counters `pipeline_seen`, `pipeline_unseen`, `pipeline_skipped` say what
    /// became of them).
    pub async fn finish(self, grace: Duration) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(grace, self.task).await.is_err() {
            tracing::warn!("the audit pipeline probe did not finish within {grace:?}");
        }
    }
}

async fn sample_loop(
    metrics: Arc<Metrics>,
    pool: sqlx::PgPool,
    mut samples: tokio::sync::mpsc::Receiver<AckSample>,
    mut stopped: watch::Receiver<bool>,
) {
    let counters = &metrics.counters;
    let mut pending: Vec<AckSample> = Vec::new();
    let mut ask = tokio::time::interval(Duration::from_secs(1) / SAMPLES_PER_S);
    ask.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let poll = tokio::time::sleep(POLL_EVERY);
    tokio::pin!(poll);
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = ask.tick(), if !stopping => metrics.ack_tap.want_one(),
            Some(sample) = samples.recv(), if !stopping => {
                if pending.len() < MAX_PENDING {
                    pending.push(sample);
                } else {
                    counters.pipeline_skipped.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ = &mut poll, if !pending.is_empty() => {
                let visible = match visible_among(&pool, &pending).await {
                    Ok(v) => v,
                    // PostgreSQL may be the fault under test; keep asking until the deadline.
                    Err(e) => {
                        tracing::debug!("audit probe query failed: {e}");
                        Default::default()
                    }
                };
                pending.retain(|s| {
                    let waited = s.acked.elapsed();
                    if visible.contains(&s.message_id) {
                        metrics.record(names::PIPELINE_AUDIT, waited, s.in_window);
                        counters.pipeline_seen.fetch_add(1, Ordering::Relaxed);
                        false
                    } else if waited >= GIVE_UP_AFTER {
                        counters.pipeline_unseen.fetch_add(1, Ordering::Relaxed);
                        false
                    } else {
                        true
                    }
                });
                poll.as_mut()
                    .reset(tokio::time::Instant::now() + poll_pause(&pending));
            }
            _ = stopped.changed(), if !stopping => stopping = true,
        }
        if stopping && pending.is_empty() {
            return;
        }
    }
}

/// The message ids among `pending` whose audit rows are visible now.
async fn visible_among(
    pool: &sqlx::PgPool,
    pending: &[AckSample],
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let conversations: Vec<&str> = pending.iter().map(|s| s.conversation_id.as_str()).collect();
    let messages: Vec<&str> = pending.iter().map(|s| s.message_id.as_str()).collect();
    let from: Vec<i64> = pending.iter().map(|s| *s.event_ts_ms.start()).collect();
    let to: Vec<i64> = pending.iter().map(|s| *s.event_ts_ms.end()).collect();
    // One index probe per sample, whatever the statistics say (the LIMIT keeps the
    // lateral subquery from being flattened into a join the planner shapes from them).
    // The plain join, planned from statistics that lag far behind a table growing by
    // thousands of rows a second, took 23 ms on average in `steady` (2 s at worst, 580
    // blocks read per call); this form no longer shows among its costly statements.
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT p.message_id
         FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
              AS p(conversation_id, message_id, from_ms, to_ms)
         CROSS JOIN LATERAL (
             SELECT 1 FROM audit_logs a
             WHERE a.conversation_id = p.conversation_id
               AND a.ts_ms BETWEEN p.from_ms AND p.to_ms
               AND a.message_id = p.message_id
             LIMIT 1) AS seen",
    )
    .bind(&conversations)
    .bind(&messages)
    .bind(&from)
    .bind(&to)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Whether the scenario's events reach an audit table this probe can watch: something
/// is published and an audit worker runs.
pub fn applies(scenario: &squall_scenario::Scenario) -> bool {
    use squall_scenario::{PublishMode, WorkerKind};
    let topology = &scenario.topology;
    topology.node.publish_mode != Some(PublishMode::None)
        && topology.workers.enabled
        && topology.workers.only.contains(&WorkerKind::Audit)
}
