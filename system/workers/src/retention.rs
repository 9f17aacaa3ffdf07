//! The retention task of the workers process: on a schedule, deletes outbox rows published
//! longer ago than their keep time and processed-event markers older than theirs, and
//! counts what it deleted in `chatstream_retention_pruned_rows_total{table}`.
//!
//! It runs here rather than in the nodes: it is background work on the shared database,
//! off the nodes' latency path, and one pruner per workers process is enough (several
//! deleting the same old rows is harmless).

use chatstream_store::Store;
use std::time::Duration;
use tokio::sync::watch;

/// Counter of rows deleted, labelled `table` (`outbox`, `processed_events`).
pub const PRUNED_ROWS: &str = "chatstream_retention_pruned_rows_total";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Between passes; zero turns retention off.
    pub interval: Duration,
    /// Published outbox rows older than this are deleted.
    pub outbox_age: Duration,
    /// Processed markers older than this are deleted. Keep it longer than the longest
    /// retention of the topics the workers read: a marker must outlive every redelivery
    /// of its event (a group reset to the earliest offset included).
    pub processed_age: Duration,
    /// Rows per DELETE statement.
    pub batch: i64,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            interval: Duration::from_secs(60),
            outbox_age: Duration::from_secs(3600),
            processed_age: Duration::from_secs(30 * 24 * 3600),
            batch: 10_000,
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One pass: what each table lost, (outbox, processed_events).
pub async fn prune_once(
    store: &Store,
    policy: &RetentionPolicy,
) -> Result<(u64, u64), chatstream_store::StoreError> {
    let now = now_ms();
    let outbox = store
        .prune_published_outbox(now - policy.outbox_age.as_millis() as i64, policy.batch)
        .await?;
    metrics::counter!(PRUNED_ROWS, "table" => "outbox").increment(outbox);
    let processed = store
        .prune_processed_events(now - policy.processed_age.as_millis() as i64, policy.batch)
        .await?;
    metrics::counter!(PRUNED_ROWS, "table" => "processed_events").increment(processed);
    Ok((outbox, processed))
}

/// Prunes every `policy.interval` until `shutdown` turns true (at once if the interval is
/// zero: retention off). A failed pass is logged and tried again at the next interval.
pub async fn run_retention(
    store: Store,
    policy: RetentionPolicy,
    mut shutdown: watch::Receiver<bool>,
) {
    if policy.interval.is_zero() {
        tracing::info!("retention off");
        return;
    }
    // Both series exist from the start, so a dashboard sees 0 rather than nothing.
    metrics::counter!(PRUNED_ROWS, "table" => "outbox").increment(0);
    metrics::counter!(PRUNED_ROWS, "table" => "processed_events").increment(0);
    loop {
        match prune_once(&store, &policy).await {
            Ok((0, 0)) => {}
            Ok((outbox, processed)) => {
                tracing::info!(
                    outbox,
                    processed_events = processed,
                    "retention pruned old rows"
                )
            }
            Err(e) => tracing::warn!(error = %e, "retention pass failed; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(policy.interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}
