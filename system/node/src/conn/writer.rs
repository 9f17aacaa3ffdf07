//! The connection's writer task: drains the outlet into the socket, pings the client,
//! and ends the connection for an idle client, a stalled socket, a hub-side close (slow
//! consumer, rate limit) or shutdown, with the close frame each calls for.

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use chatstream_protocol::frames::ErrorCode;
use chatstream_protocol::ServerFrame;
use futures::stream::SplitSink;
use futures::SinkExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

use super::limits::Heard;
use crate::close::{CLOSE_IDLE, CLOSE_SHUTDOWN};
use crate::hub::{CloseReason, Outbound, Outlet};
use crate::metrics as m;

/// At most this many queued frames, or bytes, are written in one flush.
const WRITE_BATCH_FRAMES: u64 = 64;
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// How long a close frame may take to go out before the socket is just dropped.
pub(super) const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(reason.to_string()),
    }))
}

/// What the writer needs besides the socket and the outlet.
pub(super) struct WriterSettings {
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) stall: Duration,
    pub(super) ping_every: Duration,
    pub(super) idle: Duration,
    pub(super) heard: Arc<Heard>,
}

/// Tells the outlet its writer is gone when the writer ends, however it ends.
struct WriterGone(Arc<Outlet>);

impl Drop for WriterGone {
    fn drop(&mut self) {
        self.0.writer_gone();
    }
}

/// Drains the outlet into the socket and pings the client until the connection ends. A
/// frame the socket does not take within `stall` ends the connection (the peer stopped
/// reading); so does silence past `idle`.
///
/// This future lives as long as the connection: its rarely taken ways out (shutdown's
/// goodbye) are boxed so that they take room only when taken.
pub(super) async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    outlet: Arc<Outlet>,
    mut settings: WriterSettings,
    mut reader_done: oneshot::Receiver<()>,
) {
    let gone = WriterGone(outlet);
    let outlet = &*gone.0;
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
                    Some((Message::Text(text), Some(n)))
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
                let _ = Box::pin(tokio::time::timeout(CLOSE_WRITE_TIMEOUT, goodbye)).await;
                return;
            }
            _ = &mut reader_done => break,
        };
        let Some((message, frees)) = next else {
            continue;
        };
        // Frames already queued behind this one go out with it: fed into the socket's
        // write buffer and flushed once, one write for a group commit's acks instead of
        // one per frame.
        let mut bytes = frees.unwrap_or(0);
        let mut frames = u64::from(frees.is_some());
        let write = async {
            sink.feed(message).await?;
            while frames < WRITE_BATCH_FRAMES && bytes < WRITE_BATCH_BYTES {
                let Ok(text) = rx.try_recv() else { break };
                bytes += text.len();
                frames += 1;
                sink.feed(Message::Text(text)).await?;
            }
            sink.flush().await
        };
        match tokio::time::timeout(stall, write).await {
            Ok(Ok(())) => {
                if frames > 0 {
                    outlet.written(bytes);
                    metrics::counter!(m::FRAMES_OUT).increment(frames);
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
