//! Suite `predict` (issue 13 item 8): Tern's `x-tern-predict-migration`, made before each
//! migration from a `calc-dirty-rate` of the running guest and the link's bandwidth, checked
//! against what that migration then does; and QEMU's `calc-dirty-rate` on the same guest beside
//! Tern's. How "predicted right" is judged: [`verdict`] (decision 190).

use serde_json::{json, Value};

use crate::link::{Link, Netns};
use crate::migrate::{MigParams, Outcome};
use crate::precopy::{result_cell, DOWNTIME_LIMIT_MS, QEMU_DEFAULT_MAX_BANDWIDTH};
use crate::predict_run::{qemu_rates, rate_of, tern_row, TernRow, CALC_TIME_S, MODES};
use crate::report::{Report, Table};
use crate::vm::Guest;
use crate::Ctx;

/// Per-migration timeout when `--timeout` is not given: still active then = "did not converge".
pub const DEFAULT_TIMEOUT_S: u64 = 30;

struct Workload {
    name: String,
    guest: Guest,
}

fn workloads(quick: bool) -> Vec<Workload> {
    let (idle, big) = if quick { (256, 128) } else { (1024, 512) };
    let w = |name: String, guest| Workload { name, guest };
    vec![
        w(
            format!("idle {idle} MiB filled"),
            Guest::new("idle", idle, 0),
        ),
        w(
            "dirty 256 MiB @ 50 MiB/s".into(),
            Guest::new("dirty", 256, 50),
        ),
        w(
            "dirty 256 MiB @ 200 MiB/s".into(),
            Guest::new("dirty", 256, 200),
        ),
        w(
            format!("dirty {big} MiB @ max"),
            Guest::new("dirty", big, 0),
        ),
        w("pattern 64 MiB @ max".into(), Guest::new("pattern", 64, 0)),
    ]
}

/// The two parameter sets: QEMU's default cap, and none.
const CAPS: [(&str, u64); 2] = [
    ("128 MiB/s (QEMU default)", QEMU_DEFAULT_MAX_BANDWIDTH),
    ("uncapped", 0),
];

const COLUMNS: &[&str] = &[
    "link",
    "max-bandwidth",
    "scenario",
    "dirty rate MiB/s (sampling / bitmap)",
    "converges (pred / actual)",
    "passes (pred / actual syncs)",
    "total time (pred / actual, ×)",
    "downtime (pred / actual, ×)",
    "bytes (pred / actual, ×)",
    "verdict",
    "dirty rate in migration (median)",
    "rate achieved",
    "from bitmap rate",
    "hindsight",
    "load before",
];

const RATE_COLUMNS: &[&str] = &[
    "scenario",
    "guest's own rate",
    "Tern page-sampling (each row)",
    "QEMU page-sampling",
    "Tern dirty-bitmap (each row)",
    "QEMU dirty-bitmap",
];

pub fn run(ctx: &Ctx, timeout_s: u64) -> anyhow::Result<()> {
    let mut report = ctx.report(
        "predict",
        json!({
            "downtime-limit-ms": DOWNTIME_LIMIT_MS,
            "max-bandwidth": CAPS.iter().map(|(n, b)| json!({"name": n, "bytes-per-s": b})).collect::<Vec<_>>(),
            "timeout-s": timeout_s,
            "capabilities": ["events", "return-path"],
            "calc-dirty-rate": {"calc-time": CALC_TIME_S, "modes": MODES, "prediction-from": "page-sampling (QEMU's default mode; the last measurement)"},
            "vcpus": 1,
            "heartbeat-ms": 1,
            "warm-up": "until the working set is written once (idle: fill done; dirty: one pass), then 1 s",
        }),
    );
    notes(&mut report, timeout_s);
    report
        .tables
        .push(Table::new("Prediction vs migration (Tern)", COLUMNS));
    let wls = workloads(ctx.quick);
    let mut rates: Vec<(String, Vec<i64>, Vec<i64>)> = wls
        .iter()
        .map(|w| (w.name.clone(), Vec::new(), Vec::new()))
        .collect();
    if ctx.bins.tern.is_some() {
        let lo = Link::measured_loopback(1.5);
        report.notes.push(format!(
            "loopback bandwidth given to the prediction: {:.0} MB/s ({})",
            lo.rate_bytes_s / 1e6,
            lo.rate_source
        ));
        for (i, w) in wls.iter().enumerate() {
            for cap in CAPS {
                one(ctx, &mut report, &lo, w, cap, timeout_s, &mut rates[i])?;
            }
        }
        let shaped = Link::shaped(1000);
        let any = wls
            .iter()
            .any(|w| CAPS.iter().any(|c| ctx.selected(&label(&shaped, w, c.0))));
        if any {
            let _ns = Netns::up(&ctx.repo, "1gbit")?;
            for (i, w) in wls.iter().enumerate() {
                for cap in CAPS {
                    one(ctx, &mut report, &shaped, w, cap, timeout_s, &mut rates[i])?;
                }
            }
        }
    }
    report.tables.push(Table::new(
        "Dirty rate: Tern vs QEMU, same guest (calc-dirty-rate, calc-time 1 s, MiB/s)",
        RATE_COLUMNS,
    ));
    for (w, (name, tern_s, tern_b)) in wls.iter().zip(&rates) {
        if !ctx.selected(&format!("dirty-rate {name}")) {
            continue;
        }
        let qemu = if ctx.bins.qemu.is_some() {
            tracing::info!("predict: QEMU calc-dirty-rate, {name}");
            match qemu_rates(ctx, &w.guest) {
                Ok(v) => Ok(v),
                Err(e) => {
                    tracing::warn!("QEMU calc-dirty-rate, {name}: {e:#}");
                    Err(format!("{e:#}"))
                }
            }
        } else {
            Err("QEMU not run".into())
        };
        let q = |i: usize| match &qemu {
            Ok(v) => v
                .get(i)
                .and_then(rate_of)
                .map_or_else(|| "–".into(), |r| r.to_string()),
            Err(e) => format!("error: {}", e.chars().take(80).collect::<String>()),
        };
        let list = |v: &Vec<i64>| {
            if v.is_empty() {
                "–".to_string()
            } else {
                v.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
            }
        };
        let own = match (w.guest.workload, w.guest.rate) {
            ("idle", _) => "0 (idle)".to_string(),
            (_, 0) => "full speed".to_string(),
            (_, r) => format!("{r} MiB/s"),
        };
        let row = vec![name.clone(), own, list(tern_s), q(1), list(tern_b), q(0)];
        tracing::info!("  -> {}", row.join(" | "));
        if let Some(t) = report.tables.last_mut() {
            t.rows.push(row);
        }
        report.runs.push(json!({
            "kind": "dirty-rate", "vmm": "QEMU", "scenario": name, "guest": w.guest,
            "query-dirty-rate": qemu.as_ref().ok(), "error": qemu.as_ref().err(),
        }));
        report.write(&ctx.out)?;
    }
    report.write(&ctx.out)
}

fn label(link: &Link, w: &Workload, cap: &str) -> String {
    format!("{} {} {}", link.name, cap, w.name)
}

#[allow(clippy::too_many_arguments)]
fn one(
    ctx: &Ctx,
    report: &mut Report,
    link: &Link,
    w: &Workload,
    (cap_name, cap): (&str, u64),
    timeout_s: u64,
    rates: &mut (String, Vec<i64>, Vec<i64>),
) -> anyhow::Result<()> {
    if !ctx.selected(&label(link, w, cap_name)) {
        return Ok(());
    }
    tracing::info!(
        "predict: Tern, {}, max-bandwidth {cap_name}, {}",
        link.name,
        w.name
    );
    let p = MigParams {
        caps: vec!["events".into(), "return-path".into()],
        downtime_limit_ms: DOWNTIME_LIMIT_MS,
        max_bandwidth: cap,
        multifd_channels: None,
        timeout_s,
    };
    let bandwidth = link.rate_bytes_s.max(1.0) as u64;
    let r = tern_row(ctx, link, &w.guest, bandwidth, &p);
    let sampling = r.dirty_rate.get(1).and_then(rate_of);
    let bitmap = r.dirty_rate.first().and_then(rate_of);
    rates.1.extend(sampling);
    rates.2.extend(bitmap);
    let row = table_row(link, w, cap_name, &r, sampling, bitmap, timeout_s);
    tracing::info!("  -> {}", row.join(" | "));
    if let Some(t) = report.tables.first_mut() {
        t.rows.push(row);
    }
    report.runs.push(json!({
        "kind": "migration", "vmm": "Tern", "vcpus": 1, "link": link, "max-bandwidth-name": cap_name,
        "scenario": w.name, "guest": w.guest, "params": p, "row": r,
        "verdict": verdict(&r.prediction, &r.outcome, timeout_s),
    }));
    report.write(&ctx.out)
}

fn pred_u64(p: &Value, key: &str) -> Option<u64> {
    p.get(key).and_then(Value::as_u64)
}

/// "pred / actual (×actual÷pred)" with `fmt` for both values.
fn pair(pred: Option<f64>, actual: Option<f64>, fmt: impl Fn(f64) -> String) -> String {
    let f = |v: Option<f64>| v.map_or_else(|| "–".to_string(), &fmt);
    let ratio = match (pred, actual) {
        (Some(p), Some(a)) if p > 0.0 => format!(" (×{:.2})", a / p),
        _ => String::new(),
    };
    format!("{} / {}{ratio}", f(pred), f(actual))
}

/// Whether the migration converged, as the verdict counts it: `completed` with a total time
/// within the timeout (`None`: it neither completed nor timed out, no verdict).
fn actual_converged(out: &Outcome, timeout_s: u64) -> Option<bool> {
    match out.result.as_str() {
        "completed" => Some(out.total_ms.is_none_or(|t| t <= timeout_s as f64 * 1e3)),
        "not converged" => Some(false),
        _ => None,
    }
}

/// Whether the prediction says the migration converges within `timeout_s` (a predicted total
/// time beyond the timeout counts as "does not converge": the row could not have shown it).
fn predicted_converges(pred: &Value, timeout_s: u64) -> Option<bool> {
    let c = pred.get("converges").and_then(Value::as_bool)?;
    Some(c && pred_u64(pred, "expected-total-time-ms").is_some_and(|t| t <= timeout_s * 1000))
}

/// Decision 190: right when the predicted and the actual convergence (both within the
/// timeout) agree; times, downtimes and bytes are reported as ratios, never judged.
pub fn verdict(pred: &Value, out: &Outcome, timeout_s: u64) -> String {
    match (
        predicted_converges(pred, timeout_s),
        actual_converged(out, timeout_s),
    ) {
        (None, _) => "no prediction".into(),
        (_, None) => format!("no verdict ({})", out.result),
        (Some(p), Some(a)) if p == a => format!(
            "right ({})",
            if a { "converges" } else { "does not converge" }
        ),
        (Some(true), Some(false)) => "WRONG: predicted to converge, did not".into(),
        (Some(_), Some(_)) => "WRONG: predicted not to converge, converged".into(),
    }
}

fn table_row(
    link: &Link,
    w: &Workload,
    cap_name: &str,
    r: &TernRow,
    sampling: Option<i64>,
    bitmap: Option<i64>,
    timeout_s: u64,
) -> Vec<String> {
    let p = &r.prediction;
    let out = &r.outcome;
    let yn = |b: Option<bool>| match b {
        Some(true) => "yes",
        Some(false) => "no",
        None => "–",
    };
    let pred_conv = p.get("converges").and_then(Value::as_bool);
    let pred_conv_cell = match (pred_conv, predicted_converges(p, timeout_s)) {
        (Some(true), Some(false)) => "yes, beyond the timeout".to_string(),
        (c, _) => yn(c).to_string(),
    };
    let actual = match actual_converged(out, timeout_s) {
        Some(b) => yn(Some(b)).to_string(),
        None => result_cell(out),
    };
    let total_actual = match out.result.as_str() {
        "completed" => out.total_ms,
        _ => None,
    };
    let short = |pv: &Value| {
        let right = match (
            predicted_converges(pv, timeout_s),
            actual_converged(out, timeout_s),
        ) {
            (Some(a), Some(b)) if a == b => " (right)",
            (Some(_), Some(_)) => " (wrong)",
            _ => "",
        };
        match pv.get("converges").and_then(Value::as_bool) {
            Some(true) => format!(
                "yes, {:.2} s, {} ms{right}",
                pred_u64(pv, "expected-total-time-ms").unwrap_or(0) as f64 / 1e3,
                pred_u64(pv, "expected-downtime-ms").unwrap_or(0)
            ),
            Some(false) => format!("no{right}"),
            None => "–".into(),
        }
    };
    let s = |v: Option<i64>| v.map_or_else(|| "–".to_string(), |r| r.to_string());
    vec![
        link.name.clone(),
        cap_name.into(),
        w.name.clone(),
        format!("{} / {}", s(sampling), s(bitmap)),
        format!("{pred_conv_cell} / {actual}"),
        format!(
            "{} / {}",
            pred_u64(p, "passes").map_or_else(|| "–".into(), |v| v.to_string()),
            out.dirty_sync_count
                .map_or_else(|| "–".into(), |v| v.to_string())
        ),
        pair(
            pred_u64(p, "expected-total-time-ms").map(|v| v as f64),
            total_actual,
            |v| format!("{:.2} s", v / 1e3),
        ),
        pair(
            pred_u64(p, "expected-downtime-ms").map(|v| v as f64),
            if out.result == "completed" {
                out.downtime_ms
            } else {
                None
            },
            |v| format!("{v:.0} ms"),
        ),
        {
            // A ratio only when both ran to the end: otherwise the two counts stop at
            // different moments (the model's verdict, the harness's cancel).
            let both = pred_conv == Some(true) && out.result == "completed";
            let cell = pair(
                pred_u64(p, "transferred-bytes").map(|v| v as f64),
                out.transferred.map(|v| v as f64),
                |v| format!("{:.0} MiB", v / 1048576.0),
            );
            match (both, cell.split_once(" (×")) {
                (false, Some((head, _))) => head.to_string(),
                _ => cell,
            }
        },
        verdict(p, out, timeout_s),
        r.migration_dirty_rate
            .map_or_else(|| "–".into(), |v| format!("{v:.0} MiB/s")),
        r.achieved_bandwidth
            .map_or_else(|| "–".into(), |b| format!("{:.0} MiB/s", b / 1048576.0)),
        short(&r.prediction_bitmap),
        short(&r.prediction_hindsight),
        r.load_before
            .split_whitespace()
            .next()
            .unwrap_or("–")
            .to_string(),
    ]
}

fn notes(report: &mut Report, timeout_s: u64) {
    report.notes.extend([
        "Per row (Tern, 1 vCPU): start source and destination, warm up, `calc-dirty-rate \
         {calc-time: 1, mode: dirty-bitmap}`, then `calc-dirty-rate {calc-time: 1}` (QEMU's \
         default mode, page-sampling), then `x-tern-predict-migration {bandwidth: the link's \
         rate, downtime-limit: 300, max-bandwidth: the row's}` (from the last measurement, \
         page-sampling), then the migration with those parameters (capabilities events, \
         return-path). `from bitmap rate`: the same prediction with `dirty-rate` = the \
         dirty-bitmap measurement (JSON: `prediction_bitmap`)."
            .into(),
        format!(
            "converges (actual): `completed` within {timeout_s} s; still active then = no \
             (migrate_cancel, the guest runs on). Verdict (decision 190): right when the \
             prediction's `converges` (a predicted total time beyond the timeout counting as \
             no) equals the actual one. Times, downtimes and bytes are not judged: they are \
             shown as predicted / actual (× = actual ÷ predicted). bytes actual = \
             ram.transferred (at the cancel for rows that did not converge); passes actual = \
             dirty-sync-count (the real sender also syncs mid-pass whenever the estimate fits \
             the threshold, so it counts more syncs than the model's passes)."
        ),
        "dirty rate in migration: the median of the source's `dirty-pages-rate` over the \
         progress samples (one per new dirty-sync-count), × 4 KiB: the rate the guest dirtied \
         at while the migration ran, dirty log on. rate achieved: ram.transferred ÷ total-time \
         (rows that did not converge: ÷ wall time to the cancel), against the bandwidth the \
         prediction was given (loopback: measured with no VM running; shaped: the nominal tbf \
         rate). hindsight: `x-tern-predict-migration` called on the source after the \
         migration with those two (dirty-rate = the median rounded up, bandwidth = the rate \
         achieved): what the model says when its inputs are what the migration saw (JSON: \
         `prediction_hindsight`); (right)/(wrong) judged as the verdict. load before: the \
         1-minute load average just before the row's VMMs started."
            .into(),
        "Dirty-rate table: the Tern columns list the measurement of each Tern row of that \
         workload (both links, both caps, in run order); QEMU's: one QEMU 1-vCPU guest with \
         the same workload, root namespace, no migration, the same two calc-dirty-rate calls."
            .into(),
    ]);
}
