//! Replay over HTTP, served by the workers process (the seeds' debug endpoint,
//! `GET /api/debug/replay-session/{id}`): a session's timeline and a topic from a time,
//! each bounded by a number of events and a wait. The reading is the replay crate's
//! (`ranges_all`, `partition_for_key`, `ranges_from_timestamp`, `read`): the end offsets are
//! fixed when the request starts, so an answer never includes records produced after it.
//!
//! - `GET /api/replay/sessions/{id}` (and `/api/debug/replay-session/{id}`)
//!   `?max_events=&max_wait_ms=`: the session's events in order, marked replayed.
//! - `GET /api/replay/topics/{topic}?since=<Unix ms | RFC 3339>&max_events=&max_wait_ms=`:
//!   records at or after `since`, per partition in offset order.
//!
//! Answers say whether they are `complete` (every record in range read), `truncated` (cut
//! at `max_events`) or `timed_out` (cut at `max_wait_ms`). At most [`CONCURRENT`] replays
//! run at once (503 beyond), so debugging cannot starve the workers.
//!
//! It lives here rather than in the workers crate because this crate already depends on
//! the workers' handlers (for rebuilds): the workers binary mounts [`router`] beside the
//! workers' own routes.

use crate::{Range, ReplayError, Replayed};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Events per answer when the request names no limit, and the most it may ask for.
pub const DEFAULT_MAX_EVENTS: usize = 1_000;
pub const MAX_EVENTS_CAP: usize = 10_000;
/// Wait per answer when the request names none, and the longest it may ask for.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(10);
pub const MAX_WAIT_CAP: Duration = Duration::from_secs(60);
/// Replays running at once.
pub const CONCURRENT: usize = 2;

#[derive(Clone)]
struct ReplayApi {
    bootstrap: String,
    slots: Arc<Semaphore>,
}

#[derive(Deserialize)]
struct Limits {
    max_events: Option<usize>,
    max_wait_ms: Option<u64>,
    since: Option<String>,
}

impl Limits {
    fn events(&self) -> usize {
        self.max_events
            .unwrap_or(DEFAULT_MAX_EVENTS)
            .min(MAX_EVENTS_CAP)
    }

    fn wait(&self) -> Duration {
        self.max_wait_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_MAX_WAIT)
            .min(MAX_WAIT_CAP)
    }
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn replay_error(e: ReplayError) -> Response {
    match e {
        ReplayError::NoTopic(t) => error(StatusCode::NOT_FOUND, format!("no topic {t}")),
        other => error(StatusCode::SERVICE_UNAVAILABLE, other.to_string()),
    }
}

/// How a bounded read ended.
#[derive(Debug, Default, Clone, Copy)]
struct Ending {
    truncated: bool,
    timed_out: bool,
}

impl Ending {
    fn json(self) -> serde_json::Value {
        serde_json::json!({
            "complete": !self.truncated && !self.timed_out,
            "truncated": self.truncated,
            "timed_out": self.timed_out,
        })
    }
}

/// `read` with a deadline whose expiry is an answer, not an error.
fn read_bounded(
    bootstrap: &str,
    topic: &str,
    ranges: &[Range],
    wait: Duration,
    each: impl FnMut(Replayed),
) -> Result<bool, ReplayError> {
    match crate::read(bootstrap, topic, ranges, wait, each, |_, _| {}) {
        Ok(_) => Ok(false),
        Err(ReplayError::Timeout(..)) => Ok(true),
        Err(e) => Err(e),
    }
}

/// A session's events: its partition of stream-events (computed from the key, as the
/// nodes' partitioner does), read to the end offset fixed now, filtered by session.
fn session_events(
    bootstrap: &str,
    session_id: &str,
    max_events: usize,
    wait: Duration,
) -> Result<(Vec<chatstream_protocol::EventEnvelope>, Ending), ReplayError> {
    let topic = chatstream_protocol::events::topic::STREAM_EVENTS;
    let all = crate::ranges_all(bootstrap, topic)?;
    let partition = crate::partition_for_key(session_id, all.len() as i32);
    let range: Vec<Range> = all
        .into_iter()
        .filter(|r| r.partition == partition)
        .collect();
    let mut events = Vec::new();
    let mut ending = Ending::default();
    ending.timed_out = read_bounded(bootstrap, topic, &range, wait, |r| {
        if let Some(e) = r.event() {
            if e.session_id.as_deref() == Some(session_id) {
                if events.len() < max_events {
                    events.push(e);
                } else {
                    ending.truncated = true;
                }
            }
        }
    })?;
    Ok((events, ending))
}

/// Records of `topic` at or after `since_ms`: each partition from its offsets-for-times
/// start, the ranges cut (in partition order) so at most `max_events` records are read.
fn topic_records(
    bootstrap: &str,
    topic: &str,
    since_ms: i64,
    max_events: usize,
    wait: Duration,
) -> Result<(Vec<serde_json::Value>, Vec<Range>, Ending), ReplayError> {
    let mut budget = max_events as i64;
    let mut ending = Ending::default();
    let ranges: Vec<Range> = crate::ranges_from_timestamp(bootstrap, topic, since_ms)?
        .into_iter()
        .map(|r| {
            let take = r.len().min(budget);
            budget -= take;
            if take < r.len() {
                ending.truncated = true;
            }
            Range {
                to: r.from + take,
                ..r
            }
        })
        .collect();
    let mut records = Vec::new();
    ending.timed_out = read_bounded(bootstrap, topic, &ranges, wait, |r| {
        // Records after a partition's start may still be older (producer timestamps
        // need not grow): the same filter as `read_since`.
        if r.timestamp_ms.is_some_and(|t| t >= since_ms) {
            records.push(r.to_json());
        }
    })?;
    Ok((records, ranges, ending))
}

async fn session(
    State(api): State<ReplayApi>,
    Path(session_id): Path<String>,
    Query(limits): Query<Limits>,
) -> Response {
    let Ok(permit) = api.slots.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{CONCURRENT} replays already running; try again"),
        );
    };
    let (max_events, wait) = (limits.events(), limits.wait());
    let (b, id) = (api.bootstrap.clone(), session_id.clone());
    let answer = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        session_events(&b, &id, max_events, wait)
    })
    .await;
    match answer {
        Ok(Ok((events, ending))) => {
            let mut body = serde_json::json!({
                "session_id": session_id,
                "count": events.len(),
                "events": events,
                "max_events": max_events,
                "max_wait_ms": wait.as_millis() as u64,
            });
            merge(&mut body, ending.json());
            Json(body).into_response()
        }
        Ok(Err(e)) => replay_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn topic(
    State(api): State<ReplayApi>,
    Path(topic): Path<String>,
    Query(limits): Query<Limits>,
) -> Response {
    if topic.starts_with("__") {
        return error(
            StatusCode::NOT_FOUND,
            format!("{topic} is internal to Kafka"),
        );
    }
    let Some(since) = limits.since.as_deref() else {
        return error(StatusCode::BAD_REQUEST, "give ?since=<Unix ms or RFC 3339>");
    };
    let since_ms = match crate::parse_time(since) {
        Ok(t) => t,
        Err(e) => return error(StatusCode::BAD_REQUEST, with_causes(&e)),
    };
    let Ok(permit) = api.slots.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{CONCURRENT} replays already running; try again"),
        );
    };
    let (max_events, wait) = (limits.events(), limits.wait());
    let (b, t) = (api.bootstrap.clone(), topic.clone());
    let answer = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        topic_records(&b, &t, since_ms, max_events, wait)
    })
    .await;
    match answer {
        Ok(Ok((records, ranges, ending))) => {
            let mut body = serde_json::json!({
                "topic": topic,
                "since_ms": since_ms,
                "count": records.len(),
                "records": records,
                "ranges": ranges,
                "max_events": max_events,
                "max_wait_ms": wait.as_millis() as u64,
            });
            merge(&mut body, ending.json());
            Json(body).into_response()
        }
        Ok(Err(e)) => replay_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// An error and its causes on one line, outermost first.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

/// The replay routes, reading from `bootstrap`.
pub fn router(bootstrap: &str) -> Router {
    Router::new()
        .route("/api/replay/sessions/{id}", get(session))
        .route("/api/debug/replay-session/{id}", get(session))
        .route("/api/replay/topics/{topic}", get(topic))
        .with_state(ReplayApi {
            bootstrap: bootstrap.to_string(),
            slots: Arc::new(Semaphore::new(CONCURRENT)),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_have_defaults_and_caps() {
        let none = Limits {
            max_events: None,
            max_wait_ms: None,
            since: None,
        };
        assert_eq!(
            (none.events(), none.wait()),
            (DEFAULT_MAX_EVENTS, DEFAULT_MAX_WAIT)
        );
        let huge = Limits {
            max_events: Some(usize::MAX),
            max_wait_ms: Some(u64::MAX),
            since: None,
        };
        assert_eq!((huge.events(), huge.wait()), (MAX_EVENTS_CAP, MAX_WAIT_CAP));
    }
}
