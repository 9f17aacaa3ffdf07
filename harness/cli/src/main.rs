//! `squall`: the command line of Squall's load and chaos harness. This stage provisions the
//! real local stack (`squall stack ...`) and runs a produce/consume round trip through its
//! proxies (`squall smoke`).

/// mimalloc instead of glibc malloc: a run allocates a few short-lived buffers per frame
/// (frames, history records), many of them freed on another thread than the one that
/// allocated them (the history writer's); glibc's malloc and free were 6% of squall's CPU
/// in a chat load. Measured (README, Measurements): 5% more messages per CPU-second, for a
/// higher peak RSS (67 MiB where glibc's was 39 MiB at 1,000 users).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
Toxiproxy, every link through its own proxy, or direct links for measuring the system alone), \
drives load at it, injects faults and checks what survived.\n\nInstall the servers first with scripts/install-deps.sh."
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true, env = "SQUALL_LOG_FORMAT")]
    log_format: LogFormat,
    /// Worker threads of the runtime that runs everything (the users' WebSockets, the
    /// pacer, HTTP load, the sampler). Default: for `run`, one per 2,000 operations a second
    /// the scenario offers at its peak, at most one per core; otherwise one per core.
    #[arg(long, global = true, env = "SQUALL_RUNTIME_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    runtime_threads: Option<u16>,
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

/// The runtime's worker threads: `--runtime-threads`, else for `run` one per
/// [`OPS_PER_THREAD`] operations a second of its scenario (a load of a few thousand
/// messages a second keeps one thread far from busy, and a second worker costs more than
/// it gives: each burst of frames wakes the parked one to steal a task or two, a futex
/// call and a context switch for microseconds of work; one worker instead of two took 11%
/// less CPU per message at 500 messages a second: README, Measurements), at most one per
/// core.
fn runtime_threads(cli: &Cli) -> usize {
    if let Some(n) = cli.runtime_threads {
        return usize::from(n);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match &cli.command {
        Command::Run(args) => match squall_scenario::load_file(args.scenario()) {
            // Unreadable: `run` says why, on any runtime.
            Err(_) => 1,
            Ok(s) => {
                let http: f64 = s.http.iter().map(|h| h.rate).sum();
                (((s.load.rate.peak() + http) / OPS_PER_THREAD).ceil() as usize).clamp(1, cores)
            }
        },
        _ => cores,
    }
}

/// Operations a second (the scenario's peak rate and its HTTP requests) per runtime worker
/// thread by default: squall spent about 0.15 ms of CPU per chat message in a chat load,
/// so one thread is about a third busy at this rate.
const OPS_PER_THREAD: f64 = 2_000.0;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_threads(&cli))
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("squall: error: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("squall: error: {e:#}");
            // 2: could not run (the report contract reserves 1 for a failed gate).
            ExitCode::from(2)
        }
    }
}
