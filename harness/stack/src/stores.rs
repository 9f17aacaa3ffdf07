//! Redis and PostgreSQL: a throwaway instance of each under the stack's control (own data
//! directory, own port), and the health checks that go through their proxies.

use std::path::Path;
use std::time::Duration;

use sqlx::Connection;

use crate::error::{Result, StackError};
use crate::plan::{PortPlan, LOOPBACK};
use crate::process::{self, Launch, ProcessRecord, StopSignal};
use crate::tools::Tools;

/// The database chatstream uses; created at start-up beside `postgres`.
pub const DATABASE: &str = "chatstream";

pub fn launch_redis(tools: &Tools, plan: &PortPlan, run_dir: &Path) -> Result<ProcessRecord> {
    let dir = run_dir.join("redis");
    std::fs::create_dir_all(&dir)
        .map_err(|e| StackError::io(format!("creating {}", dir.display()), e))?;
    process::spawn(Launch {
        name: "redis",
        program: &tools.redis_server,
        args: [
            "--bind",
            &LOOPBACK.to_string(),
            "--port",
            &plan.redis.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            &dir.display().to_string(),
        ]
        .map(String::from)
        .to_vec(),
        log: dir.join("redis.log"),
        cwd: Some(&dir),
        user: None,
        env: &[],
        stop_signal: StopSignal::Term,
    })
}

/// PING through the Redis proxy.
pub async fn redis_ping(url: &str, timeout: Duration) -> Result<()> {
    let fail = |e: String| StackError::Command(format!("redis at {url}: {e}"));
    let client = redis::Client::open(url).map_err(|e| fail(e.to_string()))?;
    let ping = async {
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| fail(e.to_string()))?;
        let pong: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(fail(format!("PING answered {pong:?}")))
        }
    };
    tokio::time::timeout(timeout, ping)
        .await
        .map_err(|_| fail(format!("no answer within {timeout:?}")))?
}

/// uid and gid of the `postgres` user: initdb and postgres refuse to run as root.
fn postgres_user() -> Result<(u32, u32)> {
    let user = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .ok_or_else(|| StackError::MissingTool {
            what: "the 'postgres' system user".into(),
            looked_in: "/etc/passwd".into(),
            install: "scripts/install-deps.sh (the postgresql package creates it)".into(),
        })?;
    Ok((user.uid.as_raw(), user.gid.as_raw()))
}

/// Creates a fresh cluster in `<run_dir>/postgres` (trust auth on loopback) and starts it.
pub async fn launch_postgres(
    tools: &Tools,
    plan: &PortPlan,
    run_dir: &Path,
) -> Result<ProcessRecord> {
    let (uid, gid) = postgres_user()?;
    let dir = run_dir.join("postgres");
    let data = dir.join("data");
    let sockets = dir.join("sockets");
    for d in [&dir, &sockets] {
        std::fs::create_dir_all(d)
            .map_err(|e| StackError::io(format!("creating {}", d.display()), e))?;
        nix::unistd::chown(d, Some(uid.into()), Some(gid.into()))
            .map_err(|e| StackError::io(format!("chown postgres {}", d.display()), e.into()))?;
    }
    let log = dir.join("postgres.log");
    if !data.join("PG_VERSION").exists() {
        let initdb = tools.postgres_bin.join("initdb");
        let mut cmd = tokio::process::Command::new(&initdb);
        cmd.args([
            "-D",
            &data.display().to_string(),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-instructions",
        ])
        .uid(uid)
        .gid(gid)
        .current_dir(&dir);
        let out = cmd.output().await.map_err(|source| StackError::Spawn {
            name: "postgres initdb".into(),
            program: initdb.display().to_string(),
            source,
        })?;
        if !out.status.success() {
            return Err(StackError::Command(format!(
                "initdb {} failed ({}); the postgres user must be able to enter every parent folder of the run directory: {}",
                data.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    process::spawn(Launch {
        name: "postgres",
        program: &tools.postgres_bin.join("postgres"),
        args: [
            "-D",
            &data.display().to_string(),
            "-p",
            &plan.postgres.to_string(),
            "-k",
            &sockets.display().to_string(),
            "-c",
            &format!("listen_addresses={LOOPBACK}"),
            "-c",
            "max_connections=200",
            // A process crash loses nothing with fsync off; only a machine crash would,
            // and this cluster is thrown away with its run directory.
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
        ]
        .map(String::from)
        .to_vec(),
        log,
        cwd: Some(&dir),
        user: Some((uid, gid)),
        env: &[],
        stop_signal: StopSignal::Int,
    })
}

/// `SELECT 1` at `url` (the `postgres` database), then creates the chatstream database if
/// absent.
pub async fn postgres_ready(url: &str, timeout: Duration) -> Result<()> {
    let fail = |e: String| StackError::Command(format!("postgres at {url}: {e}"));
    let check = async {
        let mut conn = sqlx::PgConnection::connect(url)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if one != 1 {
            return Err(fail(format!("SELECT 1 returned {one}")));
        }
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(DATABASE)
                .fetch_one(&mut conn)
                .await
                .map_err(|e| fail(e.to_string()))?;
        if !exists {
            sqlx::query(&format!("CREATE DATABASE {DATABASE}"))
                .execute(&mut conn)
                .await
                .map_err(|e| fail(e.to_string()))?;
        }
        Ok(())
    };
    tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| fail(format!("no answer within {timeout:?}")))?
}

/// Toxiproxy's environment (docker-compose.yml's too). Unset, `LOG_LEVEL` lets Toxiproxy log
/// at trace level: lines for every read and write of every link, CPU taken from the system
/// under test (15 MB in the first two minutes of `steady`).
pub const TOXIPROXY_ENV: &[(&str, &str)] = &[("LOG_LEVEL", "info")];

pub fn launch_toxiproxy(tools: &Tools, plan: &PortPlan, run_dir: &Path) -> Result<ProcessRecord> {
    let dir = run_dir.join("toxiproxy");
    std::fs::create_dir_all(&dir)
        .map_err(|e| StackError::io(format!("creating {}", dir.display()), e))?;
    process::spawn(Launch {
        name: "toxiproxy",
        program: &tools.toxiproxy,
        args: [
            "-host",
            &LOOPBACK.to_string(),
            "-port",
            &plan.toxiproxy_api.to_string(),
        ]
        .map(String::from)
        .to_vec(),
        log: dir.join("toxiproxy.log"),
        cwd: Some(&dir),
        user: None,
        env: TOXIPROXY_ENV,
        stop_signal: StopSignal::Term,
    })
}
