//! Message bodies carry what a recipient needs to measure delivery without asking anyone:
//! the intended send time (µs on the run's clock, shared by every user of this process)
//! and the sender's node, then filler up to the planned size.

const MAGIC: &str = "sq1";
const FILLER: &[u8] = b"squall measures chat delivery under load and faults ";

/// What a recipient reads back from a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyStamp {
    pub due_us: u64,
    /// The sender's node when it sent (0-based).
    pub sender_node: u16,
}

/// A body of `size` bytes (or just the stamp when it is longer).
pub fn encode(stamp: BodyStamp, size: usize) -> String {
    let mut out = format!("{MAGIC}|{}|{}|", stamp.due_us, stamp.sender_node);
    let mut i = 0;
    while out.len() < size {
        out.push(FILLER[i % FILLER.len()] as char);
        i += 1;
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
        }
        assert_eq!(decode("hello|1|2|"), None);
        assert_eq!(decode("sq1|x|2|"), None);
    }
}
