//! One live migration between two running VMMs, driven with QEMU's own QMP commands (the same
//! code for Tern and QEMU), plus the measurements taken around it.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use crate::facts::realtime_ns;
use crate::vm::{Kind, Vm};

/// How long after the destination's first heartbeat the migration window extends.
pub const TAIL: Duration = Duration::from_millis(500);

/// Migration parameters, identical on both VMMs.
#[derive(Debug, Clone, Serialize)]
pub struct MigParams {
    /// Capabilities turned on on both sides (`events` always).
    pub caps: Vec<String>,
    pub downtime_limit_ms: u64,
    /// Bytes per second.
    pub max_bandwidth: u64,
    pub timeout_s: u64,
    /// `multifd` rows: `multifd-channels` on both sides (the caller puts `multifd` in `caps`).
    pub multifd_channels: Option<u8>,
}

/// What one migration measured. Failures are outcomes too (`result` + `error`).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Outcome {
    /// `completed`, `failed`, `cancelled`, `not converged` or `error`.
    pub result: String,
    pub error: Option<String>,
    pub total_ms: Option<f64>,
    pub downtime_ms: Option<f64>,
    pub setup_ms: Option<f64>,
    pub transferred: Option<u64>,
    pub dirty_sync_count: Option<u64>,
    /// Host-observed heartbeat gap: destination's first beat after the source's last.
    pub hb_gap_ms: Option<f64>,
    /// Largest interval between source heartbeats while migrating (before the switchover).
    pub src_max_hb_interval_ms: Option<f64>,
    /// Largest gap between consecutive guest heartbeats anywhere in the migration window
    /// (`migrate` .. the destination's first beat + [`TAIL`]), source and destination beats
    /// merged on the host clock: what the guest felt, switchover included.
    pub window_max_gap_ms: Option<f64>,
    /// When that gap started, in ms after `migrate`.
    pub window_max_gap_at_ms: Option<f64>,
    /// `pre-copy` (both beats on the source), `switchover` (source's last → destination's
    /// first) or `destination` (both on the destination, within the tail).
    pub window_max_gap_phase: Option<String>,
    /// Tern's own `x-tern-max-guest-stall` (ms) from the source's final `query-migrate`.
    pub vmm_max_stall_ms: Option<f64>,
    /// `auto-converge`: the largest `cpu-throttle-percentage` seen while active.
    pub max_cpu_throttle: Option<u64>,
    /// CPU time (user + system, `/proc/PID/stat`) of the source and the destination process
    /// from just before `migrate` to the final status; includes the guest's vCPU time.
    pub src_cpu_s: Option<f64>,
    pub dst_cpu_s: Option<f64>,
    /// Host wall time from `migrate` to the final status.
    pub wall_ms: f64,
    /// One sample per new `dirty-sync-count` / status (as guestperf's progress history).
    pub progress: Vec<Value>,
    pub src_final: Value,
    pub dst_final: Value,
}

pub fn set_caps(vm: &mut Vm, caps: &[String]) -> anyhow::Result<()> {
    let list: Vec<Value> = caps
        .iter()
        .map(|c| json!({ "capability": c, "state": true }))
        .collect();
    vm.exec("migrate-set-capabilities", json!({ "capabilities": list }))?;
    Ok(())
}

fn f64_of(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn ram_u64(v: &Value, key: &str) -> Option<u64> {
    v.get("ram")
        .and_then(|r| r.get(key))
        .and_then(Value::as_u64)
}

fn status_of(v: &Value) -> String {
    v.get("status")
        .and_then(Value::as_str)
        .unwrap_or("none")
        .to_string()
}

/// The largest gap between consecutive beats of `src` (host ns, ascending, all after
/// `migrate`) followed by `dst` (ascending): `(length ns, start ns, phase)`.
pub fn window_max_gap(src: &[u64], dst: &[u64]) -> Option<(u64, u64, &'static str)> {
    let mut best: Option<(u64, u64, &'static str)> = None;
    let mut consider = |a: u64, b: u64, phase: &'static str| {
        let len = b.saturating_sub(a);
        if best.is_none_or(|(l, _, _)| len > l) {
            best = Some((len, a, phase));
        }
    };
    for w in src.windows(2) {
        consider(w[0], w[1], "pre-copy");
    }
    if let (Some(&a), Some(&b)) = (src.last(), dst.first()) {
        consider(a, b, "switchover");
    }
    for w in dst.windows(2) {
        consider(w[0], w[1], "destination");
    }
    best
}

/// Starts `migrate-incoming` on `dst` at `tcp:host:0` and returns the bound port.
pub fn incoming_tcp(dst: &mut Vm, host: &str) -> anyhow::Result<u16> {
    dst.exec(
        "migrate-incoming",
        json!({ "uri": format!("tcp:{host}:0") }),
    )?;
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let q = dst.exec("query-migrate", json!({}))?;
        let port = q
            .get("socket-address")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(|s| s.get("port"))
            .and_then(|p| {
                p.as_u64()
                    .or_else(|| p.as_str().and_then(|s| s.parse().ok()))
            });
        if let Some(p) = port.and_then(|p| u16::try_from(p).ok()) {
            return Ok(p);
        }
        if Instant::now() > end {
            bail!("{}: no socket-address in query-migrate: {q}", dst.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs one live migration `src` → `dst` over TCP to `host` (the destination's address).
/// Never returns `Err`: errors become `result = "error"` rows.
/// A migration just started by [`start_tcp`]: where the source's heartbeats stood and when.
pub struct Started {
    /// Source heartbeats recorded before `migrate`.
    pub hb_before: usize,
    /// `CLOCK_REALTIME` (ns) just before `migrate`.
    pub start_ns: u64,
    /// Just before `migrate`.
    pub t0: Instant,
}

/// The same start for every suite: capabilities on both sides, `downtime-limit` and
/// `max-bandwidth` on the source, the destination listening on `host`, then `migrate`.
pub fn start_tcp(
    src: &mut Vm,
    dst: &mut Vm,
    host: &str,
    caps: &[String],
    downtime_limit_ms: u64,
    max_bandwidth: u64,
) -> anyhow::Result<Started> {
    set_caps(dst, caps)?;
    set_caps(src, caps)?;
    src.exec(
        "migrate-set-parameters",
        json!({ "downtime-limit": downtime_limit_ms, "max-bandwidth": max_bandwidth }),
    )?;
    let port = incoming_tcp(dst, host)?;
    let hb_before = src.heartbeats()?.len();
    let start_ns = realtime_ns();
    let t0 = Instant::now();
    src.exec("migrate", json!({ "uri": format!("tcp:{host}:{port}") }))?;
    Ok(Started {
        hb_before,
        start_ns,
        t0,
    })
}

pub fn live_migrate(src: &mut Vm, dst: &mut Vm, host: &str, p: &MigParams) -> Outcome {
    let mut out = Outcome::default();
    let t0 = Instant::now();
    if let Err(e) = run(src, dst, host, p, &mut out) {
        out.error = Some(format!("{e:#}"));
        if out.result.is_empty() || out.result == "completed" {
            out.result = if out.result.is_empty() {
                "error".into()
            } else {
                out.result.clone()
            };
        }
    }
    if out.wall_ms == 0.0 {
        out.wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    }
    out
}

fn run(
    src: &mut Vm,
    dst: &mut Vm,
    host: &str,
    p: &MigParams,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    if let Some(n) = p.multifd_channels {
        for vm in [&mut *src, &mut *dst] {
            vm.exec("migrate-set-parameters", json!({ "multifd-channels": n }))?;
        }
    }
    let Started {
        hb_before,
        start_ns,
        t0,
    } = start_tcp(
        src,
        dst,
        host,
        &p.caps,
        p.downtime_limit_ms,
        p.max_bandwidth,
    )?;
    let timeout = Duration::from_secs(p.timeout_s);
    let (mut last_sync, mut last_status) = (u64::MAX, String::new());
    let mut last_hb_poll = Instant::now();
    let mut cancelled_at: Option<Instant> = None;
    let mut last_active = Value::Null;
    let q = loop {
        let q = src.exec("query-migrate", json!({}))?;
        let status = status_of(&q);
        if status == "active" {
            last_active = q.clone();
            if let Some(p) = q.get("cpu-throttle-percentage").and_then(Value::as_u64) {
                out.max_cpu_throttle = Some(out.max_cpu_throttle.map_or(p, |m| m.max(p)));
            }
        }
        let sync = ram_u64(&q, "dirty-sync-count").unwrap_or(0);
        if sync != last_sync || status != last_status {
            out.progress.push(json!({
                "t-ms": t0.elapsed().as_millis() as u64,
                "status": status,
                "transferred": ram_u64(&q, "transferred"),
                "remaining": ram_u64(&q, "remaining"),
                "dirty-sync-count": sync,
                "mbps": q.get("ram").and_then(|r| r.get("mbps")).cloned(),
                "dirty-pages-rate": ram_u64(&q, "dirty-pages-rate"),
                "expected-downtime": q.get("expected-downtime").cloned(),
                "cpu-throttle-percentage": q.get("cpu-throttle-percentage").cloned(),
            }));
            last_sync = sync;
            last_status = status.clone();
        }
        match status.as_str() {
            "completed" | "failed" | "cancelled" | "x-tern-unconfirmed" => break q,
            _ => {}
        }
        match cancelled_at {
            None if t0.elapsed() > timeout => {
                tracing::info!(
                    "{}: not converged after {:?}, migrate_cancel",
                    src.name,
                    timeout
                );
                src.exec("migrate_cancel", json!({}))?;
                cancelled_at = Some(Instant::now());
            }
            Some(c) if c.elapsed() > Duration::from_secs(20) => {
                bail!("{}: still {status} 20 s after migrate_cancel", src.name);
            }
            _ => {}
        }
        if last_hb_poll.elapsed() > Duration::from_millis(250) {
            src.heartbeats()?;
            last_hb_poll = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    out.wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    let status = status_of(&q);
    out.result = match (status.as_str(), cancelled_at) {
        ("completed", _) => "completed".into(),
        (_, Some(_)) => "not converged".into(),
        (s, None) => s.to_string(),
    };
    out.total_ms = f64_of(&q, "total-time");
    out.downtime_ms = f64_of(&q, "downtime");
    out.setup_ms = f64_of(&q, "setup-time");
    out.transferred = ram_u64(&q, "transferred").or_else(|| ram_u64(&last_active, "transferred"));
    out.dirty_sync_count =
        ram_u64(&q, "dirty-sync-count").or_else(|| ram_u64(&last_active, "dirty-sync-count"));
    if let Some(e) = q.get("error-desc").and_then(Value::as_str) {
        out.error = Some(e.to_string());
    }
    out.src_final = q;
    if out.result != "completed" {
        return Ok(());
    }
    // Heartbeat gap. QEMU's serial bytes may still be in flight to the reader thread.
    std::thread::sleep(Duration::from_millis(100));
    let src_hb = src.heartbeats()?.to_vec();
    let during: Vec<u64> = src_hb
        .get(hb_before..)
        .unwrap_or_default()
        .iter()
        .map(|h| h.1)
        .filter(|&ns| ns >= start_ns)
        .collect();
    out.src_max_hb_interval_ms = during
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]) as f64 / 1e6)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    let last = *src_hb.last().context("no heartbeat from the source")?;
    dst.wait_status("running", Duration::from_secs(20))?;
    let end = Instant::now() + Duration::from_secs(10);
    let first = loop {
        let kind = dst.kind;
        let found = dst
            .heartbeats()?
            .iter()
            .find(|h| kind == Kind::Qemu || h.0 > last.0)
            .copied();
        if let Some(f) = found {
            break f;
        }
        if Instant::now() > end {
            bail!("no heartbeat from the destination 10 s after completion");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    out.hb_gap_ms = Some(first.1 as f64 / 1e6 - last.1 as f64 / 1e6);
    let tail_end = first.1 + TAIL.as_nanos() as u64;
    // QEMU's serial bytes reach the harness a little later than they were sent.
    while realtime_ns() < tail_end + 100_000_000 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let kind = dst.kind;
    let dst_beats: Vec<u64> = dst
        .heartbeats()?
        .iter()
        .filter(|h| kind == Kind::Qemu || h.0 > last.0)
        .map(|h| h.1)
        .filter(|&ns| ns <= tail_end)
        .collect();
    let gap = window_max_gap(&during, &dst_beats);
    if let Some((len, at, phase)) = gap {
        out.window_max_gap_ms = Some(len as f64 / 1e6);
        out.window_max_gap_at_ms = Some(at.saturating_sub(start_ns) as f64 / 1e6);
        out.window_max_gap_phase = Some(phase.to_string());
    }
    out.vmm_max_stall_ms = out
        .src_final
        .get("x-tern-max-guest-stall")
        .and_then(Value::as_f64);
    out.dst_final = dst.exec("query-migrate", json!({})).unwrap_or(Value::Null);
    Ok(())
}
