//! Kafka clients of a node: the idempotent acks=all producer and the outbox relay that
//! uses it (and the last pass of a draining node), the fire-and-forget publisher of async
//! mode, and the chat-events consumer of Kafka fan-out mode.

use chatstream_protocol::events::{topic, EventBody};
use chatstream_protocol::EventEnvelope;
use chatstream_store::{PendingEvent, Refusal, RelayClaim, Store, OUTBOX_SHARDS};
use futures::future::join_all;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

use crate::clock;
use crate::metrics as m;

#[derive(Debug, thiserror::Error)]
#[error("kafka: {0}")]
pub struct KafkaError(pub String);

/// The idempotent producer (acks=all) the relay uses; `linger` is how long it holds
/// records to fill a request.
pub fn reliable_producer(bootstrap: &str, linger: Duration) -> Result<FutureProducer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // The Java client's partitioner: replay (and any Java consumer) can find a key's
        // partition without scanning.
        .set("partitioner", "murmur2_random")
        .set("linger.ms", linger.as_millis().to_string())
        .set("socket.nagle.disable", "true")
        .set("message.timeout.ms", "30000")
        .create()
        .map_err(|e| KafkaError(e.to_string()))
}

/// Async mode's producer, as the seeds use it: `send()` and move on (acks=1, no retries
/// beyond the client's own, errors only counted). Its linger is the node's
/// `kafka_linger_ms`, as the reliable producer's; what it holds when the node dies is lost.
#[derive(Clone)]
pub struct AsyncPublisher {
    producer: FutureProducer,
}

impl AsyncPublisher {
    pub fn new(bootstrap: &str, linger: Duration) -> Result<Self, KafkaError> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("acks", "1")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", linger.as_millis().to_string())
            .set("socket.nagle.disable", "true")
            .set("message.timeout.ms", "10000")
            .create()
            .map_err(|e| KafkaError(e.to_string()))?;
        Ok(AsyncPublisher { producer })
    }

    pub fn send(&self, e: &EventEnvelope) {
        let payload = e.to_json();
        let record = FutureRecord::to(e.topic()).key(e.key()).payload(&payload);
        match self.producer.send_result(record) {
            Ok(delivery) => {
                tokio::spawn(async move {
                    if !matches!(delivery.await, Ok(Ok(_))) {
                        metrics::counter!(m::ASYNC_FAILED).increment(1);
                    }
                });
            }
            Err((err, _)) => {
                metrics::counter!(m::ASYNC_FAILED).increment(1);
                tracing::warn!(error = %err, "async publish refused");
            }
        }
    }

    /// Waits (bounded) for queued sends, on graceful shutdown.
    pub fn flush(&self, timeout: Duration) {
        let _ = self.producer.flush(Timeout::After(timeout));
    }
}

/// Kafka refuses this record for good (larger than the client, the broker or the topic
/// accepts; or invalid): sending it again can never succeed.
fn refused_for_good(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::MessageSizeTooLarge | C::MessageBatchTooLarge | C::InvalidRecord)
    )
}

/// Sends a shard's batch. Ok names the events Kafka refused for good (the relay moves them
/// aside and goes on); Err when any send failed otherwise (the whole batch is retried).
async fn publish_batch(
    producer: &FutureProducer,
    events: Vec<PendingEvent>,
) -> Result<Vec<Refusal>, String> {
    // Sent in id order on one idempotent producer: per-partition order holds even on retry.
    let sends = events.iter().map(|e| {
        producer.send(
            FutureRecord::to(&e.topic).key(&e.key).payload(&e.payload),
            Timeout::After(Duration::from_secs(30)),
        )
    });
    let results = join_all(sends).await;
    let mut refused = Vec::new();
    let mut failed = Vec::new();
    let mut again = Vec::new();
    for (e, r) in events.iter().zip(results) {
        match r {
            Ok(_) => {}
            Err((err, _)) if refused_for_good(&err) => again.push(e),
            Err((err, _)) => failed.push(err.to_string()),
        }
    }
    // The broker refuses a whole produce batch when one record in it is too large, so the
    // records batched with it share its error: each is sent again on its own (in id order,
    // one at a time), and only one refused alone is refused for good.
    for e in again {
        if !failed.is_empty() {
            break;
        }
        let alone = producer
            .send(
                FutureRecord::to(&e.topic).key(&e.key).payload(&e.payload),
                Timeout::After(Duration::from_secs(30)),
            )
            .await;
        match alone {
            Ok(_) => {}
            Err((err, _)) if refused_for_good(&err) => refused.push(Refusal {
                id: e.id,
                error: err.to_string(),
            }),
            Err((err, _)) => failed.push(err.to_string()),
        }
    }
    if failed.is_empty() {
        metrics::counter!(m::OUTBOX_PUBLISHED).increment((events.len() - refused.len()) as u64);
        Ok(refused)
    } else {
        Err(format!(
            "{} of {} sends failed: {}",
            failed.len(),
            events.len(),
            failed[0]
        ))
    }
}

/// The outbox relay: claims its fair share of the shards (session locks on a PostgreSQL
/// connection of its own, see `RelayClaim`), then in each pass reads the pending rows of
/// every shard it holds in one statement, publishes them all at once on the idempotent
/// producer (in id order: per-key order holds) with no transaction open and no pooled
/// connection held, and marks them in one statement. The share is kept (free shards of a
/// dead relay taken, extra ones given back when relays start) at most every
/// `CLAIM_EVERY`. A failure gives every shard up (another relay may reach Kafka) and backs
/// off. Idles until poked or 100 ms pass; a pass that did not fill its batch is followed
/// no sooner than `pace.pass_every` after it started.
pub async fn run_relay(
    store: Store,
    migrated: Arc<AtomicBool>,
    producer: FutureProducer,
    pace: RelayPace,
    poke: Arc<Notify>,
    healthy: Arc<AtomicBool>,
    mut shutdown: watch::Receiver<bool>,
) {
    const CLAIM_EVERY: Duration = Duration::from_millis(500);
    let mut claim = RelayClaim::new(&store);
    let mut claimed_at: Option<tokio::time::Instant> = None;
    let mut backoff = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            break;
        }
        if !migrated.load(Ordering::Relaxed) {
            // The outbox table appears with the first migration (see run_health).
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let started = tokio::time::Instant::now();
        let pass = async {
            // Between passes (what the last one read is settled): the share is kept, free
            // shards (a dead relay's) taken, extra ones given back to new relays.
            if claimed_at.is_none_or(|at| at.elapsed() >= CLAIM_EVERY) {
                claimed_at = Some(tokio::time::Instant::now());
                claim.claim().await.map_err(|e| e.to_string())?;
            }
            let events = claim.pending(pace.batch).await.map_err(|e| e.to_string())?;
            if events.is_empty() {
                return Ok::<usize, String>(0);
            }
            let refusals = publish_batch(&producer, events.clone()).await?;
            let relayed = claim
                .settle(&events, refusals, clock::now_ms())
                .await
                .map_err(|e| e.to_string())?;
            for r in relayed.rejected {
                metrics::counter!(m::OUTBOX_REJECTED).increment(1);
                tracing::error!(event_id = %r.event_id, topic = %r.topic, key = %r.key, payload_bytes = r.payload_bytes, error = %r.error, "Kafka refused an outbox event for good; moved to outbox_rejected");
            }
            Ok(relayed.published)
        };
        match pass.await {
            Err(e) => {
                // Given up: this relay may be the one cut off (from Kafka or PostgreSQL).
                claim.release().await;
                claimed_at = None;
                healthy.store(false, Ordering::Relaxed);
                metrics::counter!(m::OUTBOX_ERRORS).increment(1);
                tracing::warn!(error = %e, "outbox relay could not publish; retrying in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Ok(published) => {
                healthy.store(true, Ordering::Relaxed);
                backoff = Duration::from_millis(200);
                if published == 0 {
                    tokio::select! {
                        _ = poke.notified() => {}
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = shutdown.changed() => {}
                    }
                } else if (published as i64) < pace.batch {
                    tokio::select! {
                        _ = tokio::time::sleep_until(started + pace.pass_every) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        }
    }
    // The shards go back at once (a draining node's last pass, or another relay, takes them).
    claim.release().await;
}

/// A draining node's last act: publishes pending outbox rows, every shard in turn, until
/// none written by `node_id` is left or `within` has passed. Returns how many are left
/// (they stay for the other nodes' relays), -1 when PostgreSQL could not say.
pub async fn drain_outbox(
    store: &Store,
    producer: &FutureProducer,
    batch: i64,
    node_id: &str,
    within: Duration,
) -> i64 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = match store.outbox_pending_for_node(node_id).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot count this node's pending outbox rows");
                return -1;
            }
        };
        if left == 0 || tokio::time::Instant::now() >= deadline {
            return left;
        }
        let mut published = 0usize;
        for shard in 0..OUTBOX_SHARDS {
            let p = producer.clone();
            match store
                .relay_shard(shard, batch, clock::now_ms(), move |events| async move {
                    publish_batch(&p, events).await
                })
                .await
            {
                Ok(Ok(relayed)) => {
                    published += relayed.published;
                    for r in relayed.rejected {
                        metrics::counter!(m::OUTBOX_REJECTED).increment(1);
                        tracing::error!(event_id = %r.event_id, topic = %r.topic, key = %r.key, payload_bytes = r.payload_bytes, error = %r.error, "Kafka refused an outbox event for good; moved to outbox_rejected");
                    }
                }
                Ok(Err(e)) => tracing::warn!(shard, error = %e, "draining the outbox"),
                Err(e) => tracing::warn!(shard, error = %e, "draining the outbox"),
            }
        }
        if published == 0 {
            // Another relay holds the shards with our rows, or Kafka is away: try again soon.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How a relay paces its passes.
#[derive(Debug, Clone, Copy)]
pub struct RelayPace {
    /// Rows read per pass at most.
    pub batch: i64,
    /// Least time between the starts of two passes when the first did not fill its batch.
    pub pass_every: Duration,
}

/// The fan-out consumer's context. On assignment every partition starts at its end as of
/// now (fetched here, not resolved lazily later), so any message produced once the
/// consumer is assigned is delivered; `assigned` tells readiness the consumer holds its
/// partitions. Nothing is committed: a fan-out starts at the end (clients sync the rest).
struct FanoutContext {
    assigned: Arc<AtomicBool>,
}

impl ClientContext for FanoutContext {}

impl ConsumerContext for FanoutContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut fixed = TopicPartitionList::new();
                for e in tpl.elements() {
                    let start = match consumer.fetch_watermarks(
                        e.topic(),
                        e.partition(),
                        Duration::from_secs(5),
                    ) {
                        Ok((_, high)) => Offset::Offset(high),
                        Err(err) => {
                            tracing::warn!(partition = e.partition(), error = %err, "fan-out: end offset unknown; starting at the logical end");
                            Offset::End
                        }
                    };
                    if let Err(err) = fixed.add_partition_offset(e.topic(), e.partition(), start) {
                        tracing::warn!(error = %err, "fan-out: bad partition in assignment");
                    }
                }
                match consumer.assign(&fixed) {
                    Ok(()) => {
                        tracing::info!(partitions = fixed.count(), "fan-out consumer assigned");
                        self.assigned.store(fixed.count() > 0, Ordering::Relaxed);
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "fan-out consumer could not take its assignment");
                        self.assigned.store(false, Ordering::Relaxed);
                    }
                }
            }
            other => {
                if other != RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                    tracing::warn!(error = ?other, "fan-out consumer rebalance error");
                }
                self.assigned.store(false, Ordering::Relaxed);
                if let Err(err) = consumer.unassign() {
                    tracing::warn!(error = %err, "fan-out consumer could not unassign");
                }
            }
        }
    }
}

/// Kafka fan-out mode: a consumer of chat-events in a group of this node's own (every node
/// sees every message), starting at the end; hands each CHAT_MESSAGE to `deliver`.
/// `assigned` holds while it has its partitions (readiness waits for it).
pub async fn run_chat_consumer<F, Fut>(
    bootstrap: String,
    node_id: String,
    assigned: Arc<AtomicBool>,
    deliver: F,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), KafkaError>
where
    F: Fn(EventEnvelope) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let consumer: StreamConsumer<FanoutContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", format!("chatstream-fanout-{node_id}"))
        .set("auto.offset.reset", "latest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .set("socket.nagle.disable", "true")
        .create_with_context(FanoutContext {
            assigned: assigned.clone(),
        })
        .map_err(|e| KafkaError(e.to_string()))?;
    consumer
        .subscribe(&[topic::CHAT_EVENTS])
        .map_err(|e| KafkaError(e.to_string()))?;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return Ok(()),
            msg = consumer.recv() => match msg {
                Ok(msg) => {
                    let Some(bytes) = msg.payload() else { continue };
                    match EventEnvelope::from_slice(bytes) {
                        Ok(e) if matches!(e.body, EventBody::ChatMessage(_)) => deliver(e).await,
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "undecodable chat event skipped by fan-out"),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fan-out consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}
