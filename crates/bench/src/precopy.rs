//! Suite `precopy`: the same guest migrated by QEMU and by Tern over loopback and over the
//! shaped 1 Gbit/s veth link, with the same migration parameters.

use std::time::Duration;

use serde_json::{json, Value};

use crate::link::{self, Link, Netns};
use crate::migrate::{MigParams, Outcome};
use crate::pair::PairSpec;
use crate::report::{mib, ms, num, ratio, secs, Report, Table};
use crate::vm::{Guest, Kind};
use crate::Ctx;

pub const DOWNTIME_LIMIT_MS: u64 = 300;

struct Scenario {
    name: String,
    guest: Guest,
    /// `max-bandwidth` for this row instead of the link's (loopback rows at QEMU's default).
    max_bandwidth: Option<u64>,
    /// `multifd` with this many channels on both sides (loopback rows only).
    multifd: Option<u8>,
    /// `zero-copy-send` on both sides (with `multifd`).
    zero_copy: bool,
}

/// QEMU's default `max-bandwidth` (128 MiB/s).
pub const QEMU_DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;

/// The shaped link's tbf rate, Mbit/s (`scripts/netns.sh up 1gbit`).
pub const SHAPED_MBIT: u64 = 1000;
/// `scripts/netns.sh`'s rate argument for [`SHAPED_MBIT`].
pub const SHAPED_RATE: &str = "1gbit";

/// The full-speed row's guest: `dirty` over 512 MiB (128 with `--quick`) at no rate cap, and
/// its scenario label. Shared with `auto-converge`, which runs the same guest.
pub fn full_speed_dirty(quick: bool) -> (String, Guest) {
    let mem = if quick { 128 } else { 512 };
    (
        format!("dirty {mem} MiB @ max"),
        Guest::new("dirty", mem, 0),
    )
}

fn scenarios(quick: bool) -> Vec<Scenario> {
    let (idle, d1) = if quick { (256, 64) } else { (1024, 256) };
    let (full_name, full_guest) = full_speed_dirty(quick);
    vec![
        Scenario {
            name: format!("idle {idle} MiB filled"),
            guest: Guest::new("idle", idle, 0),
            max_bandwidth: None,
            multifd: None,
            zero_copy: false,
        },
        Scenario {
            name: format!("dirty {d1} MiB @ 50 MiB/s"),
            guest: Guest::new("dirty", d1, 50),
            max_bandwidth: None,
            multifd: None,
            zero_copy: false,
        },
        Scenario {
            name: full_name,
            guest: full_guest,
            max_bandwidth: None,
            multifd: None,
            zero_copy: false,
        },
        // The edge of convergence at QEMU's default cap (issue 13: the switchover rule).
        Scenario {
            name: "pattern 64 MiB @ max-bandwidth 128 MiB/s".into(),
            guest: Guest::new("pattern", 64, 0),
            max_bandwidth: Some(QEMU_DEFAULT_MAX_BANDWIDTH),
            multifd: None,
            zero_copy: false,
        },
        // Multifd (issue 13 item 3), loopback only: the idle guest with 2 and 4 channels.
        Scenario {
            name: format!("idle {idle} MiB filled, multifd 2 channels"),
            guest: Guest::new("idle", idle, 0),
            max_bandwidth: None,
            multifd: Some(2),
            zero_copy: false,
        },
        // `zero-copy-send` (MSG_ZEROCOPY) on the same 2 channels: on loopback the kernel copies
        // on delivery anyway (`dirty-sync-missed-zero-copy` says so); the CPU columns show
        // what pinning and completions cost.
        Scenario {
            name: format!("idle {idle} MiB filled, multifd 2 channels, zero-copy"),
            guest: Guest::new("idle", idle, 0),
            max_bandwidth: None,
            multifd: Some(2),
            zero_copy: true,
        },
        Scenario {
            name: format!("idle {idle} MiB filled, multifd 4 channels"),
            guest: Guest::new("idle", idle, 0),
            max_bandwidth: None,
            multifd: Some(4),
            zero_copy: false,
        },
    ]
}

/// VM memory for a working set: the workload area starts at 16 MiB; keep 48 MiB spare.
pub fn vm_memory(mem: u64) -> u64 {
    mem + 64
}

pub const COLUMNS: &[&str] = &[
    "VMM",
    "vCPUs",
    "link",
    "scenario",
    "total time",
    "downtime (VMM)",
    "heartbeat gap (host)",
    "largest gap (window)",
    "bytes sent",
    "dirty passes",
    "wire limit",
    "total ÷ wire",
    "CPU s src / dst",
    "missed zero-copy",
    "result",
];

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let variants = ctx.vcpu_variants();
    let mut report = ctx.report(
        "precopy",
        json!({
            "downtime-limit-ms": DOWNTIME_LIMIT_MS,
            "timeout-s": ctx.timeout_s,
            "capabilities": ["events", "return-path"],
            "max-bandwidth-loopback": link::LOOPBACK_MAX_BANDWIDTH,
            "max-bandwidth-shaped": "link rate (125000000 B/s for 1 Gbit/s)",
            "heartbeat-ms": 1,
            "warm-up": "until the working set is written once (idle: fill done; dirty: one pass), then 1 s",
        }),
    );
    report.notes.extend([
        "downtime: `downtime` from the source's query-migrate. largest gap (window): the largest \
         interval between consecutive heartbeats from `migrate` until 500 ms after the destination's \
         first beat (source and destination beats merged; see guest-stall). heartbeat gap: destination's first \
         heartbeat after the source's last, both stamped with the host's CLOCK_REALTIME (Tern: by the \
         VMM on the control-port exit; QEMU: by the harness when the serial byte arrives on the socket)."
            .into(),
        "CPU s src / dst: user + system time of each VMM process from just before `migrate` to \
         the final status (`/proc/PID/stat`; the guest's own vCPU time included). missed \
         zero-copy: the source's `ram.dirty-sync-missed-zero-copy`.".into(),
        "bytes sent = ram.transferred; dirty passes = ram.dirty-sync-count. wire limit = working set \
         (guest `mem`, all non-zero after warm-up) ÷ link rate: the time any pre-copy needs at least \
         to move every page once. total ÷ wire = total-time ÷ wire limit (1.0 = wire speed)."
            .into(),
        "Same parameters on both VMMs: capabilities `events` and `return-path` (what libvirt sets for every non-tunnelled migration); downtime-limit 300 ms (QEMU default); \
         max-bandwidth 10 GiB/s on loopback (never binds; QEMU's default 128 MiB/s would otherwise \
         be what is measured) and the link rate on the shaped link; no auto-converge; multifd \
         only in the rows that say so (capability `multifd` and the same `multifd-channels` on \
         both sides, QEMU's `-incoming defer` side included)."
            .into(),
        "QEMU runs the guest through its PVH entry on one vCPU (`-smp 1`); Tern rows with 1 vCPU are \
         the like-for-like comparison, Tern 2-vCPU rows split the same working set and rate over two vCPUs."
            .into(),
        "`not converged`: still active after the timeout, `migrate_cancel` sent; the guest keeps \
         running on the source. Its total time is the host wall time until the cancel finished, bytes \
         and passes are the last values seen while active."
            .into(),
    ]);
    report
        .tables
        .push(Table::new("Pre-copy live migration", COLUMNS));
    let scs = scenarios(ctx.quick);
    let lo = Link::measured_loopback(1.5);
    report.notes.push(format!(
        "loopback rate for the wire limit: {:.0} MB/s ({})",
        lo.rate_bytes_s / 1e6,
        lo.rate_source
    ));
    for sc in &scs {
        for &(k, v) in &variants {
            one(ctx, &mut report, &lo, sc, k, v)?;
        }
    }
    {
        let shaped = Link::shaped(SHAPED_MBIT);
        if !scs
            .iter()
            .any(|sc| ctx.selected(&format!("{} {}", shaped.name, sc.name)))
        {
            return report.write(&ctx.out);
        }
        let _ns = Netns::up(&ctx.repo, SHAPED_RATE)?;
        for sc in scs.iter().filter(|sc| sc.multifd.is_none()) {
            for &(k, v) in &variants {
                one(ctx, &mut report, &shaped, sc, k, v)?;
            }
        }
    }
    report.write(&ctx.out)
}

/// One migration row. Spawn failures become rows too.
fn one(
    ctx: &Ctx,
    report: &mut Report,
    link: &Link,
    sc: &Scenario,
    kind: Kind,
    vcpus: u32,
) -> anyhow::Result<()> {
    if !ctx.selected(&format!("{} {}", link.name, sc.name)) {
        return Ok(());
    }
    tracing::info!(
        "precopy: {} {} vCPU, {}, {}",
        kind.label(),
        vcpus,
        link.name,
        sc.name
    );
    let mut caps: Vec<String> = vec!["events".into(), "return-path".into()];
    if sc.multifd.is_some() {
        caps.push("multifd".into());
    }
    if sc.zero_copy {
        caps.push("zero-copy-send".into());
    }
    let p = MigParams {
        // libvirt's defaults for a non-tunnelled migration: `events` and `return-path` on
        // both sides (QEMU then also learns when the destination is done).
        caps,
        downtime_limit_ms: DOWNTIME_LIMIT_MS,
        max_bandwidth: sc.max_bandwidth.unwrap_or(link.max_bandwidth),
        timeout_s: ctx.timeout_s,
        multifd_channels: sc.multifd,
    };
    let out = migrate_pair(ctx, link, &sc.guest, kind, vcpus, None, &p, "pc");
    let wire_s = (link.rate_bytes_s > 0.0).then(|| (sc.guest.mem << 20) as f64 / link.rate_bytes_s);
    let total_s = out.total_ms.map(|t| t / 1e3);
    let row = vec![
        kind.label().into(),
        vcpus.to_string(),
        link.name.clone(),
        sc.name.clone(),
        total_cell(&out),
        ms(out.downtime_ms),
        ms(out.hb_gap_ms),
        ms(out.window_max_gap_ms),
        mib(out.transferred),
        num(out.dirty_sync_count),
        secs(wire_s),
        ratio(total_s.zip(wire_s).map(|(t, w)| t / w)),
        match (out.src_cpu_s, out.dst_cpu_s) {
            (Some(s), Some(d)) => format!("{s:.2} / {d:.2}"),
            _ => "–".into(),
        },
        out.src_final
            .get("ram")
            .and_then(|r| r.get("dirty-sync-missed-zero-copy"))
            .and_then(Value::as_u64)
            .map_or("–".into(), |n| n.to_string()),
        result_cell(&out),
    ];
    tracing::info!("  -> {}", row.join(" | "));
    if let Some(t) = report.tables.last_mut() {
        t.rows.push(row);
    }
    report.runs.push(json!({
        "vmm": kind.label(), "vcpus": vcpus, "link": link, "scenario": sc.name,
        "guest": sc.guest, "params": p, "wire-limit-s": wire_s, "outcome": out,
    }));
    report.write(&ctx.out)
}

/// The total time, or the wall time until the cancel of a migration that did not converge.
pub fn total_cell(out: &Outcome) -> String {
    if out.result == "completed" || out.total_ms.is_some() {
        secs(out.total_ms.map(|t| t / 1e3))
    } else {
        format!("{} (at cancel)", secs(Some(out.wall_ms / 1e3)))
    }
}

pub fn result_cell(out: &Outcome) -> String {
    match &out.error {
        Some(e) if out.result != "completed" => {
            let short: String = e.chars().take(160).collect();
            format!("{}: {short}", out.result)
        }
        _ => out.result.clone(),
    }
}

/// Spawns destination + source, warms up (1 s after the guest is ready), migrates, tears
/// down ([`crate::pair::migrate_pair`]). Errors become an `error` outcome.
#[allow(clippy::too_many_arguments)]
pub fn migrate_pair(
    ctx: &Ctx,
    link: &Link,
    guest: &Guest,
    kind: Kind,
    vcpus: u32,
    device: Option<String>,
    p: &MigParams,
    tag: &str,
) -> Outcome {
    let pair = PairSpec {
        vcpus,
        device,
        ..PairSpec::new(tag)
    };
    crate::pair::migrate_pair(ctx, link, guest, kind, &pair, p, |_, _| {
        std::thread::sleep(Duration::from_secs(1));
        Ok(())
    })
}
