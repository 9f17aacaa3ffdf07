//! `squall`: the command line of Squall's load and chaos harness. This stage provisions the
//! real local stack (`squall stack ...`) and runs a produce/consume round trip through its
//! proxies (`squall smoke`).

mod capacity;
mod compare;
mod run;
mod smoke;
mod stack_cmd;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "squall",
    version,
    about = "Load and chaos harness for event-driven chat systems",
    long_about = "Squall starts a real local stack (three KRaft Kafka brokers, Redis, PostgreSQL and \
Toxiproxy, every link through its own proxy), drives load at it, injects faults and checks \
what survived.\n\nInstall the servers first with scripts/install-deps.sh."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true, env = "SQUALL_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Start, inspect, disturb and stop the local stack.
    Stack(stack_cmd::StackArgs),
    /// Run a scenario: bring up its topology, drive its load, record the history, stop
    /// what it started, print the headline figures. Exit 0 ran (and every check passed),
    /// 1 a check failed, 2 the run could not be carried out.
    Run(run::RunArgs),
    /// Judge a finished run again, offline, from its directory (history, readback,
    /// histograms, signals): every check of its scenario, with evidence. Exit 0 all
    /// passed, 1 a check failed, 2 the run directory could not be read.
    Check {
        /// A run directory (reports/<scenario>-<timestamp>/).
        run_dir: std::path::PathBuf,
    },
    /// Rebuild a run's report files (report.json, summary.md, report.html, junit.xml)
    /// from its directory. Exit 0 the run passed, 1 it failed, 2 unreadable.
    Report {
        /// A run directory (reports/<scenario>-<timestamp>/).
        run_dir: std::path::PathBuf,
    },
    /// Compare two runs' report.json: latency percentiles, throughput, check outcomes,
    /// with tolerances. Exit 1 on a regression.
    Compare(compare::CompareArgs),
    /// Step a scenario's offered rate up until its checks fail, repeating each step;
    /// report the highest sustainable rate and the curve (capacity.json, capacity.html).
    Capacity(capacity::CapacityArgs),
    /// Check a scenario file without running it: every problem with file:line:column.
    Validate {
        /// Scenario files.
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
    },
    /// Produce records through the proxies with an idempotent acks=all producer, consume
    /// them back, and print (and save) what was measured.
    Smoke(smoke::SmokeArgs),
}

fn validate(files: &[std::path::PathBuf]) -> ExitCode {
    let mut bad = 0;
    for f in files {
        match squall_scenario::load_file(f) {
            Ok(s) => println!("{}: ok (scenario {})", f.display(), s.name),
            Err(e) => {
                bad += 1;
                eprintln!("{e}");
            }
        }
    }
    if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,librdkafka=warn,rdkafka=warn,sqlx=warn,goose=error",
        )
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Stack(args) => stack_cmd::run(args).await,
        Command::Smoke(args) => smoke::run(args).await,
        Command::Run(args) => run::run(args).await,
        Command::Validate { files } => Ok(validate(&files)),
        Command::Check { run_dir } => run::check(&run_dir),
        Command::Report { run_dir } => run::report(&run_dir),
        Command::Compare(args) => compare::run(args),
        Command::Capacity(args) => capacity::run(args).await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("squall: error: {e:#}");
            // 2: could not run (the report contract reserves 1 for a failed gate).
            ExitCode::from(2)
        }
    }
}
