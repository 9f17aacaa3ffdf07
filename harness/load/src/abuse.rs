//! Bad input beside the legitimate load (`load.abuse`): per kind, a connection of its own
//! (a user who is in no conversation) sends malformed, oversized, unknown-type and
//! wrong-version frames, sends to a conversation it is not in, floods past the rate
//! limit, or connects with a forged token — at the kind's open-loop rate — and checks
//! that each gets its documented error code (and close code) back. Every attempt is an
//! `abuse` operation in the history; counters say how many were answered as expected.

use chatstream_protocol::frames::{ClientFrame, ServerFrame};
use futures::{SinkExt, StreamExt};
use squall_history::{Kind, Value, ABUSE};
use squall_scenario::{Abuse, AbuseKind};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::shared::Shared;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Frames of a flood: well past the default burst of 100.
const FLOOD_FRAMES: usize = 200;
/// How long an answer may take.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// Who the abusers are and where they aim.
#[derive(Debug, Clone)]
pub struct AbuseTarget {
    /// A valid token of a user who is in no conversation.
    pub token: String,
    /// A token signed with the wrong secret.
    pub forged_token: String,
    /// A conversation of the run (the abuser is not in it).
    pub conversation_id: String,
    /// Bytes over the node's frame limit.
    pub oversized_bytes: usize,
}

fn expected(kind: AbuseKind) -> &'static str {
    match kind {
        AbuseKind::Malformed => "malformed_frame",
        AbuseKind::Oversized => "frame_too_large",
        AbuseKind::UnknownType => "unknown_type",
        AbuseKind::WrongVersion => "unsupported_version",
        AbuseKind::Unauthorized => "unauthorized",
        AbuseKind::NonMember => "not_member",
        AbuseKind::Flood => "rate_limited",
    }
}

fn bad_frames(kind: AbuseKind, target: &AbuseTarget, n: u64) -> Vec<String> {
    match kind {
        AbuseKind::Malformed => vec![format!("{{not json {n}")],
        AbuseKind::Oversized => vec![format!(
            r#"{{"v":1,"type":"ping","pad":"{}"}}"#,
            "x".repeat(target.oversized_bytes)
        )],
        AbuseKind::UnknownType => vec![format!(r#"{{"v":1,"type":"teleport","n":{n}}}"#)],
        AbuseKind::WrongVersion => vec![format!(r#"{{"v":99,"type":"ping","nonce":{n}}}"#)],
        AbuseKind::NonMember => vec![ClientFrame::Send {
            conversation_id: target.conversation_id.clone(),
            client_msg_id: format!("abuse-{n}"),
            body: "not a member".into(),
        }
        .encode()],
        AbuseKind::Flood => (0..FLOOD_FRAMES)
            .map(|i| {
                ClientFrame::Ping {
                    nonce: Some(n * 1000 + i as u64),
                }
                .encode()
            })
            .collect(),
        AbuseKind::Unauthorized => Vec::new(),
    }
}

fn error_code(text: &str) -> Option<String> {
    match ServerFrame::decode(text) {
        Ok(ServerFrame::Error { code, .. }) => serde_json::to_value(code)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string)),
        _ => None,
    }
}

async fn connect(url: &str, token: &str) -> Result<Ws, String> {
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async_with_config(format!("{url}/ws?token={token}"), None, true),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// Waits for the expected error code; a close with `close_ok` also counts (a flood may be
/// cut off with 1008, a forged token is closed with 4401 after its error).
async fn answer(ws: &mut Ws, want: &str, close_ok: Option<u16>) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + ANSWER_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(format!("no `{want}` within {ANSWER_TIMEOUT:?}")),
            Ok(None) => return Err("connection ended without an answer".into()),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(Message::Text(t)))) => {
                if let Some(code) = error_code(&t) {
                    return if code == want {
                        Ok(())
                    } else {
                        Err(format!("error `{code}` instead of `{want}`"))
                    };
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                let code = frame.as_ref().map(|f| u16::from(f.code));
                return match (code, close_ok) {
                    (Some(c), Some(ok)) if c == ok => Ok(()),
                    _ => Err(format!("closed ({code:?}) without `{want}`")),
                };
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

/// One attempt of `kind`; Ok when the node answered as documented.
async fn attempt(
    kind: AbuseKind,
    url: &str,
    target: &AbuseTarget,
    conn: &mut Option<Ws>,
    n: u64,
) -> Result<(), String> {
    if kind == AbuseKind::Unauthorized {
        let mut ws = connect(url, &target.forged_token).await?;
        answer(&mut ws, "unauthorized", None).await?;
        // Then the close with 4401.
        let closed = answer(&mut ws, "never", Some(4401)).await;
        let _ = ws.close(None).await;
        return closed.map_err(|e| format!("unauthorized, but then {e}"));
    }
    if conn.is_none() {
        let mut ws = connect(url, &target.token).await?;
        // The hello.
        let _ = tokio::time::timeout(ANSWER_TIMEOUT, ws.next()).await;
        *conn = Some(ws);
    }
    let Some(ws) = conn.as_mut() else {
        return Err("no connection".into());
    };
    for f in bad_frames(kind, target, n) {
        if let Err(e) = ws.feed(Message::text(f)).await {
            *conn = None;
            return Err(e.to_string());
        }
    }
    if let Err(e) = ws.flush().await {
        *conn = None;
        return Err(e.to_string());
    }
    let close_ok = (kind == AbuseKind::Flood).then_some(1008);
    let result = answer(ws, expected(kind), close_ok).await;
    if kind == AbuseKind::Flood {
        // Let the flood's other answers go by before the next one, and start fresh if the
        // node closed the connection.
        let quiet = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(quiet, ws.next()).await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
        *conn = None;
    } else if result.is_err() {
        *conn = None;
    }
    result
}

/// One task per abuse kind, from `start` to `end` (or `stop`).
pub fn spawn(
    abuse: &[Abuse],
    target: AbuseTarget,
    shared: Arc<Shared>,
    start: Instant,
    end: Instant,
    stop: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let target = Arc::new(target);
    abuse
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let (a, target, shared, mut stop) =
                (a.clone(), target.clone(), shared.clone(), stop.clone());
            tokio::spawn(async move {
                let process = ABUSE - i as u32;
                let url = shared.nodes[i % shared.nodes.len()].clone();
                let gap = Duration::from_secs_f64(1.0 / a.rate.max(0.001));
                let counters = &shared.metrics.counters;
                let mut conn = None;
                let mut due = start;
                let mut n = 0u64;
                while due < end {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due.into()) => {}
                        _ = stop.changed() => break,
                    }
                    let kind = a.kind.name().to_string();
                    shared.rec.record(
                        process,
                        Kind::Invoke,
                        Value::Abuse {
                            kind: kind.clone(),
                            got: None,
                        },
                    );
                    counters.abuse_sent.fetch_add(1, Ordering::Relaxed);
                    match attempt(a.kind, &url, &target, &mut conn, n).await {
                        Ok(()) => {
                            counters.abuse_answered.fetch_add(1, Ordering::Relaxed);
                            shared
                                .rec
                                .record(process, Kind::Ok, Value::Abuse { kind, got: None });
                        }
                        Err(got) => {
                            counters.abuse_unanswered.fetch_add(1, Ordering::Relaxed);
                            shared.rec.record(
                                process,
                                Kind::Fail,
                                Value::Abuse {
                                    kind,
                                    got: Some(got),
                                },
                            );
                        }
                    }
                    n += 1;
                    due += gap;
                    // Open-loop, but an attempt that took longer than the gap is not
                    // followed by a burst of catch-up attempts.
                    let now = Instant::now();
                    if due < now {
                        due = now;
                    }
                }
                if let Some(mut ws) = conn {
                    let _ = ws.close(None).await;
                }
            })
        })
        .collect()
}
