//! The state file (`<run dir>/state.json`): what `squall stack up` started, so that
//! `status`, `down` and fault injection from other processes act on exactly those pids.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::error::{Result, StackError};
use crate::links::{Link, LinkMode};
use crate::plan::PortPlan;
use crate::process::ProcessRecord;

pub const STATE_FILE: &str = "state.json";
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StackState {
    pub version: u32,
    pub run_dir: PathBuf,
    pub plan: PortPlan,
    pub partitions: i32,
    pub cluster_id: String,
    pub kafka_version: String,
    /// Unix milliseconds.
    pub started_at_ms: u128,
    pub processes: Vec<ProcessRecord>,
    /// Absent in state files written before direct links existed: proxied.
    #[serde(default)]
    pub link_mode: LinkMode,
    /// The proxies (none with direct links).
    pub links: Vec<Link>,
}

pub fn state_path(run_dir: &Path) -> PathBuf {
    run_dir.join(STATE_FILE)
}

impl StackState {
    pub fn load(run_dir: &Path) -> Result<Self> {
        let path = state_path(run_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StackError::NotRunning(path))
            }
            Err(e) => return Err(StackError::io(format!("reading {}", path.display()), e)),
        };
        let state: StackState = serde_json::from_str(&text).map_err(|e| StackError::BadState {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if state.version != STATE_VERSION {
            return Err(StackError::BadState {
                path,
                message: format!(
                    "version {} (this squall reads {STATE_VERSION}); stop that stack with the squall that started it",
                    state.version
                ),
            });
        }
        Ok(state)
    }

    /// Writes atomically (temp file + rename), so a reader never sees half a file.
    pub fn save(&self) -> Result<()> {
        let path = state_path(&self.run_dir);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(|e| StackError::BadState {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&tmp, text)
            .map_err(|e| StackError::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| StackError::io(format!("renaming to {}", path.display()), e))
    }

    pub fn process(&self, name: &str) -> Result<&ProcessRecord> {
        self.processes
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| StackError::Unknown {
                kind: "process",
                name: name.to_string(),
                known: self
                    .processes
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}
