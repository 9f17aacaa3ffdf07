//! The recovery phase of `squall run`: once the load has drained and the nemesis has
//! healed every fault, fresh WebSocket clients read every conversation from seq 0
//! (`squall_load::recovery`), recorded in the history as the recovery process's own
//! reads, so the delivery checker can tell a message lost at the store from one lost in
//! delivery. Runs unless the scenario turns it off (`load.recovery: false`).

use squall_history::Recorder;
use squall_load::recovery::{self, RecoveryOptions, RecoverySummary};
use squall_load::{Metrics, Population, Target};
use squall_scenario::Scenario;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;

/// Runs the phase when the scenario asks for it; says what it read. A phase that could
/// not run at all is said and left to the checkers (its conversations are then unread).
pub async fn run(
    scenario: &Scenario,
    population: &Population,
    target: &Target,
    metrics: &Metrics,
    rec: Recorder,
    stop: watch::Receiver<bool>,
) -> Option<RecoverySummary> {
    if !scenario.load.recovery || population.conversations.is_empty() {
        return None;
    }
    // A minute, plus time in proportion to what there is to read (conversations, and the
    // messages acknowledged), at most ten minutes.
    let acked = metrics.counters.sends_acked.load(Ordering::Relaxed);
    let deadline = Duration::from_secs(60)
        + Duration::from_millis(20) * population.conversations.len() as u32
        + Duration::from_millis(2).saturating_mul(u32::try_from(acked).unwrap_or(u32::MAX));
    let opts = RecoveryOptions {
        deadline: deadline.min(Duration::from_secs(600)),
        ..RecoveryOptions::default()
    };
    match recovery::run(population, target, rec, opts, stop).await {
        Ok(s) => {
            show!(
                "  recovery   read {} of {} conversations from seq 0 ({} messages) with {} fresh connections in {:.1} s{}",
                s.read,
                s.conversations,
                s.messages,
                s.readers,
                s.elapsed_ms as f64 / 1000.0,
                if s.failed > 0 {
                    format!("; {} could not be read", s.failed)
                } else {
                    String::new()
                }
            );
            Some(s)
        }
        Err(e) => {
            say!("squall: the recovery phase could not run: {e}");
            None
        }
    }
}
