//! Turning actions into Kafka events: building envelopes (ids, trace, node, timestamps,
//! key fields) and handing them to the configured publish path — outbox rows (batched for
//! events outside a message transaction) or a fire-and-forget send.

use chatstream_protocol::events::EventBody;
use chatstream_protocol::{EventEnvelope, EVENT_VERSION};
use chatstream_store::{OutboxRow, Store};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

use crate::clock;
use crate::config::PublishMode;
use crate::kafka::AsyncPublisher;

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

pub struct EventSink {
    mode: PublishMode,
    node_id: String,
    async_publisher: AsyncPublisher,
    batch: mpsc::Sender<OutboxRow>,
    relay_poke: Arc<Notify>,
}

impl EventSink {
    /// Starts the batcher that writes outbox rows for events outside a message transaction.
    pub fn new(
        mode: PublishMode,
        node_id: String,
        store: Store,
        async_publisher: AsyncPublisher,
        relay_poke: Arc<Notify>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(10_000);
        tokio::spawn(batch_writer(store, rx, relay_poke.clone()));
        Arc::new(EventSink {
            mode,
            node_id,
            async_publisher,
            batch: tx,
            relay_poke,
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

    /// Tells the local relay that rows were committed (so it publishes now, not at its next poll).
    pub fn poke_relay(&self) {
        self.relay_poke.notify_one();
    }

    /// Publishes an event outside a message transaction, by the configured mode.
    pub async fn emit(&self, e: EventEnvelope) {
        match self.mode {
            PublishMode::Async => self.async_publisher.send(&e),
            PublishMode::Outbox => {
                let row = self.outbox_row(&e);
                if self.batch.send(row).await.is_err() {
                    tracing::error!(event = %e.id, "outbox batcher is gone; event dropped");
                }
            }
        }
    }

    /// Ephemeral events (typing) are sent directly in every mode: they are worthless later.
    pub fn emit_ephemeral(&self, e: EventEnvelope) {
        self.async_publisher.send(&e);
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
