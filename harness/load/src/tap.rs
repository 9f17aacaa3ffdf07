//! A tap on acknowledged sends, for probes that follow a message past the user path
//! (for example into the audit table). A probe asks for one sample; the next user to
//! get a fresh ack hands it over. Asking costs the users one atomic load per ack and
//! nothing else, and the probe, not the traffic, sets the sampling rate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;
use tokio::sync::mpsc;

/// One acknowledged message, as its sender saw the ack.
#[derive(Debug, Clone)]
pub struct AckSample {
    pub conversation_id: String,
    pub message_id: String,
    /// When the ack arrived: the message and its event are durable from here on.
    pub acked: Instant,
    /// Where the message's events carry their time, on the node's clock (ms since the
    /// epoch): from the ack's `ts_ms` less the time from the send's last write to its ack
    /// (the node cannot have made the events before it read the send), to the ack's
    /// `ts_ms`, each widened by a second for the clocks' granularity.
    pub event_ts_ms: std::ops::RangeInclusive<i64>,
    /// Whether the message's send was due inside the measured window.
    pub in_window: bool,
}

#[derive(Default)]
pub struct AckTap {
    wanted: AtomicBool,
    tx: OnceLock<mpsc::Sender<AckSample>>,
}

impl AckTap {
    /// Connects the one probe this tap serves; `None` when one is connected already.
    pub fn subscribe(&self, capacity: usize) -> Option<mpsc::Receiver<AckSample>> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.tx.set(tx).ok().map(|()| rx)
    }

    /// Asks for the next fresh ack.
    pub fn want_one(&self) {
        self.wanted.store(true, Ordering::Relaxed);
    }

    /// Called by users on every fresh (non-duplicate) ack; builds the sample only when
    /// one was asked for.
    pub fn offer(&self, sample: impl FnOnce() -> AckSample) {
        if !self.wanted.load(Ordering::Relaxed) || !self.wanted.swap(false, Ordering::AcqRel) {
            return;
        }
        if let Some(tx) = self.tx.get() {
            let _ = tx.try_send(sample());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: &str) -> AckSample {
        AckSample {
            conversation_id: "c".into(),
            message_id: id.into(),
            acked: Instant::now(),
            event_ts_ms: 0..=0,
            in_window: true,
        }
    }

    #[test]
    fn hands_over_exactly_one_ack_per_request() {
        let tap = AckTap::default();
        let mut rx = tap.subscribe(8).expect("first subscriber");
        tap.offer(|| sample("unasked"));
        tap.want_one();
        tap.offer(|| sample("m1"));
        tap.offer(|| sample("m2"));
        assert_eq!(rx.try_recv().map(|s| s.message_id).ok(), Some("m1".into()));
        assert!(rx.try_recv().is_err());
        assert!(tap.subscribe(8).is_none(), "one probe per tap");
    }
}
