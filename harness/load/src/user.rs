//! One simulated user: a WebSocket connection to its node, driven by the operations the
//! pacer hands it and by what the node sends. It records every operation and delivery in
//! the history, keeps a per-conversation cursor of the seqs it has seen, retries unacked
//! sends with the same client id after a reconnect (to the next node when its own died or
//! drains), resyncs every conversation after each reconnect and resumes its streams
//! (again, a few times, when a resume is refused as `unavailable`). A slow consumer
//! (`load.slow_consumers`) stops reading its socket now and then: its task does nothing
//! for the pause, as a frozen client would, and its socket has a small receive buffer so
//! that what it does not read backs up at the node rather than in the kernel.

use chatstream_protocol::frames::{
    ClientFrame, ErrorCode, ServerFrame, StreamOutcome, Via as WireVia,
};
use futures::{SinkExt, StreamExt};
use squall_history::{Kind, Value, Via};
use squall_scenario::OpKind;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::body::{self, BodyStamp};
use crate::fasthash::FastMap;
use crate::metrics::names;
use crate::plan::Arrival;
use crate::shared::Shared;
use crate::tap::AckSample;
use crate::wire::{self, Incoming};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the engine asks of a user.
#[derive(Debug)]
pub enum Command {
    /// An operation of the schedule, due at `due`.
    Op { arrival: Arrival, due: Instant },
    /// Follow a stream started over HTTP (`POST /api/chat`) from its first chunk.
    FollowStream {
        session: String,
        conversation: u32,
        due: Instant,
    },
    /// The load is over: resync every conversation once more, then close.
    Finish,
}

/// Who the user is.
#[derive(Debug, Clone)]
pub struct UserSpec {
    pub index: u32,
    pub id: String,
    pub token: String,
    pub home: usize,
    pub conversations: Vec<u32>,
    /// A slow consumer: the offset of its first stall from the start of the measured
    /// window (the pause and the period are the scenario's).
    pub stall_offset: Option<Duration>,
}

/// The receive buffer of a slow consumer's socket: small, so that frames it does not read
/// back up at the node (whose bound then closes the connection) instead of in the kernel.
const SLOW_RECV_BUFFER: u32 = 32 * 1024;
/// Sends given up at their ack timeout that a user still recognises when their ack comes.
const TIMED_OUT_KEPT: usize = 4096;

/// Refused resumes (`unavailable`) retried per stream session before giving up.
const RESUME_RETRIES: u32 = 5;
/// Pause before retrying a refused resume.
const RESUME_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The period of a user's housekeeping while it has retries or a final phase to run.
const TICK: Duration = Duration::from_millis(100);
/// Pause before asking again for a sync the node refused.
const SYNC_RETRY_AFTER: Duration = Duration::from_secs(1);

/// An ack of one of this user's sends, as the history records it.
struct Acked {
    conversation: u32,
    cmid: String,
    message_id: String,
    seq: i64,
    duplicate: bool,
}

struct PendingSend {
    conversation: u32,
    cmid: String,
    body: String,
    due: Instant,
    first_invoked: Instant,
    last_written: Option<Instant>,
}

#[derive(Default)]
struct Cursor {
    /// Every seq up to here has been seen.
    contiguous: i64,
    above: BTreeSet<i64>,
    /// A sync is in flight (its `after`), with when it started.
    syncing: Option<(i64, Instant, u32)>,
    /// When the request of the sync in flight (its first page or the next) was written.
    requested: Option<Instant>,
    /// A sync the node refused, to be asked again then.
    retry_at: Option<Instant>,
}

impl Cursor {
    /// Whether seq `seq` (or a later one) has been seen.
    fn reached(&self, seq: i64) -> bool {
        self.contiguous >= seq || self.above.last().is_some_and(|&s| s >= seq)
    }

    fn see(&mut self, seq: i64) {
        if seq == self.contiguous + 1 {
            self.contiguous = seq;
            while self.above.remove(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
        } else if seq > self.contiguous + 1 {
            self.above.insert(seq);
        }
    }
}

struct StreamFollow {
    due: Instant,
    last_index: i64,
    last_chunk_at: Option<Instant>,
    /// Resumes refused so far, and when to try again after the last one.
    refusals: u32,
    retry_at: Option<Instant>,
}

impl StreamFollow {
    fn new(due: Instant) -> Self {
        StreamFollow {
            due,
            last_index: -1,
            last_chunk_at: None,
            refusals: 0,
            retry_at: None,
        }
    }
}

/// Why a connection ended.
enum Ended {
    Lost(String),
    Planned,
    Finished,
}

pub struct User {
    spec: UserSpec,
    shared: Arc<Shared>,
    node: usize,
    pending: FastMap<String, PendingSend>,
    /// Sends given up as unknown at their ack timeout, by client_msg_id: their
    /// conversation, so that an ack arriving later is still heard (oldest forgotten first).
    timed_out: FastMap<String, u32>,
    timed_out_order: VecDeque<String>,
    unsent: VecDeque<String>,
    cursors: HashMap<u32, Cursor>,
    stream_requests: VecDeque<(u32, Instant)>,
    streams: HashMap<String, StreamFollow>,
    next_msg: u64,
    /// Since when every conversation has to be resynced (set at a reconnect).
    resync_since: Option<Instant>,
    /// Told to finish: no more operations; waits for the final phase (every user's sends
    /// settled) before its final resync.
    finishing: bool,
    /// The final phase has begun for this user (final resync asked, deadline running).
    final_started: bool,
}

impl User {
    pub fn new(spec: UserSpec, shared: Arc<Shared>) -> Self {
        let cursors = spec
            .conversations
            .iter()
            .map(|&c| (c, Cursor::default()))
            .collect();
        User {
            node: spec.home,
            spec,
            shared,
            pending: FastMap::default(),
            timed_out: FastMap::default(),
            timed_out_order: VecDeque::new(),
            unsent: VecDeque::new(),
            cursors,
            stream_requests: VecDeque::new(),
            streams: HashMap::new(),
            next_msg: 0,
            resync_since: None,
            finishing: false,
            final_started: false,
        }
    }

    fn record(&self, k: Kind, v: Value) {
        self.shared.rec.record(self.spec.index, k, v);
    }

    /// Records what a frame received at `at` brought (the frame's own instant: a second
    /// clock read per record was a visible share of the per-frame cost).
    fn record_at(&self, at: Instant, k: Kind, v: Value) {
        self.shared.rec.record_at(at, self.spec.index, k, v);
    }

    fn due_us(&self, at: Instant) -> u64 {
        self.shared.rec.micros(at)
    }

    /// Connects to the home node; `connected` is told once (success or giving up).
    pub async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Command>,
        connected: tokio::sync::mpsc::UnboundedSender<Result<u32, String>>,
    ) {
        let mut first = Some(connected);
        let mut failures = 0u32;
        let mut lost_at: Option<Instant> = None;
        loop {
            match self.connect().await {
                Ok(ws) => {
                    failures = 0;
                    if let Some(tx) = first.take() {
                        let _ = tx.send(Ok(self.spec.index));
                    }
                    if let Some(at) = lost_at.take() {
                        self.shared
                            .metrics
                            .counters
                            .reconnects
                            .fetch_add(1, Ordering::Relaxed);
                        self.resync_since = Some(at);
                        self.start_resync();
                    }
                    match self.serve(ws, &mut rx).await {
                        Ended::Finished => {
                            // Recorded so that a checker knows this user stopped listening
                            // here on purpose (nothing acked later is owed to it).
                            self.record(
                                Kind::Info,
                                Value::Disconnect {
                                    node: self.node as u16 + 1,
                                    reason: "finished".into(),
                                },
                            );
                            self.shared
                                .metrics
                                .counters
                                .connected
                                .fetch_sub(1, Ordering::Relaxed);
                            break;
                        }
                        Ended::Planned => {
                            lost_at = Some(Instant::now());
                            self.stream_requests_lost();
                            self.node = (self.node + 1) % self.shared.nodes.len();
                        }
                        Ended::Lost(reason) => {
                            lost_at = Some(Instant::now());
                            self.stream_requests_lost();
                            self.record(
                                Kind::Info,
                                Value::Disconnect {
                                    node: self.node as u16 + 1,
                                    reason,
                                },
                            );
                            self.shared
                                .metrics
                                .counters
                                .disconnects
                                .fetch_add(1, Ordering::Relaxed);
                            self.node = (self.node + 1) % self.shared.nodes.len();
                        }
                    }
                    self.shared
                        .metrics
                        .counters
                        .connected
                        .fetch_sub(1, Ordering::Relaxed);
                }
                Err(e) => {
                    failures += 1;
                    if let Some(tx) = &first {
                        if failures >= self.shared.connect_attempts {
                            let _ = tx.send(Err(format!("{}: {e}", self.spec.id)));
                            return;
                        }
                    }
                    if self.finishing {
                        break;
                    }
                    self.node = (self.node + 1) % self.shared.nodes.len();
                    // Back off, but keep taking operations: they are due whatever the system does.
                    let backoff = Duration::from_millis(100 * u64::from(failures.min(20)));
                    let until = tokio::time::Instant::now() + backoff;
                    loop {
                        tokio::select! {
                            _ = tokio::time::sleep_until(until) => break,
                            cmd = rx.recv() => match cmd {
                                Some(Command::Finish) | None => { self.finishing = true; break; }
                                Some(cmd) => self.queue_offline(cmd),
                            },
                        }
                    }
                    self.expire_pending();
                }
            }
        }
        self.give_up_pending();
    }

    async fn connect(&mut self) -> Result<Ws, String> {
        let node = self.node;
        self.record(
            Kind::Invoke,
            Value::Connect {
                node: node as u16 + 1,
                err: None,
            },
        );
        let started = Instant::now();
        let url = format!("{}/ws?token={}", self.shared.nodes[node], self.spec.token);
        let slow = self.spec.stall_offset.is_some();
        let attempt = async {
            let mut ws = if slow && url.starts_with("ws://") {
                connect_small_buffer(&url).await?
            } else {
                tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true)
                    .await
                    .map_err(|e| e.to_string())?
                    .0
            };
            // The first frame is `hello`, or an error and a close for a bad token.
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
        let result = match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(r) => r,
            Err(_) => Err("no hello within 5 s".into()),
        };
        let counters = &self.shared.metrics.counters;
        match &result {
            Ok(_) => {
                counters.connects.fetch_add(1, Ordering::Relaxed);
                counters.connected.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                // Counted by when it started (a window's operations are those due in it).
                self.shared
                    .record_latency(names::CONNECT, now - started, started);
                self.record(
                    Kind::Ok,
                    Value::Connect {
                        node: node as u16 + 1,
                        err: None,
                    },
                );
            }
            Err(e) => {
                counters.connect_failures.fetch_add(1, Ordering::Relaxed);
                self.record(
                    Kind::Fail,
                    Value::Connect {
                        node: node as u16 + 1,
                        err: Some(e.clone()),
                    },
                );
            }
        }
        result
    }

    async fn serve(&mut self, mut ws: Ws, rx: &mut mpsc::UnboundedReceiver<Command>) -> Ended {
        // Retries first, with their original client ids, then whatever the resync needs.
        if let Err(e) = self.flush_unsent(&mut ws).await {
            return Ended::Lost(e);
        }
        if let Err(e) = self.send_resyncs(&mut ws).await {
            return Ended::Lost(e);
        }
        if let Err(e) = self.resume_streams(&mut ws).await {
            return Ended::Lost(e);
        }
        // The housekeeping tick (ack timeouts, retries, the final phase) runs only when
        // there is housekeeping to do: a tick every 100 ms for every user whatever the
        // traffic cost more CPU than the messages themselves at low per-user rates.
        let tick = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(tick);
        let mut armed: Option<Instant> = None;
        let mut last_tick = Instant::now();
        // Reconnected during the final phase: the resync this connection started above is
        // the final one; end once it is done (or at the deadline), not never.
        let mut finish_deadline: Option<Instant> = self
            .final_started
            .then(|| Instant::now() + self.shared.finish_timeout);
        let mut stall_at = self.next_stall();
        // A time that never comes, for a timer that is not armed.
        let never = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        // The slow consumer's next stall, one timer for the connection, reset when the
        // stall moves: a disabled select branch still builds its future, and a timer
        // built and dropped per frame took the runtime's timer lock on every drop.
        let stall = tokio::time::sleep_until(stall_at.map_or(never, Into::into));
        tokio::pin!(stall);
        let mut stall_armed = stall_at;
        loop {
            let want = self.next_tick(last_tick);
            if want != armed {
                tick.as_mut().reset(want.map_or(never, Into::into));
                armed = want;
            }
            if stall_at != stall_armed {
                stall.as_mut().reset(stall_at.map_or(never, Into::into));
                stall_armed = stall_at;
            }
            tokio::select! {
                _ = &mut stall, if stall_at.is_some() && !self.finishing => {
                    self.stall().await;
                    stall_at = self.next_stall();
                    // A fired timer stays elapsed until reset: re-armed at the top.
                    stall_armed = None;
                }
                cmd = rx.recv(), if !self.finishing => {
                    let result = match cmd {
                        Some(Command::Finish) | None => {
                            // No more operations; the final resync waits for the final
                            // phase, when every user's sends have their outcome.
                            self.finishing = true;
                            Ok(())
                        }
                        Some(Command::Op { arrival, due }) => {
                            if arrival.kind == OpKind::Reconnect {
                                self.record(Kind::Info, Value::Disconnect { node: self.node as u16 + 1, reason: "planned reconnect".into() });
                                let _ = ws.close(None).await;
                                return Ended::Planned;
                            }
                            self.op(&mut ws, arrival, due).await
                        }
                        Some(Command::FollowStream { session, due, .. }) => {
                            self.follow(&mut ws, session, due).await
                        }
                    };
                    if let Err(e) = result {
                        return Ended::Lost(e);
                    }
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        if let Err(e) = self.frame(&mut ws, &t).await {
                            return Ended::Lost(e);
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let reason = frame.map(|f| format!("closed {} {}", u16::from(f.code), f.reason)).unwrap_or_else(|| "closed".into());
                        return Ended::Lost(reason);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Ended::Lost(e.to_string()),
                    None => return Ended::Lost("connection ended".into()),
                },
                _ = &mut tick, if armed.is_some() => {
                    last_tick = Instant::now();
                    // Re-armed (or not) from what is left to do at the top of the loop.
                    armed = None;
                    self.expire_pending();
                    // The measured window is set after the users connect: a slow consumer
                    // learns its first stall once it is.
                    if stall_at.is_none() && self.spec.stall_offset.is_some() && !self.finishing {
                        stall_at = self.next_stall();
                    }
                    if let Err(e) = self.retry_resumes(&mut ws).await {
                        return Ended::Lost(e);
                    }
                    if let Err(e) = self.retry_refused_syncs(&mut ws).await {
                        return Ended::Lost(e);
                    }
                    if self.finishing && !self.final_started && self.shared.final_phase() {
                        // Every send of the run has its outcome now: no message can be
                        // acknowledged after this resync reads the store.
                        self.final_started = true;
                        finish_deadline = Some(Instant::now() + self.shared.finish_timeout);
                        if self.cursors.values().all(|k| k.syncing.is_none()) {
                            self.resync_since = None;
                        }
                        if let Err(e) = self.final_resync(&mut ws).await {
                            return Ended::Lost(e);
                        }
                    }
                    if let Some(deadline) = finish_deadline {
                        let synced = self.cursors.values().all(|c| c.syncing.is_none());
                        // Streams still being followed end first (bounded by the deadline):
                        // a stream cut off by the end of the run is not the system's fault.
                        let streams_done = self.streams.is_empty() && self.stream_requests.is_empty();
                        // Without a final resync, live delivery must catch up with every
                        // seq acknowledged in the user's conversations before it leaves (a
                        // backlog is not a loss; a frame dropped for good stays missing).
                        let caught_up = self.shared.final_resync
                            || self.cursors.iter().all(|(c, k)| k.reached(self.shared.highest_acked(*c)));
                        if (synced && self.pending.is_empty() && streams_done && caught_up) || Instant::now() >= deadline {
                            let _ = ws.close(None).await;
                            return Ended::Finished;
                        }
                    }
                }
            }
        }
    }

    /// When the housekeeping tick should next run, if at all: every 100 ms while there are
    /// retries to make, a final phase to go through or stalls to plan; otherwise, with
    /// sends awaiting their ack, when the oldest one's ack timeout is up (the only thing a
    /// tick does for them); with nothing of that, never.
    fn next_tick(&self, last_tick: Instant) -> Option<Instant> {
        let periodic = self.finishing
            || self.spec.stall_offset.is_some()
            || self.streams.values().any(|f| f.retry_at.is_some())
            || self.cursors.values().any(|k| k.retry_at.is_some());
        if periodic {
            return Some(last_tick + TICK);
        }
        self.pending
            .values()
            .map(|p| p.first_invoked + self.shared.ack_timeout)
            .min()
    }

    fn queue_offline(&mut self, cmd: Command) {
        match cmd {
            Command::Op { arrival, due } if arrival.kind == OpKind::Chat => {
                let cmid = self.invoke_send(arrival, due);
                if let Some(cmid) = cmid {
                    self.unsent.push_back(cmid);
                }
            }
            Command::FollowStream { session, due, .. } => {
                self.streams.insert(session, StreamFollow::new(due));
            }
            // Typing, reads, syncs and stream requests while offline are not attempted;
            // the resync after the reconnect covers what a sync would have fetched.
            _ => {}
        }
    }

    /// Records the invoke of a send and keeps it pending; None when the in-flight limit
    /// refused it (recorded as a failure of the harness, not of the system).
    fn invoke_send(&mut self, arrival: Arrival, due: Instant) -> Option<String> {
        let counters = &self.shared.metrics.counters;
        // Sized once: `format!` grew it from empty, a reallocation or two per send.
        let mut cmid = String::with_capacity(24);
        let _ = write!(cmid, "{}-{}", self.spec.index, self.next_msg);
        self.next_msg += 1;
        let due_us = self.due_us(due);
        self.record(
            Kind::Invoke,
            Value::Send {
                c: arrival.conversation,
                m: cmid.clone(),
                due: Some(due_us),
                size: Some(arrival.size),
                seq: None,
                mid: None,
                dup: None,
                err: None,
            },
        );
        counters.sends_invoked.fetch_add(1, Ordering::Relaxed);
        if self.pending.len() >= self.shared.max_in_flight {
            counters
                .sends_dropped_in_flight_limit
                .fetch_add(1, Ordering::Relaxed);
            self.record(
                Kind::Fail,
                Value::Send {
                    c: arrival.conversation,
                    m: cmid,
                    due: None,
                    size: None,
                    seq: None,
                    mid: None,
                    dup: None,
                    err: Some("harness: in-flight limit reached, not sent".into()),
                },
            );
            return None;
        }
        let stamp = BodyStamp {
            due_us,
            sender_node: self.node as u16,
        };
        self.pending.insert(
            cmid.clone(),
            PendingSend {
                conversation: arrival.conversation,
                cmid: cmid.clone(),
                body: body::encode(stamp, arrival.size as usize),
                due,
                first_invoked: Instant::now(),
                last_written: None,
            },
        );
        Some(cmid)
    }

    async fn write(ws: &mut Ws, frame: &ClientFrame) -> Result<(), String> {
        ws.send(Message::text(frame.encode()))
            .await
            .map_err(|e| e.to_string())
    }

    async fn write_send(&mut self, ws: &mut Ws, cmid: &str) -> Result<(), String> {
        let Some(p) = self.pending.get_mut(cmid) else {
            return Ok(());
        };
        let text = wire::send_frame(
            &self.shared.conversation_ids[p.conversation as usize],
            &p.cmid,
            &p.body,
        );
        p.last_written = Some(Instant::now());
        ws.send(Message::text(text))
            .await
            .map_err(|e| e.to_string())
    }

    async fn flush_unsent(&mut self, ws: &mut Ws) -> Result<(), String> {
        // Everything pending is written again: unsent ones for the first time, written
        // ones because their outcome died with the old connection (same client id).
        let mut all: Vec<(Instant, String)> = self
            .pending
            .values()
            .map(|p| (p.first_invoked, p.cmid.clone()))
            .collect();
        all.sort();
        self.unsent.clear();
        for (_, cmid) in all {
            self.write_send(ws, &cmid).await?;
        }
        Ok(())
    }

    /// A conversation's id, for a frame that owns it (a chat message's frame borrows it).
    fn conversation_id(&self, c: u32) -> String {
        self.shared.conversation_ids[c as usize].clone()
    }

    async fn op(&mut self, ws: &mut Ws, arrival: Arrival, due: Instant) -> Result<(), String> {
        let c = arrival.conversation;
        let counters = &self.shared.metrics.counters;
        match arrival.kind {
            OpKind::Chat => {
                if let Some(cmid) = self.invoke_send(arrival, due) {
                    self.write_send(ws, &cmid).await?;
                }
            }
            OpKind::Typing => {
                counters.typing.fetch_add(1, Ordering::Relaxed);
                Self::write(
                    ws,
                    &ClientFrame::Typing {
                        conversation_id: self.conversation_id(c),
                        is_typing: true,
                    },
                )
                .await?;
                self.record(Kind::Ok, Value::Typing { c });
            }
            OpKind::Read => {
                let up_to = self.cursors.get(&c).map(|k| k.contiguous).unwrap_or(0);
                if up_to > 0 {
                    counters.reads.fetch_add(1, Ordering::Relaxed);
                    Self::write(
                        ws,
                        &ClientFrame::Read {
                            conversation_id: self.conversation_id(c),
                            up_to_seq: up_to,
                        },
                    )
                    .await?;
                    self.record(Kind::Ok, Value::Read { c, s: up_to });
                }
            }
            OpKind::Sync => self.sync(ws, c).await?,
            OpKind::Stream => {
                let due_us = self.due_us(due);
                self.record(
                    Kind::Invoke,
                    Value::Stream {
                        c,
                        due: Some(due_us),
                        session: None,
                        http: false,
                        err: None,
                    },
                );
                self.stream_requests.push_back((c, due));
                let prompt = format!("squall prompt {} {}", self.spec.index, self.next_msg);
                self.next_msg += 1;
                Self::write(
                    ws,
                    &ClientFrame::Stream {
                        conversation_id: self.conversation_id(c),
                        prompt,
                    },
                )
                .await?;
            }
            OpKind::Reconnect => {}
        }
        Ok(())
    }

    async fn sync(&mut self, ws: &mut Ws, c: u32) -> Result<(), String> {
        let Some(cursor) = self.cursors.get_mut(&c) else {
            return Ok(());
        };
        if cursor.syncing.is_some() {
            return Ok(());
        }
        let after = cursor.contiguous;
        cursor.syncing = Some((after, Instant::now(), 0));
        cursor.requested = Some(Instant::now());
        cursor.retry_at = None;
        self.shared
            .metrics
            .counters
            .syncs
            .fetch_add(1, Ordering::Relaxed);
        self.record(
            Kind::Invoke,
            Value::Sync {
                c,
                after,
                last: None,
                n: None,
                err: None,
            },
        );
        let conversation_id = self.shared.conversation_ids[c as usize].clone();
        Self::write(
            ws,
            &ClientFrame::Sync {
                conversation_id,
                after_seq: after,
                limit: None,
            },
        )
        .await
    }

    fn start_resync(&mut self) {
        for cursor in self.cursors.values_mut() {
            cursor.syncing = None;
        }
    }

    /// After a reconnect: every conversation from its cursor.
    async fn send_resyncs(&mut self, ws: &mut Ws) -> Result<(), String> {
        if self.resync_since.is_none() {
            return Ok(());
        }
        self.sync_all(ws).await
    }

    /// After the load (unless the scenario turned it off).
    async fn final_resync(&mut self, ws: &mut Ws) -> Result<(), String> {
        if !self.shared.final_resync {
            return Ok(());
        }
        self.sync_all(ws).await
    }

    async fn sync_all(&mut self, ws: &mut Ws) -> Result<(), String> {
        let convs: Vec<u32> = self.spec.conversations.clone();
        for c in convs {
            self.sync(ws, c).await?;
        }
        Ok(())
    }

    async fn resume_streams(&mut self, ws: &mut Ws) -> Result<(), String> {
        let open: Vec<(String, i64)> = self
            .streams
            .iter()
            .map(|(s, f)| (s.clone(), f.last_index))
            .collect();
        for (session, after) in open {
            self.record(
                Kind::Invoke,
                Value::Resume {
                    session: session.clone(),
                    after,
                },
            );
            Self::write(
                ws,
                &ClientFrame::Resume {
                    session_id: session,
                    after_index: after,
                },
            )
            .await?;
        }
        Ok(())
    }

    async fn follow(&mut self, ws: &mut Ws, session: String, due: Instant) -> Result<(), String> {
        self.streams.insert(session.clone(), StreamFollow::new(due));
        self.record(
            Kind::Invoke,
            Value::Resume {
                session: session.clone(),
                after: -1,
            },
        );
        Self::write(
            ws,
            &ClientFrame::Resume {
                session_id: session,
                after_index: -1,
            },
        )
        .await
    }

    /// Stream requests whose `stream_started` died with the connection: the session may
    /// or may not have started, and its id is unknown (info).
    fn stream_requests_lost(&mut self) {
        for (c, _) in std::mem::take(&mut self.stream_requests) {
            self.record(
                Kind::Info,
                Value::Stream {
                    c,
                    due: None,
                    session: None,
                    http: false,
                    err: Some("the connection ended before stream_started".into()),
                },
            );
        }
    }

    /// A sync the node refused is asked again, from the cursor, once its pause is over.
    async fn retry_refused_syncs(&mut self, ws: &mut Ws) -> Result<(), String> {
        let now = Instant::now();
        let due: Vec<u32> = self
            .cursors
            .iter()
            .filter(|(_, k)| k.syncing.is_none() && k.retry_at.is_some_and(|t| t <= now))
            .map(|(c, _)| *c)
            .collect();
        for c in due {
            self.sync(ws, c).await?;
        }
        Ok(())
    }

    /// An error frame naming no request, while syncs are in flight: the node answers a
    /// sync it could not serve (PostgreSQL busy or away) that way, and it answers one
    /// connection's requests in order, so it is the oldest sync in flight that failed.
    /// That sync is recorded failed and asked again after a pause, as a client would;
    /// without this the conversation would stay unsynced to the end of the run.
    fn sync_refused(&mut self, code: ErrorCode, why: &str) -> bool {
        if !matches!(code, ErrorCode::Unavailable | ErrorCode::Internal) {
            return false;
        }
        let oldest = self
            .cursors
            .iter()
            .filter(|(_, k)| k.syncing.is_some())
            .min_by_key(|(_, k)| k.requested)
            .map(|(c, _)| *c);
        let Some(c) = oldest else {
            return false;
        };
        let Some(k) = self.cursors.get_mut(&c) else {
            return false;
        };
        let after = k.syncing.take().map_or(0, |(after, _, _)| after);
        k.requested = None;
        k.retry_at = Some(Instant::now() + SYNC_RETRY_AFTER);
        self.record(
            Kind::Fail,
            Value::Sync {
                c,
                after,
                last: None,
                n: None,
                err: Some(why.to_string()),
            },
        );
        true
    }

    /// Resumes refused earlier whose retry is due, after the last chunk seen.
    async fn retry_resumes(&mut self, ws: &mut Ws) -> Result<(), String> {
        let now = Instant::now();
        let due: Vec<(String, i64)> = self
            .streams
            .iter_mut()
            .filter(|(_, f)| f.retry_at.is_some_and(|t| t <= now))
            .map(|(s, f)| {
                f.retry_at = None;
                (s.clone(), f.last_index)
            })
            .collect();
        for (session, after) in due {
            self.record(
                Kind::Invoke,
                Value::Resume {
                    session: session.clone(),
                    after,
                },
            );
            Self::write(
                ws,
                &ClientFrame::Resume {
                    session_id: session,
                    after_index: after,
                },
            )
            .await?;
        }
        Ok(())
    }

    /// When this slow consumer next stops reading: its stalls start at its offset into
    /// the measured window and repeat every period, each ending inside the window.
    fn next_stall(&self) -> Option<Instant> {
        let offset = self.spec.stall_offset?;
        let (pause, every) = self.shared.slow?;
        let (start, end) = self.shared.window()?;
        let now = Instant::now();
        let mut at = start + offset;
        if at < now {
            let behind = now.duration_since(at).as_secs_f64();
            let periods = (behind / every.as_secs_f64()).ceil();
            at += every.mul_f64(periods);
        }
        (at + pause <= end).then_some(at)
    }

    /// Stops reading (and doing anything else) for the pause, as a frozen client would.
    /// The ack timeout does not run meanwhile: the wait is the user's, not the system's.
    async fn stall(&mut self) {
        let Some((pause, _)) = self.shared.slow else {
            return;
        };
        let ms = pause.as_millis() as u64;
        self.record(Kind::Invoke, Value::Stall { ms });
        tokio::time::sleep(pause).await;
        for p in self.pending.values_mut() {
            p.first_invoked += pause;
        }
        self.record(Kind::Ok, Value::Stall { ms });
    }

    fn expire_pending(&mut self) {
        let timeout = self.shared.ack_timeout;
        let now = Instant::now();
        let expired: Vec<String> = self
            .pending
            .values()
            .filter(|p| now.duration_since(p.first_invoked) >= timeout)
            .map(|p| p.cmid.clone())
            .collect();
        for cmid in expired {
            if let Some(p) = self.pending.remove(&cmid) {
                if self.timed_out_order.len() >= TIMED_OUT_KEPT {
                    if let Some(oldest) = self.timed_out_order.pop_front() {
                        self.timed_out.remove(&oldest);
                    }
                }
                self.timed_out.insert(p.cmid.clone(), p.conversation);
                self.timed_out_order.push_back(p.cmid.clone());
                self.unknown_outcome(p, "no ack within the ack timeout");
            }
        }
    }

    /// An ack for a send already given up as unknown: the node did store it, so it is
    /// recorded as the send's ok (the checkers then know the seq is this user's own and
    /// owe its delivery to the members) and moves the cursor, without a latency sample
    /// (the live `send_ack` histogram counted it as unknown; the history keeps its time).
    fn on_late_ack(
        &mut self,
        now: Instant,
        client_msg_id: &str,
        message_id: String,
        seq: i64,
        duplicate: bool,
    ) {
        let Some(conversation) = self.timed_out.remove(client_msg_id) else {
            return;
        };
        self.shared
            .metrics
            .counters
            .sends_acked_late
            .fetch_add(1, Ordering::Relaxed);
        let acked = Acked {
            conversation,
            cmid: client_msg_id.to_string(),
            message_id,
            seq,
            duplicate,
        };
        self.heard_ack(now, acked);
    }

    /// What every ack of this user's sends does, in time or late: the conversation's
    /// highest acked seq and the cursor move, and the history gets the send's ok.
    fn heard_ack(&mut self, now: Instant, a: Acked) {
        self.shared.acked(a.conversation, a.seq);
        if let Some(cursor) = self.cursors.get_mut(&a.conversation) {
            cursor.see(a.seq);
        }
        self.record_at(
            now,
            Kind::Ok,
            Value::Send {
                c: a.conversation,
                m: a.cmid,
                due: None,
                size: None,
                seq: Some(a.seq),
                mid: Some(a.message_id),
                dup: Some(a.duplicate),
                err: None,
            },
        );
    }

    fn unknown_outcome(&self, p: PendingSend, why: &str) {
        self.shared
            .metrics
            .counters
            .sends_unknown
            .fetch_add(1, Ordering::Relaxed);
        self.record(
            Kind::Info,
            Value::Send {
                c: p.conversation,
                m: p.cmid,
                due: None,
                size: None,
                seq: None,
                mid: None,
                dup: None,
                err: Some(why.into()),
            },
        );
    }

    fn give_up_pending(&mut self) {
        let pending: Vec<PendingSend> = self.pending.drain().map(|(_, p)| p).collect();
        for p in pending {
            self.unknown_outcome(p, "the run ended before an ack");
        }
    }

    fn sender_index(sender_id: &str) -> u32 {
        // Users are named `<tag>-u<index>` by the plan. The digits are taken from the end
        // and the `-u` checked before them: `rsplit_once("-u")` built a substring searcher
        // per delivery.
        let digits = sender_id
            .bytes()
            .rev()
            .take_while(u8::is_ascii_digit)
            .count();
        let (head, index) = sender_id.split_at(sender_id.len() - digits);
        if digits == 0 || !head.ends_with("-u") {
            return u32::MAX;
        }
        index.parse().unwrap_or(u32::MAX)
    }

    /// The ack of one of this user's sends.
    fn on_ack(
        &mut self,
        now: Instant,
        client_msg_id: &str,
        message_id: String,
        seq: i64,
        duplicate: bool,
        ack_ts_ms: i64,
    ) {
        let Some(p) = self.pending.remove(client_msg_id) else {
            return self.on_late_ack(now, client_msg_id, message_id, seq, duplicate);
        };
        let counters = &self.shared.metrics.counters;
        counters.sends_acked.fetch_add(1, Ordering::Relaxed);
        if duplicate {
            counters
                .sends_duplicate_acks
                .fetch_add(1, Ordering::Relaxed);
        }
        let corrected = (names::SEND_ACK, now.saturating_duration_since(p.due));
        match p.last_written {
            Some(w) => self.shared.record_latencies(
                corrected,
                (
                    names::SEND_ACK_UNCORRECTED,
                    now.saturating_duration_since(w),
                ),
                p.due,
            ),
            None => self.shared.record_latency(corrected.0, corrected.1, p.due),
        }
        if !duplicate {
            let shared = &self.shared;
            shared.metrics.ack_tap.offer(|| AckSample {
                conversation_id: shared
                    .conversation_ids
                    .get(p.conversation as usize)
                    .cloned()
                    .unwrap_or_default(),
                message_id: message_id.clone(),
                acked: now,
                event_ts_ms: {
                    let round_trip = now.saturating_duration_since(p.last_written.unwrap_or(p.due));
                    let round_trip_ms = i64::try_from(round_trip.as_millis()).unwrap_or(i64::MAX);
                    ack_ts_ms
                        .saturating_sub(round_trip_ms)
                        .saturating_sub(1_000)..=ack_ts_ms.saturating_add(1_000)
                },
                in_window: shared.in_window(p.due),
            });
        }
        let acked = Acked {
            conversation: p.conversation,
            cmid: p.cmid,
            message_id,
            seq,
            duplicate,
        };
        self.heard_ack(now, acked);
    }

    /// A message of one of this user's conversations, live or in a sync's answer.
    #[allow(clippy::too_many_arguments)]
    fn on_msg(
        &mut self,
        now: Instant,
        client_msg_id: String,
        conversation_id: &str,
        seq: i64,
        sender_id: &str,
        body: &str,
        via: WireVia,
    ) {
        let Some(c) = self.shared.conversation_index(conversation_id) else {
            self.record(
                Kind::Info,
                Value::ServerError {
                    code: "unknown_conversation".into(),
                    message: conversation_id.to_string(),
                },
            );
            return;
        };
        let via = match via {
            WireVia::Live => Via::Live,
            WireVia::Sync => Via::Sync,
        };
        let counters = &self.shared.metrics.counters;
        if via == Via::Live {
            counters.delivered_live.fetch_add(1, Ordering::Relaxed);
            if let Some(stamp) = body::decode(body) {
                let due = self.shared.rec.origin() + Duration::from_micros(stamp.due_us);
                let latency = now.saturating_duration_since(due);
                let name = if usize::from(stamp.sender_node) == self.node {
                    names::DELIVERY_SAME_NODE
                } else {
                    names::DELIVERY_CROSS_NODE
                };
                self.shared
                    .record_latencies((names::DELIVERY, latency), (name, latency), due);
            }
        } else {
            counters.delivered_sync.fetch_add(1, Ordering::Relaxed);
            if let Some(cursor) = self.cursors.get_mut(&c) {
                if let Some((_, _, n)) = cursor.syncing.as_mut() {
                    *n += 1;
                }
            }
        }
        if let Some(cursor) = self.cursors.get_mut(&c) {
            cursor.see(seq);
        }
        self.record_at(
            now,
            Kind::Ok,
            Value::Deliver {
                c,
                s: seq,
                m: client_msg_id,
                from: Self::sender_index(sender_id),
                via,
            },
        );
    }

    async fn frame(&mut self, ws: &mut Ws, text: &str) -> Result<(), String> {
        let now = Instant::now();
        let frame = match wire::decode(text) {
            Ok(Incoming::Ack {
                client_msg_id,
                message_id,
                seq,
                duplicate,
                ts_ms,
            }) => {
                self.on_ack(
                    now,
                    &client_msg_id,
                    message_id.into_owned(),
                    seq,
                    duplicate,
                    ts_ms,
                );
                return Ok(());
            }
            Ok(Incoming::Msg {
                client_msg_id,
                conversation_id,
                seq,
                sender_id,
                body,
                via,
            }) => {
                self.on_msg(
                    now,
                    client_msg_id.into_owned(),
                    &conversation_id,
                    seq,
                    &sender_id,
                    &body,
                    via,
                );
                return Ok(());
            }
            Ok(Incoming::Status) => return Ok(()),
            Ok(Incoming::Other(f)) => f,
            Err(e) => {
                self.record(
                    Kind::Info,
                    Value::ServerError {
                        code: "undecodable".into(),
                        message: e.to_string(),
                    },
                );
                return Ok(());
            }
        };
        let counters = &self.shared.metrics.counters;
        match frame {
            ServerFrame::Ack {
                client_msg_id,
                message_id,
                seq,
                duplicate,
                ts_ms,
                ..
            } => self.on_ack(now, &client_msg_id, message_id, seq, duplicate, ts_ms),
            ServerFrame::Msg {
                client_msg_id,
                conversation_id,
                seq,
                sender_id,
                body,
                via,
                ..
            } => self.on_msg(
                now,
                client_msg_id,
                &conversation_id,
                seq,
                &sender_id,
                &body,
                via,
            ),
            ServerFrame::SyncDone {
                conversation_id,
                last_seq,
                more,
            } => {
                let Some(c) = self.shared.conversation_index(&conversation_id) else {
                    return Ok(());
                };
                let Some(cursor) = self.cursors.get_mut(&c) else {
                    return Ok(());
                };
                let Some((after, started, n)) = cursor.syncing.take() else {
                    return Ok(());
                };
                if more {
                    // Keep paging from where this page ended.
                    cursor.syncing = Some((last_seq, started, n));
                    cursor.requested = Some(now);
                    let conversation_id = conversation_id.clone();
                    Self::write(
                        ws,
                        &ClientFrame::Sync {
                            conversation_id,
                            after_seq: last_seq,
                            limit: None,
                        },
                    )
                    .await?;
                    return Ok(());
                }
                self.shared
                    .record_latency(names::SYNC, now - started, started);
                self.record(
                    Kind::Ok,
                    Value::Sync {
                        c,
                        after,
                        last: Some(last_seq),
                        n: Some(n),
                        err: None,
                    },
                );
                if let Some(since) = self.resync_since {
                    if self.cursors.values().all(|k| k.syncing.is_none()) {
                        // Counted by when the connection was lost: a storm late in the
                        // window whose resync ends after it is still the window's.
                        self.shared
                            .record_latency(names::RECONNECT_RESYNC, now - since, since);
                        self.resync_since = None;
                    }
                }
            }
            ServerFrame::StreamStarted {
                session_id,
                conversation_id,
                ..
            } => {
                let c = self.shared.conversation_index(&conversation_id);
                let pos = self
                    .stream_requests
                    .iter()
                    .position(|(rc, _)| Some(*rc) == c);
                if let Some((c, due)) = pos.and_then(|i| self.stream_requests.remove(i)) {
                    counters.streams_started.fetch_add(1, Ordering::Relaxed);
                    self.record(
                        Kind::Ok,
                        Value::Stream {
                            c,
                            due: None,
                            session: Some(session_id.clone()),
                            http: false,
                            err: None,
                        },
                    );
                    self.streams.insert(session_id, StreamFollow::new(due));
                }
            }
            ServerFrame::Chunk {
                session_id, index, ..
            } => {
                counters.chunks.fetch_add(1, Ordering::Relaxed);
                if let Some(f) = self.streams.get_mut(&session_id) {
                    match f.last_chunk_at {
                        None => self.shared.record_latency(
                            names::STREAM_FIRST_CHUNK,
                            now.saturating_duration_since(f.due),
                            f.due,
                        ),
                        Some(prev) => {
                            self.shared
                                .record_latency(names::STREAM_CHUNK_GAP, now - prev, f.due)
                        }
                    }
                    f.last_chunk_at = Some(now);
                    f.last_index = f.last_index.max(index);
                }
                self.record(
                    Kind::Ok,
                    Value::Chunk {
                        session: session_id,
                        idx: index,
                    },
                );
            }
            ServerFrame::StreamEnd {
                session_id,
                outcome,
                total_chunks,
                ..
            } => {
                match outcome {
                    StreamOutcome::Completed => {
                        counters.streams_completed.fetch_add(1, Ordering::Relaxed)
                    }
                    StreamOutcome::Failed => {
                        counters.streams_failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                self.streams.remove(&session_id);
                let outcome = match outcome {
                    StreamOutcome::Completed => "completed",
                    StreamOutcome::Failed => "failed",
                };
                self.record(
                    Kind::Ok,
                    Value::StreamEnd {
                        session: session_id,
                        outcome: outcome.into(),
                        total: total_chunks,
                    },
                );
            }
            ServerFrame::Error {
                code,
                message,
                ref_id,
                ..
            } => {
                counters.server_errors.fetch_add(1, Ordering::Relaxed);
                let code_name = serde_json::to_value(code)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_else(|| format!("{code:?}"));
                if let Some(p) = ref_id.as_ref().and_then(|r| self.pending.remove(r)) {
                    // A definite refusal: nothing was stored.
                    counters.sends_failed.fetch_add(1, Ordering::Relaxed);
                    self.record(
                        Kind::Fail,
                        Value::Send {
                            c: p.conversation,
                            m: p.cmid,
                            due: None,
                            size: None,
                            seq: None,
                            mid: None,
                            dup: None,
                            err: Some(format!("{code_name}: {message}")),
                        },
                    );
                } else if let Some(session) = ref_id.filter(|r| self.streams.contains_key(r)) {
                    // Refused as unavailable (the generator's node died, a backend is
                    // away): asked again a few times, a second apart, as a client would.
                    let retry = code == ErrorCode::Unavailable;
                    let mut after = -1;
                    if let Some(f) = self.streams.get_mut(&session) {
                        after = f.last_index;
                        f.refusals += 1;
                        if retry && f.refusals <= RESUME_RETRIES {
                            f.retry_at = Some(now + RESUME_RETRY_AFTER);
                        } else {
                            self.streams.remove(&session);
                        }
                    }
                    self.record(Kind::Fail, Value::Resume { session, after });
                } else {
                    if code == ErrorCode::ShuttingDown {
                        return Err("node shutting down".into());
                    }
                    if matches!(code, ErrorCode::Unavailable | ErrorCode::NotMember) {
                        if let Some((c, _)) = self.stream_requests.pop_front() {
                            self.record(
                                Kind::Fail,
                                Value::Stream {
                                    c,
                                    due: None,
                                    session: None,
                                    http: false,
                                    err: Some(format!("{code_name}: {message}")),
                                },
                            );
                            return Ok(());
                        }
                    }
                    let why = format!("{code_name}: {message}");
                    self.record(
                        Kind::Info,
                        Value::ServerError {
                            code: code_name,
                            message,
                        },
                    );
                    self.sync_refused(code, &why);
                }
            }
            ServerFrame::Hello { .. }
            | ServerFrame::Status { .. }
            | ServerFrame::Typing { .. }
            | ServerFrame::Pong { .. } => {}
        }
        Ok(())
    }
}

/// The users' WebSocket settings: tungstenite's defaults but for a 2 KiB read buffer.
/// The default (128 KiB) is allocated per connection and, in tungstenite 0.29, zeroed up
/// to its full size before every socket read, including the read that ends each poll
/// with `WouldBlock`: that memset was over half of squall's CPU during a chat load, and
/// 128 KiB of each user's memory (at 4 KiB it was still 2%). A user's frames are a few
/// hundred bytes and arrive a few at a time (a chat message with 200-byte body is about
/// 450 bytes); a bigger frame (a sync page) still arrives whole, since the buffer grows
/// to the frame's length, and a backlog takes a few more reads.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(USER_READ_BUFFER)
}

/// See [`ws_config`].
const USER_READ_BUFFER: usize = 2 * 1024;

/// A WebSocket connection over a socket with a small receive buffer (a slow consumer's).
async fn connect_small_buffer(url: &str) -> Result<Ws, String> {
    let authority = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| format!("not a ws:// URL: {url}"))?;
    let addr = tokio::net::lookup_host(authority)
        .await
        .map_err(|e| format!("resolving {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolves to nothing"))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    socket
        .set_recv_buffer_size(SLOW_RECV_BUFFER)
        .map_err(|e| e.to_string())?;
    let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        url,
        MaybeTlsStream::Plain(stream),
        Some(ws_config()),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_indices_come_from_the_plans_names() {
        assert_eq!(User::sender_index("t-u12"), 12);
        assert_eq!(User::sender_index("lg-x-u0"), 0);
        assert_eq!(User::sender_index("a-u1-u2"), 2);
        for bad in ["t-u", "t-x12", "12", "t-u12x", "t-u99999999999"] {
            assert_eq!(User::sender_index(bad), u32::MAX, "{bad}");
        }
    }
}
