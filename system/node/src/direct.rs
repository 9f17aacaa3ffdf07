//! Direct publishing, in outbox mode, of the events that record no state change of
//! PostgreSQL (DELIVERED receipts): there is no transaction for them to join, and writing
//! each to the outbox only to read it back, publish it and mark it cost PostgreSQL more than
//! the rest of the send path (in `steady` the batch queue stayed full and dropped half of
//! them). They go to Kafka on an idempotent acks=all producer of their own, configured as
//! the relay's (the same partitioner: they land in the partitions the relay would use); a
//! record Kafka does not take — refused at once (the producer's queue full) or not
//! acknowledged within the delivery timeout (brokers away) — is handed back to be written
//! to the outbox, so the relay publishes it later. A `kill -9` loses what was still queued
//! here or held by the producer (one batch window, longer while brokers are away), as the
//! outbox's batch queue did.
//!
//! Records are handed to the producer in batches (every 20 ms or 500 records, one batch
//! awaited at a time), as the relay hands its own. Measured in `steady` (README):
//! publishing them costs the nodes about 0.1 core each more than dropping half of them
//! did, and PostgreSQL 0.16 core less.

use chatstream_store::OutboxRow;
use futures::future::join_all;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::inflight::InFlight;
use crate::metrics as m;

/// Records waiting to be handed to the producer; past this they go to the outbox.
const QUEUE: usize = 10_000;
/// Records a batch gathers before it is handed over without waiting out its window.
const BATCH: usize = 500;
/// Records one batch takes at most: what queued while the batches before it were awaited.
const MAX_BATCH: usize = 5_000;
/// How long a batch gathers records.
const WINDOW: Duration = Duration::from_millis(20);
/// Batches handed to the producer and not yet acknowledged: one. librdkafka's idempotent
/// producer (2.12) sends a partition no new request while five or more of its *messages*
/// are in flight, and a partition in that state with a ready batch keeps its broker thread
/// in `poll` with no timeout until the answer comes. With a batch every 20 ms and produce
/// round trips of 120-150 ms on a busy machine, the nodes in `steady` spent two thirds of
/// their CPU spinning so (200,000 `poll` calls a second per node). One batch at a time, on
/// a producer of its own (the relay's keeps one pass in flight too), never leaves a ready
/// batch behind an unanswered one; what queues meanwhile goes in the next batch.
const BATCHES_IN_FLIGHT: usize = 1;

enum Command {
    Publish(OutboxRow),
    /// Answered once every record queued before it is with the producer.
    Handover(oneshot::Sender<()>),
}

/// Cheap to clone.
#[derive(Clone)]
pub struct DirectPublisher {
    queue: mpsc::Sender<Command>,
    producer: FutureProducer,
    /// One task per batch, awaiting its acknowledgements.
    awaiting: InFlight,
}

impl DirectPublisher {
    /// Starts the batcher. `to_outbox` receives the rows of records Kafka did not
    /// acknowledge (within the producer's `message.timeout.ms`).
    pub fn start(
        producer: FutureProducer,
        node_id: &str,
        to_outbox: mpsc::UnboundedSender<OutboxRow>,
    ) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let awaiting = InFlight::default();
        let batcher = Batcher {
            producer: producer.clone(),
            node_id: node_id.into(),
            to_outbox,
            awaiting: awaiting.clone(),
            in_flight: Arc::new(Semaphore::new(BATCHES_IN_FLIGHT)),
        };
        tokio::spawn(batcher.run(rx));
        DirectPublisher {
            queue,
            producer,
            awaiting,
        }
    }

    /// Queues `row`'s event for the producer; gives the row back when the queue is full or
    /// closed (the caller writes it to the outbox).
    pub fn send(&self, row: OutboxRow) -> Option<OutboxRow> {
        match self.queue.try_send(Command::Publish(row)) {
            Ok(()) => None,
            Err(
                mpsc::error::TrySendError::Full(Command::Publish(row))
                | mpsc::error::TrySendError::Closed(Command::Publish(row)),
            ) => {
                metrics::counter!(m::DIRECT_TO_OUTBOX, "reason" => "queue_full").increment(1);
                Some(row)
            }
            Err(_) => None,
        }
    }

    /// Waits (bounded) until every record queued so far is acknowledged or handed back to
    /// the outbox. Called on shutdown before the batch writer stops.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let (done, handed) = oneshot::channel();
        let queued = self.queue.send(Command::Handover(done)).await.is_ok()
            && tokio::time::timeout_at(deadline, handed).await.is_ok();
        let producer = self.producer.clone();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let flushed =
            tokio::task::spawn_blocking(move || producer.flush(Timeout::After(left))).await;
        // The failures the flush reported reach the outbox through their batch's task.
        queued && matches!(flushed, Ok(Ok(()))) && self.awaiting.idle(deadline).await
    }
}

struct Batcher {
    producer: FutureProducer,
    node_id: Arc<str>,
    to_outbox: mpsc::UnboundedSender<OutboxRow>,
    awaiting: InFlight,
    in_flight: Arc<Semaphore>,
}

impl Batcher {
    async fn run(self, mut rx: mpsc::Receiver<Command>) {
        let mut rows = Vec::with_capacity(BATCH);
        while let Some(first) = rx.recv().await {
            let mut handover = None;
            match first {
                Command::Publish(row) => rows.push(row),
                Command::Handover(done) => handover = Some(done),
            }
            let deadline = tokio::time::Instant::now() + WINDOW;
            while handover.is_none() && rows.len() < BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(Command::Publish(row))) => rows.push(row),
                    Ok(Some(Command::Handover(done))) => handover = Some(done),
                    Ok(None) | Err(_) => break,
                }
            }
            let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                return;
            };
            // What queued while the earlier batches were awaited goes in this one.
            while handover.is_none() && rows.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Command::Publish(row)) => rows.push(row),
                    Ok(Command::Handover(done)) => handover = Some(done),
                    Err(_) => break,
                }
            }
            self.publish(std::mem::take(&mut rows), permit);
            if let Some(done) = handover {
                let _ = done.send(());
            }
        }
    }

    /// Hands `rows` to the producer and leaves a task awaiting their acknowledgements,
    /// holding `permit` until they are all answered.
    fn publish(&self, rows: Vec<OutboxRow>, permit: OwnedSemaphorePermit) {
        if rows.is_empty() {
            return;
        }
        let mut sent = Vec::with_capacity(rows.len());
        for row in rows {
            let record = FutureRecord::to(&row.topic)
                .key(&row.key)
                .payload(&row.payload);
            let delivery = self.producer.send_result(record).map_err(|(err, _)| err);
            match delivery {
                Ok(delivery) => sent.push((row.event_id, row.created_at_ms, delivery)),
                Err(err) => {
                    metrics::counter!(m::DIRECT_TO_OUTBOX, "reason" => "refused").increment(1);
                    tracing::debug!(event = %row.event_id, error = %err, "direct publish refused; event goes to the outbox");
                    let _ = self.to_outbox.send(row);
                }
            }
        }
        let node_id = self.node_id.clone();
        let to_outbox = self.to_outbox.clone();
        self.awaiting.spawn(async move {
            let _permit = permit;
            let (origins, deliveries): (Vec<_>, Vec<_>) = sent
                .into_iter()
                .map(|(id, at, delivery)| ((id, at), delivery))
                .unzip();
            for ((event_id, created_at_ms), outcome) in origins.into_iter().zip(join_all(deliveries).await) {
                // Err(Canceled): the producer was dropped before it answered (node gone).
                let Ok(Err((err, record))) = outcome else { continue };
                metrics::counter!(m::DIRECT_TO_OUTBOX, "reason" => "unacknowledged").increment(1);
                tracing::debug!(event = %event_id, error = %err, "direct publish failed; event goes to the outbox");
                // The receiver lives as long as the batch writer; after it nothing is stored.
                let _ = to_outbox.send(outbox_row(event_id, created_at_ms, &node_id, &record));
            }
        });
    }
}

fn outbox_row(
    event_id: String,
    created_at_ms: i64,
    node_id: &str,
    record: &OwnedMessage,
) -> OutboxRow {
    let text =
        |bytes: Option<&[u8]>| String::from_utf8_lossy(bytes.unwrap_or_default()).into_owned();
    OutboxRow {
        event_id,
        topic: record.topic().to_string(),
        key: text(record.key()),
        payload: text(record.payload()),
        node_id: node_id.to_string(),
        created_at_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::config::ClientConfig;

    fn row(id: &str) -> OutboxRow {
        OutboxRow {
            event_id: id.to_string(),
            topic: "message-status-events".to_string(),
            key: "tenant-a:bob".to_string(),
            payload: format!(r#"{{"id":"{id}","type":"MESSAGE_STATUS"}}"#),
            node_id: "n1".to_string(),
            created_at_ms: 1_700_000_000_123,
        }
    }

    /// No broker listens on port 1: the records are never acknowledged, and by the end of
    /// the flush each has come back whole, as the row the outbox needs.
    #[tokio::test]
    async fn unacknowledged_records_come_back_as_outbox_rows() {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "500")
            .create()
            .expect("producer");
        let (to_outbox, mut back) = mpsc::unbounded_channel();
        let direct = DirectPublisher::start(producer, "n1", to_outbox);
        let sent = [row("e1"), row("e2")];
        for r in &sent {
            assert!(direct.send(r.clone()).is_none(), "accepted into the queue");
        }
        assert!(
            direct.flush(Duration::from_secs(10)).await,
            "each record failed within the timeout and was handed back"
        );
        let mut returned = Vec::new();
        while let Ok(r) = back.try_recv() {
            returned.push(r);
        }
        returned.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        assert_eq!(returned, sent, "every record back by the end of the flush");
    }
}
