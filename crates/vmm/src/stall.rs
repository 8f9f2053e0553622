//! The vCPU stall meter: the longest time a vCPU that wanted to run guest code was kept out of
//! `KVM_RUN`, as the vCPU threads themselves see it (no guest cooperation needed).
//!
//! A vCPU *wants to run* from the moment `KVM_RUN` returns (the exit is handled on the way back
//! in) and from the end of an idle-wait the guest asked for (the requested duration, not the
//! moment the thread is scheduled again). The stall is the time from then to the next entry into
//! `KVM_RUN`: exit handling, lock waits, and waiting for a host CPU after an idle-wait (the
//! scheduler's wake-up latency when the migration threads occupy the cores). Time parked by a
//! VMM pause is not a stall here (it is the migration's `downtime`, which the engine measures).
//! What this cannot see: time the host takes the CPU away while the thread is inside `KVM_RUN`
//! (the guest's heartbeat gaps show that; see docs/machine.md "Guest stalls").

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::devices::control::realtime_ns;

/// Stalls at least this long are logged (debug) with their wall-clock time, for attribution.
pub const LOG_STALL: Duration = Duration::from_millis(3);

/// The largest stall since the last reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MaxStall {
    /// Length in ns (0: none measured).
    pub ns: u64,
    /// `CLOCK_REALTIME` (ns) when it began.
    pub start_realtime_ns: u64,
    /// Which vCPU.
    pub vcpu: u32,
}

/// Shared by the vCPU threads; lock-free (one compare per `KVM_RUN` entry).
#[derive(Debug, Default)]
pub struct StallMeter {
    max_ns: AtomicU64,
    start_realtime_ns: AtomicU64,
    vcpu: AtomicU64,
}

impl StallMeter {
    /// Records a stall of vCPU `vcpu` that began at `due` and ended now.
    pub fn record(&self, vcpu: u32, due: Instant, now: Instant) {
        let ns = now.saturating_duration_since(due).as_nanos() as u64;
        if ns >= LOG_STALL.as_nanos() as u64 {
            tracing::debug!(vcpu, stall_us = ns / 1000, "vCPU kept out of KVM_RUN");
        }
        if ns <= self.max_ns.load(Ordering::Relaxed) {
            return;
        }
        // A race between two vCPUs can keep the smaller of two near-simultaneous maxima's
        // start time: harmless for a statistic.
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
        if self.max_ns.load(Ordering::Relaxed) == ns {
            let start = realtime_ns().saturating_sub(ns);
            self.start_realtime_ns.store(start, Ordering::Relaxed);
            self.vcpu.store(u64::from(vcpu), Ordering::Relaxed);
        }
    }

    /// The largest stall since the last reset.
    pub fn max(&self) -> MaxStall {
        MaxStall {
            ns: self.max_ns.load(Ordering::Relaxed),
            start_realtime_ns: self.start_realtime_ns.load(Ordering::Relaxed),
            vcpu: self.vcpu.load(Ordering::Relaxed) as u32,
        }
    }

    /// Starts a new measurement window (e.g. at the start of a migration).
    pub fn reset(&self) {
        self.max_ns.store(0, Ordering::Relaxed);
        self.start_realtime_ns.store(0, Ordering::Relaxed);
        self.vcpu.store(0, Ordering::Relaxed);
    }
}

/// The scheduler slice asked for vCPU threads (`sched_setattr`'s `sched_runtime` for a
/// `SCHED_OTHER` thread, Linux 6.12+ EEVDF): shorter than the default (3 ms here), so a vCPU
/// that wakes from an idle-wait preempts a busy thread (e.g. the migration sender) instead of
/// waiting for its slice to end. It does not change the vCPU's CPU share.
pub const VCPU_SLICE: Duration = Duration::from_micros(500);

/// The kernel's `struct sched_attr` (first version, 56 bytes, plus the utilisation clamps).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
    sched_util_min: u32,
    sched_util_max: u32,
}

/// Called by each vCPU thread when it starts: asks for [`VCPU_SLICE`], keeping the thread's
/// nice value. A kernel without per-task slices ignores or refuses it (logged at debug).
pub fn prefer_wakeup(vcpu: u32) {
    let slice = match std::env::var("TERN_X_VCPU_SLICE_US").map(|v| v.parse::<u64>()) {
        Ok(Ok(0)) => return,
        Ok(Ok(us)) => Duration::from_micros(us),
        _ => VCPU_SLICE,
    };
    // SAFETY: getpriority on the calling thread only reads.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_nice: nice,
        sched_runtime: slice.as_nanos() as u64,
        ..Default::default()
    };
    // SAFETY: sched_setattr(2) on the calling thread (pid 0) with a valid, sized attribute
    // block that lives across the call; flags 0.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if r != 0 {
        tracing::debug!(
            vcpu,
            "sched_setattr(slice {slice:?}): {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_largest_and_resets() {
        let m = StallMeter::default();
        let t = Instant::now();
        m.record(0, t, t + Duration::from_micros(50));
        m.record(1, t, t + Duration::from_millis(2));
        m.record(0, t, t + Duration::from_millis(1));
        let max = m.max();
        assert_eq!((max.ns, max.vcpu), (2_000_000, 1));
        assert!(max.start_realtime_ns > 0);
        m.reset();
        assert_eq!(m.max(), MaxStall::default());
    }
}
