//! The node's HTTP surface: `/ws` (WebSocket upgrade), `/healthz`, `/readyz`, `/metrics`,
//! and a small JSON API (conversations, message history, `POST /api/chat` to start a stream).

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chatstream_protocol::auth::{self, Claims, TokenError};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::clock;
use crate::server::NodeState;
use crate::{conn, streams};

pub fn router(state: Arc<NodeState>) -> Router {
    Router::new()
        .route("/ws", get(ws))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/conversations", post(create_conversation))
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
        .read_buffer_size(4 * 1024)
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
        "redis": h.redis.load(Ordering::Relaxed),
        "kafka": h.kafka.load(Ordering::Relaxed),
        "fanout_subscribed": h.fanout_subscribed.load(Ordering::Relaxed),
        "outbox_relay": h.relay.load(Ordering::Relaxed),
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

async fn create_conversation(
    State(state): State<Arc<NodeState>>,
    headers: HeaderMap,
    Json(req): Json<NewConversation>,
) -> Response {
    let claims = match authenticate(&state, &headers, None) {
        Ok(c) => c,
        Err(e) => return api_error(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
    };
    if req.id.is_empty()
        || req.id.len() > 128
        || req.members.is_empty()
        || req.members.len() > 10_000
    {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "id must have 1..=128 bytes and members 1..=10000 users",
        );
    }
    if !req.members.contains(&claims.sub) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "the creator must be one of the members",
        );
    }
    match state.store.conversation_tenant(&req.id).await {
        Ok(Some(t)) if t != claims.tenant => {
            return api_error(
                StatusCode::FORBIDDEN,
                "not_member",
                "conversation belongs to another tenant",
            )
        }
        Err(e) => {
            return api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            )
        }
        _ => {}
    }
    match state
        .store
        .create_conversation(&claims.tenant, &req.id, &req.members, clock::now_ms())
        .await
    {
        Ok(()) => (
            StatusCode::CREATED,
            Json(json!({ "id": req.id, "members": req.members })),
        )
            .into_response(),
        Err(e) => api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
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
    match state.store.is_member(&id, &claims.sub).await {
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
    if req.prompt.is_empty() {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_argument",
            "prompt is empty",
        );
    }
    match state
        .store
        .is_member(&req.conversation_id, &claims.sub)
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
