//! One WebSocket connection: authenticate, register with the hub, then read frames
//! (size check, rate limit, decode, handle) while a writer task drains the connection's
//! queue. Every problem with a frame is answered with an `error` frame and the connection
//! stays open; only a bad token, a frame past the hard cap, a slow consumer or shutdown
//! close it.

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use chatstream_protocol::auth::{Claims, TokenError};
use chatstream_protocol::events::{self as ev, EventBody};
use chatstream_protocol::frames::{ErrorCode, MessageStatus, Via};
use chatstream_protocol::{ClientFrame, ServerFrame};
use chatstream_store::{NewMessage, StoreError};
use futures::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use crate::config::PublishMode;
use crate::events::{new_id, new_trace_id, EventContext};
use crate::fanout::{FanoutEnvelope, Receipt};
use crate::hub::{ConnId, Outbound};
use crate::metrics as m;
use crate::server::{presence_key, NodeState, REDIS_OP_TIMEOUT};
use crate::{clock, streams};

/// WebSocket close codes (4000-4999 are the application's).
pub const CLOSE_UNAUTHORIZED: u16 = 4401;
pub const CLOSE_TOO_LARGE: u16 = 1009;
pub const CLOSE_SLOW: u16 = 4408;
pub const CLOSE_SHUTDOWN: u16 = 1012;

const MAX_ID_LEN: usize = 128;

/// A token bucket per connection.
struct RateLimit {
    tokens: f64,
    per_s: f64,
    burst: f64,
    at: Instant,
}

impl RateLimit {
    fn new(per_s: u32, burst: u32) -> Self {
        RateLimit {
            tokens: f64::from(burst),
            per_s: f64::from(per_s),
            burst: f64::from(burst),
            at: Instant::now(),
        }
    }

    /// Ok, or how long until the next frame would be allowed.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_s).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_s))
        }
    }
}

struct Conn {
    state: Arc<NodeState>,
    claims: Claims,
    id: ConnId,
    tx: mpsc::Sender<Outbound>,
}

fn error_frame(code: ErrorCode, message: impl Into<String>, ref_id: Option<String>) -> ServerFrame {
    metrics::counter!(m::ERRORS, "code" => format!("{code:?}")).increment(1);
    ServerFrame::Error {
        code,
        message: message.into(),
        ref_id,
        retry_after_ms: None,
    }
}

fn store_error(e: StoreError, ref_id: Option<String>) -> ServerFrame {
    match e {
        StoreError::NotMember { .. } => error_frame(ErrorCode::NotMember, e.to_string(), ref_id),
        e if e.is_unavailable() => error_frame(
            ErrorCode::Unavailable,
            format!("{e}; nothing was stored, retry later"),
            ref_id,
        ),
        e => {
            tracing::error!(error = %e, "store error");
            error_frame(
                ErrorCode::Internal,
                "storage error; nothing was stored",
                ref_id,
            )
        }
    }
}

async fn close_with(socket: &mut WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason.to_string()),
        })))
        .await;
}

/// Serves one upgraded connection until it closes.
pub async fn serve(state: Arc<NodeState>, mut socket: WebSocket, auth: Result<Claims, TokenError>) {
    let claims = match auth {
        Ok(c) => c,
        Err(e) => {
            let frame = error_frame(
                ErrorCode::Unauthorized,
                format!("{e}; connect with a valid token (?token=...)"),
                None,
            );
            let _ = socket.send(Message::Text(frame.encode().into())).await;
            close_with(&mut socket, CLOSE_UNAUTHORIZED, &e.to_string()).await;
            return;
        }
    };
    let reg = state.hub.register(&claims.sub);
    let conn = Conn {
        state: state.clone(),
        claims,
        id: reg.id,
        tx: reg.tx,
    };
    let (mut sink, mut stream) = socket.split();
    let hello = ServerFrame::Hello {
        node_id: state.cfg.node_id.clone(),
        user_id: conn.claims.sub.clone(),
        tenant: conn.claims.tenant.clone(),
        max_frame_bytes: state.cfg.max_frame_bytes,
        server_time_ms: clock::now_ms(),
    };
    let _ = conn.tx.try_send(Outbound::from(hello.encode()));
    conn.mark_online(true).await;

    let mut rx = reg.rx;
    let kick = reg.kick;
    let mut shutdown = state.shutdown.clone();
    let writer = tokio::spawn(async move {
        let close = |code: u16, reason: &str| {
            Message::Close(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from(reason.to_string()),
            }))
        };
        loop {
            tokio::select! {
                frame = rx.recv() => match frame {
                    Some(text) => {
                        metrics::counter!(m::FRAMES_OUT).increment(1);
                        if sink.send(Message::Text(Utf8Bytes::from(&*text))).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                _ = kick.notified() => {
                    let _ = sink.send(close(CLOSE_SLOW, "too slow to read; reconnect and sync")).await;
                    break;
                }
                _ = shutdown.changed() => {
                    let bye = ServerFrame::error(ErrorCode::ShuttingDown, "node is shutting down; reconnect to another node");
                    let _ = sink.send(Message::Text(bye.encode().into())).await;
                    let _ = sink.send(close(CLOSE_SHUTDOWN, "node shutting down")).await;
                    break;
                }
            }
        }
        let _ = sink.close().await;
    });

    let mut limit = RateLimit::new(state.cfg.rate_limit_per_s, state.cfg.rate_limit_burst);
    let conn = Arc::new(conn);
    while let Some(msg) = stream.next().await {
        let text = match msg {
            Ok(Message::Text(t)) => t,
            Ok(Message::Binary(_)) => {
                conn.reply(error_frame(
                    ErrorCode::MalformedFrame,
                    "binary frames are not supported; send JSON text frames",
                    None,
                ));
                continue;
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => continue,
        };
        metrics::counter!(m::FRAMES_IN).increment(1);
        if text.len() > state.cfg.max_frame_bytes {
            conn.reply(error_frame(
                ErrorCode::FrameTooLarge,
                format!(
                    "frame of {} bytes exceeds the limit of {} bytes",
                    text.len(),
                    state.cfg.max_frame_bytes
                ),
                None,
            ));
            continue;
        }
        if let Err(wait) = limit.take() {
            metrics::counter!(m::ERRORS, "code" => "RateLimited").increment(1);
            conn.reply(ServerFrame::Error {
                code: ErrorCode::RateLimited,
                message: format!(
                    "more than {} frames/s (burst {}); slow down",
                    state.cfg.rate_limit_per_s, state.cfg.rate_limit_burst
                ),
                ref_id: None,
                retry_after_ms: Some(wait.as_millis() as u64 + 1),
            });
            continue;
        }
        match ClientFrame::decode(&text) {
            Ok(frame) => conn.clone().handle(frame).await,
            Err(e) => conn.reply(error_frame(e.code(), e.to_string(), None)),
        }
    }
    state.hub.unregister(&conn.claims.sub, conn.id);
    conn.mark_online(false).await;
    drop(conn);
    let _ = writer.await;
}

impl Conn {
    fn reply(&self, frame: ServerFrame) {
        if self.tx.try_send(Outbound::from(frame.encode())).is_err() {
            tracing::debug!(
                conn = self.id,
                "reply dropped: connection queue full or closed"
            );
        }
    }

    fn ctx(&self, trace_id: String) -> EventContext {
        EventContext {
            tenant: self.claims.tenant.clone(),
            trace_id,
            user_id: Some(self.claims.sub.clone()),
            ..Default::default()
        }
    }

    async fn mark_online(&self, online: bool) {
        let member = format!("{}:{}", self.state.cfg.node_id, self.id);
        let key = presence_key(&self.claims.sub);
        let update = async {
            let mut c = self.state.redis.conn().await?;
            let r: redis::RedisResult<()> = if online {
                redis::cmd("ZADD")
                    .arg(&key)
                    .arg(clock::now_ms() + 60_000)
                    .arg(member)
                    .query_async(&mut c)
                    .await
            } else {
                redis::cmd("ZREM")
                    .arg(&key)
                    .arg(member)
                    .query_async(&mut c)
                    .await
            };
            r.map_err(|e| e.to_string())
        };
        // Presence is best effort (it only decides offline notifications); the presence
        // refresher repairs it within 20 s.
        match tokio::time::timeout(REDIS_OP_TIMEOUT, update).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "presence update failed"),
            Err(_) => tracing::debug!("presence update timed out"),
        }
    }

    /// Membership check shared by every conversation frame.
    async fn require_member(&self, conversation: &str, ref_id: Option<String>) -> bool {
        match self
            .state
            .members
            .get(&self.state.store, conversation)
            .await
        {
            Ok(members) if members.contains(&self.claims.sub) => true,
            Ok(_) => {
                self.reply(error_frame(
                    ErrorCode::NotMember,
                    format!(
                        "{} is not a member of conversation {conversation}",
                        self.claims.sub
                    ),
                    ref_id,
                ));
                false
            }
            Err(e) => {
                self.reply(store_error(e, ref_id));
                false
            }
        }
    }

    async fn handle(self: Arc<Self>, frame: ClientFrame) {
        match frame {
            ClientFrame::Send {
                conversation_id,
                client_msg_id,
                body,
            } => self.send(conversation_id, client_msg_id, body).await,
            ClientFrame::Sync {
                conversation_id,
                after_seq,
                limit,
            } => self.sync(conversation_id, after_seq, limit).await,
            ClientFrame::Read {
                conversation_id,
                up_to_seq,
            } => self.read(conversation_id, up_to_seq).await,
            ClientFrame::Typing {
                conversation_id,
                is_typing,
            } => self.typing(conversation_id, is_typing).await,
            ClientFrame::Stream {
                conversation_id,
                prompt,
            } => self.stream(conversation_id, prompt).await,
            ClientFrame::Resume {
                session_id,
                after_index,
            } => {
                // Runs beside the read loop: a resume waits for chunks still being generated.
                let conn = self.clone();
                tokio::spawn(async move {
                    if let Err((code, message)) = streams::resume(
                        &conn.state,
                        &conn.claims.sub,
                        &session_id,
                        after_index,
                        conn.tx.clone(),
                    )
                    .await
                    {
                        conn.reply(error_frame(code, message, Some(session_id)));
                    }
                });
            }
            ClientFrame::Ping { nonce } => self.reply(ServerFrame::Pong {
                nonce,
                ts_ms: clock::now_ms(),
            }),
        }
    }

    async fn send(&self, conversation_id: String, client_msg_id: String, body: String) {
        let started = Instant::now();
        let ref_id = Some(client_msg_id.clone());
        if client_msg_id.is_empty()
            || client_msg_id.len() > MAX_ID_LEN
            || conversation_id.is_empty()
            || conversation_id.len() > MAX_ID_LEN
        {
            return self.reply(error_frame(
                ErrorCode::InvalidArgument,
                format!("conversation_id and client_msg_id must have 1..={MAX_ID_LEN} bytes"),
                ref_id,
            ));
        }
        if body.is_empty() {
            return self.reply(error_frame(
                ErrorCode::InvalidArgument,
                "body is empty",
                ref_id,
            ));
        }
        let state = &self.state;
        let trace_id = new_trace_id();
        let new = NewMessage {
            message_id: new_id(),
            conversation_id: conversation_id.clone(),
            sender_id: self.claims.sub.clone(),
            client_msg_id: client_msg_id.clone(),
            body,
            trace_id: trace_id.clone(),
            node_id: state.cfg.node_id.clone(),
            created_at_ms: clock::now_ms(),
        };
        let chat_event = |msg: &chatstream_store::StoredMessage| {
            let ctx = EventContext {
                conversation_id: Some(msg.conversation_id.clone()),
                message_id: Some(msg.message_id.clone()),
                ..self.ctx(msg.trace_id.clone())
            };
            state.events.envelope(
                &ctx,
                EventBody::ChatMessage(ev::ChatMessage {
                    message_id: msg.message_id.clone(),
                    client_msg_id: msg.client_msg_id.clone(),
                    conversation_id: msg.conversation_id.clone(),
                    sender_id: msg.sender_id.clone(),
                    seq: msg.seq,
                    body: msg.body.clone(),
                    created_at_ms: msg.created_at_ms,
                }),
            )
        };
        let outbox = state.events.mode() == PublishMode::Outbox;
        let appended = state
            .store
            .append_message(&new, |msg| {
                if outbox {
                    vec![state.events.outbox_row(&chat_event(msg))]
                } else {
                    Vec::new()
                }
            })
            .await;
        let appended = match appended {
            Ok(a) => a,
            Err(e) => return self.reply(store_error(e, ref_id)),
        };
        let msg = appended.message;
        self.reply(ServerFrame::Ack {
            client_msg_id: msg.client_msg_id.clone(),
            message_id: msg.message_id.clone(),
            conversation_id: msg.conversation_id.clone(),
            seq: msg.seq,
            status: MessageStatus::Sent,
            duplicate: appended.duplicate,
            ts_ms: clock::now_ms(),
        });
        metrics::histogram!(m::SEND_SECONDS).record(started.elapsed().as_secs_f64());
        if appended.duplicate {
            metrics::counter!(m::MESSAGES_DUPLICATE).increment(1);
        } else {
            metrics::counter!(m::MESSAGES_ACCEPTED).increment(1);
            match state.events.mode() {
                PublishMode::Outbox => state.events.poke_relay(),
                PublishMode::Async => state.events.emit(chat_event(&msg)).await,
            }
        }
        // Fanned out again on a duplicate too: the first attempt may have died before it.
        if state.cfg.fanout_mode == crate::config::FanoutMode::Redis || appended.duplicate {
            self.fanout_message(&msg, &trace_id).await;
        }
        if !appended.duplicate {
            self.notify_offline(&msg).await;
        }
    }

    async fn fanout_message(&self, msg: &chatstream_store::StoredMessage, trace_id: &str) {
        let members = match self
            .state
            .members
            .get(&self.state.store, &msg.conversation_id)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                return tracing::warn!(error = %e, "members unavailable; recipients will sync")
            }
        };
        let frame = ServerFrame::Msg {
            message_id: msg.message_id.clone(),
            client_msg_id: msg.client_msg_id.clone(),
            conversation_id: msg.conversation_id.clone(),
            seq: msg.seq,
            sender_id: msg.sender_id.clone(),
            body: msg.body.clone(),
            created_at_ms: msg.created_at_ms,
            trace_id: msg.trace_id.clone(),
            via: Via::Live,
        };
        self.state
            .fanout(FanoutEnvelope {
                origin_node: self.state.cfg.node_id.clone(),
                origin_conn: Some(self.id),
                recipients: members.to_vec(),
                frame: frame.encode(),
                receipt: Some(Receipt {
                    sender_id: msg.sender_id.clone(),
                    conversation_id: msg.conversation_id.clone(),
                    message_id: msg.message_id.clone(),
                    seq: msg.seq,
                    tenant: self.claims.tenant.clone(),
                    trace_id: trace_id.to_string(),
                }),
            })
            .await;
    }

    /// Members with no live connection anywhere get a notification event.
    async fn notify_offline(&self, msg: &chatstream_store::StoredMessage) {
        let Ok(members) = self
            .state
            .members
            .get(&self.state.store, &msg.conversation_id)
            .await
        else {
            return;
        };
        let others: Vec<&String> = members
            .iter()
            .filter(|u| **u != msg.sender_id && !self.state.hub.is_local(u))
            .collect();
        if others.is_empty() || others.len() > 100 {
            return;
        }
        let now = clock::now_ms();
        let mut pipe = redis::pipe();
        for u in &others {
            pipe.cmd("ZCOUNT").arg(presence_key(u)).arg(now).arg("+inf");
        }
        let lookup = async {
            let mut c = self.state.redis.conn().await?;
            pipe.query_async::<Vec<i64>>(&mut c)
                .await
                .map_err(|e| e.to_string())
        };
        let Ok(Ok(counts)) = tokio::time::timeout(REDIS_OP_TIMEOUT, lookup).await else {
            return;
        };
        for (user, n) in others.into_iter().zip(counts) {
            if n > 0 {
                continue;
            }
            let ctx = EventContext {
                user_id: Some(user.clone()),
                message_id: Some(msg.message_id.clone()),
                conversation_id: Some(msg.conversation_id.clone()),
                ..self.ctx(msg.trace_id.clone())
            };
            let e = self.state.events.envelope(
                &ctx,
                EventBody::Notification(ev::Notification {
                    id: new_id(),
                    user_id: user.clone(),
                    title: "New Message".into(),
                    content: format!("You have a new message from {}", msg.sender_id),
                    kind: "NEW_MESSAGE".into(),
                    related_entity_id: msg.message_id.clone(),
                }),
            );
            self.state.events.emit(e).await;
        }
    }

    async fn sync(&self, conversation_id: String, after_seq: i64, limit: Option<u32>) {
        if after_seq < 0 {
            return self.reply(error_frame(
                ErrorCode::InvalidArgument,
                "after_seq must be >= 0",
                None,
            ));
        }
        if !self.require_member(&conversation_id, None).await {
            return;
        }
        let limit = i64::from(limit.unwrap_or(u32::MAX)).clamp(1, self.state.cfg.sync_limit);
        match self
            .state
            .store
            .messages_after(&conversation_id, after_seq, limit)
            .await
        {
            Ok(msgs) => {
                let more = msgs.len() as i64 == limit;
                let last_seq = msgs.last().map(|m| m.seq).unwrap_or(after_seq);
                for msg in msgs {
                    self.reply(ServerFrame::Msg {
                        message_id: msg.message_id,
                        client_msg_id: msg.client_msg_id,
                        conversation_id: msg.conversation_id,
                        seq: msg.seq,
                        sender_id: msg.sender_id,
                        body: msg.body,
                        created_at_ms: msg.created_at_ms,
                        trace_id: msg.trace_id,
                        via: Via::Sync,
                    });
                }
                self.reply(ServerFrame::SyncDone {
                    conversation_id,
                    last_seq,
                    more,
                });
            }
            Err(e) => self.reply(store_error(e, None)),
        }
    }

    async fn read(&self, conversation_id: String, up_to_seq: i64) {
        if up_to_seq < 0 {
            return self.reply(error_frame(
                ErrorCode::InvalidArgument,
                "up_to_seq must be >= 0",
                None,
            ));
        }
        if !self.require_member(&conversation_id, None).await {
            return;
        }
        if let Err(e) = self
            .state
            .store
            .mark_read(&conversation_id, &self.claims.sub, up_to_seq)
            .await
        {
            return self.reply(store_error(e, None));
        }
        let Ok(members) = self
            .state
            .members
            .get(&self.state.store, &conversation_id)
            .await
        else {
            return;
        };
        let frame = ServerFrame::Status {
            conversation_id: conversation_id.clone(),
            message_id: None,
            seq: up_to_seq,
            user_id: self.claims.sub.clone(),
            status: MessageStatus::Read,
            ts_ms: clock::now_ms(),
        };
        self.state
            .fanout(FanoutEnvelope {
                origin_node: self.state.cfg.node_id.clone(),
                origin_conn: Some(self.id),
                recipients: members.to_vec(),
                frame: frame.encode(),
                receipt: None,
            })
            .await;
        let ctx = EventContext {
            conversation_id: Some(conversation_id.clone()),
            ..self.ctx(new_trace_id())
        };
        let e = self.state.events.envelope(
            &ctx,
            EventBody::MessageStatus(ev::MessageStatusChanged {
                message_id: None,
                conversation_id,
                seq: up_to_seq,
                user_id: self.claims.sub.clone(),
                status: MessageStatus::Read,
            }),
        );
        self.state.events.emit(e).await;
    }

    async fn typing(&self, conversation_id: String, is_typing: bool) {
        if !self.require_member(&conversation_id, None).await {
            return;
        }
        let Ok(members) = self
            .state
            .members
            .get(&self.state.store, &conversation_id)
            .await
        else {
            return;
        };
        let frame = ServerFrame::Typing {
            conversation_id: conversation_id.clone(),
            user_id: self.claims.sub.clone(),
            is_typing,
            ts_ms: clock::now_ms(),
        };
        let recipients = members
            .iter()
            .filter(|u| **u != self.claims.sub)
            .cloned()
            .collect();
        self.state
            .fanout(FanoutEnvelope {
                origin_node: self.state.cfg.node_id.clone(),
                origin_conn: Some(self.id),
                recipients,
                frame: frame.encode(),
                receipt: None,
            })
            .await;
        let ctx = EventContext {
            conversation_id: Some(conversation_id.clone()),
            ..self.ctx(new_trace_id())
        };
        let e = self.state.events.envelope(
            &ctx,
            EventBody::Typing(ev::TypingChanged {
                conversation_id,
                user_id: self.claims.sub.clone(),
                is_typing,
            }),
        );
        self.state.events.emit_ephemeral(e);
    }

    async fn stream(&self, conversation_id: String, prompt: String) {
        if prompt.is_empty() {
            return self.reply(error_frame(
                ErrorCode::InvalidArgument,
                "prompt is empty",
                None,
            ));
        }
        if !self.require_member(&conversation_id, None).await {
            return;
        }
        match streams::start(
            &self.state,
            &self.claims.sub,
            &self.claims.tenant,
            &conversation_id,
            &prompt,
            Some(self.tx.clone()),
        )
        .await
        {
            Ok(_) => {}
            Err((code, message)) => self.reply(error_frame(code, message, None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RateLimit;

    #[test]
    fn rate_limit_allows_the_burst_then_says_when() {
        let mut r = RateLimit::new(10, 3);
        assert!(r.take().is_ok() && r.take().is_ok() && r.take().is_ok());
        let wait = r.take().unwrap_err();
        assert!(wait.as_millis() > 0 && wait.as_millis() <= 100, "{wait:?}");
    }
}
