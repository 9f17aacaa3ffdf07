//! CPU time of processes and their trees, from `/proc`: what the run's signals and the
//! benchmarks use to say which process took the cores. PostgreSQL does its work in
//! backends forked per connection, so a server is read as its whole process tree.

use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Clock ticks per second, the unit of `/proc`'s CPU times.
pub fn ticks_per_second() -> f64 {
    // sysconf(_SC_CLK_TCK) is 100 on every Linux this runs on.
    100.0
}

/// (ppid, utime + stime in ticks) from `/proc/<pid>/stat`.
pub fn read_stat(pid: i32) -> Option<(i32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ppid: i32 = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// Every process's parent and CPU ticks, read once per sample.
pub fn process_table() -> HashMap<i32, (i32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, read_stat(pid)?)))
        .collect()
}

/// CPU ticks of `pid` and of its living descendants that are not watched themselves:
/// PostgreSQL does its work in backends forked per connection, so its postmaster alone
/// would read as idle. (Descendants that exited between two samples are not counted:
/// compare two readings with [`tree_ticks_between`], not by their sums.)
pub fn tree_ticks(pid: i32, table: &HashMap<i32, (i32, u64)>, watched: &HashSet<i32>) -> u64 {
    tree_ticks_by_pid(pid, table, watched).values().sum()
}

/// What [`tree_ticks`] sums, process by process.
pub fn tree_ticks_by_pid(
    pid: i32,
    table: &HashMap<i32, (i32, u64)>,
    watched: &HashSet<i32>,
) -> HashMap<i32, u64> {
    let mut by_pid = HashMap::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        if let Some((_, ticks)) = table.get(&p) {
            by_pid.insert(p, *ticks);
        }
        stack.extend(
            table
                .iter()
                .filter(|(child, (ppid, _))| *ppid == p && !watched.contains(child))
                .map(|(child, _)| *child),
        );
    }
    by_pid
}

/// CPU ticks a process tree used between two readings taken process by process: what
/// each process that is in both added, plus all of each process born since. A process
/// that exited in between takes only its last fraction of a second with it; the
/// difference of the two sums would lose its whole life (PostgreSQL's backends end with
/// their connections, and a second of PostgreSQL then read as 0.0 cores, three or four
/// times per `steady` run).
pub fn tree_ticks_between(before: &HashMap<i32, u64>, now: &HashMap<i32, u64>) -> u64 {
    now.iter()
        .map(|(pid, ticks)| ticks.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum()
}

/// Whether the kernel lists each task's children (`/proc/<pid>/task/<tid>/children`,
/// CONFIG_PROC_CHILDREN): then a process tree is read on its own, not the whole table.
pub fn children_files() -> bool {
    Path::new("/proc/thread-self/children").exists()
}

/// The children of `pid`, from the children files of its tasks (empty when it is gone).
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok()),
            );
        }
    }
    out
}

/// What `tree_ticks` counts (`pid` and its living descendants that are not watched
/// themselves), reading only that tree's files; None when `pid` is gone. Reading every
/// process's stat each second, as `process_table` does, was about a fifteenth of
/// squall's own CPU during a chat load on a machine running a hundred processes.
pub fn tree_ticks_direct(pid: i32, watched: &HashSet<i32>) -> Option<u64> {
    Some(tree_ticks_direct_by_pid(pid, watched)?.values().sum())
}

/// What [`tree_ticks_direct`] sums, process by process.
pub fn tree_ticks_direct_by_pid(pid: i32, watched: &HashSet<i32>) -> Option<HashMap<i32, u64>> {
    let (_, ticks) = read_stat(pid)?;
    let mut by_pid = HashMap::from([(pid, ticks)]);
    let mut stack = children(pid);
    while let Some(p) = stack.pop() {
        if watched.contains(&p) {
            continue;
        }
        if let Some((_, ticks)) = read_stat(p) {
            by_pid.insert(p, ticks);
            stack.extend(children(p));
        }
    }
    Some(by_pid)
}

/// CPU seconds of `pid`'s tree (`pid` and its living descendants not in `watched`), read
/// the cheapest way this kernel allows; None when `pid` is gone.
pub fn tree_cpu_seconds(pid: i32, watched: &HashSet<i32>) -> Option<f64> {
    let ticks = if children_files() {
        tree_ticks_direct(pid, watched)?
    } else {
        let table = process_table();
        table.get(&pid)?;
        tree_ticks(pid, &table, watched)
    };
    Some(ticks as f64 / ticks_per_second())
}

/// CPU seconds the whole machine has been busy (every state but idle and iowait), from
/// `/proc/stat`: beside a process's figure, what else took the cores.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    Some(busy as f64 / ticks_per_second())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_tree_read_directly_is_the_tree_the_table_gives() {
        if !children_files() {
            return; // a kernel without children files: the table is used anyway
        }
        let me = std::process::id() as i32;
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep runs");
        let pid = child.id() as i32;
        assert!(children(me).contains(&pid), "{:?}", children(me));
        let none = HashSet::new();
        let table = process_table();
        let direct = tree_ticks_direct(me, &none).expect("this process");
        let from_table = tree_ticks(me, &table, &none);
        // Read a moment apart: this process may have used a few ticks in between.
        assert!(
            direct >= from_table && direct <= from_table + 20,
            "{direct} vs {from_table}"
        );
        let watched: HashSet<i32> = [pid].into();
        assert!(tree_ticks_direct(me, &watched).is_some());
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            tree_ticks_direct(pid, &none).is_none(),
            "a reaped process is gone"
        );
    }

    #[test]
    fn a_tree_keeps_what_its_exited_processes_used() {
        // The postmaster (1) used 5 ticks, backend 2 used 40 and exited, backend 3 used
        // 10, backend 4 was born and used 7.
        let before = HashMap::from([(1, 100), (2, 500), (3, 50)]);
        let now = HashMap::from([(1, 105), (3, 60), (4, 7)]);
        assert_eq!(tree_ticks_between(&before, &now), 5 + 10 + 7);
        // The sums' difference would read the tree as idle (and worse).
        let sum = |m: &HashMap<i32, u64>| m.values().sum::<u64>();
        assert!(sum(&now) < sum(&before));
        assert_eq!(tree_ticks_between(&now, &now), 0);
    }

    #[test]
    fn busy_time_of_the_machine_and_a_tree_are_read() {
        let me = std::process::id() as i32;
        let busy = machine_busy_seconds().expect("/proc/stat");
        let mine = tree_cpu_seconds(me, &HashSet::new()).expect("this process");
        assert!(busy > 0.0 && mine >= 0.0);
        assert!(tree_cpu_seconds(i32::MAX, &HashSet::new()).is_none());
    }
}
