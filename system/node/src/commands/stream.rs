//! `stream`: starts a stream session in the conversation; the generation itself is the
//! `streams` module's.

use chatstream_protocol::frames::ErrorCode;

use super::client::{error_frame, Client};
use crate::streams;

impl Client {
    pub(super) async fn stream(&self, conversation_id: String, prompt: String) {
        if prompt.is_empty() {
            return self
                .reply(error_frame(
                    ErrorCode::InvalidArgument,
                    "prompt is empty",
                    None,
                ))
                .await;
        }
        if self.require_member(&conversation_id, None).await.is_none() {
            return;
        }
        match streams::start(
            &self.state,
            &self.claims.sub,
            &self.claims.tenant,
            &conversation_id,
            &prompt,
            Some(self.outlet.clone()),
        )
        .await
        {
            Ok(_) => {}
            Err((code, message)) => self.reply(error_frame(code, message, None)).await,
        }
    }
}
