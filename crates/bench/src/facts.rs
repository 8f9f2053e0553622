//! Machine facts recorded with every result file, and small host helpers (clock, TSC, commands).

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tern_guest::host_cpu::HostCpu;

/// `CLOCK_REALTIME` in nanoseconds (the clock Tern stamps heartbeats with).
pub fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// First line of a command's stdout, or `None` when it cannot run or fails.
pub fn command_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8_lossy(&out.stdout);
    s.lines().next().map(|l| l.trim().to_string())
}

/// Host TSC frequency in kHz and where it came from. QEMU's PVH entry gets it on the guest
/// command line (`tsc_khz=`); Tern passes it in `rcx` itself.
pub fn tsc_khz() -> (u64, String) {
    // 1. The kernel's calibration: "tsc: Detected 2100.000 MHz processor".
    if let Some(out) = Command::new("dmesg")
        .output()
        .ok()
        .filter(|o| o.status.success())
    {
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            if let Some(rest) = line.split("tsc: Detected ").nth(1) {
                if let Some(mhz) = rest
                    .split_whitespace()
                    .next()
                    .and_then(|m| m.parse::<f64>().ok())
                {
                    return (
                        (mhz * 1000.0).round() as u64,
                        format!("dmesg: {}", line.trim()),
                    );
                }
            }
        }
    }
    // 2. /proc/cpuinfo "cpu MHz" (may be the current, not the nominal, frequency).
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
        for line in info.lines() {
            if line.starts_with("cpu MHz") {
                if let Some(mhz) = line
                    .split(':')
                    .nth(1)
                    .and_then(|v| v.trim().parse::<f64>().ok())
                {
                    return (
                        (mhz * 1000.0).round() as u64,
                        format!("/proc/cpuinfo: {}", line.trim()),
                    );
                }
            }
        }
    }
    (2_100_000, "default (no dmesg, no cpuinfo)".to_string())
}

/// What the result files say about the machine and the binaries.
#[derive(Debug, Clone, Serialize)]
pub struct Facts {
    pub date_utc: String,
    pub nproc: usize,
    pub mem_total: String,
    pub kernel: String,
    /// The host CPU from `/proc/cpuinfo`: vendor, model name, family/model/stepping.
    pub cpu: HostCpu,
    /// QEMU's `-cpu` (chosen from the vendor by `tern_guest::host_cpu::qemu_cpu`).
    pub qemu_cpu: Option<String>,
    pub kvm_flavour: String,
    pub qemu: Option<String>,
    pub tern: Option<String>,
    pub git_commit: String,
    pub tsc_khz: u64,
    pub tsc_source: String,
    /// /proc/loadavg when the run started (the 2 cores are shared: > ~0.5 means noisy numbers).
    pub loadavg: String,
}

impl Facts {
    pub fn collect(
        repo: &Path,
        qemu: Option<&Path>,
        qemu_cpu: Option<&str>,
        tern: Option<&Path>,
        tsc: (u64, String),
    ) -> Facts {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .map(|l| l.trim_start_matches("MemTotal:").trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        // Unreadable cpuinfo leaves every CPU field empty ("unknown" in the report).
        let cpu = HostCpu::read().unwrap_or_else(|_| HostCpu::parse(""));
        let kvm_flavour = if Path::new("/sys/module/kvm_pvm").exists() {
            "kvm_pvm (PVM)"
        } else if Path::new("/sys/module/kvm_intel").exists() {
            "kvm_intel"
        } else if Path::new("/sys/module/kvm_amd").exists() {
            "kvm_amd"
        } else {
            "unknown"
        };
        let repo_s = repo.to_string_lossy().to_string();
        let commit = command_line("git", &["-C", &repo_s, "rev-parse", "--short=12", "HEAD"])
            .unwrap_or_else(|| "unknown".into());
        let dirty = command_line("git", &["-C", &repo_s, "status", "--porcelain"]).is_some();
        Facts {
            date_utc: command_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_default(),
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            mem_total,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            cpu,
            qemu_cpu: qemu_cpu.map(str::to_string),
            kvm_flavour: kvm_flavour.into(),
            qemu: qemu.and_then(|q| command_line(&q.to_string_lossy(), &["--version"])),
            tern: tern.map(|t| t.display().to_string()),
            git_commit: if dirty {
                format!("{commit} (+ uncommitted changes)")
            } else {
                commit
            },
            tsc_khz: tsc.0,
            tsc_source: tsc.1,
            loadavg: std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}
