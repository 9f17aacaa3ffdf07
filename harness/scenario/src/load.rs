//! The `load` section: who the simulated users are, which conversations they share, how
//! much they do and of what kind, and for how long.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::distribution::Distribution;
use crate::rate::Rate;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// Simulated users, each with its own WebSocket connection (1..=200000).
    pub users: u32,
    /// Tenants the users are split across, evenly by user index (<= users).
    #[serde(default = "one_tenant")]
    pub tenants: u32,
    pub conversations: Conversations,
    pub rate: Rate,
    /// Weights of the operation kinds drawn for each arrival.
    #[serde(default)]
    pub mix: Mix,
    /// Size of a chat message body in bytes (1..=1048576).
    #[serde(default = "default_message_size")]
    pub message_size: Distribution,
    /// Load that runs before measuring starts; its operations are recorded but not judged.
    #[serde(default, with = "crate::duration")]
    pub warmup: Duration,
    /// The measured part of the run, after the warm-up (> 0, <= 24h).
    #[serde(with = "crate::duration")]
    pub duration: Duration,
    /// Users connected per second while setting up.
    #[serde(default = "default_connect_rate")]
    pub connect_rate: f64,
    /// After this an operation with no acknowledgement has an unknown outcome.
    #[serde(default = "default_ack_timeout", with = "crate::duration")]
    pub ack_timeout: Duration,
    /// Operations one user may have awaiting acknowledgement at once.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// After the load, every user asks for every conversation's messages once more
    /// (recovering what live fan-out missed). Off, what live fan-out dropped stays lost:
    /// sabotage scenarios that break live delivery turn it off to show it.
    #[serde(default = "default_final_resync")]
    pub final_resync: bool,
    /// After the load and the faults, fresh clients read every conversation from seq 0
    /// (the recovery phase): the store's testimony for the delivery checker.
    #[serde(default = "default_recovery")]
    pub recovery: bool,
    /// A share of the users stop reading their socket for a while, again and again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_consumers: Option<SlowConsumers>,
    /// Bad input sent at a rate while the legitimate load goes on.
    #[serde(default)]
    pub abuse: Vec<Abuse>,
}

/// Slow consumers: `share` of the users (drawn from the seed) stop reading their
/// WebSocket for `pause`, every `every` during the measured window (each from its own
/// offset, drawn from the seed, inside the first `every`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowConsumers {
    /// Fraction of the users that are slow, in (0, 1].
    pub share: f64,
    /// How long one stall lasts (> 0, < `every`).
    #[serde(with = "crate::duration")]
    pub pause: Duration,
    /// From the start of one stall to the next.
    #[serde(with = "crate::duration")]
    pub every: Duration,
}

impl SlowConsumers {
    /// How many of `users` are slow: the share, rounded, at least one.
    pub fn count(&self, users: u32) -> u32 {
        ((f64::from(users) * self.share).round() as u32).clamp(1, users.max(1))
    }
}

/// One kind of bad input, sent on connections of its own at `rate` per second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Abuse {
    pub kind: AbuseKind,
    pub rate: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbuseKind {
    /// Text that is not JSON: answered `malformed_frame`, the connection stays.
    Malformed,
    /// A frame over the node's size limit: answered `frame_too_large`.
    Oversized,
    /// A frame whose `type` the node does not know: answered `unknown_type`.
    UnknownType,
    /// A frame with another protocol version: answered `unsupported_version`.
    WrongVersion,
    /// A connection with a forged token: answered `unauthorized` and closed (4401).
    Unauthorized,
    /// A send to a conversation the sender is not in: answered `not_member`.
    NonMember,
    /// 200 frames at once past the rate limit: answered `rate_limited`.
    Flood,
}

impl AbuseKind {
    pub fn name(self) -> &'static str {
        match self {
            AbuseKind::Malformed => "malformed",
            AbuseKind::Oversized => "oversized",
            AbuseKind::UnknownType => "unknown_type",
            AbuseKind::WrongVersion => "wrong_version",
            AbuseKind::Unauthorized => "unauthorized",
            AbuseKind::NonMember => "non_member",
            AbuseKind::Flood => "flood",
        }
    }
}

fn default_final_resync() -> bool {
    true
}

fn default_recovery() -> bool {
    true
}

fn one_tenant() -> u32 {
    1
}

fn default_message_size() -> Distribution {
    Distribution::Fixed(200)
}

fn default_connect_rate() -> f64 {
    500.0
}

fn default_ack_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_in_flight() -> u32 {
    64
}

impl Load {
    /// Warm-up plus measured duration: the whole time load is offered.
    pub fn total(&self) -> Duration {
        // Saturating: absurd values are reported by validation rather than panicking here.
        self.warmup.saturating_add(self.duration)
    }

    /// Users in the largest tenant: users divided by tenants, rounded up.
    pub fn users_per_tenant(&self) -> u32 {
        self.users.div_ceil(self.tenants.max(1))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conversations {
    /// Conversations in all (>= 1), spread over the tenants.
    pub count: u32,
    /// Members of one conversation, all from one tenant.
    pub members: Distribution,
    #[serde(default)]
    pub placement: Placement,
}

/// Which node each member of a conversation connects to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Users are assigned to nodes round-robin by user index.
    #[default]
    Spread,
    /// All members of a conversation on one node.
    SameNode,
    /// Members of a conversation on distinct nodes, as far as the nodes allow.
    CrossNode,
    /// Each user on a node drawn from the scenario seed.
    Random,
}

/// The kinds of operation a user's arrival can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Send a chat message to one of the user's conversations.
    Chat,
    /// Start an AI stream and follow its chunks.
    Stream,
    /// Send a typing indicator.
    Typing,
    /// Mark messages read.
    Read,
    /// Ask for the messages after a sequence number.
    Sync,
    /// Drop the connection and reconnect (to any node), then catch up.
    Reconnect,
}

impl OpKind {
    pub const ALL: [OpKind; 6] = [
        OpKind::Chat,
        OpKind::Stream,
        OpKind::Typing,
        OpKind::Read,
        OpKind::Sync,
        OpKind::Reconnect,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpKind::Chat => "chat",
            OpKind::Stream => "stream",
            OpKind::Typing => "typing",
            OpKind::Read => "read",
            OpKind::Sync => "sync",
            OpKind::Reconnect => "reconnect",
        }
    }
}

/// Relative weights; an omitted kind weighs 0. When the whole mix is omitted, every
/// operation is a chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mix {
    #[serde(default)]
    pub chat: f64,
    #[serde(default)]
    pub stream: f64,
    #[serde(default)]
    pub typing: f64,
    #[serde(default)]
    pub read: f64,
    #[serde(default)]
    pub sync: f64,
    #[serde(default)]
    pub reconnect: f64,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            chat: 1.0,
            stream: 0.0,
            typing: 0.0,
            read: 0.0,
            sync: 0.0,
            reconnect: 0.0,
        }
    }
}

impl Mix {
    /// Each kind with its weight, in [`OpKind::ALL`] order.
    pub fn weights(&self) -> [(OpKind, f64); 6] {
        [
            (OpKind::Chat, self.chat),
            (OpKind::Stream, self.stream),
            (OpKind::Typing, self.typing),
            (OpKind::Read, self.read),
            (OpKind::Sync, self.sync),
            (OpKind::Reconnect, self.reconnect),
        ]
    }
}
