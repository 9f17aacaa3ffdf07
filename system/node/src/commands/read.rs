//! `read`: a read mark, stored with its event, acknowledged to the reader and fanned out
//! to the conversation's other members as a READ status.

use chatstream_protocol::events::{self as ev, EventBody};
use chatstream_protocol::frames::{ErrorCode, MessageStatus};
use chatstream_protocol::ServerFrame;

use super::client::{error_frame, store_error, Client};
use crate::clock;
use crate::config::PublishMode;
use crate::events::{new_trace_id, EventContext};
use crate::fanout::FanoutEnvelope;

impl Client {
    /// Marks the conversation read up to `up_to_seq`: the mark and its READ event commit
    /// together; then the reader's own connection gets the READ status (the
    /// acknowledgement) and the other members' connections get it live.
    pub(super) async fn read(&self, conversation_id: String, up_to_seq: i64) {
        if up_to_seq < 0 {
            return self
                .reply(error_frame(
                    ErrorCode::InvalidArgument,
                    "up_to_seq must be >= 0",
                    None,
                ))
                .await;
        }
        let Some(membership) = self.require_member(&conversation_id, None).await else {
            return;
        };
        let state = &self.state;
        let ctx = EventContext {
            conversation_id: Some(conversation_id.clone()),
            ..self.ctx(new_trace_id())
        };
        let event = state.events.envelope(
            &ctx,
            EventBody::MessageStatus(ev::MessageStatusChanged {
                message_id: None,
                conversation_id: conversation_id.clone(),
                seq: up_to_seq,
                user_id: self.claims.sub.clone(),
                status: MessageStatus::Read,
            }),
        );
        let rows = state.events.transactional_rows(|| event.clone());
        match state
            .store
            .mark_read_with_events(
                &conversation_id,
                &self.claims.tenant,
                &self.claims.sub,
                up_to_seq,
                &rows,
            )
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                state.members.invalidate(&conversation_id);
                return self
                    .reply(error_frame(
                        ErrorCode::NotMember,
                        format!(
                            "{} is not a member of conversation {conversation_id}",
                            self.claims.sub
                        ),
                        None,
                    ))
                    .await;
            }
            Err(e) => return self.reply(store_error(e, None)).await,
        }
        match state.events.mode() {
            PublishMode::Outbox => state.events.poke_relay(),
            PublishMode::Async => state.events.emit(event).await,
            PublishMode::None => {}
        }
        let frame = ServerFrame::Status {
            conversation_id: conversation_id.clone(),
            message_id: None,
            seq: up_to_seq,
            user_id: self.claims.sub.clone(),
            status: MessageStatus::Read,
            ts_ms: clock::now_ms(),
        };
        let encoded = frame.encode();
        self.reply(frame).await;
        state.fanout(FanoutEnvelope {
            origin_node: state.cfg.node_id.clone(),
            origin_conn: Some(self.id),
            tenant: membership.tenant.clone(),
            recipients: membership.members.clone(),
            frame: encoded,
            live_order: None,
            receipt: None,
            members_changed: None,
        });
    }
}
