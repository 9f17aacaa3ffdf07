//! The Kafka event envelope: `{id, type, version, timestamp, tenant, trace_id, source_node,
//! <key fields>, payload}`. Every chatstream action becomes one envelope on one of the seed
//! topics, keyed so that order holds per conversation, session or user.

use serde::{Deserialize, Serialize};

/// The envelope version this crate writes and reads; consumers dead-letter newer ones.
pub const EVENT_VERSION: u16 = 1;

pub mod topic {
    pub const CHAT_EVENTS: &str = "chat-events";
    pub const STREAM_EVENTS: &str = "stream-events";
    pub const MESSAGE_STATUS_EVENTS: &str = "message-status-events";
    pub const TYPING_EVENTS: &str = "typing-events";
    pub const NOTIFICATIONS: &str = "notifications";
}

/// One event. Key fields are set when the event concerns them; `replayed` marks events
/// re-emitted by replay, so side effects (alerts) are not fired twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// Unique per event (UUID); consumers deduplicate on it.
    pub id: String,
    pub version: u16,
    /// RFC 3339 UTC with milliseconds, as the seeds write it.
    pub timestamp: String,
    /// Unix milliseconds of `timestamp`, for arithmetic without parsing.
    pub timestamp_ms: i64,
    pub tenant: String,
    pub trace_id: String,
    pub source_node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
    #[serde(flatten)]
    pub body: EventBody,
}

/// The event's type and payload, serialised as `"type": "...", "payload": {...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EventBody {
    ChatMessage(ChatMessage),
    SessionStarted(SessionStarted),
    ChunkReceived(ChunkReceived),
    StreamCompleted(StreamCompleted),
    StreamError(StreamError),
    RecoveryAttempt(RecoveryAttempt),
    MessageStatus(MessageStatusChanged),
    Typing(TypingChanged),
    Notification(Notification),
    MembershipChanged(MembershipChanged),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub message_id: String,
    pub client_msg_id: String,
    pub conversation_id: String,
    pub sender_id: String,
    pub seq: i64,
    pub body: String,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionStarted {
    pub session_id: String,
    pub message_id: String,
    pub conversation_id: String,
    pub user_id: String,
    /// The prompt (the training export pairs it with the response).
    pub prompt: String,
    pub prompt_length: usize,
    pub planned_chunks: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkReceived {
    pub session_id: String,
    pub message_id: String,
    pub chunk_index: i64,
    pub content_length: usize,
    /// Since the previous chunk (or the session start for the first).
    pub latency_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamCompleted {
    pub session_id: String,
    pub message_id: String,
    pub conversation_id: String,
    pub total_chunks: i64,
    pub content_length: usize,
    pub total_latency_ms: u64,
    pub words: usize,
    pub tokens_used: usize,
    /// The whole generated text.
    pub response: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamError {
    pub session_id: String,
    pub message_id: String,
    pub conversation_id: String,
    pub error: String,
    pub error_code: String,
    pub chunk_index: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoveryAttempt {
    pub session_id: String,
    pub user_id: String,
    pub after_index: i64,
    /// Whether the rest of the stream could be served.
    pub success: bool,
    pub chunks_replayed: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageStatusChanged {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    pub conversation_id: String,
    pub seq: i64,
    pub user_id: String,
    pub status: crate::frames::MessageStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TypingChanged {
    pub conversation_id: String,
    pub user_id: String,
    pub is_typing: bool,
}

/// Members added to or removed from a conversation, and by whom. On chat-events keyed by
/// the conversation, so it stays in order with the conversation's messages. The event that
/// creates a conversation has `created` set and every first member in `added`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MembershipChanged {
    pub conversation_id: String,
    /// The member who made the change.
    pub actor_id: String,
    #[serde(default)]
    pub added: Vec<String>,
    #[serde(default)]
    pub removed: Vec<String>,
    #[serde(default)]
    pub created: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    pub id: String,
    pub user_id: String,
    pub title: String,
    pub content: String,
    pub kind: String,
    pub related_entity_id: String,
}

impl EventBody {
    /// The seed topic this event goes to.
    pub fn topic(&self) -> &'static str {
        match self {
            EventBody::ChatMessage(_) | EventBody::MembershipChanged(_) => topic::CHAT_EVENTS,
            EventBody::SessionStarted(_)
            | EventBody::ChunkReceived(_)
            | EventBody::StreamCompleted(_)
            | EventBody::StreamError(_)
            | EventBody::RecoveryAttempt(_) => topic::STREAM_EVENTS,
            EventBody::MessageStatus(_) => topic::MESSAGE_STATUS_EVENTS,
            EventBody::Typing(_) => topic::TYPING_EVENTS,
            EventBody::Notification(_) => topic::NOTIFICATIONS,
        }
    }

    /// The partition key: conversation (chat, membership, typing), session (streams), user
    /// (status, notifications), so order holds where it matters.
    pub fn key(&self) -> &str {
        match self {
            EventBody::ChatMessage(m) => &m.conversation_id,
            EventBody::MembershipChanged(m) => &m.conversation_id,
            EventBody::Typing(t) => &t.conversation_id,
            EventBody::SessionStarted(e) => &e.session_id,
            EventBody::ChunkReceived(e) => &e.session_id,
            EventBody::StreamCompleted(e) => &e.session_id,
            EventBody::StreamError(e) => &e.session_id,
            EventBody::RecoveryAttempt(e) => &e.session_id,
            EventBody::MessageStatus(e) => &e.user_id,
            EventBody::Notification(e) => &e.user_id,
        }
    }

    /// The type name on the wire (`CHAT_MESSAGE`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            EventBody::ChatMessage(_) => "CHAT_MESSAGE",
            EventBody::SessionStarted(_) => "SESSION_STARTED",
            EventBody::ChunkReceived(_) => "CHUNK_RECEIVED",
            EventBody::StreamCompleted(_) => "STREAM_COMPLETED",
            EventBody::StreamError(_) => "STREAM_ERROR",
            EventBody::RecoveryAttempt(_) => "RECOVERY_ATTEMPT",
            EventBody::MessageStatus(_) => "MESSAGE_STATUS",
            EventBody::Typing(_) => "TYPING",
            EventBody::Notification(_) => "NOTIFICATION",
            EventBody::MembershipChanged(_) => "MEMBERSHIP_CHANGED",
        }
    }
}

/// Why an event could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EventDecodeError {
    #[error("undecodable event: {0}")]
    Undecodable(String),
    #[error("event version {0} is newer than supported ({EVENT_VERSION})")]
    UnknownVersion(u64),
}

impl EventEnvelope {
    pub fn topic(&self) -> &'static str {
        self.body.topic()
    }

    pub fn key(&self) -> &str {
        self.body.key()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses an event, refusing versions this crate does not know.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, EventDecodeError> {
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| EventDecodeError::Undecodable(e.to_string()))?;
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version > u64::from(EVENT_VERSION) {
            return Err(EventDecodeError::UnknownVersion(version));
        }
        serde_json::from_value(value).map_err(|e| EventDecodeError::Undecodable(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn envelope(body: EventBody) -> EventEnvelope {
        EventEnvelope {
            id: "0190a1b2-0000-7000-8000-000000000001".into(),
            version: EVENT_VERSION,
            timestamp: "2026-11-25T08:00:00.000Z".into(),
            timestamp_ms: 1_795_593_600_000,
            tenant: "acme".into(),
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            source_node: "node-1".into(),
            conversation_id: Some("c1".into()),
            session_id: None,
            user_id: Some("u1".into()),
            message_id: Some("m1".into()),
            replayed: false,
            body,
        }
    }

    fn chat(seq: i64, body: String) -> EventBody {
        EventBody::ChatMessage(ChatMessage {
            message_id: "m1".into(),
            client_msg_id: "cm1".into(),
            conversation_id: "c1".into(),
            sender_id: "u1".into(),
            seq,
            body,
            created_at_ms: 5,
        })
    }

    #[test]
    fn envelope_wire_form_has_type_and_payload() {
        let e = envelope(chat(7, "hi".into()));
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["type"], "CHAT_MESSAGE");
        assert_eq!(v["payload"]["seq"], 7);
        assert_eq!(v["tenant"], "acme");
        assert!(v.get("replayed").is_none());
        assert_eq!(e.topic(), "chat-events");
        assert_eq!(e.key(), "c1");
        assert_eq!(
            EventEnvelope::from_slice(e.to_json().as_bytes()).unwrap(),
            e
        );
    }

    #[test]
    fn newer_versions_and_garbage_are_refused() {
        let mut v: serde_json::Value =
            serde_json::from_str(&envelope(chat(1, "x".into())).to_json()).unwrap();
        v["version"] = 2.into();
        assert!(matches!(
            EventEnvelope::from_slice(v.to_string().as_bytes()),
            Err(EventDecodeError::UnknownVersion(2))
        ));
        assert!(matches!(
            EventEnvelope::from_slice(b"\xff not json"),
            Err(EventDecodeError::Undecodable(_))
        ));
        v["version"] = 1.into();
        v["type"] = "SOMETHING_ELSE".into();
        assert!(EventEnvelope::from_slice(v.to_string().as_bytes()).is_err());
    }

    #[test]
    fn keys_follow_the_seeds() {
        let status = EventBody::MessageStatus(MessageStatusChanged {
            message_id: None,
            conversation_id: "c".into(),
            seq: 1,
            user_id: "u9".into(),
            status: crate::frames::MessageStatus::Read,
        });
        assert_eq!(
            (status.topic(), status.key()),
            ("message-status-events", "u9")
        );
        let chunk = EventBody::ChunkReceived(ChunkReceived {
            session_id: "s1".into(),
            message_id: "m".into(),
            chunk_index: 0,
            content_length: 1,
            latency_ms: 1,
        });
        assert_eq!((chunk.topic(), chunk.key()), ("stream-events", "s1"));
    }

    #[test]
    fn membership_changes_go_with_the_conversation() {
        let e = envelope(EventBody::MembershipChanged(MembershipChanged {
            conversation_id: "c1".into(),
            actor_id: "u1".into(),
            added: vec!["u2".into()],
            removed: vec![],
            created: false,
        }));
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(v["type"], "MEMBERSHIP_CHANGED");
        assert_eq!(v["payload"]["added"][0], "u2");
        assert_eq!((e.topic(), e.key()), ("chat-events", "c1"));
        assert_eq!(
            EventEnvelope::from_slice(e.to_json().as_bytes()).unwrap(),
            e
        );
    }

    proptest! {
        #[test]
        fn envelopes_round_trip(seq in any::<i64>(), body in ".{0,60}", replayed in any::<bool>()) {
            let mut e = envelope(chat(seq, body));
            e.replayed = replayed;
            prop_assert_eq!(EventEnvelope::from_slice(e.to_json().as_bytes()).unwrap(), e);
        }
    }
}
