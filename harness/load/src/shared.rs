//! What every user task of a run shares: the history recorder, the live metrics, the
//! nodes' addresses, the conversation ids and the limits, and the measured window.

use squall_history::Recorder;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::fasthash::FastMap;
use crate::metrics::Metrics;

pub struct Shared {
    pub rec: Recorder,
    pub metrics: Arc<Metrics>,
    /// WebSocket base URLs of the nodes (`ws://host:port`), in node order.
    pub nodes: Vec<String>,
    pub conversation_ids: Vec<String>,
    conversation_lookup: FastMap<String, u32>,
    pub ack_timeout: Duration,
    pub max_in_flight: usize,
    /// Attempts at the first connection before the user gives up (the run then aborts).
    pub connect_attempts: u32,
    /// How long the final resync may take.
    pub finish_timeout: Duration,
    /// Whether users resync every conversation after the load.
    pub final_resync: bool,
    /// Slow consumers' pause and period (`load.slow_consumers`).
    pub slow: Option<(Duration, Duration)>,
    /// Per conversation, the highest seq any user's ack reported: without a final resync
    /// a finishing user waits (bounded) until live delivery has brought it that far.
    acked_seq: Vec<AtomicI64>,
    /// Set once every user has stopped and every send has its outcome: users then do
    /// their final resync (and, without one, wait for live delivery to catch up).
    final_phase: AtomicBool,
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
        let n_conversations = conversation_ids.len();
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
            slow: None,
            acked_seq: (0..n_conversations).map(|_| AtomicI64::new(0)).collect(),
            final_phase: AtomicBool::new(false),
            window: OnceLock::new(),
        }
    }

    pub fn conversation_index(&self, id: &str) -> Option<u32> {
        self.conversation_lookup.get(id).copied()
    }

    /// Starts the final phase (see `final_phase`).
    pub fn start_final_phase(&self) {
        self.final_phase.store(true, Ordering::Relaxed);
    }

    pub fn final_phase(&self) -> bool {
        self.final_phase.load(Ordering::Relaxed)
    }

    /// An ack of seq `seq` in conversation `c` was seen.
    pub fn acked(&self, c: u32, seq: i64) {
        if let Some(a) = self.acked_seq.get(c as usize) {
            a.fetch_max(seq, Ordering::Relaxed);
        }
    }

    /// The highest seq acknowledged in conversation `c` so far.
    pub fn highest_acked(&self, c: u32) -> i64 {
        self.acked_seq
            .get(c as usize)
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// The measured window, once set.
    pub fn window(&self) -> Option<(Instant, Instant)> {
        self.window.get().copied()
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

    /// Two latencies of one operation due at `due`, under one lock of the metrics.
    pub fn record_latencies(&self, a: (&str, Duration), b: (&str, Duration), due: Instant) {
        self.metrics.record_pair(a, b, self.in_window(due));
    }
}
