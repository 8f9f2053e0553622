//! Helpers for the management layer's end-to-end tests: real `ternd` daemons (optionally in
//! network namespaces joined by a veth pair), real `ternctl` commands, real VMMs.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

/// Generous: the shared 2-core machine is often busy.
pub const T: Duration = Duration::from_secs(60);

/// A binary next to `ternd` in the target directory.
pub fn sibling(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_ternd")).with_file_name(name);
    assert!(
        p.is_file(),
        "{} is missing: build it first (`cargo build --release -p tern -p ternctl`; `cargo test --workspace` builds it)",
        p.display()
    );
    p
}

pub fn ternd_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ternd"))
}

pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ternd-it-")
        .tempdir()
        .expect("temp dir")
}

/// A running `ternd`; killed (with its VMMs) when dropped.
pub struct Daemon {
    pub name: String,
    child: Option<Child>,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub netns: Option<String>,
    pub tcp: Option<String>,
    /// Extra environment (fault injection: `TERND_X_TEST_STALL`).
    pub env: Vec<(String, String)>,
    /// Extra daemon arguments.
    pub args: Vec<String>,
    log: PathBuf,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Daemon {
    /// Starts `ternd` with its state under `dir/name`; `tcp`: `--listen-tcp` address.
    pub fn start(dir: &Path, name: &str, netns: Option<&str>, tcp: Option<&str>) -> Daemon {
        let mut d = Daemon {
            name: name.to_string(),
            child: None,
            state_dir: dir.join(name).join("state"),
            run_dir: dir.join(name).join("run"),
            netns: netns.map(str::to_string),
            tcp: tcp.map(str::to_string),
            env: Vec::new(),
            args: Vec::new(),
            log: dir.join(format!("{name}.log")),
            lines: Arc::new((Mutex::new(Vec::new()), Condvar::new())),
        };
        d.restart();
        d
    }

    /// Waits (at most [`T`]) until the daemon printed a line containing `needle`.
    pub fn wait_log(&self, needle: &str) {
        let deadline = std::time::Instant::now() + T;
        let (lock, cv) = &*self.lines;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        while !g.iter().any(|l| l.contains(needle)) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero(),
                "{}: no log line '{needle}':\n{}",
                self.name,
                g.join("\n")
            );
            g = cv
                .wait_timeout(g, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Starts (again) on the same directories.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{}: still running", self.name);
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(ternd_exe());
                c
            }
            None => Command::new(ternd_exe()),
        };
        cmd.arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("--tern")
            .arg(sibling("tern"));
        if let Some(t) = &self.tcp {
            cmd.args(["--listen-tcp", t]);
        }
        cmd.args(&self.args);
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.env("RUST_LOG", "info,ternd=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning ternd");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let log = self.log.clone();
        let lines = self.lines.clone();
        std::thread::Builder::new()
            .name(format!("log-{}", self.name))
            .spawn(move || {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("daemon log");
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.starts_with("ternd: ready") {
                        let _ = tx.send(());
                    }
                    let _ = writeln!(f, "{line}");
                    let (lock, cv) = &*lines;
                    lock.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                    cv.notify_all();
                }
            })
            .expect("log thread");
        if rx.recv_timeout(T).is_err() {
            let _ = child.kill();
            panic!("{}: ternd did not become ready:\n{}", self.name, self.log());
        }
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The local URI.
    pub fn uri(&self) -> String {
        format!(
            "tern+unix:///system?socket={}",
            self.run_dir.join("ternd.sock").display()
        )
    }

    /// The remote URI (`--listen-tcp`).
    pub fn tcp_uri(&self) -> String {
        format!("tern+tcp://{}/system", self.tcp.as_deref().expect("no tcp"))
    }

    /// SIGKILLs the daemon only (its VMMs live on).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `ternctl -c URI args...`
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.uri(), args)
    }

    /// Runs `ternctl`, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(
            o.status.success(),
            "{}: ternctl {} failed: {}\n--- daemon log:\n{}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    /// Runs `ternctl`, asserts failure, returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.ctl(args);
        assert!(
            !o.status.success(),
            "{}: ternctl {} succeeded unexpectedly: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).to_string()
    }

    /// A QMP command through `qemu-monitor-command`; its `return` value.
    pub fn qmp(&self, dom: &str, cmd: &str, args: Value) -> Value {
        let c = json!({"execute": cmd, "arguments": args}).to_string();
        let out = self.ok(&["qemu-monitor-command", dom, &c]);
        let v: Value = serde_json::from_str(out.trim()).expect("monitor reply JSON");
        v["return"].clone()
    }

    /// The pids of the VMMs this daemon started (pid files in its run directory).
    pub fn vmm_pids(&self) -> Vec<u32> {
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.run_dir.join("domains")) {
            for e in rd.flatten() {
                if let Ok(t) = std::fs::read_to_string(e.path().join("vmm.pid")) {
                    if let Ok(p) = t.trim().parse() {
                        v.push(p);
                    }
                }
            }
        }
        v
    }

    pub fn state(&self, dom: &str) -> String {
        self.ok(&["domstate", "--reason", dom]).trim().to_string()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for pid in self.vmm_pids() {
            if pid_alive(pid) {
                // SAFETY: kill(2) on a pid this test's daemon started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- {} log:\n{}", self.name, self.log());
        }
    }
}

/// Whether `pid` is alive and not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !matches!(
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next()),
            Some("Z" | "X") | None
        ),
        Err(_) => false,
    }
}

/// Waits (at most [`T`]) until `pid` has exited, on a pidfd (works for processes that are not
/// our children; no polling).
pub fn wait_pid_exit(pid: u32) {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return; // already gone
    }
    let fd = fd as libc::c_int;
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, T.as_millis() as libc::c_int) };
    // SAFETY: closing the fd this function opened.
    unsafe { libc::close(fd) };
    assert!(r == 1, "process {pid} did not exit within {T:?}");
}

pub fn ctl(uri: &str, args: &[&str]) -> Output {
    Command::new(sibling("ternctl"))
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .expect("running ternctl")
}

/// A domain XML for the test guest.
pub fn domain_xml(name: &str, memory_mib: u64, workload: &str, work_mem: u64, rate: u64) -> String {
    format!(
        "<domain type='kvm' xmlns:tern='http://tern.dev/schemas/domain/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices><emulator>{}</emulator></devices>
  <tern:workload type='{workload}' mem='{work_mem}' rate='{rate}'/>
</domain>
",
        sibling("tern").display()
    )
}

/// Writes `xml` into `dir/NAME.xml`.
pub fn write_xml(dir: &Path, name: &str, xml: &str) -> String {
    let p = dir.join(format!("{name}.xml"));
    std::fs::write(&p, xml).expect("writing xml");
    p.display().to_string()
}

/// Defines and starts the test guest `name` on `d` (the arguments of [`domain_xml`], its XML
/// written under `dir`) and waits until its workload runs: the setup every migration test
/// begins with.
pub fn run_guest(
    d: &Daemon,
    dir: &Path,
    name: &str,
    memory_mib: u64,
    workload: &str,
    work_mem: u64,
    rate: u64,
) {
    let xml = write_xml(
        dir,
        name,
        &domain_xml(name, memory_mib, workload, work_mem, rate),
    );
    d.ok(&["define", &xml]);
    d.ok(&["start", name]);
    wait_workload_running(d, name);
}

/// Waits until every vCPU's workload runs (one heartbeat at a time: the VMM blocks).
pub fn wait_workload_running(d: &Daemon, dom: &str) {
    let deadline = std::time::Instant::now() + T;
    let mut seq = 0;
    loop {
        let s = d.qmp(dom, "x-tern-guest-stats", json!({}));
        if s["vcpus"]
            .as_array()
            .is_some_and(|v| !v.is_empty() && v.iter().all(|c| c["state"] == "running"))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "workload never ran: {s}"
        );
        let r = d.qmp(
            dom,
            "x-tern-wait-heartbeat",
            json!({"after": seq, "timeout-ms": 30000}),
        );
        seq = r["seq"].as_u64().unwrap_or(seq);
    }
}

/// Asserts the guest runs: a heartbeat after the current one arrives.
pub fn assert_guest_runs(d: &Daemon, dom: &str) {
    let last = d.qmp(dom, "x-tern-heartbeats", json!({"since": u64::MAX}))["last-seq"]
        .as_u64()
        .unwrap_or(0);
    let r = d.qmp(
        dom,
        "x-tern-wait-heartbeat",
        json!({"after": last, "timeout-ms": 30000}),
    );
    assert!(
        r["seq"].as_u64().unwrap_or(0) > last,
        "{}: no new heartbeat: {r}",
        d.name
    );
}

/// `domjobinfo DOM --completed` on `d`: the last job completed and its text contains every
/// one of `notes`. Returns the text.
pub fn completed_job(d: &Daemon, dom: &str, notes: &[&str]) -> String {
    let job = d.ok(&["domjobinfo", dom, "--completed"]);
    assert!(job.contains("Job type:         Completed"), "{job}");
    for note in notes {
        assert!(job.contains(note), "{note:?} missing from:\n{job}");
    }
    job
}

/// Suspends `dom` on `d`, dumps its RAM and runs `tern check-pattern` on it.
pub fn assert_pattern_ok(d: &Daemon, dom: &str, memory_mib: u64, dir: &Path) {
    d.ok(&["suspend", dom]);
    let dump = dir.join(format!("{}-{dom}.dump", d.name));
    d.qmp(
        dom,
        "pmemsave",
        json!({"val": 0, "size": memory_mib << 20, "filename": dump.display().to_string()}),
    );
    let o = Command::new(sibling("tern"))
        .arg("check-pattern")
        .arg(&dump)
        .output()
        .expect("tern check-pattern");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && text.contains("OK"),
        "pattern check failed:\n{text}"
    );
    let _ = std::fs::remove_file(&dump);
}

/// Two network namespaces joined by a veth pair, removed when dropped.
pub struct Netns {
    pub src: String,
    pub dst: String,
    pub src_addr: String,
    pub dst_addr: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

impl Netns {
    /// `None` (after saying why) when namespaces cannot be created here.
    pub fn up() -> Option<Netns> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}{n}", std::process::id() % 100000);
        let net = Netns {
            src: format!("tern-mg{tag}-s"),
            dst: format!("tern-mg{tag}-d"),
            src_addr: format!("10.79.{n}.1"),
            dst_addr: format!("10.79.{n}.2"),
        };
        if let Err(e) = ip(&["netns", "add", &net.src]) {
            eprintln!("skipping: network namespaces are not available here ({e})");
            return None;
        }
        let (si, di) = (format!("mg{tag}s"), format!("mg{tag}d"));
        let sa = format!("{}/24", net.src_addr);
        let da = format!("{}/24", net.dst_addr);
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &net.dst],
            vec![
                "link", "add", &si, "netns", &net.src, "type", "veth", "peer", "name", &di,
                "netns", &net.dst,
            ],
            vec!["-n", &net.src, "addr", "add", &sa, "dev", &si],
            vec!["-n", &net.dst, "addr", "add", &da, "dev", &di],
            vec!["-n", &net.src, "link", "set", "lo", "up"],
            vec!["-n", &net.dst, "link", "set", "lo", "up"],
            vec!["-n", &net.src, "link", "set", &si, "up"],
            vec!["-n", &net.dst, "link", "set", &di, "up"],
        ];
        for s in steps {
            if let Err(e) = ip(&s) {
                panic!("setting up the namespaces: {e}");
            }
        }
        Some(net)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.src, &self.dst] {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// Two daemons, one per namespace, the destination listening on TCP.
pub struct Hosts {
    pub src: Daemon,
    pub dst: Daemon,
    pub net: Netns,
}

impl Hosts {
    pub fn up(dir: &Path) -> Option<Hosts> {
        Self::up_with(dir, &[])
    }

    /// With extra environment for the destination daemon (fault injection).
    pub fn up_with(dir: &Path, dst_env: &[(&str, &str)]) -> Option<Hosts> {
        Self::up_full(dir, dst_env, &[])
    }

    /// With extra environment and arguments for the destination daemon.
    pub fn up_full(dir: &Path, dst_env: &[(&str, &str)], dst_args: &[&str]) -> Option<Hosts> {
        let net = Netns::up()?;
        let src_tcp = format!("{}:16509", net.src_addr);
        let dst_tcp = format!("{}:16509", net.dst_addr);
        let src = Daemon::start(dir, "src", Some(&net.src), Some(&src_tcp));
        let mut dst = Daemon::start(dir, "dst", Some(&net.dst), Some(&dst_tcp));
        if !dst_env.is_empty() || !dst_args.is_empty() {
            dst.args = dst_args.iter().map(|a| a.to_string()).collect();
            dst.env = dst_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            dst.kill();
            dst.restart();
        }
        Some(Hosts { src, dst, net })
    }
}

/// A `ternctl` running in the background (e.g. a migration), its output collected.
pub struct Bg {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Bg {
    pub fn spawn(uri: &str, args: &[&str]) -> Bg {
        let mut child = Command::new(sibling("ternctl"))
            .arg("-c")
            .arg(uri)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning ternctl");
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("bg-stdout".into())
            .spawn(move || {
                for l in BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            })
            .expect("reader");
        let stderr = std::thread::Builder::new()
            .name("bg-stderr".into())
            .spawn(move || {
                let mut s = String::new();
                let _ = std::io::Read::read_to_string(&mut BufReader::new(err), &mut s);
                s
            })
            .expect("reader");
        Bg {
            child,
            lines: rx,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Every event of `dom` on `d` as `ternctl event --all --loop` prints them (for two
    /// minutes), to be read with [`Bg::wait_line`] / [`Bg::wait_for_line`].
    pub fn events(d: &Daemon, dom: &str) -> Bg {
        Bg::spawn(
            &d.uri(),
            &[
                "event",
                "--domain",
                dom,
                "--all",
                "--loop",
                "--timeout",
                "120",
            ],
        )
    }

    /// Waits (at most [`T`]) for a stdout line containing `needle`; returns all stdout so
    /// far, and kills the process.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        let out = self.wait_line(needle);
        let _ = self.child.kill();
        let _ = self.child.wait();
        out
    }

    /// Waits (at most [`T`]) for a stdout line containing `needle`; returns all stdout so
    /// far and leaves the process running.
    pub fn wait_line(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + T;
        while !self.seen.iter().any(|l| l.contains(needle)) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!("no line with '{needle}' in:\n{}", self.seen.join("\n")),
            }
        }
        self.seen.join("\n")
    }

    /// Waits for it to exit (bounded by its own operation); (success, stdout, stderr).
    pub fn wait(mut self) -> (bool, String, String) {
        let st = self.child.wait().expect("ternctl exit");
        while let Ok(l) = self.lines.recv() {
            self.seen.push(l);
        }
        let err = self.stderr.join().unwrap_or_default();
        (st.success(), self.seen.join("\n"), err)
    }
}

/// Waits for the first `migration-iteration` event of `dom` (the migration is in Perform and
/// sending), at most [`T`].
pub fn wait_migration_iteration(d: &Daemon, dom: &str) {
    let ev = Bg::spawn(
        &d.uri(),
        &[
            "event",
            "--domain",
            dom,
            "--event",
            "migration-iteration",
            "--timeout",
            "60",
        ],
    );
    let (ok, out, err) = ev.wait();
    assert!(
        ok && out.contains("migration-iteration"),
        "no migration-iteration event: {out} {err}"
    );
}

/// Certificates for `hosts` made by `scripts/tls-certs.sh` (the documented way, with
/// `openssl`) under `out/HOST`, one CA per `out`; `None` (skip) without `openssl`.
pub fn certificates(out: &Path, hosts: &[&str]) -> Option<PathBuf> {
    let out = out.to_path_buf();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/tls-certs.sh");
    match std::process::Command::new("bash")
        .arg(&script)
        .arg(&out)
        .args(hosts)
        .output()
    {
        Ok(o) if o.status.success() => Some(out),
        Ok(o) => panic!("tls-certs.sh: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => {
            eprintln!("skipping: running {}: {e}", script.display());
            None
        }
    }
}

/// Restarts `d` with `--migrate-tls-dir DIR`.
pub fn with_migrate_tls_dir(d: &mut Daemon, tls_dir: &Path) {
    d.args = vec!["--migrate-tls-dir".into(), tls_dir.display().to_string()];
    d.kill();
    d.restart();
}

/// Two hosts whose daemons have certificates; the destination's server certificate names
/// `dst_cert_host` (its own address when it is right).
pub fn migrate_tls_hosts(dir: &Path, dst_cert_host: Option<&str>) -> Option<Hosts> {
    let mut h = Hosts::up(dir)?;
    let dst_name = dst_cert_host.unwrap_or(&h.net.dst_addr).to_string();
    let pki = certificates(&dir.join("pki"), &[&h.net.src_addr, &dst_name])?;
    with_migrate_tls_dir(&mut h.src, &pki.join(&h.net.src_addr));
    with_migrate_tls_dir(&mut h.dst, &pki.join(&dst_name));
    Some(h)
}
