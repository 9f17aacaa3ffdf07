//! Generating a session's chunks: each is cached and announced only while this node
//! holds the session's lease (a fenced write), then sent live to the starting connection;
//! a generator that lost its lease stops, and its connection follows the new owner.

use chatstream_protocol::events::{self as ev, EventBody};
use chatstream_protocol::frames::StreamOutcome;
use chatstream_protocol::ServerFrame;
use futures::future::BoxFuture;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock;
use crate::events::stable_id;
use crate::generator::Generator;
use crate::hub::{Outbound, Outlet};
use crate::metrics as m;
use crate::redis_link::RedisLinkError;
use crate::state::NodeState;

use super::resume::resume;
use super::{channel, chunks_key, lease_key, lease_ms, meta_key, CacheItem, Session};

/// Caches an item (and renews the lease) only for the lease holder, and announces it. A
/// lease that ran out with nobody taking it (the owner was slow, not dead) is renewed.
/// KEYS: lease, chunks, meta. ARGV: token, item, ttl_s, lease_ms, channel, end status
/// ("" for a chunk), total.
const WRITE_SCRIPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[4])
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[3], 'status', ARGV[6], 'total', ARGV[7])
end
redis.call('PUBLISH', ARGV[5], ARGV[2])
return 1
";

/// Renews the lease for its holder (or takes it again if it ran out with nobody taking
/// it, as a cache write does). KEYS: lease. ARGV: token, lease_ms.
const RENEW_SCRIPT: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// Runs `work` (a store that waits on PostgreSQL) while renewing this generator's lease
/// every third of it: a wait longer than the lease must not hand a live stream to a
/// follower's node. Under overload in `steady`, STREAM_COMPLETED's store outlasted the
/// 2 s lease again and again: a follower took the session over, the new generator's store
/// outlasted it in turn, and each fenced generator stopped before writing the end (one
/// session was taken over 65 times in three minutes).
async fn holding_lease<T>(state: &NodeState, s: &Session, work: impl Future<Output = T>) -> T {
    let mut renew = tokio::time::interval(Duration::from_millis(lease_ms(&s.cfg) / 3));
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; the lease was just written.
    renew.tick().await;
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = renew.tick() => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(RENEW_SCRIPT)
                    .arg(1)
                    .arg(lease_key(s.id()))
                    .arg(&s.token)
                    .arg(lease_ms(&s.cfg));
                // Not renewed (fenced, or Redis away): the next cache write says what to do.
                let _ = state
                    .redis
                    .run(|mut conn| async move { cmd.query_async::<i64>(&mut conn).await })
                    .await;
            }
        }
    }
}

/// What a cache write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    Cached,
    /// Another node holds the session's lease now: this generator must stop.
    Fenced,
    /// Redis did not take it (the chunk still goes out live).
    Failed,
}

async fn cache(state: &NodeState, s: &Session, item: &CacheItem) -> Result<bool, RedisLinkError> {
    let text = serde_json::to_string(item).map_err(|e| RedisLinkError::Refused(e.to_string()))?;
    let (status, total) = match item {
        CacheItem::Chunk { .. } => ("", 0),
        CacheItem::End {
            outcome: StreamOutcome::Completed,
            total,
            ..
        } => ("completed", *total),
        CacheItem::End {
            outcome: StreamOutcome::Failed,
            total,
            ..
        } => ("failed", *total),
    };
    let session = s.id();
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(WRITE_SCRIPT)
        .arg(3)
        .arg(lease_key(session))
        .arg(chunks_key(session))
        .arg(meta_key(session))
        .arg(&s.token)
        .arg(text)
        .arg(s.cfg.cache_ttl_s)
        .arg(lease_ms(&s.cfg))
        .arg(channel(session))
        .arg(status)
        .arg(total);
    state
        .redis
        .run(|mut conn| async move { cmd.query_async::<i64>(&mut conn).await })
        .await
        .map(|n| n == 1)
}

/// Caches with a few retries: a chunk that cannot be cached is still sent live.
async fn cache_with_retry(state: &NodeState, s: &Session, item: &CacheItem) -> Written {
    for attempt in 0..3 {
        match cache(state, s, item).await {
            Ok(true) => return Written::Cached,
            Ok(false) => {
                tracing::warn!(session = %s.id(), "another node holds this stream's lease now; this generator stops");
                return Written::Fenced;
            }
            Err(e) if attempt == 2 => {
                tracing::warn!(session = %s.id(), error = %e, "chunk not cached; resume will miss it");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100 << attempt)).await,
        }
    }
    Written::Failed
}

/// Generates the session's chunks from index `from` on (0 for a new session; the one
/// after the last cached chunk for a session taken over), until its end.
pub(super) async fn generate(
    state: Arc<NodeState>,
    s: Session,
    from: i64,
    live: Option<Arc<Outlet>>,
) {
    let session = s.id().to_string();
    let message_id = s.ctx.message_id.clone().unwrap_or_default();
    let generator = Generator::new(s.cfg.clone());
    let pace = Duration::from_millis(s.cfg.pace_ms);
    let mut last = Instant::now();
    // The text so far is what the chunks before `from` were: the generator is deterministic.
    let mut response: String = (0..from)
        .map(|i| generator.chunk_text(&s.prompt, i))
        .collect();
    // A chunk that does not fit closes the (too slow) connection; the client resumes.
    let send_live = |frame: ServerFrame| {
        if let Some(outlet) = &live {
            let _ = outlet.push(Outbound::from(frame.encode()));
        }
    };
    // The last chunk index the live connection was sent.
    let mut sent = from - 1;
    for index in from..s.plan.chunks {
        tokio::time::sleep(pace).await;
        if s.plan.fail_at == Some(index) {
            let error = format!(
                "generator failed at chunk {index} (injected, error_rate {})",
                s.cfg.error_rate
            );
            // Stored before any client can see the end.
            let e = state.events.envelope_with_id(
                stable_id(&[&session, "STREAM_ERROR"]),
                &s.ctx,
                EventBody::StreamError(ev::StreamError {
                    session_id: session.clone(),
                    message_id: message_id.clone(),
                    conversation_id: s.ctx.conversation_id.clone().unwrap_or_default(),
                    error: error.clone(),
                    error_code: "GENERATOR_ERROR".into(),
                    chunk_index: index,
                }),
            );
            holding_lease(&state, &s, state.events.emit_confirmed(e)).await;
            let end = CacheItem::End {
                outcome: StreamOutcome::Failed,
                total: index,
                error: Some(error.clone()),
            };
            if cache_with_retry(&state, &s, &end).await == Written::Fenced {
                return follow_new_owner(state, s, sent, live).await;
            }
            send_live(ServerFrame::StreamEnd {
                session_id: session.clone(),
                outcome: StreamOutcome::Failed,
                total_chunks: index,
                error: Some(error),
            });
            return;
        }
        let text = generator.chunk_text(&s.prompt, index);
        let now = clock::now_ms();
        response.push_str(&text);
        let chunk = CacheItem::Chunk {
            index,
            text: text.clone(),
            ts_ms: now,
        };
        if cache_with_retry(&state, &s, &chunk).await == Written::Fenced {
            return follow_new_owner(state, s, sent, live).await;
        }
        send_live(ServerFrame::Chunk {
            session_id: session.clone(),
            index,
            text: text.clone(),
            ts_ms: now,
        });
        sent = index;
        metrics::counter!(m::STREAM_CHUNKS).increment(1);
        let e = state.events.envelope_with_id(
            stable_id(&[&session, "CHUNK_RECEIVED", &index.to_string()]),
            &s.ctx,
            EventBody::ChunkReceived(ev::ChunkReceived {
                session_id: session.clone(),
                message_id: message_id.clone(),
                chunk_index: index,
                content_length: text.len(),
                latency_ms: last.elapsed().as_millis() as u64,
            }),
        );
        last = Instant::now();
        holding_lease(&state, &s, state.events.emit(e)).await;
    }
    let words = s.plan.chunks as usize * s.cfg.words_per_chunk;
    let e = state.events.envelope_with_id(
        stable_id(&[&session, "STREAM_COMPLETED"]),
        &s.ctx,
        EventBody::StreamCompleted(ev::StreamCompleted {
            session_id: session.clone(),
            message_id,
            conversation_id: s.ctx.conversation_id.clone().unwrap_or_default(),
            total_chunks: s.plan.chunks,
            content_length: response.len(),
            total_latency_ms: (clock::now_ms() - s.started_ms).max(0) as u64,
            words,
            tokens_used: words * 4 / 3,
            response,
        }),
    );
    // Stored before any client can see the end.
    holding_lease(&state, &s, state.events.emit_confirmed(e)).await;
    let end = CacheItem::End {
        outcome: StreamOutcome::Completed,
        total: s.plan.chunks,
        error: None,
    };
    if cache_with_retry(&state, &s, &end).await == Written::Fenced {
        return follow_new_owner(state, s, sent, live).await;
    }
    send_live(ServerFrame::StreamEnd {
        session_id: session.clone(),
        outcome: StreamOutcome::Completed,
        total_chunks: s.plan.chunks,
        error: None,
    });
}

/// This generator lost its lease (it was paused or cut off past it, and another node took
/// the session over): its live connection, if any, follows the new owner like a resume.
/// Boxed: it resumes, which may take a session over and spawn a generator.
fn follow_new_owner(
    state: Arc<NodeState>,
    s: Session,
    sent: i64,
    live: Option<Arc<Outlet>>,
) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let Some(outlet) = live else { return };
        let Some(user) = s.ctx.user_id.clone() else {
            return;
        };
        let session = s.id().to_string();
        if let Err((code, message)) =
            resume(&state, &s.ctx.tenant, &user, &session, sent, outlet.clone()).await
        {
            let frame = ServerFrame::Error {
                code,
                message,
                ref_id: Some(session),
                retry_after_ms: None,
            };
            let _ = outlet.push(Outbound::from(frame.encode()));
        }
    })
}
