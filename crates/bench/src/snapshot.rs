//! Suite `snapshot`: save a running guest to a file with `migrate {"uri": "file:..."}` (QEMU: a
//! live save; Tern: stops the VM first, docs/decisions.md 11) and restore it in a new process (`--incoming defer` / `-incoming defer`, then
//! `migrate-incoming {"uri": "file:..."}`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{json, Value};

use crate::migrate::set_caps;
use crate::report::{mib, ms, secs, Table};
use crate::vm::{Guest, Kind, Spec, Vm};
use crate::Ctx;

/// Largest working set under QEMU's PVH entry (`tern_guest::layout::PVH_MAX_MEM_MIB`).
const PVH_MAX_MEM_MIB: u64 = tern_guest::layout::PVH_MAX_MEM_MIB;

#[derive(Debug, Default, serde::Serialize)]
struct SnapOutcome {
    result: String,
    error: Option<String>,
    file_bytes: Option<u64>,
    save_total_ms: Option<f64>,
    save_downtime_ms: Option<f64>,
    save_wall_ms: Option<f64>,
    restore_ms: Option<f64>,
    restore_to_running_ms: Option<f64>,
    restore_to_heartbeat_ms: Option<f64>,
    save_final: Value,
    restore_final: Value,
}

fn poll(vm: &mut Vm, timeout: Duration) -> anyhow::Result<Value> {
    let end = Instant::now() + timeout;
    loop {
        let q = vm.exec("query-migrate", json!({}))?;
        match q.get("status").and_then(Value::as_str) {
            Some("completed") | Some("failed") | Some("cancelled") => return Ok(q),
            _ => {}
        }
        if Instant::now() > end {
            bail!("{}: not finished after {timeout:?}: {q}", vm.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spec(kind: Kind, name: String, memory: u64, g: &Guest, incoming: bool) -> Spec {
    Spec {
        kind,
        name,
        memory_mib: memory,
        vcpus: 1,
        guest: g.clone(),
        netns: None,
        incoming,
        device: None,
        objects: Vec::new(),
        qemu_args: Vec::new(),
    }
}

fn save_restore(
    ctx: &Ctx,
    kind: Kind,
    memory: u64,
    g: &Guest,
    file: &Path,
    o: &mut SnapOutcome,
) -> anyhow::Result<()> {
    let tag = format!("{}-snap{memory}-{}", kind.label().to_lowercase(), g.mem);
    let uri = format!("file:{}", file.display());
    let _ = std::fs::remove_file(file);
    {
        let mut src = Vm::spawn(
            &ctx.bins,
            &spec(kind, format!("{tag}-src"), memory, g, false),
        )?;
        src.wait_ready(g, Duration::from_secs(400))?;
        std::thread::sleep(Duration::from_millis(500));
        set_caps(&mut src, &["events".to_string()])?;
        // QEMU's default max-bandwidth (128 MiB/s) also caps migration to a file.
        src.exec(
            "migrate-set-parameters",
            json!({ "max-bandwidth": crate::link::LOOPBACK_MAX_BANDWIDTH }),
        )?;
        let t0 = Instant::now();
        src.exec("migrate", json!({ "uri": uri }))?;
        let q = poll(&mut src, Duration::from_secs(600))?;
        o.save_wall_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
        o.save_total_ms = q.get("total-time").and_then(Value::as_f64);
        o.save_downtime_ms = q.get("downtime").and_then(Value::as_f64);
        let st = q
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        o.save_final = q;
        src.quit();
        if st != "completed" {
            o.result = format!("save {st}");
            return Ok(());
        }
    }
    o.file_bytes = std::fs::metadata(file).ok().map(|m| m.len());
    let mut dst = Vm::spawn(
        &ctx.bins,
        &spec(kind, format!("{tag}-dst"), memory, g, true),
    )?;
    set_caps(&mut dst, &["events".to_string()])?;
    let t0 = Instant::now();
    let t0_ns = crate::facts::realtime_ns();
    dst.exec("migrate-incoming", json!({ "uri": uri }))?;
    let q = poll(&mut dst, Duration::from_secs(600))?;
    o.restore_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
    let st = q
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    o.restore_final = q;
    if st != "completed" {
        o.result = format!("restore {st}");
        return Ok(());
    }
    dst.wait_status("running", Duration::from_secs(30))?;
    o.restore_to_running_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(h) = dst.heartbeats()?.iter().find(|h| h.1 >= t0_ns) {
            o.restore_to_heartbeat_ms = Some(h.1.saturating_sub(t0_ns) as f64 / 1e6);
            break;
        }
        if Instant::now() > end {
            bail!("no heartbeat 10 s after the restore");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    dst.quit();
    o.result = "completed".into();
    Ok(())
}

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let sizes: &[u64] = if ctx.quick { &[256] } else { &[1024, 4096] };
    let mut report = ctx.report(
        "snapshot",
        json!({
            "sizes-mib": sizes, "vcpus": 1, "capabilities": ["events"], "file-dir": ctx.bins.work,
            "max-bandwidth": crate::link::LOOPBACK_MAX_BANDWIDTH,
        }),
    );
    report.notes.extend([
        "save: `migrate {uri: file:PATH}` on the running guest. QEMU saves live (the guest runs until \
         the switchover, so its downtime is only the final stop-and-copy); Tern stops the VM first and \
         writes everything with it stopped (docs/decisions.md 11), so its downtime is the whole save. \
         `total-time`/`downtime` from query-migrate, wall = host time from `migrate` to `completed`. max-bandwidth 10 GiB/s on both VMMs (QEMU's default 128 MiB/s \
         applies to file migration too)."
            .into(),
        "restore: a new process started with incoming defer, then `migrate-incoming {uri: file:PATH}`; \
         times from that command to `completed` on the destination, to `query-status` running, and \
         to the first heartbeat (host CLOCK_REALTIME)."
            .into(),
        "filled: `workload=idle mem=RAM-64 MiB`, at most 3056 MiB on both VMMs (the working set ends below the 32-bit hole); \
         mostly zero: `workload=idle mem=0`. Files live in the scratch directory (page cache warm)."
            .into(),
    ]);
    report.tables.push(Table::new(
        "Save / restore through a file",
        &[
            "VMM",
            "guest RAM",
            "content",
            "file size",
            "save (VMM total)",
            "save downtime",
            "save wall",
            "restore (to completed)",
            "to running",
            "to first heartbeat",
            "result",
        ],
    ));
    for kind in ctx.vmms() {
        for &memory in sizes {
            for filled in [false, true] {
                // Both VMMs keep the guest's linear working set below the 32-bit hole (3056 MiB):
                // the same data on both sides of the comparison.
                let mem = if filled { memory - 64 } else { 0 }.min(PVH_MAX_MEM_MIB);
                let _ = kind;
                let content = if filled {
                    format!("filled ({mem} MiB)")
                } else {
                    "mostly zero".into()
                };
                if !ctx.selected(&format!("{memory} {content}")) {
                    continue;
                }
                tracing::info!("snapshot: {} {memory} MiB {content}", kind.label());
                let g = Guest::new("idle", mem, 0);
                let file = ctx.bins.work.join(format!(
                    "{}-{memory}-{mem}.snap",
                    kind.label().to_lowercase()
                ));
                let mut o = SnapOutcome::default();
                if let Err(e) = save_restore(ctx, kind, memory, &g, &file, &mut o) {
                    o.result = "error".into();
                    o.error = Some(format!("{e:#}"));
                }
                let _ = std::fs::remove_file(&file);
                let result = match &o.error {
                    Some(e) => format!("{}: {}", o.result, e.chars().take(160).collect::<String>()),
                    None => o.result.clone(),
                };
                let row = vec![
                    kind.label().into(),
                    format!("{memory} MiB"),
                    content,
                    mib(o.file_bytes),
                    secs(o.save_total_ms.map(|t| t / 1e3)),
                    ms(o.save_downtime_ms),
                    secs(o.save_wall_ms.map(|t| t / 1e3)),
                    secs(o.restore_ms.map(|t| t / 1e3)),
                    secs(o.restore_to_running_ms.map(|t| t / 1e3)),
                    secs(o.restore_to_heartbeat_ms.map(|t| t / 1e3)),
                    result,
                ];
                tracing::info!("  -> {}", row.join(" | "));
                report.tables[0].rows.push(row);
                report.runs.push(
                    json!({ "vmm": kind.label(), "memory-mib": memory, "guest": g, "outcome": o }),
                );
                report.write(&ctx.out)?;
            }
        }
    }
    report.write(&ctx.out)
}
