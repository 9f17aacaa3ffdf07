//! Cross-node fan-out through Redis Pub/Sub: the accepting node publishes one envelope per
//! action naming its recipients (a tenant and user ids); every node delivers it to the
//! recipients connected to it. Pub/Sub is at-most-once: whatever a node misses (Redis
//! down, node restarting) clients recover with `sync`, which is what makes delivery
//! at-least-once.
//!
//! Publishing is off the client's path: envelopes go into one FIFO queue that a single
//! publisher task drains in batches (one pipelined round trip per batch), so a node
//! publishes in the order it queued. A message takes its place in that queue inside its
//! append transaction, while it holds the conversation's row lock ([`Reservation`]), so
//! a conversation's messages are published in seq order even when several connections of
//! the node send to it at once. While the Redis link is down, envelopes are skipped at
//! once (counted), never waited for.
//!
//! The subscriber runs on a connection of its own, PINGs it every second (a black-holed
//! link is noticed, not waited on forever) and hands envelopes to its callback one by
//! one, in the order Redis delivered them.

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

use crate::hub::ConnId;
use crate::log_limit::LogLimiter;
use crate::metrics as m;
use crate::redis_link::{RedisLink, CONNECT_TIMEOUT, OP_TIMEOUT};

pub const CHANNEL: &str = "chatstream:fanout";

/// Envelopes waiting to be published; past this new ones are skipped (and counted).
const QUEUE_LIMIT: usize = 100_000;
/// Envelopes per pipelined PUBLISH round trip.
const BATCH: usize = 256;
/// How long the publisher waits for a reserved place to be filled (its append's commit).
const PLACE_WAIT: Duration = Duration::from_secs(2);
/// Subscriber liveness: a PING this often, answered within OP_TIMEOUT.
const SUBSCRIBER_PING_EVERY: Duration = Duration::from_secs(1);
/// Pause between subscribe attempts while Redis is unreachable.
const SUBSCRIBE_RETRY: Duration = Duration::from_millis(250);

/// Asks the recipient's node to report DELIVERED back to the sender.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    pub sender_id: String,
    pub conversation_id: String,
    pub message_id: String,
    pub seq: i64,
    pub tenant: String,
    pub trace_id: String,
}

/// A live message's place in its conversation, for ordered delivery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveOrder {
    pub conversation_id: String,
    pub seq: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FanoutEnvelope {
    pub origin_node: String,
    /// The connection the action came from; it is not sent its own frame back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_conn: Option<ConnId>,
    /// The recipients' tenant: user ids are only unique within a tenant.
    pub tenant: String,
    pub recipients: Vec<String>,
    /// The encoded server frame.
    pub frame: String,
    /// Set on live `msg` frames: recipients get a conversation's messages in seq order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_order: Option<LiveOrder>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Receipt>,
    /// A conversation whose membership changed: every node drops its cached members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members_changed: Option<String>,
}

impl FanoutEnvelope {
    /// An envelope that only tells every node that `conversation`'s members changed.
    pub fn members_changed(origin_node: &str, conversation: &str) -> Self {
        FanoutEnvelope {
            origin_node: origin_node.to_string(),
            origin_conn: None,
            tenant: String::new(),
            recipients: Vec::new(),
            frame: String::new(),
            live_order: None,
            receipt: None,
            members_changed: Some(conversation.to_string()),
        }
    }
}

enum Slot {
    Ready(Box<FanoutEnvelope>),
    Reserved(oneshot::Receiver<FanoutEnvelope>),
}

/// A place in the publish queue, taken before the envelope exists. Dropping it unfilled
/// (the append failed or was a duplicate) gives the place up.
pub struct Reservation {
    place: Option<oneshot::Sender<FanoutEnvelope>>,
}

impl Reservation {
    pub fn fill(mut self, env: FanoutEnvelope) {
        if let Some(place) = self.place.take() {
            if place.send(env).is_err() {
                // The publisher stopped waiting (PLACE_WAIT) or is gone.
                metrics::counter!(m::FANOUT_SKIPPED, "reason" => "late").increment(1);
            }
        }
    }
}

/// The handle that queues envelopes for the publisher task.
pub struct FanoutPublisher {
    tx: mpsc::UnboundedSender<Slot>,
    queued: Arc<AtomicUsize>,
}

/// The receiving end, for [`run_publisher`].
pub struct PublishQueue {
    rx: mpsc::UnboundedReceiver<Slot>,
    queued: Arc<AtomicUsize>,
}

pub fn publish_queue() -> (FanoutPublisher, PublishQueue) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        FanoutPublisher {
            tx,
            queued: queued.clone(),
        },
        PublishQueue { rx, queued },
    )
}

impl FanoutPublisher {
    fn enqueue(&self, slot: Slot) -> bool {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= QUEUE_LIMIT {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!(m::FANOUT_SKIPPED, "reason" => "queue_full").increment(1);
            return false;
        }
        if self.tx.send(slot).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Queues `env` for publishing; never waits.
    pub fn publish(&self, env: FanoutEnvelope) {
        self.enqueue(Slot::Ready(Box::new(env)));
    }

    /// Takes the next place in the queue for an envelope that is filled in later.
    pub fn reserve(&self) -> Reservation {
        let (tx, rx) = oneshot::channel();
        let queued = self.enqueue(Slot::Reserved(rx));
        Reservation {
            place: queued.then_some(tx),
        }
    }
}

/// Publishes queued envelopes in queue order until `shutdown`.
pub async fn run_publisher(
    link: Arc<RedisLink>,
    mut queue: PublishQueue,
    mut shutdown: watch::Receiver<bool>,
) {
    let failures = LogLimiter::new(Duration::from_secs(5));
    let mut batch: Vec<FanoutEnvelope> = Vec::with_capacity(BATCH);
    loop {
        let first = tokio::select! {
            slot = queue.rx.recv() => slot,
            _ = shutdown.changed() => return,
        };
        let Some(first) = first else { return };
        let mut taken = 1;
        let mut next = Some(first);
        while let Some(slot) = next.take() {
            match slot {
                Slot::Ready(env) => batch.push(*env),
                Slot::Reserved(place) => match tokio::time::timeout(PLACE_WAIT, place).await {
                    Ok(Ok(env)) => batch.push(env),
                    // Given up: the append failed or was a duplicate.
                    Ok(Err(_)) => {}
                    Err(_) => metrics::counter!(m::FANOUT_SKIPPED, "reason" => "late").increment(1),
                },
            }
            if batch.len() < BATCH {
                if let Ok(slot) = queue.rx.try_recv() {
                    taken += 1;
                    next = Some(slot);
                }
            }
        }
        queue.queued.fetch_sub(taken, Ordering::Relaxed);
        if batch.is_empty() {
            continue;
        }
        let n = batch.len() as u64;
        if !link.is_up() {
            metrics::counter!(m::FANOUT_SKIPPED, "reason" => "redis_down").increment(n);
            batch.clear();
            continue;
        }
        let mut pipe = redis::pipe();
        for env in batch.drain(..) {
            match serde_json::to_string(&env) {
                Ok(text) => {
                    pipe.publish(CHANNEL, text).ignore();
                }
                Err(e) => tracing::error!(error = %e, "unencodable fan-out envelope"),
            }
        }
        let published = link
            .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
            .await;
        match published {
            Ok(()) => metrics::counter!(m::FANOUT_PUBLISHED).increment(n),
            Err(e) => {
                metrics::counter!(m::FANOUT_FAILED).increment(n);
                if failures.allow() {
                    tracing::warn!(error = %e, envelopes = n, "fan-out publish failed; recipients catch up by sync");
                }
            }
        }
    }
}

/// Subscribes to the fan-out channel and hands every envelope to `on_envelope`, in order,
/// reconnecting when Redis goes away or stops answering. `connected` says whether the
/// subscription is live (subscribed and answering its PINGs).
pub async fn run_subscriber<F>(
    client: redis::Client,
    connected: Arc<AtomicBool>,
    mut on_envelope: F,
    mut shutdown: watch::Receiver<bool>,
) where
    F: FnMut(FanoutEnvelope),
{
    let mut last_error = String::new();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let subscribed = async {
            let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
                .await
                .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))?
                .map_err(|e| e.to_string())?;
            tokio::time::timeout(OP_TIMEOUT, pubsub.subscribe(CHANNEL))
                .await
                .map_err(|_| format!("SUBSCRIBE unanswered within {OP_TIMEOUT:?}"))?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(pubsub)
        };
        let pubsub = match subscribed.await {
            Ok(p) => p,
            Err(e) => {
                connected.store(false, Ordering::Relaxed);
                if e != last_error {
                    tracing::warn!(error = %e, "fan-out subscriber cannot reach redis; retrying every {SUBSCRIBE_RETRY:?}");
                    last_error = e;
                }
                tokio::select! {
                    _ = tokio::time::sleep(SUBSCRIBE_RETRY) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        last_error.clear();
        connected.store(true, Ordering::Relaxed);
        tracing::info!(channel = CHANNEL, "fan-out subscriber connected");
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval(SUBSCRIBER_PING_EVERY);
        let why = loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                msg = stream.next() => match msg {
                    Some(msg) => {
                        let payload: String = match msg.get_payload() {
                            Ok(p) => p,
                            Err(e) => { tracing::warn!(error = %e, "bad fan-out payload"); continue; }
                        };
                        match serde_json::from_str::<FanoutEnvelope>(&payload) {
                            Ok(env) => on_envelope(env),
                            Err(e) => tracing::warn!(error = %e, "undecodable fan-out envelope"),
                        }
                    }
                    None => break "connection closed".to_string(),
                },
                _ = ping.tick() => {
                    match tokio::time::timeout(OP_TIMEOUT, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => break format!("PING failed: {e}"),
                        Err(_) => break format!("PING unanswered within {OP_TIMEOUT:?}"),
                    }
                }
            }
        };
        connected.store(false, Ordering::Relaxed);
        tracing::warn!(reason = %why, "fan-out subscription lost; resubscribing (clients catch up by sync)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(frame: &str) -> FanoutEnvelope {
        FanoutEnvelope {
            origin_node: "n".into(),
            origin_conn: None,
            tenant: "t".into(),
            recipients: vec!["u".into()],
            frame: frame.into(),
            live_order: None,
            receipt: None,
            members_changed: None,
        }
    }

    #[tokio::test]
    async fn reserved_places_keep_their_order() {
        let (publisher, mut queue) = publish_queue();
        let first = publisher.reserve();
        publisher.publish(env("second"));
        let given_up = publisher.reserve();
        drop(given_up);
        first.fill(env("first"));
        let mut got = Vec::new();
        while let Ok(slot) = queue.rx.try_recv() {
            match slot {
                Slot::Ready(e) => got.push(e.frame),
                Slot::Reserved(rx) => {
                    if let Ok(e) = rx.await {
                        got.push(e.frame)
                    }
                }
            }
        }
        assert_eq!(got, ["first", "second"]);
    }

    #[test]
    fn envelopes_round_trip_and_old_fields_default() {
        let e = env("x");
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<FanoutEnvelope>(&text).unwrap(), e);
        assert!(!text.contains("live_order") && !text.contains("members_changed"));
    }
}
