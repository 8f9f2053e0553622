//! One post-copy migration with a link cut and a recovery, driven with QEMU's QMP commands
//! (the same code for Tern and QEMU), and what `postcopy-recovery` measures around it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use crate::facts::realtime_ns;
use crate::link::SRC_NS;
use crate::migrate::start_tcp;
use crate::postcopy_run::{stalled_ms, wait_dst_completed};
use crate::vm::{Bins, Vm};

/// The veth end in the source's namespace (`scripts/netns.sh`).
const SRC_DEV: &str = "tern-veth-s";

#[derive(Debug, Clone, Serialize)]
pub struct RecParams {
    pub timeout_s: u64,
    #[serde(serialize_with = "ser_secs")]
    pub detect_limit: Duration,
    pub cut_after_postcopy_bytes: u64,
    pub recover_port: u16,
    pub max_bandwidth: u64,
    pub memory_mib: u64,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// What one run measured (host times in ms). Failures are outcomes too.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RecOutcome {
    /// `completed`, `failed`, `error`, or what did not happen in time.
    pub result: String,
    pub error: Option<String>,
    /// Source `ram.postcopy-bytes` when the link was cut.
    pub cut_at_postcopy_bytes: Option<u64>,
    pub src_paused_after_ms: Option<f64>,
    pub dst_paused_after_ms: Option<f64>,
    /// `detected by both`, or which side got `migrate-pause` and when.
    pub how_paused: String,
    /// Cut → link up again.
    pub outage_ms: Option<f64>,
    /// `migrate-recover` issued → the source's `postcopy-active` again.
    pub handshake_ms: Option<f64>,
    /// Tern's `x-tern-postcopy-recovery` `total-us` of this recovery.
    pub vmm_recovery_us: Option<u64>,
    pub cut_to_active_ms: Option<f64>,
    pub total_ms: Option<f64>,
    pub missing_pages: Option<u64>,
    pub resent_pages: Option<u64>,
    /// Destination heartbeats, cut → `postcopy-active` again.
    pub outage_max_gap_ms: Option<f64>,
    pub outage_stalled_ms: Option<f64>,
    pub outage_window_ms: Option<f64>,
    pub blocktime_ms: Option<u64>,
    pub vcpu_blocktime_ms: Vec<u64>,
    pub postcopy_requests: Option<u64>,
    pub transferred: Option<u64>,
    /// `OK`, `FAILED: …` or why it was not checked.
    pub pattern: String,
    pub src_paused: Value,
    pub dst_paused: Value,
    pub src_final: Value,
    pub dst_final: Value,
}

fn status_of(v: &Value) -> String {
    v.get("status")
        .and_then(Value::as_str)
        .unwrap_or("none")
        .to_string()
}

fn ram_u64(v: &Value, key: &str) -> Option<u64> {
    v.get("ram")
        .and_then(|r| r.get(key))
        .and_then(Value::as_u64)
}

/// `ip -n tern-src link set tern-veth-s up|down`.
pub fn set_link(up: bool) -> anyhow::Result<()> {
    let state = if up { "up" } else { "down" };
    let st = Command::new("ip")
        .args(["-n", SRC_NS, "link", "set", SRC_DEV, state])
        .status()
        .context("running ip")?;
    if !st.success() {
        bail!("ip -n {SRC_NS} link set {SRC_DEV} {state}: {st}");
    }
    Ok(())
}

/// Runs the scenario. Never returns `Err`: errors become `result = "error"`.
pub fn run(
    bins: &Bins,
    src: &mut Vm,
    dst: &mut Vm,
    host: &str,
    p: &RecParams,
    dump: &Path,
) -> RecOutcome {
    let mut out = RecOutcome {
        pattern: "not checked".into(),
        ..RecOutcome::default()
    };
    if let Err(e) = drive(bins, src, dst, host, p, dump, &mut out) {
        out.error = Some(format!("{e:#}"));
        if out.result.is_empty() || out.result == "completed" {
            out.result = "error".into();
        }
    }
    out
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn drive(
    bins: &Bins,
    src: &mut Vm,
    dst: &mut Vm,
    host: &str,
    p: &RecParams,
    dump: &Path,
    out: &mut RecOutcome,
) -> anyhow::Result<()> {
    let caps: Vec<String> = [
        "events",
        "return-path",
        "postcopy-ram",
        "postcopy-blocktime",
    ]
    .iter()
    .map(|c| (*c).to_owned())
    .collect();
    let started = start_tcp(src, dst, host, &caps, 1, p.max_bandwidth)?;
    let timeout = Duration::from_secs(p.timeout_s);
    // 1. Post-copy after pass 1, then the cut once enough went in post-copy.
    let mut switched = false;
    loop {
        let q = src.exec("query-migrate", json!({}))?;
        let status = status_of(&q);
        if !switched && status == "active" && ram_u64(&q, "dirty-sync-count").unwrap_or(0) >= 2 {
            src.exec("migrate-start-postcopy", json!({}))?;
            switched = true;
        }
        let pc = ram_u64(&q, "postcopy-bytes").unwrap_or(0);
        if status == "postcopy-active" && pc >= p.cut_after_postcopy_bytes {
            out.cut_at_postcopy_bytes = Some(pc);
            break;
        }
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            out.result = format!("{status} before the cut");
            out.src_final = q;
            return Ok(());
        }
        if started.t0.elapsed() > timeout {
            out.result = format!("not cut within {} s", p.timeout_s);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    dst.heartbeats()?;
    let cut_ns = realtime_ns();
    set_link(false)?;
    let cut = Instant::now();
    // 2. Both sides paused: by themselves, or by migrate-pause after the detect limit.
    let (mut src_paused, mut dst_paused) = (None::<Value>, None::<Value>);
    let mut paused_by: Vec<String> = Vec::new();
    let mut last_hb = Instant::now();
    while src_paused.is_none() || dst_paused.is_none() {
        for (vm, slot, at, side) in [
            (
                &mut *src,
                &mut src_paused,
                &mut out.src_paused_after_ms,
                "source",
            ),
            (
                &mut *dst,
                &mut dst_paused,
                &mut out.dst_paused_after_ms,
                "destination",
            ),
        ] {
            if slot.is_some() {
                continue;
            }
            let q = vm.exec("query-migrate", json!({}))?;
            match status_of(&q).as_str() {
                "postcopy-paused" => {
                    *at = Some(ms_since(cut));
                    *slot = Some(q);
                }
                "postcopy-active"
                    if cut.elapsed() > p.detect_limit
                        && !paused_by.iter().any(|s| s.starts_with(side)) =>
                {
                    vm.exec("migrate-pause", json!({}))?;
                    paused_by.push(format!("{side} at {:.1} s", cut.elapsed().as_secs_f64()));
                }
                "postcopy-active" => {}
                other => bail!("{side}: {other} after the cut: {q}"),
            }
        }
        if cut.elapsed() > p.detect_limit + timeout {
            out.result = "not paused in time".into();
            return Ok(());
        }
        if last_hb.elapsed() > Duration::from_millis(250) {
            dst.heartbeats()?;
            last_hb = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    out.how_paused = if paused_by.is_empty() {
        "detected by both".into()
    } else {
        format!("migrate-pause: {}", paused_by.join(", "))
    };
    let dq = dst_paused.unwrap_or_default();
    out.missing_pages = dq
        .get("x-tern-postcopy-missing-pages")
        .and_then(Value::as_u64);
    out.dst_paused = dq;
    out.src_paused = src_paused.unwrap_or_default();
    // 3. Restore the link; recover.
    set_link(true)?;
    out.outage_ms = Some(ms_since(cut));
    let uri = format!("tcp:{host}:{}", p.recover_port);
    let rec = Instant::now();
    dst.exec("migrate-recover", json!({ "uri": uri }))?;
    src.exec("migrate", json!({ "uri": uri, "resume": true }))?;
    let active_ns = loop {
        let q = src.exec("query-migrate", json!({}))?;
        match status_of(&q).as_str() {
            "postcopy-active" | "completed" => break realtime_ns(),
            "failed" => bail!("source failed during the recovery: {q}"),
            _ => {}
        }
        if rec.elapsed() > timeout {
            out.result = format!("not recovered within {} s", p.timeout_s);
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    out.handshake_ms = Some(ms_since(rec));
    out.cut_to_active_ms = Some(ms_since(cut));
    let beats: Vec<u64> = dst
        .heartbeats()?
        .iter()
        .map(|h| h.1)
        .filter(|&ns| ns >= cut_ns && ns <= active_ns)
        .collect();
    let mut window = vec![cut_ns];
    window.extend(beats);
    if let Some((stalled, w)) = stalled_ms(&window, active_ns) {
        out.outage_stalled_ms = Some(stalled);
        out.outage_window_ms = Some(w);
    }
    window.push(active_ns);
    out.outage_max_gap_ms = window
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .map(|g| g as f64 / 1e6);
    // 4. To completion.
    let q = loop {
        let q = src.exec("query-migrate", json!({}))?;
        let status = status_of(&q);
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            break q;
        }
        if rec.elapsed() > timeout * 2 {
            out.result = format!("not completed {} s after the recovery", 2 * p.timeout_s);
            out.src_final = q;
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    out.result = status_of(&q);
    out.total_ms = q.get("total-time").and_then(Value::as_f64);
    out.postcopy_requests = ram_u64(&q, "postcopy-requests");
    out.transferred = ram_u64(&q, "transferred");
    if let Some(r) = q.get("x-tern-postcopy-recovery") {
        out.resent_pages = r.get("resent-pages").and_then(Value::as_u64);
        out.vmm_recovery_us = r
            .get("list")
            .and_then(Value::as_array)
            .and_then(|l| l.last())
            .and_then(|x| x.get("total-us"))
            .and_then(Value::as_u64);
    }
    if let Some(e) = q.get("error-desc").and_then(Value::as_str) {
        out.error = Some(e.to_string());
    }
    out.src_final = q;
    if out.result != "completed" {
        return Ok(());
    }
    let dq = wait_dst_completed(dst)?;
    out.blocktime_ms = dq.get("postcopy-blocktime").and_then(Value::as_u64);
    out.vcpu_blocktime_ms = dq
        .get("postcopy-vcpu-blocktime")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    out.dst_final = dq;
    out.pattern = check_pattern(bins, dst, p.memory_mib, dump)?;
    Ok(())
}

/// Stops the destination, saves its RAM and runs `tern check-pattern` on it.
fn check_pattern(
    bins: &Bins,
    dst: &mut Vm,
    memory_mib: u64,
    dump: &Path,
) -> anyhow::Result<String> {
    let Some(tern) = &bins.tern else {
        return Ok("not checked (no tern binary for check-pattern)".into());
    };
    dst.exec("stop", json!({}))?;
    dst.exec(
        "pmemsave",
        json!({ "val": 0, "size": memory_mib << 20, "filename": dump.display().to_string() }),
    )?;
    let o = Command::new(tern)
        .arg("check-pattern")
        .arg(dump)
        .output()
        .context("running tern check-pattern")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let first = text
        .lines()
        .last()
        .unwrap_or("")
        .chars()
        .take(120)
        .collect::<String>();
    Ok(if o.status.success() && text.contains("OK") {
        "OK".into()
    } else {
        format!("FAILED: {first}")
    })
}
