//! Starting and stopping the stack's server processes by pid. Every process gets its own
//! log file and process group, and is recorded with its start time so that a later
//! `squall stack down` (another process) signals exactly what was started, never a
//! recycled pid.

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Result, StackError};

/// What the stack needs to know about a process it started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub name: String,
    pub pid: i32,
    /// Start time in clock ticks since boot (/proc/<pid>/stat field 22): guards against pid reuse.
    pub start_ticks: u64,
    pub program: String,
    pub log: PathBuf,
    /// The signal that asks this program for a quick clean shutdown.
    pub stop_signal: StopSignal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopSignal {
    Term,
    /// PostgreSQL's "fast shutdown" (SIGTERM would wait for clients to leave).
    Int,
}

impl StopSignal {
    fn signal(self) -> Signal {
        match self {
            StopSignal::Term => Signal::SIGTERM,
            StopSignal::Int => Signal::SIGINT,
        }
    }
}

/// How to start one process.
pub struct Launch<'a> {
    pub name: &'a str,
    pub program: &'a Path,
    pub args: Vec<String>,
    pub log: PathBuf,
    pub cwd: Option<&'a Path>,
    /// Run as this (uid, gid) instead of the caller (PostgreSQL refuses root).
    pub user: Option<(u32, u32)>,
    /// Set in the process's environment, beside what it inherits.
    pub env: &'a [(&'a str, &'a str)],
    pub stop_signal: StopSignal,
}

/// Starts a process in its own process group with stdout and stderr appended to its log.
pub fn spawn(launch: Launch<'_>) -> Result<ProcessRecord> {
    let open_log = || {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&launch.log)
            .map_err(|e| StackError::io(format!("opening log {}", launch.log.display()), e))
    };
    let mut cmd = Command::new(launch.program);
    cmd.args(&launch.args)
        .stdin(Stdio::null())
        .stdout(open_log()?)
        .stderr(open_log()?)
        // Its own group: a Ctrl-C meant for squall does not reach the servers, and the
        // servers outlive `squall stack up` until `squall stack down` stops them.
        .process_group(0);
    cmd.envs(launch.env.iter().copied());
    if let Some(cwd) = launch.cwd {
        cmd.current_dir(cwd);
    }
    if let Some((uid, gid)) = launch.user {
        cmd.uid(uid).gid(gid);
    }
    let child = cmd.spawn().map_err(|source| StackError::Spawn {
        name: launch.name.to_string(),
        program: launch.program.display().to_string(),
        source,
    })?;
    let pid = child.id() as i32;
    // The Child handle is dropped without waiting: liveness is tracked by pid (see is_alive).
    drop(child);
    Ok(ProcessRecord {
        name: launch.name.to_string(),
        pid,
        start_ticks: start_ticks(pid).unwrap_or(0),
        program: launch.program.display().to_string(),
        log: launch.log,
        stop_signal: launch.stop_signal,
    })
}

/// Field 22 of /proc/<pid>/stat (start time), or None when the process is gone.
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after the closing ')' are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

fn proc_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// Reaps the process if it is our exited child, then tells whether it still runs.
/// A zombie counts as dead.
pub fn is_alive(record: &ProcessRecord) -> bool {
    let pid = Pid::from_raw(record.pid);
    // ECHILD (not our child) and "still running" both leave the answer to /proc.
    let _ = waitpid(pid, Some(WaitPidFlag::WNOHANG));
    match (proc_state(record.pid), start_ticks(record.pid)) {
        (Some('Z') | Some('X'), _) | (None, _) => false,
        (Some(_), ticks) => record.start_ticks == 0 || ticks == Some(record.start_ticks),
    }
}

/// Sends `signal` to the process if it is still the one we started.
pub fn signal(record: &ProcessRecord, signal: Signal) -> Result<()> {
    if !is_alive(record) {
        return Ok(());
    }
    match kill(Pid::from_raw(record.pid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(StackError::Command(format!(
            "could not send {signal} to {} (pid {}): {e}",
            record.name, record.pid
        ))),
    }
}

/// Asks the process to stop, waits up to `grace`, then kills it. Returns once it is gone.
pub async fn stop(record: &ProcessRecord, grace: Duration) -> Result<()> {
    signal(record, record.stop_signal.signal())?;
    let deadline = Instant::now() + grace;
    while is_alive(record) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if is_alive(record) {
        tracing::warn!(name = %record.name, pid = record.pid, "did not stop within {grace:?}; sending SIGKILL");
        signal(record, Signal::SIGKILL)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_alive(record) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Kills the process at once (SIGKILL), as a crash would, and waits until it is gone.
pub async fn kill_now(record: &ProcessRecord) -> Result<()> {
    signal(record, Signal::SIGKILL)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_alive(record) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Describes how the process ended, for error messages.
pub fn exit_description(record: &ProcessRecord) -> String {
    if is_alive(record) {
        "still running".into()
    } else {
        format!("pid {} is gone", record.pid)
    }
}

/// What to show of a log after a failure: the last lines that name an error (stack-trace
/// frames skipped), then the last `lines` lines. At most the final 64 KiB are read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut bytes = Vec::new();
    if f.read_to_end(&mut bytes).is_err() {
        return format!("(unreadable log at {})", path.display());
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    let is_error = |l: &&&str| {
        let t = l.trim_start();
        !t.starts_with("at ")
            && (t.contains("ERROR")
                || t.contains("FATAL")
                || t.contains("Exception")
                || t.starts_with("Caused by"))
    };
    let errors: Vec<&str> = all.iter().filter(is_error).copied().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if errors.is_empty() {
        tail
    } else {
        format!(
            "{}\n-- last lines --\n{tail}",
            errors[errors.len().saturating_sub(6)..].join("\n")
        )
    }
}
