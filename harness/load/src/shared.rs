//! What every user task of a run shares: the history recorder, the live metrics, the
//! nodes' addresses, the conversation ids and the limits, and the measured window.

use squall_history::Recorder;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

pub struct Shared {
    pub rec: Recorder,
    pub metrics: Arc<Metrics>,
    /// WebSocket base URLs of the nodes (`ws://host:port`), in node order.
    pub nodes: Vec<String>,
    pub conversation_ids: Vec<String>,
    conversation_lookup: HashMap<String, u32>,
    pub ack_timeout: Duration,
    pub max_in_flight: usize,
    /// Attempts at the first connection before the user gives up (the run then aborts).
    pub connect_attempts: u32,
    /// How long the final resync may take.
    pub finish_timeout: Duration,
    /// Whether users resync every conversation after the load.
    pub final_resync: bool,
    window: OnceLock<(Instant, Instant)>,
}

impl Shared {
    pub fn new(
        rec: Recorder,
        metrics: Arc<Metrics>,
        nodes: Vec<String>,
        conversation_ids: Vec<String>,
        ack_timeout: Duration,
        max_in_flight: usize,
    ) -> Self {
        let conversation_lookup = conversation_ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i as u32))
            .collect();
        Shared {
            rec,
            metrics,
            nodes,
            conversation_ids,
            conversation_lookup,
            ack_timeout,
            max_in_flight,
            connect_attempts: 10,
            finish_timeout: Duration::from_secs(30),
            final_resync: true,
            window: OnceLock::new(),
        }
    }

    pub fn conversation_index(&self, id: &str) -> Option<u32> {
        self.conversation_lookup.get(id).copied()
    }

    /// Sets the measured window once: operations due inside it count in the totals.
    pub fn set_window(&self, start: Instant, end: Instant) {
        let _ = self.window.set((start, end));
    }

    /// Whether an operation due at `due` counts in the whole-run figures.
    pub fn in_window(&self, due: Instant) -> bool {
        self.window
            .get()
            .is_some_and(|(start, end)| due >= *start && due < *end)
    }

    pub fn record_latency(&self, name: &str, latency: Duration, due: Instant) {
        self.metrics.record(name, latency, self.in_window(due));
    }
}
