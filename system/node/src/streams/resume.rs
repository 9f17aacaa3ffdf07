//! Resuming a session on any node: the cached chunks after the client's last index,
//! then the live rest from the session's channel; a session whose generator is gone is
//! taken over (lease claimed) and generated on from the last cached chunk.

use chatstream_protocol::events::{self as ev, EventBody};
use chatstream_protocol::frames::ErrorCode;
use chatstream_protocol::ServerFrame;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::StreamConfig;
use crate::events::{new_trace_id, EventContext};
use crate::hub::{Outbound, Outlet, PushError};
use crate::metrics as m;
use crate::redis_link::{CONNECT_TIMEOUT, OP_TIMEOUT};
use crate::state::NodeState;

use super::generate::generate;
use super::{channel, chunks_key, lease_key, lease_ms, meta_key, owner_token, CacheItem, Session};

/// Claims the lease of a running session whose lease expired.
/// KEYS: meta, lease. ARGV: token, lease_ms, node id.
const TAKEOVER_SCRIPT: &str = r"
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('HSET', KEYS[1], 'owner', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'takeovers', 1)
  return 1
end
return 0
";

/// Takes the session over if its generator is gone (its lease expired while it still
/// runs): claims the lease and goes on generating after the last cached chunk. True when
/// this node now generates it.
async fn take_over(state: &Arc<NodeState>, session: &str, meta: &HashMap<String, String>) -> bool {
    let token = owner_token(state);
    let Some(s) = Session::from_meta(meta, session, token.clone()) else {
        return false;
    };
    let mut claim = redis::cmd("EVAL");
    claim
        .arg(TAKEOVER_SCRIPT)
        .arg(2)
        .arg(meta_key(session))
        .arg(lease_key(session))
        .arg(&token)
        .arg(lease_ms(&s.cfg))
        .arg(&state.cfg.node_id);
    let claimed = state
        .redis
        .run(|mut c| async move { claim.query_async::<i64>(&mut c).await })
        .await;
    if !matches!(claimed, Ok(1)) {
        return false;
    }
    // Read after the claim: the old owner can write nothing more (its writes are fenced).
    let key = chunks_key(session);
    let cached: Vec<String> = match state
        .redis
        .run(|mut c| async move {
            redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut c)
                .await
        })
        .await
    {
        Ok(c) => c,
        Err(e) => {
            // The lease runs out again by itself; the next resume tries anew.
            tracing::warn!(%session, error = %e, "took over a stream but cannot read its cache");
            return false;
        }
    };
    let from = cached
        .iter()
        .filter_map(|raw| match serde_json::from_str::<CacheItem>(raw) {
            Ok(CacheItem::Chunk { index, .. }) => Some(index + 1),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    metrics::counter!(m::STREAM_TAKEOVERS).increment(1);
    tracing::info!(%session, from, "took over a stream whose generator is gone");
    state.work.spawn(generate(state.clone(), s, from, None));
    true
}

/// Sends `item` to a resuming client unless it is a chunk the client already has (at the
/// client's pace: a resume is an answer to its own request). Ok(true): a new chunk went out.
async fn forward(
    outlet: &Outlet,
    session: &str,
    item: CacheItem,
    next: &mut i64,
    ended: &mut bool,
) -> Result<bool, PushError> {
    let new_chunk = match &item {
        CacheItem::Chunk { index, .. } if *index < *next => return Ok(false),
        CacheItem::Chunk { index, .. } => {
            *next = index + 1;
            true
        }
        CacheItem::End { .. } => {
            *ended = true;
            false
        }
    };
    outlet
        .push_wait(Outbound::from(frame_of(session, item).encode()))
        .await?;
    Ok(new_chunk)
}

fn frame_of(session: &str, item: CacheItem) -> ServerFrame {
    match item {
        CacheItem::Chunk { index, text, ts_ms } => ServerFrame::Chunk {
            session_id: session.to_string(),
            index,
            text,
            ts_ms,
        },
        CacheItem::End {
            outcome,
            total,
            error,
        } => ServerFrame::StreamEnd {
            session_id: session.to_string(),
            outcome,
            total_chunks: total,
            error,
        },
    }
}

/// Sends `user` of `tenant` the chunks of `session` after `after_index`, then the live
/// rest until the end. Works on any node: the cache and the channel are in Redis; when the
/// generating node is gone this node takes the session over and generates the rest.
pub async fn resume(
    state: &Arc<NodeState>,
    tenant: &str,
    user: &str,
    session: &str,
    after_index: i64,
    outlet: Arc<Outlet>,
) -> Result<(), (ErrorCode, String)> {
    let unavailable = |e: String| (ErrorCode::Unavailable, e);
    let key = meta_key(session);
    let meta: HashMap<String, String> = state
        .redis
        .run(|mut c| async move { redis::cmd("HGETALL").arg(&key).query_async(&mut c).await })
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    if meta.get("user").map(String::as_str) != Some(user)
        || meta.get("tenant").map(String::as_str) != Some(tenant)
    {
        return Err((
            ErrorCode::NotFound,
            format!("no stream session {session} for this user (expired or never started)"),
        ));
    }
    // Subscribe before reading the cache, so nothing falls between the two. A connection
    // of its own (subscribed connections take no other commands), bounded like the link.
    let subscribed = async {
        let mut pubsub =
            tokio::time::timeout(CONNECT_TIMEOUT, state.redis.client().get_async_pubsub())
                .await
                .map_err(|_| format!("redis: no connection within {CONNECT_TIMEOUT:?}"))?
                .map_err(|e| e.to_string())?;
        tokio::time::timeout(OP_TIMEOUT, pubsub.subscribe(channel(session)))
            .await
            .map_err(|_| format!("redis: SUBSCRIBE unanswered within {OP_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(pubsub)
    };
    let mut pubsub = subscribed.await.map_err(unavailable)?;
    let key = chunks_key(session);
    let cached: Vec<String> = state
        .redis
        .run(|mut c| async move {
            redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut c)
                .await
        })
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let ctx = EventContext {
        tenant: meta.get("tenant").cloned().unwrap_or_default(),
        trace_id: new_trace_id(),
        conversation_id: meta.get("conversation").cloned(),
        session_id: Some(session.to_string()),
        user_id: Some(user.to_string()),
        message_id: meta.get("message_id").cloned(),
    };
    let mut next = after_index + 1;
    let mut replayed = 0i64;
    let mut ended = false;
    for raw in cached {
        let Ok(item) = serde_json::from_str::<CacheItem>(&raw) else {
            continue;
        };
        match forward(&outlet, session, item, &mut next, &mut ended).await {
            Ok(true) => replayed += 1,
            Ok(false) => {}
            Err(_) => break,
        }
    }
    // The session's own pace, not this node's: it may have been started elsewhere.
    let pace_ms = meta
        .get("gen")
        .and_then(|g| serde_json::from_str::<StreamConfig>(g).ok())
        .map_or(state.generator.config().pace_ms, |c| c.pace_ms);
    let idle_limit = Duration::from_millis(pace_ms.saturating_mul(20).max(10_000));
    // How long without a chunk before checking whether the generator is still alive.
    let probe = Duration::from_millis(pace_ms.saturating_mul(2).max(250));
    let mut shutdown = state.shutdown.clone();
    if !ended {
        let mut messages = pubsub.on_message();
        let mut heard = Instant::now();
        while !ended && !outlet.is_closed() {
            let msg = tokio::select! {
                msg = tokio::time::timeout(probe, messages.next()) => msg,
                _ = shutdown.changed() => break,
            };
            match msg {
                Ok(Some(msg)) => {
                    heard = Instant::now();
                    let Ok(raw) = msg.get_payload::<String>() else {
                        continue;
                    };
                    if let Ok(item) = serde_json::from_str::<CacheItem>(&raw) {
                        if forward(&outlet, session, item, &mut next, &mut ended)
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    if take_over(state, session, &meta).await {
                        heard = Instant::now();
                    } else if heard.elapsed() >= idle_limit {
                        break;
                    }
                }
            }
        }
    }
    let success = ended;
    let e = state.events.envelope(
        &ctx,
        EventBody::RecoveryAttempt(ev::RecoveryAttempt {
            session_id: session.to_string(),
            user_id: user.to_string(),
            after_index,
            success,
            chunks_replayed: replayed,
        }),
    );
    // Stored beside the answer, not before it: the client is not kept waiting behind the
    // batch writer's queue (under load it held a refused resume's error for a minute).
    // Counted as node work, so a draining node commits it before it exits.
    let sink = state.clone();
    state
        .work
        .spawn(async move { sink.events.emit_confirmed(e).await });
    if success {
        Ok(())
    } else {
        Err((
            ErrorCode::Unavailable,
            format!(
                "stream {session} stopped producing chunks after index {}",
                next - 1
            ),
        ))
    }
}
