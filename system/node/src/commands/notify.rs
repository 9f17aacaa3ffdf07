//! Offline notifications after a send: members with no live connection on any node
//! (by Redis presence) get a NEW_MESSAGE notification event.

use chatstream_protocol::events::{self as ev, EventBody};
use chatstream_store::Membership;

use super::client::Client;
use crate::clock;
use crate::config::PublishMode;
use crate::events::{new_id, EventContext};
use crate::presence::presence_key;

impl Client {
    /// Members with no live connection anywhere get a notification event. While Redis
    /// is away presence is unknown and none are sent.
    pub(super) async fn notify_offline(
        &self,
        msg: &chatstream_store::StoredMessage,
        members: &Membership,
    ) {
        if self.state.events.mode() == PublishMode::None || !self.state.redis.is_up() {
            return;
        }
        let tenant = &self.claims.tenant;
        let others: Vec<&String> = members
            .members
            .iter()
            .filter(|u| **u != msg.sender_id && !self.state.hub.is_local(tenant, u))
            .collect();
        if others.is_empty() || others.len() > 100 {
            return;
        }
        let now = clock::now_ms();
        let mut pipe = redis::pipe();
        for u in &others {
            pipe.cmd("ZCOUNT")
                .arg(presence_key(tenant, u))
                .arg(now)
                .arg("+inf");
        }
        let Ok(counts) = self
            .state
            .redis
            .run(|mut c| async move { pipe.query_async::<Vec<i64>>(&mut c).await })
            .await
        else {
            return;
        };
        let mut notifications = Vec::new();
        for (user, n) in others.into_iter().zip(counts) {
            if n > 0 {
                continue;
            }
            let ctx = EventContext {
                user_id: Some(user.clone()),
                message_id: Some(msg.message_id.clone()),
                conversation_id: Some(msg.conversation_id.clone()),
                ..self.ctx(msg.trace_id.clone())
            };
            let e = self.state.events.envelope(
                &ctx,
                EventBody::Notification(ev::Notification {
                    id: new_id(),
                    user_id: user.clone(),
                    title: "New Message".into(),
                    content: format!("You have a new message from {}", msg.sender_id),
                    kind: "NEW_MESSAGE".into(),
                    related_entity_id: msg.message_id.clone(),
                }),
            );
            notifications.push(e);
        }
        // Queued in order: once the last one is committed, all are.
        let last = notifications.pop();
        for e in notifications {
            self.state.events.emit(e).await;
        }
        if let Some(e) = last {
            self.state.events.emit_confirmed(e).await;
        }
    }
}
