//! Shared helpers for Tern's integration tests: real `tern run` processes, real KVM guests,
//! real sockets. Every helper panics with a useful message; every [`Vm`] still alive when a
//! test panics prints its process's log (stderr) while it is dropped, and the process is killed.

#![allow(dead_code)]

pub mod kernels;
pub mod multi_proxy;
pub mod multifd;
pub mod postcopy;
pub mod proxy;
pub mod tls;

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tern::harness::{incoming_port, num, status, TernProcess};

/// Generous default: the shared 2-core test machine is often busy.
pub const T: Duration = Duration::from_secs(60);
/// How long a successful migration of a small guest may take at most before the test fails.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);

/// The `tern` binary under test.
pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tern"))
}

/// A fresh temporary directory for one test.
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tern-it-")
        .tempdir()
        .expect("creating a temp dir")
}

/// The shape and workload of a test machine (`tern run` flags).
#[derive(Debug, Clone)]
pub struct Machine {
    pub memory_mib: u64,
    pub vcpus: u32,
    pub workload: &'static str,
    pub work_mem: u64,
    pub rate: u64,
    pub extra: Vec<String>,
}

impl Machine {
    pub fn new(workload: &'static str, vcpus: u32, work_mem: u64) -> Self {
        Self {
            memory_mib: 256,
            vcpus,
            workload,
            work_mem,
            rate: 0,
            extra: Vec::new(),
        }
    }

    pub fn idle(work_mem: u64) -> Self {
        Self::new("idle", 1, work_mem)
    }

    pub fn pattern(vcpus: u32, work_mem: u64) -> Self {
        Self::new("pattern", vcpus, work_mem)
    }

    pub fn dirty(vcpus: u32, work_mem: u64, rate: u64) -> Self {
        let mut m = Self::new("dirty", vcpus, work_mem);
        m.rate = rate;
        m
    }

    pub fn memory(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.extra.push(a.into());
        self
    }

    /// `tern run` arguments (without `--qmp`).
    pub fn args(&self) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--memory".into(),
            format!("{}M", self.memory_mib),
            "--vcpus".into(),
            self.vcpus.to_string(),
            "--workload".into(),
            self.workload.into(),
            "--work-mem".into(),
            self.work_mem.to_string(),
            "--rate".into(),
            self.rate.to_string(),
        ];
        v.extend(self.extra.iter().cloned());
        v
    }

    /// Bytes of guest RAM a `pmemsave` must cover to include the stats blocks and the whole
    /// workload area.
    pub fn dump_bytes(&self) -> u64 {
        tern_guest::layout::WORK_BASE + (self.work_mem << 20)
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

/// A `tern run` child: a [`TernProcess`] that prints its log if the test panics.
pub struct Vm {
    pub name: String,
    p: Option<TernProcess>,
}

impl Deref for Vm {
    type Target = TernProcess;
    fn deref(&self) -> &TernProcess {
        self.p.as_ref().expect("process already quit")
    }
}

impl DerefMut for Vm {
    fn deref_mut(&mut self) -> &mut TernProcess {
        self.p.as_mut().expect("process already quit")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(p) = &self.p {
                eprintln!(
                    "----- log of {} (pid {}) -----\n{}\n----- end of {} -----",
                    self.name,
                    p.pid(),
                    p.log(),
                    self.name
                );
            }
        }
    }
}

/// Spawns `tern run --qmp DIR/NAME.qmp ARGS` and waits for its ready line.
pub fn spawn(dir: &Path, name: &str, args: &[String]) -> Vm {
    spawn_in(dir, name, args, None)
}

/// [`spawn`] inside network namespace `netns` (`ip netns exec`, which execs: the child's pid is
/// `tern`'s own).
pub fn spawn_in(dir: &Path, name: &str, args: &[String], netns: Option<&str>) -> Vm {
    spawn_with_env(dir, name, args, netns, &[])
}

/// [`spawn_in`] with extra environment variables (a test-only `TERN_X_TEST_HOLD`).
pub fn spawn_with_env(
    dir: &Path,
    name: &str,
    args: &[String],
    netns: Option<&str>,
    env: &[(&str, &str)],
) -> Vm {
    let qmp = dir.join(format!("{name}.qmp"));
    let mut args = args.to_vec();
    args.extend([
        "--serial".into(),
        format!("file:{}", dir.join(format!("{name}.serial")).display()),
    ]);
    let p = TernProcess::spawn_with_env(name, &exe(), &qmp, &args, netns, env)
        .unwrap_or_else(|e| panic!("spawning {name}: {e:#}"));
    Vm {
        name: name.to_owned(),
        p: Some(p),
    }
}

/// Boots `m` and waits for its first heartbeat.
pub fn boot(dir: &Path, name: &str, m: &Machine) -> Vm {
    let mut vm = spawn(dir, name, &m.args());
    vm.hb_after(0, T);
    vm
}

/// A destination for machine `m` (same memory and vCPUs), `--incoming defer`.
pub fn dest(dir: &Path, name: &str, m: &Machine) -> Vm {
    dest_with(dir, name, m.memory_mib, m.vcpus, &[])
}

/// A destination `tern run --memory M --vcpus N --incoming defer EXTRA`.
pub fn dest_with(dir: &Path, name: &str, memory_mib: u64, vcpus: u32, extra: &[&str]) -> Vm {
    spawn(dir, name, &dest_args(memory_mib, vcpus, extra))
}

/// The arguments of [`dest_with`].
pub fn dest_args(memory_mib: u64, vcpus: u32, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--memory".into(),
        format!("{memory_mib}M"),
        "--vcpus".into(),
        vcpus.to_string(),
        "--incoming".into(),
        "defer".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

impl Vm {
    /// Wraps a process started some other way.
    pub fn wrap(name: &str, p: TernProcess) -> Vm {
        Vm {
            name: name.to_owned(),
            p: Some(p),
        }
    }

    /// Runs a QMP command; panics (with the process log) on error.
    pub fn c(&mut self, cmd: &str, args: Value) -> Value {
        match self.cmd(cmd, args) {
            Ok(v) => v,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// Runs a QMP command that must fail with a QMP error; returns its description.
    pub fn err(&mut self, cmd: &str, args: Value) -> String {
        match self.cmd_err(cmd, args) {
            Ok(d) => d,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// Waits for a heartbeat with seq > `after`; returns its seq.
    pub fn hb_after(&mut self, after: u64, timeout: Duration) -> u64 {
        let name = self.name.clone();
        match self.wait_heartbeat_after(after, timeout) {
            Ok((seq, _)) => seq,
            Err(e) => panic!("{name}: no heartbeat after #{after} within {timeout:?}: {e:#}"),
        }
    }

    /// Asserts that no heartbeat after `after` arrives within `window` (the guest is stopped).
    pub fn assert_no_hb_after(&mut self, after: u64, window: Duration) {
        let name = self.name.clone();
        let r = self.cmd(
            "x-tern-wait-heartbeat",
            json!({"after": after, "timeout-ms": window.as_millis() as u64}),
        );
        match r {
            Err(e) => assert!(
                format!("{e:#}").contains("no heartbeat"),
                "{name}: x-tern-wait-heartbeat failed for another reason: {e:#}"
            ),
            Ok(v) => panic!(
                "{name}: heartbeat {v} arrived after #{after} while the guest should be stopped"
            ),
        }
    }

    /// The last heartbeat seq the VMM recorded.
    pub fn last_seq(&mut self) -> u64 {
        match self.last_heartbeat() {
            Ok((s, _)) => s,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// Waits for a few heartbeats (proof the guest runs) and returns the last one's seq.
    pub fn assert_running_guest(&mut self, beats: u64) -> u64 {
        let s0 = self.last_seq();
        self.hb_after(s0 + beats, T)
    }

    /// `query-status`'s `status`.
    pub fn run_status(&mut self) -> String {
        let v = self.c("query-status", json!({}));
        v.get("status")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned()
    }

    /// `query-migrate`.
    pub fn qm(&mut self) -> Value {
        self.c("query-migrate", json!({}))
    }

    /// `query-migrate`'s `status` ("none" when absent).
    pub fn mig_status(&mut self) -> String {
        let q = self.qm();
        status(&q).to_owned()
    }

    /// Turns capabilities on or off (panics on error).
    pub fn caps(&mut self, caps: &[(&str, bool)]) {
        if let Err(e) = self.set_caps(caps) {
            panic!("{e:#}");
        }
    }

    /// `migrate-set-parameters`.
    pub fn params(&mut self, p: Value) {
        self.c("migrate-set-parameters", p);
    }

    /// Waits for a `MIGRATION` event whose status is one of `want` (the `events` capability
    /// must be on); any other terminal status is a failure. Returns `query-migrate`.
    pub fn wait_mig(&mut self, want: &[&str], timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let name = self.name.clone();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let q = self.qm();
                panic!("{name}: no MIGRATION event with status {want:?} within {timeout:?}; query-migrate: {q}");
            }
            let ev = match self.qmp.wait_event("MIGRATION", left) {
                Ok(ev) => ev,
                Err(e) => {
                    let q = self.qm();
                    panic!("{name}: waiting for MIGRATION {want:?}: {e}; query-migrate: {q}");
                }
            };
            let st = ev
                .pointer("/data/status")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_owned();
            if want.contains(&st.as_str()) {
                return self.qm();
            }
            if matches!(
                st.as_str(),
                "completed" | "failed" | "cancelled" | "x-tern-unconfirmed"
            ) {
                let q = self.qm();
                panic!(
                    "{name}: migration ended '{st}' while waiting for {want:?}; query-migrate: {q}"
                );
            }
        }
    }

    /// Waits until `MIGRATION_PASS` with `pass >= n` was emitted.
    pub fn wait_pass(&mut self, n: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let name = self.name.clone();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ev = match self.qmp.wait_event("MIGRATION_PASS", left) {
                Ok(ev) => ev,
                Err(e) => {
                    let q = self.qm();
                    panic!("{name}: waiting for MIGRATION_PASS {n}: {e}; query-migrate: {q}");
                }
            };
            let p = ev
                .pointer("/data/pass")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            if p >= n {
                return p;
            }
        }
    }

    /// Waits for an event by name (panics on timeout).
    pub fn event(&mut self, name: &str, timeout: Duration) -> Value {
        let me = self.name.clone();
        match self.qmp.wait_event(name, timeout) {
            Ok(v) => v,
            Err(e) => panic!("{me}: no {name} event within {timeout:?}: {e}"),
        }
    }

    /// Per-vCPU guest stats (`x-tern-guest-stats`).
    pub fn stats(&mut self) -> Vec<Value> {
        let v = self.c("x-tern-guest-stats", json!({}));
        v.get("vcpus")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    /// `pages-written` of every vCPU.
    pub fn pages_written(&mut self) -> Vec<u64> {
        self.stats()
            .iter()
            .map(|s| num(s, "pages-written"))
            .collect()
    }

    /// Waits (heartbeat by heartbeat, no sleeps) until every vCPU's stats block says
    /// `running` (fill done).
    pub fn wait_workload_running(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut seq = self.last_seq();
        loop {
            let st = self.stats();
            if !st.is_empty()
                && st
                    .iter()
                    .all(|s| s.get("state").and_then(Value::as_str) == Some("running"))
            {
                return;
            }
            if Instant::now() > deadline {
                let name = self.name.clone();
                panic!("{name}: workload not running within {timeout:?}: {st:?}");
            }
            seq = self.hb_after(seq + 20, T);
        }
    }

    /// Waits until every vCPU's `pages-written` exceeds `before` (heartbeat by heartbeat).
    pub fn wait_pages_advance(&mut self, before: &[u64], timeout: Duration) -> Vec<u64> {
        let deadline = Instant::now() + timeout;
        let mut seq = self.last_seq();
        loop {
            let now = self.pages_written();
            if now.len() == before.len() && now.iter().zip(before).all(|(a, b)| a > b) {
                return now;
            }
            if Instant::now() > deadline {
                let name = self.name.clone();
                let st = self.stats();
                panic!("{name}: pages-written did not advance on every vCPU within {timeout:?}: before {before:?}, now {now:?}; stats {st:?}");
            }
            seq = self.hb_after(seq + 20, T);
        }
    }

    /// `pmemsave` of GPA `0..size` into `path`.
    pub fn pmemsave(&mut self, path: &Path, size: u64) {
        self.c(
            "pmemsave",
            json!({"val": 0, "size": size, "filename": path.display().to_string()}),
        );
    }

    /// `stop`, wait for STOP, check `paused`.
    pub fn stop_vm(&mut self) {
        self.c("stop", json!({}));
        self.event("STOP", T);
        let st = self.run_status();
        assert_eq!(st, "paused", "{}: query-status after stop", self.name);
    }

    /// Sets up a TCP incoming migration on 127.0.0.1 (any port) with `exit-on-error: false`, so
    /// a test can inspect a destination whose migration failed; returns the URI to give the
    /// source.
    pub fn listen_tcp(&mut self) -> String {
        self.listen_tcp_with(Some(false))
    }

    /// [`Vm::listen_tcp`] with `exit-on-error` as given (`None`: not passed, QEMU's default
    /// `true`: a failed destination exits).
    pub fn listen_tcp_with(&mut self, exit_on_error: Option<bool>) -> String {
        let mut args = json!({"uri": "tcp:127.0.0.1:0"});
        if let Some(e) = exit_on_error {
            args["exit-on-error"] = json!(e);
        }
        self.c("migrate-incoming", args);
        let q = self.qm();
        let port = incoming_port(&q).unwrap_or_else(|| panic!("no port in {q}"));
        format!("tcp:127.0.0.1:{port}")
    }

    /// Sets up a unix-socket incoming migration at `path` (`exit-on-error: false`); returns
    /// the URI.
    pub fn listen_unix(&mut self, path: &Path) -> String {
        let uri = format!("unix:{}", path.display());
        self.c(
            "migrate-incoming",
            json!({ "uri": uri, "exit-on-error": false }),
        );
        uri
    }

    /// Sends `sig` to the process (e.g. `libc::SIGSTOP` to freeze a destination).
    pub fn signal(&mut self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid, which stays reserved (not reaped) while the
        // `Child` lives.
        let r = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            r,
            0,
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Sends SIGSTOP and waits until every thread of the process is stopped (state `T` in
    /// `/proc/PID/task/*/stat`). kill(2) only queues the stop: a thread running on another
    /// CPU, or in a system call, goes on until it next returns to user mode, so a test that
    /// needs the process frozen before its next step must wait for it.
    pub fn stop_frozen(&mut self, timeout: Duration) {
        self.signal(libc::SIGSTOP);
        let pid = self.pid();
        let deadline = Instant::now() + timeout;
        loop {
            let mut states = Vec::new();
            if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                for t in dir.flatten() {
                    let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                    // "TID (comm) S ...": the state follows the last ')'.
                    let state = stat
                        .rsplit_once(')')
                        .and_then(|(_, rest)| rest.trim_start().chars().next())
                        .unwrap_or('?');
                    states.push(state);
                }
            }
            if !states.is_empty() && states.iter().all(|&c| c == 'T') {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: not all threads stopped within {timeout:?} after SIGSTOP: {states:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits for the process to exit on its own (e.g. `exit-on-error`); returns its status
    /// and its log.
    pub fn wait_gone(&mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let name = self.name.clone();
        let st = match self.wait_exit(timeout) {
            Ok(st) => st,
            Err(e) => panic!("{name}: {e:#}"),
        };
        (st, self.log())
    }

    /// `quit`: must exit with status 0 and remove its QMP socket.
    pub fn quit_ok(mut self) {
        let name = self.name.clone();
        let p = self.p.take().expect("already quit");
        let qmp = p.qmp_path.clone();
        let log_copy = p.log();
        match p.quit() {
            Ok(st) => assert!(
                st.success(),
                "{name}: quit ended with {st}; log:\n{log_copy}"
            ),
            Err(e) => panic!("{name}: quit: {e:#}; log:\n{log_copy}"),
        }
        assert!(
            !qmp.exists(),
            "{name}: QMP socket {} still exists after quit",
            qmp.display()
        );
    }

    /// Drops every event buffered so far (before starting a new migration on this process).
    pub fn drain_events(&mut self) {
        let _ = self.qmp.take_events();
    }

    /// The process is still alive and answers QMP.
    pub fn assert_alive(&mut self) {
        let name = self.name.clone();
        assert!(
            self.try_exited().is_none(),
            "{name}: the process exited: {:?}",
            self.try_exited()
        );
        self.c("query-status", json!({}));
    }
}

/// Runs `tern ARGS` to completion.
pub fn tern(args: &[&str]) -> Output {
    Command::new(exe())
        .args(args)
        .output()
        .expect("running tern")
}

/// `tern check-pattern DUMP`: (passed, stdout + stderr).
pub fn check_pattern(dump: &Path) -> (bool, String) {
    let o = tern(&["check-pattern", &dump.display().to_string()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// Stops `vm`, dumps its RAM and asserts the pattern checker passes; returns the dump path.
pub fn assert_pattern_ok(vm: &mut Vm, m: &Machine, dir: &Path, tag: &str) -> PathBuf {
    if vm.run_status() == "running" {
        vm.stop_vm();
    }
    let dump = dir.join(format!("{tag}.dump"));
    vm.pmemsave(&dump, m.dump_bytes());
    let (ok, text) = check_pattern(&dump);
    assert!(ok, "{}: pattern check failed ({tag}):\n{text}", vm.name);
    assert!(text.contains("OK"), "check-pattern output: {text}");
    dump
}

/// The `error-desc` of a `query-migrate` reply ("" when absent).
pub fn error_desc(q: &Value) -> String {
    q.get("error-desc")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

/// The source lives on after a migration that did not complete: running, heartbeats and
/// counters advance, `query-status` says `running`.
pub fn assert_source_runs_on(src: &mut Vm) {
    assert_eq!(
        src.run_status(),
        "running",
        "source after an unsuccessful migration"
    );
    src.assert_running_guest(20);
    let p0 = src.pages_written();
    src.wait_pages_advance(&p0, T);
}

/// Sets up the QEMU "cannot converge" knobs (migrate_ensure_non_converge).
pub fn non_converge(vm: &mut Vm) {
    vm.params(json!({"max-bandwidth": 3_000_000, "downtime-limit": 1}));
}

/// Sets the same capabilities on both sides, makes the migration unable to converge when
/// `stuck` (see [`non_converge`]), has `dst` listen on TCP and starts `migrate` on `src`.
pub fn start_tcp_migration(src: &mut Vm, dst: &mut Vm, caps: &[(&str, bool)], stuck: bool) {
    src.caps(caps);
    dst.caps(caps);
    if stuck {
        non_converge(src);
    }
    let uri = dst.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
}

/// QEMU's migrate_ensure_converge.
pub fn converge(vm: &mut Vm) {
    vm.params(json!({"max-bandwidth": 1_000_000_000u64, "downtime-limit": 30_000}));
}

/// `ram` member of query-migrate.
pub fn ram_num(q: &Value, key: &str) -> u64 {
    q.get("ram").map(|r| num(r, key)).unwrap_or(0)
}

/// A source whose destination confirmed it runs (`RESUMED`: return path on, destination
/// without `-S`) refuses `cont` and `migrate`, and says why.
pub fn assert_cont_refused(src: &mut Vm) {
    let e = src.err("cont", json!({}));
    assert!(
        e.contains("migrated") && e.contains("runs there"),
        "cont on a migrated source: {e}"
    );
    // Nor may the stale copy leave for a third host (QEMU's text).
    let e = src.err("migrate", json!({"uri": "tcp:127.0.0.1:1"}));
    assert!(
        e.contains("paused due to previous migration"),
        "migrate from a source whose guest runs elsewhere: {e}"
    );
    assert_eq!(src.run_status(), "postmigrate");
}

/// After a completed live migration: the source is `postmigrate`, the destination runs, and
/// the guest's heartbeat sequence continues on the destination at exactly the source's last
/// beat + 1, without duplicates. Returns the source's last seq. (Whether the source refuses
/// `cont` depends on what the destination said: [`assert_cont_refused`].)
pub fn assert_handover(src: &mut Vm, dst: &mut Vm) -> u64 {
    assert_eq!(
        src.run_status(),
        "postmigrate",
        "source after a completed migration"
    );
    let last = src.last_seq();
    src.assert_no_hb_after(last, Duration::from_millis(100));
    assert_eq!(
        dst.run_status(),
        "running",
        "destination after a completed migration"
    );
    let next = dst.hb_after(last, T);
    assert_eq!(
        next,
        last + 1,
        "heartbeat sequence must continue on the destination"
    );
    let recs = dst.heartbeats_since(0).expect("x-tern-heartbeats");
    for w in recs.windows(2) {
        assert!(
            w[1].0 == w[0].0 + 1,
            "destination heartbeat records not consecutive: {w:?} (source last #{last})"
        );
    }
    let later = dst.hb_after(next + 10, T);
    assert!(later > next + 10);
    last
}

/// Boots `src` for `m` (its workload running) and a destination `dst`, and gives them
/// `src_caps` / `dst_caps`.
pub fn boot_pair(
    dir: &Path,
    m: &Machine,
    src_caps: &[(&str, bool)],
    dst_caps: &[(&str, bool)],
) -> (Vm, Vm) {
    let mut src = boot(dir, "src", m);
    src.wait_workload_running(T);
    let mut dst = dest(dir, "dst", m);
    src.caps(src_caps);
    dst.caps(dst_caps);
    (src, dst)
}

/// A complete live migration of `src` to a fresh destination over TCP with QEMU's "converge"
/// limits and libvirt's capabilities (`events`, `return-path`): both sides `completed`,
/// handover checked, the source refuses `cont`. Returns the destination.
pub fn migrate_fully(dir: &Path, name: &str, src: &mut Vm, m: &Machine) -> Vm {
    let mut dst = dest(dir, name, m);
    let caps = [("events", true), ("return-path", true)];
    dst.caps(&caps);
    src.drain_events();
    src.caps(&caps);
    converge(src);
    let uri = dst.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_handover(src, &mut dst);
    assert_cont_refused(src);
    dst
}

/// After a migration that did not happen: `src` runs on ([`assert_source_runs_on`]), a
/// complete migration to a fresh destination `name` succeeds ([`migrate_fully`]), both quit.
pub fn assert_runs_on_then_migrates(dir: &Path, name: &str, mut src: Vm, m: &Machine) {
    assert_source_runs_on(&mut src);
    let dst = migrate_fully(dir, name, &mut src, m);
    dst.quit_ok();
    src.quit_ok();
}

/// Fills `buf` from `r` as far as the input goes; returns the byte count.
fn fill(r: &mut impl std::io::Read, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).expect("reading a dump") {
            0 => break,
            n => got += n,
        }
    }
    got
}

/// Compares two files chunk by chunk; returns the first differing offset.
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    use std::io::BufReader;
    let mut fa = BufReader::new(std::fs::File::open(a).expect("opening a dump"));
    let mut fb = BufReader::new(std::fs::File::open(b).expect("opening a dump"));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    loop {
        let (na, nb) = (fill(&mut fa, &mut ba), fill(&mut fb, &mut bb));
        if let Some(i) = (0..na.min(nb)).find(|&i| ba[i] != bb[i]) {
            return Some(off + i as u64);
        }
        if na != nb {
            return Some(off + na.min(nb) as u64);
        }
        if na == 0 {
            return None;
        }
        off += na as u64;
    }
}

/// Both VMs must be stopped: dumps their whole RAM and asserts it is identical.
pub fn assert_same_ram(a: &mut Vm, b: &mut Vm, m: &Machine, dir: &Path) {
    let (da, db) = (
        dir.join(format!("{}-ram.dump", a.name)),
        dir.join(format!("{}-ram.dump", b.name)),
    );
    a.pmemsave(&da, m.memory_bytes());
    b.pmemsave(&db, m.memory_bytes());
    let diff = first_difference(&da, &db);
    let _ = std::fs::remove_file(&da);
    let _ = std::fs::remove_file(&db);
    if let Some(off) = diff {
        panic!(
            "RAM of {} and {} differs, first at GPA {off:#x} (page {:#x})",
            a.name,
            b.name,
            off & !0xfff
        );
    }
}
