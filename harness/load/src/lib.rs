//! squall-load: the load half of a run. [`plan`] turns a scenario and its seed into users,
//! conversations and an open-loop arrival schedule; [`engine`] connects the users, runs
//! the schedule and the HTTP traffic against the nodes, and drains; every operation goes
//! to the history ([`squall_history`]) and every latency to [`metrics`], measured from
//! the operation's intended time so a stalled system cannot hide (no coordinated omission);
//! [`recovery`] reads every conversation from seq 0 with fresh clients after the load.

pub mod abuse;
pub mod body;
pub mod engine;
mod fasthash;
pub mod http;
pub mod metrics;
pub mod plan;
pub mod recovery;
mod shared;
pub mod tap;
mod user;
mod wire;

pub use engine::{run, LoadError, Outcome, Target};
pub use metrics::{Metrics, SecondPoint, Summary};
pub use plan::{Arrival, Arrivals, Population};
