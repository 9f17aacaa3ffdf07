//! Message bodies carry what a recipient needs to measure delivery without asking anyone:
//! the intended send time (µs on the run's clock, shared by every user of this process)
//! and the sender's node, then filler up to the planned size.

const MAGIC: &str = "sq1";
/// ASCII, so any prefix of it is a whole string.
const FILLER: &str = "squall measures chat delivery under load and faults ";

/// What a recipient reads back from a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyStamp {
    pub due_us: u64,
    /// The sender's node when it sent (0-based).
    pub sender_node: u16,
}

/// A body of `size` bytes (or just the stamp when it is longer). One allocation, of the
/// final size, and the filler copied a piece at a time (a body per message sent).
pub fn encode(stamp: BodyStamp, size: usize) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(size.max(32));
    let _ = write!(out, "{MAGIC}|{}|{}|", stamp.due_us, stamp.sender_node);
    while out.len() < size {
        let take = (size - out.len()).min(FILLER.len());
        out.push_str(&FILLER[..take]);
    }
    out
}

/// The stamp of a body this harness wrote, or None for any other body.
pub fn decode(body: &str) -> Option<BodyStamp> {
    let mut parts = body.splitn(4, '|');
    if parts.next()? != MAGIC {
        return None;
    }
    let due_us = parts.next()?.parse().ok()?;
    let sender_node = parts.next()?.parse().ok()?;
    Some(BodyStamp {
        due_us,
        sender_node,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_survive_and_sizes_hold() {
        let s = BodyStamp {
            due_us: 123_456_789,
            sender_node: 2,
        };
        for size in [1, 20, 200, 4096] {
            let b = encode(s, size);
            assert_eq!(decode(&b), Some(s));
            assert_eq!(b.len(), size.max("sq1|123456789|2|".len()));
            // The filler cycles from its start, as it always has.
            let filler: String = FILLER.chars().cycle().take(b.len() - 16).collect();
            assert_eq!(&b[16..], filler);
        }
        assert_eq!(decode("hello|1|2|"), None);
        assert_eq!(decode("sq1|x|2|"), None);
    }
}
