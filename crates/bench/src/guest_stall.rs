//! Suite `guest-stall`: what the guest feels during a live migration. The same guest migrated
//! by QEMU and by Tern over loopback, several runs per row; the number that counts is the
//! largest gap between the guest's 1 ms heartbeats anywhere in the migration window (from
//! `migrate` until the destination's first beat + `migrate::TAIL`), source and destination beats
//! merged on the host clock.

use serde_json::json;

use crate::link::{self, Link};
use crate::migrate::MigParams;
use crate::precopy::{migrate_pair, result_cell, DOWNTIME_LIMIT_MS};
use crate::report::{ms, secs, Table};
use crate::vm::{Guest, Kind};
use crate::Ctx;

/// Runs per row (the table gives each run; the JSON has everything).
pub const RUNS: usize = 2;

const COLUMNS: &[&str] = &[
    "VMM",
    "scenario",
    "run",
    "total time",
    "downtime (VMM)",
    "x-tern-max-guest-stall",
    "largest heartbeat gap (window)",
    "at (after migrate)",
    "phase",
    "largest source gap before switch",
    "switchover gap",
    "result",
];

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let (idle, dirty) = if ctx.quick { (256, 128) } else { (2048, 1024) };
    let scenarios = [
        (
            format!("idle {idle} MiB filled"),
            Guest::new("idle", idle, 0),
        ),
        (
            format!("dirty {dirty} MiB @ 100 MiB/s"),
            Guest::new("dirty", dirty, 100),
        ),
    ];
    let mut report = ctx.report(
        "guest-stall",
        json!({
            "downtime-limit-ms": DOWNTIME_LIMIT_MS,
            "timeout-s": ctx.timeout_s,
            "capabilities": ["events", "return-path"],
            "max-bandwidth": link::LOOPBACK_MAX_BANDWIDTH,
            "heartbeat-ms": 1,
            "runs-per-row": RUNS,
            "tail-ms": crate::migrate::TAIL.as_millis() as u64,
        }),
    );
    report.notes.extend([
        "largest heartbeat gap (window): the largest interval between consecutive guest heartbeats \
         from `migrate` until 500 ms after the destination's first beat, source and destination \
         beats merged, all stamped with the host's CLOCK_REALTIME (Tern: by the VMM on the \
         control-port exit; QEMU: by the harness when the serial byte arrives). phase: pre-copy \
         (both beats from the source), switchover (source's last → destination's first), \
         destination (both from the destination, within the tail)."
            .into(),
        "x-tern-max-guest-stall: Tern's own number in the source's query-migrate (docs/qmp.md)."
            .into(),
        "One vCPU on both VMMs, loopback, capabilities events + return-path, downtime-limit 300 ms, \
         max-bandwidth 10 GiB/s (never binds)."
            .into(),
        format!(
            "Load before the run (uptime): {}",
            std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
        ),
    ]);
    report
        .tables
        .push(Table::new("Guest-felt stalls during pre-copy", COLUMNS));
    let lo = Link::loopback(0.0);
    for (name, guest) in &scenarios {
        if !ctx.selected(&format!("{} {name}", lo.name)) {
            continue;
        }
        for kind in ctx.vmms() {
            for run in 1..=RUNS {
                one(ctx, &mut report, &lo, name, guest, kind, run)?;
            }
        }
    }
    report.notes.push(format!(
        "Load after the run: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    ));
    report.write(&ctx.out)
}

fn one(
    ctx: &Ctx,
    report: &mut crate::report::Report,
    lo: &Link,
    name: &str,
    guest: &Guest,
    kind: Kind,
    run: usize,
) -> anyhow::Result<()> {
    tracing::info!("guest-stall: {} {name} run {run}", kind.label());
    let p = MigParams {
        caps: vec!["events".into(), "return-path".into()],
        downtime_limit_ms: DOWNTIME_LIMIT_MS,
        max_bandwidth: lo.max_bandwidth,
        timeout_s: ctx.timeout_s,
        multifd_channels: None,
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let out = migrate_pair(ctx, lo, guest, kind, 1, None, &p, "gs");
    let row = vec![
        kind.label().into(),
        name.to_string(),
        run.to_string(),
        secs(out.total_ms.map(|t| t / 1e3)),
        ms(out.downtime_ms),
        ms(out.vmm_max_stall_ms),
        ms(out.window_max_gap_ms),
        ms(out.window_max_gap_at_ms),
        out.window_max_gap_phase
            .clone()
            .unwrap_or_else(|| "-".into()),
        ms(out.src_max_hb_interval_ms),
        ms(out.hb_gap_ms),
        result_cell(&out),
    ];
    tracing::info!("  -> {}", row.join(" | "));
    if let Some(t) = report.tables.last_mut() {
        t.rows.push(row);
    }
    report.runs.push(json!({
        "vmm": kind.label(), "vcpus": 1, "link": lo, "scenario": name, "run": run,
        "load-before": load.trim(), "guest": guest, "params": p, "outcome": out,
    }));
    report.write(&ctx.out)
}
