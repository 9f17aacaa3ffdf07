//! The recovery phase: after the load has drained and every fault has healed, fresh
//! WebSocket clients read every conversation of the run from seq 0 (paging until the node
//! says there is no more) and record what they read as the recovery process's own records
//! (`recovery_read`, `recovery_msg`), never as a user's deliveries. The checkers use them
//! as the store's testimony: a message acknowledged but absent from the recovery read of
//! its conversation is lost at the store, whatever the members saw.
//!
//! One reader per conversation is enough (the store has one history per conversation):
//! readers are members chosen so that few connections cover every conversation, each
//! reading its conversations one at a time on one connection (a few frames in flight,
//! well under the node's per-connection rate limit). Bounded: per-frame silence, attempts
//! per conversation (each on the next node), readers at once, and one overall deadline.

use chatstream_protocol::frames::{ClientFrame, ServerFrame, Via as WireVia};
use futures::{SinkExt, StreamExt};
use squall_history::{Kind, Recorder, Value, HARNESS, RECOVERY};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::engine::{token, ws_url, LoadError, Target};
use crate::plan::Population;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Limits of the recovery phase.
#[derive(Debug, Clone)]
pub struct RecoveryOptions {
    /// The whole phase ends by then; conversations not read by then are recorded failed.
    pub deadline: Duration,
    /// Readers (connections) at once.
    pub concurrency: usize,
    /// Attempts per conversation, each on the next node.
    pub attempts: u32,
    /// A read with no frame for this long is abandoned (and retried).
    pub silence: Duration,
}

impl Default for RecoveryOptions {
    fn default() -> Self {
        RecoveryOptions {
            deadline: Duration::from_secs(120),
            concurrency: 16,
            attempts: 3,
            silence: Duration::from_secs(10),
        }
    }
}

/// What the phase did, for the run's summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoverySummary {
    pub conversations: usize,
    pub read: usize,
    pub failed: usize,
    pub messages: u64,
    pub readers: usize,
    pub elapsed_ms: u64,
}

/// Chooses one member per conversation to read it as: a member already reading another
/// conversation when there is one, so that few connections cover them all.
pub fn readers(population: &Population) -> BTreeMap<u32, Vec<u32>> {
    let mut out: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (c, conv) in population.conversations.iter().enumerate() {
        let Some(&first) = conv.members.first() else {
            continue;
        };
        let reader = conv
            .members
            .iter()
            .copied()
            .find(|m| out.contains_key(m))
            .unwrap_or(first);
        out.entry(reader).or_default().push(c as u32);
    }
    out
}

/// Runs the recovery phase. `stop` turning true (Ctrl-C) ends it early; what was not
/// read by then is recorded as failed reads.
pub async fn run(
    population: &Population,
    target: &Target,
    rec: Recorder,
    opts: RecoveryOptions,
    stop: watch::Receiver<bool>,
) -> Result<RecoverySummary, LoadError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + opts.deadline;
    rec.record(
        HARNESS,
        Kind::Info,
        Value::Phase {
            name: "recovery_start".into(),
        },
    );
    let nodes: Vec<String> = target.nodes.iter().map(|n| ws_url(n)).collect();
    if nodes.is_empty() {
        return Err(LoadError::Setup("recovery: no node to read from".into()));
    }
    let plan = readers(population);
    let ttl = opts.deadline + Duration::from_secs(600);
    let mut jobs = Vec::with_capacity(plan.len());
    for (reader, convs) in plan {
        let u = &population.users[reader as usize];
        let tok = token(&target.token_secret, &u.id, &u.tenant, ttl)?;
        jobs.push((reader, u.home % nodes.len(), tok, convs));
    }
    let readers_n = jobs.len();
    let ids: Vec<String> = population
        .conversations
        .iter()
        .map(|c| c.id.clone())
        .collect();
    let results: Vec<(usize, usize, u64)> =
        futures::stream::iter(jobs.into_iter().map(|(reader, home, tok, convs)| {
            let reader = Reader {
                u: reader,
                token: tok,
                nodes: &nodes,
                node: home,
                ids: &ids,
                rec: rec.clone(),
                opts: &opts,
                deadline,
                stop: stop.clone(),
            };
            reader.read_all(convs)
        }))
        .buffer_unordered(opts.concurrency.max(1))
        .collect()
        .await;
    let (read, failed, messages) = results
        .iter()
        .fold((0, 0, 0), |a, r| (a.0 + r.0, a.1 + r.1, a.2 + r.2));
    rec.record(
        HARNESS,
        Kind::Info,
        Value::Phase {
            name: "recovery_end".into(),
        },
    );
    let summary = RecoverySummary {
        conversations: population.conversations.len(),
        read,
        failed,
        messages,
        readers: readers_n,
        elapsed_ms: started.elapsed().as_millis() as u64,
    };
    tracing::info!(?summary, "recovery read");
    Ok(summary)
}

/// One member's fresh connection, reading its share of the conversations.
struct Reader<'a> {
    u: u32,
    token: String,
    nodes: &'a [String],
    node: usize,
    ids: &'a [String],
    rec: Recorder,
    opts: &'a RecoveryOptions,
    deadline: tokio::time::Instant,
    stop: watch::Receiver<bool>,
}

/// Why one read attempt ended without its answer.
enum ReadError {
    /// The connection is unusable: reconnect (to the next node) and try again.
    Connection(String),
    /// The node answered with an error frame: try again on the next node.
    Refused(String),
}

impl Reader<'_> {
    fn record(&self, k: Kind, v: Value) {
        self.rec.record(RECOVERY, k, v);
    }

    fn out_of_time(&self) -> bool {
        tokio::time::Instant::now() >= self.deadline || *self.stop.borrow()
    }

    /// Reads every conversation of this reader: (read, failed, messages).
    async fn read_all(mut self, convs: Vec<u32>) -> (usize, usize, u64) {
        let (mut read, mut failed, mut messages) = (0usize, 0usize, 0u64);
        let mut ws: Option<Ws> = None;
        for c in convs {
            let mut attempt = 0u32;
            let mut last_err = String::new();
            let mut done = false;
            while attempt < self.opts.attempts && !self.out_of_time() {
                attempt += 1;
                self.record(
                    Kind::Invoke,
                    Value::RecoveryRead {
                        c,
                        u: self.u,
                        last: None,
                        n: None,
                        err: None,
                    },
                );
                if ws.is_none() {
                    match self.connect().await {
                        Ok(s) => ws = Some(s),
                        Err(e) => {
                            last_err = e;
                            self.fail(c, &last_err);
                            self.node = (self.node + 1) % self.nodes.len();
                            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt)))
                                .await;
                            continue;
                        }
                    }
                }
                let Some(socket) = ws.as_mut() else { continue };
                match self.read_one(socket, c).await {
                    Ok((last, n)) => {
                        self.record(
                            Kind::Ok,
                            Value::RecoveryRead {
                                c,
                                u: self.u,
                                last: Some(last),
                                n: Some(n),
                                err: None,
                            },
                        );
                        messages += u64::from(n);
                        done = true;
                        break;
                    }
                    Err(ReadError::Connection(e)) | Err(ReadError::Refused(e)) => {
                        // A fresh connection on the next node for the next attempt.
                        if let Some(mut old) = ws.take() {
                            let _ =
                                tokio::time::timeout(Duration::from_secs(1), old.close(None)).await;
                        }
                        last_err = e;
                        self.fail(c, &last_err);
                        self.node = (self.node + 1) % self.nodes.len();
                    }
                }
            }
            if done {
                read += 1;
            } else {
                failed += 1;
                if attempt == 0 {
                    // Never tried: the phase ran out of time (or was stopped) first.
                    self.record(
                        Kind::Invoke,
                        Value::RecoveryRead {
                            c,
                            u: self.u,
                            last: None,
                            n: None,
                            err: None,
                        },
                    );
                    self.fail(
                        c,
                        "the recovery phase ended before this conversation was read",
                    );
                }
                tracing::warn!(conversation = %self.ids[c as usize], error = %last_err, "recovery read failed");
            }
        }
        if let Some(mut s) = ws {
            let _ = tokio::time::timeout(Duration::from_secs(1), s.close(None)).await;
        }
        (read, failed, messages)
    }

    fn fail(&self, c: u32, err: &str) {
        self.record(
            Kind::Fail,
            Value::RecoveryRead {
                c,
                u: self.u,
                last: None,
                n: None,
                err: Some(err.to_string()),
            },
        );
    }

    async fn connect(&self) -> Result<Ws, String> {
        let url = format!("{}/ws?token={}", self.nodes[self.node], self.token);
        let attempt = async {
            let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true)
                .await
                .map_err(|e| e.to_string())?;
            match ws.next().await {
                Some(Ok(Message::Text(t))) => match ServerFrame::decode(&t) {
                    Ok(ServerFrame::Hello { .. }) => Ok(ws),
                    Ok(ServerFrame::Error { code, message, .. }) => {
                        Err(format!("{code:?}: {message}"))
                    }
                    Ok(other) => Err(format!("expected hello, got {other:?}")),
                    Err(e) => Err(e.to_string()),
                },
                Some(Ok(other)) => Err(format!("expected hello, got {other:?}")),
                Some(Err(e)) => Err(e.to_string()),
                None => Err("closed before hello".into()),
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(r) => r.map_err(|e| format!("node {}: {e}", self.node + 1)),
            Err(_) => Err(format!("node {}: no hello within 5 s", self.node + 1)),
        }
    }

    /// Reads conversation `c` from seq 0 to the end: (last seq, messages read).
    async fn read_one(&self, ws: &mut Ws, c: u32) -> Result<(i64, u32), ReadError> {
        let id = &self.ids[c as usize];
        let mut after = 0i64;
        let mut n = 0u32;
        // Pages are bounded by the node's sync limit; this bounds the pages.
        for _page in 0..100_000 {
            let frame = ClientFrame::Sync {
                conversation_id: id.clone(),
                after_seq: after,
                limit: None,
            };
            ws.send(Message::text(frame.encode()))
                .await
                .map_err(|e| ReadError::Connection(e.to_string()))?;
            loop {
                let left = self
                    .deadline
                    .saturating_duration_since(tokio::time::Instant::now());
                let wait = self.opts.silence.min(left);
                let msg = match tokio::time::timeout(wait, ws.next()).await {
                    Err(_) => {
                        return Err(ReadError::Connection(format!(
                            "no frame for {:.1} s",
                            wait.as_secs_f64()
                        )))
                    }
                    Ok(None) => return Err(ReadError::Connection("connection ended".into())),
                    Ok(Some(Err(e))) => return Err(ReadError::Connection(e.to_string())),
                    Ok(Some(Ok(m))) => m,
                };
                let text = match msg {
                    Message::Text(t) => t,
                    Message::Close(f) => {
                        return Err(ReadError::Connection(
                            f.map(|f| format!("closed {} {}", u16::from(f.code), f.reason))
                                .unwrap_or_else(|| "closed".into()),
                        ))
                    }
                    _ => continue,
                };
                match ServerFrame::decode(&text) {
                    Ok(ServerFrame::Msg {
                        conversation_id,
                        seq,
                        client_msg_id,
                        sender_id,
                        via: WireVia::Sync,
                        ..
                    }) if &conversation_id == id => {
                        n += 1;
                        self.record(
                            Kind::Ok,
                            Value::RecoveryMsg {
                                c,
                                s: seq,
                                m: client_msg_id,
                                from: sender_index(&sender_id),
                            },
                        );
                    }
                    Ok(ServerFrame::SyncDone {
                        conversation_id,
                        last_seq,
                        more,
                    }) if &conversation_id == id => {
                        if !more {
                            return Ok((last_seq, n));
                        }
                        if last_seq <= after {
                            return Err(ReadError::Refused(format!(
                                "sync_done with more at {last_seq} after {after}: no progress"
                            )));
                        }
                        after = last_seq;
                        break;
                    }
                    Ok(ServerFrame::Error { code, message, .. }) => {
                        return Err(ReadError::Refused(format!("{code:?}: {message}")))
                    }
                    // Live traffic, statuses, pongs: not the store's answer.
                    _ => {}
                }
            }
        }
        Err(ReadError::Refused("more than 100,000 pages".into()))
    }
}

fn sender_index(sender_id: &str) -> u32 {
    // Users are named `<tag>-u<index>` by the plan.
    sender_id
        .rsplit_once("-u")
        .and_then(|(_, i)| i.parse().ok())
        .unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{PlannedConversation, PlannedUser};

    #[test]
    fn few_readers_cover_every_conversation() {
        let users = (0..6)
            .map(|i| PlannedUser {
                id: format!("t-u{i}"),
                tenant: "t".into(),
                home: 0,
            })
            .collect();
        let conv = |members: Vec<u32>| PlannedConversation {
            id: "c".into(),
            tenant: "t".into(),
            members,
        };
        let p = Population {
            users,
            conversations: vec![
                conv(vec![0, 1]),
                conv(vec![2, 0]),
                conv(vec![3, 4]),
                conv(vec![5, 4, 3]),
            ],
        };
        let r = readers(&p);
        assert_eq!(r.get(&0), Some(&vec![0, 1]));
        assert_eq!(r.get(&3), Some(&vec![2, 3]));
        assert_eq!(r.len(), 2);
        assert_eq!(sender_index("r1-u17"), 17);
    }
}
