//! Suite `mgmt`: the management layer's orchestration overhead. The same idle guest migrated
//! over loopback TCP (a) with raw QMP (spawn the destination VMM, capabilities on both sides,
//! `migrate-incoming`, `migrate`, wait until the destination runs) and (b) with one
//! `ternctl migrate --live --p2p` between two `ternd` (Begin, Prepare = spawn the destination
//! VMM `-S`, Perform, Finish = `cont`, Confirm = quit the source). Both start the timer just
//! before the destination VMM is spawned, so the difference is what the daemons add.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::migrate::{incoming_tcp, set_caps};
use crate::report::{ms, Table};
use crate::vm::{Guest, Kind, Spec, Vm};
use crate::Ctx;

const CAPS: [&str; 3] = ["events", "return-path", "switchover-ack"];
const MEMORY_MIB: u64 = 256;

/// One measured migration.
#[derive(Debug, Default, serde::Serialize)]
struct Run {
    vmm: String,
    path: String,
    wall_ms: f64,
    /// Raw path: spawning the destination VMM until its QMP answers (part of `wall_ms`).
    spawn_ms: Option<f64>,
    total_ms: Option<f64>,
    downtime_ms: Option<f64>,
    /// What the guest felt: the source's last heartbeat to the destination's first (host
    /// CLOCK_REALTIME), the switchover and, with ternctl, Finish's `cont`.
    hb_gap_ms: Option<f64>,
}

/// The first destination beat after the source's last: the gap in ms.
fn gap_ms(src_last_ns: Option<u64>, dst: &[(u64, u64)]) -> Option<f64> {
    let last = src_last_ns?;
    dst.iter()
        .map(|b| b.1)
        .filter(|ns| *ns > last)
        .min()
        .map(|ns| (ns - last) as f64 / 1e6)
}

/// A `ternd` for the benchmark, killed (with its VMMs) when dropped.
struct Daemon {
    child: Child,
    uri: String,
    tcp: String,
    run_dir: PathBuf,
}

impl Daemon {
    fn start(ternd: &Path, tern: &Path, dir: &Path, port: u16) -> anyhow::Result<Daemon> {
        let run_dir = dir.join("run");
        let tcp = format!("127.0.0.1:{port}");
        let mut child = Command::new(ternd)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--tern")
            .arg(tern)
            .args(["--listen-tcp", &tcp])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning ternd")?;
        let stderr = child.stderr.take().context("ternd stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.starts_with("ternd: ready") => break,
                Some(Ok(_)) => {}
                _ => bail!("ternd exited before it was ready"),
            }
        }
        std::thread::Builder::new()
            .name("ternd-log".into())
            .spawn(move || for _ in lines.map_while(Result::ok) {})?;
        Ok(Daemon {
            child,
            uri: format!(
                "tern+unix:///system?socket={}",
                run_dir.join("ternd.sock").display()
            ),
            tcp: format!("tern+tcp://{tcp}/system"),
            run_dir,
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(rd) = std::fs::read_dir(self.run_dir.join("domains")) {
            for e in rd.flatten() {
                if let Ok(p) = std::fs::read_to_string(e.path().join("vmm.pid")) {
                    if let Ok(pid) = p.trim().parse::<i32>() {
                        // SAFETY: kill(2) on a VMM this benchmark's daemon started.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ctl(ternctl: &Path, uri: &str, args: &[&str]) -> anyhow::Result<String> {
    let o = Command::new(ternctl)
        .args(["-c", uri])
        .args(args)
        .output()
        .context("running ternctl")?;
    if !o.status.success() {
        bail!(
            "ternctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).to_string())
}

fn raw_stat(raw: &str, key: &str) -> Option<f64> {
    raw.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .and_then(|v| v.trim().parse().ok())
}

fn raw_qmp(ctx: &Ctx, kind: Kind, g: &Guest, i: usize) -> anyhow::Result<Run> {
    let spec = |name: String, incoming| Spec {
        kind,
        name,
        memory_mib: MEMORY_MIB,
        vcpus: 1,
        guest: g.clone(),
        netns: None,
        incoming,
        device: None,
        objects: Vec::new(),
        qemu_args: Vec::new(),
    };
    let tag = format!("{}-mgmt-raw{i}", kind.label().to_lowercase());
    let mut src = Vm::spawn(&ctx.bins, &spec(format!("{tag}-src"), false))?;
    src.wait_ready(g, Duration::from_secs(120))?;
    let caps: Vec<String> = CAPS.iter().map(|c| c.to_string()).collect();
    let t0 = Instant::now();
    let mut dst = Vm::spawn(&ctx.bins, &spec(format!("{tag}-dst"), true))?;
    let spawn = t0.elapsed();
    set_caps(&mut src, &caps)?;
    set_caps(&mut dst, &caps)?;
    let port = incoming_tcp(&mut dst, "127.0.0.1")?;
    src.exec("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))?;
    dst.wait_status("running", Duration::from_secs(ctx.timeout_s))?;
    let wall = t0.elapsed();
    let q = src.exec("query-migrate", json!({}))?;
    let f = |k: &str| q.get(k).and_then(Value::as_f64);
    let src_last = src.heartbeats()?.last().map(|b| b.1);
    // Let the destination beat at least once after resuming.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut hb_gap_ms = None;
    while hb_gap_ms.is_none() && Instant::now() < deadline {
        hb_gap_ms = gap_ms(src_last, dst.heartbeats()?);
        if hb_gap_ms.is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let run = Run {
        vmm: kind.label().into(),
        path: "raw QMP".into(),
        wall_ms: wall.as_secs_f64() * 1e3,
        spawn_ms: Some(spawn.as_secs_f64() * 1e3),
        total_ms: f("total-time"),
        downtime_ms: f("downtime"),
        hb_gap_ms,
    };
    src.quit();
    dst.quit();
    Ok(run)
}

fn ternctl_migrate(
    ctx: &Ctx,
    bins: &(PathBuf, PathBuf, PathBuf),
    kind: Kind,
    g: &Guest,
    i: usize,
) -> anyhow::Result<Run> {
    let (tern, ternd, ternctl) = bins;
    let dir = ctx.bins.work.join(format!("mgmt-{}-{i}", kind.label()));
    let _ = std::fs::remove_dir_all(&dir);
    let src = Daemon::start(ternd, tern, &dir.join("src"), 16700 + 2 * i as u16)?;
    let dst = Daemon::start(ternd, tern, &dir.join("dst"), 16701 + 2 * i as u16)?;
    let emulator = match kind {
        Kind::Tern => tern.clone(),
        Kind::Qemu => ctx
            .bins
            .qemu
            .clone()
            .context("no qemu")
            .and_then(|q| which(&q))?,
    };
    let xml = format!(
        "<domain type='kvm' xmlns:tern='http://tern.dev/schemas/domain/1.0'><name>vm</name>\
         <memory unit='MiB'>{MEMORY_MIB}</memory><vcpu>1</vcpu><os><type>hvm</type></os>\
         <devices><emulator>{}</emulator></devices>\
         <tern:workload type='{}' mem='{}' rate='{}'/></domain>",
        emulator.display(),
        g.workload,
        g.mem,
        g.rate
    );
    let file = dir.join("vm.xml");
    std::fs::write(&file, xml)?;
    ctl(ternctl, &src.uri, &["define", &file.display().to_string()])?;
    ctl(ternctl, &src.uri, &["start", "vm"])?;
    // The idle guest fills its working set once; give it the time the raw path's
    // wait_ready measures (it is not what is compared).
    std::thread::sleep(Duration::from_secs(2));
    // Tern: follow the source's heartbeats on a QMP connection of our own until its VMM exits.
    let watcher = (kind == Kind::Tern).then(|| {
        let sock = src.run_dir.join("domains/vm/qmp.sock");
        std::thread::Builder::new()
            .name("hb-src".into())
            .spawn(move || {
                let mut last: Option<(u64, u64)> = None;
                let Ok(mut c) = tern_qmp::QmpClient::connect(&sock) else {
                    return last;
                };
                loop {
                    let since = last.map_or(0, |l| l.0);
                    match c.execute("x-tern-heartbeats", json!({ "since": since })) {
                        Ok(r) => {
                            for rec in r["records"].as_array().into_iter().flatten() {
                                if let (Some(seq), Some(ns)) = (rec[0].as_u64(), rec[1].as_u64()) {
                                    if seq > last.map_or(0, |l| l.0) {
                                        last = Some((seq, ns));
                                    }
                                }
                            }
                        }
                        Err(_) => return last,
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
    });
    let t0 = Instant::now();
    ctl(
        ternctl,
        &src.uri,
        &["migrate", "vm", &dst.tcp, "--live", "--p2p"],
    )?;
    let wall = t0.elapsed();
    let mut hb_gap_ms = None;
    if let Some(Ok(w)) = watcher {
        let src_last = w.join().ok().flatten();
        if let Some((seq, ns)) = src_last {
            let since = seq.saturating_sub(1);
            let deadline = Instant::now() + Duration::from_secs(10);
            while hb_gap_ms.is_none() && Instant::now() < deadline {
                let cmd = json!({"execute": "x-tern-heartbeats", "arguments": {"since": since}})
                    .to_string();
                let out = ctl(ternctl, &dst.uri, &["qemu-monitor-command", "vm", &cmd])?;
                let v: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
                let recs: Vec<(u64, u64)> = v["return"]["records"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| Some((r.get(0)?.as_u64()?, r.get(1)?.as_u64()?)))
                    .collect();
                hb_gap_ms = gap_ms(Some(ns), &recs);
                if hb_gap_ms.is_none() {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    let raw = ctl(
        ternctl,
        &src.uri,
        &["domjobinfo", "vm", "--completed", "--rawstats"],
    )?;
    Ok(Run {
        vmm: kind.label().into(),
        path: "ternctl migrate".into(),
        wall_ms: wall.as_secs_f64() * 1e3,
        spawn_ms: None,
        total_ms: raw_stat(&raw, "time_elapsed"),
        downtime_ms: raw_stat(&raw, "downtime"),
        hb_gap_ms,
    })
}

/// An absolute path for a binary named on the command line or found in PATH.
fn which(p: &Path) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|v| std::env::split_paths(&v).collect::<Vec<_>>())
        .map(|d| d.join(p))
        .find(|c| c.is_file())
        .with_context(|| format!("{} not found in PATH", p.display()))
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let n = if ctx.quick { 2 } else { 5 };
    // No working set: both paths migrate the same (zero) RAM whatever the guest did before.
    let g = Guest::new("idle", 0, 0);
    let mut report = ctx.report(
        "mgmt",
        json!({"guest": g, "memory-mib": MEMORY_MIB, "runs": n, "caps": CAPS, "link": "loopback"}),
    );
    report.notes.extend([
        "Wall time from just before the destination VMM is spawned to the guest running there \
         (raw QMP: `query-status` running on the destination; ternctl: the command returned, \
         i.e. after Finish's `cont` and Confirm's quit of the source)."
            .to_string(),
        "VMM total / downtime: the source VMM's `total-time` / `downtime` (raw: query-migrate; \
         ternctl: domjobinfo --completed --rawstats)."
            .into(),
        "Heartbeat gap: the source's last guest heartbeat to the destination's first (host \
         CLOCK_REALTIME): what the guest felt. Raw path: both VMMs' records (QEMU: serial \
         bytes). ternctl path: Tern only (the source's beats followed on a QMP connection of \
         the bench's own until its VMM exits; QEMU's serial belongs to the daemon's VMM)."
            .into(),
        "The raw path polls `query-status` every 10 ms (up to 10 ms late); ternctl's path \
         includes Begin's capability probing (a few QMP round trips), the destination VMM \
         starting with -S, and the source VMM's exit."
            .into(),
    ]);
    let Some(tern) = ctx.bins.tern.clone() else {
        bail!("the mgmt suite needs the tern binary");
    };
    let ternd = tern.with_file_name("ternd");
    let ternctl = tern.with_file_name("ternctl");
    if !ternd.is_file() || !ternctl.is_file() {
        bail!(
            "{} / {} missing: cargo build --release -p ternd -p ternctl",
            ternd.display(),
            ternctl.display()
        );
    }
    let bins = (tern, ternd, ternctl);
    let mut t = Table::new(
        "orchestration overhead (median of the runs; min-max in brackets)",
        &[
            "VMM",
            "path",
            "runs",
            "wall",
            "of which dest spawn",
            "VMM total",
            "downtime",
            "heartbeat gap",
            "added to wall",
        ],
    );
    for kind in ctx.vmms() {
        let mut raw_runs = Vec::new();
        let mut mgmt_runs = Vec::new();
        for i in 0..n {
            for (path, runs) in [("raw", &mut raw_runs), ("mgmt", &mut mgmt_runs)] {
                let r = if path == "raw" {
                    raw_qmp(ctx, kind, &g, i)
                } else {
                    ternctl_migrate(ctx, &bins, kind, &g, i)
                };
                match r {
                    Ok(r) => {
                        tracing::info!("{} {}: {:.1} ms", r.vmm, r.path, r.wall_ms);
                        report.runs.push(serde_json::to_value(&r)?);
                        runs.push(r);
                    }
                    Err(e) => {
                        tracing::error!("{} {path} run {i}: {e:#}", kind.label());
                        report.runs.push(
                            json!({"vmm": kind.label(), "path": path, "error": format!("{e:#}")}),
                        );
                    }
                }
            }
        }
        let mut raw_wall_median = None;
        for (label, runs) in [("raw QMP", &raw_runs), ("ternctl migrate", &mgmt_runs)] {
            let mut wall: Vec<f64> = runs.iter().map(|r| r.wall_ms).collect();
            let mut total: Vec<f64> = runs.iter().filter_map(|r| r.total_ms).collect();
            let mut down: Vec<f64> = runs.iter().filter_map(|r| r.downtime_ms).collect();
            let mut spawn: Vec<f64> = runs.iter().filter_map(|r| r.spawn_ms).collect();
            let mut gap: Vec<f64> = runs.iter().filter_map(|r| r.hb_gap_ms).collect();
            let span = |v: &[f64]| {
                let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
                let hi = v.iter().cloned().fold(0.0, f64::max);
                if v.is_empty() {
                    String::new()
                } else {
                    format!(" ({lo:.0}-{hi:.0})")
                }
            };
            let (ws, ts, ds, gs) = (span(&wall), span(&total), span(&down), span(&gap));
            let wm = median(&mut wall);
            if label == "raw QMP" {
                raw_wall_median = wm;
            }
            let added = match (label, wm, raw_wall_median) {
                ("ternctl migrate", Some(m), Some(r)) => ms(Some(m - r)),
                _ => "-".into(),
            };
            t.rows.push(vec![
                kind.label().into(),
                label.into(),
                runs.len().to_string(),
                format!("{}{ws}", ms(wm)),
                ms(median(&mut spawn)),
                format!("{}{ts}", ms(median(&mut total))),
                format!("{}{ds}", ms(median(&mut down))),
                format!("{}{gs}", ms(median(&mut gap))),
                added,
            ]);
        }
    }
    report.tables.push(t);
    report.write(&ctx.out)
}
