//! One WebSocket connection: authenticate, register with the hub, then read frames
//! (size check, rate limit) and hand each to the commands while a writer task drains the
//! connection's outlet and pings the client. Every problem with a frame is answered with
//! an `error` frame (at most `max_error_frames_per_s` a second, past that only those naming
//! a send or resume, each the only answer to its request) and the connection stays
//! open; the node closes it only for a bad token (4401), a frame past the hard cap (1009),
//! a slow consumer (4408), silence past the idle timeout (4409), a rate limit exceeded
//! for seconds on end (1008), shutdown (1012), or a socket that takes nothing for the
//! write stall timeout (dropped: no close frame gets through a stalled socket).
//!
//! Nothing on the read loop waits for Redis: a send is stored, acknowledged and handed to
//! the fan-out queue; presence lookups for notifications run beside it.

mod limits;
mod writer;

use axum::extract::ws::{Message, WebSocket};
use chatstream_protocol::auth::{Claims, TokenError};
use chatstream_protocol::frames::ErrorCode;
use chatstream_protocol::{ClientFrame, ServerFrame};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

use crate::close::{CLOSE_RATE_LIMIT, CLOSE_UNAUTHORIZED};
use crate::commands::{self, error_frame, Client};
use crate::hub::{CloseReason, Outbound};
use crate::log_limit::warn_if_slow;
use crate::metrics as m;
use crate::state::NodeState;
use crate::{clock, presence};
use limits::{Heard, Offence, RateLimit};
use writer::{close_message, write_loop, WriterSettings, CLOSE_WRITE_TIMEOUT};

/// A frame holding the read loop this long is reported (sends normally hand over at once).
const SLOW_DISPATCH: Duration = Duration::from_secs(10);

async fn close_with(sink: &mut Sink, code: u16, reason: &str) {
    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, sink.send(close_message(code, reason))).await;
}

type Sink = SplitSink<WebSocket, Message>;

/// Serves one upgraded connection until it closes.
///
/// A connection's reader future lives as long as the connection, idle or not, so it is
/// kept small (`system/docs/perf/connection-memory.md`): the socket is split before the
/// future exists (a future keeps room for its arguments all its life), and whatever is
/// awaited only now and then — a frame's command, a reply, a presence update — is boxed,
/// so its state takes room only while it runs.
pub fn serve(
    state: Arc<NodeState>,
    socket: WebSocket,
    auth: Result<Claims, TokenError>,
) -> impl Future<Output = ()> + Send + 'static {
    let (sink, stream) = socket.split();
    read_loop(state, sink, stream, auth)
}

async fn read_loop(
    state: Arc<NodeState>,
    mut sink: Sink,
    mut stream: SplitStream<WebSocket>,
    auth: Result<Claims, TokenError>,
) {
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
                sink.send(Message::Text(frame.encode().into())),
            )
            .await;
            close_with(&mut sink, CLOSE_UNAUTHORIZED, &e.to_string()).await;
            return;
        }
    };
    let hello = ServerFrame::Hello {
        node_id: state.cfg.node_id.clone(),
        user_id: claims.sub.clone(),
        tenant: claims.tenant.clone(),
        max_frame_bytes: state.cfg.max_frame_bytes,
        server_time_ms: clock::now_ms(),
    };
    // Queued before the connection can be delivered to: `hello` is always the first frame.
    let reg = state.hub.register(
        &claims.tenant,
        &claims.sub,
        Some(Outbound::from(hello.encode())),
    );
    let conn = Arc::new(Client::new(
        state.clone(),
        claims,
        reg.id,
        reg.outlet.clone(),
    ));
    Box::pin(presence::mark(
        &state,
        &conn.claims.tenant,
        &conn.claims.sub,
        conn.id,
        true,
    ))
    .await;

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
                Box::pin(conn.reply(error_frame(
                    ErrorCode::MalformedFrame,
                    "binary frames are not supported; send JSON text frames",
                    None,
                )))
                .await;
                continue;
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => break,
            Some(Ok(_)) => continue,
        };
        metrics::counter!(m::FRAMES_IN).increment(1);
        if text.len() > state.cfg.max_frame_bytes {
            Box::pin(conn.reply(error_frame(
                ErrorCode::FrameTooLarge,
                format!(
                    "frame of {} bytes exceeds the limit of {} bytes",
                    text.len(),
                    state.cfg.max_frame_bytes
                ),
                None,
            )))
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
            // Decoded only to name the refused request: a client that cannot tell which
            // send was refused waits out its ack timeout not knowing whether it was stored.
            let ref_id = ClientFrame::decode(&text)
                .ok()
                .and_then(|f| f.ref_id().map(str::to_string));
            Box::pin(conn.reply(ServerFrame::Error {
                code: ErrorCode::RateLimited,
                message: format!(
                    "more than {} frames/s (burst {}); slow down",
                    state.cfg.rate_limit_per_s, state.cfg.rate_limit_burst
                ),
                ref_id,
                retry_after_ms: Some(wait.as_millis() as u64 + 1),
            }))
            .await;
            continue;
        }
        // Boxed: a command's state (a send, a sync) is many times the loop's own.
        warn_if_slow(
            Box::pin(commands::dispatch(&conn, &text)),
            SLOW_DISPATCH,
            || {
                format!(
                    "connection {} of {} is held by one frame; it reads nothing meanwhile",
                    conn.id, conn.claims.sub
                )
            },
        )
        .await;
    }
    // Sends still being stored are answered (and fanned out) by the completer, which
    // ends after them.
    conn.close_sends();
    state
        .hub
        .unregister(&conn.claims.tenant, &conn.claims.sub, conn.id);
    Box::pin(presence::mark(
        &state,
        &conn.claims.tenant,
        &conn.claims.sub,
        conn.id,
        false,
    ))
    .await;
    if !writer_done {
        let _ = reader_done.send(());
        let _ = writer.await;
    }
}
