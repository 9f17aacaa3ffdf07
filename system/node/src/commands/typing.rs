//! `typing`: an ephemeral indicator, fanned out to the other members and published as a
//! best-effort event; never stored.

use chatstream_protocol::events::{self as ev, EventBody};
use chatstream_protocol::ServerFrame;

use super::client::Client;
use crate::clock;
use crate::events::{new_trace_id, EventContext};
use crate::fanout::FanoutEnvelope;

impl Client {
    pub(super) async fn typing(&self, conversation_id: String, is_typing: bool) {
        let Some(membership) = self.require_member(&conversation_id, None).await else {
            return;
        };
        let frame = ServerFrame::Typing {
            conversation_id: conversation_id.clone(),
            user_id: self.claims.sub.clone(),
            is_typing,
            ts_ms: clock::now_ms(),
        };
        let recipients = membership
            .members
            .iter()
            .filter(|u| **u != self.claims.sub)
            .cloned()
            .collect();
        self.state.fanout(FanoutEnvelope {
            origin_node: self.state.cfg.node_id.clone(),
            origin_conn: Some(self.id),
            tenant: membership.tenant.clone(),
            recipients,
            frame: frame.encode(),
            live_order: None,
            receipt: None,
            members_changed: None,
        });
        let ctx = EventContext {
            conversation_id: Some(conversation_id.clone()),
            ..self.ctx(new_trace_id())
        };
        let e = self.state.events.envelope(
            &ctx,
            EventBody::Typing(ev::TypingChanged {
                conversation_id,
                user_id: self.claims.sub.clone(),
                is_typing,
            }),
        );
        self.state.events.emit_ephemeral(e);
    }
}
