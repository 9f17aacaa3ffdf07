//! Wall-clock helpers: Unix milliseconds and RFC 3339 timestamps for frames and events.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `ms` as RFC 3339 UTC with milliseconds (`2026-11-25T08:00:00.000Z`).
pub fn rfc3339_ms(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_like_the_seeds() {
        assert_eq!(
            super::rfc3339_ms(1_705_314_600_000),
            "2024-01-15T10:30:00.000Z"
        );
    }
}
