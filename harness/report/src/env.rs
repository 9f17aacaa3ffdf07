//! The machine a report describes: cores, memory, OS and kernel, and the git commit of the
//! working directory. Every probe may fail (no /proc, no git, not a checkout): a missing
//! fact is `None`, never an error.

use crate::model::Environment;

/// Probes the machine this process runs on.
pub fn detect() -> Environment {
    Environment {
        source: "detected".into(),
        cores: std::thread::available_parallelism()
            .ok()
            .map(|n| n.get() as u32),
        memory_bytes: std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| mem_total(&t)),
        os: os_name(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()),
        git_commit: git_commit(),
    }
}

/// MemTotal (reported in kB) in bytes.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn os_name() -> String {
    let pretty = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim().trim_matches('"').to_string())
        });
    match pretty {
        Some(p) if !p.is_empty() => format!("{} ({p})", std::env::consts::OS),
        _ => std::env::consts::OS.to_string(),
    }
}

fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit())).then_some(commit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_total() {
        let text = "MemTotal:        8000000 kB\nMemFree:  1 kB\n";
        assert_eq!(mem_total(text), Some(8_000_000 * 1024));
        assert_eq!(mem_total("nothing"), None);
    }
}
