//! One VMM process (Tern or QEMU) running the test guest: spawn (optionally inside a network
//! namespace), QMP connection, heartbeats and guest progress, teardown.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};
use tern_qmp::QmpClient;

use crate::facts::realtime_ns;
use crate::serial::{line_value, SerialTap};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    Tern,
    Qemu,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Tern => "Tern",
            Kind::Qemu => "QEMU",
        }
    }
}

/// Binaries and shared settings of a benchmark run.
pub struct Bins {
    pub tern: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
    /// QEMU's `-cpu` for this host (`tern_guest::host_cpu::qemu_cpu`).
    pub qemu_cpu: String,
    pub guest_elf: PathBuf,
    pub tsc_khz: u64,
    /// Scratch directory: sockets, logs, snapshot files.
    pub work: PathBuf,
}

/// The test guest's options (same meaning on both VMMs).
#[derive(Debug, Clone, Serialize)]
pub struct Guest {
    pub workload: &'static str,
    pub mem: u64,
    pub rate: u64,
    pub order: &'static str,
    pub hb_ms: u64,
    /// Guest RAM in MiB when it is not the working set plus 64 MiB (a working set must end
    /// below the 3 GiB PCI hole; a larger guest has RAM it never touches above it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ram_mib: Option<u64>,
}

impl Guest {
    pub fn new(workload: &'static str, mem: u64, rate: u64) -> Guest {
        Guest {
            workload,
            mem,
            rate,
            order: "seq",
            hb_ms: 1,
            ram_mib: None,
        }
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Spec {
    pub kind: Kind,
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub guest: Guest,
    pub netns: Option<&'static str>,
    pub incoming: bool,
    pub device: Option<String>,
    /// `-object` / `--object` specs (e.g. `tls-creds-x509,id=tls0,dir=...`).
    pub objects: Vec<String>,
    /// More QEMU command-line arguments (e.g. `qemu_trace::trace_args`); not used for Tern.
    pub qemu_args: Vec<String>,
}

/// Guest counters summed over vCPUs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Progress {
    pub pages: u64,
    pub passes: u64,
    pub ns: u64,
    /// Every vCPU finished its fill and runs the workload.
    pub running: bool,
}

pub struct Vm {
    pub kind: Kind,
    pub name: String,
    pub qmp: QmpClient,
    pub spawn_ns: u64,
    pub log: PathBuf,
    child: Child,
    tap: Option<SerialTap>,
    hb: Vec<(u64, u64)>,
}

impl Vm {
    /// The process id (for its CPU time in `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn spawn(bins: &Bins, spec: &Spec) -> anyhow::Result<Vm> {
        let qmp_path = bins.work.join(format!("{}.qmp", spec.name));
        let log = bins.work.join(format!("{}.log", spec.name));
        let _ = std::fs::remove_file(&qmp_path);
        let g = &spec.guest;
        let mut tap = None;
        let (bin, args): (&Path, Vec<String>) = match spec.kind {
            Kind::Tern => {
                let bin = bins.tern.as_deref().context("no tern binary")?;
                let mut a: Vec<String> = vec![
                    "run".into(),
                    "--memory".into(),
                    format!("{}M", spec.memory_mib),
                    "--vcpus".into(),
                    spec.vcpus.to_string(),
                    "--qmp".into(),
                    qmp_path.display().to_string(),
                    "--serial".into(),
                    format!(
                        "file:{}",
                        bins.work.join(format!("{}.serial", spec.name)).display()
                    ),
                    "--workload".into(),
                    g.workload.into(),
                    "--work-mem".into(),
                    g.mem.to_string(),
                    "--rate".into(),
                    g.rate.to_string(),
                    "--order".into(),
                    g.order.into(),
                    "--heartbeat-ms".into(),
                    g.hb_ms.to_string(),
                ];
                if let Some(d) = &spec.device {
                    a.extend(["--device".into(), d.clone()]);
                }
                for o in &spec.objects {
                    a.extend(["--object".into(), o.clone()]);
                }
                if spec.incoming {
                    a.extend(["--incoming".into(), "defer".into()]);
                }
                (bin, a)
            }
            Kind::Qemu => {
                let bin = bins.qemu.as_deref().context("no qemu binary")?;
                let t =
                    SerialTap::listen(&bins.work.join(format!("{}.ser", spec.name)), &spec.name)?;
                let append = format!(
                    "workload={} mem={} rate={} order={} hb={} tsc_khz={}",
                    g.workload, g.mem, g.rate, g.order, g.hb_ms, bins.tsc_khz
                );
                let mut a: Vec<String> = [
                    "-accel",
                    "kvm",
                    "-cpu",
                    &bins.qemu_cpu,
                    "-nodefaults",
                    "-display",
                    "none",
                    "-no-reboot",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                a.extend([
                    "-m".into(),
                    format!("{}M", spec.memory_mib),
                    "-smp".into(),
                    spec.vcpus.to_string(),
                    "-kernel".into(),
                    bins.guest_elf.display().to_string(),
                    "-append".into(),
                    append,
                    "-qmp".into(),
                    format!("unix:{},server=on,wait=off", qmp_path.display()),
                    "-chardev".into(),
                    format!("socket,id=s0,path={},server=off", t.path().display()),
                    "-serial".into(),
                    "chardev:s0".into(),
                ]);
                for o in &spec.objects {
                    a.extend(["-object".into(), o.clone()]);
                }
                a.extend(spec.qemu_args.iter().cloned());
                if spec.incoming {
                    a.extend(["-incoming".into(), "defer".into()]);
                }
                tap = Some(t);
                (bin, a)
            }
        };
        let mut cmd = match spec.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(&args);
        let logf = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2),
        // which is async-signal-safe; it makes the VMM die with the harness (the death signal
        // survives the exec done by `ip netns exec`).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        tracing::debug!("spawn {}: {} {}", spec.name, bin.display(), args.join(" "));
        let spawn_ns = realtime_ns();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let qmp = match connect(&qmp_path, &mut child, &log) {
            Ok(q) => q,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.context(format!("{} ({})", spec.name, spec.kind.label())));
            }
        };
        Ok(Vm {
            kind: spec.kind,
            name: spec.name.clone(),
            qmp,
            spawn_ns,
            log,
            child,
            tap,
            hb: Vec::new(),
        })
    }

    /// Runs a QMP command; QMP errors become `Err`.
    pub fn exec(&mut self, cmd: &str, args: Value) -> anyhow::Result<Value> {
        self.qmp
            .execute(cmd, args)
            .with_context(|| format!("{}: QMP {cmd}", self.name))
    }

    /// All heartbeats seen so far: (seq, CLOCK_REALTIME ns). Under QEMU `seq` is only known
    /// modulo 32 (one serial byte per beat).
    pub fn heartbeats(&mut self) -> anyhow::Result<&[(u64, u64)]> {
        match (&self.tap, self.kind) {
            (Some(tap), _) => {
                let new = tap.heartbeats_from(self.hb.len());
                self.hb.extend(new);
            }
            (None, _) => {
                // The VMM caps the records per answer: ask again until caught up.
                for _ in 0..1000 {
                    let since = self.hb.last().map(|h| h.0).unwrap_or(0);
                    let r = self.exec("x-tern-heartbeats", json!({ "since": since }))?;
                    let last_seq = r.get("last-seq").and_then(Value::as_u64).unwrap_or(0);
                    let recs = r
                        .get("records")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    let before = self.hb.len();
                    for rec in recs {
                        let seq = rec.get(0).and_then(Value::as_u64);
                        let ns = rec.get(1).and_then(Value::as_u64);
                        if let (Some(seq), Some(ns)) = (seq, ns) {
                            if seq > self.hb.last().map(|h| h.0).unwrap_or(since) {
                                self.hb.push((seq, ns));
                            }
                        }
                    }
                    let caught_up = self.hb.last().is_none_or(|h| h.0 >= last_seq);
                    if self.hb.len() == before || caught_up {
                        break;
                    }
                }
            }
        }
        Ok(&self.hb)
    }

    /// Guest counters: Tern from `x-tern-guest-stats`, QEMU from the last status line.
    pub fn progress(&mut self) -> anyhow::Result<Option<Progress>> {
        if let Some(tap) = &self.tap {
            let lines = tap.lines();
            let running = lines.iter().any(|(_, l)| l.starts_with("running"));
            return Ok(lines.iter().rev().find_map(|(ns, l)| {
                Some(Progress {
                    pages: line_value(l, "pages")?,
                    passes: line_value(l, "passes")?,
                    ns: *ns,
                    running,
                })
            }));
        }
        let r = self.exec("x-tern-guest-stats", json!({}))?;
        let ns = realtime_ns();
        let Some(vcpus) = r.get("vcpus").and_then(Value::as_array) else {
            return Ok(None);
        };
        let sum = |k: &str| {
            vcpus
                .iter()
                .filter_map(|v| v.get(k).and_then(Value::as_u64))
                .sum()
        };
        let running = !vcpus.is_empty()
            && vcpus
                .iter()
                .all(|v| v.get("state").and_then(Value::as_str) == Some("running"));
        Ok(Some(Progress {
            pages: sum("pages-written"),
            passes: sum("passes"),
            ns,
            running,
        }))
    }

    /// QEMU: whether the guest printed `#running` (fill done). Tern: `None` (use counters).
    fn qemu_running(&self) -> Option<bool> {
        self.tap
            .as_ref()
            .map(|t| t.lines().iter().any(|(_, l)| l.starts_with("running")))
    }

    /// Waits until the guest's working set is fully written once (idle: fill done; dirty:
    /// one full pass) and heartbeats flow.
    pub fn wait_ready(&mut self, g: &Guest, timeout: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + timeout;
        let want_pages = g.mem * 256;
        loop {
            self.check_alive()?;
            let hb = !self.heartbeats()?.is_empty();
            let running = self.qemu_running();
            let ready = match self.progress()? {
                Some(p) => {
                    let filled = running.unwrap_or(p.running || p.pages >= want_pages);
                    filled && (g.workload != "dirty" || g.mem == 0 || p.passes >= 1)
                }
                None => running == Some(true) && (g.workload != "dirty" || g.mem == 0),
            };
            if hb && ready {
                return Ok(());
            }
            if Instant::now() > end {
                bail!("{}: guest not ready after {:?}", self.name, timeout);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for `query-status` to say `running`.
    pub fn wait_status(&mut self, want: &str, timeout: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + timeout;
        loop {
            let s = self.exec("query-status", json!({}))?;
            if s.get("status").and_then(Value::as_str) == Some(want) {
                return Ok(());
            }
            if Instant::now() > end {
                bail!(
                    "{}: status {} after {:?}, want {want}",
                    self.name,
                    s,
                    timeout
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!(
                "{} exited ({st}); log tail: {}",
                self.name,
                log_tail(&self.log)
            );
        }
        Ok(())
    }

    /// `quit`, then SIGKILL if it has not exited after 3 s.
    pub fn quit(mut self) {
        let _ = self.qmp.execute("quit", json!({}));
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn connect(path: &Path, child: &mut Child, log: &Path) -> anyhow::Result<QmpClient> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait()? {
            bail!("exited during startup ({st}); log tail: {}", log_tail(log));
        }
        if path.exists() {
            if let Ok(mut q) = QmpClient::connect(path) {
                q.set_timeout(Some(Duration::from_secs(30)));
                return Ok(q);
            }
        }
        if Instant::now() > end {
            bail!(
                "no QMP on {} after 20 s; log tail: {}",
                path.display(),
                log_tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The last ~600 bytes of a log file, on one line.
pub fn log_tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let start = s.len().saturating_sub(600);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].replace('\n', " / ")
}
