//! squall-stack: provisions Squall's real local stack on 127.0.0.1 (three Kafka brokers in
//! one KRaft quorum, Redis, PostgreSQL, Toxiproxy), with every link through a Toxiproxy
//! proxy of its own so that any link can be cut or degraded alone (or, for measuring the
//! system alone, with direct links and no Toxiproxy); reads its health; and stops exactly
//! what it started.

#[cfg(feature = "docker")]
pub mod docker;
pub mod error;
pub mod kafka;
pub mod kafka_wire;
pub mod links;
pub mod plan;
pub mod proc_cpu;
pub mod process;
pub mod stack;
pub mod state;
pub mod stores;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tools;
pub mod topics;
pub mod toxiproxy;

pub use error::{Result, StackError};
pub use plan::PortPlan;
pub use stack::{Endpoints, Stack, StackConfig, StackStatus};
