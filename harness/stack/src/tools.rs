//! Finds the installed servers the stack runs (Java + Kafka jars, Toxiproxy, Redis,
//! PostgreSQL). A missing one is reported with the command that installs it.

use std::env;
use std::path::{Path, PathBuf};

use crate::error::{Result, StackError};

const INSTALL: &str = "scripts/install-deps.sh";

/// Paths of every program the stack starts.
#[derive(Debug, Clone)]
pub struct Tools {
    pub java: PathBuf,
    /// Folder holding the Kafka broker's jars (the class path is `<dir>/*`).
    pub kafka_lib: PathBuf,
    pub kafka_version: String,
    pub toxiproxy: PathBuf,
    pub redis_server: PathBuf,
    /// Folder with PostgreSQL's `initdb` and `postgres`.
    pub postgres_bin: PathBuf,
}

/// Where scripts/install-deps.sh puts what it installs.
pub fn squall_home() -> PathBuf {
    if let Some(h) = env::var_os("SQUALL_HOME") {
        return PathBuf::from(h);
    }
    env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".cache/squall")
}

fn on_path(program: &str) -> Option<PathBuf> {
    env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

fn missing(what: &str, looked_in: impl Into<String>) -> StackError {
    StackError::MissingTool {
        what: what.to_string(),
        looked_in: looked_in.into(),
        install: INSTALL.to_string(),
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has both initdb and postgres.
fn postgres_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file()).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

impl Tools {
    /// Locates every tool, or names the first one missing and how to install it.
    pub fn locate() -> Result<Self> {
        let home = squall_home();
        let java = env::var_os("JAVA_HOME")
            .map(|h| Path::new(&h).join("bin/java"))
            .filter(|p| p.is_file())
            .or_else(|| on_path("java"))
            .ok_or_else(|| missing("java (17 or newer)", "$JAVA_HOME/bin and PATH"))?;
        let kafka_dir = home.join("kafka");
        // Line 1: the version; line 2: a hash of the pom it was resolved from.
        let kafka_version = std::fs::read_to_string(kafka_dir.join("COMPLETE"))
            .map(|s| s.lines().next().unwrap_or_default().trim().to_string())
            .map_err(|_| missing("Apache Kafka broker jars", kafka_dir.display().to_string()))?;
        let toxiproxy = home.join("bin/toxiproxy-server");
        if !toxiproxy.is_file() {
            return Err(missing("toxiproxy-server", toxiproxy.display().to_string()));
        }
        let redis_server =
            on_path("redis-server").ok_or_else(|| missing("redis-server", "PATH"))?;
        let postgres_bin = postgres_bin_dir().ok_or_else(|| {
            missing(
                "PostgreSQL server (initdb, postgres)",
                "/usr/lib/postgresql/*/bin",
            )
        })?;
        Ok(Tools {
            java,
            kafka_lib: kafka_dir.join("lib"),
            kafka_version,
            toxiproxy,
            redis_server,
            postgres_bin,
        })
    }
}
