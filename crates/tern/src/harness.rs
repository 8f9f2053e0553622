//! Drives `tern run` processes: spawn (optionally inside a network namespace), wait until the
//! QMP socket is ready (the child announces it on stderr: no polling), talk QMP, quit or kill.
//! Used by `tern demo`, the integration tests and the benchmarks.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tern_qmp::QmpClient;

use crate::run::READY_PREFIX;

/// How long a child may take to announce its QMP socket.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `tern run` child with a QMP connection.
pub struct TernProcess {
    child: Child,
    /// The QMP connection (negotiated).
    pub qmp: QmpClient,
    /// The QMP socket path.
    pub qmp_path: PathBuf,
    /// Its stderr lines, and a condition signalled on each new one.
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
    /// Set when the child's stderr reached EOF (it exited).
    stderr_closed: Arc<(Mutex<bool>, Condvar)>,
    name: String,
}

impl TernProcess {
    /// Spawns `exe run --qmp <qmp> <args...>` (inside `ip netns exec <ns>` when `netns` is set)
    /// and connects to its QMP socket once it is ready.
    pub fn spawn(
        name: &str,
        exe: &Path,
        qmp: &Path,
        args: &[String],
        netns: Option<&str>,
    ) -> Result<Self> {
        Self::spawn_with_env(name, exe, qmp, args, netns, &[])
    }

    /// [`TernProcess::spawn`] with extra environment variables (e.g. a test-only
    /// `TERN_X_TEST_HOLD`, `crate::migrate::fault`).
    pub fn spawn_with_env(
        name: &str,
        exe: &Path,
        qmp: &Path,
        args: &[String],
        netns: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let _ = std::fs::remove_file(qmp);
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.arg("run").arg("--qmp").arg(qmp).args(args);
        cmd.envs(env.iter().copied());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {}", exe.display()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("{name}: no stderr pipe"))?;
        let log = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stderr_closed = Arc::new((Mutex::new(false), Condvar::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (log2, closed) = (log.clone(), stderr_closed.clone());
        std::thread::Builder::new()
            .name(format!("log-{name}"))
            .spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.starts_with(READY_PREFIX) {
                        let _ = ready_tx.send(());
                    }
                    if let Ok(mut l) = log2.0.lock() {
                        l.push(line);
                    }
                    log2.1.notify_all();
                }
                *closed.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
                closed.1.notify_all();
            })
            .context("spawning the log reader thread")?;
        match ready_rx.recv_timeout(READY_TIMEOUT) {
            Ok(()) => {}
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                let lines = log.0.lock().map(|l| l.join("\n")).unwrap_or_default();
                bail!("{name} did not become ready (exit: {status:?}); its log:\n{lines}");
            }
        }
        let mut qmp_client = QmpClient::connect(qmp)
            .with_context(|| format!("{name}: connecting to QMP at {}", qmp.display()))?;
        qmp_client.set_timeout(Some(Duration::from_secs(60)));
        Ok(Self {
            child,
            qmp: qmp_client,
            qmp_path: qmp.to_path_buf(),
            log,
            stderr_closed,
            name: name.to_owned(),
        })
    }

    /// Runs a QMP command and returns its `return` value (errors carry the QMP error text).
    pub fn cmd(&mut self, name: &str, args: Value) -> Result<Value> {
        self.qmp
            .execute(name, args)
            .map_err(|e| anyhow!("{}: {name}: {e}", self.name))
    }

    /// Like [`TernProcess::cmd`] but returns the QMP error description instead of failing.
    pub fn cmd_err(&mut self, name: &str, args: Value) -> Result<String> {
        match self.qmp.execute(name, args) {
            Ok(v) => bail!("{}: {name} succeeded unexpectedly: {v}", self.name),
            Err(tern_qmp::ClientError::Qmp(e)) => Ok(e.desc),
            Err(e) => bail!("{}: {name}: {e}", self.name),
        }
    }

    /// Everything the child printed on stderr so far.
    pub fn log(&self) -> String {
        self.log.0.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Waits (at most `timeout`) until a stderr line contains `needle`; woken by each new
    /// line, nothing polls.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.log;
        let mut lines = lock.lock().unwrap_or_else(|p| p.into_inner());
        while !lines.iter().any(|l| l.contains(needle)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "{}: no log line '{needle}' within {timeout:?}:\n{}",
                    self.name,
                    lines.join("\n")
                );
            }
            lines = cv
                .wait_timeout(lines, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        Ok(())
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `quit` and waits for the process to exit.
    pub fn quit(mut self) -> Result<ExitStatus> {
        self.cmd("quit", json!({}))?;
        let st = self.child.wait().context("waiting for the child")?;
        Ok(st)
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process has exited, without blocking.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits (at most `timeout`) for the process to exit on its own and reaps it: the end of
    /// its stderr is the signal, so nothing polls.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.stderr_closed;
        let mut closed = lock.lock().unwrap_or_else(|p| p.into_inner());
        while !*closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            closed = cv
                .wait_timeout(closed, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        drop(closed);
        self.child.wait().context("waiting for the child")
    }

    /// The last heartbeat the VMM recorded: (seq, CLOCK_REALTIME ns).
    pub fn last_heartbeat(&mut self) -> Result<(u64, u64)> {
        let r = self.cmd("x-tern-heartbeats", json!({ "since": u64::MAX }))?;
        Ok((num(&r, "last-seq"), num(&r, "last-ns")))
    }

    /// Heartbeat records after `since`: (seq, ns).
    pub fn heartbeats_since(&mut self, since: u64) -> Result<Vec<(u64, u64)>> {
        let r = self.cmd("x-tern-heartbeats", json!({ "since": since }))?;
        Ok(r.get("records")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|p| Some((p.get(0)?.as_u64()?, p.get(1)?.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Waits until the VMM has recorded a heartbeat with sequence number > `seq` (the VMM
    /// blocks on its heartbeat condvar: no polling here); returns it as (seq, ns).
    pub fn wait_heartbeat_after(&mut self, seq: u64, timeout: Duration) -> Result<(u64, u64)> {
        let r = self.cmd(
            "x-tern-wait-heartbeat",
            json!({"after": seq, "timeout-ms": timeout.as_millis() as u64}),
        )?;
        Ok((num(&r, "seq"), num(&r, "ns")))
    }

    /// Waits until every vCPU's workload is past its setup (stats block state `running`), one
    /// heartbeat at a time (the VMM blocks until the next beat: no sleeping here).
    pub fn wait_workload_running(&mut self, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        // Start from the latest beat, so that each round waits for a new one.
        let mut seq = self.last_heartbeat()?.0;
        loop {
            let s = self.cmd("x-tern-guest-stats", json!({}))?;
            let all = s["vcpus"]
                .as_array()
                .is_some_and(|v| !v.is_empty() && v.iter().all(|c| c["state"] == "running"));
            if all {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "{}: the workload did not start within {timeout:?}: {s}",
                    self.name
                );
            }
            seq = self.wait_heartbeat_after(seq, timeout)?.0;
        }
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<Value> {
        self.cmd("query-migrate", json!({}))
    }

    /// Sets capabilities by name.
    pub fn set_caps(&mut self, caps: &[(&str, bool)]) -> Result<()> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, s)| json!({"capability": c, "state": s}))
            .collect();
        self.cmd("migrate-set-capabilities", json!({ "capabilities": list }))?;
        Ok(())
    }
}

impl Drop for TernProcess {
    fn drop(&mut self) {
        if self.try_exited().is_none() {
            self.kill();
        }
    }
}

/// Reads a u64 member of a JSON object (0 when absent).
pub fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// The migration status in a `query-migrate` reply.
pub fn status(v: &Value) -> &str {
    v.get("status").and_then(Value::as_str).unwrap_or("none")
}

/// The port of the first socket address of a destination's `query-migrate`.
pub fn incoming_port(v: &Value) -> Option<u16> {
    let a = v.get("socket-address")?.as_array()?.first()?;
    match a.get("port")? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        _ => None,
    }
}
