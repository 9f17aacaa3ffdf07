//! Times as people and tools give them to a replay: Unix milliseconds or RFC 3339.

#[derive(Debug, thiserror::Error)]
pub enum TimeError {
    #[error("{input:?} is neither Unix milliseconds nor RFC 3339 (2026-11-25T08:00:00Z)")]
    Unparsable {
        input: String,
        #[source]
        source: humantime::TimestampError,
    },
    #[error(transparent)]
    BeforeEpoch(#[from] std::time::SystemTimeError),
}

/// `s` as Unix milliseconds: either already that, or an RFC 3339 time.
pub fn parse_time(s: &str) -> Result<i64, TimeError> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|source| TimeError::Unparsable {
        input: s.to_string(),
        source,
    })?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64)
}
