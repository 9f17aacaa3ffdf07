//! Cross-node fan-out through Redis Pub/Sub: the accepting node publishes one envelope per
//! action naming its recipients; every node delivers it to the recipients connected to it.
//! Pub/Sub is at-most-once: whatever a node misses (Redis down, node restarting) clients
//! recover with `sync`, which is what makes delivery at-least-once.

use futures::StreamExt;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use crate::hub::ConnId;
use crate::metrics as m;

pub const CHANNEL: &str = "chatstream:fanout";

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FanoutEnvelope {
    pub origin_node: String,
    /// The connection the action came from; it is not sent its own frame back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_conn: Option<ConnId>,
    pub recipients: Vec<String>,
    /// The encoded server frame.
    pub frame: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Receipt>,
}

pub async fn publish(conn: &mut ConnectionManager, env: &FanoutEnvelope) -> Result<(), String> {
    let text = serde_json::to_string(env).map_err(|e| e.to_string())?;
    let r: redis::RedisResult<i64> = redis::cmd("PUBLISH")
        .arg(CHANNEL)
        .arg(text)
        .query_async(conn)
        .await;
    match r {
        Ok(_) => {
            metrics::counter!(m::FANOUT_PUBLISHED).increment(1);
            Ok(())
        }
        Err(e) => {
            metrics::counter!(m::FANOUT_FAILED).increment(1);
            Err(e.to_string())
        }
    }
}

/// Subscribes to the fan-out channel and hands every envelope to `on_envelope`,
/// reconnecting with backoff when Redis goes away. `connected` says whether it is subscribed.
pub async fn run_subscriber<F>(
    client: redis::Client,
    connected: Arc<AtomicBool>,
    on_envelope: F,
    mut shutdown: watch::Receiver<bool>,
) where
    F: Fn(FanoutEnvelope),
{
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => match pubsub.subscribe(CHANNEL).await {
                Ok(()) => {
                    connected.store(true, Ordering::Relaxed);
                    backoff = Duration::from_millis(100);
                    tracing::info!(channel = CHANNEL, "fan-out subscriber connected");
                    let mut stream = pubsub.on_message();
                    loop {
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
                                None => break,
                            }
                        }
                    }
                    connected.store(false, Ordering::Relaxed);
                    tracing::warn!("fan-out subscription lost; reconnecting");
                }
                Err(e) => tracing::warn!(error = %e, "fan-out subscribe failed"),
            },
            Err(e) => {
                connected.store(false, Ordering::Relaxed);
                tracing::warn!(error = %e, "fan-out subscriber cannot reach redis; retrying in {backoff:?}");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
