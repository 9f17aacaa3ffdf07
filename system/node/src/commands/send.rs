//! `send`: store a chat message (idempotent on `client_msg_id`), acknowledge it, fan it
//! out live in seq order, publish its event, and notify offline members. With group commit
//! a connection's sends are answered by its completer, in the order they were read.

use chatstream_protocol::events::{self as ev, EventBody};
use chatstream_protocol::frames::{ErrorCode, MessageStatus};
use chatstream_protocol::{EventEnvelope, ServerFrame};
use chatstream_store::{
    AppendHooks, Appended, Membership, NewMessage, OutboxRow, PendingAppend, StoreError,
    StoredMessage,
};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

use super::client::{error_frame, store_error, Client, SLOW_APPEND, SLOW_WAIT};
use crate::clock;
use crate::config::{FanoutMode, PublishMode};
use crate::events::{new_id, new_trace_id, EventContext};
use crate::fanout::Reservation;
use crate::log_limit::warn_if_slow;
use crate::metrics as m;

const MAX_ID_LEN: usize = 128;

/// What the answer to a `send` frame needs once its append is done.
struct SentFrame {
    conversation_id: String,
    ref_id: Option<String>,
    membership: Arc<Membership>,
    trace_id: String,
    started: Instant,
}

/// A batched send being stored.
pub(super) struct PendingSend {
    append: PendingAppend,
    sent: SentFrame,
}

/// What a batched send does at its batch's two moments, on the batcher task.
struct SendHooks {
    conn: Arc<Client>,
    membership: Arc<Membership>,
}

impl AppendHooks for SendHooks {
    fn outbox_rows(&mut self, msg: &StoredMessage) -> Vec<OutboxRow> {
        // Built before the seq is known: the append writes it into the payload.
        self.conn
            .state
            .events
            .transactional_rows(|| self.conn.chat_event(msg))
    }

    fn committed(&mut self, outcome: &Result<Appended, StoreError>) {
        // In seq order per conversation, for the whole batch at once, before any sender is
        // answered: the node publishes its live frames in the order they are queued.
        let state = &self.conn.state;
        if state.cfg.fanout_mode != FanoutMode::Redis {
            return;
        }
        if let Ok(a) = outcome {
            if !a.duplicate {
                state.fanout.publish(state.message_envelope(
                    &a.message,
                    &self.membership,
                    Some(self.conn.id),
                    &a.message.trace_id,
                ));
            }
        }
    }
}

impl Client {
    pub(super) async fn send(
        self: Arc<Self>,
        conversation_id: String,
        client_msg_id: String,
        body: String,
    ) {
        let started = Instant::now();
        let ref_id = Some(client_msg_id.clone());
        if client_msg_id.is_empty()
            || client_msg_id.len() > MAX_ID_LEN
            || conversation_id.is_empty()
            || conversation_id.len() > MAX_ID_LEN
        {
            return self
                .reply(error_frame(
                    ErrorCode::InvalidArgument,
                    format!("conversation_id and client_msg_id must have 1..={MAX_ID_LEN} bytes"),
                    ref_id,
                ))
                .await;
        }
        if body.is_empty() {
            return self
                .reply(error_frame(
                    ErrorCode::InvalidArgument,
                    "body is empty",
                    ref_id,
                ))
                .await;
        }
        // The recipients, read before the append so the fan-out place it takes is filled
        // right after the commit (the append checks membership again, authoritatively).
        let Some(membership) = self.require_member(&conversation_id, ref_id.clone()).await else {
            return;
        };
        let state = &self.state;
        if crate::sabotage::skip_store() {
            // Sabotage (off by default): acknowledged, never stored.
            return self
                .reply(ServerFrame::Ack {
                    client_msg_id,
                    message_id: new_id(),
                    conversation_id,
                    seq: i64::from(u32::MAX),
                    status: MessageStatus::Sent,
                    duplicate: false,
                    ts_ms: clock::now_ms(),
                })
                .await;
        }
        let trace_id = new_trace_id();
        let new = NewMessage {
            tenant: self.claims.tenant.clone(),
            message_id: new_id(),
            conversation_id: conversation_id.clone(),
            sender_id: self.claims.sub.clone(),
            client_msg_id: client_msg_id.clone(),
            body,
            trace_id: trace_id.clone(),
            node_id: state.cfg.node_id.clone(),
            created_at_ms: clock::now_ms(),
        };
        let sent = SentFrame {
            conversation_id,
            ref_id,
            membership,
            trace_id,
            started,
        };
        if let Some(batcher) = state.store.batched() {
            // Group commit: queued behind this connection's earlier sends (so a client's
            // own messages keep their order), answered by the connection's completer while
            // the read loop goes on to the next frame.
            let hooks = Box::new(SendHooks {
                conn: self.clone(),
                membership: sent.membership.clone(),
            });
            let append = batcher.submit(new, hooks).await;
            return self
                .queue_send(Box::new(PendingSend { append, sent }))
                .await;
        }
        let redis_fanout = state.cfg.fanout_mode == FanoutMode::Redis;
        let mut place: Option<Reservation> = None;
        let appended = state
            .store
            .append_message(&new, |msg| {
                // Under the conversation's row lock: places are taken in seq order.
                if redis_fanout {
                    place = Some(state.fanout.reserve());
                }
                state.events.transactional_rows(|| self.chat_event(msg))
            })
            .await;
        if let (Ok(a), Some(place)) = (&appended, place) {
            if !a.duplicate {
                place.fill(state.message_envelope(
                    &a.message,
                    &sent.membership,
                    Some(self.id),
                    &sent.trace_id,
                ));
            }
        }
        self.finish_send(sent, appended).await;
    }

    /// The CHAT_MESSAGE event of a stored message.
    fn chat_event(&self, msg: &StoredMessage) -> EventEnvelope {
        let ctx = EventContext {
            conversation_id: Some(msg.conversation_id.clone()),
            message_id: Some(msg.message_id.clone()),
            ..self.ctx(msg.trace_id.clone())
        };
        self.state.events.envelope(
            &ctx,
            EventBody::ChatMessage(ev::ChatMessage {
                message_id: msg.message_id.clone(),
                client_msg_id: msg.client_msg_id.clone(),
                conversation_id: msg.conversation_id.clone(),
                sender_id: msg.sender_id.clone(),
                seq: msg.seq,
                body: msg.body.clone(),
                created_at_ms: msg.created_at_ms,
            }),
        )
    }

    /// Hands a batched send to this connection's completer (started with the first send),
    /// which answers sends in the order they were read. Waits while `max_pending_sends`
    /// of them are being stored.
    async fn queue_send(self: &Arc<Self>, pending: Box<PendingSend>) {
        let tx = self.sends.lock().ok().map(|mut sends| {
            sends
                .get_or_insert_with(|| {
                    let (tx, rx) = mpsc::channel(self.state.cfg.max_pending_sends);
                    // Counted: a draining node answers (and fans out) what it stored.
                    self.state.work.spawn(self.clone().complete_sends(rx));
                    tx
                })
                .clone()
        });
        let Some(tx) = tx else {
            return self.complete_one(pending).await;
        };
        let queued = warn_if_slow(tx.send(pending), SLOW_WAIT, || {
            format!(
                "connection {} of {} waits to queue a send behind {} unanswered ones",
                self.id, self.claims.sub, self.state.cfg.max_pending_sends
            )
        })
        .await;
        if let Err(mpsc::error::SendError(pending)) = queued {
            self.complete_one(pending).await;
        }
    }

    /// The completer: answers each send once its batch is written, in read order (so a
    /// conversation's acks come in seq order). It lives as long as the connection, mostly
    /// waiting: the answer's state is boxed, so it takes room only while a send is answered.
    async fn complete_sends(self: Arc<Self>, mut rx: mpsc::Receiver<Box<PendingSend>>) {
        while let Some(pending) = rx.recv().await {
            Box::pin(self.complete_one(pending)).await;
        }
    }

    async fn complete_one(self: &Arc<Self>, pending: Box<PendingSend>) {
        let PendingSend { append, sent } = *pending;
        let appended = warn_if_slow(append.wait(), SLOW_APPEND, || {
            format!(
                "a send of connection {} of {} to {} is not answered by its append batch",
                self.id, self.claims.sub, sent.conversation_id
            )
        })
        .await;
        self.finish_send(sent, appended).await;
    }

    /// Lets the completer end once it has answered what is queued (the connection ended).
    pub(crate) fn close_sends(&self) {
        if let Ok(mut sends) = self.sends.lock() {
            sends.take();
        }
    }

    /// Everything after the append of a send (its fan-out place is filled already): the
    /// ack or the error, the event in async mode, a duplicate's fan-out, notifications.
    async fn finish_send(
        self: &Arc<Self>,
        sent: SentFrame,
        appended: Result<Appended, StoreError>,
    ) {
        let state = &self.state;
        let appended = match appended {
            Ok(a) => a,
            Err(e) => {
                if matches!(e, StoreError::NotMember { .. }) {
                    // The cached membership was stale: read it again next time.
                    state.members.invalidate(&sent.conversation_id);
                }
                return self.reply(store_error(e, sent.ref_id)).await;
            }
        };
        let msg = appended.message;
        self.reply(ServerFrame::Ack {
            client_msg_id: msg.client_msg_id.clone(),
            message_id: msg.message_id.clone(),
            conversation_id: msg.conversation_id.clone(),
            seq: msg.seq,
            status: MessageStatus::Sent,
            duplicate: appended.duplicate,
            ts_ms: clock::now_ms(),
        })
        .await;
        metrics::histogram!(m::SEND_SECONDS).record(sent.started.elapsed().as_secs_f64());
        if appended.duplicate {
            metrics::counter!(m::MESSAGES_DUPLICATE).increment(1);
            // Fanned out again: the first attempt may have died before its fan-out.
            // Recipients that already got a later message skip it (live order).
            let env = state.message_envelope(&msg, &sent.membership, Some(self.id), &sent.trace_id);
            state.fanout(env);
            return;
        }
        metrics::counter!(m::MESSAGES_ACCEPTED).increment(1);
        match state.events.mode() {
            PublishMode::Outbox => state.events.poke_relay(),
            PublishMode::Async => state.events.emit(self.chat_event(&msg)).await,
            PublishMode::None => {}
        }
        // Beside the read loop: the presence lookup is a Redis round trip. Counted, so a
        // draining node stores the notifications before it exits.
        let membership = sent.membership;
        let conn = self.clone();
        state
            .work
            .spawn(async move { conn.notify_offline(&msg, &membership).await });
    }
}
