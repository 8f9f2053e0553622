//! `tern-bench`: runs migration benchmark suites against Tern and QEMU on the same test guest
//! and writes `<out>/<suite>.json` + `<out>/<suite>.md`. See `bench/README.md`.

mod autoconverge;
mod boot;
mod compress;
mod digest;
mod facts;
mod guest_stall;
mod link;
mod machine;
mod mgmt;
mod migrate;
mod pair;
mod postcopy;
mod postcopy_recovery;
mod postcopy_recovery_run;
mod postcopy_run;
mod precopy;
mod predict;
mod predict_run;
mod qemu_trace;
mod report;
mod serial;
mod snapshot;
mod switchover;
mod tls;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use serde_json::Value;

use crate::facts::Facts;
use crate::report::Report;
use crate::vm::{Bins, Kind};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Suite {
    Precopy,
    SwitchoverAck,
    GuestStall,
    Machine,
    Snapshot,
    Digest,
    /// The management layer's orchestration overhead (ternctl migrate vs raw QMP)
    Mgmt,
    Boot,
    /// The pattern 64 MiB @ 128 MiB/s loopback row and the veth-1gbit `dirty 512 MiB @ max` row
    /// of `precopy` with auto-converge on for both VMMs
    AutoConverge,
    /// What TLS costs: plain vs TLS, Tern vs QEMU (idle 1 GiB, 256 MiB dirtied at 50 MiB/s)
    Tls,
    /// Post-copy after the first pass, Tern vs QEMU (with and without preempt), and Tern's
    /// automatic switch (issue 9); default --timeout 30
    Postcopy,
    /// Post-copy recovery after a link cut on the 1 Gbit/s link, Tern vs QEMU: detection,
    /// the recovery handshake, the guest during the outage, the pattern check (issue 9);
    /// default --timeout 60
    PostcopyRecovery,
    /// x-tern-predict-migration before each migration vs what it then does, and Tern's vs
    /// QEMU's calc-dirty-rate on the same guest (issue 13 item 8); default --timeout 30
    Predict,
    /// multifd 2 channels with multifd-compression none / zstd / zlib, Tern vs QEMU, loopback
    /// and the 1 Gbit/s link, with both processes' CPU time (issue 13 item 4)
    Compress,
    All,
}

#[derive(Debug, Parser)]
#[command(name = "tern-bench", about = "Tern vs QEMU live-migration benchmarks")]
struct Cli {
    suite: Suite,
    /// The tern binary (default: $CARGO_TARGET_DIR/release/tern, then <repo>/target/release/tern).
    #[arg(long)]
    tern: Option<PathBuf>,
    /// The QEMU binary (default: qemu-system-x86_64 from PATH).
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// Result directory.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Small guests and short timeouts (development runs).
    #[arg(long)]
    quick: bool,
    /// Per-migration timeout in seconds (default 120, 30 with --quick; `postcopy`, `predict`: 30).
    #[arg(long)]
    timeout: Option<u64>,
    /// Skip QEMU rows.
    #[arg(long)]
    no_qemu: bool,
    /// Skip Tern rows.
    #[arg(long)]
    no_tern: bool,
    /// Also run Tern with 2 vCPUs in `precopy` (default: on without --quick).
    #[arg(long)]
    tern_2vcpu: Option<bool>,
    /// Host TSC frequency for QEMU's guest command line (default: from dmesg / cpuinfo).
    #[arg(long)]
    tsc_khz: Option<u64>,
    /// Only run rows whose "<link> <scenario>" label contains this text.
    #[arg(long)]
    filter: Option<String>,
    /// Keep the scratch directory (logs, sockets, snapshot files).
    #[arg(long)]
    keep_work: bool,
}

/// Everything a suite needs.
pub struct Ctx {
    pub bins: Bins,
    pub repo: PathBuf,
    pub out: PathBuf,
    pub quick: bool,
    pub timeout_s: u64,
    pub tern_2vcpu: bool,
    pub facts: Facts,
    pub filter: Option<String>,
}

impl Ctx {
    /// VMMs available for this run, QEMU first.
    pub fn vmms(&self) -> Vec<Kind> {
        let mut v = Vec::new();
        if self.bins.qemu.is_some() {
            v.push(Kind::Qemu);
        }
        if self.bins.tern.is_some() {
            v.push(Kind::Tern);
        }
        v
    }

    /// (VMM, vCPUs) of the pre-copy suites: every VMM with 1 vCPU, and Tern with 2 as well
    /// unless `--tern-2vcpu false` (the default with `--quick`).
    pub fn vcpu_variants(&self) -> Vec<(Kind, u32)> {
        let mut v: Vec<(Kind, u32)> = self.vmms().into_iter().map(|k| (k, 1)).collect();
        if self.tern_2vcpu && self.bins.tern.is_some() {
            v.push((Kind::Tern, 2));
        }
        v
    }

    /// Whether a row labelled `label` is selected by `--filter`.
    pub fn selected(&self, label: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| label.contains(f))
    }

    pub fn report(&self, suite: &str, params: Value) -> Report {
        let mut r = Report::new(suite, self.facts.clone(), params);
        if self.bins.tern.is_none() {
            r.notes.push(
                "No usable tern binary (`tern run --help` failed or missing): Tern rows not run."
                    .into(),
            );
        }
        if self.bins.qemu.is_none() {
            r.notes
                .push("qemu-system-x86_64 not found or disabled: QEMU rows not run.".into());
        }
        r
    }
}

fn find_tern(arg: Option<PathBuf>, repo: &Path) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = match arg {
        Some(p) => vec![p],
        None => {
            let mut c = Vec::new();
            if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
                c.push(PathBuf::from(t).join("release/tern"));
            }
            c.push(repo.join("target/release/tern"));
            c
        }
    };
    candidates.into_iter().find(|p| {
        Command::new(p)
            .args(["run", "--help"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    })
}

fn find_qemu(arg: Option<PathBuf>) -> Option<PathBuf> {
    let p = arg.unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
    let ok = Command::new(&p)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ok.then_some(p)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .context("locating the repository")?;
    let tern = if cli.no_tern {
        None
    } else {
        find_tern(cli.tern.clone(), &repo)
    };
    let qemu = if cli.no_qemu {
        None
    } else {
        find_qemu(cli.qemu.clone())
    };
    let tsc = match cli.tsc_khz {
        Some(k) => (k, "--tsc-khz".to_string()),
        None => facts::tsc_khz(),
    };
    let work = std::env::temp_dir().join(format!("tern-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let guest_elf = work.join("guest.elf");
    std::fs::write(&guest_elf, tern_guest::GUEST_ELF)?;
    let qemu_cpu = match qemu {
        Some(_) => Some(tern_guest::host_cpu::qemu_cpu().context("choosing QEMU's -cpu")?),
        None => None,
    };
    let facts = Facts::collect(
        &repo,
        qemu.as_deref(),
        qemu_cpu.as_deref(),
        tern.as_deref(),
        tsc.clone(),
    );
    tracing::info!(
        "tern: {:?}, qemu: {:?} -cpu {:?}, cpu: {}, tsc: {} kHz ({})",
        tern,
        qemu,
        qemu_cpu,
        facts.cpu.describe(),
        tsc.0,
        tsc.1
    );
    let out = if cli.out.is_absolute() {
        cli.out.clone()
    } else {
        repo.join(&cli.out)
    };
    let ctx = Ctx {
        bins: Bins {
            tern,
            qemu,
            qemu_cpu: qemu_cpu.unwrap_or_default(),
            guest_elf,
            tsc_khz: tsc.0,
            work: work.clone(),
        },
        repo,
        out,
        quick: cli.quick,
        timeout_s: cli.timeout.unwrap_or(if cli.quick { 30 } else { 120 }),
        tern_2vcpu: cli.tern_2vcpu.unwrap_or(!cli.quick),
        facts,
        filter: cli.filter.clone(),
    };
    let suites: Vec<Suite> = match cli.suite {
        Suite::All => vec![
            Suite::Precopy,
            Suite::SwitchoverAck,
            Suite::Machine,
            Suite::Snapshot,
        ],
        s => vec![s],
    };
    let mut failed = Vec::new();
    for s in suites {
        let r = match s {
            Suite::Precopy => precopy::run(&ctx),
            Suite::SwitchoverAck => switchover::run(&ctx),
            Suite::GuestStall => guest_stall::run(&ctx),
            Suite::Machine => machine::run(&ctx),
            Suite::Snapshot => snapshot::run(&ctx),
            Suite::Digest => digest::run(&ctx),
            Suite::Mgmt => mgmt::run(&ctx),
            Suite::Boot => boot::run(&ctx),
            Suite::AutoConverge => autoconverge::run(&ctx),
            Suite::Tls => tls::run(&ctx),
            Suite::Compress => compress::run(&ctx),
            Suite::Postcopy => {
                postcopy::run(&ctx, cli.timeout.unwrap_or(postcopy::DEFAULT_TIMEOUT_S))
            }
            Suite::PostcopyRecovery => postcopy_recovery::run(
                &ctx,
                cli.timeout.unwrap_or(postcopy_recovery::DEFAULT_TIMEOUT_S),
            ),
            Suite::Predict => predict::run(&ctx, cli.timeout.unwrap_or(predict::DEFAULT_TIMEOUT_S)),
            Suite::All => Ok(()),
        };
        if let Err(e) = r {
            tracing::error!("suite {s:?}: {e:#}");
            failed.push(format!("{s:?}: {e:#}"));
        }
    }
    if cli.keep_work {
        tracing::info!("scratch directory kept: {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    if !failed.is_empty() {
        anyhow::bail!("suites failed: {}", failed.join("; "));
    }
    Ok(())
}
