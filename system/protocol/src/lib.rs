//! chatstream-protocol: the contract between chatstream and everything that talks to it.
//! `frames` holds the WebSocket frames (client → node and node → client, JSON text frames
//! carrying a protocol version); `events` holds the versioned Kafka event envelope and the
//! topic and key each event goes to. The harness depends on this crate only.

pub mod auth;
pub mod events;
pub mod frames;

pub use events::{EventBody, EventEnvelope, EVENT_VERSION};
pub use frames::{has_nul, ClientFrame, DecodeError, ErrorCode, ServerFrame, PROTOCOL_VERSION};
