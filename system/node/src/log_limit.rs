//! Rate-limited logging: a warning that can fire on every message (a fan-out failure, a
//! full queue) is logged at most once per interval; the metrics count every occurrence.
//! And `warn_if_slow`: a wait that should be short says so once when it is not.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Awaits `fut`; when it is still pending after `after`, logs one warning (`what`) and goes
/// on waiting. For the waits a stuck connection would hide behind (a command holding the
/// read loop, a reply waiting for room, a send's append unanswered).
pub async fn warn_if_slow<F: Future>(
    fut: F,
    after: Duration,
    what: impl FnOnce() -> String,
) -> F::Output {
    tokio::pin!(fut);
    match tokio::time::timeout(after, &mut fut).await {
        Ok(out) => out,
        Err(_) => {
            tracing::warn!(after = ?after, "still waiting: {}", what());
            fut.await
        }
    }
}

pub struct LogLimiter {
    every_ms: u64,
    /// Milliseconds since `started` of the last allowed line, plus one (0: never).
    last_ms: AtomicU64,
    started: Instant,
}

impl LogLimiter {
    pub fn new(every: Duration) -> Self {
        LogLimiter {
            every_ms: every.as_millis() as u64,
            last_ms: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// Whether to log now.
    pub fn allow(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now < last + self.every_ms {
            return false;
        }
        self.last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn allows_once_per_interval() {
        let l = super::LogLimiter::new(std::time::Duration::from_secs(60));
        assert!(l.allow());
        assert!(!l.allow());
    }
}
