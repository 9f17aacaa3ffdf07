//! The connected client every command handler answers: its identity, its outlet, the
//! shared node state, and what all commands share (replies capped for errors, membership
//! checks, event contexts, error frames).

use chatstream_protocol::auth::Claims;
use chatstream_protocol::frames::ErrorCode;
use chatstream_protocol::ServerFrame;
use chatstream_store::{Membership, StoreError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use super::send::PendingSend;
use crate::events::EventContext;
use crate::hub::{ConnId, Outbound, Outlet};
use crate::log_limit::warn_if_slow;
use crate::metrics as m;
use crate::state::NodeState;

/// A reply or a queued send waiting this long is reported (once each).
pub(super) const SLOW_WAIT: Duration = Duration::from_secs(5);
/// Past the append batch's own bound (10 s a try): an append this late is reported.
pub(super) const SLOW_APPEND: Duration = Duration::from_secs(60);

/// Error frames written in the current one-second window.
struct ErrorBudget {
    window: Instant,
    written: u32,
    per_s: u32,
}

impl ErrorBudget {
    fn new(per_s: u32) -> Self {
        ErrorBudget {
            window: Instant::now(),
            written: 0,
            per_s,
        }
    }

    fn take(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.written = 0;
        }
        self.written += 1;
        self.written <= self.per_s
    }
}

/// The connected client a command comes from: who it is, where its frames go, and the
/// node it is on.
pub struct Client {
    pub(crate) state: Arc<NodeState>,
    pub(crate) claims: Claims,
    pub(crate) id: ConnId,
    pub(crate) outlet: Arc<Outlet>,
    error_budget: Mutex<ErrorBudget>,
    /// The completer's queue of batched sends (started with the first one). Boxed: the
    /// queue allocates a block of 32 slots up front, kept for the connection's life; 32
    /// pointers instead of 32 sends is 3 KiB less per connection that ever sent.
    pub(super) sends: Mutex<Option<mpsc::Sender<Box<PendingSend>>>>,
}

impl Client {
    pub fn new(state: Arc<NodeState>, claims: Claims, id: ConnId, outlet: Arc<Outlet>) -> Self {
        let per_s = state.cfg.max_error_frames_per_s;
        Client {
            state,
            claims,
            id,
            outlet,
            error_budget: Mutex::new(ErrorBudget::new(per_s)),
            sends: Mutex::new(None),
        }
    }

    /// Queues a frame for this connection, waiting for room when the client reads slowly
    /// (backpressure on its own requests); nothing is dropped, except error frames past
    /// the per-second cap, which are counted. An error naming its request (`ref_id`: a
    /// send's, a resume's) is never dropped: it is that request's only answer, one for one,
    /// and a client left without it cannot tell whether its message was stored.
    pub async fn reply(&self, frame: ServerFrame) {
        if matches!(frame, ServerFrame::Error { ref_id: None, .. })
            && !self.error_budget.lock().is_ok_and(|mut b| b.take())
        {
            metrics::counter!(m::ERROR_FRAMES_SUPPRESSED).increment(1);
            return;
        }
        let queued = warn_if_slow(
            self.outlet.push_wait(Outbound::from(frame.encode())),
            SLOW_WAIT,
            || {
                format!(
                    "a reply to connection {} of {} waits for room ({} bytes unsent)",
                    self.id,
                    self.claims.sub,
                    self.outlet.queued_bytes()
                )
            },
        )
        .await;
        if let Err(e) = queued {
            tracing::debug!(conn = self.id, error = %e, "reply not queued");
        }
    }

    pub(super) fn ctx(&self, trace_id: String) -> EventContext {
        EventContext {
            tenant: self.claims.tenant.clone(),
            trace_id,
            user_id: Some(self.claims.sub.clone()),
            ..Default::default()
        }
    }

    /// Membership check shared by every conversation frame.
    pub(super) async fn require_member(
        &self,
        conversation: &str,
        ref_id: Option<String>,
    ) -> Option<Arc<Membership>> {
        match self
            .state
            .members
            .is_member(
                &self.state.store,
                conversation,
                &self.claims.tenant,
                &self.claims.sub,
            )
            .await
        {
            Ok(Some(m)) => Some(m),
            Ok(None) => {
                self.reply(error_frame(
                    ErrorCode::NotMember,
                    format!(
                        "{} is not a member of conversation {conversation}",
                        self.claims.sub
                    ),
                    ref_id,
                ))
                .await;
                None
            }
            Err(e) => {
                self.reply(store_error(e, ref_id)).await;
                None
            }
        }
    }
}

pub fn error_frame(
    code: ErrorCode,
    message: impl Into<String>,
    ref_id: Option<String>,
) -> ServerFrame {
    metrics::counter!(m::ERRORS, "code" => format!("{code:?}")).increment(1);
    ServerFrame::Error {
        code,
        message: message.into(),
        ref_id,
        retry_after_ms: None,
    }
}

pub(super) fn store_error(e: StoreError, ref_id: Option<String>) -> ServerFrame {
    match e {
        StoreError::NotMember { .. } => error_frame(ErrorCode::NotMember, e.to_string(), ref_id),
        e if e.is_unavailable() => error_frame(
            ErrorCode::Unavailable,
            format!("{e}; nothing was stored, retry later"),
            ref_id,
        ),
        e => {
            tracing::error!(error = %e, "store error");
            error_frame(
                ErrorCode::Internal,
                "storage error; nothing was stored",
                ref_id,
            )
        }
    }
}
