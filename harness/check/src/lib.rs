//! squall-check: the checkers, pure functions of a run's history (indexed once into
//! [`Facts`]) and of what was read back from Kafka and PostgreSQL ([`Readback`]), each
//! giving a [`Verdict`]: valid, invalid or unknown, with counts and examples whose
//! timelines come from the history. Jepsen's model: a checker never observes the system,
//! only the record, so a run can be re-checked offline; a checker that cannot judge
//! answers unknown, never valid.
//!
//! Modules: `facts` (the one-pass index), `verdict` (the answer and its evidence), and
//! one module per checker: `delivery`, `duplicates`, `order`, `streams`, `downstream`
//! (no loss downstream, and the readback types), `slo`, `lag`.

mod delivery;
mod downstream;
mod duplicates;
mod facts;
mod lag;
mod order;
mod replay;
mod slo;
mod streams;
mod verdict;

#[cfg(test)]
mod testkit;

pub use delivery::delivery;
pub use downstream::{
    no_loss_downstream, AuditRow, KafkaEvent, PartitionRead, Readback, ReplayDigest,
};
pub use duplicates::{duplicates, Path};
pub use facts::{
    anomaly, ConnEvent, ConnWhat, Delivery, Facts, FactsBuilder, Fault, Follow, MsgId, Phase,
    SendEvent, SendFacts, SenderMismatch, SessionId, StreamEndEvent, StreamStart, SyncEvent,
};
pub use lag::lag;
pub use order::order;
pub use replay::replay;
pub use slo::{slo, METRICS};
pub use streams::{streams, streams_required};
pub use verdict::{Example, Validity, Verdict, MAX_EXAMPLES, MAX_TIMELINE_LINES};
