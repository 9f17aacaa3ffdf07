//! AI-style streams: a deterministic, seedable generator stands in for the model. Each
//! chunk is cached in Redis (a list per session, with a TTL) and announced on a channel
//! per session, so a client that reconnects to any node can `resume` after its last index
//! and receive the rest. Every Redis call goes through the node's link (bounded, and
//! refused at once while Redis is away); a session belongs to a user of one tenant.

use chatstream_protocol::events::{self as ev, EventBody};
use chatstream_protocol::frames::{ErrorCode, StreamOutcome};
use chatstream_protocol::ServerFrame;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock;
use crate::config::StreamConfig;
use crate::events::{new_id, new_trace_id, EventContext};
use crate::hub::{Outbound, Outlet, PushError};
use crate::metrics as m;
use crate::redis_link::{RedisLinkError, CONNECT_TIMEOUT, OP_TIMEOUT};
use crate::server::NodeState;

const WORDS: &[&str] = &[
    "the",
    "event",
    "stream",
    "replays",
    "every",
    "chunk",
    "in",
    "order",
    "so",
    "clients",
    "resume",
    "where",
    "they",
    "left",
    "off",
    "after",
    "a",
    "reconnect",
    "kafka",
    "keeps",
    "history",
    "while",
    "redis",
    "fans",
    "out",
    "live",
    "messages",
    "across",
    "nodes",
    "and",
    "postgres",
    "stores",
];

/// What the generator will do for a prompt: how many chunks, and where it fails (if it does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub chunks: i64,
    pub fail_at: Option<i64>,
}

pub struct Streams {
    cfg: StreamConfig,
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Streams {
    pub fn new(cfg: StreamConfig) -> Self {
        Streams { cfg }
    }

    pub fn config(&self) -> &StreamConfig {
        &self.cfg
    }

    /// Same seed and prompt, same plan.
    pub fn plan(&self, prompt: &str) -> Plan {
        let mut rng = Pcg64::seed_from_u64(self.cfg.seed ^ fnv(prompt));
        let fails = rng.random_bool(self.cfg.error_rate);
        Plan {
            chunks: self.cfg.chunks,
            fail_at: fails.then(|| rng.random_range(0..self.cfg.chunks)),
        }
    }

    /// The text of chunk `index` (same seed, prompt and index: same text).
    pub fn chunk_text(&self, prompt: &str, index: i64) -> String {
        let mut rng = Pcg64::seed_from_u64(
            self.cfg.seed ^ fnv(prompt) ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        let words: Vec<&str> = (0..self.cfg.words_per_chunk)
            .map(|_| WORDS[rng.random_range(0..WORDS.len())])
            .collect();
        format!("{} ", words.join(" "))
    }
}

fn chunks_key(session: &str) -> String {
    format!("chatstream:stream:{session}:chunks")
}
fn meta_key(session: &str) -> String {
    format!("chatstream:stream:{session}:meta")
}
fn channel(session: &str) -> String {
    format!("chatstream:stream:{session}")
}

/// What goes into the cache list and onto the session channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum CacheItem {
    Chunk {
        index: i64,
        text: String,
        ts_ms: i64,
    },
    End {
        outcome: StreamOutcome,
        total: i64,
        error: Option<String>,
    },
}

/// A session that was started.
pub struct Started {
    pub session_id: String,
    pub message_id: String,
}

/// Starts a session for `user` in `conversation` (membership already checked); chunks go
/// to `live` (the starting connection) and to the cache. Fails if Redis is unreachable.
pub async fn start(
    state: &Arc<NodeState>,
    user: &str,
    tenant: &str,
    conversation: &str,
    prompt: &str,
    live: Option<Arc<Outlet>>,
) -> Result<Started, (ErrorCode, String)> {
    let session_id = new_id();
    let message_id = new_id();
    let plan = state.streams.plan(prompt);
    let ttl = state.streams.config().cache_ttl_s as i64;
    let meta: Vec<(&str, String)> = vec![
        ("user", user.to_string()),
        ("tenant", tenant.to_string()),
        ("conversation", conversation.to_string()),
        ("message_id", message_id.clone()),
        ("owner", state.cfg.node_id.clone()),
        ("planned", plan.chunks.to_string()),
        ("status", "running".to_string()),
    ];
    let key = meta_key(&session_id);
    state
        .redis
        .run(|mut conn| async move {
            redis::pipe()
                .hset_multiple(&key, &meta)
                .ignore()
                .expire(&key, ttl)
                .ignore()
                .query_async::<()>(&mut conn)
                .await
        })
        .await
        .map_err(|e| {
            (
                ErrorCode::Unavailable,
                format!("{e}; the stream was not started"),
            )
        })?;
    metrics::counter!(m::STREAM_SESSIONS).increment(1);
    let ctx = EventContext {
        tenant: tenant.to_string(),
        trace_id: new_trace_id(),
        conversation_id: Some(conversation.to_string()),
        session_id: Some(session_id.clone()),
        user_id: Some(user.to_string()),
        message_id: Some(message_id.clone()),
    };
    state
        .events
        .emit(state.events.envelope(
            &ctx,
            EventBody::SessionStarted(ev::SessionStarted {
                session_id: session_id.clone(),
                message_id: message_id.clone(),
                conversation_id: conversation.to_string(),
                user_id: user.to_string(),
                prompt: prompt.to_string(),
                prompt_length: prompt.len(),
                planned_chunks: plan.chunks,
            }),
        ))
        .await;
    if let Some(outlet) = &live {
        // Queued before the first chunk can be.
        let started = ServerFrame::StreamStarted {
            session_id: session_id.clone(),
            conversation_id: conversation.to_string(),
            message_id: message_id.clone(),
        };
        let _ = outlet.push(Outbound::from(started.encode()));
    }
    tokio::spawn(generate(state.clone(), ctx, prompt.to_string(), plan, live));
    Ok(Started {
        session_id,
        message_id,
    })
}

async fn cache(
    state: &NodeState,
    session: &str,
    item: &CacheItem,
    ttl: i64,
) -> Result<(), RedisLinkError> {
    let text = serde_json::to_string(item).map_err(|e| RedisLinkError::Refused(e.to_string()))?;
    let mut pipe = redis::pipe();
    pipe.rpush(chunks_key(session), &text)
        .ignore()
        .expire(chunks_key(session), ttl)
        .ignore();
    if let CacheItem::End { outcome, total, .. } = item {
        let status = match outcome {
            StreamOutcome::Completed => "completed",
            StreamOutcome::Failed => "failed",
        };
        pipe.hset(meta_key(session), "status", status).ignore();
        pipe.hset(meta_key(session), "total", *total).ignore();
    }
    pipe.publish(channel(session), &text).ignore();
    state
        .redis
        .run(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
        .await
}

/// Caches with a few retries: a chunk that cannot be cached is still sent live.
async fn cache_with_retry(state: &NodeState, session: &str, item: &CacheItem, ttl: i64) {
    for attempt in 0..3 {
        match cache(state, session, item, ttl).await {
            Ok(()) => return,
            Err(e) if attempt == 2 => {
                tracing::warn!(%session, error = %e, "chunk not cached; resume will miss it")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100 << attempt)).await,
        }
    }
}

async fn generate(
    state: Arc<NodeState>,
    ctx: EventContext,
    prompt: String,
    plan: Plan,
    live: Option<Arc<Outlet>>,
) {
    let session = ctx.session_id.clone().unwrap_or_default();
    let message_id = ctx.message_id.clone().unwrap_or_default();
    let ttl = state.streams.config().cache_ttl_s as i64;
    let pace = Duration::from_millis(state.streams.config().pace_ms);
    let started = Instant::now();
    let mut last = Instant::now();
    let mut response = String::new();
    // A chunk that does not fit closes the (too slow) connection; the client resumes.
    let send_live = |frame: ServerFrame| {
        if let Some(outlet) = &live {
            let _ = outlet.push(Outbound::from(frame.encode()));
        }
    };
    for index in 0..plan.chunks {
        tokio::time::sleep(pace).await;
        if plan.fail_at == Some(index) {
            let error = format!(
                "generator failed at chunk {index} (injected, error_rate {})",
                state.streams.config().error_rate
            );
            cache_with_retry(
                &state,
                &session,
                &CacheItem::End {
                    outcome: StreamOutcome::Failed,
                    total: index,
                    error: Some(error.clone()),
                },
                ttl,
            )
            .await;
            send_live(ServerFrame::StreamEnd {
                session_id: session.clone(),
                outcome: StreamOutcome::Failed,
                total_chunks: index,
                error: Some(error.clone()),
            });
            let e = state.events.envelope(
                &ctx,
                EventBody::StreamError(ev::StreamError {
                    session_id: session.clone(),
                    message_id: message_id.clone(),
                    conversation_id: ctx.conversation_id.clone().unwrap_or_default(),
                    error,
                    error_code: "GENERATOR_ERROR".into(),
                    chunk_index: index,
                }),
            );
            state.events.emit(e).await;
            return;
        }
        let text = state.streams.chunk_text(&prompt, index);
        let now = clock::now_ms();
        response.push_str(&text);
        cache_with_retry(
            &state,
            &session,
            &CacheItem::Chunk {
                index,
                text: text.clone(),
                ts_ms: now,
            },
            ttl,
        )
        .await;
        send_live(ServerFrame::Chunk {
            session_id: session.clone(),
            index,
            text: text.clone(),
            ts_ms: now,
        });
        metrics::counter!(m::STREAM_CHUNKS).increment(1);
        let e = state.events.envelope(
            &ctx,
            EventBody::ChunkReceived(ev::ChunkReceived {
                session_id: session.clone(),
                message_id: message_id.clone(),
                chunk_index: index,
                content_length: text.len(),
                latency_ms: last.elapsed().as_millis() as u64,
            }),
        );
        last = Instant::now();
        state.events.emit(e).await;
    }
    cache_with_retry(
        &state,
        &session,
        &CacheItem::End {
            outcome: StreamOutcome::Completed,
            total: plan.chunks,
            error: None,
        },
        ttl,
    )
    .await;
    send_live(ServerFrame::StreamEnd {
        session_id: session.clone(),
        outcome: StreamOutcome::Completed,
        total_chunks: plan.chunks,
        error: None,
    });
    let words = plan.chunks as usize * state.streams.config().words_per_chunk;
    let e = state.events.envelope(
        &ctx,
        EventBody::StreamCompleted(ev::StreamCompleted {
            session_id: session.clone(),
            message_id,
            conversation_id: ctx.conversation_id.clone().unwrap_or_default(),
            total_chunks: plan.chunks,
            content_length: response.len(),
            total_latency_ms: started.elapsed().as_millis() as u64,
            words,
            tokens_used: words * 4 / 3,
            response,
        }),
    );
    state.events.emit(e).await;
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
/// rest until the end. Works on any node: the cache and the channel are in Redis.
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
    let idle_limit = Duration::from_millis(
        state
            .streams
            .config()
            .pace_ms
            .saturating_mul(20)
            .max(10_000),
    );
    if !ended {
        let mut messages = pubsub.on_message();
        while !ended {
            match tokio::time::timeout(idle_limit, messages.next()).await {
                Ok(Some(msg)) => {
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
                _ => break,
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
    state.events.emit(e).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_is_deterministic_and_seedable() {
        let a = Streams::new(StreamConfig::default());
        let b = Streams::new(StreamConfig::default());
        assert_eq!(a.chunk_text("hello", 3), b.chunk_text("hello", 3));
        assert_ne!(a.chunk_text("hello", 3), a.chunk_text("hello", 4));
        let other = Streams::new(StreamConfig {
            seed: 7,
            ..StreamConfig::default()
        });
        assert_ne!(a.chunk_text("hello", 3), other.chunk_text("hello", 3));
        assert_eq!(a.chunk_text("x", 0).split_whitespace().count(), 5);
    }

    #[test]
    fn error_rate_decides_failures() {
        let never = Streams::new(StreamConfig {
            error_rate: 0.0,
            ..StreamConfig::default()
        });
        let always = Streams::new(StreamConfig {
            error_rate: 1.0,
            ..StreamConfig::default()
        });
        for p in ["a", "b", "c"] {
            assert_eq!(never.plan(p).fail_at, None);
            let at = always.plan(p).fail_at.unwrap();
            assert!((0..20).contains(&at));
            assert_eq!(always.plan(p), always.plan(p));
        }
    }
}
