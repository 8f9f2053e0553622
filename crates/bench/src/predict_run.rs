//! The measurements of suite `predict` (`predict.rs`): one Tern row (warm up, `calc-dirty-rate`
//! in both of Tern's modes, `x-tern-predict-migration`, then the migration it predicts) and
//! QEMU's `calc-dirty-rate` on the same guest.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use crate::link::Link;
use crate::migrate::{live_migrate, MigParams, Outcome};
use crate::precopy::vm_memory;
use crate::vm::{Guest, Kind, Spec, Vm};
use crate::Ctx;

/// `calc-time` of every `calc-dirty-rate` (seconds, QEMU's unit; libvirt's
/// `virsh domdirtyrate-calc` default is 1 s too).
pub const CALC_TIME_S: u64 = 1;

/// The modes measured, in order. The last one is what `x-tern-predict-migration` uses by
/// default (it reads the last measurement): QEMU's default mode, `page-sampling`.
pub const MODES: [&str; 2] = ["dirty-bitmap", "page-sampling"];

/// Everything one Tern row measured. Failures before the migration leave `outcome` at
/// `result = "error"` with the reason.
#[derive(Debug, Default, Serialize)]
pub struct TernRow {
    /// `query-dirty-rate` answers, one per mode of [`MODES`] (`Null` when it failed).
    pub dirty_rate: Vec<Value>,
    /// `x-tern-predict-migration` from the last (page-sampling) measurement.
    pub prediction: Value,
    /// The same with `dirty-rate` given: the dirty-bitmap measurement.
    pub prediction_bitmap: Value,
    /// `bandwidth` given to the prediction (bytes/s).
    pub bandwidth: u64,
    pub outcome: Outcome,
    /// The median of the source's `dirty-pages-rate` samples during the migration, MiB/s.
    pub migration_dirty_rate: Option<f64>,
    /// The rate the migration achieved: `ram.transferred` ÷ total time (÷ wall time to the
    /// cancel when it did not complete), bytes/s.
    pub achieved_bandwidth: Option<f64>,
    /// Hindsight: `x-tern-predict-migration` after the migration, from
    /// [`Self::migration_dirty_rate`] and [`Self::achieved_bandwidth`] (what the model says
    /// when its two inputs are what the migration actually saw).
    pub prediction_hindsight: Value,
    /// `/proc/loadavg` just before the source was started.
    pub load_before: String,
}

/// The median of the source's `dirty-pages-rate` (pages/s) over the progress samples, MiB/s.
pub fn median_dirty_rate(out: &Outcome) -> Option<f64> {
    let mut v: Vec<f64> = out
        .progress
        .iter()
        .filter_map(|p| p.get("dirty-pages-rate").and_then(Value::as_u64))
        .filter(|&r| r > 0)
        .map(|r| (r * 4096) as f64 / (1u64 << 20) as f64)
        .collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// Bytes/s the migration moved (see [`TernRow::achieved_bandwidth`]).
pub fn achieved(out: &Outcome) -> Option<f64> {
    let secs = match (out.result.as_str(), out.total_ms) {
        ("completed", Some(t)) => t / 1e3,
        _ => out.wall_ms / 1e3,
    };
    let b = out.transferred? as f64;
    (secs > 0.0 && b > 0.0).then(|| b / secs)
}

/// The rate (MiB/s) of a `query-dirty-rate` answer, when measured.
pub fn rate_of(q: &Value) -> Option<i64> {
    q.get("dirty-rate").and_then(Value::as_i64)
}

/// `calc-dirty-rate {calc-time: 1, mode?}` then `query-dirty-rate` every 100 ms until
/// `measured`; returns the answer.
pub fn calc_dirty_rate(vm: &mut Vm, mode: &str) -> anyhow::Result<Value> {
    vm.exec(
        "calc-dirty-rate",
        json!({ "calc-time": CALC_TIME_S, "mode": mode }),
    )?;
    let end = Instant::now() + Duration::from_secs(CALC_TIME_S + 15);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let q = vm.exec("query-dirty-rate", json!({}))?;
        if q.get("status").and_then(Value::as_str) == Some("measured") {
            return Ok(q);
        }
        if Instant::now() > end {
            bail!(
                "{}: calc-dirty-rate ({mode}) not measured after {} s: {q}",
                vm.name,
                CALC_TIME_S + 15
            );
        }
    }
}

fn spec(kind: Kind, name: String, guest: &Guest, ns: Option<&'static str>, inc: bool) -> Spec {
    Spec {
        kind,
        name,
        memory_mib: guest.ram_mib.unwrap_or(vm_memory(guest.mem)),
        vcpus: 1,
        guest: guest.clone(),
        netns: ns,
        incoming: inc,
        device: None,
        objects: Vec::new(),
        qemu_args: Vec::new(),
    }
}

fn base(kind: Kind, tag: &str) -> String {
    format!(
        "{}-{tag}-{}",
        kind.label().to_lowercase(),
        crate::facts::realtime_ns() % 1_000_000
    )
}

/// One Tern row: source and destination on `link`, warm-up, both measurements, the
/// predictions with `bandwidth`, the migration with `p`. Never fails: errors become the
/// outcome.
pub fn tern_row(ctx: &Ctx, link: &Link, guest: &Guest, bandwidth: u64, p: &MigParams) -> TernRow {
    let mut row = TernRow {
        bandwidth,
        ..TernRow::default()
    };
    row.load_before = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .trim()
        .to_string();
    let b = base(Kind::Tern, "pr");
    let res = (|| -> anyhow::Result<()> {
        let mut dst = Vm::spawn(
            &ctx.bins,
            &spec(Kind::Tern, format!("{b}-dst"), guest, link.dst_ns, true),
        )?;
        let mut src = Vm::spawn(
            &ctx.bins,
            &spec(Kind::Tern, format!("{b}-src"), guest, link.src_ns, false),
        )?;
        src.wait_ready(guest, Duration::from_secs(90))?;
        std::thread::sleep(Duration::from_secs(1));
        for mode in MODES {
            let q = calc_dirty_rate(&mut src, mode).unwrap_or_else(|e| {
                tracing::warn!("{e:#}");
                Value::Null
            });
            row.dirty_rate.push(q);
        }
        let args = json!({
            "bandwidth": bandwidth,
            "downtime-limit": p.downtime_limit_ms,
            "max-bandwidth": p.max_bandwidth,
        });
        row.prediction = src
            .exec("x-tern-predict-migration", args.clone())
            .context("prediction from the page-sampling rate")?;
        if let Some(r) = row.dirty_rate.first().and_then(rate_of) {
            let mut a = args;
            a["dirty-rate"] = json!(r.max(0));
            row.prediction_bitmap = src
                .exec("x-tern-predict-migration", a)
                .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
        }
        row.outcome = live_migrate(&mut src, &mut dst, &link.host, p);
        row.migration_dirty_rate = median_dirty_rate(&row.outcome);
        row.achieved_bandwidth = achieved(&row.outcome);
        if let (Some(r), Some(bw)) = (row.migration_dirty_rate, row.achieved_bandwidth) {
            let a = json!({
                "bandwidth": bw as u64,
                "dirty-rate": r.ceil() as u64,
                "downtime-limit": p.downtime_limit_ms,
                "max-bandwidth": p.max_bandwidth,
            });
            row.prediction_hindsight = src
                .exec("x-tern-predict-migration", a)
                .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
        }
        if row.outcome.result != "completed" && row.outcome.result != "not converged" {
            tracing::warn!("source log: {}", crate::vm::log_tail(&src.log));
            tracing::warn!("destination log: {}", crate::vm::log_tail(&dst.log));
        }
        src.quit();
        dst.quit();
        Ok(())
    })();
    if let Err(e) = res {
        row.outcome = Outcome {
            result: "error".into(),
            error: Some(format!("{e:#}")),
            src_final: Value::Null,
            dst_final: Value::Null,
            ..Outcome::default()
        };
    }
    row
}

/// QEMU's `calc-dirty-rate` in each of [`MODES`] on the same guest (1 vCPU, root namespace,
/// no migration).
pub fn qemu_rates(ctx: &Ctx, guest: &Guest) -> anyhow::Result<Vec<Value>> {
    let b = base(Kind::Qemu, "dr");
    let mut vm = Vm::spawn(&ctx.bins, &spec(Kind::Qemu, b, guest, None, false))?;
    vm.wait_ready(guest, Duration::from_secs(90))?;
    std::thread::sleep(Duration::from_secs(1));
    let mut out = Vec::new();
    for mode in MODES {
        out.push(calc_dirty_rate(&mut vm, mode)?);
    }
    vm.quit();
    Ok(out)
}
