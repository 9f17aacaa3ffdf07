//! `ping`: an application-level ping (apart from WebSocket pings), answered with the
//! node's clock.

use chatstream_protocol::ServerFrame;

use super::client::Client;
use crate::clock;

impl Client {
    pub(super) async fn ping(&self, nonce: Option<u64>) {
        self.reply(ServerFrame::Pong {
            nonce,
            ts_ms: clock::now_ms(),
        })
        .await
    }
}
