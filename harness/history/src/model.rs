//! The records of a history: the header that names the run's users, conversations and
//! nodes, and the operations (invoke / ok / fail / info) with their values. Field names are
//! short on purpose: a ten-minute run at 5,000 messages/s with four recipients writes
//! about 18 million of them.

use serde::{Deserialize, Serialize};

/// The format name in every header.
pub const FORMAT: &str = "squall-history";
/// Bumped on any change a reader of an older version would misread. Version 2 added the
/// recovery phase's records (`recovery_read`, `recovery_msg`, process [`RECOVERY`]) and the
/// slow consumers' `stall`; a version-1 history is still read (it has none of them).
pub const VERSION: u32 = 2;

/// Process ids: users are numbered from 0; these name the harness's other actors.
pub const NEMESIS: u32 = u32::MAX;
pub const HARNESS: u32 = u32::MAX - 1;
pub const HTTP: u32 = u32::MAX - 2;
/// The recovery phase: fresh clients that read every conversation from seq 0 after the
/// load. Its reads are its own (`recovery_read`, `recovery_msg`), never a user's deliveries.
pub const RECOVERY: u32 = u32::MAX - 3;
/// Abuse connections (bad input) use process ids from here down, one per kind.
pub const ABUSE: u32 = u32::MAX - 16;

/// Line 1 of a history file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub run_id: String,
    pub scenario: String,
    pub seed: u64,
    /// Wall-clock milliseconds (Unix) at `t = 0`.
    pub origin_wall_ms: i64,
    /// Base URLs of the nodes, numbered from 1 in `Op` values (index 0 here is node 1).
    pub nodes: Vec<String>,
    /// Users in process-id order.
    pub users: Vec<UserInfo>,
    pub conversations: Vec<ConversationInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserInfo {
    pub id: String,
    pub tenant: String,
    /// The node (numbered from 1) the user connects to first.
    pub node: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationInfo {
    pub id: String,
    pub tenant: String,
    /// Process ids of the members.
    pub members: Vec<u32>,
}

/// Jepsen's operation types: an `invoke` is answered by exactly one `ok`, `fail` or
/// `info` (the outcome is unknown: it may or may not have happened) of the same process
/// and function; events without a request (a delivery, a fault's end) are `ok` or `info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// How a message reached a recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    Live,
    Sync,
}

/// One record. `t` is microseconds since the run's origin on the monotonic clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    pub t: u64,
    /// Process: a user index, or [`NEMESIS`], [`HARNESS`], [`HTTP`].
    pub p: u32,
    pub k: Kind,
    pub v: Value,
}

/// What an operation did. Conversations (`c`) are indices into `Header::conversations`,
/// users (`from`, `p`) indices into `Header::users`; `due` is the intended start time
/// (µs) the open-loop schedule set, so latency is measured from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "snake_case")]
pub enum Value {
    /// A WebSocket connection (invoke → ok / fail with `err`).
    Connect {
        node: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        err: Option<String>,
    },
    /// The connection ended without being asked to (info).
    Disconnect {
        node: u16,
        reason: String,
    },
    /// A chat message: invoke carries `m` (client_msg_id), `due`, `size`; ok adds `seq`,
    /// `mid` and `dup`; fail adds `err` (a definite refusal); info: the outcome is unknown.
    Send {
        c: u32,
        m: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        due: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mid: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dup: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        err: Option<String>,
    },
    /// A message seen by the recording process (ok).
    Deliver {
        c: u32,
        s: i64,
        m: String,
        from: u32,
        via: Via,
    },
    /// Catch-up after `after` (invoke) → `last` and `n` messages received (ok).
    Sync {
        c: u32,
        after: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        n: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        err: Option<String>,
    },
    Typing {
        c: u32,
    },
    Read {
        c: u32,
        s: i64,
    },
    /// An AI stream: invoke (over WebSocket, or `http: true` for `POST /api/chat`) → ok with
    /// the session id, or fail.
    Stream {
        c: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        due: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        http: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        err: Option<String>,
    },
    /// Following a stream again after `after` (the last chunk index seen).
    Resume {
        session: String,
        after: i64,
    },
    /// A stream chunk received (ok).
    Chunk {
        session: String,
        idx: i64,
    },
    /// A stream's end as the client saw it (ok).
    StreamEnd {
        session: String,
        outcome: String,
        total: i64,
    },
    /// An HTTP request (invoke → ok with status / fail with err).
    Http {
        ep: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        due: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        err: Option<String>,
    },
    /// A fault: invoke at its real start, ok at its real end (or fail/info with `err`).
    Fault {
        id: u32,
        kind: String,
        target: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        err: Option<String>,
    },
    /// A server error frame not tied to one of the process's own operations (info).
    ServerError {
        code: String,
        message: String,
    },
    /// Bad input (by the abuse process of a kind): invoke when sent; ok when the node
    /// answered with the expected error code (and close code, where one is due); fail
    /// with what came instead.
    Abuse {
        kind: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        got: Option<String>,
    },
    /// A phase boundary of the run (info by the harness): `connected`, `load_start`
    /// (after warm-up), `load_end`, `drained`, `recovery_start`, `recovery_end`.
    Phase {
        name: String,
    },
    /// The recovery phase reading conversation `c` from seq 0 with a fresh connection as
    /// member `u` (by process [`RECOVERY`]): invoke → ok with `last` (the newest seq) and
    /// `n` (messages received) once the node said no more, or fail with `err`.
    RecoveryRead {
        c: u32,
        u: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        n: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        err: Option<String>,
    },
    /// One message the recovery read of `c` returned (ok by [`RECOVERY`]): seq `s`,
    /// client_msg_id `m`, sender index `from`.
    RecoveryMsg {
        c: u32,
        s: i64,
        m: String,
        from: u32,
    },
    /// A slow consumer stopped reading its socket for `ms` milliseconds (invoke at the
    /// start, ok when it reads again).
    Stall {
        ms: u64,
    },
}

impl Value {
    /// The function name, as written in the `f` field.
    pub fn f(&self) -> &'static str {
        match self {
            Value::Connect { .. } => "connect",
            Value::Disconnect { .. } => "disconnect",
            Value::Send { .. } => "send",
            Value::Deliver { .. } => "deliver",
            Value::Sync { .. } => "sync",
            Value::Typing { .. } => "typing",
            Value::Read { .. } => "read",
            Value::Stream { .. } => "stream",
            Value::Resume { .. } => "resume",
            Value::Chunk { .. } => "chunk",
            Value::StreamEnd { .. } => "stream_end",
            Value::Http { .. } => "http",
            Value::Fault { .. } => "fault",
            Value::ServerError { .. } => "server_error",
            Value::Abuse { .. } => "abuse",
            Value::Phase { .. } => "phase",
            Value::RecoveryRead { .. } => "recovery_read",
            Value::RecoveryMsg { .. } => "recovery_msg",
            Value::Stall { .. } => "stall",
        }
    }
}
