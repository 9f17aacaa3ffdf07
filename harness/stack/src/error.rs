//! The stack's typed errors: each names what went wrong and, where there is one, what to do.

use std::path::PathBuf;

/// Everything that can go wrong while provisioning, inspecting or disturbing the stack.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{what} is not installed (looked in {looked_in}); install it with: {install}")]
    MissingTool {
        what: String,
        looked_in: String,
        install: String,
    },

    #[error("a stack is already running from {state_file} (pids {pids}); stop it with `squall stack down --run-dir {run_dir}` or pick another --run-dir")]
    AlreadyRunning {
        state_file: PathBuf,
        run_dir: PathBuf,
        pids: String,
    },

    #[error(
        "no stack state at {0}; start one with `squall stack up` (or pass the --run-dir it used)"
    )]
    NotRunning(PathBuf),

    #[error("port {addr} ({purpose}) is already taken; stop whatever holds it or choose another port plan (--base-port or --port-plan)")]
    PortTaken { addr: String, purpose: String },

    #[error("invalid port plan: {0}")]
    InvalidPlan(String),

    #[error("{name} exited during start-up ({status}); last lines of {log}:\n{tail}")]
    ProcessDied {
        name: String,
        status: String,
        log: PathBuf,
        tail: String,
    },

    #[error("{name} did not become healthy within {secs} s: {last_error}; see {log}")]
    NotHealthy {
        name: String,
        secs: u64,
        last_error: String,
        log: PathBuf,
    },

    #[error("could not start {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("{what}: the stack in {run_dir} has direct links (no proxies), so no link can be cut or degraded; start it with proxied links (the default; `links: proxied` in a scenario)")]
    DirectLinks { what: String, run_dir: PathBuf },

    #[error("toxiproxy at {endpoint}: {message}")]
    Toxiproxy { endpoint: String, message: String },

    #[error("kafka: {0}")]
    Kafka(String),

    #[error("{0}")]
    Command(String),

    #[error("state file {path} is unreadable: {message}")]
    BadState { path: PathBuf, message: String },

    #[error("no such {kind} '{name}' in this stack (known: {known})")]
    Unknown {
        kind: &'static str,
        name: String,
        known: String,
    },
}

impl StackError {
    /// Wraps an I/O error with the action that failed (the path, the command, the port).
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StackError::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = StackError> = std::result::Result<T, E>;
