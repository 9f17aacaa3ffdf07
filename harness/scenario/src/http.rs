//! The `http` section: HTTP traffic offered alongside the WebSocket users, one entry per
//! endpoint and rate.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::topology::WorkerKind;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTraffic {
    pub endpoint: HttpEndpoint,
    /// Requests per second (> 0), spread over the nodes (or sent to the workers' API).
    pub rate: f64,
    #[serde(default = "default_timeout", with = "crate::duration")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpEndpoint {
    /// `POST /api/chat` on a node; the stream it starts is then followed over WebSocket.
    Chat,
    /// `GET /api/conversations/{id}/messages` on a node.
    History,
    /// `GET /readyz` on a node.
    Readyz,
    /// The audit worker's query of one user's trail.
    AuditUser,
    /// The audit worker's query of one conversation's trail.
    AuditConversation,
    /// The audit worker's query of recorded errors.
    AuditErrors,
    /// The audit worker's event counts.
    AuditCounts,
    /// The analytics worker's per-minute aggregates.
    AnalyticsMinutes,
    /// The search worker's full-text query.
    Search,
}

impl HttpEndpoint {
    /// The worker that serves this endpoint, for endpoints of the workers' API.
    pub fn served_by(self) -> Option<WorkerKind> {
        match self {
            HttpEndpoint::Chat | HttpEndpoint::History | HttpEndpoint::Readyz => None,
            HttpEndpoint::AuditUser
            | HttpEndpoint::AuditConversation
            | HttpEndpoint::AuditErrors
            | HttpEndpoint::AuditCounts => Some(WorkerKind::Audit),
            HttpEndpoint::AnalyticsMinutes => Some(WorkerKind::Analytics),
            HttpEndpoint::Search => Some(WorkerKind::Search),
        }
    }
}
