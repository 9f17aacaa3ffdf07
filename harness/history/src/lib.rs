//! squall-history: the append-only record of a run (Jepsen's model). Load generators and the
//! nemesis append [`Op`]s through a [`Recorder`]; a writer thread streams them, gzip'd JSON
//! lines, into `history.jsonl.gz` in the run directory; checkers and `squall check` read
//! them back with [`read`]. Everything a report says is computed from this file (plus
//! what is read back from Kafka and PostgreSQL), so a run can be re-checked offline.
//!
//! Format (version [`VERSION`]): line 1 is a [`Header`]; every further line is one [`Op`].
//! Times are microseconds on the run's monotonic clock (`t`), whose origin is
//! `Header::origin_wall_ms` on the wall clock.

mod model;
mod reader;
mod writer;

pub use model::*;
pub use reader::{read, HistoryReader};
pub use writer::{Recorder, WriteStats, Writer};

/// The file a run's history lives in, inside the run directory.
pub const FILE_NAME: &str = "history.jsonl.gz";

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: not a squall history record: {source}")]
    Decode {
        path: String,
        line: u64,
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Format { path: String, message: String },
}

pub type Result<T> = std::result::Result<T, HistoryError>;
