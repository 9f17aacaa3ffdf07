//! Presence: which users have a live connection somewhere, kept in Redis for offline
//! notifications. Each connection marks itself on open and close; a refresher re-marks
//! every local connection so entries outlive neither their node nor a Redis restart.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use crate::clock;
use crate::hub::ConnId;
use crate::state::NodeState;

/// Keeps this node's connected users marked online in Redis (for offline notifications):
/// a sorted set per user of "<node>:<conn>" scored by expiry, refreshed every 20 s and as
/// soon as the Redis link comes back (Redis may have restarted empty).
pub(crate) async fn run_presence(state: Arc<NodeState>, mut shutdown: watch::Receiver<bool>) {
    let mut restored = state.redis.restored();
    loop {
        let snapshot = state.hub.snapshot();
        if !snapshot.is_empty() && state.redis.is_up() {
            let expiry = clock::now_ms() + 60_000;
            let mut pipe = redis::pipe();
            for (tenant, user, conn) in &snapshot {
                pipe.zadd(
                    presence_key(tenant, user),
                    format!("{}:{conn}", state.cfg.node_id),
                    expiry,
                )
                .ignore();
            }
            if let Err(e) = state
                .redis
                .run(|mut c| async move { pipe.query_async::<()>(&mut c).await })
                .await
            {
                tracing::debug!(error = %e, "presence refresh failed");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(20)) => {}
            changed = restored.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

/// The presence set of `user` of `tenant`. The tenant is length-prefixed, so no pair of
/// ids can collide whatever characters they hold.
pub fn presence_key(tenant: &str, user: &str) -> String {
    format!("chatstream:presence:{}:{tenant}:{user}", tenant.len())
}

/// Marks one connection of `user` online (or no longer). Best effort: presence only
/// decides offline notifications, and the refresher repairs it within 20 s, at once when
/// the Redis link returns.
pub async fn mark(state: &NodeState, tenant: &str, user: &str, conn: ConnId, online: bool) {
    let member = format!("{}:{}", state.cfg.node_id, conn);
    let key = presence_key(tenant, user);
    let expiry = clock::now_ms() + 60_000;
    let r = state
        .redis
        .run(|mut c| async move {
            if online {
                redis::cmd("ZADD")
                    .arg(&key)
                    .arg(expiry)
                    .arg(member)
                    .query_async::<()>(&mut c)
                    .await
            } else {
                redis::cmd("ZREM")
                    .arg(&key)
                    .arg(member)
                    .query_async::<()>(&mut c)
                    .await
            }
        })
        .await;
    if let Err(e) = r {
        tracing::debug!(error = %e, "presence update failed");
    }
}
