//! `sync`: the conversation's stored messages after a seq, then `sync_done` (with `more`
//! when the answer was cut at the limit).

use chatstream_protocol::frames::{ErrorCode, Via};
use chatstream_protocol::ServerFrame;

use super::client::{error_frame, store_error, Client};

impl Client {
    pub(super) async fn sync(&self, conversation_id: String, after_seq: i64, limit: Option<u32>) {
        if after_seq < 0 {
            return self
                .reply(error_frame(
                    ErrorCode::InvalidArgument,
                    "after_seq must be >= 0",
                    None,
                ))
                .await;
        }
        if self.require_member(&conversation_id, None).await.is_none() {
            return;
        }
        let limit = i64::from(limit.unwrap_or(u32::MAX)).clamp(1, self.state.cfg.sync_limit);
        match self
            .state
            .store
            .messages_after(&conversation_id, after_seq, limit)
            .await
        {
            Ok(msgs) => {
                let more = msgs.len() as i64 == limit;
                let last_seq = msgs.last().map(|m| m.seq).unwrap_or(after_seq);
                for msg in msgs {
                    self.reply(ServerFrame::Msg {
                        message_id: msg.message_id,
                        client_msg_id: msg.client_msg_id,
                        conversation_id: msg.conversation_id,
                        seq: msg.seq,
                        sender_id: msg.sender_id,
                        body: msg.body,
                        created_at_ms: msg.created_at_ms,
                        trace_id: msg.trace_id,
                        via: Via::Sync,
                    })
                    .await;
                }
                self.reply(ServerFrame::SyncDone {
                    conversation_id,
                    last_seq,
                    more,
                })
                .await;
            }
            Err(e) => self.reply(store_error(e, None)).await,
        }
    }
}
