//! Where the stack of a run comes from when the run starts one (`--provider`): `local`,
//! the servers from installed binaries on 127.0.0.1 (`squall_stack::Stack`), or `docker`,
//! the docker-compose.yml topology from official images on a Docker engine through
//! testcontainers (`squall_stack::docker`, compiled in only with the cargo feature
//! `docker`). Either way the nodes and workers are processes of this machine that the run
//! owns; in docker mode the servers are containers, so the faults that act on server
//! processes are refused before anything starts.

use anyhow::{bail, Result};
use clap::ValueEnum;
use squall_scenario::{FaultAction, Scenario};
use squall_stack::Endpoints;
use std::path::Path;

use super::nemesis::Planned;

/// `--provider`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Provider {
    /// Kafka, Redis, PostgreSQL and Toxiproxy from installed binaries
    /// (scripts/install-deps.sh), on 127.0.0.1 from --base-port.
    Local,
    /// The docker-compose.yml topology from official images, started with testcontainers
    /// on the Docker engine at DOCKER_HOST (else /var/run/docker.sock) and removed at the
    /// end; needs squall built with `--features docker`.
    Docker,
}

/// Whether this build can start a docker stack.
pub const DOCKER_BUILT_IN: bool = cfg!(feature = "docker");

/// Why `--provider docker` cannot be used by this build, and how to get one that can.
pub const MISSING_FEATURE: &str =
    "--provider docker needs squall built with the cargo feature `docker`: \
cargo build --release -p squall --features docker (and a Docker engine at run time)";

/// Refuses, before anything starts, faults a docker stack cannot carry out: its brokers
/// are containers, not processes squall can kill and restart (`kill_broker`), and
/// finding the active controller runs Kafka's own tools from the local install
/// (`isolate_controller`). Link faults go through the stack's Toxiproxy and work.
pub fn check_faults(planned: &[Planned]) -> Result<()> {
    for p in planned {
        let kind = match p.action {
            FaultAction::KillBroker { .. } => "kill_broker",
            FaultAction::IsolateController {} => "isolate_controller",
            _ => continue,
        };
        bail!(
            "fault {kind} is not supported with --provider docker (the brokers are containers); \
run it on the local stack (--provider local). With docker: isolate_broker, partition_one_way, \
cut_kafka, redis_down, postgres_down, toxic and the node and workers faults"
        );
    }
    Ok(())
}

#[cfg(feature = "docker")]
mod built {
    use super::*;
    use anyhow::Context;

    /// A docker stack a run started; removed by `down` (or, failing that, when dropped).
    /// Boxed: it is one variant of the run's stack enum, beside a pointer.
    pub struct DockerStack(Box<squall_stack::docker::DockerStack>);

    impl DockerStack {
        /// Starts the compose topology with the scenario's partitions and start timeout.
        pub async fn start(scenario: &Scenario) -> Result<DockerStack> {
            let mut config = squall_stack::docker::DockerConfig::new("squall");
            config.partitions = scenario.topology.stack.partitions;
            config.start_timeout = scenario.topology.stack.start_timeout;
            let stack = squall_stack::docker::DockerStack::up(config)
                .await
                .context("starting the docker stack")?;
            Ok(DockerStack(Box::new(stack)))
        }

        pub fn endpoints(&self) -> &Endpoints {
            self.0.endpoints()
        }

        pub async fn save_logs(&self, dir: &Path) -> Result<()> {
            Ok(self.0.save_logs(dir).await?)
        }

        pub async fn down(self) -> Result<()> {
            let name = self.0.name().to_string();
            self.0
                .down()
                .await
                .with_context(|| format!("removing the docker stack {name}"))
        }
    }
}

#[cfg(not(feature = "docker"))]
mod built {
    use super::*;

    /// Without the `docker` feature no docker stack can exist (an empty enum), so the
    /// code that handles one compiles and never runs.
    pub enum DockerStack {}

    impl DockerStack {
        pub async fn start(_: &Scenario) -> Result<DockerStack> {
            bail!("{MISSING_FEATURE}")
        }

        pub fn endpoints(&self) -> &Endpoints {
            match *self {}
        }

        pub async fn save_logs(&self, _: &Path) -> Result<()> {
            match *self {}
        }

        pub async fn down(self) -> Result<()> {
            match self {}
        }
    }
}

pub use built::DockerStack;
