//! chatstream-node: one node of chatstream, the system Squall tests. A node serves
//! WebSocket clients (`/ws`) and an HTTP API, stores messages in PostgreSQL with a
//! per-conversation sequence, fans them out to every node through Redis Pub/Sub (or
//! Kafka), and publishes every action to Kafka (transactional outbox, fire-and-forget, or
//! not at all).
//!
//! `lifecycle::run` is the entry point (start, serve, drain, stop). The layers, each
//! depending only on those below it:
//! - serving: `server` (the listener), `http` (the API), `conn` (one WebSocket's loop),
//!   `commands` (one module per client frame), `streams` (stream sessions);
//! - the node's work: `delivery` (fan-out to local connections), `presence`, `health`;
//! - `state`: the shared `NodeState` every part above is handed;
//! - leaf parts: `config`, `hub`, `fanout`, `events`, `direct`, `kafka`, `redis_link`,
//!   `generator`, `inflight`, `close`, `clock`, `metrics`, `log_limit`, `sabotage`.

pub mod clock;
pub mod close;
pub mod commands;
pub mod config;
pub mod conn;
pub mod delivery;
pub mod direct;
pub mod events;
pub mod fanout;
pub mod generator;
pub mod health;
pub mod http;
pub mod hub;
pub mod inflight;
pub mod kafka;
pub mod lifecycle;
pub mod log_limit;
pub mod metrics;
pub mod presence;
pub mod redis_link;
pub mod sabotage;
pub mod server;
pub mod state;
pub mod streams;

pub use config::NodeConfig;
pub use lifecycle::{run, NodeError};
