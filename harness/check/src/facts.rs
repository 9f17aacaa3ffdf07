//! Facts: the index of a history that every checker reads, built in one pass over the
//! operations ([`Facts::from_history`], or op by op with a [`FactsBuilder`]).
//!
//! It owns what the checkers need and nothing more: sends by client_msg_id (first invoke,
//! first ack, counts; anything beyond that — retries, fails, infos, further acks — in a
//! side table), deliveries per (recipient, conversation) in history order, connection
//! events per user, syncs per (user, conversation), stream chunks/ends per (user,
//! session), fault windows and phases, plus counts of records it could not place
//! (`anomalies`), which make the checkers that depend on them answer unknown.
//!
//! Memory: a long run has tens of millions of operations, so nothing keeps an `Op`.
//! Messages are numbered ([`MsgId`], u32); the harness's client_msg_ids
//! (`<user>-<n>`) are interned as one u64, other shapes as one shared string; message
//! ids live in one string arena; a delivery is 24 bytes; times are u64 µs with
//! `u64::MAX` for "none" inside the compact records (the accessors return `Option`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use squall_history::{Header, Kind, Op, Value, Via, ABUSE, HARNESS, HTTP, NEMESIS, RECOVERY};

use crate::verdict::{fmt_t, Timeline};

/// A message, numbered in the order its client_msg_id first appeared in the history.
pub type MsgId = u32;
/// A stream session, numbered in the order it first appeared.
pub type SessionId = u32;

const NONE: u64 = u64::MAX;
const NO_PROCESS: u32 = u32::MAX;

/// Anomaly names: records the index could not place. Checkers that depend on them answer
/// unknown when any is present (and nothing definite is wrong).
pub mod anomaly {
    /// An operation by a process that is neither a user of the header nor a harness actor.
    pub const UNKNOWN_PROCESS: &str = "op_by_unknown_process";
    /// A conversation index outside the header.
    pub const CONVERSATION_OUT_OF_RANGE: &str = "conversation_out_of_range";
    /// A send ok / fail / info for a client_msg_id never invoked before it.
    pub const SEND_OUTCOME_WITHOUT_INVOKE: &str = "send_outcome_without_invoke";
    /// One client_msg_id invoked by two processes, or in two conversations.
    pub const SEND_ID_REUSED: &str = "send_id_reused";
    /// A stream ok (over WebSocket) with no stream invoke of that user to answer.
    pub const STREAM_OK_WITHOUT_INVOKE: &str = "stream_ok_without_invoke";
    /// A stream op without its session (ok) or a chunk/end for a session never named.
    pub const STREAM_WITHOUT_SESSION: &str = "stream_ok_without_session";
    /// A fault end (ok/fail/info) for a fault id that had not started.
    pub const FAULT_END_WITHOUT_START: &str = "fault_end_without_start";
    /// A connect ok while the user was already connected (no disconnect between).
    pub const CONNECT_WHILE_CONNECTED: &str = "connect_while_connected";
}

/// One client_msg_id: its first invoke and first ack; more in [`Facts::send_events`].
#[derive(Debug, Clone, PartialEq)]
pub struct SendFacts {
    sender: u32,
    c: u32,
    invoke_t: u64,
    due: u64,
    ok_t: u64,
    seq: i64,
    mid_off: u64,
    mid_len: u32,
    invokes: u16,
    oks: u16,
    fails: u16,
    infos: u16,
    first_ok_dup: bool,
}

impl SendFacts {
    fn empty() -> SendFacts {
        SendFacts {
            sender: NO_PROCESS,
            c: u32::MAX,
            invoke_t: NONE,
            due: NONE,
            ok_t: NONE,
            seq: 0,
            mid_off: NONE,
            mid_len: 0,
            invokes: 0,
            oks: 0,
            fails: 0,
            infos: 0,
            first_ok_dup: false,
        }
    }

    /// The process of the first invoke (or of the first outcome, with no invoke).
    pub fn sender(&self) -> Option<u32> {
        (self.sender != NO_PROCESS).then_some(self.sender)
    }
    /// The conversation of the first invoke (None for a client_msg_id only delivered).
    pub fn c(&self) -> Option<u32> {
        (self.c != u32::MAX).then_some(self.c)
    }
    pub fn invoke_t(&self) -> Option<u64> {
        (self.invoke_t != NONE).then_some(self.invoke_t)
    }
    /// The intended send time of the first invoke.
    pub fn due(&self) -> Option<u64> {
        (self.due != NONE).then_some(self.due)
    }
    /// Time of the first ok.
    pub fn ok_t(&self) -> Option<u64> {
        (self.ok_t != NONE).then_some(self.ok_t)
    }
    /// The seq of the first ok.
    pub fn seq(&self) -> Option<i64> {
        self.acked().then_some(self.seq)
    }
    pub fn first_ok_dup(&self) -> bool {
        self.first_ok_dup
    }
    pub fn invokes(&self) -> u32 {
        self.invokes.into()
    }
    pub fn oks(&self) -> u32 {
        self.oks.into()
    }
    pub fn fails(&self) -> u32 {
        self.fails.into()
    }
    pub fn infos(&self) -> u32 {
        self.infos.into()
    }
    /// Someone invoked it (else it is a client_msg_id seen only in deliveries).
    pub fn invoked(&self) -> bool {
        self.invokes > 0
    }
    /// At least one ok.
    pub fn acked(&self) -> bool {
        self.oks > 0
    }
    /// Invoked, never acked, never definitely refused: only invokes and infos (or the
    /// history ended before an answer).
    pub fn outcome_unknown(&self) -> bool {
        self.invoked() && self.oks == 0 && self.fails == 0
    }
    /// Definitely refused and never acked.
    pub fn failed(&self) -> bool {
        self.fails > 0 && self.oks == 0
    }
}

/// A send record beyond the first invoke and the first ok: a retry's invoke, a further
/// ok, any fail or info.
#[derive(Debug, Clone, PartialEq)]
pub struct SendEvent {
    pub m: MsgId,
    pub t: u64,
    pub p: u32,
    pub k: Kind,
    pub c: u32,
    pub seq: Option<i64>,
    pub dup: Option<bool>,
    /// For an ok: whether its message id differs from the first ok's.
    pub mid_differs: bool,
    pub err: Option<Box<str>>,
}

/// A message seen by a recipient (24 bytes: there are many).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub t: u64,
    pub s: i64,
    pub m: MsgId,
    pub via: Via,
}

/// A delivery whose `from` is not the process that invoked the send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderMismatch {
    pub m: MsgId,
    pub recipient: u32,
    pub c: u32,
    pub t: u64,
    pub from: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnWhat {
    ConnectInvoke,
    ConnectOk,
    ConnectFail,
    Disconnect,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConnEvent {
    pub t: u64,
    pub what: ConnWhat,
    pub node: u16,
    /// The disconnect reason or the connect error.
    pub note: Option<Box<str>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SyncEvent {
    pub t: u64,
    pub k: Kind,
    pub after: i64,
    pub last: Option<i64>,
    pub n: Option<u32>,
}

/// How a user came to follow a stream it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamStart {
    /// The stream ok (the session started).
    pub t: u64,
    /// The matching stream invoke (None for `POST /api/chat`, recorded as one ok).
    pub invoke_t: Option<u64>,
    pub due: Option<u64>,
    pub http: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StreamEndEvent {
    pub t: u64,
    pub outcome: Box<str>,
    pub total: i64,
}

/// One user's view of one stream session.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Follow {
    pub c: Option<u32>,
    pub start: Option<StreamStart>,
    /// `(t, after, kind)`: resume invokes and fails.
    pub resumes: Vec<(u64, i64, Kind)>,
    /// `(t, idx)` in history order.
    pub chunks: Vec<(u64, i64)>,
    pub ends: Vec<StreamEndEvent>,
}

impl Follow {
    /// The user started it (stream ok) or asked to follow it (resume invoke).
    pub fn followed(&self) -> bool {
        self.start.is_some() || self.resumes.iter().any(|r| r.2 == Kind::Invoke)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    pub id: u32,
    pub kind: String,
    pub target: String,
    pub start: u64,
    /// Its real end (ok), or the time it failed (fail/info); None: still on at the end.
    pub end: Option<u64>,
    pub err: Option<String>,
}

/// One read of a conversation by the recovery phase (a fresh connection, from seq 0).
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveryRead {
    pub t: u64,
    pub k: Kind,
    /// The member whose identity the fresh connection used.
    pub u: u32,
    pub last: Option<i64>,
    pub n: Option<u32>,
    pub err: Option<Box<str>>,
}

/// A message the recovery phase read back from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveredMsg {
    pub t: u64,
    pub s: i64,
    pub m: MsgId,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub t: u64,
    pub name: String,
}

/// Interned client_msg_ids: `<u32>-<u32>` in canonical decimal as one u64, anything else
/// as a shared string.
#[derive(Default)]
struct MsgNames {
    compact: HashMap<u64, MsgId>,
    strings: HashMap<Arc<str>, MsgId>,
    /// Per MsgId: the compact key, or `STRING_TAG | index into string_names`.
    keys: Vec<u64>,
    string_names: Vec<Arc<str>>,
    string_keys: Vec<MsgId>,
}

const STRING_TAG: u64 = 1 << 63;

fn canonical_u32(s: &str) -> Option<u32> {
    let b = s.as_bytes();
    if b.is_empty()
        || b.len() > 10
        || !b.iter().all(u8::is_ascii_digit)
        || (b.len() > 1 && b[0] == b'0')
    {
        return None;
    }
    s.parse().ok()
}

fn compact_key(m: &str) -> Option<u64> {
    let (a, b) = m.split_once('-')?;
    let (a, b) = (canonical_u32(a)?, canonical_u32(b)?);
    // Bit 63 tags string keys, so users >= 2^31 take the string path.
    (a < (1 << 31)).then_some((u64::from(a) << 32) | u64::from(b))
}

impl MsgNames {
    fn lookup(&self, m: &str) -> Option<MsgId> {
        match compact_key(m) {
            Some(k) => self.compact.get(&k).copied(),
            None => self.strings.get(m).copied(),
        }
    }

    /// Returns the id and whether it is new.
    fn intern(&mut self, m: &str) -> (MsgId, bool) {
        let next = self.keys.len() as MsgId;
        match compact_key(m) {
            Some(k) => {
                if let Some(&id) = self.compact.get(&k) {
                    return (id, false);
                }
                self.compact.insert(k, next);
                self.keys.push(k);
            }
            None => {
                if let Some(&id) = self.strings.get(m) {
                    return (id, false);
                }
                let name: Arc<str> = Arc::from(m);
                self.strings.insert(name.clone(), next);
                self.keys.push(STRING_TAG | self.string_names.len() as u64);
                self.string_names.push(name);
                self.string_keys.push(next);
            }
        }
        (next, true)
    }

    fn name(&self, id: MsgId) -> String {
        match self.keys.get(id as usize) {
            Some(&k) if k & STRING_TAG != 0 => self
                .string_names
                .get((k & !STRING_TAG) as usize)
                .map(|s| s.to_string())
                .unwrap_or_default(),
            Some(&k) => format!("{}-{}", k >> 32, k & 0xffff_ffff),
            None => format!("#{id}"),
        }
    }
}

/// A plain string interner (stream sessions: few).
#[derive(Default)]
struct Strings {
    map: HashMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
}

impl Strings {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&id) = self.map.get(s) {
            return id;
        }
        let id = self.names.len() as u32;
        let name: Arc<str> = Arc::from(s);
        self.map.insert(name.clone(), id);
        self.names.push(name);
        id
    }
}

/// The index of one history. Build it with [`Facts::from_history`] or a [`FactsBuilder`].
pub struct Facts {
    header: Header,
    user_convs: Vec<Vec<u32>>,
    names: MsgNames,
    sends: Vec<SendFacts>,
    /// Sorted by (m, t) at the end of the build.
    send_extra: Vec<SendEvent>,
    mid_arena: String,
    deliveries: BTreeMap<(u32, u32), Vec<Delivery>>,
    sender_mismatches: Vec<SenderMismatch>,
    conns: Vec<Vec<ConnEvent>>,
    /// Per user: the end of its last connection (u64::MAX: open at the end of the
    /// history); None: never connected.
    connected_until: Vec<Option<u64>>,
    syncs: BTreeMap<(u32, u32), Vec<SyncEvent>>,
    sessions: Strings,
    follows: BTreeMap<(u32, SessionId), Follow>,
    unanswered_stream_invokes: u64,
    faults: Vec<Fault>,
    phases: Vec<Phase>,
    /// Per conversation: the recovery phase's reads and the messages they returned.
    recovery_reads: BTreeMap<u32, Vec<RecoveryRead>>,
    recovery_msgs: BTreeMap<u32, Vec<RecoveredMsg>>,
    /// Per user: `(t, kind, ms)` of its stalls (a slow consumer not reading its socket).
    stalls: BTreeMap<u32, Vec<(u64, Kind, u64)>>,
    anomalies: BTreeMap<&'static str, u64>,
    ops: u64,
    end_t: u64,
}

/// Builds [`Facts`] one operation at a time (for readers that yield `Result<Op>`).
pub struct FactsBuilder {
    facts: Facts,
    /// Per user: stream invokes not answered yet `(t, c, due)`.
    pending_streams: Vec<VecDeque<(u64, u32, Option<u64>)>>,
    /// Deliveries whose send was not invoked yet when they were read: `(m, recipient, c, t, from)`.
    unchecked_from: Vec<(MsgId, u32, u32, u64, u32)>,
    /// Per user: currently connected (since this time).
    open_since: Vec<Option<u64>>,
    /// Fault index by id, for the fault still open.
    open_faults: HashMap<u32, usize>,
}

impl FactsBuilder {
    pub fn new(header: &Header) -> FactsBuilder {
        let n_users = header.users.len();
        let mut user_convs = vec![Vec::new(); n_users];
        for (ci, conv) in header.conversations.iter().enumerate() {
            for &u in &conv.members {
                if let Some(v) = user_convs.get_mut(u as usize) {
                    v.push(ci as u32);
                }
            }
        }
        FactsBuilder {
            facts: Facts {
                header: header.clone(),
                user_convs,
                names: MsgNames::default(),
                sends: Vec::new(),
                send_extra: Vec::new(),
                mid_arena: String::new(),
                deliveries: BTreeMap::new(),
                sender_mismatches: Vec::new(),
                conns: vec![Vec::new(); n_users],
                connected_until: vec![None; n_users],
                syncs: BTreeMap::new(),
                sessions: Strings::default(),
                follows: BTreeMap::new(),
                unanswered_stream_invokes: 0,
                faults: Vec::new(),
                phases: Vec::new(),
                recovery_reads: BTreeMap::new(),
                recovery_msgs: BTreeMap::new(),
                stalls: BTreeMap::new(),
                anomalies: BTreeMap::new(),
                ops: 0,
                end_t: 0,
            },
            pending_streams: vec![VecDeque::new(); n_users],
            unchecked_from: Vec::new(),
            open_since: vec![None; n_users],
            open_faults: HashMap::new(),
        }
    }

    fn anomaly(&mut self, name: &'static str) {
        *self.facts.anomalies.entry(name).or_insert(0) += 1;
    }

    fn is_user(&self, p: u32) -> bool {
        (p as usize) < self.facts.header.users.len()
    }

    fn conv_ok(&mut self, c: u32) -> bool {
        let ok = (c as usize) < self.facts.header.conversations.len();
        if !ok {
            self.anomaly(anomaly::CONVERSATION_OUT_OF_RANGE);
        }
        ok
    }

    fn msg(&mut self, m: &str) -> MsgId {
        let (id, new) = self.facts.names.intern(m);
        if new {
            self.facts.sends.push(SendFacts::empty());
        }
        id
    }

    /// Adds one operation.
    pub fn push(&mut self, op: Op) {
        let Op { t, p, k, v } = op;
        self.facts.ops += 1;
        self.facts.end_t = self.facts.end_t.max(t);
        let user = self.is_user(p);
        // The abuse connections (bad input) are the harness's own; nothing to index.
        let abuse = (ABUSE - 64..=ABUSE).contains(&p);
        if abuse {
            return;
        }
        if !user && p != NEMESIS && p != HARNESS && p != HTTP && p != RECOVERY {
            self.anomaly(anomaly::UNKNOWN_PROCESS);
            return;
        }
        // The recovery phase's reads are its own record, never a user's deliveries.
        if p == RECOVERY {
            match v {
                Value::RecoveryRead { c, u, last, n, err } => {
                    if !self.conv_ok(c) {
                        return;
                    }
                    self.facts
                        .recovery_reads
                        .entry(c)
                        .or_default()
                        .push(RecoveryRead {
                            t,
                            k,
                            u,
                            last,
                            n,
                            err: err.map(String::into_boxed_str),
                        });
                }
                Value::RecoveryMsg { c, s, m, .. } => {
                    if !self.conv_ok(c) {
                        return;
                    }
                    let id = self.msg(&m);
                    self.facts
                        .recovery_msgs
                        .entry(c)
                        .or_default()
                        .push(RecoveredMsg { t, s, m: id });
                }
                Value::Phase { name } => self.facts.phases.push(Phase { t, name }),
                _ => self.anomaly(anomaly::UNKNOWN_PROCESS),
            }
            return;
        }
        match v {
            Value::Send {
                c,
                m,
                due,
                seq,
                mid,
                dup,
                err,
                ..
            } => {
                if !user {
                    self.anomaly(anomaly::UNKNOWN_PROCESS);
                    return;
                }
                if !self.conv_ok(c) {
                    return;
                }
                self.send(t, p, k, c, &m, due, seq, mid, dup, err)
            }
            Value::Deliver { c, s, m, from, via } => {
                if !user {
                    self.anomaly(anomaly::UNKNOWN_PROCESS);
                    return;
                }
                if !self.conv_ok(c) {
                    return;
                }
                let id = self.msg(&m);
                let send = &self.facts.sends[id as usize];
                if send.invoked() {
                    if send.sender != from {
                        self.facts.sender_mismatches.push(SenderMismatch {
                            m: id,
                            recipient: p,
                            c,
                            t,
                            from,
                        });
                    }
                } else {
                    self.unchecked_from.push((id, p, c, t, from));
                }
                self.facts
                    .deliveries
                    .entry((p, c))
                    .or_default()
                    .push(Delivery { t, s, m: id, via });
            }
            Value::Connect { node, err } => {
                if !user {
                    self.anomaly(anomaly::UNKNOWN_PROCESS);
                    return;
                }
                let what = match k {
                    Kind::Invoke => ConnWhat::ConnectInvoke,
                    Kind::Ok => ConnWhat::ConnectOk,
                    Kind::Fail | Kind::Info => ConnWhat::ConnectFail,
                };
                let u = p as usize;
                if what == ConnWhat::ConnectOk {
                    if self.open_since[u].is_some() {
                        self.anomaly(anomaly::CONNECT_WHILE_CONNECTED);
                        self.close_conn(u, t);
                    }
                    self.open_since[u] = Some(t);
                }
                self.facts.conns[u].push(ConnEvent {
                    t,
                    what,
                    node,
                    note: err.map(String::into_boxed_str),
                });
            }
            Value::Disconnect { node, reason } => {
                if !user {
                    self.anomaly(anomaly::UNKNOWN_PROCESS);
                    return;
                }
                let u = p as usize;
                if self.open_since[u].is_some() {
                    self.close_conn(u, t);
                }
                self.facts.conns[u].push(ConnEvent {
                    t,
                    what: ConnWhat::Disconnect,
                    node,
                    note: Some(reason.into_boxed_str()),
                });
            }
            Value::Sync {
                c, after, last, n, ..
            } => {
                if !user {
                    self.anomaly(anomaly::UNKNOWN_PROCESS);
                    return;
                }
                if !self.conv_ok(c) {
                    return;
                }
                self.facts.syncs.entry((p, c)).or_default().push(SyncEvent {
                    t,
                    k,
                    after,
                    last,
                    n,
                });
            }
            Value::Stream {
                c,
                due,
                session,
                http,
                ..
            } => {
                if !user {
                    // HTTP streams are recorded by the user that owns them; a stream by
                    // another actor is not one the checkers can attribute.
                    self.anomaly(anomaly::UNKNOWN_PROCESS);
                    return;
                }
                if !self.conv_ok(c) {
                    return;
                }
                self.stream(t, p, k, c, due, session, http)
            }
            Value::Resume { session, after } => {
                if !user {
                    self.anomaly(anomaly::UNKNOWN_PROCESS);
                    return;
                }
                let sid = self.facts.sessions.intern(&session);
                self.facts
                    .follows
                    .entry((p, sid))
                    .or_default()
                    .resumes
                    .push((t, after, k));
            }
            Value::Chunk { session, idx } => {
                if !user {
                    self.anomaly(anomaly::UNKNOWN_PROCESS);
                    return;
                }
                let sid = self.facts.sessions.intern(&session);
                self.facts
                    .follows
                    .entry((p, sid))
                    .or_default()
                    .chunks
                    .push((t, idx));
            }
            Value::StreamEnd {
                session,
                outcome,
                total,
            } => {
                if !user {
                    self.anomaly(anomaly::UNKNOWN_PROCESS);
                    return;
                }
                let sid = self.facts.sessions.intern(&session);
                self.facts
                    .follows
                    .entry((p, sid))
                    .or_default()
                    .ends
                    .push(StreamEndEvent {
                        t,
                        outcome: outcome.into_boxed_str(),
                        total,
                    });
            }
            Value::Fault {
                id,
                kind,
                target,
                err,
            } => self.fault(t, k, id, kind, target, err),
            Value::Phase { name } => self.facts.phases.push(Phase { t, name }),
            Value::Stall { ms } => {
                if user {
                    self.facts.stalls.entry(p).or_default().push((t, k, ms));
                }
            }
            Value::RecoveryRead { .. } | Value::RecoveryMsg { .. } => {
                // Only the recovery process reads for the recovery phase.
                self.anomaly(anomaly::UNKNOWN_PROCESS);
            }
            Value::Typing { .. }
            | Value::Read { .. }
            | Value::Http { .. }
            | Value::ServerError { .. }
            | Value::Abuse { .. } => {}
        }
    }

    fn close_conn(&mut self, u: usize, t: u64) {
        self.open_since[u] = None;
        let until = &mut self.facts.connected_until[u];
        *until = Some(until.map_or(t, |x| x.max(t)));
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        t: u64,
        p: u32,
        k: Kind,
        c: u32,
        m: &str,
        due: Option<u64>,
        seq: Option<i64>,
        mid: Option<String>,
        dup: Option<bool>,
        err: Option<String>,
    ) {
        let id = self.msg(m);
        let i = id as usize;
        let s = &self.facts.sends[i];
        let first_invoke = k == Kind::Invoke && s.invokes == 0;
        let first_ok = k == Kind::Ok && s.oks == 0;
        let reused = s.invoked() && (s.sender != p || s.c != c);
        let no_invoke = k != Kind::Invoke && !s.invoked();
        let differs = match (&mid, s.mid_off) {
            (Some(new), off) if off != NONE => {
                let old = self
                    .facts
                    .mid_arena
                    .get(off as usize..off as usize + s.mid_len as usize)
                    .unwrap_or("");
                old != new
            }
            _ => false,
        };
        if reused {
            self.anomaly(anomaly::SEND_ID_REUSED);
        }
        if no_invoke {
            self.anomaly(anomaly::SEND_OUTCOME_WITHOUT_INVOKE);
        }
        let arena_off = self.facts.mid_arena.len() as u64;
        let s = &mut self.facts.sends[i];
        if s.sender == NO_PROCESS {
            s.sender = p;
            s.c = c;
        }
        match k {
            Kind::Invoke => s.invokes = s.invokes.saturating_add(1),
            Kind::Ok => s.oks = s.oks.saturating_add(1),
            Kind::Fail => s.fails = s.fails.saturating_add(1),
            Kind::Info => s.infos = s.infos.saturating_add(1),
        }
        if first_invoke {
            s.sender = p;
            s.c = c;
            s.invoke_t = t;
            s.due = due.unwrap_or(NONE);
            return;
        }
        if first_ok {
            s.ok_t = t;
            s.seq = seq.unwrap_or(0);
            s.first_ok_dup = dup.unwrap_or(false);
            if let Some(mid) = &mid {
                s.mid_off = arena_off;
                s.mid_len = mid.len() as u32;
                self.facts.mid_arena.push_str(mid);
            }
            return;
        }
        self.facts.send_extra.push(SendEvent {
            m: id,
            t,
            p,
            k,
            c,
            seq,
            dup,
            mid_differs: differs,
            err: err.map(String::into_boxed_str),
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn stream(
        &mut self,
        t: u64,
        p: u32,
        k: Kind,
        c: u32,
        due: Option<u64>,
        session: Option<String>,
        http: bool,
    ) {
        let u = p as usize;
        match k {
            Kind::Invoke => self.pending_streams[u].push_back((t, c, due)),
            Kind::Ok => {
                let start = if http {
                    StreamStart {
                        t,
                        invoke_t: None,
                        due,
                        http,
                    }
                } else {
                    let q = &mut self.pending_streams[u];
                    match q.iter().position(|x| x.1 == c).and_then(|i| q.remove(i)) {
                        Some((it, _, d)) => StreamStart {
                            t,
                            invoke_t: Some(it),
                            due: d.or(due),
                            http,
                        },
                        None => {
                            self.anomaly(anomaly::STREAM_OK_WITHOUT_INVOKE);
                            StreamStart {
                                t,
                                invoke_t: None,
                                due,
                                http,
                            }
                        }
                    }
                };
                let Some(session) = session else {
                    self.anomaly(anomaly::STREAM_WITHOUT_SESSION);
                    return;
                };
                let sid = self.facts.sessions.intern(&session);
                let f = self.facts.follows.entry((p, sid)).or_default();
                f.c = Some(c);
                f.start = Some(start);
            }
            Kind::Fail | Kind::Info => {
                let q = &mut self.pending_streams[u];
                if let Some(i) = q.iter().position(|x| x.1 == c) {
                    q.remove(i);
                } else {
                    q.pop_front();
                }
            }
        }
    }

    fn fault(
        &mut self,
        t: u64,
        k: Kind,
        id: u32,
        kind: String,
        target: String,
        err: Option<String>,
    ) {
        match k {
            Kind::Invoke => {
                self.open_faults.insert(id, self.facts.faults.len());
                self.facts.faults.push(Fault {
                    id,
                    kind,
                    target,
                    start: t,
                    end: None,
                    err: None,
                });
            }
            Kind::Ok | Kind::Fail | Kind::Info => match self.open_faults.remove(&id) {
                Some(i) => {
                    if let Some(f) = self.facts.faults.get_mut(i) {
                        f.end = Some(t);
                        f.err = err;
                    }
                }
                None => self.anomaly(anomaly::FAULT_END_WITHOUT_START),
            },
        }
    }

    /// Ends the build.
    pub fn finish(mut self) -> Facts {
        for u in 0..self.open_since.len() {
            if self.open_since[u].is_some() {
                self.open_since[u] = None;
                self.facts.connected_until[u] = Some(u64::MAX);
            }
        }
        for (m, recipient, c, t, from) in std::mem::take(&mut self.unchecked_from) {
            let s = &self.facts.sends[m as usize];
            if s.invoked() && s.sender != from {
                self.facts.sender_mismatches.push(SenderMismatch {
                    m,
                    recipient,
                    c,
                    t,
                    from,
                });
            }
        }
        self.facts.unanswered_stream_invokes =
            self.pending_streams.iter().map(|q| q.len() as u64).sum();
        self.facts.send_extra.sort_by_key(|e| (e.m, e.t));
        self.facts.phases.sort_by_key(|p| p.t);
        self.facts.sends.shrink_to_fit();
        self.facts.mid_arena.shrink_to_fit();
        for v in self.facts.deliveries.values_mut() {
            v.shrink_to_fit();
        }
        self.facts
    }
}

impl Facts {
    /// Indexes a history in one pass.
    pub fn from_history(header: &Header, ops: impl Iterator<Item = Op>) -> Facts {
        let mut b = FactsBuilder::new(header);
        for op in ops {
            b.push(op);
        }
        b.finish()
    }

    pub fn header(&self) -> &Header {
        &self.header
    }
    pub fn n_users(&self) -> usize {
        self.header.users.len()
    }
    pub fn n_conversations(&self) -> usize {
        self.header.conversations.len()
    }
    /// Members of conversation `c` (empty when out of range).
    pub fn members(&self, c: u32) -> &[u32] {
        self.header
            .conversations
            .get(c as usize)
            .map(|x| x.members.as_slice())
            .unwrap_or(&[])
    }
    pub fn is_member(&self, u: u32, c: u32) -> bool {
        self.members(c).contains(&u)
    }
    /// Conversations user `u` is a member of.
    pub fn user_conversations(&self, u: u32) -> &[u32] {
        self.user_convs
            .get(u as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
    /// Operations read.
    pub fn ops(&self) -> u64 {
        self.ops
    }
    /// The latest `t` in the history.
    pub fn end_t(&self) -> u64 {
        self.end_t
    }
    pub fn anomalies(&self) -> &BTreeMap<&'static str, u64> {
        &self.anomalies
    }
    /// `history inconsistent: name N, ...` for those of `names` present, else None.
    pub(crate) fn anomaly_reason(&self, names: &[&str]) -> Option<String> {
        let found: Vec<String> = self
            .anomalies
            .iter()
            .filter(|(k, n)| **n > 0 && names.contains(k))
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        (!found.is_empty()).then(|| format!("history inconsistent ({})", found.join(", ")))
    }

    // --- sends -------------------------------------------------------------------------

    /// Every client_msg_id seen (invoked, acked or only delivered), by [`MsgId`].
    pub fn sends(&self) -> &[SendFacts] {
        &self.sends
    }
    pub fn send(&self, m: MsgId) -> Option<&SendFacts> {
        self.sends.get(m as usize)
    }
    /// The client_msg_id of `m`.
    pub fn msg_name(&self, m: MsgId) -> String {
        self.names.name(m)
    }
    pub fn lookup(&self, client_msg_id: &str) -> Option<MsgId> {
        self.names.lookup(client_msg_id)
    }
    /// The message id of the first ok of `m`.
    pub fn mid(&self, m: MsgId) -> Option<&str> {
        let s = self.sends.get(m as usize)?;
        if s.mid_off == NONE {
            return None;
        }
        self.mid_arena
            .get(s.mid_off as usize..s.mid_off as usize + s.mid_len as usize)
    }
    /// The send records of `m` beyond its first invoke and first ok, in time order.
    pub fn send_events(&self, m: MsgId) -> &[SendEvent] {
        let lo = self.send_extra.partition_point(|e| e.m < m);
        let hi = self.send_extra.partition_point(|e| e.m <= m);
        &self.send_extra[lo..hi]
    }
    /// All such records, sorted by (m, t).
    pub fn all_send_events(&self) -> &[SendEvent] {
        &self.send_extra
    }

    // --- deliveries --------------------------------------------------------------------

    /// Deliveries per (recipient, conversation), each in history order.
    pub fn deliveries(&self) -> &BTreeMap<(u32, u32), Vec<Delivery>> {
        &self.deliveries
    }
    pub fn deliveries_of(&self, recipient: u32, c: u32) -> &[Delivery] {
        self.deliveries
            .get(&(recipient, c))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
    /// Deliveries naming a sender other than the process that invoked the send.
    pub fn sender_mismatches(&self) -> &[SenderMismatch] {
        &self.sender_mismatches
    }

    // --- connections and syncs ---------------------------------------------------------

    pub fn connections(&self, u: u32) -> &[ConnEvent] {
        self.conns.get(u as usize).map(Vec::as_slice).unwrap_or(&[])
    }
    /// Connected intervals `[connect ok, disconnect)` of user `u`; `u64::MAX` for a
    /// connection still open at the end of the history.
    pub fn intervals(&self, u: u32) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut open: Option<u64> = None;
        for e in self.connections(u) {
            match e.what {
                ConnWhat::ConnectOk => {
                    if let Some(s) = open {
                        out.push((s, e.t));
                    }
                    open = Some(e.t);
                }
                ConnWhat::Disconnect => {
                    if let Some(s) = open.take() {
                        out.push((s, e.t));
                    }
                }
                ConnWhat::ConnectInvoke | ConnWhat::ConnectFail => {}
            }
        }
        if let Some(s) = open {
            out.push((s, u64::MAX));
        }
        out
    }
    /// Whether user `u` was connected at some point after `t` (a connection open at
    /// `t` or later, including one still open at the end of the history).
    pub fn connected_after(&self, u: u32, t: u64) -> bool {
        matches!(self.connected_until.get(u as usize), Some(Some(end)) if *end > t)
    }
    pub fn syncs(&self, u: u32, c: u32) -> &[SyncEvent] {
        self.syncs.get(&(u, c)).map(Vec::as_slice).unwrap_or(&[])
    }

    // --- streams -----------------------------------------------------------------------

    /// Per (user, session): what that user saw of the stream.
    pub fn follows(&self) -> &BTreeMap<(u32, SessionId), Follow> {
        &self.follows
    }
    pub fn session_name(&self, s: SessionId) -> &str {
        self.sessions
            .names
            .get(s as usize)
            .map(|x| &**x)
            .unwrap_or("")
    }
    /// Stream invokes never answered by an ok or a fail.
    pub fn unanswered_stream_invokes(&self) -> u64 {
        self.unanswered_stream_invokes
    }

    // --- faults and phases -------------------------------------------------------------

    pub fn faults(&self) -> &[Fault] {
        &self.faults
    }
    /// `(start, end)` of every fault; one still on at the end of the history ends there.
    pub fn fault_windows(&self) -> Vec<(u64, u64)> {
        self.faults
            .iter()
            .map(|f| (f.start, f.end.unwrap_or(self.end_t).max(f.start)))
            .collect()
    }
    /// Phases in time order.
    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }
    /// The first phase of this name.
    pub fn phase_t(&self, name: &str) -> Option<u64> {
        self.phases.iter().find(|p| p.name == name).map(|p| p.t)
    }
    /// The run was stopped early (a phase `interrupted`).
    pub fn interrupted(&self) -> bool {
        self.phase_t("interrupted").is_some()
    }

    // --- recovery -----------------------------------------------------------------------

    /// Whether the history has a recovery phase at all (any recovery read).
    pub fn has_recovery(&self) -> bool {
        !self.recovery_reads.is_empty()
    }
    /// The recovery phase's reads of conversation `c`.
    pub fn recovery_reads(&self, c: u32) -> &[RecoveryRead] {
        self.recovery_reads
            .get(&c)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
    /// Whether some recovery read of `c` completed (the node said there was no more).
    pub fn recovery_complete(&self, c: u32) -> bool {
        self.recovery_reads(c).iter().any(|r| r.k == Kind::Ok)
    }
    /// The messages the recovery phase read back in `c`, in history order.
    pub fn recovery_msgs(&self, c: u32) -> &[RecoveredMsg] {
        self.recovery_msgs.get(&c).map(Vec::as_slice).unwrap_or(&[])
    }
    /// Conversations with recovered messages.
    pub fn recovery_msgs_all(&self) -> &BTreeMap<u32, Vec<RecoveredMsg>> {
        &self.recovery_msgs
    }
    /// `(t, kind, ms)` of user `u`'s stalls (slow consumer not reading).
    pub fn stalls(&self, u: u32) -> &[(u64, Kind, u64)] {
        self.stalls.get(&u).map(Vec::as_slice).unwrap_or(&[])
    }

    // --- timelines ---------------------------------------------------------------------

    /// `user <id> (p=<p>)`, `nemesis`, `harness`, `http`.
    pub fn who(&self, p: u32) -> String {
        match p {
            NEMESIS => "nemesis".into(),
            HARNESS => "harness".into(),
            RECOVERY => "recovery".into(),
            HTTP => "http".into(),
            p if (ABUSE - 64..=ABUSE).contains(&p) => format!("abuse-{}", ABUSE - p),
            _ => match self.header.users.get(p as usize) {
                Some(u) => format!("user {} (p={p})", u.id),
                None => format!("p={p}"),
            },
        }
    }

    /// `c<i> (<id>)`.
    pub fn conv_name(&self, c: u32) -> String {
        match self.header.conversations.get(c as usize) {
            Some(x) => format!("c{c} ({})", x.id),
            None => format!("c{c}"),
        }
    }

    /// The send records of `m`.
    pub(crate) fn timeline_send(&self, m: MsgId, tl: &mut Timeline) {
        let Some(s) = self.send(m) else { return };
        let name = self.msg_name(m);
        if let Some(t) = s.invoke_t() {
            let due = s
                .due()
                .map(|d| format!(" due={}", &fmt_t(d)[2..]))
                .unwrap_or_default();
            tl.push(
                t,
                &self.who(s.sender),
                format!("invoke send m={name} c={}{due}", s.c),
            );
        }
        if let Some(t) = s.ok_t() {
            tl.push(
                t,
                &self.who(s.sender),
                format!(
                    "ok send m={name} seq={} mid={} dup={}",
                    s.seq,
                    self.mid(m).unwrap_or("-"),
                    s.first_ok_dup
                ),
            );
        }
        for e in self.send_events(m) {
            let kind = kind_name(e.k);
            let mut text = format!("{kind} send m={name}");
            if let Some(seq) = e.seq {
                text.push_str(&format!(" seq={seq}"));
            }
            if let Some(d) = e.dup {
                text.push_str(&format!(" dup={d}"));
            }
            if e.mid_differs {
                text.push_str(" (another mid)");
            }
            if let Some(err) = &e.err {
                text.push_str(&format!(" err={err:?}"));
            }
            tl.push(e.t, &self.who(e.p), text);
        }
    }

    /// Connection events of user `u` at or after `from`.
    pub(crate) fn timeline_connections(&self, u: u32, from: u64, tl: &mut Timeline) {
        let who = self.who(u);
        for e in self.connections(u).iter().filter(|e| e.t >= from) {
            let text = match e.what {
                ConnWhat::ConnectInvoke => format!("invoke connect node={}", e.node),
                ConnWhat::ConnectOk => format!("ok connect node={}", e.node),
                ConnWhat::ConnectFail => format!(
                    "fail connect node={} err={:?}",
                    e.node,
                    e.note.as_deref().unwrap_or("")
                ),
                ConnWhat::Disconnect => format!(
                    "info disconnect node={} reason={:?}",
                    e.node,
                    e.note.as_deref().unwrap_or("")
                ),
            };
            tl.push(e.t, &who, text);
        }
        for &(t, k, ms) in self.stalls(u).iter().filter(|s| s.0 >= from) {
            tl.push(t, &who, format!("{} stall ms={ms}", kind_name(k)));
        }
    }

    /// The recovery phase's reads of `c` and whether they returned `m`.
    pub(crate) fn timeline_recovery(&self, c: u32, m: Option<MsgId>, tl: &mut Timeline) {
        for r in self.recovery_reads(c) {
            let mut text = format!(
                "{} recovery_read c={c} as={}",
                kind_name(r.k),
                self.header
                    .users
                    .get(r.u as usize)
                    .map_or("?", |x| x.id.as_str())
            );
            if let Some(l) = r.last {
                text.push_str(&format!(" last={l}"));
            }
            if let Some(n) = r.n {
                text.push_str(&format!(" n={n}"));
            }
            if let Some(e) = &r.err {
                text.push_str(&format!(" err={e:?}"));
            }
            tl.push(r.t, "recovery", text);
        }
        if let Some(m) = m {
            for x in self.recovery_msgs(c).iter().filter(|x| x.m == m) {
                tl.push(
                    x.t,
                    "recovery",
                    format!("ok recovery_msg c={c} s={} m={}", x.s, self.msg_name(m)),
                );
            }
        }
    }

    /// Syncs of user `u` in conversation `c` at or after `from`.
    pub(crate) fn timeline_syncs(&self, u: u32, c: u32, from: u64, tl: &mut Timeline) {
        let who = self.who(u);
        for e in self.syncs(u, c).iter().filter(|e| e.t >= from) {
            let mut text = format!("{} sync c={c} after={}", kind_name(e.k), e.after);
            if let Some(l) = e.last {
                text.push_str(&format!(" last={l}"));
            }
            if let Some(n) = e.n {
                text.push_str(&format!(" n={n}"));
            }
            tl.push(e.t, &who, text);
        }
    }

    /// Deliveries of `m` to any member of conversation `c`.
    pub(crate) fn timeline_deliveries_of_msg(&self, m: MsgId, c: u32, tl: &mut Timeline) {
        for &r in self.members(c) {
            self.timeline_deliveries_to(r, c, |d| d.m == m, tl);
        }
    }

    /// Deliveries to `r` in `c` that match `keep`.
    pub(crate) fn timeline_deliveries_to(
        &self,
        r: u32,
        c: u32,
        keep: impl Fn(&Delivery) -> bool,
        tl: &mut Timeline,
    ) {
        let who = self.who(r);
        for d in self.deliveries_of(r, c).iter().filter(|d| keep(d)) {
            tl.push(
                d.t,
                &who,
                format!(
                    "ok deliver c={c} s={} m={} via={}",
                    d.s,
                    self.msg_name(d.m),
                    via_name(d.via)
                ),
            );
        }
    }
}

pub(crate) fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Invoke => "invoke",
        Kind::Ok => "ok",
        Kind::Fail => "fail",
        Kind::Info => "info",
    }
}

pub(crate) fn via_name(v: Via) -> &'static str {
    match v {
        Via::Live => "live",
        Via::Sync => "sync",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::H;

    #[test]
    fn compact_names_round_trip_and_others_are_strings() {
        let mut n = MsgNames::default();
        for m in [
            "3-12",
            "0-0",
            "03-1",
            "3-",
            "abc",
            "4294967295-1",
            "2147483647-4294967295",
            "1-2-3",
        ] {
            let (id, new) = n.intern(m);
            assert!(new, "{m}");
            assert_eq!(n.name(id), m);
            assert_eq!(n.lookup(m), Some(id));
            assert_eq!(n.intern(m), (id, false));
        }
        assert_eq!(compact_key("03-1"), None);
        assert_eq!(n.lookup("9-9"), None);
    }

    #[test]
    fn one_pass_indexes_sends_deliveries_connections_faults() {
        let mut h = H::new(3, &[&[0, 1, 2]]);
        h.connect(0, 0).connect(0, 1).connect(0, 2);
        h.phase(1, "load_start");
        h.send(10, 0, 0, "0-1").ok(12, 0, 0, "0-1", 1, "mid-a");
        h.deliver(13, 1, 0, 1, "0-1", 0, Via::Live);
        h.send(20, 0, 0, "0-2").info(30, 0, 0, "0-2");
        h.send(31, 0, 0, "0-2").ok(32, 0, 0, "0-2", 2, "mid-b");
        h.ok(33, 0, 0, "0-2", 2, "mid-b");
        h.disconnect(40, 2).connect(50, 2);
        h.fault(45, 55, 7);
        h.deliver(60, 2, 0, 5, "9-9", 1, Via::Sync);
        let f = h.facts();
        assert_eq!(f.ops(), h.ops.len() as u64);
        let m1 = f.lookup("0-1").unwrap_or(u32::MAX);
        let s1 = f.send(m1).cloned().unwrap_or_else(SendFacts::empty);
        assert_eq!(
            (s1.ok_t(), s1.seq(), f.mid(m1)),
            (Some(12_000), Some(1), Some("mid-a"))
        );
        let m2 = f.lookup("0-2").unwrap_or(u32::MAX);
        assert_eq!(f.send_events(m2).len(), 3, "info, retry invoke, second ok");
        assert_eq!(f.mid(m2), Some("mid-b"));
        assert!(f.send_events(m2).iter().all(|e| !e.mid_differs));
        assert_eq!(f.deliveries_of(1, 0).len(), 1);
        let unknown = f.lookup("9-9").unwrap_or(u32::MAX);
        assert!(!f.sends()[unknown as usize].invoked());
        assert_eq!(
            f.sender_mismatches().len(),
            0,
            "not invoked: nothing to compare"
        );
        assert_eq!(f.intervals(2), vec![(0, 40_000), (50_000, u64::MAX)]);
        assert!(f.connected_after(2, 1_000_000));
        assert_eq!(f.fault_windows(), vec![(45_000, 55_000)]);
        assert_eq!(f.phase_t("load_start"), Some(1_000));
        assert!(f.anomalies().is_empty(), "{:?}", f.anomalies());
    }

    /// A large history through every checker (run with `--ignored --release` to time it).
    #[test]
    #[ignore]
    fn scale() {
        let users = 1000u32;
        let convs: Vec<Vec<u32>> = (0..users / 5)
            .map(|c| (c * 5..c * 5 + 5).collect())
            .collect();
        let conv_refs: Vec<&[u32]> = convs.iter().map(Vec::as_slice).collect();
        let mut h = H::new(users as usize, &conv_refs);
        for u in 0..users {
            h.connect(0, u);
        }
        h.phase(1, "load_start");
        let n = 1_000_000u64;
        let mut seqs = vec![0i64; convs.len()];
        for i in 0..n {
            let c = (i % convs.len() as u64) as u32;
            let p = c * 5 + (i % 5) as u32;
            let m = format!("{p}-{i}");
            seqs[c as usize] += 1;
            let s = seqs[c as usize];
            let t = 2 + i / 10;
            h.send(t, p, c, &m).ok(
                t + 1,
                p,
                c,
                &m,
                s,
                &format!("00000000-0000-0000-0000-{i:012}"),
            );
            for r in c * 5..c * 5 + 5 {
                if r != p {
                    h.deliver(t + 2, r, c, s, &m, p, Via::Live);
                }
            }
        }
        h.phase(2 + n / 10 + 10, "load_end");
        let started = std::time::Instant::now();
        let ops = std::mem::take(&mut h.ops);
        let f = Facts::from_history(&h.header, ops.into_iter());
        eprintln!("facts: {} ops in {:?}", f.ops(), started.elapsed());
        for (name, v) in [
            ("delivery", crate::delivery(&f)),
            (
                "duplicates",
                crate::duplicates(&f, &[crate::Path::Live, crate::Path::Sync], 0.01, None),
            ),
            ("order", crate::order(&f)),
            ("slo", crate::slo(&f, "delivery", 99.0, 10_000, false)),
        ] {
            eprintln!(
                "{name}: {:?} {} at {:?}",
                v.valid,
                v.summary,
                started.elapsed()
            );
            assert_eq!(v.valid, crate::Validity::Valid);
        }
    }

    #[test]
    fn compact_records_stay_small() {
        assert_eq!(std::mem::size_of::<Delivery>(), 24);
        assert!(std::mem::size_of::<SendFacts>() <= 64);
    }

    #[test]
    fn out_of_range_records_are_anomalies() {
        let mut h = H::new(2, &[&[0, 1]]);
        h.send(1, 0, 5, "0-1");
        h.deliver(2, 9, 0, 1, "0-1", 0, Via::Live);
        h.ok(3, 1, 0, "1-1", 1, "x");
        let f = h.facts();
        assert_eq!(
            f.anomalies().get(anomaly::CONVERSATION_OUT_OF_RANGE),
            Some(&1)
        );
        assert_eq!(f.anomalies().get(anomaly::UNKNOWN_PROCESS), Some(&1));
        assert_eq!(
            f.anomalies().get(anomaly::SEND_OUTCOME_WITHOUT_INVOKE),
            Some(&1)
        );
    }
}
