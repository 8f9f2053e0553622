//! Suite `tls`: what TLS costs a live migration (issue 10). Loopback, idle 1 GiB and 256 MiB
//! dirtied at 50 MiB/s, plain vs TLS, Tern vs QEMU with the same certificates
//! (`scripts/tls-certs.sh`, QEMU's `tls-creds-x509` layout, `-object` / `--object` on both).
//! Columns: total time, downtime, CPU time of both processes during the migration (user +
//! system, from `/proc/PID/stat`; it includes the guest's own vCPU time, which is the same in
//! the plain and the TLS row), per GiB sent.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::link::Link;
use crate::migrate::{MigParams, Outcome};
use crate::pair::{migrate_pair, PairSpec};
use crate::precopy::{result_cell, DOWNTIME_LIMIT_MS};
use crate::report::{mib, ms, secs, Table};
use crate::vm::{Guest, Kind};
use crate::Ctx;

/// The one name the certificates carry (loopback: the destination is 127.0.0.1).
const HOST: &str = "127.0.0.1";

/// Makes the certificates once (`scripts/tls-certs.sh OUT 127.0.0.1`); returns the host's
/// directory (server and client pairs, signed by one CA).
fn certificates(ctx: &Ctx) -> anyhow::Result<PathBuf> {
    // In the scratch directory: the private keys never land in bench/results.
    let out = ctx.bins.work.join("tls-pki");
    let status = std::process::Command::new(ctx.repo.join("scripts/tls-certs.sh"))
        .arg(&out)
        .arg(HOST)
        .status()?;
    anyhow::ensure!(status.success(), "scripts/tls-certs.sh failed: {status}");
    Ok(out.join(HOST))
}

/// One migration; with `pki` both sides get `tls0` and `tls-creds`. Returns the outcome and
/// the CPU seconds of both processes together.
fn migrate_once(
    ctx: &Ctx,
    link: &Link,
    guest: &Guest,
    kind: Kind,
    pki: Option<&Path>,
    p: &MigParams,
) -> (Outcome, Option<f64>) {
    let object = |endpoint: &str| {
        pki.map(|d| {
            format!(
                "tls-creds-x509,id=tls0,dir={},endpoint={endpoint}",
                d.display()
            )
        })
        .into_iter()
        .collect::<Vec<_>>()
    };
    let pair = PairSpec {
        src_objects: object("client"),
        dst_objects: object("server"),
        ..PairSpec::new("tls")
    };
    let out = migrate_pair(ctx, link, guest, kind, &pair, p, |src, dst| {
        if pki.is_some() {
            for vm in [src, dst] {
                vm.exec("migrate-set-parameters", json!({"tls-creds": "tls0"}))?;
            }
        }
        Ok(())
    });
    let cpu = out.src_cpu_s.zip(out.dst_cpu_s).map(|(s, d)| s + d);
    (out, cpu)
}

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let (idle, dirty) = if ctx.quick { (128, 64) } else { (1024, 256) };
    let guests = [
        ("idle", Guest::new("idle", idle, 0)),
        ("dirty 50 MiB/s", Guest::new("dirty", dirty, 50)),
    ];
    let mut report = ctx.report(
        "tls",
        json!({
            "guests": guests.iter().map(|(n, g)| json!({"name": n, "guest": g})).collect::<Vec<_>>(),
            "downtime-limit-ms": DOWNTIME_LIMIT_MS, "timeout-s": ctx.timeout_s,
            "certificates": "scripts/tls-certs.sh (P-256, one CA), tls-creds-x509 on both sides",
            "goal": "TLS costs Tern less than QEMU; Tern's downtime with TLS >= 4x below QEMU's",
        }),
    );
    report.notes.extend([
        "Capabilities: events + return-path on both sides; tls-creds=tls0 on both in TLS rows; \
         the host name checked is the URI's (127.0.0.1, an IP subjectAltName)."
            .into(),
        "CPU: user + system time of both processes from migrate to the end, per GiB sent; it \
         includes the guest's vCPU time (equal in the plain and TLS rows of one guest)."
            .into(),
    ]);
    report.tables.push(Table::new(
        "Runs",
        &[
            "guest",
            "VMM",
            "transport",
            "total time",
            "downtime",
            "CPU s / GiB",
            "bytes sent",
            "result",
        ],
    ));
    let pki = certificates(ctx)?;
    let link = Link::measured_loopback(1.0);
    for (gname, guest) in &guests {
        for kind in ctx.vmms() {
            for tls in [false, true] {
                let transport = if tls { "TLS" } else { "plain" };
                let label = format!("{gname} {} {transport}", kind.label());
                if !ctx.selected(&label) {
                    continue;
                }
                tracing::info!("tls: {label}");
                let p = MigParams {
                    caps: vec!["events".into(), "return-path".into()],
                    downtime_limit_ms: DOWNTIME_LIMIT_MS,
                    max_bandwidth: link.max_bandwidth,
                    timeout_s: ctx.timeout_s,
                    multifd_channels: None,
                };
                let (out, cpu) =
                    migrate_once(ctx, &link, guest, kind, tls.then_some(pki.as_path()), &p);
                let per_gib = cpu
                    .zip(out.transferred)
                    .filter(|(_, b)| *b > 0)
                    .map(|(c, b)| c / (b as f64 / f64::from(1u32 << 30)));
                let row = vec![
                    gname.to_string(),
                    kind.label().into(),
                    transport.into(),
                    secs(out.total_ms.map(|t| t / 1e3)),
                    ms(out.downtime_ms),
                    per_gib.map_or("—".into(), |v| format!("{v:.2}")),
                    mib(out.transferred),
                    result_cell(&out),
                ];
                tracing::info!("  -> {}", row.join(" | "));
                report.tables[0].rows.push(row);
                report.runs.push(json!({
                    "guest": gname, "vmm": kind.label(), "tls": tls, "params": p,
                    "cpu-s": cpu, "outcome": out,
                }));
                report.write(&ctx.out)?;
            }
        }
    }
    report.write(&ctx.out)
}
