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
        // Every envelope a writer of this crate produces takes the one-pass path; anything
        // it does not take (odd field order, duplicates, newer shapes) is decided by the
        // general path below, so the answers are the general path's.
        if let Ok(direct::Direct(e)) = serde_json::from_slice::<direct::Direct>(bytes) {
            if e.version > EVENT_VERSION {
                return Err(EventDecodeError::UnknownVersion(u64::from(e.version)));
            }
            return Ok(e);
        }
        Self::from_slice_general(bytes)
    }

    /// The general decode: any field order, the version checked before the shape.
    fn from_slice_general(bytes: &[u8]) -> Result<Self, EventDecodeError> {
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| EventDecodeError::Undecodable(e.to_string()))?;
        let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if version > u64::from(EVENT_VERSION) {
            return Err(EventDecodeError::UnknownVersion(version));
        }
        serde_json::from_value(value).map_err(|e| EventDecodeError::Undecodable(e.to_string()))
    }
}

/// A one-pass decode of the envelope: no intermediate `serde_json::Value` and no buffering
/// of the flattened body (the derived `Deserialize` buffers every field it does not know
/// into serde's `Content` to hand to the flattened body). It takes envelopes whose `type`
/// comes before their `payload`, as [`EventEnvelope::to_json`] writes them, and fails on
/// anything else; [`EventEnvelope::from_slice`] then falls back to the general path.
mod direct {
    use super::*;
    use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
    use std::fmt;

    #[derive(Deserialize)]
    #[serde(field_identifier, rename_all = "snake_case")]
    enum Field {
        Id,
        Version,
        Timestamp,
        TimestampMs,
        Tenant,
        TraceId,
        SourceNode,
        ConversationId,
        SessionId,
        UserId,
        MessageId,
        Replayed,
        Type,
        Payload,
        #[serde(other)]
        Other,
    }

    /// [`EventBody`]'s tags, renamed the same way.
    #[derive(Deserialize, Clone, Copy)]
    #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
    enum Kind {
        ChatMessage,
        SessionStarted,
        ChunkReceived,
        StreamCompleted,
        StreamError,
        RecoveryAttempt,
        MessageStatus,
        Typing,
        Notification,
        MembershipChanged,
    }

    pub(super) struct Direct(pub EventEnvelope);

    impl<'de> Deserialize<'de> for Direct {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(EnvelopeVisitor).map(Direct)
        }
    }

    fn once<T, E: de::Error>(slot: &mut Option<T>, v: T, name: &'static str) -> Result<(), E> {
        if slot.is_some() {
            return Err(E::duplicate_field(name));
        }
        *slot = Some(v);
        Ok(())
    }

    struct EnvelopeVisitor;

    impl<'de> Visitor<'de> for EnvelopeVisitor {
        type Value = EventEnvelope;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an event envelope")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<EventEnvelope, A::Error> {
            let (mut id, mut version, mut timestamp, mut timestamp_ms) = (None, None, None, None);
            let (mut tenant, mut trace_id, mut source_node) = (None, None, None);
            let (mut conversation_id, mut session_id, mut user_id, mut message_id) =
                (None, None, None, None);
            let (mut replayed, mut kind, mut body) = (None, None::<Kind>, None);
            while let Some(field) = map.next_key::<Field>()? {
                match field {
                    Field::Id => once(&mut id, map.next_value()?, "id")?,
                    Field::Version => once(&mut version, map.next_value()?, "version")?,
                    Field::Timestamp => once(&mut timestamp, map.next_value()?, "timestamp")?,
                    Field::TimestampMs => {
                        once(&mut timestamp_ms, map.next_value()?, "timestamp_ms")?
                    }
                    Field::Tenant => once(&mut tenant, map.next_value()?, "tenant")?,
                    Field::TraceId => once(&mut trace_id, map.next_value()?, "trace_id")?,
                    Field::SourceNode => once(&mut source_node, map.next_value()?, "source_node")?,
                    Field::ConversationId => once(
                        &mut conversation_id,
                        map.next_value::<Option<String>>()?,
                        "conversation_id",
                    )?,
                    Field::SessionId => once(
                        &mut session_id,
                        map.next_value::<Option<String>>()?,
                        "session_id",
                    )?,
                    Field::UserId => {
                        once(&mut user_id, map.next_value::<Option<String>>()?, "user_id")?
                    }
                    Field::MessageId => once(
                        &mut message_id,
                        map.next_value::<Option<String>>()?,
                        "message_id",
                    )?,
                    Field::Replayed => once(&mut replayed, map.next_value()?, "replayed")?,
                    Field::Type => once(&mut kind, map.next_value()?, "type")?,
                    Field::Payload => {
                        // A payload before its type would have to be buffered: leave that
                        // to the general path.
                        let k = kind.ok_or_else(|| de::Error::custom("payload before type"))?;
                        let b = match k {
                            Kind::ChatMessage => EventBody::ChatMessage(map.next_value()?),
                            Kind::SessionStarted => EventBody::SessionStarted(map.next_value()?),
                            Kind::ChunkReceived => EventBody::ChunkReceived(map.next_value()?),
                            Kind::StreamCompleted => EventBody::StreamCompleted(map.next_value()?),
                            Kind::StreamError => EventBody::StreamError(map.next_value()?),
                            Kind::RecoveryAttempt => EventBody::RecoveryAttempt(map.next_value()?),
                            Kind::MessageStatus => EventBody::MessageStatus(map.next_value()?),
                            Kind::Typing => EventBody::Typing(map.next_value()?),
                            Kind::Notification => EventBody::Notification(map.next_value()?),
                            Kind::MembershipChanged => {
                                EventBody::MembershipChanged(map.next_value()?)
                            }
                        };
                        once(&mut body, b, "payload")?;
                    }
                    Field::Other => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(EventEnvelope {
                id: id.ok_or_else(|| de::Error::missing_field("id"))?,
                version: version.ok_or_else(|| de::Error::missing_field("version"))?,
                timestamp: timestamp.ok_or_else(|| de::Error::missing_field("timestamp"))?,
                timestamp_ms: timestamp_ms
                    .ok_or_else(|| de::Error::missing_field("timestamp_ms"))?,
                tenant: tenant.ok_or_else(|| de::Error::missing_field("tenant"))?,
                trace_id: trace_id.ok_or_else(|| de::Error::missing_field("trace_id"))?,
                source_node: source_node.ok_or_else(|| de::Error::missing_field("source_node"))?,
                conversation_id: conversation_id.flatten(),
                session_id: session_id.flatten(),
                user_id: user_id.flatten(),
                message_id: message_id.flatten(),
                replayed: replayed.unwrap_or(false),
                body: body.ok_or_else(|| de::Error::missing_field("payload"))?,
            })
        }
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

    /// The store's group commit builds a message's outbox payload before the seq is known,
    /// with seq = i64::MIN, and writes the seq where `"seq":-9223372036854775808` stands
    /// (`chatstream_store::SEQ_MARK`, whose own test pins it to serde's form of i64::MIN).
    /// That text must stand exactly once, where the seq goes, even when the body spells it.
    #[test]
    fn a_chat_event_built_before_its_seq_takes_it_where_the_mark_stands() {
        const MARK: &str = "\"seq\":-9223372036854775808";
        let body = format!("{{{MARK}}} and {}", i64::MIN);
        let template = envelope(chat(i64::MIN, body.clone())).to_json();
        assert_eq!(template.matches(MARK).count(), 1, "{template}");
        assert_eq!(
            template.replace(MARK, "\"seq\":42"),
            envelope(chat(42, body)).to_json()
        );
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

    /// What the one-pass decode gives, or None where it leaves the input to the general path.
    fn direct(bytes: &[u8]) -> Option<EventEnvelope> {
        serde_json::from_slice::<direct::Direct>(bytes)
            .ok()
            .map(|d| d.0)
    }

    #[test]
    fn the_one_pass_decode_agrees_with_the_general_one() {
        let bodies = [
            chat(3, "héllo \"quoted\" \\ \u{1F600}".into()),
            EventBody::SessionStarted(SessionStarted {
                session_id: "s".into(),
                message_id: "m".into(),
                conversation_id: "c".into(),
                user_id: "u".into(),
                prompt: "p".into(),
                prompt_length: 1,
                planned_chunks: 2,
            }),
            EventBody::ChunkReceived(ChunkReceived {
                session_id: "s".into(),
                message_id: "m".into(),
                chunk_index: 0,
                content_length: 1,
                latency_ms: 1,
            }),
            EventBody::StreamCompleted(StreamCompleted {
                session_id: "s".into(),
                message_id: "m".into(),
                conversation_id: "c".into(),
                total_chunks: 1,
                content_length: 1,
                total_latency_ms: 1,
                words: 1,
                tokens_used: 1,
                response: "r".into(),
            }),
            EventBody::StreamError(StreamError {
                session_id: "s".into(),
                message_id: "m".into(),
                conversation_id: "c".into(),
                error: "e".into(),
                error_code: "E".into(),
                chunk_index: 1,
            }),
            EventBody::RecoveryAttempt(RecoveryAttempt {
                session_id: "s".into(),
                user_id: "u".into(),
                after_index: 1,
                success: true,
                chunks_replayed: 1,
            }),
            EventBody::MessageStatus(MessageStatusChanged {
                message_id: None,
                conversation_id: "c".into(),
                seq: 1,
                user_id: "u".into(),
                status: crate::frames::MessageStatus::Read,
            }),
            EventBody::Typing(TypingChanged {
                conversation_id: "c".into(),
                user_id: "u".into(),
                is_typing: true,
            }),
            EventBody::Notification(Notification {
                id: "n".into(),
                user_id: "u".into(),
                title: "t".into(),
                content: "c".into(),
                kind: "k".into(),
                related_entity_id: "r".into(),
            }),
            EventBody::MembershipChanged(MembershipChanged {
                conversation_id: "c".into(),
                actor_id: "a".into(),
                added: vec!["x".into()],
                removed: vec![],
                created: true,
            }),
        ];
        for body in bodies {
            let mut e = envelope(body);
            for replayed in [false, true] {
                e.replayed = replayed;
                let json = e.to_json();
                assert_eq!(direct(json.as_bytes()).as_ref(), Some(&e), "{json}");
                assert_eq!(
                    EventEnvelope::from_slice_general(json.as_bytes()).unwrap(),
                    e
                );
            }
        }
        // What the one-pass decode leaves to the general path: a payload before its type
        // (sorted keys), duplicates, unknown types. Unknown fields it skips, as the
        // general path does; escaped keys it reads.
        let e = envelope(chat(1, "x".into()));
        let sorted = serde_json::to_value(&e).unwrap().to_string();
        assert!(direct(sorted.as_bytes()).is_none());
        assert_eq!(EventEnvelope::from_slice(sorted.as_bytes()).unwrap(), e);
        let json = e.to_json();
        let dup = json.replacen("{", "{\"tenant\":\"other\",", 1);
        assert!(direct(dup.as_bytes()).is_none());
        let extra = json.replacen("{", "{\"extra\":[1,{\"a\":null}],", 1);
        assert_eq!(direct(extra.as_bytes()).as_ref(), Some(&e));
        assert_eq!(
            EventEnvelope::from_slice_general(extra.as_bytes()).unwrap(),
            e
        );
        let escaped = json.replacen("\"tenant\"", "\"\\u0074enant\"", 1);
        assert_eq!(direct(escaped.as_bytes()).as_ref(), Some(&e));
        let unknown = json.replacen("CHAT_MESSAGE", "SOMETHING_ELSE", 1);
        assert!(direct(unknown.as_bytes()).is_none());
        assert!(EventEnvelope::from_slice(unknown.as_bytes()).is_err());
        let newer = json.replacen("\"version\":1", "\"version\":2", 1);
        assert!(matches!(
            EventEnvelope::from_slice(newer.as_bytes()),
            Err(EventDecodeError::UnknownVersion(2))
        ));
    }

    proptest! {
        #[test]
        fn envelopes_round_trip(seq in any::<i64>(), body in ".{0,60}", replayed in any::<bool>()) {
            let mut e = envelope(chat(seq, body));
            e.replayed = replayed;
            prop_assert_eq!(direct(e.to_json().as_bytes()), Some(e.clone()));
            prop_assert_eq!(EventEnvelope::from_slice_general(e.to_json().as_bytes()).unwrap(), e.clone());
            prop_assert_eq!(EventEnvelope::from_slice(e.to_json().as_bytes()).unwrap(), e);
        }
    }
}
