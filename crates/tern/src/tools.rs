//! Small offline tools: `guest-image`, `check-pattern`.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::args::CheckPatternArgs;

/// `tern guest-image -o FILE`.
pub fn guest_image(out: &Path) -> Result<()> {
    std::fs::write(out, tern_guest::GUEST_ELF)
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "wrote {} ({} bytes): boot it with qemu-system-x86_64 -accel kvm -cpu host -kernel {} -append \"workload=pattern mem=100\"",
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
