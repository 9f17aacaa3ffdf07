//! Turning actions into Kafka events: building envelopes (ids, trace, node, timestamps,
//! key fields) and handing them to the configured publish path — outbox rows, a
//! fire-and-forget send, or nothing at all (publish mode `none`).
//!
//! In outbox mode every event ends in the transactional outbox, by one of four paths:
//! - in the transaction of the state change it describes (`transactional_rows`: messages,
//!   membership changes, read marks);
//! - in a transaction of its own before the action is acknowledged (`emit_now`: a stream's
//!   SESSION_STARTED, before `stream_started` or the 201);
//! - through the batch writer, waiting until the batch holding it has committed
//!   (`emit_confirmed`: stream ends, recovery attempts, notifications), in queue order
//!   with the fast-path events before them;
//! - through the batch writer without waiting (`emit`: CHUNK_RECEIVED, the high-volume
//!   stream events).
//!
//! DELIVERED receipts (`emit_nowait`), the most numerous events and no state change of
//! PostgreSQL, skip the outbox: they are published directly (`direct`), and only those
//! Kafka does not take are written to the outbox, through the batch writer.
//! CHUNK_RECEIVED and DELIVERED are the only events a `kill -9` can lose: what was queued in
//! the last batch window (20 ms, longer while PostgreSQL is slow) or queued for the direct
//! producer or held by it (its 20 ms batch window and `kafka_linger_ms`, longer while brokers
//! are away). SIGTERM loses none: `flush`
//! waits for the direct producer and writes the queue out before the node exits.

use chatstream_protocol::events::EventBody;
use chatstream_protocol::{EventEnvelope, EVENT_VERSION};
use chatstream_store::{OutboxRow, Store, StoreError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;

use crate::clock;
use crate::config::PublishMode;
use crate::direct::DirectPublisher;
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

/// An event id that is the same wherever and however often it is computed from `parts`:
/// for events two nodes may both emit (a stream's chunks and its end, when a node takes
/// over a stream whose generator died), so the outbox (unique event id) and consumers
/// (idempotent by event id) keep one of them.
pub fn stable_id(parts: &[&str]) -> String {
    let fnv = |offset: u64| {
        parts.iter().fold(offset, |h, p| {
            p.bytes()
                .chain(std::iter::once(0xff))
                .fold(h, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
        })
    };
    let hi = fnv(0xcbf2_9ce4_8422_2325);
    let lo = fnv(0x6c62_272e_07bb_0142);
    uuid::Uuid::from_u128((u128::from(hi) << 64) | u128::from(lo)).to_string()
}

/// Rows waiting for the batch writer; past this, `emit_nowait` drops (and counts).
const BATCH_QUEUE: usize = 10_000;
/// Rows per batch transaction.
const BATCH_ROWS: usize = 500;
/// How long the writer gathers rows for a batch when nobody waits for it.
const BATCH_WINDOW: Duration = Duration::from_millis(20);

/// A queued row, and who waits for it to be committed.
type Queued = (OutboxRow, Option<oneshot::Sender<()>>);

pub struct EventSink {
    mode: PublishMode,
    node_id: String,
    store: Store,
    /// Async mode's producer (typing events use it in outbox mode too); none in mode `none`.
    async_publisher: Option<AsyncPublisher>,
    /// Outbox mode's producer for DELIVERED receipts.
    direct: Option<DirectPublisher>,
    batch: mpsc::Sender<Queued>,
    relay_poke: Arc<Notify>,
    dropped_log: LogLimiter,
    /// Tells the batch writer to write what is queued and stop (SIGTERM).
    closing: watch::Sender<bool>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Set once the writer is gone: later events are written one by one.
    flushed: AtomicBool,
}

impl EventSink {
    /// Starts the batcher that writes outbox rows for events outside a message transaction
    /// (and the rows `direct` hands back, which arrive on `direct_refused`).
    pub fn new(
        mode: PublishMode,
        node_id: String,
        store: Store,
        async_publisher: Option<AsyncPublisher>,
        direct: Option<(DirectPublisher, mpsc::UnboundedReceiver<OutboxRow>)>,
        relay_poke: Arc<Notify>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(BATCH_QUEUE);
        let (closing, closing_rx) = watch::channel(false);
        let (direct, direct_refused) = direct.unzip();
        let writer = (mode == PublishMode::Outbox).then(|| {
            tokio::spawn(batch_writer(
                store.clone(),
                rx,
                direct_refused,
                relay_poke.clone(),
                closing_rx,
            ))
        });
        Arc::new(EventSink {
            mode,
            node_id,
            store,
            async_publisher,
            direct,
            batch: tx,
            relay_poke,
            dropped_log: LogLimiter::new(Duration::from_secs(5)),
            closing,
            writer: Mutex::new(writer),
            flushed: AtomicBool::new(false),
        })
    }

    pub fn mode(&self) -> PublishMode {
        self.mode
    }

    pub fn envelope(&self, ctx: &EventContext, body: EventBody) -> EventEnvelope {
        self.envelope_with_id(new_id(), ctx, body)
    }

    /// An envelope with a given id (see [`stable_id`]).
    pub fn envelope_with_id(
        &self,
        id: String,
        ctx: &EventContext,
        body: EventBody,
    ) -> EventEnvelope {
        let now = clock::now_ms();
        EventEnvelope {
            id,
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

    /// Fast path: queues an event for the batch writer (waits only while the queue is
    /// full, PostgreSQL away). Lost on `kill -9` if still queued; flushed on SIGTERM.
    pub async fn emit(&self, e: EventEnvelope) {
        match self.mode {
            PublishMode::Async => self.send_async(&e),
            PublishMode::Outbox => {
                if self.flushed.load(Ordering::Relaxed) {
                    return self.write_late(&e).await;
                }
                let row = self.outbox_row(&e);
                if self.batch.send((row, None)).await.is_err() {
                    self.write_late(&e).await;
                }
            }
            PublishMode::None => {}
        }
    }

    /// Never waits, for callers that must not stall (the fan-out subscriber): in outbox
    /// mode published directly, or (refused by the producer) queued for the outbox; with
    /// the batch queue full as well the event is dropped, counted and logged.
    pub fn emit_nowait(&self, e: EventEnvelope) {
        if crate::sabotage::drop_event() {
            return self.dropped(&e, "sabotage");
        }
        match self.mode {
            PublishMode::Async => self.send_async(&e),
            PublishMode::Outbox => {
                let mut row = self.outbox_row(&e);
                if let Some(direct) = &self.direct {
                    match direct.send(row) {
                        None => return,
                        Some(refused) => row = refused,
                    }
                }
                if let Err(err) = self.batch.try_send((row, None)) {
                    let reason = match err {
                        mpsc::error::TrySendError::Full(_) => "queue_full",
                        mpsc::error::TrySendError::Closed(_) => "shut_down",
                    };
                    self.dropped(&e, reason);
                }
            }
            PublishMode::None => {}
        }
    }

    /// Counts (and logs, a few a second at most) an event that reaches neither Kafka nor
    /// the outbox.
    fn dropped(&self, e: &EventEnvelope, reason: &'static str) {
        metrics::counter!(m::EVENTS_DROPPED, "reason" => reason).increment(1);
        if self.dropped_log.allow() {
            tracing::warn!(event = %e.id, reason, "event not queued for the outbox; dropped");
        }
    }

    /// Queues an event behind the ones already queued and returns once the batch holding
    /// it has committed (outbox mode; waits while PostgreSQL is away). For events a client
    /// may see the effect of before they are published (a stream's end).
    pub async fn emit_confirmed(&self, e: EventEnvelope) {
        match self.mode {
            PublishMode::Async => self.send_async(&e),
            PublishMode::Outbox => {
                if self.flushed.load(Ordering::Relaxed) {
                    return self.write_late(&e).await;
                }
                let (done, committed) = oneshot::channel();
                if self
                    .batch
                    .send((self.outbox_row(&e), Some(done)))
                    .await
                    .is_err()
                {
                    return self.write_late(&e).await;
                }
                if committed.await.is_err() {
                    // The writer stopped (shutdown) before committing it: write it here.
                    self.write_late(&e).await;
                }
            }
            PublishMode::None => {}
        }
    }

    /// Writes an event in a transaction of its own, now; an error means it is not stored
    /// (the caller refuses the action). For events that must be durable before the action
    /// is acknowledged and that have no transaction to join (SESSION_STARTED).
    pub async fn emit_now(&self, e: EventEnvelope) -> Result<(), StoreError> {
        match self.mode {
            PublishMode::Async => self.send_async(&e),
            PublishMode::Outbox => {
                self.store.enqueue(&[self.outbox_row(&e)]).await?;
                self.poke_relay();
            }
            PublishMode::None => {}
        }
        Ok(())
    }

    /// An event emitted after the batch writer stopped (a task that outlived the drain).
    async fn write_late(&self, e: &EventEnvelope) {
        if let Err(err) = self.store.enqueue(&[self.outbox_row(e)]).await {
            metrics::counter!(m::EVENTS_DROPPED, "reason" => "shut_down").increment(1);
            tracing::warn!(event = %e.id, error = %err, "event emitted during shutdown not stored");
        } else {
            self.poke_relay();
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

    /// Writes every queued event to the outbox and stops the batch writer (on shutdown,
    /// after the work that emits events has finished). Waits at most `timeout` (the queue
    /// cannot be written while PostgreSQL is away). Later events are written one by one.
    pub async fn flush(&self, timeout: Duration) -> bool {
        // First the direct producer: what it cannot deliver joins the queue written below.
        if let Some(direct) = &self.direct {
            if !direct.flush(timeout).await {
                tracing::warn!("direct producer not flushed; its unsent events go to the outbox");
            }
        }
        let _ = self.closing.send(true);
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        let done = match writer {
            Some(w) => tokio::time::timeout(timeout, w).await.is_ok(),
            None => true,
        };
        self.flushed.store(true, Ordering::Relaxed);
        done
    }
}

/// Writes queued rows in batches (every 20 ms or 500 rows; at once when someone waits for
/// a row); retries while PostgreSQL is down. Rows the direct producer hands back come in on
/// `direct_refused`. On `closing` it writes what is queued and stops.
async fn batch_writer(
    store: Store,
    mut rx: mpsc::Receiver<Queued>,
    mut direct_refused: Option<mpsc::UnboundedReceiver<OutboxRow>>,
    poke: Arc<Notify>,
    mut closing: watch::Receiver<bool>,
) {
    let mut rows = Vec::with_capacity(BATCH_ROWS);
    let mut waiters = Vec::new();
    let mut stopping = false;
    loop {
        if stopping {
            // Everything still queued, in batches, then stop.
            while rows.len() < BATCH_ROWS {
                if let Some(row) = direct_refused.as_mut().and_then(|r| r.try_recv().ok()) {
                    rows.push(row);
                    continue;
                }
                match rx.try_recv() {
                    Ok((row, waiter)) => {
                        rows.push(row);
                        waiters.extend(waiter);
                    }
                    Err(_) => break,
                }
            }
            if rows.is_empty() {
                return;
            }
        } else {
            let first = tokio::select! {
                first = rx.recv() => first,
                Some(row) = recv_refused(&mut direct_refused) => Some((row, None)),
                _ = closing.wait_for(|c| *c) => { stopping = true; continue; }
            };
            let Some((row, waiter)) = first else { return };
            rows.push(row);
            waiters.extend(waiter);
            let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
            while rows.len() < BATCH_ROWS {
                let next = if waiters.is_empty() {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(next) => next,
                        Err(_) => break,
                    }
                } else {
                    // Someone waits for this batch: take what is queued, do not linger.
                    rx.try_recv().ok()
                };
                match next {
                    Some((row, waiter)) => {
                        rows.push(row);
                        waiters.extend(waiter);
                    }
                    None => break,
                }
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
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
        poke.notify_one();
    }
}

/// The next row the direct producer handed back; pending forever without a producer.
async fn recv_refused(
    refused: &mut Option<mpsc::UnboundedReceiver<OutboxRow>>,
) -> Option<OutboxRow> {
    match refused {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::stable_id;

    #[test]
    fn stable_ids_depend_on_every_part_and_nothing_else() {
        assert_eq!(
            stable_id(&["s1", "chunk", "3"]),
            stable_id(&["s1", "chunk", "3"])
        );
        assert_ne!(
            stable_id(&["s1", "chunk", "3"]),
            stable_id(&["s1", "chunk", "4"])
        );
        assert_ne!(stable_id(&["s1", "chunk3"]), stable_id(&["s1c", "hunk3"]));
        assert_eq!(stable_id(&["x"]).len(), 36);
    }
}
