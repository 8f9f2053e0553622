//! Suite `auto-converge`: rows of `precopy` that sit at or beyond the edge of convergence,
//! migrated with `auto-converge` on for both VMMs, same parameters (QEMU's throttle defaults:
//! initial 20 %, increment 10 %, max 99 %, trigger threshold 50 %):
//!
//! * loopback: the `pattern` guest over 64 MiB at QEMU's default `max-bandwidth`, 128 MiB/s;
//! * `veth-1gbit`: the `dirty 512 MiB @ max` guest of `precopy` (full speed) at the link rate,
//!   which converges for neither VMM without help (issue 13's auto-converge goal).
//!
//! Reports the largest `cpu-throttle-percentage` seen while active and the largest heartbeat gap
//! of the migration window (with where it fell) beside the usual columns.

use serde_json::json;

use crate::link::{Link, Netns};
use crate::migrate::MigParams;
use crate::precopy::{
    full_speed_dirty, migrate_pair, result_cell, total_cell, DOWNTIME_LIMIT_MS,
    QEMU_DEFAULT_MAX_BANDWIDTH, SHAPED_MBIT, SHAPED_RATE,
};
use crate::report::{mib, ms, num, Report, Table};
use crate::vm::{Guest, Kind};
use crate::Ctx;

const CAPS: [&str; 3] = ["events", "return-path", "auto-converge"];

const COLUMNS: &[&str] = &[
    "VMM",
    "vCPUs",
    "link",
    "scenario",
    "total time",
    "downtime (VMM)",
    "largest gap (window)",
    "gap: phase, at",
    "max cpu-throttle",
    "bytes sent",
    "dirty passes",
    "result",
];

/// One row of the suite: a `precopy` guest on a link, with `auto-converge`.
struct Row {
    link: Link,
    /// The label's scenario part (for `--filter`: "<link> <scenario>").
    scenario: String,
    guest: Guest,
    max_bandwidth: u64,
}

impl Row {
    fn label(&self) -> String {
        format!("{} {}", self.link.name, self.scenario)
    }
}

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let mut report = ctx.report(
        "auto-converge",
        json!({
            "downtime-limit-ms": DOWNTIME_LIMIT_MS,
            "max-bandwidth-loopback": QEMU_DEFAULT_MAX_BANDWIDTH,
            "max-bandwidth-shaped": "link rate (125000000 B/s for 1 Gbit/s)",
            "timeout-s": ctx.timeout_s,
            "capabilities": CAPS,
            "throttle": "QEMU defaults: cpu-throttle-initial 20, cpu-throttle-increment 10, \
                         max-cpu-throttle 99, throttle-trigger-threshold 50, tailslow off",
            "heartbeat-ms": 1,
        }),
    );
    report.notes.extend([
        "Rows of `precopy` at or beyond the edge of convergence with `auto-converge` set on both \
         sides of both VMMs: the loopback `pattern` row (issue 13: without auto-converge its \
         total time is a matter of luck) and the `veth-1gbit` full-speed `dirty` row (converges \
         for neither VMM without help). max cpu-throttle: the largest `cpu-throttle-percentage` \
         the source's query-migrate showed while active (polled every 50 ms; absent = never \
         throttled). largest gap (window): as in `precopy`, the largest interval between guest \
         heartbeats from `migrate` until 500 ms after the destination's first beat, so throttle \
         sleeps show there; gap: phase, at: `pre-copy` (both beats on the source), `switchover` \
         (source's last to destination's first) or `destination`, and when the gap began, \
         after `migrate`."
            .into(),
        "QEMU runs the guest on one vCPU (PVH entry); Tern 1-vCPU rows are like for like, the \
         Tern 2-vCPU row splits the same working set over two vCPUs."
            .into(),
    ]);
    report
        .tables
        .push(Table::new("Pre-copy with auto-converge", COLUMNS));
    let (full_name, full_guest) = full_speed_dirty(ctx.quick);
    let shaped = Link::shaped(SHAPED_MBIT);
    let rows = [
        Row {
            link: Link::loopback(0.0),
            scenario: "pattern 64 MiB @ max-bandwidth 128 MiB/s, auto-converge".into(),
            guest: Guest::new("pattern", 64, 0),
            max_bandwidth: QEMU_DEFAULT_MAX_BANDWIDTH,
        },
        Row {
            max_bandwidth: shaped.max_bandwidth,
            link: shaped,
            scenario: format!("{full_name}, auto-converge"),
            guest: full_guest,
        },
    ];
    for row in rows.iter().filter(|r| ctx.selected(&r.label())) {
        // The shaped link exists only while its rows run.
        let _ns = match row.link.src_ns {
            Some(_) => Some(Netns::up(&ctx.repo, SHAPED_RATE)?),
            None => None,
        };
        for &(kind, vcpus) in &ctx.vcpu_variants() {
            one(ctx, &mut report, row, kind, vcpus)?;
        }
    }
    report.write(&ctx.out)
}

/// One migration of `row` by `kind` with `vcpus` vCPUs.
fn one(ctx: &Ctx, report: &mut Report, row: &Row, kind: Kind, vcpus: u32) -> anyhow::Result<()> {
    tracing::info!(
        "auto-converge: {} {} vCPU, {}",
        kind.label(),
        vcpus,
        row.label()
    );
    let p = MigParams {
        caps: CAPS.iter().map(|c| (*c).to_owned()).collect(),
        downtime_limit_ms: DOWNTIME_LIMIT_MS,
        max_bandwidth: row.max_bandwidth,
        timeout_s: ctx.timeout_s,
        multifd_channels: None,
    };
    let out = migrate_pair(ctx, &row.link, &row.guest, kind, vcpus, None, &p, "ac");
    let cells = vec![
        kind.label().into(),
        vcpus.to_string(),
        row.link.name.clone(),
        row.scenario.clone(),
        total_cell(&out),
        ms(out.downtime_ms),
        ms(out.window_max_gap_ms),
        match (&out.window_max_gap_phase, out.window_max_gap_at_ms) {
            (Some(ph), Some(at)) => format!("{ph}, {:.2} s", at / 1e3),
            _ => "–".into(),
        },
        out.max_cpu_throttle
            .map_or_else(|| "—".into(), |p| format!("{p} %")),
        mib(out.transferred),
        num(out.dirty_sync_count),
        result_cell(&out),
    ];
    tracing::info!("  -> {}", cells.join(" | "));
    if let Some(t) = report.tables.last_mut() {
        t.rows.push(cells);
    }
    report.runs.push(json!({
        "vmm": kind.label(), "vcpus": vcpus, "link": row.link, "scenario": row.scenario,
        "guest": row.guest, "params": p, "outcome": out,
    }));
    report.write(&ctx.out)
}
