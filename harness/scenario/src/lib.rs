//! squall-scenario: the model of a Squall scenario file (`squall run <scenario.yaml>`):
//! its serde types, parsing, validation with `file:line:column` diagnostics for every
//! problem, and the small computations the rest of Squall needs from it (rate over time,
//! distribution sampling, fault windows, gate parsing). Pure logic: the only I/O is reading
//! the file in [`load_file`]. Every key is documented in `scenarios/REFERENCE.md`.

mod check;
mod distribution;
pub mod duration;
mod error;
mod fault;
mod gate;
mod http;
mod load;
mod locate;
mod parse;
mod rate;
mod rng;
mod scenario;
mod topology;
mod validate;

use std::path::Path;

pub use check::{Check, Checker, DuplicatePath, Projection};
pub use distribution::{inverse_normal_cdf, Distribution, WeightedValue};
pub use error::{Diagnostic, Problem, ScenarioError};
pub use fault::{
    Fault, FaultAction, FaultKind, OutageMode, RandomTimes, Repeat, ToxicKind, ToxicStream,
};
pub use gate::{CmpOp, Gate, GateError, GateScope, MetricRef, Threshold};
pub use http::{HttpEndpoint, HttpTraffic};
pub use load::{Abuse, AbuseKind, Conversations, Load, Mix, OpKind, Placement, SlowConsumers};
pub use rate::{Phase, Rate};
pub use scenario::Scenario;
pub use topology::{
    FanoutMode, Links, NodeSettings, PublishMode, StackOptions, StreamSettings, Topology,
    WorkerKind, Workers,
};
pub use validate::{BROKERS, MAX_MESSAGE_BYTES, MAX_NODES, MAX_USERS};

/// Reads, parses and validates the scenario at `path`.
pub fn load_file(path: &Path) -> Result<Scenario, ScenarioError> {
    let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_str(&text, &path.display().to_string())
}

/// Parses and validates scenario text; `file` names it in diagnostics.
pub fn parse_str(text: &str, file: &str) -> Result<Scenario, ScenarioError> {
    let outline = locate::Outline::parse(text);
    let mut diagnostics = match parse::deserialize(text, &outline) {
        Ok(scenario) => {
            let problems = scenario.validate();
            if problems.is_empty() {
                return Ok(scenario);
            }
            problems
                .into_iter()
                .map(|problem| {
                    let position = outline.locate(&problem.path);
                    Diagnostic {
                        line: position.line,
                        column: position.column,
                        path: problem.path,
                        message: problem.message,
                        expected: problem.expected,
                    }
                })
                .collect()
        }
        Err(diagnostics) => diagnostics,
    };
    // In file order, which is how a person fixes them; the sort is stable, so problems at
    // the same key keep the order the rules found them in.
    diagnostics.sort_by_key(|diagnostic| (diagnostic.line, diagnostic.column));
    Err(ScenarioError::Invalid {
        file: file.to_string(),
        diagnostics,
    })
}
