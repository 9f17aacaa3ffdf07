//! The audit pipeline probe: samples acknowledged messages from the load (a few per
//! second, through the load's ack tap) and polls PostgreSQL until each one's audit row
//! is visible, recording ack → visible as `pipeline_audit`. It measures the whole
//! event path a user does not wait for: outbox relay, Kafka, the audit worker, its
//! commit. Polling starts fast and backs off, so a sample's error stays within about a
//! tenth of its latency.

use squall_load::metrics::names;
use squall_load::tap::AckSample;
use squall_load::Metrics;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

/// Samples asked for per second.
const SAMPLES_PER_S: u32 = 10;
/// Samples followed at once; beyond this, ticks are skipped (and counted).
const MAX_IN_FLIGHT: usize = 128;
/// A sample not visible by then is counted as unseen, not as a latency.
const GIVE_UP_AFTER: Duration = Duration::from_secs(60);

pub struct Probe {
    task: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Probe {
    /// Starts sampling; `None` when the load's tap already serves another probe.
    pub fn start(metrics: Arc<Metrics>, pool: sqlx::PgPool) -> Option<Probe> {
        let samples = metrics.ack_tap.subscribe(16)?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(sample_loop(metrics, pool, samples, stopped));
        Some(Probe { task, stop })
    }

    /// Stops asking for samples and gives the ones in flight until `grace` to show up
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
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut following = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / SAMPLES_PER_S);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => metrics.ack_tap.want_one(),
            Some(sample) = samples.recv() => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    metrics.counters.pipeline_skipped.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let (pool, metrics) = (pool.clone(), metrics.clone());
                following.spawn(async move {
                    let _slot = slot;
                    follow(&pool, &metrics, sample).await;
                });
            }
            _ = stopped.changed() => break,
        }
        while following.try_join_next().is_some() {}
    }
    while following.join_next().await.is_some() {}
}

async fn follow(pool: &sqlx::PgPool, metrics: &Metrics, s: AckSample) {
    let counters = &metrics.counters;
    let mut pause = Duration::from_millis(5);
    loop {
        let visible: Result<bool, sqlx::Error> = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM audit_logs WHERE conversation_id = $1 AND message_id = $2)",
        )
        .bind(&s.conversation_id)
        .bind(&s.message_id)
        .fetch_one(pool)
        .await;
        let elapsed = s.acked.elapsed();
        match visible {
            Ok(true) => {
                metrics.record(names::PIPELINE_AUDIT, elapsed, s.in_window);
                counters.pipeline_seen.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(false) => {}
            // PostgreSQL may be the fault under test; keep asking until the deadline.
            Err(e) => tracing::debug!("audit probe query failed: {e}"),
        }
        if elapsed >= GIVE_UP_AFTER {
            counters.pipeline_unseen.fetch_add(1, Ordering::Relaxed);
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (elapsed / 10).clamp(Duration::from_millis(5), Duration::from_millis(500));
    }
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
