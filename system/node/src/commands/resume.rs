//! `resume`: a stream's chunks after the last index the client received, from whichever
//! node it is on (the `streams` module takes a dead owner's session over).

use std::sync::Arc;

use super::client::{error_frame, Client};
use crate::streams;

impl Client {
    /// Runs beside the read loop (counted as node work): a resume waits for chunks still
    /// being generated.
    pub(super) fn resume(self: Arc<Self>, session_id: String, after_index: i64) {
        let conn = self.clone();
        self.state.work.spawn(async move {
            if let Err((code, message)) = streams::resume(
                &conn.state,
                &conn.claims.tenant,
                &conn.claims.sub,
                &session_id,
                after_index,
                conn.outlet.clone(),
            )
            .await
            {
                conn.reply(error_frame(code, message, Some(session_id)))
                    .await;
            }
        });
    }
}
