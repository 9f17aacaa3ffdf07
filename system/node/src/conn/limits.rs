//! The per-connection limits the read loop enforces: a token bucket for frames, how long
//! a client has kept exceeding it, and when it was last heard from (the idle timeout).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A token bucket per connection.
pub(super) struct RateLimit {
    tokens: f64,
    per_s: f64,
    burst: f64,
    at: Instant,
}

impl RateLimit {
    pub(super) fn new(per_s: u32, burst: u32) -> Self {
        RateLimit {
            tokens: f64::from(burst),
            per_s: f64::from(per_s),
            burst: f64::from(burst),
            at: Instant::now(),
        }
    }

    /// Ok, or how long until the next frame would be allowed.
    pub(super) fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_s).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_s))
        }
    }
}

/// How long a client has been rate limited without a break of a second or more.
#[derive(Default)]
pub(super) struct Offence {
    since: Option<Instant>,
    last: Option<Instant>,
}

impl Offence {
    /// Records a rate-limited frame; true once the client has kept it up for `close_after`.
    pub(super) fn limited(&mut self, close_after: Duration) -> bool {
        let now = Instant::now();
        let continuing = self
            .last
            .is_some_and(|last| now.duration_since(last) <= Duration::from_secs(1));
        if !continuing {
            self.since = Some(now);
        }
        self.last = Some(now);
        self.since
            .is_some_and(|since| now.duration_since(since) >= close_after)
    }
}

/// When the client was last heard from (any frame, pongs included), for the idle timeout.
pub(super) struct Heard {
    start: Instant,
    last_ms: AtomicU64,
}

impl Heard {
    pub(super) fn new() -> Self {
        Heard {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    pub(super) fn now(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub(super) fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

#[cfg(test)]
mod tests {
    use super::RateLimit;

    #[test]
    fn rate_limit_allows_the_burst_then_says_when() {
        let mut r = RateLimit::new(10, 3);
        assert!(r.take().is_ok() && r.take().is_ok() && r.take().is_ok());
        let wait = r.take().unwrap_err();
        assert!(wait.as_millis() > 0 && wait.as_millis() <= 100, "{wait:?}");
    }
}
