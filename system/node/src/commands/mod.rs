//! The client commands, one module per frame a client sends (`send`, `sync`, `read`,
//! `typing`, `stream`, `resume`, `ping`), and the dispatcher that decodes a text frame
//! and hands it to its command. Handlers answer through the `Client` they are given and
//! never touch the socket: the connection loop owns it.

mod client;
mod notify;
mod ping;
mod read;
mod resume;
mod send;
mod stream;
mod sync;
mod typing;

use chatstream_protocol::frames::ErrorCode;
use chatstream_protocol::ClientFrame;
use std::sync::Arc;

pub use client::{error_frame, Client};

/// Decodes one text frame and runs its command. A frame that is not a valid command, or
/// holds a NUL character, is answered with an error frame.
pub async fn dispatch(client: &Arc<Client>, text: &str) {
    match ClientFrame::decode(text) {
        Ok(frame) => match frame.nul_field() {
            None => client.clone().handle(frame).await,
            Some(field) => {
                let ref_id = frame.ref_id().map(str::to_string);
                client
                    .reply(error_frame(
                        ErrorCode::InvalidArgument,
                        format!("{field} holds a NUL character (\\u0000), which is not accepted"),
                        ref_id,
                    ))
                    .await
            }
        },
        Err(e) => {
            client
                .reply(error_frame(e.code(), e.to_string(), None))
                .await
        }
    }
}

impl Client {
    async fn handle(self: Arc<Self>, frame: ClientFrame) {
        match frame {
            ClientFrame::Send {
                conversation_id,
                client_msg_id,
                body,
            } => self.send(conversation_id, client_msg_id, body).await,
            ClientFrame::Sync {
                conversation_id,
                after_seq,
                limit,
            } => self.sync(conversation_id, after_seq, limit).await,
            ClientFrame::Read {
                conversation_id,
                up_to_seq,
            } => self.read(conversation_id, up_to_seq).await,
            ClientFrame::Typing {
                conversation_id,
                is_typing,
            } => self.typing(conversation_id, is_typing).await,
            ClientFrame::Stream {
                conversation_id,
                prompt,
            } => self.stream(conversation_id, prompt).await,
            ClientFrame::Resume {
                session_id,
                after_index,
            } => self.resume(session_id, after_index),
            ClientFrame::Ping { nonce } => self.ping(nonce).await,
        }
    }
}
