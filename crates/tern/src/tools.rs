//! Small offline tools: `guest-image`, `check-pattern`.

use std::path::Path;

use anyhow::{bail, Context, Result};

use serde_json::json;

use crate::args::{CheckPatternArgs, GuestArgs, OrderArg, RestoreArgs, RunArgs, WorkloadArg};
use crate::harness::{num, status};

/// The PVH test guest (built by `build.rs` from `tests/guests/pvh_guest.rs`).
const PVH_TEST_GUEST: &[u8] = include_bytes!(env!("TERN_PVH_GUEST_ELF"));

/// `tern guest-image -o FILE [--x-pvh-test]`.
pub fn guest_image(out: &Path, pvh_test: bool) -> Result<()> {
    if pvh_test {
        return std::fs::write(out, PVH_TEST_GUEST)
            .with_context(|| format!("writing {}", out.display()));
    }
    std::fs::write(out, tern_guest::GUEST_ELF)
        .with_context(|| format!("writing {}", out.display()))?;
    // The -cpu model QEMU needs on this host's CPU vendor (`host` aborts on the AMD hosts).
    let cpu = tern_guest::host_cpu::qemu_cpu()?;
    println!(
        "wrote {} ({} bytes): boot it with qemu-system-x86_64 -accel kvm -cpu {cpu} -kernel {} -append \"workload=pattern mem=100\"",
        out.display(),
        tern_guest::GUEST_ELF.len(),
        out.display()
    );
    Ok(())
}

/// `tern analyze-stream FILE`.
pub fn analyze_stream(file: &Path) -> Result<()> {
    let v = tern_migration::wire::analyze_file(file)
        .with_context(|| format!("reading {}", file.display()))?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    if v.get("ok").and_then(|o| o.as_bool()) != Some(true) {
        bail!(
            "{} is not a complete, intact migration stream",
            file.display()
        );
    }
    Ok(())
}

/// `tern check-pattern DUMP`.
pub fn check_pattern(a: &CheckPatternArgs) -> Result<()> {
    let dump = std::fs::read(&a.dump).with_context(|| format!("reading {}", a.dump.display()))?;
    let report = if a.ranges.is_empty() {
        tern_guest::pattern::check_dump(&dump, a.gpa)
    } else {
        tern_guest::pattern::check(&dump, a.gpa, &a.ranges)
    }
    .context("checking the pattern")?;
    println!("{}", describe_report(&report));
    if !report.is_ok() {
        bail!("pattern check failed: {} bad page(s)", report.bad());
    }
    Ok(())
}

/// One line per range plus a verdict, for humans.
pub fn describe_report(r: &tern_guest::pattern::PatternReport) -> String {
    let mut s = format!(
        "pattern check: {} pages in {} range(s): {}",
        r.pages_checked,
        r.ranges.len(),
        if r.is_ok() { "OK" } else { "FAILED" }
    );
    for (i, rr) in r.ranges.iter().enumerate() {
        s.push_str(&format!(
            "\n  range {i}: {:#x}+{} MiB, {} edge(s){}, {} bad",
            rr.gpa,
            rr.len >> 20,
            rr.edges,
            rr.edge_gpa
                .map(|g| format!(" at {g:#x}"))
                .unwrap_or_default(),
            rr.bad
        ));
        for b in &rr.bad_pages {
            s.push_str(&format!(
                "\n    bad page {:#x}: {:#04x} after {:#04x}",
                b.gpa, b.found, b.previous
            ));
        }
    }
    s
}

/// `tern snapshot --qmp SOCK FILE`.
pub fn snapshot(qmp: &Path, file: &Path) -> Result<()> {
    let mut c = tern_qmp::QmpClient::connect(qmp)
        .with_context(|| format!("connecting to {}", qmp.display()))?;
    let file = std::path::absolute(file)?;
    c.execute(
        "migrate",
        json!({ "uri": format!("file:{}", file.display()) }),
    )
    .map_err(|e| anyhow::anyhow!("migrate: {e}"))?;
    loop {
        let q = c
            .execute("query-migrate", json!({}))
            .map_err(|e| anyhow::anyhow!("query-migrate: {e}"))?;
        match status(&q) {
            "completed" => {
                let ram = q.get("ram").cloned().unwrap_or_default();
                println!(
                    "saved {} in {} ms ({} bytes, {} zero pages as flags)",
                    file.display(),
                    num(&q, "total-time"),
                    num(&ram, "transferred"),
                    num(&ram, "duplicate")
                );
                return Ok(());
            }
            "failed" | "cancelled" => bail!(
                "snapshot {}: {}",
                status(&q),
                q.get("error-desc").and_then(|v| v.as_str()).unwrap_or("?")
            ),
            // The file is written at disk speed; a short wait between queries is enough here.
            _ => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

/// `tern restore FILE --qmp SOCK`: reads the machine shape from the file's CONFIG record and
/// runs `tern run --incoming file:FILE` with it.
pub fn restore(a: RestoreArgs) -> Result<()> {
    let f =
        std::fs::File::open(&a.file).with_context(|| format!("opening {}", a.file.display()))?;
    let reader = tern_migration::wire::StreamReader::new(
        std::io::BufReader::new(f),
        tern_migration::wire::Limits::default(),
        tern_migration::wire::Expectations::default(),
    )
    .with_context(|| format!("{} is not a Tern migration stream", a.file.display()))?;
    let cfg = reader.config();
    let memory: u64 = cfg.ram_blocks.iter().map(|b| b.size).sum();
    let run = RunArgs {
        memory,
        vcpus: cfg.vcpu_count,
        qmp: a.qmp,
        serial: a.serial,
        guest: GuestArgs {
            workload: WorkloadArg::Idle,
            work_mem: 0,
            rate: 0,
            order: OrderArg::Seq,
            heartbeat_ms: 1,
            status_ms: 1000,
            append: None,
        },
        kernel: None,
        initrd: None,
        boot_protocol: crate::args::BootProtocolArg::Auto,
        incoming: Some(format!("file:{}", std::path::absolute(&a.file)?.display())),
        paused: a.paused,
        uuid: Some(cfg.vm_uuid),
        huge_pages: true,
        devices: Vec::new(),
        objects: Vec::new(),
        x_test_only_cpuid_xor: None,
        x_test_only_tsc_khz: None,
        x_test_only_corrupt_ram: None,
    };
    crate::run::run(run)
}
