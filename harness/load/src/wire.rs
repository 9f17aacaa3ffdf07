//! The frames a chat run receives most (`msg`, `ack`, `status`: several per message sent),
//! decoded in one pass into borrowed fields. `ServerFrame::decode` goes through serde's
//! `flatten` and an internally tagged enum, which buffers every frame into an owned tree
//! first and then decodes it again: most of a user's CPU per message went there. This
//! decoder accepts exactly what `ServerFrame::decode` accepts for those three types (same
//! required fields, no others, version 1) and hands anything else, including every
//! malformed frame, to `ServerFrame::decode`, so errors and rarer frames are unchanged.
//! The hot frames are read by a hand-written scan first ([`scan`]), which takes a strict
//! subset of what serde's borrowed decode ([`decode_hot`]) takes, with the same result
//! (the tests compare them); whatever it leaves goes to serde.

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

/// The text of a `send` frame: written directly when no field needs an escape (squall's
/// own ids and bodies never do), byte for byte as serde writes it (the tests compare);
/// otherwise by serde. Serde's string escaping and formatting were a visible share of a
/// send's cost.
pub fn send_frame(conversation_id: &str, client_msg_id: &str, body: &str) -> String {
    let plain = |s: &str| !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20);
    if plain(conversation_id) && plain(client_msg_id) && plain(body) {
        let mut out =
            String::with_capacity(64 + conversation_id.len() + client_msg_id.len() + body.len());
        out.push_str("{\"v\":");
        out.push_str(itoa::Buffer::new().format(PROTOCOL_VERSION));
        out.push_str(",\"type\":\"send\",\"conversation_id\":\"");
        out.push_str(conversation_id);
        out.push_str("\",\"client_msg_id\":\"");
        out.push_str(client_msg_id);
        out.push_str("\",\"body\":\"");
        out.push_str(body);
        out.push_str("\"}");
        return out;
    }
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
        ts_ms: i64,
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
#[cfg_attr(test, derive(Debug, PartialEq))]
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
    if let Some(hot) = scan(text).and_then(hot) {
        return Ok(hot);
    }
    if let Some(hot) = decode_hot(text) {
        return Ok(hot);
    }
    ServerFrame::decode(text).map(Incoming::Other)
}

/// The serde decoder of the hot frames: the reference the scanner is tested against, and
/// the path of whatever the scanner leaves (escaped strings, fractions, duplicate keys).
fn decode_hot(text: &str) -> Option<Incoming<'_>> {
    serde_json::from_str::<Flat<'_>>(text).ok().and_then(hot)
}

/// The hot frame `f` holds, if its type's fields are exactly there.
fn hot(f: Flat<'_>) -> Option<Incoming<'_>> {
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
            ts_ms: f.ts_ms?,
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

/// A hand-written scan of a flat JSON object into [`Flat`], for the frames the node sends
/// most. It accepts a strict subset of what serde accepts into `Flat`, and gives the same
/// fields for it: strings without escapes or control characters (borrowed), integers
/// without sign quirks, fractions or exponents, `true`/`false`/`null`, each known key at
/// most once; anything else is `None` and goes to the serde path. Serde's borrowed decode
/// was still a tenth of squall's CPU in a chat load (its field-name matching, `Option`
/// and `Cow` visitors, per frame several times a message).
fn scan(text: &str) -> Option<Flat<'_>> {
    let mut s = Scanner {
        text,
        bytes: text.as_bytes(),
        at: 0,
    };
    let mut v: Option<u16> = None;
    let mut kind: Option<&str> = None;
    let mut f = Flat {
        v: 0,
        kind: Cow::Borrowed(""),
        client_msg_id: None,
        message_id: None,
        conversation_id: None,
        seq: None,
        status: None,
        duplicate: None,
        ts_ms: None,
        sender_id: None,
        body: None,
        created_at_ms: None,
        trace_id: None,
        user_id: None,
        via: None,
    };
    // Keys seen (serde refuses a duplicate field): the field bits, and two for v and type.
    const V: u16 = 1 << 13;
    const TYPE: u16 = 1 << 14;
    let mut seen = 0u16;
    s.space();
    s.eat(b'{')?;
    loop {
        s.space();
        let key = s.string()?;
        s.space();
        s.eat(b':')?;
        s.space();
        let bit = match key {
            "v" => {
                v = Some(u16::try_from(s.int()?).ok()?);
                V
            }
            "type" => {
                kind = Some(s.string()?);
                TYPE
            }
            "client_msg_id" => {
                f.client_msg_id = s.nullable(Scanner::string)?.map(Cow::Borrowed);
                CLIENT_MSG_ID
            }
            "message_id" => {
                f.message_id = s.nullable(Scanner::string)?.map(Cow::Borrowed);
                MESSAGE_ID
            }
            "conversation_id" => {
                f.conversation_id = s.nullable(Scanner::string)?.map(Cow::Borrowed);
                CONVERSATION_ID
            }
            "seq" => {
                f.seq = s.nullable(Scanner::int)?;
                SEQ
            }
            "status" => {
                f.status = match s.nullable(Scanner::string)? {
                    None => None,
                    Some("SENT") => Some(MessageStatus::Sent),
                    Some("DELIVERED") => Some(MessageStatus::Delivered),
                    Some("READ") => Some(MessageStatus::Read),
                    Some(_) => return None,
                };
                STATUS
            }
            "duplicate" => {
                f.duplicate = s.nullable(Scanner::boolean)?;
                DUPLICATE
            }
            "ts_ms" => {
                f.ts_ms = s.nullable(Scanner::int)?;
                TS_MS
            }
            "sender_id" => {
                f.sender_id = s.nullable(Scanner::string)?.map(Cow::Borrowed);
                SENDER_ID
            }
            "body" => {
                f.body = s.nullable(Scanner::string)?.map(Cow::Borrowed);
                BODY
            }
            "created_at_ms" => {
                f.created_at_ms = s.nullable(Scanner::int)?;
                CREATED_AT_MS
            }
            "trace_id" => {
                f.trace_id = s.nullable(Scanner::string)?.map(Cow::Borrowed);
                TRACE_ID
            }
            "user_id" => {
                f.user_id = s.nullable(Scanner::string)?.map(Cow::Borrowed);
                USER_ID
            }
            "via" => {
                f.via = match s.nullable(Scanner::string)? {
                    None => None,
                    Some("live") => Some(Via::Live),
                    Some("sync") => Some(Via::Sync),
                    Some(_) => return None,
                };
                VIA
            }
            _ => return None,
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        s.space();
        match s.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    s.space();
    if s.at != s.bytes.len() {
        return None;
    }
    f.v = v?;
    f.kind = Cow::Borrowed(kind?);
    Some(f)
}

/// Whether any of the eight bytes of `w` is a quote, a backslash or a control character
/// (below 0x20), the bytes that end a plain string for [`Scanner::string`]. The classic
/// word-at-a-time tests: `(x - 0x01..01) & !x & 0x80..80` is non-zero exactly when a byte
/// of `x` is zero (applied to `w` xor the byte sought), and with `0x20..20` for `0x01..01`
/// exactly when a byte of `x` is below 0x20.
fn ends_plain_run(w: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let quote = zero_byte(w ^ (ONES * u64::from(b'"')));
    let backslash = zero_byte(w ^ (ONES * u64::from(b'\\')));
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    (quote | backslash | control) != 0
}

/// A cursor over a frame's text for [`scan`]; every method is `None` on anything it does
/// not take (the frame then goes to serde).
struct Scanner<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scanner<'a> {
    fn next(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn eat(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    fn space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    /// A string without escapes or control characters, borrowed.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        // Eight bytes at a time up to the word holding the end (or an escape): a byte at
        // a time, this scan was the costliest function of squall's own in a chat load (a
        // 200-byte body per `msg` frame, several frames per message). The byte loop below
        // decides, from the first word that may end the string.
        while let Some(word) = self.bytes.get(self.at..self.at + 8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            if ends_plain_run(u64::from_le_bytes(w)) {
                break;
            }
            self.at += 8;
        }
        loop {
            match self.next()? {
                b'"' => break,
                b'\\' => return None,
                b if b < 0x20 => return None,
                _ => {}
            }
        }
        // Both ends are ASCII quotes, so char boundaries of the (valid UTF-8) text.
        self.text.get(start..self.at - 1)
    }

    /// An integer: digits, an optional leading minus, no leading zero, no fraction or
    /// exponent, within i64.
    fn int(&mut self) -> Option<i64> {
        let negative = self.bytes.get(self.at) == Some(&b'-');
        if negative {
            self.at += 1;
        }
        let start = self.at;
        let mut value: i64 = 0;
        while let Some(&b) = self.bytes.get(self.at) {
            if !b.is_ascii_digit() {
                break;
            }
            value = value.checked_mul(10)?.checked_add(i64::from(b - b'0'))?;
            self.at += 1;
        }
        let digits = self.at - start;
        if digits == 0 || (self.bytes[start] == b'0' && (digits > 1 || negative)) {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.bytes.get(self.at) {
            return None;
        }
        Some(if negative { -value } else { value })
    }

    fn boolean(&mut self) -> Option<bool> {
        let rest = &self.bytes[self.at..];
        if rest.starts_with(b"true") {
            self.at += 4;
            Some(true)
        } else if rest.starts_with(b"false") {
            self.at += 5;
            Some(false)
        } else {
            None
        }
    }

    /// `null` (as serde reads it into an `Option`: absent) or a value.
    fn nullable<T>(&mut self, value: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.bytes[self.at..].starts_with(b"null") {
            self.at += 4;
            return Some(None);
        }
        value(self).map(Some)
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
                ts_ms,
            } => format!("ack {client_msg_id} {message_id} {seq} {duplicate} {ts_ms}"),
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
                ts_ms,
                ..
            }) => format!("ack {client_msg_id} {message_id} {seq} {duplicate} {ts_ms}"),
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

    /// Whatever the scanner takes, serde's borrowed decode takes too, with the same fields.
    fn scan_agrees(text: &str) {
        if let Some(ours) = scan(text) {
            let theirs: Flat<'_> = serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("the scanner took what serde refuses ({e}): {text}"));
            assert_eq!(ours, theirs, "{text}");
        }
    }

    fn hot_texts() -> Vec<String> {
        vec![
            ServerFrame::Ack {
                client_msg_id: "3-7".into(),
                message_id: "0193a0b1-7c2e-7d3f-9a1b-2c3d4e5f6a7b".into(),
                conversation_id: "t-c12".into(),
                seq: 42,
                status: MessageStatus::Sent,
                duplicate: false,
                ts_ms: 1_764_000_000_000,
            }
            .encode(),
            ServerFrame::Msg {
                message_id: "m1".into(),
                client_msg_id: "3-7".into(),
                conversation_id: "t-c1".into(),
                seq: 9,
                sender_id: "t-u3".into(),
                body: "sq1|12|0|squall measures".into(),
                created_at_ms: 1,
                trace_id: "tr".into(),
                via: Via::Live,
            }
            .encode(),
            ServerFrame::Status {
                conversation_id: "c1".into(),
                message_id: Some("m".into()),
                seq: 3,
                user_id: "u".into(),
                status: MessageStatus::Delivered,
                ts_ms: 1,
            }
            .encode(),
            r#" { "v" : 1 , "type":"status","conversation_id":"c","seq":-1,"user_id":"u","status":"READ","ts_ms":0,"message_id":null}"#.into(),
            r#"{"v":1,"type":"ack","client_msg_id":"a","message_id":"m","conversation_id":"c","seq":9223372036854775807,"status":"SENT","duplicate":true,"ts_ms":-9223372036854775807}"#.into(),
        ]
    }

    #[test]
    fn the_scanner_reads_the_hot_frames_as_serde_does() {
        for text in hot_texts() {
            let ours = scan(&text).unwrap_or_else(|| panic!("the scanner missed {text}"));
            assert_eq!(
                Some(ours),
                serde_json::from_str::<Flat<'_>>(&text).ok(),
                "{text}"
            );
            assert_eq!(fast(&text), slow(&text), "{text}");
        }
    }

    /// Every one-byte change of the hot frames (deleted, doubled, replaced by a byte
    /// that matters to JSON): the scanner agrees with serde wherever it answers, and the
    /// whole decoder still gives the protocol's answer.
    #[test]
    fn the_scanner_agrees_with_serde_on_damaged_frames() {
        let bytes: &[u8] = b"\"\\,:{}[]0123-+.eEtrufalsn \n\t\x01x";
        let mut took = 0;
        for text in hot_texts() {
            let t = text.as_bytes();
            for i in 0..t.len() {
                let mut variants = vec![
                    [&t[..i], &t[i + 1..]].concat(),
                    [&t[..=i], &t[i..]].concat(),
                ];
                for &b in bytes {
                    let mut v = t.to_vec();
                    v[i] = b;
                    variants.push(v);
                }
                for v in variants {
                    let Ok(v) = String::from_utf8(v) else {
                        continue;
                    };
                    scan_agrees(&v);
                    took += usize::from(scan(&v).is_some());
                    assert_eq!(fast(&v), slow(&v), "{v}");
                }
            }
        }
        assert!(
            took > 100,
            "the damaged frames that still parse were scanned: {took}"
        );
        for text in [
            r#"{"v":1,"type":"ack","v":1}"#,
            r#"{"v":1.0,"type":"status","conversation_id":"c","seq":1,"user_id":"u","status":"READ","ts_ms":1}"#,
            r#"{"v":1,"type":"status","conversation_id":"c","seq":01,"user_id":"u","status":"READ","ts_ms":1}"#,
            r#"{"v":1,"type":"status","conversation_id":"c","seq":-0,"user_id":"u","status":"READ","ts_ms":1}"#,
            r#"{"v":1,"type":"status","conversation_id":"c\u0041","seq":1,"user_id":"u","status":"READ","ts_ms":1}"#,
            r#"{"v":1,"type":"status","conversation_id":"c","seq":99999999999999999999,"user_id":"u","status":"READ","ts_ms":1}"#,
            r#"{"v":1,"type":"status","conversation_id":"c","seq":1,"user_id":"u","status":"READ","ts_ms":1} x"#,
            r#"{}"#,
            r#"{"v":1,"type":"msg"}"#,
        ] {
            scan_agrees(text);
            assert_eq!(fast(text), slow(text), "{text}");
        }
    }

    #[test]
    fn the_word_test_finds_exactly_the_bytes_that_end_a_plain_run() {
        let ends = |b: u8| b == b'"' || b == b'\\' || b < 0x20;
        // Every byte value at every position of a word of otherwise plain bytes, and
        // beside another special byte.
        for fill in [b'a', 0xff, 0x20, 0x7f, b'#', b']'] {
            for pos in 0..8 {
                for b in 0..=255u8 {
                    let mut w = [fill; 8];
                    w[pos] = b;
                    assert_eq!(ends_plain_run(u64::from_le_bytes(w)), ends(b), "{w:?}");
                    w[(pos + 3) % 8] = b'"';
                    assert!(ends_plain_run(u64::from_le_bytes(w)), "{w:?}");
                }
            }
        }
        // Strings of every length around the word size, ending at every offset.
        for len in 0..40 {
            let body = "x".repeat(len);
            for end in ["\"", "\\n\"", "\u{1}\""] {
                let text = format!("\"{body}{end}");
                let mut s = Scanner {
                    text: &text,
                    bytes: text.as_bytes(),
                    at: 0,
                };
                let got = s.string();
                if end == "\"" {
                    assert_eq!(got, Some(body.as_str()), "{text:?}");
                    assert_eq!(s.at, text.len());
                } else {
                    assert_eq!(got, None, "{text:?}");
                }
            }
        }
    }

    #[test]
    fn send_frames_are_the_protocols() {
        for (c, m, b) in [
            ("c1", "3-7", "sq1|1|0|abc"),
            ("t-c\u{e9}", "x\"y", "line\nq\"\\"),
            ("t-c\u{e9}", "3-7", "\u{7f}\u{2028}<>&'/"),
            ("c", "m", "tab\there"),
            ("c", "back\\slash", "b"),
            ("", "", ""),
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
