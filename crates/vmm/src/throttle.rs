//! vCPU throttling by time slicing (QEMU's `system/cpu-throttle.c`, with shorter pieces), what
//! `auto-converge` applies while a migration runs.
//!
//! At `pct` percent the guest runs `100 - pct` % of the time, as in QEMU, but never sleeps
//! longer than [`MAX_SLEEP`] in one piece ([`slice`], decision 243): QEMU runs a 10 ms
//! [`TIMESLICE`] and then sleeps `pct / (1 - pct) × TIMESLICE`, 990 ms at 99 %, which the guest
//! feels as a 990 ms stall; Tern keeps QEMU's slices while their sleep is at most [`MAX_SLEEP`]
//! and above that shortens run and sleep by the same factor (99 %: 0.5 ms run, 50 ms asleep).
//! The `vcpu-throttle` ticker thread kicks every vCPU out of `KVM_RUN` once per period of
//! `run + sleep` ([`crate::runctl::RunControl::throttle_kick`]); each kicked vCPU thread then
//! sleeps `sleep` outside `KVM_RUN` before it enters the guest again. The sleep is a wait on the
//! run control's condvar: a pause, a stop or a shutdown ends it at once, so a throttle never
//! delays a switchover or a `stop`. Throttle sleeps are not vCPU stalls (`stall.rs`): they are
//! asked for. `pct == 0` turns the ticker idle (it waits for the next non-zero value).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::vcpu::Shared;

/// QEMU's `CPU_THROTTLE_TIMESLICE_NS`: the guest's run time per throttle period while the
/// sleep that goes with it is at most [`MAX_SLEEP`].
pub const TIMESLICE: Duration = Duration::from_millis(10);
/// Tern's bound on one throttle sleep (decision 243; QEMU has none: 990 ms at 99 %).
pub const MAX_SLEEP: Duration = Duration::from_millis(50);
/// QEMU's `CPU_THROTTLE_PCT_MAX`; larger values are clamped.
pub const MAX_PCT: u8 = 99;

/// One throttle period: the guest runs `run`, then its vCPU sleeps `sleep`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    pub run: Duration,
    pub sleep: Duration,
}

/// The period at `pct` percent: `sleep / (run + sleep) = pct`, QEMU's 10 ms run slice while its
/// sleep is at most [`MAX_SLEEP`], else a [`MAX_SLEEP`] sleep and the run slice that keeps the
/// ratio. `pct == 0`: no sleep.
pub fn slice(pct: u8) -> Slice {
    if pct == 0 {
        return Slice {
            run: TIMESLICE,
            sleep: Duration::ZERO,
        };
    }
    let p = f64::from(pct.min(MAX_PCT)) / 100.0;
    let qemu_sleep = TIMESLICE.mul_f64(p / (1.0 - p));
    if qemu_sleep <= MAX_SLEEP {
        return Slice {
            run: TIMESLICE,
            sleep: qemu_sleep,
        };
    }
    Slice {
        run: MAX_SLEEP.mul_f64((1.0 - p) / p),
        sleep: MAX_SLEEP,
    }
}

/// How long a vCPU sleeps per period at `pct` percent (0 when not throttled).
pub fn sleep_per_slice(pct: u8) -> Duration {
    slice(pct).sleep
}

/// The ticker's period at `pct` percent: one run slice plus one sleep.
pub fn period(pct: u8) -> Duration {
    let s = slice(pct);
    s.run + s.sleep
}

/// What the throttle did since the machine started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThrottleStats {
    /// The throttle in force, percent.
    pub pct: u8,
    /// Throttle sleeps started by the vCPU threads.
    pub sleeps: u64,
    /// Sleeps ended early by a pause, stop or shutdown.
    pub interrupted: u64,
}

#[derive(Debug, Default)]
struct Ticker {
    quit: bool,
    thread: Option<JoinHandle<()>>,
    /// When the last kick was sent: a period's sleep counts from there, so the time a vCPU
    /// takes to leave `KVM_RUN` comes out of its sleep, not out of the guest's run slice.
    kicked_at: Option<Instant>,
}

/// The throttle state shared by the machine, the ticker and the vCPU threads.
#[derive(Debug, Default)]
pub struct CpuThrottle {
    pct: AtomicU8,
    sleeps: AtomicU64,
    interrupted: AtomicU64,
    ticker: Mutex<Ticker>,
    cv: Condvar,
}

impl CpuThrottle {
    fn lock(&self) -> MutexGuard<'_, Ticker> {
        self.ticker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The throttle in force, percent.
    pub fn percentage(&self) -> u8 {
        self.pct.load(Ordering::Acquire)
    }

    /// Counters.
    pub fn stats(&self) -> ThrottleStats {
        ThrottleStats {
            pct: self.percentage(),
            sleeps: self.sleeps.load(Ordering::Relaxed),
            interrupted: self.interrupted.load(Ordering::Relaxed),
        }
    }

    /// Sets the throttle (clamped to [`MAX_PCT`]); starts the ticker thread on first use.
    /// Once this returns with 0, no vCPU starts another throttle sleep.
    pub fn set(&self, shared: &Arc<Shared>, pct: u8) -> Result<()> {
        let pct = pct.min(MAX_PCT);
        let mut t = self.lock();
        if t.quit {
            return Err(Error::State("the machine is shut down".into()));
        }
        self.pct.store(pct, Ordering::Release);
        if pct > 0 && t.thread.is_none() {
            let s = shared.clone();
            let h = std::thread::Builder::new()
                .name("vcpu-throttle".into())
                .spawn(move || ticker(&s))
                .map_err(|e| Error::io("spawning vcpu-throttle", e))?;
            t.thread = Some(h);
        }
        drop(t);
        self.cv.notify_all();
        Ok(())
    }

    /// Stops and joins the ticker (machine shutdown). Idempotent.
    pub fn shutdown(&self) {
        let mut t = self.lock();
        t.quit = true;
        self.pct.store(0, Ordering::Release);
        let h = t.thread.take();
        drop(t);
        self.cv.notify_all();
        if let Some(h) = h {
            let _ = h.join();
        }
    }

    /// Called by a kicked vCPU thread outside `KVM_RUN`: sleeps this period's share unless a
    /// pause, stop or shutdown comes first (`wait` returns true when it was cut short).
    pub fn sleep(&self, wait: impl FnOnce(Duration) -> bool) {
        // Under the lock `set` holds: once `set(0)` returned, no sleep starts (or is counted).
        let t = self.lock();
        let d = sleep_per_slice(self.percentage());
        if d.is_zero() {
            return;
        }
        self.sleeps.fetch_add(1, Ordering::Relaxed);
        let d = t.kicked_at.map_or(d, |k| d.saturating_sub(k.elapsed()));
        drop(t);
        if !d.is_zero() && wait(d) {
            self.interrupted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The `vcpu-throttle` thread: one kick of every vCPU per period while throttled.
fn ticker(shared: &Shared) {
    let th = &shared.throttle;
    let mut t = th.lock();
    loop {
        if t.quit {
            return;
        }
        let pct = th.percentage();
        if pct == 0 {
            t = th.cv.wait(t).unwrap_or_else(|p| p.into_inner());
            continue;
        }
        let (g, r) = th
            .cv
            .wait_timeout(t, period(pct))
            .unwrap_or_else(|p| p.into_inner());
        t = g;
        // Woken early: a new percentage or the shutdown; start a fresh period.
        if t.quit || !r.timed_out() {
            continue;
        }
        if th.percentage() > 0 {
            t.kicked_at = Some(Instant::now());
            drop(t);
            shared.ctl.throttle_kick();
            t = th.lock();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemus_slices_while_the_sleep_is_short() {
        assert_eq!(sleep_per_slice(0), Duration::ZERO);
        assert_eq!(sleep_per_slice(50), Duration::from_millis(10));
        assert_eq!(period(50), Duration::from_millis(20));
        // 83 %: 48.8 ms asleep, still QEMU's 10 ms slice.
        assert_eq!(slice(83).run, TIMESLICE);
        assert!(slice(83).sleep <= MAX_SLEEP);
    }

    #[test]
    fn longer_sleeps_are_cut_to_the_bound_keeping_the_ratio() {
        for pct in [84u8, 90, 95, 99] {
            let s = slice(pct);
            assert_eq!(s.sleep, MAX_SLEEP, "{pct}");
            let ratio = s.sleep.as_secs_f64() / (s.run + s.sleep).as_secs_f64();
            assert!(
                (ratio - f64::from(pct) / 100.0).abs() < 1e-6,
                "{pct}: {ratio}"
            );
        }
        // 99 %: 50 ms asleep, 0.5 ms running (QEMU: 990 ms and 10 ms).
        let r = slice(99).run.as_secs_f64();
        assert!((r - 0.05 / 99.0).abs() < 1e-9, "{r}");
        // Clamped like QEMU's cpu_throttle_set.
        assert_eq!(slice(100), slice(99));
        assert_eq!(slice(255), slice(99));
    }
}
