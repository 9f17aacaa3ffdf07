//! chatstream-node: one node of chatstream, the system Squall tests. A node serves
//! WebSocket clients (`/ws`) and an HTTP API, stores messages in PostgreSQL with a
//! per-conversation sequence, fans them out to every node through Redis Pub/Sub (or
//! Kafka), and publishes every action to Kafka (transactional outbox, fire-and-forget, or
//! not at all).
//! `server::run` is the entry point; the rest are its parts.

pub mod clock;
pub mod config;
pub mod conn;
pub mod events;
pub mod fanout;
pub mod http;
pub mod hub;
pub mod inflight;
pub mod kafka;
pub mod log_limit;
pub mod metrics;
pub mod redis_link;
pub mod sabotage;
pub mod server;
pub mod streams;

pub use config::NodeConfig;
