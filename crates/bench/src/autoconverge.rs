//! Suite `auto-converge`: the edge-of-convergence row of `precopy` (the `pattern` guest over
//! 64 MiB at QEMU's default `max-bandwidth`, 128 MiB/s, loopback) with `auto-converge` on for
//! both VMMs, same parameters (QEMU's throttle defaults: initial 20 %, increment 10 %, max 99 %,
//! trigger threshold 50 %). Reports the largest `cpu-throttle-percentage` seen while active and
//! the largest heartbeat gap of the migration window beside the usual columns.

use serde_json::json;

use crate::link::Link;
use crate::migrate::MigParams;
use crate::precopy::{migrate_pair, result_cell, DOWNTIME_LIMIT_MS, QEMU_DEFAULT_MAX_BANDWIDTH};
use crate::report::{mib, ms, num, secs, Table};
use crate::vm::Guest;
use crate::Ctx;

/// The row label (for `--filter`): "<link> <scenario>".
const SCENARIO: &str = "pattern 64 MiB @ max-bandwidth 128 MiB/s, auto-converge";

const COLUMNS: &[&str] = &[
    "VMM",
    "vCPUs",
    "link",
    "scenario",
    "total time",
    "downtime (VMM)",
    "largest gap (window)",
    "max cpu-throttle",
    "bytes sent",
    "dirty passes",
    "result",
];

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let variants = ctx.vcpu_variants();
    let caps = ["events", "return-path", "auto-converge"];
    let mut report = ctx.report(
        "auto-converge",
        json!({
            "downtime-limit-ms": DOWNTIME_LIMIT_MS,
            "max-bandwidth": QEMU_DEFAULT_MAX_BANDWIDTH,
            "timeout-s": ctx.timeout_s,
            "capabilities": caps,
            "throttle": "QEMU defaults: cpu-throttle-initial 20, cpu-throttle-increment 10, \
                         max-cpu-throttle 99, throttle-trigger-threshold 50, tailslow off",
            "heartbeat-ms": 1,
        }),
    );
    report.notes.extend([
        "The `precopy` suite's edge-of-convergence row (issue 13: without auto-converge its total \
         time is a matter of luck) with `auto-converge` set on both sides of both VMMs. max \
         cpu-throttle: the largest `cpu-throttle-percentage` the source's query-migrate showed \
         while active (polled every 50 ms; absent = never throttled). largest gap (window): as in \
         `precopy`, the largest interval between guest heartbeats from `migrate` until 500 ms \
         after the destination's first beat, so throttle sleeps show there."
            .into(),
        "QEMU runs the guest on one vCPU (PVH entry); Tern 1-vCPU rows are like for like, the \
         Tern 2-vCPU row splits the same working set over two vCPUs."
            .into(),
    ]);
    report
        .tables
        .push(Table::new("Pre-copy with auto-converge", COLUMNS));
    let lo = Link::loopback(0.0);
    if !ctx.selected(&format!("{} {SCENARIO}", lo.name)) {
        return report.write(&ctx.out);
    }
    let guest = Guest::new("pattern", 64, 0);
    for &(kind, vcpus) in &variants {
        tracing::info!("auto-converge: {} {} vCPU, {SCENARIO}", kind.label(), vcpus);
        let p = MigParams {
            caps: caps.iter().map(|c| (*c).to_owned()).collect(),
            downtime_limit_ms: DOWNTIME_LIMIT_MS,
            max_bandwidth: QEMU_DEFAULT_MAX_BANDWIDTH,
            timeout_s: ctx.timeout_s,
            multifd_channels: None,
        };
        let out = migrate_pair(ctx, &lo, &guest, kind, vcpus, None, &p, "ac");
        let row = vec![
            kind.label().into(),
            vcpus.to_string(),
            lo.name.clone(),
            SCENARIO.into(),
            if out.result == "completed" || out.total_ms.is_some() {
                secs(out.total_ms.map(|t| t / 1e3))
            } else {
                format!("{} (at cancel)", secs(Some(out.wall_ms / 1e3)))
            },
            ms(out.downtime_ms),
            ms(out.window_max_gap_ms),
            out.max_cpu_throttle
                .map_or_else(|| "—".into(), |p| format!("{p} %")),
            mib(out.transferred),
            num(out.dirty_sync_count),
            result_cell(&out),
        ];
        tracing::info!("  -> {}", row.join(" | "));
        if let Some(t) = report.tables.last_mut() {
            t.rows.push(row);
        }
        report.runs.push(json!({
            "vmm": kind.label(), "vcpus": vcpus, "link": lo, "scenario": SCENARIO,
            "guest": guest, "params": p, "outcome": out,
        }));
        report.write(&ctx.out)?;
    }
    report.write(&ctx.out)
}
