//! Suite `boot`: time from starting the VMM process to the guest's first serial byte and to a
//! marker line, Tern (`tern run --kernel`) vs QEMU (`-kernel`), for kernels neither wrote: the
//! PVH test guest (`tern guest-image --x-pvh-test`; marker `hb 0 00000000 ok`, its first pass
//! done at CPL 3) and Debian's Linux (the vmlinux extracted from the bzImage that
//! `scripts/install-deps.sh` fetches; marker `Linux version`). Process start to the byte as the
//! host sees it in the serial file (polled every millisecond).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use crate::report::{ms, Table};
use crate::vm::Kind;
use crate::Ctx;

/// Where `scripts/install-deps.sh` puts Debian's bzImage (`TERN_LINUX_BZIMAGE` overrides).
const LINUX_BZIMAGE: &str = "/var/cache/tern/linux/vmlinuz";
const LINUX_APPEND: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 noxsave";

struct Guest {
    label: &'static str,
    kernel: PathBuf,
    append: &'static str,
    memory_mib: u64,
    marker: &'static str,
    /// Tern's `--boot-protocol` (QEMU picks PVH for an ELF with the note).
    protocol: &'static str,
    timeout: Duration,
}

#[derive(Debug, Default, serde::Serialize)]
struct Outcome {
    first_byte_ms: Option<f64>,
    marker_ms: Option<f64>,
    error: Option<String>,
}

/// The vmlinux in a bzImage (xz payload, as in Debian's kernels).
fn extract_vmlinux(bzimage: &Path, out: &Path) -> anyhow::Result<()> {
    let d = std::fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    let u32_at = |o: usize| -> anyhow::Result<usize> {
        Ok(u32::from_le_bytes(d.get(o..o + 4).context("short bzImage")?.try_into()?) as usize)
    };
    if d.get(0x202..0x206) != Some(b"HdrS".as_slice()) {
        bail!("{} is not a bzImage", bzimage.display());
    }
    let setup = (usize::from(d[0x1f1]) + 1) * 512;
    let (off, len) = (setup + u32_at(0x248)?, u32_at(0x24c)?);
    // The kernel build appends the uncompressed size (4 bytes) after the xz stream.
    let payload = d
        .get(off..off + len.saturating_sub(4))
        .context("payload outside the file")?;
    let mut vmlinux = Vec::new();
    std::io::Read::read_to_end(&mut xz2::read::XzDecoder::new(payload), &mut vmlinux)
        .context("decompressing the payload (xz)")?;
    std::fs::write(out, vmlinux)?;
    Ok(())
}

fn spawn(ctx: &Ctx, kind: Kind, g: &Guest, serial: &Path, tag: &str) -> anyhow::Result<Child> {
    let log = std::fs::File::create(ctx.bins.work.join(format!("{tag}.log")))?;
    let mut cmd = match kind {
        Kind::Tern => {
            let mut c = Command::new(ctx.bins.tern.as_ref().context("no tern")?);
            c.args(["run", "--memory", &format!("{}M", g.memory_mib)])
                .arg("--qmp")
                .arg(ctx.bins.work.join(format!("{tag}.qmp")))
                .arg("--serial")
                .arg(format!("file:{}", serial.display()))
                .arg("--kernel")
                .arg(&g.kernel)
                .args(["--boot-protocol", g.protocol, "--append", g.append]);
            c
        }
        Kind::Qemu => {
            let mut c = Command::new(ctx.bins.qemu.as_ref().context("no qemu")?);
            c.args(["-accel", "kvm", "-cpu", &ctx.bins.qemu_cpu])
                .args(["-m", &g.memory_mib.to_string(), "-smp", "1"])
                .args([
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-no-reboot",
                ])
                .arg("-serial")
                .arg(format!("file:{}", serial.display()))
                .arg("-kernel")
                .arg(&g.kernel)
                .args(["-append", g.append]);
            c
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the VMM")
}

fn measure(ctx: &Ctx, kind: Kind, g: &Guest, run: usize) -> Outcome {
    let tag = format!("boot-{}-{}-{run}", kind.label().to_lowercase(), g.label);
    let serial = ctx.bins.work.join(format!("{tag}.serial"));
    let _ = std::fs::remove_file(&serial);
    let t0 = Instant::now();
    let mut child = match spawn(ctx, kind, g, &serial, &tag) {
        Ok(c) => c,
        Err(e) => {
            return Outcome {
                error: Some(format!("{e:#}")),
                ..Default::default()
            }
        }
    };
    let mut o = Outcome::default();
    loop {
        let text = std::fs::read(&serial).unwrap_or_default();
        let now = t0.elapsed().as_secs_f64() * 1000.0;
        if !text.is_empty() && o.first_byte_ms.is_none() {
            o.first_byte_ms = Some(now);
        }
        if String::from_utf8_lossy(&text).contains(g.marker) {
            o.marker_ms = Some(now);
            break;
        }
        if let Ok(Some(st)) = child.try_wait() {
            o.error = Some(format!("the VMM exited: {st}"));
            break;
        }
        if t0.elapsed() > g.timeout {
            o.error = Some(format!("no {:?} within {:?}", g.marker, g.timeout));
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let _ = child.wait();
    o
}

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let runs = if ctx.quick { 1 } else { 3 };
    let tern = ctx
        .bins
        .tern
        .as_ref()
        .context("the boot suite needs a tern binary")?;
    let pvh = ctx.bins.work.join("pvh-guest.elf");
    let st = Command::new(tern)
        .args(["guest-image", "--x-pvh-test", "-o"])
        .arg(&pvh)
        .status()?;
    if !st.success() {
        bail!("tern guest-image --x-pvh-test failed: {st}");
    }
    let mut guests = vec![Guest {
        label: "pvh-test-guest",
        kernel: pvh,
        append: "",
        memory_mib: 64,
        marker: "hb 0 00000000 ok",
        protocol: "auto",
        timeout: Duration::from_secs(60),
    }];
    let mut report = ctx.report("boot", json!({"runs": runs, "linux-append": LINUX_APPEND}));
    let bz = std::env::var_os("TERN_LINUX_BZIMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(LINUX_BZIMAGE));
    if bz.is_file() {
        let vmlinux = ctx.bins.work.join("vmlinux");
        extract_vmlinux(&bz, &vmlinux)?;
        for (label, protocol) in [
            ("linux-vmlinux-pvh", "pvh"),
            ("linux-vmlinux-64bit", "linux"),
        ] {
            guests.push(Guest {
                label,
                kernel: vmlinux.clone(),
                append: LINUX_APPEND,
                memory_mib: 512,
                marker: "Linux version",
                protocol,
                timeout: Duration::from_secs(180),
            });
        }
    } else {
        report.notes.push(format!(
            "No Linux kernel at {} (scripts/install-deps.sh fetches it): Linux rows not run.",
            bz.display()
        ));
    }
    report.notes.extend([
        "Time from spawning the VMM process to the first byte in its serial file and to the marker \
         (PVH test guest: `hb 0 00000000 ok`, its first pass at CPL 3 done; Linux: `Linux version`), \
         host clock, file polled every 1 ms. One VMM at a time, but the 2-core host was shared with other work (load average in the facts and per run)."
            .to_string(),
        "QEMU boots an ELF with the PVH note through PVH (SeaBIOS and its PVH option ROM first, emulated \
         here); its Linux rows are PVH only. Tern enters the kernel directly (no firmware), through PVH or \
         the Linux 64-bit protocol (`--boot-protocol`)."
            .to_string(),
        "This host is PVM: CPL 0 code (firmware, boot code, all of Linux) runs emulated, so the Linux \
         rows measure the emulator, not the VMMs; the PVH test guest reaches CPL 3 after ~300 emulated \
         instructions. Numbers are noisy on this shared 2-core machine: see `facts.loadavg`."
            .to_string(),
    ]);
    let mut table = Table::new(
        "Process start → first serial byte / marker",
        &[
            "guest",
            "VMM",
            "entry",
            "run",
            "first byte",
            "marker",
            "error",
        ],
    );
    for g in &guests {
        for kind in ctx.vmms() {
            if kind == Kind::Qemu && g.protocol == "linux" {
                continue;
            }
            for run in 0..runs {
                let o = measure(ctx, kind, g, run);
                tracing::info!("{} {} run {run}: {o:?}", g.label, kind.label());
                table.rows.push(vec![
                    g.label.into(),
                    kind.label().into(),
                    match (kind, g.protocol) {
                        (Kind::Qemu, _) | (_, "auto") | (_, "pvh") => "PVH".into(),
                        _ => "Linux 64-bit".into(),
                    },
                    run.to_string(),
                    ms(o.first_byte_ms),
                    ms(o.marker_ms),
                    o.error.clone().unwrap_or_default(),
                ]);
                report.runs.push(json!({
                    "guest": g.label, "vmm": kind.label(), "protocol": g.protocol, "run": run,
                    "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
                    "outcome": o,
                }));
            }
        }
    }
    report.tables.push(table);
    report.write(&ctx.out)
}
