//! The frames a chat run receives most (`msg`, `ack`, `status`: several per message sent),
//! decoded in one pass into borrowed fields. `ServerFrame::decode` goes through serde's
//! `flatten` and an internally tagged enum, which buffers every frame into an owned tree
//! first and then decodes it again: most of a user's CPU per message went there. This
//! decoder accepts exactly what `ServerFrame::decode` accepts for those three types (same
//! required fields, no others, version 1) and hands anything else, including every
//! malformed frame, to `ServerFrame::decode`, so errors and rarer frames are unchanged.

use chatstream_protocol::frames::{DecodeError, MessageStatus, ServerFrame, Via, PROTOCOL_VERSION};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// A `send` frame from borrowed fields: the text `ClientFrame::Send { .. }.encode()`
/// gives, without copying the body and the ids into a frame first.
#[derive(Serialize)]
struct SendOut<'a> {
    v: u16,
    #[serde(rename = "type")]
    kind: &'static str,
    conversation_id: &'a str,
    client_msg_id: &'a str,
    body: &'a str,
}

/// The text of a `send` frame.
pub fn send_frame(conversation_id: &str, client_msg_id: &str, body: &str) -> String {
    let frame = SendOut {
        v: PROTOCOL_VERSION,
        kind: "send",
        conversation_id,
        client_msg_id,
        body,
    };
    // Serialising plain strings cannot fail; the protocol's encoder is the fallback anyway.
    serde_json::to_string(&frame).unwrap_or_else(|_| {
        chatstream_protocol::frames::ClientFrame::Send {
            conversation_id: conversation_id.to_string(),
            client_msg_id: client_msg_id.to_string(),
            body: body.to_string(),
        }
        .encode()
    })
}

/// A frame from the node, the hot ones borrowed from the text.
#[derive(Debug, PartialEq)]
pub enum Incoming<'a> {
    Ack {
        client_msg_id: Cow<'a, str>,
        message_id: Cow<'a, str>,
        seq: i64,
        duplicate: bool,
    },
    Msg {
        client_msg_id: Cow<'a, str>,
        conversation_id: Cow<'a, str>,
        seq: i64,
        sender_id: Cow<'a, str>,
        body: Cow<'a, str>,
        via: Via,
    },
    /// A DELIVERED or READ status: users record nothing for it.
    Status,
    Other(ServerFrame),
}

/// Every field the three hot frames may carry, each optional; which are required and
/// which allowed depends on the type (checked after the parse).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Flat<'a> {
    v: u16,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    client_msg_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    message_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    conversation_id: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<i64>,
    #[serde(default)]
    status: Option<MessageStatus>,
    #[serde(default)]
    duplicate: Option<bool>,
    #[serde(default)]
    ts_ms: Option<i64>,
    #[serde(default, borrow)]
    sender_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    body: Option<Cow<'a, str>>,
    #[serde(default)]
    created_at_ms: Option<i64>,
    #[serde(default, borrow)]
    trace_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    user_id: Option<Cow<'a, str>>,
    #[serde(default)]
    via: Option<Via>,
}

const CLIENT_MSG_ID: u16 = 1;
const MESSAGE_ID: u16 = 1 << 1;
const CONVERSATION_ID: u16 = 1 << 2;
const SEQ: u16 = 1 << 3;
const STATUS: u16 = 1 << 4;
const DUPLICATE: u16 = 1 << 5;
const TS_MS: u16 = 1 << 6;
const SENDER_ID: u16 = 1 << 7;
const BODY: u16 = 1 << 8;
const CREATED_AT_MS: u16 = 1 << 9;
const TRACE_ID: u16 = 1 << 10;
const USER_ID: u16 = 1 << 11;
const VIA: u16 = 1 << 12;

const ACK_FIELDS: u16 =
    CLIENT_MSG_ID | MESSAGE_ID | CONVERSATION_ID | SEQ | STATUS | DUPLICATE | TS_MS;
const MSG_FIELDS: u16 = MESSAGE_ID
    | CLIENT_MSG_ID
    | CONVERSATION_ID
    | SEQ
    | SENDER_ID
    | BODY
    | CREATED_AT_MS
    | TRACE_ID
    | VIA;
const STATUS_REQUIRED: u16 = CONVERSATION_ID | SEQ | USER_ID | STATUS | TS_MS;
/// `message_id` is optional in a status (DELIVERED has one, READ none).
const STATUS_ALLOWED: u16 = STATUS_REQUIRED | MESSAGE_ID;

impl Flat<'_> {
    /// The fields present (a JSON `null` counts as absent, as it does for the optional
    /// fields of `ServerFrame`; for a required one the slow path then reports it).
    fn present(&self) -> u16 {
        let bits = [
            (self.client_msg_id.is_some(), CLIENT_MSG_ID),
            (self.message_id.is_some(), MESSAGE_ID),
            (self.conversation_id.is_some(), CONVERSATION_ID),
            (self.seq.is_some(), SEQ),
            (self.status.is_some(), STATUS),
            (self.duplicate.is_some(), DUPLICATE),
            (self.ts_ms.is_some(), TS_MS),
            (self.sender_id.is_some(), SENDER_ID),
            (self.body.is_some(), BODY),
            (self.created_at_ms.is_some(), CREATED_AT_MS),
            (self.trace_id.is_some(), TRACE_ID),
            (self.user_id.is_some(), USER_ID),
            (self.via.is_some(), VIA),
        ];
        bits.iter()
            .filter(|(on, _)| *on)
            .fold(0, |acc, (_, bit)| acc | bit)
    }
}

/// Decodes one text frame from the node.
pub fn decode(text: &str) -> Result<Incoming<'_>, DecodeError> {
    if let Some(hot) = decode_hot(text) {
        return Ok(hot);
    }
    ServerFrame::decode(text).map(Incoming::Other)
}

fn decode_hot(text: &str) -> Option<Incoming<'_>> {
    let f: Flat<'_> = serde_json::from_str(text).ok()?;
    if f.v != PROTOCOL_VERSION {
        return None;
    }
    let present = f.present();
    match f.kind.as_ref() {
        "ack" if present == ACK_FIELDS => Some(Incoming::Ack {
            client_msg_id: f.client_msg_id?,
            message_id: f.message_id?,
            seq: f.seq?,
            duplicate: f.duplicate?,
        }),
        "msg" if present == MSG_FIELDS => Some(Incoming::Msg {
            client_msg_id: f.client_msg_id?,
            conversation_id: f.conversation_id?,
            seq: f.seq?,
            sender_id: f.sender_id?,
            body: f.body?,
            via: f.via?,
        }),
        "status"
            if present & STATUS_REQUIRED == STATUS_REQUIRED && present & !STATUS_ALLOWED == 0 =>
        {
            Some(Incoming::Status)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the users take from a frame, by either decoder.
    fn essence(i: Incoming<'_>) -> String {
        match i {
            Incoming::Ack {
                client_msg_id,
                message_id,
                seq,
                duplicate,
            } => format!("ack {client_msg_id} {message_id} {seq} {duplicate}"),
            Incoming::Msg {
                client_msg_id,
                conversation_id,
                seq,
                sender_id,
                body,
                via,
            } => format!("msg {client_msg_id} {conversation_id} {seq} {sender_id} {body} {via:?}"),
            Incoming::Status => "status".into(),
            Incoming::Other(ServerFrame::Ack {
                client_msg_id,
                message_id,
                seq,
                duplicate,
                ..
            }) => format!("ack {client_msg_id} {message_id} {seq} {duplicate}"),
            Incoming::Other(ServerFrame::Msg {
                client_msg_id,
                conversation_id,
                seq,
                sender_id,
                body,
                via,
                ..
            }) => format!("msg {client_msg_id} {conversation_id} {seq} {sender_id} {body} {via:?}"),
            Incoming::Other(ServerFrame::Status { .. }) => "status".into(),
            Incoming::Other(other) => format!("{other:?}"),
        }
    }

    fn slow(text: &str) -> Result<String, DecodeError> {
        ServerFrame::decode(text).map(|f| essence(Incoming::Other(f)))
    }

    fn fast(text: &str) -> Result<String, DecodeError> {
        decode(text).map(essence)
    }

    #[test]
    fn hot_frames_decode_as_the_protocol_does() {
        let frames = [
            ServerFrame::Ack {
                client_msg_id: "3-7".into(),
                message_id: "m\"1\\x".into(),
                conversation_id: "c1".into(),
                seq: 42,
                status: MessageStatus::Sent,
                duplicate: true,
                ts_ms: 5,
            },
            ServerFrame::Msg {
                message_id: "m1".into(),
                client_msg_id: "3-7".into(),
                conversation_id: "t-c\u{e9}1".into(),
                seq: 9,
                sender_id: "t-u3".into(),
                body: "sq1|12|0|line\nquote\" tab\t".into(),
                created_at_ms: 1,
                trace_id: "tr".into(),
                via: Via::Sync,
            },
            ServerFrame::Status {
                conversation_id: "c1".into(),
                message_id: None,
                seq: 3,
                user_id: "u".into(),
                status: MessageStatus::Read,
                ts_ms: 1,
            },
            ServerFrame::Status {
                conversation_id: "c1".into(),
                message_id: Some("m".into()),
                seq: 3,
                user_id: "u".into(),
                status: MessageStatus::Delivered,
                ts_ms: 1,
            },
            ServerFrame::SyncDone {
                conversation_id: "c1".into(),
                last_seq: 4,
                more: false,
            },
            ServerFrame::error(chatstream_protocol::frames::ErrorCode::Unavailable, "x"),
        ];
        for frame in frames {
            let text = frame.encode();
            assert_eq!(fast(&text), slow(&text), "{text}");
            if !matches!(
                frame,
                ServerFrame::SyncDone { .. } | ServerFrame::Error { .. }
            ) {
                assert!(decode_hot(&text).is_some(), "fast path missed {text}");
            }
        }
    }

    #[test]
    fn send_frames_are_the_protocols() {
        for (c, m, b) in [
            ("c1", "3-7", "sq1|1|0|abc"),
            ("t-c\u{e9}", "x\"y", "line\nq\"\\"),
        ] {
            let ours = send_frame(c, m, b);
            let theirs = chatstream_protocol::frames::ClientFrame::Send {
                conversation_id: c.into(),
                client_msg_id: m.into(),
                body: b.into(),
            }
            .encode();
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn anything_else_gets_the_protocols_answer() {
        let cases = [
            r#"{"v":2,"type":"ack","client_msg_id":"a","message_id":"m","conversation_id":"c","seq":1,"status":"SENT","duplicate":false,"ts_ms":1}"#,
            r#"{"v":1,"type":"ack","client_msg_id":"a","message_id":"m","conversation_id":"c","seq":1,"status":"SENT","duplicate":false}"#,
            r#"{"v":1,"type":"ack","client_msg_id":"a","message_id":"m","conversation_id":"c","seq":1,"status":"SENT","duplicate":false,"ts_ms":1,"body":"x"}"#,
            r#"{"v":1,"type":"ack","client_msg_id":"a","message_id":"m","conversation_id":"c","seq":1,"status":"SENT","duplicate":false,"ts_ms":1,"extra":1}"#,
            r#"{"v":1,"type":"msg","client_msg_id":null,"message_id":"m","conversation_id":"c","seq":1,"sender_id":"s","body":"b","created_at_ms":1,"trace_id":"t","via":"live"}"#,
            r#"{"v":1,"type":"status","conversation_id":"c","seq":1,"user_id":"u","status":"READ","ts_ms":1,"message_id":null}"#,
            r#"{"v":1,"type":"status","conversation_id":"c","seq":1,"user_id":"u","status":"READ"}"#,
            r#"{"v":1,"type":"bogus"}"#,
            r#"not json"#,
        ];
        for text in cases {
            assert_eq!(fast(text), slow(text), "{text}");
        }
    }
}
