//! WebSocket frames. Every frame is a JSON object `{"v": 1, "type": "...", ...}`; the node
//! answers each problem with an `error` frame carrying a stable [`ErrorCode`].

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks; frames with another `v` are refused.
pub const PROTOCOL_VERSION: u16 = 1;

/// Frames a client sends to a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// A chat message. `client_msg_id` is the idempotency key: a retry with the same id
    /// gets the same `seq` and is stored once.
    Send {
        conversation_id: String,
        client_msg_id: String,
        body: String,
    },
    /// Typing indicator (ephemeral, never stored).
    Typing {
        conversation_id: String,
        is_typing: bool,
    },
    /// Everything up to `up_to_seq` in the conversation has been read.
    Read {
        conversation_id: String,
        up_to_seq: i64,
    },
    /// Starts an AI stream session in the conversation.
    Stream {
        conversation_id: String,
        prompt: String,
    },
    /// Resumes a stream after `after_index` (the last chunk index received; -1 for none).
    Resume {
        session_id: String,
        after_index: i64,
    },
    /// Asks for the conversation's messages after `after_seq`.
    Sync {
        conversation_id: String,
        after_seq: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<u64>,
    },
}

/// The versioned wrapper of every frame on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Versioned<F> {
    pub v: u16,
    #[serde(flatten)]
    pub frame: F,
}

/// Message status as the sender sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MessageStatus {
    Sent,
    Delivered,
    Read,
}

/// How a `msg` frame reached the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// Real-time fan-out.
    Live,
    /// Answer to a `sync`.
    Sync,
}

/// How a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamOutcome {
    Completed,
    Failed,
}

/// Stable error codes: clients and checkers match on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or JSON that is not a frame of a known type with the right fields.
    MalformedFrame,
    /// A well-formed frame whose `type` this node does not know.
    UnknownType,
    /// `v` is missing or not [`PROTOCOL_VERSION`].
    UnsupportedVersion,
    /// The frame exceeds the node's size limit.
    FrameTooLarge,
    /// Bad, expired or missing token (the connection is closed after it).
    Unauthorized,
    /// The user is not a member of the conversation.
    NotMember,
    /// Too many frames; `retry_after_ms` says when to try again.
    RateLimited,
    /// A field has an invalid value (empty body, negative seq, ...).
    InvalidArgument,
    /// No such stream session (or its chunks expired).
    NotFound,
    /// A backend (PostgreSQL, Redis, Kafka) is unreachable; nothing was accepted.
    Unavailable,
    /// The node is draining for shutdown; reconnect to another node.
    ShuttingDown,
    Internal,
}

/// Frames a node sends to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerFrame {
    /// First frame on every connection.
    Hello {
        node_id: String,
        user_id: String,
        tenant: String,
        max_frame_bytes: usize,
        server_time_ms: i64,
    },
    /// The message is stored: `status` is always SENT. `duplicate` is true for a retried send.
    Ack {
        client_msg_id: String,
        message_id: String,
        conversation_id: String,
        seq: i64,
        status: MessageStatus,
        duplicate: bool,
        ts_ms: i64,
    },
    Msg {
        message_id: String,
        client_msg_id: String,
        conversation_id: String,
        seq: i64,
        sender_id: String,
        body: String,
        created_at_ms: i64,
        trace_id: String,
        via: Via,
    },
    /// End of a `sync` answer: `last_seq` is the newest seq sent, `more` whether to ask again.
    SyncDone {
        conversation_id: String,
        last_seq: i64,
        more: bool,
    },
    /// DELIVERED (to `user_id`, for one message) or READ (by `user_id`, up to `seq`).
    Status {
        conversation_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_id: Option<String>,
        seq: i64,
        user_id: String,
        status: MessageStatus,
        ts_ms: i64,
    },
    Typing {
        conversation_id: String,
        user_id: String,
        is_typing: bool,
        ts_ms: i64,
    },
    /// A stream session began (answer to `stream`, or to `POST /api/chat`).
    StreamStarted {
        session_id: String,
        conversation_id: String,
        message_id: String,
    },
    Chunk {
        session_id: String,
        index: i64,
        text: String,
        ts_ms: i64,
    },
    StreamEnd {
        session_id: String,
        outcome: StreamOutcome,
        total_chunks: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<u64>,
        ts_ms: i64,
    },
    Error {
        code: ErrorCode,
        message: String,
        /// The `client_msg_id` (or session id) of the frame this answers, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ref_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

impl ServerFrame {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            code,
            message: message.into(),
            ref_id: None,
            retry_after_ms: None,
        }
    }

    /// The JSON text of this frame with the protocol version.
    pub fn encode(&self) -> String {
        encode(self)
    }

    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        decode(text, SERVER_TYPES)
    }
}

impl ClientFrame {
    pub fn encode(&self) -> String {
        encode(self)
    }

    /// What an error answering this frame names in `ref_id`, so the client can tell which
    /// request failed: a send's `client_msg_id`, a resume's session id.
    pub fn ref_id(&self) -> Option<&str> {
        match self {
            ClientFrame::Send { client_msg_id, .. } => Some(client_msg_id),
            ClientFrame::Resume { session_id, .. } => Some(session_id),
            _ => None,
        }
    }

    /// The first text field holding a NUL character, if any. Nodes refuse such frames
    /// with `invalid_argument`: PostgreSQL TEXT and JSONB (the store, the audit trail)
    /// cannot hold NUL, so accepting one would fail later, downstream, or not at all.
    pub fn nul_field(&self) -> Option<&'static str> {
        let fields: Vec<(&'static str, &str)> = match self {
            ClientFrame::Send {
                conversation_id,
                client_msg_id,
                body,
            } => vec![
                ("conversation_id", conversation_id.as_str()),
                ("client_msg_id", client_msg_id.as_str()),
                ("body", body.as_str()),
            ],
            ClientFrame::Typing {
                conversation_id, ..
            }
            | ClientFrame::Read {
                conversation_id, ..
            }
            | ClientFrame::Sync {
                conversation_id, ..
            } => vec![("conversation_id", conversation_id.as_str())],
            ClientFrame::Stream {
                conversation_id,
                prompt,
            } => vec![
                ("conversation_id", conversation_id.as_str()),
                ("prompt", prompt.as_str()),
            ],
            ClientFrame::Resume { session_id, .. } => vec![("session_id", session_id.as_str())],
            ClientFrame::Ping { .. } => Vec::new(),
        };
        fields
            .iter()
            .find(|(_, text)| has_nul(text))
            .map(|(name, _)| *name)
    }

    /// Parses a client frame, telling malformed JSON, a wrong version and an unknown type
    /// apart so the node can answer each with its own code.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        decode(text, CLIENT_TYPES)
    }
}

/// Whether `text` holds a NUL character (which PostgreSQL TEXT and JSONB refuse).
pub fn has_nul(text: &str) -> bool {
    text.contains('\0')
}

const CLIENT_TYPES: &[&str] = &["send", "typing", "read", "stream", "resume", "sync", "ping"];
const SERVER_TYPES: &[&str] = &[
    "hello",
    "ack",
    "msg",
    "sync_done",
    "status",
    "typing",
    "stream_started",
    "chunk",
    "stream_end",
    "pong",
    "error",
];

fn encode<F: Serialize>(frame: &F) -> String {
    let versioned = Versioned {
        v: PROTOCOL_VERSION,
        frame,
    };
    // Serialising these plain structs cannot fail (no maps with non-string keys).
    serde_json::to_string(&versioned).unwrap_or_else(|e| {
        format!(
            r#"{{"v":{PROTOCOL_VERSION},"type":"error","code":"internal","message":"encode: {e}"}}"#
        )
    })
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a JSON object: {0}")]
    NotJson(String),
    #[error("protocol version {found:?} is not supported; this node speaks v={PROTOCOL_VERSION}")]
    Version { found: Option<i64> },
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    #[error("invalid {kind} frame: {message}")]
    Invalid { kind: String, message: String },
}

impl DecodeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::NotJson(_) | DecodeError::Invalid { .. } => ErrorCode::MalformedFrame,
            DecodeError::Version { .. } => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownType(_) => ErrorCode::UnknownType,
        }
    }
}

fn decode<F: serde::de::DeserializeOwned>(text: &str, known: &[&str]) -> Result<F, DecodeError> {
    // Fast path: one parse for the frames that are right.
    if let Ok(v) = serde_json::from_str::<Versioned<F>>(text) {
        if v.v == PROTOCOL_VERSION {
            return Ok(v.frame);
        }
        return Err(DecodeError::Version {
            found: Some(i64::from(v.v)),
        });
    }
    // Slow path: find out what is wrong, to answer with the right code.
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let obj = value
        .as_object()
        .ok_or_else(|| DecodeError::NotJson(format!("expected an object, got {value}")))?;
    match obj.get("v").and_then(|v| v.as_i64()) {
        Some(v) if v == i64::from(PROTOCOL_VERSION) => {}
        found => return Err(DecodeError::Version { found }),
    }
    let kind = match obj.get("type").and_then(|t| t.as_str()) {
        Some(k) => k.to_string(),
        None => {
            return Err(DecodeError::Invalid {
                kind: "untyped".into(),
                message: "missing string field \"type\"".into(),
            })
        }
    };
    if !known.contains(&kind.as_str()) {
        return Err(DecodeError::UnknownType(kind));
    }
    let mut fields = obj.clone();
    fields.remove("v");
    match serde_json::from_value::<F>(serde_json::Value::Object(fields)) {
        Ok(frame) => Ok(frame),
        Err(e) => Err(DecodeError::Invalid {
            kind,
            message: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn send_frame_wire_form() {
        let f = ClientFrame::Send {
            conversation_id: "c1".into(),
            client_msg_id: "m1".into(),
            body: "hi".into(),
        };
        assert_eq!(
            f.encode(),
            r#"{"v":1,"type":"send","conversation_id":"c1","client_msg_id":"m1","body":"hi"}"#
        );
        assert_eq!(ClientFrame::decode(&f.encode()), Ok(f));
    }

    #[test]
    fn decode_errors_are_classified() {
        assert_eq!(
            ClientFrame::decode("{nope").unwrap_err().code(),
            ErrorCode::MalformedFrame
        );
        assert_eq!(
            ClientFrame::decode("[1,2]").unwrap_err().code(),
            ErrorCode::MalformedFrame
        );
        assert_eq!(
            ClientFrame::decode(r#"{"v":1,"type":"dance"}"#).unwrap_err(),
            DecodeError::UnknownType("dance".into())
        );
        assert_eq!(
            ClientFrame::decode(r#"{"v":2,"type":"ping"}"#)
                .unwrap_err()
                .code(),
            ErrorCode::UnsupportedVersion
        );
        assert_eq!(
            ClientFrame::decode(r#"{"type":"ping"}"#)
                .unwrap_err()
                .code(),
            ErrorCode::UnsupportedVersion
        );
        let missing =
            ClientFrame::decode(r#"{"v":1,"type":"send","conversation_id":"c"}"#).unwrap_err();
        assert_eq!(missing.code(), ErrorCode::MalformedFrame);
        assert!(missing.to_string().contains("client_msg_id"), "{missing}");
        let extra = ClientFrame::decode(r#"{"v":1,"type":"ping","bogus":1}"#).unwrap_err();
        assert_eq!(extra.code(), ErrorCode::MalformedFrame);
    }

    #[test]
    fn nul_characters_are_found_in_every_text_field() {
        let send = ClientFrame::decode(
            r#"{"v":1,"type":"send","conversation_id":"c","client_msg_id":"m","body":"a\u0000b"}"#,
        )
        .unwrap();
        assert_eq!(send.nul_field(), Some("body"));
        let stream = ClientFrame::Stream {
            conversation_id: "c".into(),
            prompt: "\0".into(),
        };
        assert_eq!(stream.nul_field(), Some("prompt"));
        let resume = ClientFrame::Resume {
            session_id: "s\0".into(),
            after_index: -1,
        };
        assert_eq!(resume.nul_field(), Some("session_id"));
        let clean = ClientFrame::Read {
            conversation_id: "c".into(),
            up_to_seq: 1,
        };
        assert_eq!(clean.nul_field(), None);
        assert!(!has_nul("naïve ✓") && has_nul("x\u{0}"));
    }

    #[test]
    fn error_frame_wire_form() {
        let f = ServerFrame::Error {
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            ref_id: None,
            retry_after_ms: Some(250),
        };
        assert_eq!(
            f.encode(),
            r#"{"v":1,"type":"error","code":"rate_limited","message":"slow down","retry_after_ms":250}"#
        );
    }

    fn text() -> impl Strategy<Value = String> {
        // Any unicode, including quotes, escapes and emoji.
        ".{0,40}"
    }

    fn client_frame() -> impl Strategy<Value = ClientFrame> {
        prop_oneof![
            (text(), text(), text()).prop_map(|(c, m, b)| ClientFrame::Send {
                conversation_id: c,
                client_msg_id: m,
                body: b
            }),
            (text(), any::<bool>()).prop_map(|(c, t)| ClientFrame::Typing {
                conversation_id: c,
                is_typing: t
            }),
            (text(), any::<i64>()).prop_map(|(c, s)| ClientFrame::Read {
                conversation_id: c,
                up_to_seq: s
            }),
            (text(), text()).prop_map(|(c, p)| ClientFrame::Stream {
                conversation_id: c,
                prompt: p
            }),
            (text(), any::<i64>()).prop_map(|(s, i)| ClientFrame::Resume {
                session_id: s,
                after_index: i
            }),
            (text(), any::<i64>(), proptest::option::of(any::<u32>())).prop_map(|(c, s, l)| {
                ClientFrame::Sync {
                    conversation_id: c,
                    after_seq: s,
                    limit: l,
                }
            }),
            proptest::option::of(any::<u64>()).prop_map(|n| ClientFrame::Ping { nonce: n }),
        ]
    }

    fn server_frame() -> impl Strategy<Value = ServerFrame> {
        prop_oneof![
            (
                text(),
                text(),
                text(),
                any::<i64>(),
                any::<bool>(),
                any::<i64>()
            )
                .prop_map(|(c, m, conv, seq, d, ts)| ServerFrame::Ack {
                    client_msg_id: c,
                    message_id: m,
                    conversation_id: conv,
                    seq,
                    status: MessageStatus::Sent,
                    duplicate: d,
                    ts_ms: ts
                }),
            (
                text(),
                text(),
                text(),
                any::<i64>(),
                text(),
                text(),
                any::<bool>()
            )
                .prop_map(|(m, c, conv, seq, s, b, live)| ServerFrame::Msg {
                    message_id: m,
                    client_msg_id: c,
                    conversation_id: conv,
                    seq,
                    sender_id: s,
                    body: b,
                    created_at_ms: seq,
                    trace_id: "t".into(),
                    via: if live { Via::Live } else { Via::Sync },
                }),
            (text(), any::<i64>(), text()).prop_map(|(s, i, t)| ServerFrame::Chunk {
                session_id: s,
                index: i,
                text: t,
                ts_ms: 1
            }),
            (text(), proptest::option::of(text()), any::<i64>()).prop_map(|(c, m, seq)| {
                ServerFrame::Status {
                    conversation_id: c,
                    message_id: m,
                    seq,
                    user_id: "u".into(),
                    status: MessageStatus::Delivered,
                    ts_ms: 0,
                }
            }),
            (
                text(),
                proptest::option::of(text()),
                proptest::option::of(any::<u64>())
            )
                .prop_map(|(m, r, a)| ServerFrame::Error {
                    code: ErrorCode::NotMember,
                    message: m,
                    ref_id: r,
                    retry_after_ms: a
                }),
        ]
    }

    proptest! {
        #[test]
        fn client_frames_round_trip(f in client_frame()) {
            prop_assert_eq!(ClientFrame::decode(&f.encode()), Ok(f));
        }

        #[test]
        fn server_frames_round_trip(f in server_frame()) {
            prop_assert_eq!(ServerFrame::decode(&f.encode()), Ok(f));
        }

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,200}") {
            let _ = ClientFrame::decode(&s);
        }
    }
}
