//! Delivery: how a fan-out envelope reaches this node's connections (in arrival order,
//! with DELIVERED receipts for the sender), the envelope a stored message goes out in,
//! and the Kafka fan-out mode's path from a CHAT_MESSAGE event to local members.

use chatstream_protocol::events::EventBody;
use chatstream_protocol::frames::Via;
use chatstream_protocol::{EventEnvelope, ServerFrame};
use chatstream_store::Membership;

use crate::clock;
use crate::events::EventContext;
use crate::fanout::{self, FanoutEnvelope, LiveOrder};
use crate::hub::Outbound;
use crate::metrics as m;
use crate::state::NodeState;

impl NodeState {
    /// Queues a fan-out envelope; never waits (see `fanout`).
    pub fn fanout(&self, env: FanoutEnvelope) {
        self.fanout.publish(env);
    }

    /// Delivers a fan-out envelope to this node's connections, in the order envelopes
    /// arrive (it is called by the subscriber, one at a time), and reports DELIVERED for
    /// each recipient reached (other than the sender).
    pub fn deliver_envelope(&self, env: FanoutEnvelope) {
        if let Some(conversation) = &env.members_changed {
            self.members.invalidate(conversation);
            return;
        }
        let except = (env.origin_node == self.cfg.node_id)
            .then_some(env.origin_conn)
            .flatten();
        let frame = Outbound::from(env.frame);
        let order = env
            .live_order
            .as_ref()
            .map(|o| (o.conversation_id.as_str(), o.seq));
        let reached = self
            .hub
            .deliver(&env.tenant, &env.recipients, &frame, except, order);
        metrics::counter!(m::FANOUT_DELIVERED).increment(reached.len() as u64);
        let Some(receipt) = env.receipt else { return };
        for user in reached.into_iter().filter(|u| *u != receipt.sender_id) {
            self.report_delivered(&receipt, &user);
        }
    }

    fn report_delivered(&self, r: &fanout::Receipt, recipient: &str) {
        let now = clock::now_ms();
        let status = ServerFrame::Status {
            conversation_id: r.conversation_id.clone(),
            message_id: Some(r.message_id.clone()),
            seq: r.seq,
            user_id: recipient.to_string(),
            status: chatstream_protocol::frames::MessageStatus::Delivered,
            ts_ms: now,
        };
        self.fanout(FanoutEnvelope {
            origin_node: self.cfg.node_id.clone(),
            origin_conn: None,
            tenant: r.tenant.clone(),
            recipients: vec![r.sender_id.clone()],
            frame: status.encode(),
            live_order: None,
            receipt: None,
            members_changed: None,
        });
        let ctx = EventContext {
            tenant: r.tenant.clone(),
            trace_id: r.trace_id.clone(),
            conversation_id: Some(r.conversation_id.clone()),
            user_id: Some(recipient.to_string()),
            message_id: Some(r.message_id.clone()),
            ..Default::default()
        };
        let e = self.events.envelope(
            &ctx,
            EventBody::MessageStatus(chatstream_protocol::events::MessageStatusChanged {
                message_id: Some(r.message_id.clone()),
                conversation_id: r.conversation_id.clone(),
                seq: r.seq,
                user_id: recipient.to_string(),
                status: chatstream_protocol::frames::MessageStatus::Delivered,
            }),
        );
        self.events.emit_nowait(e);
    }

    /// The envelope that fans a stored message out live to its conversation's members.
    pub fn message_envelope(
        &self,
        msg: &chatstream_store::StoredMessage,
        membership: &Membership,
        origin_conn: Option<crate::hub::ConnId>,
        trace_id: &str,
    ) -> FanoutEnvelope {
        let frame = ServerFrame::Msg {
            message_id: msg.message_id.clone(),
            client_msg_id: msg.client_msg_id.clone(),
            conversation_id: msg.conversation_id.clone(),
            seq: msg.seq,
            sender_id: msg.sender_id.clone(),
            body: msg.body.clone(),
            created_at_ms: msg.created_at_ms,
            trace_id: msg.trace_id.clone(),
            via: Via::Live,
        };
        FanoutEnvelope {
            origin_node: self.cfg.node_id.clone(),
            origin_conn,
            tenant: membership.tenant.clone(),
            recipients: membership.members.clone(),
            frame: frame.encode(),
            live_order: Some(LiveOrder {
                conversation_id: msg.conversation_id.clone(),
                seq: msg.seq,
            }),
            receipt: Some(fanout::Receipt {
                sender_id: msg.sender_id.clone(),
                conversation_id: msg.conversation_id.clone(),
                message_id: msg.message_id.clone(),
                seq: msg.seq,
                tenant: membership.tenant.clone(),
                trace_id: trace_id.to_string(),
            }),
            members_changed: None,
        }
    }

    /// Kafka fan-out mode: deliver a CHAT_MESSAGE event to local members.
    pub(crate) async fn deliver_chat_event(&self, e: EventEnvelope) {
        let EventBody::ChatMessage(msg) = &e.body else {
            return;
        };
        let membership = match self.members.get(&self.store, &msg.conversation_id).await {
            Ok(Some(m)) if m.tenant == e.tenant => m,
            Ok(_) => return,
            Err(err) => {
                tracing::warn!(error = %err, "members unavailable; kafka fan-out skipped");
                return;
            }
        };
        let stored = chatstream_store::StoredMessage {
            message_id: msg.message_id.clone(),
            conversation_id: msg.conversation_id.clone(),
            seq: msg.seq,
            sender_id: msg.sender_id.clone(),
            client_msg_id: msg.client_msg_id.clone(),
            body: msg.body.clone(),
            trace_id: e.trace_id.clone(),
            created_at_ms: msg.created_at_ms,
        };
        let mut env = self.message_envelope(&stored, &membership, None, &e.trace_id);
        env.origin_node = e.source_node.clone();
        env.recipients.retain(|u| *u != msg.sender_id);
        self.deliver_envelope(env);
    }
}
