//! Suite `compress`: multifd 2 channels with `multifd-compression` none / zstd / zlib (level
//! 1, QEMU's default), Tern vs QEMU on the same guest and parameters, over loopback and the
//! shaped 1 Gbit/s link (issue 13 item 4: does compression pay, and where). Beside the
//! pre-copy columns: the CPU time (user + system, `/proc/PID/stat`) the source and the
//! destination process spent during the migration, and CPU seconds per GiB of guest RAM.
//!
//! The guest is `idle` filled: every page is written once with `tern_guest::fill` content
//! (text-like words and hex, non-zero, compressible: zstd level 1 packs it to about 23 %,
//! zlib level 1 to about 28 %), then idles. It is not random data; incompressible memory would
//! only cost the compressors' CPU.

use serde_json::json;

use crate::link::{Link, Netns};
use crate::migrate::MigParams;
use crate::pair::{migrate_pair, PairSpec};
use crate::precopy::{result_cell, DOWNTIME_LIMIT_MS};
use crate::report::{mib, ms, secs, Table};
use crate::vm::{Guest, Kind};
use crate::Ctx;

const METHODS: [&str; 3] = ["none", "zstd", "zlib"];
const CHANNELS: u8 = 2;

const COLUMNS: &[&str] = &[
    "VMM",
    "link",
    "compression",
    "total time",
    "downtime (VMM)",
    "bytes sent",
    "CPU source",
    "CPU destination",
    "CPU s per GiB (both)",
    "result",
];

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let mem = if ctx.quick { 256 } else { 1024 };
    let guest = Guest::new("idle", mem, 0);
    let mut report = ctx.report(
        "compress",
        json!({
            "guest": guest,
            "multifd-channels": CHANNELS,
            "levels": {"multifd-zstd-level": 1, "multifd-zlib-level": 1},
            "downtime-limit-ms": DOWNTIME_LIMIT_MS,
            "capabilities": ["events", "return-path", "multifd"],
        }),
    );
    report.notes.extend([
        "Same parameters on both VMMs: capabilities events, return-path, multifd; \
         multifd-channels 2; multifd-compression as the row says with level 1 (QEMU's default) \
         on both sides; downtime-limit 300 ms; max-bandwidth 10 GiB/s on loopback, the link rate \
         on the shaped link. 1 vCPU."
            .into(),
        "CPU: utime + stime of the source and of the destination process from /proc/PID/stat, \
         read right before `migrate` and after the migration ended (the idle guest's own vCPU \
         time is included and is small). CPU s per GiB = both processes' CPU ÷ guest RAM \
         migrated (GiB)."
            .into(),
        "Guest data: the idle workload's fill (text-like, compressible), not random.".into(),
    ]);
    report
        .tables
        .push(Table::new("multifd 2 channels: compression", COLUMNS));
    let lo = Link::measured_loopback(1.5);
    let shaped = Link::shaped(1000);
    for l in [&lo, &shaped] {
        let _ns = if l.src_ns.is_some() {
            if !METHODS
                .iter()
                .any(|m| ctx.selected(&format!("{} {m}", l.name)))
            {
                continue;
            }
            Some(Netns::up(&ctx.repo, "1gbit")?)
        } else {
            None
        };
        for method in METHODS {
            if !ctx.selected(&format!("{} {method}", l.name)) {
                continue;
            }
            for kind in ctx.vmms() {
                one(ctx, &mut report, l, &guest, kind, method)?;
            }
        }
    }
    report.write(&ctx.out)
}

fn one(
    ctx: &Ctx,
    report: &mut crate::report::Report,
    link: &Link,
    guest: &Guest,
    kind: Kind,
    method: &str,
) -> anyhow::Result<()> {
    tracing::info!("compress: {} {} {method}", kind.label(), link.name);
    let p = MigParams {
        caps: vec!["events".into(), "return-path".into(), "multifd".into()],
        downtime_limit_ms: DOWNTIME_LIMIT_MS,
        max_bandwidth: link.max_bandwidth,
        timeout_s: ctx.timeout_s,
        multifd_channels: Some(CHANNELS),
    };
    // `multifd-compression` with level 1 on both sides; the CPU figures are per process.
    let out = migrate_pair(
        ctx,
        link,
        guest,
        kind,
        &PairSpec::new("cz"),
        &p,
        |src, dst| {
            for vm in [src, dst] {
                vm.exec(
                "migrate-set-parameters",
                json!({"multifd-compression": method, "multifd-zstd-level": 1, "multifd-zlib-level": 1}),
            )?;
            }
            Ok(())
        },
    );
    let cpu = out.src_cpu_s.zip(out.dst_cpu_s);
    let gib = guest.mem as f64 / 1024.0;
    let row = vec![
        kind.label().into(),
        link.name.clone(),
        method.into(),
        secs(out.total_ms.map(|t| t / 1e3)),
        ms(out.downtime_ms),
        mib(out.transferred),
        cpu.map_or("–".into(), |(s, _)| format!("{s:.2} s")),
        cpu.map_or("–".into(), |(_, d)| format!("{d:.2} s")),
        cpu.map_or("–".into(), |(s, d)| format!("{:.2}", (s + d) / gib)),
        result_cell(&out),
    ];
    tracing::info!("  -> {}", row.join(" | "));
    if let Some(t) = report.tables.last_mut() {
        t.rows.push(row);
    }
    report.runs.push(json!({
        "vmm": kind.label(), "link": link, "compression": method, "guest": guest,
        "params": p, "cpu-source-s": cpu.map(|c| c.0), "cpu-destination-s": cpu.map(|c| c.1),
        "outcome": out,
    }));
    report.write(&ctx.out)
}
