//! A shared real stack for integration-test binaries (feature `testing`): the stack starts
//! on first use, tests run one at a time on a libtest-mimic harness (so the output ends
//! with the usual test summary), every link is healed after each test, and the stack is
//! stopped by pid at the end — its run directory (all server logs) kept if a test failed.

use futures::future::BoxFuture;
use libtest_mimic::{Arguments, Failed, Trial};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

use crate::{PortPlan, Stack, StackConfig};

/// A test body against the shared stack.
pub type StackTest = for<'a> fn(&'a mut Stack) -> BoxFuture<'a, anyhow::Result<()>>;

/// A test body that starts (or fails to start) stacks of its own at the given base port.
pub type AloneTest = fn(u16) -> BoxFuture<'static, anyhow::Result<()>>;

pub struct SharedStack {
    rt: Runtime,
    base_port: u16,
    run_dir: PathBuf,
    stack: Mutex<Option<Stack>>,
}

impl SharedStack {
    /// `base_port_env` overrides `default_base`; the stack lives in `run_dir`.
    pub fn new(base_port_env: &str, default_base: u16, run_dir: PathBuf) -> Arc<Self> {
        let base_port = std::env::var(base_port_env)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_base);
        // Two suites started side by side with different base ports must not share a
        // stack directory (its state file names the pids of the other's servers).
        let run_dir = if base_port == default_base {
            run_dir
        } else {
            let name = run_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "stack".into());
            run_dir.with_file_name(format!("{name}-{base_port}"))
        };
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("cannot build a tokio runtime: {e}");
                std::process::exit(2);
            }
        };
        Arc::new(SharedStack {
            rt,
            base_port,
            run_dir,
            stack: Mutex::new(None),
        })
    }

    pub fn base_port(&self) -> u16 {
        self.base_port
    }

    /// A trial running `test` on the shared stack.
    pub fn trial(self: &Arc<Self>, name: &str, test: StackTest) -> Trial {
        let me = self.clone();
        Trial::test(name, move || me.with_stack(test))
    }

    /// A trial that runs on its own, given a base port 200 above the shared stack's.
    pub fn trial_alone(self: &Arc<Self>, name: &str, test: AloneTest) -> Trial {
        let me = self.clone();
        Trial::test(name, move || {
            me.rt
                .block_on(test(me.base_port + 200))
                .map_err(|e| Failed::from(format!("{e:#}")))
        })
    }

    fn with_stack(&self, test: StackTest) -> Result<(), Failed> {
        let mut guard = self
            .stack
            .lock()
            .map_err(|_| Failed::from("stack lock poisoned"))?;
        if guard.is_none() {
            let plan =
                PortPlan::from_base(self.base_port, 3).map_err(|e| Failed::from(e.to_string()))?;
            let stack = self
                .rt
                .block_on(Stack::up(StackConfig::new(&self.run_dir, plan)))
                .map_err(|e| Failed::from(format!("starting the shared stack: {e}")))?;
            *guard = Some(stack);
        }
        let stack = guard.as_mut().ok_or("no stack")?;
        self.rt
            .block_on(async {
                let result = test(stack).await;
                // A test's child processes may have restarted servers of this stack.
                stack.refresh();
                // Whatever the test did, leave every link restored for the next one.
                let healed = stack.heal().await;
                result.and(healed.map_err(Into::into))
            })
            .map_err(|e| Failed::from(format!("{e:#}")))
    }

    /// Runs `trials` one at a time, stops the stack, and exits with the harness's code.
    pub fn run(self: Arc<Self>, trials: Vec<Trial>) -> ! {
        let mut args = Arguments::from_args();
        // The tests share one stack and disturb it: they must not overlap.
        args.test_threads = Some(1);
        let conclusion = libtest_mimic::run(&args, trials);
        let keep = conclusion.has_failed();
        if let Ok(mut guard) = self.stack.lock() {
            if let Some(stack) = guard.take() {
                if keep {
                    eprintln!(
                        "a test failed: the stack's logs are kept in {}",
                        stack.state().run_dir.display()
                    );
                }
                match self.rt.block_on(stack.down(keep)) {
                    Ok(stopped) => eprintln!("stopped the shared stack: {}", stopped.join(", ")),
                    Err(e) => eprintln!("could not stop the shared stack: {e}"),
                }
            }
        }
        conclusion.exit()
    }
}

/// Polls `check` every 500 ms until it returns Ok (printing how long it took) or `timeout`
/// passes (then fails with its last error).
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(()) => {
                eprintln!("  {what}: after {:.1} s", start.elapsed().as_secs_f64());
                return Ok(());
            }
            Err(e) if start.elapsed() >= timeout => {
                anyhow::bail!("{what}: not within {timeout:?}: {e:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// `stack_test!(shared, "name", async_fn)`: a trial of `async fn(&mut Stack) -> Result<()>`.
#[macro_export]
macro_rules! stack_test {
    ($shared:expr, $name:expr, $f:path) => {{
        fn run(
            stack: &mut $crate::Stack,
        ) -> ::futures::future::BoxFuture<'_, ::anyhow::Result<()>> {
            Box::pin($f(stack))
        }
        $shared.trial($name, run)
    }};
}

/// `alone_test!(shared, "name", async_fn)`: a trial of `async fn(u16) -> Result<()>`.
#[macro_export]
macro_rules! alone_test {
    ($shared:expr, $name:expr, $f:path) => {{
        fn run(base: u16) -> ::futures::future::BoxFuture<'static, ::anyhow::Result<()>> {
            Box::pin($f(base))
        }
        $shared.trial_alone($name, run)
    }};
}
