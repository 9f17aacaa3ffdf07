//! Turning actions into Kafka events: building envelopes (ids, trace, node, timestamps,
//! key fields) and handing them to the configured publish path — outbox rows (batched for
//! events outside a message transaction), a fire-and-forget send, or nothing at all
//! (publish mode `none`).

use chatstream_protocol::events::EventBody;
use chatstream_protocol::{EventEnvelope, EVENT_VERSION};
use chatstream_store::{OutboxRow, Store};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

use crate::clock;
use crate::config::PublishMode;
use crate::kafka::AsyncPublisher;
use crate::log_limit::LogLimiter;
use crate::metrics as m;

/// Who/what an event is about, besides its payload.
#[derive(Debug, Clone, Default)]
pub struct EventContext {
    pub tenant: String,
    pub trace_id: String,
    pub conversation_id: Option<String>,
    pub session_id: Option<String>,
    pub user_id: Option<String>,
    pub message_id: Option<String>,
}

pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

pub fn new_trace_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Rows waiting for the batch writer; past this, `emit_nowait` drops (and counts).
const BATCH_QUEUE: usize = 10_000;

pub struct EventSink {
    mode: PublishMode,
    node_id: String,
    /// Async mode's producer (typing events use it in outbox mode too); none in mode `none`.
    async_publisher: Option<AsyncPublisher>,
    batch: mpsc::Sender<OutboxRow>,
    relay_poke: Arc<Notify>,
    dropped_log: LogLimiter,
}

impl EventSink {
    /// Starts the batcher that writes outbox rows for events outside a message transaction.
    pub fn new(
        mode: PublishMode,
        node_id: String,
        store: Store,
        async_publisher: Option<AsyncPublisher>,
        relay_poke: Arc<Notify>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(BATCH_QUEUE);
        if mode == PublishMode::Outbox {
            tokio::spawn(batch_writer(store, rx, relay_poke.clone()));
        }
        Arc::new(EventSink {
            mode,
            node_id,
            async_publisher,
            batch: tx,
            relay_poke,
            dropped_log: LogLimiter::new(Duration::from_secs(5)),
        })
    }

    pub fn mode(&self) -> PublishMode {
        self.mode
    }

    pub fn envelope(&self, ctx: &EventContext, body: EventBody) -> EventEnvelope {
        let now = clock::now_ms();
        EventEnvelope {
            id: new_id(),
            version: EVENT_VERSION,
            timestamp: clock::rfc3339_ms(now),
            timestamp_ms: now,
            tenant: ctx.tenant.clone(),
            trace_id: ctx.trace_id.clone(),
            source_node: self.node_id.clone(),
            conversation_id: ctx.conversation_id.clone(),
            session_id: ctx.session_id.clone(),
            user_id: ctx.user_id.clone(),
            message_id: ctx.message_id.clone(),
            replayed: false,
            body,
        }
    }

    pub fn outbox_row(&self, e: &EventEnvelope) -> OutboxRow {
        OutboxRow {
            event_id: e.id.clone(),
            topic: e.topic().to_string(),
            key: e.key().to_string(),
            payload: e.to_json(),
            node_id: self.node_id.clone(),
            created_at_ms: e.timestamp_ms,
        }
    }

    /// The outbox rows a state change writes in its own transaction: the event's row in
    /// outbox mode, nothing otherwise (async mode sends after the commit with `emit`).
    pub fn transactional_rows(&self, e: impl FnOnce() -> EventEnvelope) -> Vec<OutboxRow> {
        match self.mode {
            PublishMode::Outbox => vec![self.outbox_row(&e())],
            PublishMode::Async | PublishMode::None => Vec::new(),
        }
    }

    /// Tells the local relay that rows were committed (so it publishes now, not at its next poll).
    pub fn poke_relay(&self) {
        self.relay_poke.notify_one();
    }

    /// Publishes an event outside a message transaction, by the configured mode; waits
    /// only when the outbox batch queue is full (PostgreSQL away).
    pub async fn emit(&self, e: EventEnvelope) {
        match self.mode {
            PublishMode::Async => self.send_async(&e),
            PublishMode::Outbox => {
                let row = self.outbox_row(&e);
                if self.batch.send(row).await.is_err() {
                    tracing::error!(event = %e.id, "outbox batcher is gone; event dropped");
                }
            }
            PublishMode::None => {}
        }
    }

    /// Like `emit` but never waits: with the batch queue full the event is dropped, counted
    /// and logged. For callers that must not stall (the fan-out subscriber).
    pub fn emit_nowait(&self, e: EventEnvelope) {
        match self.mode {
            PublishMode::Async => self.send_async(&e),
            PublishMode::Outbox => {
                if let Err(err) = self.batch.try_send(self.outbox_row(&e)) {
                    metrics::counter!(m::EVENTS_DROPPED, "reason" => "queue_full").increment(1);
                    if self.dropped_log.allow() {
                        tracing::warn!(event = %e.id, error = %err, "outbox batch queue full (postgres slow or away); event dropped");
                    }
                }
            }
            PublishMode::None => {}
        }
    }

    /// Publishes directly in async and outbox modes, for events that are worthless later
    /// (typing); nothing in mode `none`.
    pub fn emit_ephemeral(&self, e: EventEnvelope) {
        self.send_async(&e);
    }

    fn send_async(&self, e: &EventEnvelope) {
        if let Some(p) = &self.async_publisher {
            p.send(e);
        }
    }
}

/// Writes queued rows in batches (every 20 ms or 500 rows); retries while PostgreSQL is down.
async fn batch_writer(store: Store, mut rx: mpsc::Receiver<OutboxRow>, poke: Arc<Notify>) {
    let mut rows = Vec::with_capacity(500);
    while let Some(first) = rx.recv().await {
        rows.push(first);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(20);
        while rows.len() < 500 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => rows.push(r),
                _ => break,
            }
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            match store.enqueue(&rows).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, rows = rows.len(), "could not queue events; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        rows.clear();
        poke.notify_one();
    }
}
