//! Suite `postcopy-recovery` (issue 9's recovery timing): the same `pattern` guest (512 MiB
//! written at full speed) under QEMU and Tern on the 1 Gbit/s shaped veth link, switched to
//! post-copy after the first pass, then the link is cut mid-post-copy (`ip link set DEV down`
//! in the source's namespace: a real cut, no RST, packets go nowhere), both sides go
//! `postcopy-paused` (by their own detection, or by `migrate-pause` as a management layer
//! issues it, when they do not detect it within [`DETECT_LIMIT`]), the link is restored, `migrate-recover` on
//! the destination + `migrate {"resume": true}` on the source, to completion; then the
//! destination's RAM is dumped and checked with `tern check-pattern`.
//! The driving and the measurements are in `postcopy_recovery_run.rs`.

use std::time::Duration;

use serde_json::json;

use crate::link::{Link, Netns};
use crate::postcopy_recovery_run::{self, RecOutcome, RecParams};
use crate::precopy::vm_memory;
use crate::report::{mib, ms, num, secs, Table};
use crate::vm::{Guest, Kind, Spec, Vm};
use crate::Ctx;

/// Default per-phase timeout of this suite (s); `--timeout` overrides it.
pub const DEFAULT_TIMEOUT_S: u64 = 60;
/// How long both sides get to notice the cut by themselves before the harness issues
/// `migrate-pause` on the side(s) still in `postcopy-active` (what a management layer does
/// once it notices the broken connection: libvirt's `virsh domjobabort --postcopy`). Tern's default `x-tern-liveness-timeout` is 10 s.
pub const DETECT_LIMIT: Duration = Duration::from_secs(20);
/// The cut comes once the source's `postcopy-bytes` reached the working set ÷ this
/// (mid-post-copy: the guest rewrites its whole working set during the first pass, so
/// post-copy moves about all of it; 512 MiB → the cut after 128 MiB).
pub const CUT_AFTER_FRACTION: u64 = 4;
/// Port the destination listens on for the recovery channel (in its own namespace).
pub const RECOVER_PORT: u16 = 4446;

const COLUMNS: &[&str] = &[
    "VMM",
    "link",
    "scenario",
    "cut at (post-copy sent)",
    "paused: source / destination (after cut)",
    "how paused",
    "outage (cut → restore)",
    "recovery handshake (migrate-recover → postcopy-active)",
    "VMM's own recovery time",
    "cut → postcopy-active again",
    "total time (source)",
    "pages missing at pause / re-sent",
    "largest guest gap in the outage",
    "guest stalled in the outage / window",
    "blocktime (all / per vCPU)",
    "requests",
    "total bytes",
    "pattern check",
    "result",
];

pub fn run(ctx: &Ctx, timeout_s: u64) -> anyhow::Result<()> {
    let mem = if ctx.quick { 128 } else { 512 };
    let cut_after = (mem << 20) / CUT_AFTER_FRACTION;
    let mut report = ctx.report(
        "postcopy-recovery",
        json!({
            "working-set-mib": mem,
            "workload": "pattern (full speed)",
            "vcpus": 1,
            "timeout-s (each phase)": timeout_s,
            "detect-limit-s": DETECT_LIMIT.as_secs(),
            "cut-after-postcopy-bytes": cut_after,
            "downtime-limit-ms": 1,
            "max-bandwidth": "link rate (125000000 B/s for 1 Gbit/s)",
            "heartbeat-ms": 1,
            "capabilities": ["events", "return-path", "postcopy-ram", "postcopy-blocktime"],
            "cut": "ip -n tern-src link set tern-veth-s down; restore: ... up",
        }),
    );
    report.notes.extend(notes(mem, cut_after));
    report
        .tables
        .push(Table::new("Post-copy recovery after a link cut", COLUMNS));
    let shaped = Link::shaped(1000);
    let scenario = format!(
        "pattern {mem} MiB @ max, cut after {} MiB of post-copy",
        cut_after >> 20
    );
    let selected: Vec<Kind> = ctx
        .vmms()
        .into_iter()
        .filter(|_| ctx.selected(&format!("{} {scenario}", shaped.name)))
        .collect();
    if selected.is_empty() {
        return report.write(&ctx.out);
    }
    let _ns = Netns::up(&ctx.repo, "1gbit")?;
    for kind in selected {
        tracing::info!(
            "postcopy-recovery: {} | {} | {scenario}",
            kind.label(),
            shaped.name
        );
        let p = RecParams {
            timeout_s,
            detect_limit: DETECT_LIMIT,
            cut_after_postcopy_bytes: cut_after,
            recover_port: RECOVER_PORT,
            max_bandwidth: shaped.max_bandwidth,
            memory_mib: vm_memory(mem),
        };
        let guest = Guest::new("pattern", mem, 0);
        let o = migrate_pair(ctx, &shaped, kind, &guest, &p);
        let cells = row(kind, &shaped, &scenario, &o);
        tracing::info!("  -> {}", cells.join(" | "));
        if let Some(t) = report.tables.first_mut() {
            t.rows.push(cells);
        }
        report.runs.push(json!({
            "vmm": kind.label(), "link": shaped, "scenario": scenario, "guest": guest,
            "params": p, "outcome": o,
        }));
        report.write(&ctx.out)?;
    }
    report.write(&ctx.out)
}

fn notes(mem: u64, cut_after: u64) -> Vec<String> {
    vec![
        format!(
            "Guest: the test guest's `pattern` workload over {mem} MiB at full speed (QEMU's \
             migration-test rule, so the destination's RAM can be checked afterwards), one vCPU \
             on both VMMs. Post-copy after pass 1 as in the `postcopy` suite (migrate-start-postcopy \
             once dirty-sync-count reaches 2; downtime-limit 1 ms)."
        ),
        format!(
            "Cut: once the source's ram.postcopy-bytes reaches {} MiB, `ip -n tern-src link set \
             tern-veth-s down` (the veth end in the source's namespace; the peer loses carrier; \
             nothing is reset, packets are dropped). Both sides get {} s to go postcopy-paused \
             by themselves (Tern: x-tern-liveness-timeout, default 10 s, also the sockets' \
             TCP_USER_TIMEOUT; QEMU 10.0 sets no keepalive or timeout on its migration socket); \
             a side still postcopy-active then gets `migrate-pause`, as a management layer \
             issues it once it notices (libvirt: virsh domjobabort --postcopy; `how paused` \
             says which). Restore: the \
             same link set up (the tbf shaping stays attached).",
            cut_after >> 20,
            DETECT_LIMIT.as_secs()
        ),
        format!(
            "Recovery: `migrate-recover {{\"uri\": \"tcp:10.77.0.2:{RECOVER_PORT}\"}}` on the \
             destination, then at once `migrate {{\"uri\": …, \"resume\": true}}` on the \
             source; the recovery handshake is the host time from migrate-recover to the \
             source's query-migrate saying postcopy-active again (polled every 5 ms). VMM's own \
             recovery time: Tern's x-tern-postcopy-recovery total-us (migrate resume → \
             RESUME_ACK); QEMU reports none."
        ),
        "pages missing at pause: the destination's x-tern-postcopy-missing-pages (Tern) while \
         paused; re-sent: x-tern-postcopy-recovery resent-pages (pages the source had sent on \
         the broken channel that never arrived). QEMU reports neither."
            .into(),
        "Guest, from the destination's heartbeats (every 1 ms, host clock): the largest interval \
         between two beats from the cut until postcopy-active again, and the sum of each \
         interval's part beyond 2 ms over that window (the guest runs on during the outage and \
         blocks only on pages it lacks: a sequential writer reaches a missing page soon)."
            .into(),
        "pattern check: after both sides said completed, the destination is stopped, its RAM \
         saved with pmemsave and checked with `tern check-pattern` (every page of the working \
         set consistent with QEMU's migration-test rule)."
            .into(),
    ]
}

fn secs_opt_ms(v: Option<f64>) -> String {
    secs(v.map(|m| m / 1e3))
}

fn row(kind: Kind, link: &Link, scenario: &str, o: &RecOutcome) -> Vec<String> {
    let bt = match o.blocktime_ms {
        Some(all) => format!(
            "{all} ms / {}",
            o.vcpu_blocktime_ms
                .iter()
                .map(|x| format!("{x} ms"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "–".into(),
    };
    let opt_num = |v: Option<u64>| v.map_or_else(|| "not reported".to_string(), |n| n.to_string());
    vec![
        kind.label().to_string(),
        link.name.clone(),
        scenario.to_string(),
        mib(o.cut_at_postcopy_bytes),
        format!(
            "{} / {}",
            secs_opt_ms(o.src_paused_after_ms),
            secs_opt_ms(o.dst_paused_after_ms)
        ),
        o.how_paused.clone(),
        secs_opt_ms(o.outage_ms),
        ms(o.handshake_ms),
        o.vmm_recovery_us.map_or_else(
            || "not reported".into(),
            |u| format!("{:.1} ms", u as f64 / 1e3),
        ),
        secs_opt_ms(o.cut_to_active_ms),
        secs_opt_ms(o.total_ms),
        format!("{} / {}", opt_num(o.missing_pages), opt_num(o.resent_pages)),
        ms(o.outage_max_gap_ms),
        match (o.outage_stalled_ms, o.outage_window_ms) {
            (Some(s), Some(w)) => format!("{s:.0} ms / {w:.0} ms"),
            _ => "–".into(),
        },
        bt,
        num(o.postcopy_requests),
        mib(o.transferred),
        o.pattern.clone(),
        match &o.error {
            Some(e) => format!("{}: {}", o.result, e.chars().take(160).collect::<String>()),
            None => o.result.clone(),
        },
    ]
}

/// Spawns destination + source in their namespaces, warms up, runs the scenario, tears down.
fn migrate_pair(ctx: &Ctx, link: &Link, kind: Kind, guest: &Guest, p: &RecParams) -> RecOutcome {
    let base = format!(
        "{}-pcr-{}",
        kind.label().to_lowercase(),
        crate::facts::realtime_ns() % 1_000_000
    );
    let spec = |role: &str, ns, incoming| Spec {
        kind,
        name: format!("{base}-{role}"),
        memory_mib: p.memory_mib,
        vcpus: 1,
        guest: guest.clone(),
        netns: ns,
        incoming,
        device: None,
        objects: Vec::new(),
        qemu_args: Vec::new(),
    };
    let res = (|| -> anyhow::Result<RecOutcome> {
        let mut dst = Vm::spawn(&ctx.bins, &spec("dst", link.dst_ns, true))?;
        let mut src = Vm::spawn(&ctx.bins, &spec("src", link.src_ns, false))?;
        src.wait_ready(guest, Duration::from_secs(90))?;
        // Settle after the warm-up (not a synchronisation: nothing waits on it).
        std::thread::sleep(Duration::from_secs(1));
        let dump = ctx.bins.work.join(format!("{base}-dst.dump"));
        let out = postcopy_recovery_run::run(&ctx.bins, &mut src, &mut dst, &link.host, p, &dump);
        if out.result != "completed" {
            tracing::warn!("source log: {}", crate::vm::log_tail(&src.log));
            tracing::warn!("destination log: {}", crate::vm::log_tail(&dst.log));
        }
        let _ = std::fs::remove_file(&dump);
        src.quit();
        dst.quit();
        Ok(out)
    })();
    // The link must be up again for the next row whatever happened.
    if let Err(e) = postcopy_recovery_run::set_link(true) {
        tracing::warn!("restoring the link: {e:#}");
    }
    res.unwrap_or_else(|e| RecOutcome {
        result: "error".into(),
        error: Some(format!("{e:#}")),
        ..RecOutcome::default()
    })
}
