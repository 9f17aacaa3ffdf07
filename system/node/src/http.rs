//! The node's HTTP surface: `/ws` (WebSocket upgrade), `/healthz`, `/readyz`, `/metrics`,
//! and a small JSON API: conversations (created by their first member; members changed
//! only by members, through `/api/conversations/{id}/members`), message history, and
//! `POST /api/chat` to start a stream. Every check names the caller's tenant.

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chatstream_protocol::auth::{self, Claims, TokenError};
use chatstream_protocol::events::{EventBody, MembershipChanged};
use chatstream_store::{ChangeOutcome, CreateOutcome, MembershipChange};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::clock;
use crate::events::{new_trace_id, EventContext};
use crate::fanout::FanoutEnvelope;
use crate::state::NodeState;
use crate::{conn, streams};

pub fn router(state: Arc<NodeState>) -> Router {
    Router::new()
        .route("/ws", get(ws))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/conversations", post(create_conversation))
        .route("/api/conversations/{id}/members", post(change_members))
        .route("/api/conversations/{id}/messages", get(history))
        .route("/api/chat", post(start_chat))
        .with_state(state)
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn token_from(headers: &HeaderMap, query: Option<String>) -> Option<String> {
    query.or_else(|| {
        headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string)
    })
}

fn authenticate(
    state: &NodeState,
    headers: &HeaderMap,
    query: Option<String>,
) -> Result<Claims, TokenError> {
    let token =
        token_from(headers, query).ok_or_else(|| TokenError::Malformed("no token given".into()))?;
    auth::verify(state.cfg.token_secret.as_bytes(), &token)
}

fn api_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "code": code, "message": message.into() })),
    )
        .into_response()
}

/// Each WebSocket's read buffer, bytes (see `ws`).
const READ_BUFFER_BYTES: usize = 1024;

async fn ws(
    State(state): State<Arc<NodeState>>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    // The upgrade happens even for a bad token, so the client gets an error frame and a
    // close reason instead of a bare HTTP 401.
    let auth = authenticate(&state, &headers, q.token);
    let cap = state.cfg.hard_frame_cap_bytes;
    upgrade
        .max_message_size(cap)
        .max_frame_size(cap)
        // The read buffer is allocated (and zeroed) for every connection, idle or not, and
        // never shrinks: 1 KiB holds a typical frame in one read; a larger frame grows it.
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(4 * 1024)
        .on_upgrade(move |socket| conn::serve(state, socket, auth))
}

async fn readyz(State(state): State<Arc<NodeState>>) -> Response {
    let h = &state.health;
    let body = json!({
        "node_id": state.cfg.node_id,
        "ready": state.is_ready(),
        "postgres": h.postgres.load(Ordering::Relaxed),
        "migrated": h.migrated.load(Ordering::Relaxed),
        "redis": state.redis_ok(),
        "redis_link": state.redis.is_up(),
        "kafka": h.kafka.load(Ordering::Relaxed),
        "fanout_subscribed": h.fanout_subscribed.load(Ordering::Relaxed),
        "outbox_relay": h.relay.load(Ordering::Relaxed),
        "fanout_assigned": h.fanout_assigned.load(Ordering::Relaxed),
        "connections": state.hub.connection_count(),
        "publish_mode": state.cfg.publish_mode,
        "fanout_mode": state.cfg.fanout_mode,
    });
    let status = if state.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<NodeState>>) -> String {
    state.metrics.render()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewConversation {
    id: String,
    members: Vec<String>,
}

const MAX_ID_BYTES: usize = 128;
const MAX_MEMBERS: usize = 10_000;

fn valid_ids(ids: &[String]) -> bool {
    ids.iter().all(|u| !u.is_empty() && u.len() <= MAX_ID_BYTES)
}

/// 400 `invalid_argument` naming the first field that holds a NUL character: PostgreSQL
/// TEXT and JSONB refuse NUL, so it is refused here rather than failing downstream.
fn refuse_nul<'a>(fields: impl IntoIterator<Item = (&'static str, &'a str)>) -> Option<Response> {
    fields
        .into_iter()
        .find(|(_, text)| chatstream_protocol::has_nul(text))
        .map(|(name, _)| {
            api_error(
                StatusCode::BAD_REQUEST,
                "invalid_argument",
                format!("{name} holds a NUL character (\\u0000), which is not accepted"),
            )
        })
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    api_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        e.to_string(),
    )
}

/// The MEMBERSHIP_CHANGED event of a change made by `claims` in `conversation`.
fn membership_event(
    state: &NodeState,
    claims: &Claims,
    conversation: &str,
    change: MembershipChanged,
) -> chatstream_protocol::EventEnvelope {
    let ctx = EventContext {
        tenant: claims.tenant.clone(),
        trace_id: new_trace_id(),
        conversation_id: Some(conversation.to_string()),
        user_id: Some(claims.sub.clone()),
        ..Default::default()
    };
    state
        .events
        .envelope(&ctx, EventBody::MembershipChanged(change))
}

/// Creates a conversation with its first members (the caller among them). An existing id
/// is never changed here: a member re-creating it with the same members gets 200, anyone
/// else 403 (not a member) or 409 (other members: use the members API).
async fn create_conversation(
    State(state): State<Arc<NodeState>>,
    headers: HeaderMap,
    Json(req): Json<NewConversation>,
) -> Response {
    let claims = match authenticate(&state, &headers, None) {
        Ok(c) => c,
        Err(e) => return api_error(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
    };
    let texts = std::iter::once(("id", req.id.as_str()))
        .chain(req.members.iter().map(|m| ("members", m.as_str())));
    if let Some(refused) = refuse_nul(texts) {
        return refused;
    }
    if req.id.is_empty()
        || req.id.len() > MAX_ID_BYTES
        || req.members.is_empty()
        || req.members.len() > MAX_MEMBERS
        || !valid_ids(&req.members)
    {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("id must have 1..={MAX_ID_BYTES} bytes and members 1..={MAX_MEMBERS} user ids of 1..={MAX_ID_BYTES} bytes"),
        );
    }
    if !req.members.contains(&claims.sub) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "the creator must be one of the members",
        );
    }
    let outcome = state
        .store
        .create_conversation(
            &claims.tenant,
            &req.id,
            &claims.sub,
            &req.members,
            clock::now_ms(),
            |members| {
                state.events.transactional_rows(|| {
                    membership_event(
                        &state,
                        &claims,
                        &req.id,
                        MembershipChanged {
                            conversation_id: req.id.clone(),
                            actor_id: claims.sub.clone(),
                            added: members.to_vec(),
                            removed: Vec::new(),
                            created: true,
                        },
                    )
                })
            },
        )
        .await;
    match outcome {
        Ok(CreateOutcome::Created) => {
            after_membership_change(&state, &claims, &req.id, &req.members, &[], true).await;
            (
                StatusCode::CREATED,
                Json(json!({ "id": req.id, "members": req.members })),
            )
                .into_response()
        }
        Ok(CreateOutcome::AlreadyExists) => (
            StatusCode::OK,
            Json(json!({ "id": req.id, "members": req.members })),
        )
            .into_response(),
        Ok(CreateOutcome::MembersDiffer { members }) => (
            StatusCode::CONFLICT,
            Json(json!({
                "code": "already_exists",
                "message": format!("conversation {} exists with other members; change them with POST /api/conversations/{}/members", req.id, req.id),
                "members": members,
            })),
        )
            .into_response(),
        Ok(CreateOutcome::NotMember) => api_error(
            StatusCode::FORBIDDEN,
            "not_member",
            format!(
                "conversation {} exists and {} is not a member of it",
                req.id, claims.sub
            ),
        ),
        Err(e) => unavailable(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersChange {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

/// Adds and removes members; members only. Answers the members after the change and what
/// it really changed (adding a member or removing a non-member changes nothing).
async fn change_members(
    State(state): State<Arc<NodeState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(req): Json<MembersChange>,
) -> Response {
    let claims = match authenticate(&state, &headers, None) {
        Ok(c) => c,
        Err(e) => return api_error(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
    };
    let texts = std::iter::once(("id", id.as_str()))
        .chain(req.add.iter().map(|m| ("add", m.as_str())))
        .chain(req.remove.iter().map(|m| ("remove", m.as_str())));
    if let Some(refused) = refuse_nul(texts) {
        return refused;
    }
    if req.add.len() + req.remove.len() > MAX_MEMBERS
        || !valid_ids(&req.add)
        || !valid_ids(&req.remove)
    {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            format!("add and remove take up to {MAX_MEMBERS} user ids of 1..={MAX_ID_BYTES} bytes"),
        );
    }
    let outcome = state
        .store
        .change_members(
            &MembershipChange {
                tenant: &claims.tenant,
                conversation_id: &id,
                actor: &claims.sub,
                add: &req.add,
                remove: &req.remove,
                now_ms: clock::now_ms(),
            },
            |delta| {
                state.events.transactional_rows(|| {
                    membership_event(
                        &state,
                        &claims,
                        &id,
                        MembershipChanged {
                            conversation_id: id.clone(),
                            actor_id: claims.sub.clone(),
                            added: delta.added.clone(),
                            removed: delta.removed.clone(),
                            created: false,
                        },
                    )
                })
            },
        )
        .await;
    match outcome {
        Ok(ChangeOutcome::Changed { delta, members }) => {
            if !delta.added.is_empty() || !delta.removed.is_empty() {
                after_membership_change(&state, &claims, &id, &delta.added, &delta.removed, false)
                    .await;
            }
            Json(json!({
                "id": id,
                "members": members,
                "added": delta.added,
                "removed": delta.removed,
            }))
            .into_response()
        }
        Ok(ChangeOutcome::NotFound) => api_error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no conversation {id}"),
        ),
        Ok(ChangeOutcome::NotMember) => api_error(
            StatusCode::FORBIDDEN,
            "not_member",
            format!("{} is not a member of {id}", claims.sub),
        ),
        Ok(ChangeOutcome::WouldBeEmpty) => api_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "a conversation keeps at least one member",
        ),
        Err(e) => unavailable(e),
    }
}

/// After a committed membership change: every node drops its cached members, and the
/// change's event is published by the mode (outbox rows were committed with it).
async fn after_membership_change(
    state: &NodeState,
    claims: &Claims,
    conversation: &str,
    added: &[String],
    removed: &[String],
    created: bool,
) {
    state.members.invalidate(conversation);
    state.fanout(FanoutEnvelope::members_changed(
        &state.cfg.node_id,
        conversation,
    ));
    match state.events.mode() {
        crate::config::PublishMode::Outbox => state.events.poke_relay(),
        crate::config::PublishMode::Async => {
            let e = membership_event(
                state,
                claims,
                conversation,
                MembershipChanged {
                    conversation_id: conversation.to_string(),
                    actor_id: claims.sub.clone(),
                    added: added.to_vec(),
                    removed: removed.to_vec(),
                    created,
                },
            );
            state.events.emit(e).await;
        }
        crate::config::PublishMode::None => {}
    }
}

#[derive(Deserialize)]
struct HistoryQuery {
    after_seq: Option<i64>,
    limit: Option<i64>,
}

async fn history(
    State(state): State<Arc<NodeState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Response {
    let claims = match authenticate(&state, &headers, None) {
        Ok(c) => c,
        Err(e) => return api_error(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
    };
    if let Some(refused) = refuse_nul([("id", id.as_str())]) {
        return refused;
    }
    match state
        .store
        .is_member(&id, &claims.tenant, &claims.sub)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            return api_error(
                StatusCode::FORBIDDEN,
                "not_member",
                format!("{} is not a member of {id}", claims.sub),
            )
        }
        Err(e) => {
            return api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            )
        }
    }
    let limit = q.limit.unwrap_or(100).clamp(1, state.cfg.sync_limit);
    match state.store.messages_after(&id, q.after_seq.unwrap_or(0).max(0), limit).await {
        Ok(msgs) => Json(json!({
            "conversation_id": id,
            "messages": msgs.into_iter().map(|m| json!({
                "message_id": m.message_id, "client_msg_id": m.client_msg_id, "seq": m.seq,
                "sender_id": m.sender_id, "body": m.body, "created_at_ms": m.created_at_ms, "trace_id": m.trace_id,
            })).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => api_error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRequest {
    conversation_id: String,
    prompt: String,
}

async fn start_chat(
    State(state): State<Arc<NodeState>>,
    headers: HeaderMap,
    Json(req): Json<ChatRequest>,
) -> Response {
    let claims = match authenticate(&state, &headers, None) {
        Ok(c) => c,
        Err(e) => return api_error(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
    };
    if let Some(refused) = refuse_nul([
        ("conversation_id", req.conversation_id.as_str()),
        ("prompt", req.prompt.as_str()),
    ]) {
        return refused;
    }
    if req.prompt.is_empty() {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "prompt is empty",
        );
    }
    match state
        .store
        .is_member(&req.conversation_id, &claims.tenant, &claims.sub)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            return api_error(
                StatusCode::FORBIDDEN,
                "not_member",
                format!("{} is not a member of {}", claims.sub, req.conversation_id),
            )
        }
        Err(e) => {
            return api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            )
        }
    }
    match streams::start(&state, &claims.sub, &claims.tenant, &req.conversation_id, &req.prompt, None).await {
        Ok(s) => (
            StatusCode::CREATED,
            Json(json!({ "session_id": s.session_id, "message_id": s.message_id, "resume": { "type": "resume", "session_id": s.session_id, "after_index": -1 } })),
        )
            .into_response(),
        Err((code, message)) => api_error(StatusCode::SERVICE_UNAVAILABLE, &format!("{code:?}"), message),
    }
}
