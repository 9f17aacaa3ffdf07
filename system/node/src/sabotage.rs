//! Sabotage switches: deliberate defects, off by default, that break one property each so
//! that Squall's checkers can be shown to catch them (a checker that cannot fail proves
//! nothing). Set under `sabotage:` in the node's YAML config; never for production.
//!
//! - `drop_every_nth_live: N` — every Nth live message a connection should get is
//!   silently not queued (reported delivered all the same): at-least-once delivery breaks
//!   unless the client happens to sync.
//! - `reorder_live: true` — each connection holds one live message back and queues it
//!   after the next one: per-conversation order breaks.
//! - `ack_before_store_every_nth: N` — every Nth send is acknowledged (with a made-up
//!   message id and seq) and never stored, published or fanned out.
//! - `drop_event_every_nth: N` — every Nth event handed over without waiting (the
//!   DELIVERED receipts) is discarded, as when the outbox's queue is full, and counted as
//!   such (`chatstream_events_dropped_total{reason="sabotage"}`): it reaches neither Kafka
//!   nor the outbox.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sabotage {
    pub drop_every_nth_live: u64,
    pub reorder_live: bool,
    pub ack_before_store_every_nth: u64,
    pub drop_event_every_nth: u64,
}

impl Sabotage {
    pub fn any(&self) -> bool {
        self.drop_every_nth_live > 0
            || self.reorder_live
            || self.ack_before_store_every_nth > 0
            || self.drop_event_every_nth > 0
    }
}

static ACTIVE: OnceLock<Sabotage> = OnceLock::new();
static SENDS: AtomicU64 = AtomicU64::new(0);
static EVENTS: AtomicU64 = AtomicU64::new(0);

/// Set once at start (one node per process).
pub fn install(s: &Sabotage) {
    if s.any() {
        tracing::warn!(
            ?s,
            "SABOTAGE switches are on: this node breaks guarantees on purpose"
        );
    }
    let _ = ACTIVE.set(s.clone());
}

pub fn active() -> &'static Sabotage {
    static OFF: Sabotage = Sabotage {
        drop_every_nth_live: 0,
        reorder_live: false,
        ack_before_store_every_nth: 0,
        drop_event_every_nth: 0,
    };
    ACTIVE.get().unwrap_or(&OFF)
}

/// Whether this send is acknowledged without being stored.
pub fn skip_store() -> bool {
    every_nth(&SENDS, active().ack_before_store_every_nth)
}

/// Whether this event is discarded instead of published.
pub fn drop_event() -> bool {
    every_nth(&EVENTS, active().drop_event_every_nth)
}

fn every_nth(seen: &AtomicU64, n: u64) -> bool {
    n > 0 && (seen.fetch_add(1, Ordering::Relaxed) + 1) % n == 0
}
