//! chatstream-workers: the Kafka consumers of chatstream. `consumer` is the at-least-once
//! loop every worker runs on (manual offset commits after handling, capped exponential
//! retry that pauses only the affected partition, dead letters for poison events);
//! `handlers` hold what each worker does with an event; `health` watches for stuck
//! partitions; `retention` prunes published outbox rows and old processed markers;
//! `api` is the workers process's HTTP API (health, metrics, reads of the projections).

pub mod api;
pub mod bulk;
pub mod consumer;
pub mod dlq;
pub mod handlers;
pub mod health;
pub mod queries;
pub mod retention;

pub use consumer::{run_worker, HandleError, Handled, Handler, RecordMeta, WorkerConfig};
