//! One post-copy-capable migration between two running VMMs (the same QMP for Tern and QEMU)
//! and what the `postcopy` suite measures around it: the heartbeat gap at the switch and the
//! largest one after it (host clock), the guest's own stalled time after the switch, the
//! destination's blocktime and page-request latency,
//! bytes per phase.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use crate::facts::realtime_ns;
use crate::migrate::{start_tcp, Started, TAIL};
use crate::vm::{Kind, Vm};

/// How the migration gets to post-copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Switch {
    /// `migrate-start-postcopy` once the first pass ended (`dirty-sync-count` ≥ 2), as
    /// libvirt's `--postcopy-after-precopy`.
    AfterFirstPass,
    /// Nobody issues it: Tern's `x-tern-postcopy-auto` decides.
    Auto,
    /// Pre-copy only (`postcopy-ram` off): the baseline that may not converge.
    PrecopyOnly,
}

/// Parameters of one run (same on both VMMs).
#[derive(Debug, Clone, Serialize)]
pub struct PcParams {
    pub caps: Vec<String>,
    pub downtime_limit_ms: u64,
    pub max_bandwidth: u64,
    pub timeout_s: u64,
    pub switch: Switch,
}

/// What one run measured. Failures are outcomes too.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PcOutcome {
    /// `completed`, `failed`, `did not complete in N s`, `error`.
    pub result: String,
    pub error: Option<String>,
    /// The source went through `postcopy-active`.
    pub switched: bool,
    /// Host ms from `migrate` to `migrate-start-postcopy` (after-first-pass rows).
    pub start_postcopy_at_ms: Option<f64>,
    /// Host ms from `migrate` to the first `postcopy-active` seen on the source.
    pub postcopy_seen_at_ms: Option<f64>,
    pub total_ms: Option<f64>,
    pub downtime_ms: Option<f64>,
    pub transferred: Option<u64>,
    pub precopy_bytes: Option<u64>,
    pub downtime_bytes: Option<u64>,
    pub postcopy_bytes: Option<u64>,
    pub postcopy_requests: Option<u64>,
    pub dirty_sync_count: Option<u64>,
    /// Source's last heartbeat → destination's first (host clock): the gap at the switch.
    pub switch_gap_ms: Option<f64>,
    /// Largest interval between destination heartbeats from its first until the migration
    /// completed + [`TAIL`]: the guest's worst stall in post-copy.
    pub max_gap_after_ms: Option<f64>,
    /// When that gap began, ms after the destination's first beat.
    pub max_gap_after_at_ms: Option<f64>,
    /// The guest's own view of how long it was blocked after the switch: the sum, over the
    /// intervals between destination heartbeats from its first until the source said
    /// `completed`, of each interval's part beyond [`STALL_SLACK`] (the same yardstick for
    /// both VMMs, independent of how each counts `postcopy-blocktime`).
    pub guest_stalled_ms: Option<f64>,
    /// The window that sum covers: the destination's first beat → the source's `completed`.
    pub guest_window_ms: Option<f64>,
    /// Destination `postcopy-blocktime` (ms, all vCPUs at once).
    pub blocktime_ms: Option<u64>,
    /// Destination `postcopy-vcpu-blocktime` (ms).
    pub vcpu_blocktime_ms: Vec<u64>,
    /// `postcopy-latency` (QEMU 10.1's average), µs.
    pub latency_avg_us: Option<f64>,
    /// Tern's `x-tern-postcopy-latency`.
    pub latency_median_us: Option<u64>,
    pub latency_p99_us: Option<u64>,
    pub latency_max_us: Option<u64>,
    pub latency_pages: Option<u64>,
    /// QEMU's request latency from its destination's trace (rows with `trace`).
    pub qemu_trace_latency: Option<crate::qemu_trace::Latency>,
    /// Tern: the last `x-tern-postcopy-auto` seen on the source.
    pub auto_decision: Option<Value>,
    pub wall_ms: f64,
    pub progress: Vec<Value>,
    pub src_final: Value,
    pub dst_final: Value,
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

/// Part of a heartbeat interval that counts as running (the guest beats every 1 ms; QEMU's
/// serial bytes may arrive in small bursts): only the excess over this is a stall.
pub const STALL_SLACK_NS: u64 = 2_000_000;

/// Σ over consecutive beats in `beats` (host ns, ascending) up to `end_ns` of the interval's
/// part beyond [`STALL_SLACK_NS`], and the window first beat → `end_ns`; ms.
pub fn stalled_ms(beats: &[u64], end_ns: u64) -> Option<(f64, f64)> {
    let first = *beats.first()?;
    let mut inside: Vec<u64> = beats.iter().copied().filter(|&b| b <= end_ns).collect();
    inside.push(end_ns);
    let stalled: u64 = inside
        .windows(2)
        .map(|w| w[1].saturating_sub(w[0]).saturating_sub(STALL_SLACK_NS))
        .sum();
    Some((
        stalled as f64 / 1e6,
        end_ns.saturating_sub(first) as f64 / 1e6,
    ))
}

/// Runs one migration `src` → `dst` over TCP to `host`. Never returns `Err`: errors become
/// `result = "error"`.
pub fn run(src: &mut Vm, dst: &mut Vm, host: &str, p: &PcParams) -> PcOutcome {
    let mut out = PcOutcome::default();
    let t0 = Instant::now();
    if let Err(e) = drive(src, dst, host, p, &mut out) {
        out.error = Some(format!("{e:#}"));
        if out.result.is_empty() || out.result == "completed" {
            out.result = "error".into();
        }
    }
    if out.wall_ms == 0.0 {
        out.wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    }
    out
}

fn drive(
    src: &mut Vm,
    dst: &mut Vm,
    host: &str,
    p: &PcParams,
    out: &mut PcOutcome,
) -> anyhow::Result<()> {
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
    let mut last_live = Value::Null;
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
    let q = loop {
        let q = src.exec("query-migrate", json!({}))?;
        let status = status_of(&q);
        if matches!(status.as_str(), "active" | "postcopy-active" | "completed") {
            last_live = q.clone();
            if let Some(a) = q.get("x-tern-postcopy-auto") {
                out.auto_decision = Some(a.clone());
            }
        }
        let sync = ram_u64(&q, "dirty-sync-count").unwrap_or(0);
        if status == "postcopy-active" && out.postcopy_seen_at_ms.is_none() {
            out.switched = true;
            out.postcopy_seen_at_ms = Some(ms(t0));
        }
        if sync != last_sync || status != last_status {
            out.progress.push(json!({
                "t-ms": t0.elapsed().as_millis() as u64,
                "status": status,
                "transferred": ram_u64(&q, "transferred"),
                "remaining": ram_u64(&q, "remaining"),
                "dirty-sync-count": sync,
                "postcopy-requests": ram_u64(&q, "postcopy-requests"),
                "x-tern-postcopy-auto": q.get("x-tern-postcopy-auto").cloned(),
            }));
            last_sync = sync;
            last_status = status.clone();
        }
        if p.switch == Switch::AfterFirstPass
            && out.start_postcopy_at_ms.is_none()
            && status == "active"
            && sync >= 2
        {
            src.exec("migrate-start-postcopy", json!({}))?;
            out.start_postcopy_at_ms = Some(ms(t0));
        }
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            break q;
        }
        if t0.elapsed() > timeout {
            out.wall_ms = ms(t0);
            out.result = format!("did not complete in {} s", p.timeout_s);
            out.src_final = q.clone();
            fill_bytes(out, &q, &last_live);
            if status != "postcopy-active" {
                // Pre-copy can still be undone: the guest runs on at the source.
                src.exec("migrate_cancel", json!({}))?;
            }
            return Ok(());
        }
        if last_hb_poll.elapsed() > Duration::from_millis(250) {
            src.heartbeats()?;
            last_hb_poll = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let end_ns = realtime_ns();
    out.wall_ms = ms(t0);
    let status = status_of(&q);
    out.result = status.clone();
    out.total_ms = q.get("total-time").and_then(Value::as_f64);
    out.downtime_ms = q.get("downtime").and_then(Value::as_f64);
    fill_bytes(out, &q, &last_live);
    if let Some(e) = q.get("error-desc").and_then(Value::as_str) {
        out.error = Some(e.to_string());
    }
    out.src_final = q;
    if status != "completed" {
        return Ok(());
    }
    let dq = wait_dst_completed(dst)?;
    fill_destination(out, &dq);
    out.dst_final = dq;
    heartbeat_gaps(src, dst, hb_before, start_ns, end_ns, out)
}

fn fill_bytes(out: &mut PcOutcome, q: &Value, live: &Value) {
    let get = |k: &str| ram_u64(q, k).or_else(|| ram_u64(live, k));
    out.transferred = get("transferred");
    out.precopy_bytes = get("precopy-bytes");
    out.downtime_bytes = get("downtime-bytes");
    out.postcopy_bytes = get("postcopy-bytes");
    out.postcopy_requests = get("postcopy-requests");
    out.dirty_sync_count = get("dirty-sync-count");
}

/// The destination's own `completed` (its blocktime and latency are final then).
pub(crate) fn wait_dst_completed(dst: &mut Vm) -> anyhow::Result<Value> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let q = dst.exec("query-migrate", json!({}))?;
        match status_of(&q).as_str() {
            "completed" => return Ok(q),
            "failed" => bail!("{}: destination failed: {q}", dst.name),
            _ => {}
        }
        if Instant::now() > end {
            bail!("{}: not completed 30 s after the source: {q}", dst.name);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn fill_destination(out: &mut PcOutcome, dq: &Value) {
    out.blocktime_ms = dq.get("postcopy-blocktime").and_then(Value::as_u64);
    out.vcpu_blocktime_ms = dq
        .get("postcopy-vcpu-blocktime")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    out.latency_avg_us = dq
        .get("postcopy-latency")
        .and_then(Value::as_f64)
        .map(|ns| ns / 1e3);
    let l = dq.get("x-tern-postcopy-latency");
    let lat = |k: &str| l.and_then(|l| l.get(k)).and_then(Value::as_u64);
    out.latency_median_us = lat("median-us");
    out.latency_p99_us = lat("p99-us");
    out.latency_max_us = lat("max-us");
    out.latency_pages = lat("pages");
}

/// The gap at the switch (source's last beat → destination's first) and the largest interval
/// between destination beats from its first until `end_ns` + [`TAIL`].
fn heartbeat_gaps(
    src: &mut Vm,
    dst: &mut Vm,
    hb_before: usize,
    start_ns: u64,
    end_ns: u64,
    out: &mut PcOutcome,
) -> anyhow::Result<()> {
    // QEMU's serial bytes may still be in flight to the reader thread.
    let tail_end = end_ns + TAIL.as_nanos() as u64;
    while realtime_ns() < tail_end + 100_000_000 {
        std::thread::sleep(Duration::from_millis(20));
    }
    let src_hb = src.heartbeats()?.to_vec();
    let last = *src_hb
        .get(hb_before..)
        .unwrap_or_default()
        .iter()
        .rfind(|h| h.1 >= start_ns)
        .context("no heartbeat from the source during the migration")?;
    let kind = dst.kind;
    let beats: Vec<u64> = dst
        .heartbeats()?
        .iter()
        .filter(|h| kind == Kind::Qemu || h.0 > last.0)
        .map(|h| h.1)
        .filter(|&ns| ns <= tail_end)
        .collect();
    let first = *beats
        .first()
        .context("no heartbeat from the destination before the end of the window")?;
    out.switch_gap_ms = Some(first.saturating_sub(last.1) as f64 / 1e6);
    if let Some((stalled, window)) = stalled_ms(&beats, end_ns) {
        out.guest_stalled_ms = Some(stalled);
        out.guest_window_ms = Some(window);
    }
    let worst = beats
        .windows(2)
        .map(|w| (w[1].saturating_sub(w[0]), w[0]))
        .max_by_key(|(len, _)| *len);
    if let Some((len, at)) = worst {
        out.max_gap_after_ms = Some(len as f64 / 1e6);
        out.max_gap_after_at_ms = Some(at.saturating_sub(first) as f64 / 1e6);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::stalled_ms;

    const MS: u64 = 1_000_000;

    #[test]
    fn only_the_part_of_an_interval_beyond_the_slack_counts_as_stalled() {
        // Beats at 0, 1, 2 ms (running), then 12 ms (a 10 ms stall: 8 ms beyond the slack),
        // then the end at 20 ms with no beat since 12 (8 ms: 6 beyond the slack).
        let beats = [0, MS, 2 * MS, 12 * MS, 30 * MS];
        let (stalled, window) = stalled_ms(&beats, 20 * MS).unwrap();
        assert_eq!(window, 20.0);
        assert_eq!(stalled, 14.0, "beats after the end are ignored");
        assert_eq!(stalled_ms(&[], 20 * MS), None);
    }
}
