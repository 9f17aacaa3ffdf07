//! `squall stack ...`: the command-line face of squall-stack (up, status, down, and the
//! link and broker disturbances used by hand in resilience reviews).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use squall_stack::links::LinkMode;
use squall_stack::plan::{DEFAULT_BASE_PORT, DEFAULT_BROKERS};
use squall_stack::{PortPlan, Stack, StackConfig, StackStatus};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args)]
pub struct StackArgs {
    /// Folder holding the stack's data, logs and state file (removed by `down`).
    #[arg(
        long,
        global = true,
        env = "SQUALL_RUN_DIR",
        default_value = ".squall/stack"
    )]
    run_dir: PathBuf,
    #[command(subcommand)]
    command: StackCommand,
}

#[derive(Subcommand)]
enum StackCommand {
    /// Start three Kafka brokers (KRaft), Redis, PostgreSQL and Toxiproxy on 127.0.0.1,
    /// wait for their health checks, create the seed topics and print the endpoints.
    Up(UpArgs),
    /// Report each process, each link (proxy) and each server's health check.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop exactly the processes `up` started (by pid) and remove the run directory.
    Down {
        /// Keep the run directory (data and logs) for a post-mortem.
        #[arg(long)]
        keep: bool,
    },
    /// Cut one link (its proxy refuses connections); see `status` for link names.
    Cut { link: String },
    /// Restore one cut link.
    Restore { link: String },
    /// Cut a broker off from all its peers in both directions (clients still reach it).
    Isolate { broker: u8 },
    /// Cut only the traffic broker FROM sends to broker TO.
    PartitionOneWay { from: u8, to: u8 },
    /// Restore every link and remove every toxic.
    Heal,
    /// kill -9 one broker.
    KillBroker { broker: u8 },
    /// Start a killed or stopped broker again.
    StartBroker { broker: u8 },
}

#[derive(Args)]
struct UpArgs {
    /// First port of the default port plan (see the README's port plan).
    #[arg(long, env = "SQUALL_BASE_PORT", default_value_t = DEFAULT_BASE_PORT)]
    base_port: u16,
    /// A JSON port plan (every port given explicitly); overrides --base-port.
    #[arg(long)]
    port_plan: Option<PathBuf>,
    /// Partitions of each seed topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Seconds each server may take to pass its health check.
    #[arg(long, default_value_t = 120)]
    start_timeout: u64,
    /// `proxied`: every link through its own Toxiproxy proxy (faults can cut it).
    /// `direct`: no Toxiproxy, clients and brokers reach the servers themselves (for
    /// measuring the system alone; link faults are refused).
    #[arg(long, value_enum, default_value_t = LinksArg::Proxied)]
    links: LinksArg,
    /// Print the endpoints as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LinksArg {
    Proxied,
    Direct,
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

pub async fn run(args: StackArgs) -> Result<ExitCode> {
    let run_dir = absolute(&args.run_dir)?;
    match args.command {
        StackCommand::Up(up) => {
            let plan = match &up.port_plan {
                Some(file) => {
                    let text = std::fs::read_to_string(file)
                        .with_context(|| format!("reading port plan {}", file.display()))?;
                    serde_json::from_str::<PortPlan>(&text)
                        .with_context(|| format!("port plan {} is not a valid plan (see `squall stack status --json` for the form)", file.display()))?
                }
                None => PortPlan::from_base(up.base_port, DEFAULT_BROKERS)?,
            };
            let mut config = StackConfig::new(&run_dir, plan);
            config.partitions = up.partitions;
            config.start_timeout = Duration::from_secs(up.start_timeout);
            config.links = match up.links {
                LinksArg::Proxied => LinkMode::Proxied,
                LinksArg::Direct => LinkMode::Direct,
            };
            let started = std::time::Instant::now();
            let stack = Stack::up(config).await.context("starting the stack")?;
            let endpoints = stack.endpoints();
            if up.json {
                println!("{}", serde_json::to_string_pretty(&endpoints)?);
            } else {
                println!(
                    "stack is up in {:.1} s (run dir {})",
                    started.elapsed().as_secs_f64(),
                    run_dir.display()
                );
                println!("  kafka bootstrap  {}", endpoints.kafka_bootstrap);
                println!("  redis            {}", endpoints.redis_url);
                println!("  postgres         {}", endpoints.postgres_url);
                match stack.link_mode() {
                    LinkMode::Proxied => {
                        println!("  toxiproxy api    {}", endpoints.toxiproxy_api)
                    }
                    LinkMode::Direct => println!("  links            direct (no Toxiproxy)"),
                }
                println!(
                    "  kafka {} (cluster {}), {} links",
                    stack.state().kafka_version,
                    stack.state().cluster_id,
                    stack.state().links.len()
                );
                println!(
                    "stop it with: squall stack down --run-dir {}",
                    run_dir.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        StackCommand::Status { json } => {
            let stack = Stack::attach(&run_dir)?;
            let status = stack.status().await;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "healthy": status.healthy(),
                        "plan": stack.plan(),
                        "status": status,
                    }))?
                );
            } else {
                print_status(&status);
            }
            Ok(if status.healthy() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        StackCommand::Down { keep } => {
            let stack = Stack::attach(&run_dir)?;
            let stopped = stack.down(keep).await?;
            println!(
                "stopped {} process(es): {}",
                stopped.len(),
                stopped.join(", ")
            );
            if keep {
                println!("run directory kept: {}", run_dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        StackCommand::Cut { link } => {
            Stack::attach(&run_dir)?.cut(&link).await?;
            println!("cut {link}");
            Ok(ExitCode::SUCCESS)
        }
        StackCommand::Restore { link } => {
            Stack::attach(&run_dir)?.restore(&link).await?;
            println!("restored {link}");
            Ok(ExitCode::SUCCESS)
        }
        StackCommand::Isolate { broker } => {
            let cut = Stack::attach(&run_dir)?.isolate_broker(broker).await?;
            println!("isolated kafka-{broker}: cut {}", cut.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        StackCommand::PartitionOneWay { from, to } => {
            let cut = Stack::attach(&run_dir)?.partition_one_way(from, to).await?;
            println!("cut kafka-{from} -> kafka-{to}: {}", cut.join(", "));
            Ok(ExitCode::SUCCESS)
        }
        StackCommand::Heal => {
            Stack::attach(&run_dir)?.heal().await?;
            println!("every link restored, every toxic removed");
            Ok(ExitCode::SUCCESS)
        }
        StackCommand::KillBroker { broker } => {
            Stack::attach(&run_dir)?.kill_broker(broker).await?;
            println!("killed kafka-{broker} (SIGKILL)");
            Ok(ExitCode::SUCCESS)
        }
        StackCommand::StartBroker { broker } => {
            Stack::attach(&run_dir)?
                .start_broker(broker, Duration::from_secs(120))
                .await?;
            println!("kafka-{broker} is back in the cluster");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check(ok: bool) -> &'static str {
    if ok {
        "ok  "
    } else {
        "FAIL"
    }
}

fn print_status(s: &StackStatus) {
    println!("run dir {}", s.run_dir.display());
    println!("processes:");
    for p in &s.processes {
        println!(
            "  {} {:<10} pid {:<8} log {}",
            check(p.alive),
            p.name,
            p.pid,
            p.log.display()
        );
    }
    println!("servers:");
    match &s.kafka_brokers {
        Ok(b) => println!(
            "  {} kafka      brokers {b:?} via {}",
            check(b.len() == 3),
            s.endpoints.kafka_bootstrap
        ),
        Err(e) => println!("  FAIL kafka      {e}"),
    }
    match &s.redis {
        Ok(()) => println!("  ok   redis      PING via {}", s.endpoints.redis_url),
        Err(e) => println!("  FAIL redis      {e}"),
    }
    match &s.postgres {
        Ok(()) => println!(
            "  ok   postgres   SELECT 1 via {}",
            s.endpoints.postgres_url
        ),
        Err(e) => println!("  FAIL postgres   {e}"),
    }
    match s.link_mode {
        LinkMode::Proxied => println!("links:"),
        LinkMode::Direct => println!("links: direct (no proxies, none can be cut)"),
    }
    if let Some(e) = &s.links_error {
        println!("  FAIL toxiproxy does not answer: {e}");
    }
    for l in &s.links {
        let state = if !l.enabled {
            "CUT "
        } else if l.toxics.is_empty() {
            "ok  "
        } else {
            "TOXIC"
        };
        println!(
            "  {state} {:<28} {:<20} -> {:<16} {}",
            l.name,
            l.listen,
            l.upstream,
            l.toxics.join(" ")
        );
    }
    println!("healthy: {}", s.healthy());
}
