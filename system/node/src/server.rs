//! Serving: HTTP and WebSocket on the node's listener until the graceful future resolves.
//! Every accepted socket gets TCP_NODELAY; its accept line is logged under this module
//! (tests raise `chatstream_node::server` to debug to read it back).

use axum::serve::ListenerExt;
use axum::Router;
use std::future::Future;
use tokio::net::TcpListener;

use crate::metrics as m;

/// Serves `app` on `listener`; returns once `graceful` resolved and open requests ended.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    graceful: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Nagle would hold small frames (acks, live messages) back for the peer's delayed ACK:
    // every accepted socket gets TCP_NODELAY, read back to prove it took.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY on an accepted socket");
        }
        let nodelay = tcp.nodelay().unwrap_or(false);
        metrics::counter!(m::ACCEPTED_SOCKETS, "tcp_nodelay" => if nodelay { "true" } else { "false" })
            .increment(1);
        if let Ok(peer) = tcp.peer_addr() {
            tracing::debug!(%peer, tcp_nodelay = nodelay, "accepted connection");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(graceful)
        .await
}
