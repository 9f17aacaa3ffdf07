//! The root of the model: one scenario file, as `squall run <scenario.yaml>` reads it.

use serde::{Deserialize, Serialize};

use crate::check::Check;
use crate::fault::Fault;
use crate::http::HttpTraffic;
use crate::load::Load;
use crate::topology::Topology;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// `[a-z0-9][a-z0-9-]*`, at most 64 characters; names the run's report folder.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Seeds every random choice of the run (users' actions, placement, fault times).
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default)]
    pub topology: Topology,
    pub load: Load,
    #[serde(default)]
    pub http: Vec<HttpTraffic>,
    #[serde(default)]
    pub faults: Vec<Fault>,
    #[serde(default)]
    pub checks: Vec<Check>,
}

fn default_seed() -> u64 {
    1
}

/// The top-level keys, in the order of the struct (for messages about unknown keys).
pub(crate) const TOP_LEVEL_KEYS: [&str; 8] = [
    "name",
    "description",
    "seed",
    "topology",
    "load",
    "http",
    "faults",
    "checks",
];
