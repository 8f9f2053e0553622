//! Suite `machine`: start-up time, native and dirty-logged dirty rates, pacing accuracy and
//! heartbeat jitter, for each VMM on the same guest.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::link::{Link, Netns};
use crate::migrate::{incoming_tcp, set_caps};
use crate::report::{ms, num, Table};
use crate::vm::{Guest, Kind, Spec, Vm};
use crate::Ctx;

const WINDOW_S: f64 = 3.0;

fn spec(kind: Kind, name: &str, memory_mib: u64, vcpus: u32, guest: Guest, incoming: bool) -> Spec {
    Spec {
        netns: None,
        kind,
        name: format!("{}-{name}", kind.label().to_lowercase()),
        memory_mib,
        vcpus,
        guest,
        incoming,
        device: None,
        objects: Vec::new(),
        qemu_args: Vec::new(),
    }
}

/// Heartbeat interval statistics (ms) of records inside [from_ns, to_ns].
fn hb_stats(hb: &[(u64, u64)], from_ns: u64, to_ns: u64) -> Value {
    let ts: Vec<u64> = hb
        .iter()
        .map(|h| h.1)
        .filter(|&t| t >= from_ns && t <= to_ns)
        .collect();
    let mut iv: Vec<f64> = ts
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]) as f64 / 1e6)
        .collect();
    iv.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| -> Option<f64> {
        (!iv.is_empty()).then(|| iv[((iv.len() - 1) as f64 * p).round() as usize])
    };
    let secs = (to_ns.saturating_sub(from_ns)) as f64 / 1e9;
    json!({
        "beats-per-s": if secs > 0.0 { ts.len() as f64 / secs } else { 0.0 },
        "p50-ms": pct(0.5), "p99-ms": pct(0.99), "max-ms": iv.last(),
    })
}

/// Guest dirty rate (MiB/s) and heartbeat statistics over a window.
fn window(vm: &mut Vm, secs: f64) -> anyhow::Result<(f64, Value)> {
    let t0 = crate::facts::realtime_ns();
    let p0 = vm.progress()?.context("no guest counters")?;
    std::thread::sleep(Duration::from_secs_f64(secs));
    let p1 = vm.progress()?.context("no guest counters")?;
    let t1 = crate::facts::realtime_ns();
    let dt = p1.ns.saturating_sub(p0.ns) as f64 / 1e9;
    if dt <= 0.0 {
        bail!("no new guest counters during the window");
    }
    let rate = p1.pages.saturating_sub(p0.pages) as f64 * 4096.0 / 1048576.0 / dt;
    let hb = vm.heartbeats()?.to_vec();
    Ok((rate, hb_stats(&hb, t0, t1)))
}

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

pub fn run(ctx: &Ctx) -> anyhow::Result<()> {
    let mut report = ctx.report(
        "machine",
        json!({ "window-s": WINDOW_S, "start-runs": if ctx.quick { 3 } else { 7 } }),
    );
    report.notes.extend([
        "start → first heartbeat: host CLOCK_REALTIME from just before spawn(2) of the VMM to the \
         first heartbeat (Tern: stamped by the VMM; QEMU: serial byte arrival at the harness). \
         256 MiB VM, workload idle mem=0."
            .into(),
        "dirty rates: pages written by the guest (Tern: x-tern-guest-stats; QEMU: the guest's \
         once-a-second status line) over a 3 s window, 4 KiB per page."
            .into(),
        "`dirty log on (no sync)`: Tern `x-tern-dirty-log {enable:true}`, QEMU `calc-dirty-rate \
         mode=dirty-bitmap` (logging on, one clear at the start): pages fault once after the clear. \
         `migrating over veth-1gbit`: a live migration over the shaped 1 Gbit/s link (downtime-limit \
         300 ms, max-bandwidth 125 MB/s), where a max-rate guest cannot converge, so the dirty bitmap \
         is synced and cleared every iteration; window starts 0.3 s after `migrate`, cancelled after it. \
         (Over loopback it converges: the guest cannot re-dirty logged pages faster than loopback moves them.)"
            .into(),
    ]);
    report.tables.push(Table::new(
        "Start → first heartbeat",
        &["VMM", "runs", "median", "min", "max", "failures"],
    ));
    report.tables.push(Table::new(
        "Dirty rate and heartbeat jitter",
        &[
            "VMM",
            "vCPUs",
            "guest",
            "condition",
            "requested",
            "achieved",
            "heartbeats/s",
            "hb p50",
            "hb p99",
            "hb max",
            "note",
        ],
    ));
    let runs = if ctx.quick { 3 } else { 7 };
    for kind in ctx.vmms() {
        // 1. Start-up.
        let mut times = Vec::new();
        let mut failures = Vec::new();
        for i in 0..runs {
            let r = (|| -> anyhow::Result<f64> {
                let mut vm = Vm::spawn(
                    &ctx.bins,
                    &spec(
                        kind,
                        &format!("start{i}"),
                        256,
                        1,
                        Guest::new("idle", 0, 0),
                        false,
                    ),
                )?;
                let end = Instant::now() + Duration::from_secs(20);
                loop {
                    if let Some(first) = vm.heartbeats()?.first() {
                        let t = first.1.saturating_sub(vm.spawn_ns) as f64 / 1e6;
                        vm.quit();
                        return Ok(t);
                    }
                    if Instant::now() > end {
                        bail!("no heartbeat in 20 s");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })();
            match r {
                Ok(t) => times.push(t),
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        let mut sorted = times.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        report.tables[0].rows.push(vec![
            kind.label().into(),
            runs.to_string(),
            ms(sorted.get(sorted.len() / 2).copied()),
            ms(sorted.first().copied()),
            ms(sorted.last().copied()),
            if failures.is_empty() {
                "0".into()
            } else {
                format!("{}: {}", failures.len(), failures[0])
            },
        ]);
        report.runs.push(
            json!({ "vmm": kind.label(), "test": "start", "ms": times, "failures": failures }),
        );
        report.write(&ctx.out)?;
        // 2. Dirty rates.
        let big = if ctx.quick { 128 } else { 512 };
        let mut cases: Vec<(u32, Guest, &str)> = vec![
            (1, Guest::new("idle", 0, 0), "no dirty log"),
            (1, Guest::new("dirty", big, 0), "no dirty log"),
            (1, Guest::new("dirty", big, 0), "dirty log on (no sync)"),
            (1, Guest::new("dirty", big, 0), "migrating over veth-1gbit"),
            (1, Guest::new("dirty", 256, 50), "no dirty log"),
            (1, Guest::new("dirty", 256, 200), "no dirty log"),
        ];
        if kind == Kind::Tern && ctx.tern_2vcpu {
            cases.push((2, Guest::new("dirty", big, 0), "no dirty log"));
        }
        for (i, (vcpus, g, cond)) in cases.into_iter().enumerate() {
            let label = format!("{} {} {}", g.workload, g.mem, cond);
            if !ctx.selected(&label) {
                continue;
            }
            tracing::info!(
                "machine: {} {vcpus} vCPU {label} rate={}",
                kind.label(),
                g.rate
            );
            let r = rate_case(ctx, kind, i, vcpus, &g, cond);
            let (rate, hb, note) = match r {
                Ok((rate, hb, note)) => (Some(rate), hb, note),
                Err(e) => (None, Value::Null, format!("error: {e:#}")),
            };
            let row = vec![
                kind.label().into(),
                vcpus.to_string(),
                format!("{} mem={}", g.workload, g.mem),
                cond.into(),
                if g.workload == "dirty" {
                    if g.rate == 0 {
                        "max".into()
                    } else {
                        format!("{} MiB/s", g.rate)
                    }
                } else {
                    "–".into()
                },
                rate.map(|r| format!("{r:.0} MiB/s"))
                    .unwrap_or_else(|| "–".into()),
                num(f(&hb, "beats-per-s").map(|x| format!("{x:.0}"))),
                ms_frac(f(&hb, "p50-ms")),
                ms_frac(f(&hb, "p99-ms")),
                ms_frac(f(&hb, "max-ms")),
                note.chars().take(200).collect(),
            ];
            tracing::info!("  -> {}", row.join(" | "));
            report.tables[1].rows.push(row);
            report.runs.push(json!({
                "vmm": kind.label(), "vcpus": vcpus, "guest": g, "condition": cond,
                "rate-mib-s": rate, "heartbeats": hb, "note": note,
            }));
            report.write(&ctx.out)?;
        }
    }
    report.write(&ctx.out)
}

fn ms_frac(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3} ms"))
        .unwrap_or_else(|| "–".into())
}

fn rate_case(
    ctx: &Ctx,
    kind: Kind,
    i: usize,
    vcpus: u32,
    g: &Guest,
    cond: &str,
) -> anyhow::Result<(f64, Value, String)> {
    let memory = crate::precopy::vm_memory(g.mem.max(192));
    let migrating = cond.starts_with("migrating");
    // Loopback moves data faster than a PVM guest can re-dirty logged pages (~90 k write
    // faults/s), so only the shaped link keeps a max-rate migration from converging.
    let _netns = if migrating {
        Some(Netns::up(&ctx.repo, "1gbit")?)
    } else {
        None
    };
    let link = Link::shaped(1000);
    let mut s = spec(kind, &format!("rate{i}"), memory, vcpus, g.clone(), false);
    if migrating {
        s.netns = link.src_ns;
    }
    let mut vm = Vm::spawn(&ctx.bins, &s)?;
    vm.wait_ready(g, Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_millis(1500));
    let mut note = String::new();
    let mut dst = None;
    match cond {
        "dirty log on (no sync)" => match kind {
            Kind::Tern => {
                vm.exec("x-tern-dirty-log", json!({ "enable": true }))?;
            }
            Kind::Qemu => {
                let calc = (WINDOW_S as u64) + 2;
                vm.exec(
                    "calc-dirty-rate",
                    json!({ "calc-time": calc, "mode": "dirty-bitmap" }),
                )?;
                std::thread::sleep(Duration::from_millis(300));
            }
        },
        "migrating over veth-1gbit" => {
            let lo = link.clone();
            let mut ds = spec(
                kind,
                &format!("rate{i}-dst"),
                memory,
                vcpus,
                g.clone(),
                true,
            );
            ds.netns = link.dst_ns;
            let mut d = Vm::spawn(&ctx.bins, &ds)?;
            let caps = vec!["events".to_string()];
            set_caps(&mut d, &caps)?;
            set_caps(&mut vm, &caps)?;
            vm.exec(
                "migrate-set-parameters",
                json!({ "downtime-limit": 300, "max-bandwidth": lo.max_bandwidth }),
            )?;
            let port = incoming_tcp(&mut d, &lo.host)?;
            vm.exec(
                "migrate",
                json!({ "uri": format!("tcp:{}:{port}", lo.host) }),
            )?;
            std::thread::sleep(Duration::from_millis(300));
            dst = Some(d);
        }
        _ => {}
    }
    let w = window(&mut vm, WINDOW_S);
    if let (Err(e), Some(_)) = (&w, &dst) {
        let q = vm.exec("query-migrate", json!({}))?;
        let st = q.get("status").and_then(Value::as_str).unwrap_or("?");
        let sync = q
            .get("ram")
            .and_then(|r| r.get("dirty-sync-count"))
            .and_then(Value::as_u64);
        bail!(
            "{e:#}; the migration is {st} ({} dirty syncs, downtime {} ms, dirty-pages-rate {})",
            sync.unwrap_or(0),
            q.get("downtime").cloned().unwrap_or(Value::Null),
            q.get("ram")
                .and_then(|r| r.get("dirty-pages-rate"))
                .cloned()
                .unwrap_or(Value::Null)
        );
    }
    let (rate, hb) = w?;
    if let Some(d) = dst {
        let q = vm.exec("query-migrate", json!({}))?;
        note = format!(
            "status {}, {} dirty syncs",
            q.get("status").and_then(Value::as_str).unwrap_or("?"),
            q.get("ram")
                .and_then(|r| r.get("dirty-sync-count"))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        );
        let _ = vm.exec("migrate_cancel", json!({}));
        d.quit();
    }
    if cond == "dirty log on (no sync)" {
        match kind {
            Kind::Tern => {
                let _ = vm.exec("x-tern-dirty-log", json!({ "enable": false }));
            }
            Kind::Qemu => {
                std::thread::sleep(Duration::from_secs(2));
                if let Ok(q) = vm.exec("query-dirty-rate", json!({})) {
                    note = format!(
                        "query-dirty-rate: {} MiB/s",
                        q.get("dirty-rate").cloned().unwrap_or(Value::Null)
                    );
                }
            }
        }
    }
    vm.quit();
    Ok((rate, hb, note))
}
