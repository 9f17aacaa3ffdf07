//! One WebSocket connection: authenticate, register with the hub, then read frames
//! (size check, rate limit, decode, handle) while a writer task drains the connection's
//! outlet and pings the client. Every problem with a frame is answered with an `error`
//! frame (at most `max_error_frames_per_s` a second) and the connection stays open; the
//! node closes it only for a bad token (4401), a frame past the hard cap (1009), a slow
//! consumer (4408), silence past the idle timeout (4409), a rate limit exceeded for
//! seconds on end (1008), shutdown (1012), or a socket that takes nothing for the write
//! stall timeout (dropped: no close frame gets through a stalled socket).
//!
//! Nothing on the read loop waits for Redis: a send is stored, acknowledged and handed to
//! the fan-out queue; presence lookups for notifications run beside it.

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use chatstream_protocol::auth::{Claims, TokenError};
use chatstream_protocol::events::{self as ev, EventBody};
use chatstream_protocol::frames::{ErrorCode, MessageStatus, Via};
use chatstream_protocol::EventEnvelope;
use chatstream_protocol::{ClientFrame, ServerFrame};
use chatstream_store::{
    AppendHooks, Appended, Membership, NewMessage, OutboxRow, PendingAppend, StoreError,
    StoredMessage,
};
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{FanoutMode, PublishMode};
use crate::events::{new_id, new_trace_id, EventContext};
use crate::fanout::{FanoutEnvelope, Reservation};
use crate::hub::{CloseReason, ConnId, Outbound, Outlet};
use crate::metrics as m;
use crate::server::{presence_key, NodeState};
use crate::{clock, streams};

/// WebSocket close codes (4000-4999 are the application's).
pub const CLOSE_UNAUTHORIZED: u16 = 4401;
pub const CLOSE_TOO_LARGE: u16 = 1009;
/// The client did not read fast enough: its unsent frames passed the node's byte bound.
pub const CLOSE_SLOW: u16 = 4408;
/// Nothing heard from the client (no frame, no pong) for the idle timeout.
pub const CLOSE_IDLE: u16 = 4409;
/// Policy violation: the client kept exceeding its rate limit.
pub const CLOSE_RATE_LIMIT: u16 = 1008;
pub const CLOSE_SHUTDOWN: u16 = 1012;

const MAX_ID_LEN: usize = 128;
/// How long a close frame may take to go out before the socket is just dropped.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

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

/// Error frames written in the current one-second window.
struct ErrorBudget {
    window: Instant,
    written: u32,
    per_s: u32,
}

impl ErrorBudget {
    fn new(per_s: u32) -> Self {
        ErrorBudget {
            window: Instant::now(),
            written: 0,
            per_s,
        }
    }

    fn take(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.written = 0;
        }
        self.written += 1;
        self.written <= self.per_s
    }
}

/// How long a client has been rate limited without a break of a second or more.
#[derive(Default)]
struct Offence {
    since: Option<Instant>,
    last: Option<Instant>,
}

impl Offence {
    /// Records a rate-limited frame; true once the client has kept it up for `close_after`.
    fn limited(&mut self, close_after: Duration) -> bool {
        let now = Instant::now();
        let continuing = self
            .last
            .is_some_and(|last| now.duration_since(last) <= Duration::from_secs(1));
        if !continuing {
            self.since = Some(now);
        }
        self.last = Some(now);
        self.since
            .is_some_and(|since| now.duration_since(since) >= close_after)
    }
}

/// When the client was last heard from (any frame, pongs included), for the idle timeout.
struct Heard {
    start: Instant,
    last_ms: AtomicU64,
}

impl Heard {
    fn new() -> Self {
        Heard {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn now(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

struct Conn {
    state: Arc<NodeState>,
    claims: Claims,
    id: ConnId,
    outlet: Arc<Outlet>,
    error_budget: Mutex<ErrorBudget>,
    /// The completer's queue of batched sends (started with the first one).
    sends: Mutex<Option<mpsc::Sender<PendingSend>>>,
}

/// What the answer to a `send` frame needs once its append is done.
struct SentFrame {
    conversation_id: String,
    ref_id: Option<String>,
    membership: Arc<Membership>,
    trace_id: String,
    started: Instant,
}

/// A batched send being stored.
struct PendingSend {
    append: PendingAppend,
    sent: SentFrame,
}

/// What a batched send does inside its batch, on the batcher task.
struct SendHooks {
    conn: Arc<Conn>,
    membership: Arc<Membership>,
    place: Option<Reservation>,
}

impl AppendHooks for SendHooks {
    fn in_order(&mut self, msg: &StoredMessage) -> Vec<OutboxRow> {
        let state = &self.conn.state;
        if state.cfg.fanout_mode == FanoutMode::Redis {
            // In seq order per conversation: the node publishes its live frames in that
            // order. A retried batch takes a new place (the old one is given up).
            self.place = Some(state.fanout.reserve());
        }
        state
            .events
            .transactional_rows(|| self.conn.chat_event(msg))
    }

    fn committed(&mut self, outcome: &Result<Appended, StoreError>) {
        // Filled here, for the whole batch at once: the publisher waits for each place in
        // turn, so it must not wait behind the sender's ack. Dropped unfilled otherwise.
        let Some(place) = self.place.take() else {
            return;
        };
        if let Ok(a) = outcome {
            if !a.duplicate {
                let state = &self.conn.state;
                place.fill(state.message_envelope(
                    &a.message,
                    &self.membership,
                    Some(self.conn.id),
                    &a.message.trace_id,
                ));
            }
        }
    }
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

fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason.to_string()),
    }))
}

async fn close_with(socket: &mut WebSocket, code: u16, reason: &str) {
    let _ = tokio::time::timeout(
        CLOSE_WRITE_TIMEOUT,
        socket.send(close_message(code, reason)),
    )
    .await;
}

/// What the writer needs besides the socket and the outlet.
struct WriterSettings {
    shutdown: watch::Receiver<bool>,
    stall: Duration,
    ping_every: Duration,
    idle: Duration,
    heard: Arc<Heard>,
}

/// Drains the outlet into the socket and pings the client until the connection ends. A
/// frame the socket does not take within `stall` ends the connection (the peer stopped
/// reading); so does silence past `idle`.
async fn write_loop(
    sink: SplitSink<WebSocket, Message>,
    rx: mpsc::UnboundedReceiver<Outbound>,
    outlet: Arc<Outlet>,
    settings: WriterSettings,
    reader_done: oneshot::Receiver<()>,
) {
    write_frames(sink, rx, &outlet, settings, reader_done).await;
    outlet.writer_gone();
}

async fn write_frames(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    outlet: &Outlet,
    mut settings: WriterSettings,
    mut reader_done: oneshot::Receiver<()>,
) {
    let stall = settings.stall;
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + settings.ping_every,
        settings.ping_every,
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let close = |why: CloseReason| close_message(why.code, why.reason);
    loop {
        // The message to write, and the outlet bytes it frees (pings free none).
        let next = tokio::select! {
            frame = rx.recv() => match frame {
                Some(text) => {
                    let n = text.len();
                    Some((Message::Text(Utf8Bytes::from(&*text)), Some(n)))
                }
                None => break,
            },
            _ = ping.tick() => {
                let silent = settings.heard.silent_for();
                if silent >= settings.idle {
                    metrics::counter!(m::IDLE_DISCONNECTS).increment(1);
                    tracing::info!(?silent, "closing a connection silent past the idle timeout");
                    let why = CloseReason { code: CLOSE_IDLE, reason: "idle: no frame or pong within the idle timeout" };
                    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.send(close(why))).await;
                    return;
                }
                Some((Message::Ping(Default::default()), None))
            }
            why = outlet.closing() => {
                tracing::info!(code = why.code, reason = why.reason, queued_bytes = outlet.queued_bytes(), "closing a connection");
                let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.send(close(why))).await;
                return;
            }
            _ = settings.shutdown.changed() => {
                let bye = ServerFrame::error(ErrorCode::ShuttingDown, "node is shutting down; reconnect to another node");
                let goodbye = async {
                    sink.send(Message::Text(bye.encode().into())).await?;
                    sink.send(close_message(CLOSE_SHUTDOWN, "node shutting down")).await
                };
                let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, goodbye).await;
                return;
            }
            _ = &mut reader_done => break,
        };
        let Some((message, frees)) = next else {
            continue;
        };
        match tokio::time::timeout(stall, sink.send(message)).await {
            Ok(Ok(())) => {
                if let Some(n) = frees {
                    outlet.written(n);
                    metrics::counter!(m::FRAMES_OUT).increment(1);
                }
            }
            Ok(Err(_)) => return,
            Err(_) => {
                metrics::counter!(m::WRITE_STALL_DISCONNECTS).increment(1);
                tracing::info!(
                    queued_bytes = outlet.queued_bytes(),
                    "dropping a connection whose socket took nothing for {stall:?}"
                );
                return;
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.close()).await;
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
            let _ = tokio::time::timeout(
                CLOSE_WRITE_TIMEOUT,
                socket.send(Message::Text(frame.encode().into())),
            )
            .await;
            close_with(&mut socket, CLOSE_UNAUTHORIZED, &e.to_string()).await;
            return;
        }
    };
    let reg = state.hub.register(&claims.tenant, &claims.sub);
    let conn = Arc::new(Conn {
        state: state.clone(),
        claims,
        id: reg.id,
        outlet: reg.outlet.clone(),
        error_budget: Mutex::new(ErrorBudget::new(state.cfg.max_error_frames_per_s)),
        sends: Mutex::new(None),
    });
    let (sink, mut stream) = socket.split();
    conn.reply(ServerFrame::Hello {
        node_id: state.cfg.node_id.clone(),
        user_id: conn.claims.sub.clone(),
        tenant: conn.claims.tenant.clone(),
        max_frame_bytes: state.cfg.max_frame_bytes,
        server_time_ms: clock::now_ms(),
    })
    .await;
    conn.mark_online(true).await;

    let (reader_done, reader_done_rx) = oneshot::channel();
    let heard = Arc::new(Heard::new());
    let mut writer = tokio::spawn(write_loop(
        sink,
        reg.rx,
        reg.outlet,
        WriterSettings {
            shutdown: state.shutdown.clone(),
            stall: Duration::from_millis(state.cfg.write_stall_timeout_ms),
            ping_every: Duration::from_millis(state.cfg.ping_interval_ms),
            idle: Duration::from_millis(state.cfg.idle_timeout_ms),
            heard: heard.clone(),
        },
        reader_done_rx,
    ));
    let mut writer_done = false;

    let mut limit = RateLimit::new(state.cfg.rate_limit_per_s, state.cfg.rate_limit_burst);
    let mut offence = Offence::default();
    let close_after = Duration::from_millis(state.cfg.rate_limit_close_after_ms);
    loop {
        let msg = tokio::select! {
            msg = stream.next() => msg,
            // The writer closed the connection (slow, stalled, idle, shutdown): stop too.
            _ = &mut writer => { writer_done = true; break }
        };
        if matches!(msg, Some(Ok(_))) {
            heard.now();
        }
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Binary(_))) => {
                conn.reply(error_frame(
                    ErrorCode::MalformedFrame,
                    "binary frames are not supported; send JSON text frames",
                    None,
                ))
                .await;
                continue;
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            Some(Ok(_)) => continue,
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
            ))
            .await;
            continue;
        }
        if let Err(wait) = limit.take() {
            metrics::counter!(m::ERRORS, "code" => "RateLimited").increment(1);
            if offence.limited(close_after) {
                metrics::counter!(m::RATE_LIMIT_DISCONNECTS).increment(1);
                conn.outlet.close(CloseReason {
                    code: CLOSE_RATE_LIMIT,
                    reason: "rate limit exceeded for seconds on end; slow down and reconnect",
                });
                continue;
            }
            conn.reply(ServerFrame::Error {
                code: ErrorCode::RateLimited,
                message: format!(
                    "more than {} frames/s (burst {}); slow down",
                    state.cfg.rate_limit_per_s, state.cfg.rate_limit_burst
                ),
                ref_id: None,
                retry_after_ms: Some(wait.as_millis() as u64 + 1),
            })
            .await;
            continue;
        }
        match ClientFrame::decode(&text) {
            Ok(frame) => match frame.nul_field() {
                None => conn.clone().handle(frame).await,
                Some(field) => {
                    let ref_id = match &frame {
                        ClientFrame::Send { client_msg_id, .. } => Some(client_msg_id.clone()),
                        ClientFrame::Resume { session_id, .. } => Some(session_id.clone()),
                        _ => None,
                    };
                    conn.reply(error_frame(
                        ErrorCode::InvalidArgument,
                        format!("{field} holds a NUL character (\\u0000), which is not accepted"),
                        ref_id,
                    ))
                    .await
                }
            },
            Err(e) => conn.reply(error_frame(e.code(), e.to_string(), None)).await,
        }
    }
    // Sends still being stored are answered (and fanned out) by the completer, which
    // ends after them.
    conn.close_sends();
    state
        .hub
        .unregister(&conn.claims.tenant, &conn.claims.sub, conn.id);
    conn.mark_online(false).await;
    if !writer_done {
        let _ = reader_done.send(());
        let _ = writer.await;
    }
}

impl Conn {
    /// Queues a frame for this connection, waiting for room when the client reads slowly
    /// (backpressure on its own requests); nothing is dropped, except error frames past
    /// the per-second cap, which are counted.
    async fn reply(&self, frame: ServerFrame) {
        if matches!(frame, ServerFrame::Error { .. })
            && !self.error_budget.lock().is_ok_and(|mut b| b.take())
        {
            metrics::counter!(m::ERROR_FRAMES_SUPPRESSED).increment(1);
            return;
        }
        if let Err(e) = self.outlet.push_wait(Outbound::from(frame.encode())).await {
            tracing::debug!(conn = self.id, error = %e, "reply not queued");
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
        let key = presence_key(&self.claims.tenant, &self.claims.sub);
        let expiry = clock::now_ms() + 60_000;
        // Presence is best effort (it only decides offline notifications); the presence
        // refresher repairs it within 20 s, and at once when the Redis link returns.
        let r = self
            .state
            .redis
            .run(|mut c| async move {
                if online {
                    redis::cmd("ZADD")
                        .arg(&key)
                        .arg(expiry)
                        .arg(member)
                        .query_async::<()>(&mut c)
                        .await
                } else {
                    redis::cmd("ZREM")
                        .arg(&key)
                        .arg(member)
                        .query_async::<()>(&mut c)
                        .await
                }
            })
            .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "presence update failed");
        }
    }

    /// Membership check shared by every conversation frame.
    async fn require_member(
        &self,
        conversation: &str,
        ref_id: Option<String>,
    ) -> Option<Arc<Membership>> {
        match self
            .state
            .members
            .is_member(
                &self.state.store,
                conversation,
                &self.claims.tenant,
                &self.claims.sub,
            )
            .await
        {
            Ok(Some(m)) => Some(m),
            Ok(None) => {
                self.reply(error_frame(
                    ErrorCode::NotMember,
                    format!(
                        "{} is not a member of conversation {conversation}",
                        self.claims.sub
                    ),
                    ref_id,
                ))
                .await;
                None
            }
            Err(e) => {
                self.reply(store_error(e, ref_id)).await;
                None
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
                self.state.work.spawn(async move {
                    if let Err((code, message)) = streams::resume(
                        &conn.state,
                        &conn.claims.tenant,
                        &conn.claims.sub,
                        &session_id,
                        after_index,
                        conn.outlet.clone(),
                    )
                    .await
                    {
                        conn.reply(error_frame(code, message, Some(session_id)))
                            .await;
                    }
                });
            }
            ClientFrame::Ping { nonce } => {
                self.reply(ServerFrame::Pong {
                    nonce,
                    ts_ms: clock::now_ms(),
                })
                .await
            }
        }
    }

    async fn send(self: Arc<Self>, conversation_id: String, client_msg_id: String, body: String) {
        let started = Instant::now();
        let ref_id = Some(client_msg_id.clone());
        if client_msg_id.is_empty()
            || client_msg_id.len() > MAX_ID_LEN
            || conversation_id.is_empty()
            || conversation_id.len() > MAX_ID_LEN
        {
            return self
                .reply(error_frame(
                    ErrorCode::InvalidArgument,
                    format!("conversation_id and client_msg_id must have 1..={MAX_ID_LEN} bytes"),
                    ref_id,
                ))
                .await;
        }
        if body.is_empty() {
            return self
                .reply(error_frame(
                    ErrorCode::InvalidArgument,
                    "body is empty",
                    ref_id,
                ))
                .await;
        }
        // The recipients, read before the append so the fan-out place it takes is filled
        // right after the commit (the append checks membership again, authoritatively).
        let Some(membership) = self.require_member(&conversation_id, ref_id.clone()).await else {
            return;
        };
        let state = &self.state;
        if crate::sabotage::skip_store() {
            // Sabotage (off by default): acknowledged, never stored.
            return self
                .reply(ServerFrame::Ack {
                    client_msg_id,
                    message_id: new_id(),
                    conversation_id,
                    seq: i64::from(u32::MAX),
                    status: MessageStatus::Sent,
                    duplicate: false,
                    ts_ms: clock::now_ms(),
                })
                .await;
        }
        let trace_id = new_trace_id();
        let new = NewMessage {
            tenant: self.claims.tenant.clone(),
            message_id: new_id(),
            conversation_id: conversation_id.clone(),
            sender_id: self.claims.sub.clone(),
            client_msg_id: client_msg_id.clone(),
            body,
            trace_id: trace_id.clone(),
            node_id: state.cfg.node_id.clone(),
            created_at_ms: clock::now_ms(),
        };
        let sent = SentFrame {
            conversation_id,
            ref_id,
            membership,
            trace_id,
            started,
        };
        if let Some(batcher) = state.store.batched() {
            // Group commit: queued behind this connection's earlier sends (so a client's
            // own messages keep their order), answered by the connection's completer while
            // the read loop goes on to the next frame.
            let hooks = Box::new(SendHooks {
                conn: self.clone(),
                membership: sent.membership.clone(),
                place: None,
            });
            let append = batcher.submit(new, hooks).await;
            return self.queue_send(PendingSend { append, sent }).await;
        }
        let redis_fanout = state.cfg.fanout_mode == FanoutMode::Redis;
        let mut place: Option<Reservation> = None;
        let appended = state
            .store
            .append_message(&new, |msg| {
                // Under the conversation's row lock: places are taken in seq order.
                if redis_fanout {
                    place = Some(state.fanout.reserve());
                }
                state.events.transactional_rows(|| self.chat_event(msg))
            })
            .await;
        if let (Ok(a), Some(place)) = (&appended, place) {
            if !a.duplicate {
                place.fill(state.message_envelope(
                    &a.message,
                    &sent.membership,
                    Some(self.id),
                    &sent.trace_id,
                ));
            }
        }
        self.finish_send(sent, appended).await;
    }

    /// The CHAT_MESSAGE event of a stored message.
    fn chat_event(&self, msg: &StoredMessage) -> EventEnvelope {
        let ctx = EventContext {
            conversation_id: Some(msg.conversation_id.clone()),
            message_id: Some(msg.message_id.clone()),
            ..self.ctx(msg.trace_id.clone())
        };
        self.state.events.envelope(
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
    }

    /// Hands a batched send to this connection's completer (started with the first send),
    /// which answers sends in the order they were read. Waits while `max_pending_sends`
    /// of them are being stored.
    async fn queue_send(self: &Arc<Self>, pending: PendingSend) {
        let tx = self.sends.lock().ok().map(|mut sends| {
            sends
                .get_or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(self.state.cfg.max_pending_sends);
                    // Counted: a draining node answers (and fans out) what it stored.
                    self.state.work.spawn(self.clone().complete_sends(rx));
                    tx
                })
                .clone()
        });
        let Some(tx) = tx else {
            return self.complete_one(pending).await;
        };
        if let Err(mpsc::error::SendError(pending)) = tx.send(pending).await {
            self.complete_one(pending).await;
        }
    }

    /// The completer: answers each send once its batch is written, in read order (so a
    /// conversation's acks come in seq order).
    async fn complete_sends(self: Arc<Self>, mut rx: mpsc::Receiver<PendingSend>) {
        while let Some(pending) = rx.recv().await {
            self.complete_one(pending).await;
        }
    }

    async fn complete_one(self: &Arc<Self>, pending: PendingSend) {
        let appended = pending.append.wait().await;
        self.finish_send(pending.sent, appended).await;
    }

    /// Lets the completer end once it has answered what is queued (the connection ended).
    fn close_sends(&self) {
        if let Ok(mut sends) = self.sends.lock() {
            sends.take();
        }
    }

    /// Everything after the append of a send (its fan-out place is filled already): the
    /// ack or the error, the event in async mode, a duplicate's fan-out, notifications.
    async fn finish_send(
        self: &Arc<Self>,
        sent: SentFrame,
        appended: Result<Appended, StoreError>,
    ) {
        let state = &self.state;
        let appended = match appended {
            Ok(a) => a,
            Err(e) => {
                if matches!(e, StoreError::NotMember { .. }) {
                    // The cached membership was stale: read it again next time.
                    state.members.invalidate(&sent.conversation_id);
                }
                return self.reply(store_error(e, sent.ref_id)).await;
            }
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
        })
        .await;
        metrics::histogram!(m::SEND_SECONDS).record(sent.started.elapsed().as_secs_f64());
        if appended.duplicate {
            metrics::counter!(m::MESSAGES_DUPLICATE).increment(1);
            // Fanned out again: the first attempt may have died before its fan-out.
            // Recipients that already got a later message skip it (live order).
            let env = state.message_envelope(&msg, &sent.membership, Some(self.id), &sent.trace_id);
            state.fanout(env);
            return;
        }
        metrics::counter!(m::MESSAGES_ACCEPTED).increment(1);
        match state.events.mode() {
            PublishMode::Outbox => state.events.poke_relay(),
            PublishMode::Async => state.events.emit(self.chat_event(&msg)).await,
            PublishMode::None => {}
        }
        // Beside the read loop: the presence lookup is a Redis round trip. Counted, so a
        // draining node stores the notifications before it exits.
        let membership = sent.membership;
        let conn = self.clone();
        state
            .work
            .spawn(async move { conn.notify_offline(&msg, &membership).await });
    }

    /// Members with no live connection anywhere get a notification event. While Redis
    /// is away presence is unknown and none are sent.
    async fn notify_offline(&self, msg: &chatstream_store::StoredMessage, members: &Membership) {
        if self.state.events.mode() == PublishMode::None || !self.state.redis.is_up() {
            return;
        }
        let tenant = &self.claims.tenant;
        let others: Vec<&String> = members
            .members
            .iter()
            .filter(|u| **u != msg.sender_id && !self.state.hub.is_local(tenant, u))
            .collect();
        if others.is_empty() || others.len() > 100 {
            return;
        }
        let now = clock::now_ms();
        let mut pipe = redis::pipe();
        for u in &others {
            pipe.cmd("ZCOUNT")
                .arg(presence_key(tenant, u))
                .arg(now)
                .arg("+inf");
        }
        let Ok(counts) = self
            .state
            .redis
            .run(|mut c| async move { pipe.query_async::<Vec<i64>>(&mut c).await })
            .await
        else {
            return;
        };
        let mut notifications = Vec::new();
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
            notifications.push(e);
        }
        // Queued in order: once the last one is committed, all are.
        let last = notifications.pop();
        for e in notifications {
            self.state.events.emit(e).await;
        }
        if let Some(e) = last {
            self.state.events.emit_confirmed(e).await;
        }
    }

    async fn sync(&self, conversation_id: String, after_seq: i64, limit: Option<u32>) {
        if after_seq < 0 {
            return self
                .reply(error_frame(
                    ErrorCode::InvalidArgument,
                    "after_seq must be >= 0",
                    None,
                ))
                .await;
        }
        if self.require_member(&conversation_id, None).await.is_none() {
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
                    })
                    .await;
                }
                self.reply(ServerFrame::SyncDone {
                    conversation_id,
                    last_seq,
                    more,
                })
                .await;
            }
            Err(e) => self.reply(store_error(e, None)).await,
        }
    }

    /// Marks the conversation read up to `up_to_seq`: the mark and its READ event commit
    /// together; then the reader's own connection gets the READ status (the
    /// acknowledgement) and the other members' connections get it live.
    async fn read(&self, conversation_id: String, up_to_seq: i64) {
        if up_to_seq < 0 {
            return self
                .reply(error_frame(
                    ErrorCode::InvalidArgument,
                    "up_to_seq must be >= 0",
                    None,
                ))
                .await;
        }
        let Some(membership) = self.require_member(&conversation_id, None).await else {
            return;
        };
        let state = &self.state;
        let ctx = EventContext {
            conversation_id: Some(conversation_id.clone()),
            ..self.ctx(new_trace_id())
        };
        let event = state.events.envelope(
            &ctx,
            EventBody::MessageStatus(ev::MessageStatusChanged {
                message_id: None,
                conversation_id: conversation_id.clone(),
                seq: up_to_seq,
                user_id: self.claims.sub.clone(),
                status: MessageStatus::Read,
            }),
        );
        let rows = state.events.transactional_rows(|| event.clone());
        match state
            .store
            .mark_read_with_events(
                &conversation_id,
                &self.claims.tenant,
                &self.claims.sub,
                up_to_seq,
                &rows,
            )
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                state.members.invalidate(&conversation_id);
                return self
                    .reply(error_frame(
                        ErrorCode::NotMember,
                        format!(
                            "{} is not a member of conversation {conversation_id}",
                            self.claims.sub
                        ),
                        None,
                    ))
                    .await;
            }
            Err(e) => return self.reply(store_error(e, None)).await,
        }
        match state.events.mode() {
            PublishMode::Outbox => state.events.poke_relay(),
            PublishMode::Async => state.events.emit(event).await,
            PublishMode::None => {}
        }
        let frame = ServerFrame::Status {
            conversation_id: conversation_id.clone(),
            message_id: None,
            seq: up_to_seq,
            user_id: self.claims.sub.clone(),
            status: MessageStatus::Read,
            ts_ms: clock::now_ms(),
        };
        let encoded = frame.encode();
        self.reply(frame).await;
        state.fanout(FanoutEnvelope {
            origin_node: state.cfg.node_id.clone(),
            origin_conn: Some(self.id),
            tenant: membership.tenant.clone(),
            recipients: membership.members.clone(),
            frame: encoded,
            live_order: None,
            receipt: None,
            members_changed: None,
        });
    }

    async fn typing(&self, conversation_id: String, is_typing: bool) {
        let Some(membership) = self.require_member(&conversation_id, None).await else {
            return;
        };
        let frame = ServerFrame::Typing {
            conversation_id: conversation_id.clone(),
            user_id: self.claims.sub.clone(),
            is_typing,
            ts_ms: clock::now_ms(),
        };
        let recipients = membership
            .members
            .iter()
            .filter(|u| **u != self.claims.sub)
            .cloned()
            .collect();
        self.state.fanout(FanoutEnvelope {
            origin_node: self.state.cfg.node_id.clone(),
            origin_conn: Some(self.id),
            tenant: membership.tenant.clone(),
            recipients,
            frame: frame.encode(),
            live_order: None,
            receipt: None,
            members_changed: None,
        });
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
            return self
                .reply(error_frame(
                    ErrorCode::InvalidArgument,
                    "prompt is empty",
                    None,
                ))
                .await;
        }
        if self.require_member(&conversation_id, None).await.is_none() {
            return;
        }
        match streams::start(
            &self.state,
            &self.claims.sub,
            &self.claims.tenant,
            &conversation_id,
            &prompt,
            Some(self.outlet.clone()),
        )
        .await
        {
            Ok(_) => {}
            Err((code, message)) => self.reply(error_frame(code, message, None)).await,
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
