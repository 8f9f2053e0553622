//! Convergence policy as pure functions (QEMU `migration_update_counters` and
//! `migration_iteration_run`, reference §2.2). Nothing here reads a clock or touches a socket:
//! the sender passes times and byte counts in and acts on the answers, so every rule is unit
//! tested on its own.
//!
//! * Bandwidth is measured per [`BUFFER_DELAY`] window (bytes sent in the window / its length).
//! * `threshold = bandwidth × downtime-limit`, with `avail-switchover-bandwidth` replacing the
//!   measured bandwidth when it is set.
//! * Switch over when `pending <= threshold` and, with `switchover-ack` on and the VM running,
//!   the destination has acknowledged.
//! * `max-bandwidth` limits pre-copy in 100 ms windows; the stop-and-copy is never limited.
//! * Tern's refinement (bounded extra passes after QEMU's rule held): [`rule`].
//! * A prediction of a whole migration from a dirty rate and a bandwidth: [`predict`].
//! * When to switch to post-copy by itself (`x-tern-postcopy-auto`): [`postcopy_auto`].

use std::time::{Duration, Instant};

pub mod postcopy_auto;
pub mod predict;
pub mod rule;
pub use rule::{RuleDecision, RuleName, SwitchoverRule, SyncSample};

/// Length of one measurement / rate-limit window (QEMU `BUFFER_DELAY`).
pub const BUFFER_DELAY: Duration = Duration::from_millis(100);
pub use crate::params::{DEFAULT_DOWNTIME_LIMIT_MS, DEFAULT_MAX_BANDWIDTH};

/// One closed measurement window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowSample {
    /// Bytes sent during the window.
    pub bytes: u64,
    /// Length of the window.
    pub elapsed: Duration,
    /// Pages sent during the window.
    pub pages: u64,
}

impl WindowSample {
    /// Bandwidth in bytes per millisecond (QEMU's unit), `None` for an empty window.
    pub fn bytes_per_ms(&self) -> Option<f64> {
        let ms = self.elapsed.as_secs_f64() * 1000.0;
        (ms > 0.0).then(|| self.bytes as f64 / ms)
    }

    /// Throughput in Mbit/s (query-migrate `mbps`).
    pub fn mbps(&self) -> f64 {
        mbps(self.bytes, self.elapsed)
    }

    /// Pages per second (query-migrate `pages-per-second`).
    pub fn pages_per_second(&self) -> u64 {
        rate_per_second(self.pages, self.elapsed)
    }
}

/// Bandwidth estimator: feed it the running totals, it closes a window every [`BUFFER_DELAY`].
#[derive(Debug, Clone)]
pub struct BandwidthEstimator {
    window_start: Instant,
    bytes_at_start: u64,
    pages_at_start: u64,
    bytes_per_ms: Option<f64>,
}

impl BandwidthEstimator {
    /// Starts the first window at `now` with the given running totals.
    pub fn new(now: Instant, bytes: u64, pages: u64) -> Self {
        Self {
            window_start: now,
            bytes_at_start: bytes,
            pages_at_start: pages,
            bytes_per_ms: None,
        }
    }

    /// Updates with the running totals; returns the sample when a window closed. A window in
    /// which nothing was sent (the sender had nothing to send, e.g. waiting for the switchover
    /// ACK) does not change the estimate: the link was not measured.
    pub fn update(&mut self, now: Instant, bytes: u64, pages: u64) -> Option<WindowSample> {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed < BUFFER_DELAY {
            return None;
        }
        let sample = WindowSample {
            bytes: bytes.saturating_sub(self.bytes_at_start),
            elapsed,
            pages: pages.saturating_sub(self.pages_at_start),
        };
        if sample.bytes > 0 {
            self.bytes_per_ms = sample.bytes_per_ms();
        }
        self.window_start = now;
        self.bytes_at_start = bytes;
        self.pages_at_start = pages;
        Some(sample)
    }

    /// The last measured bandwidth in bytes/ms (`None` before the first non-empty window).
    pub fn bytes_per_ms(&self) -> Option<f64> {
        self.bytes_per_ms
    }
}

/// The bandwidth (bytes/ms) the switchover decision assumes: `avail-switchover-bandwidth`
/// (bytes/s) when non-zero, else the measured one (0 when nothing was measured yet).
pub fn switchover_bandwidth(measured_bytes_per_ms: Option<f64>, avail_switchover_bw: u64) -> f64 {
    if avail_switchover_bw > 0 {
        avail_switchover_bw as f64 / 1000.0
    } else {
        measured_bytes_per_ms.unwrap_or(0.0)
    }
}

/// Bytes that can be sent within the downtime limit (QEMU `threshold_size`).
pub fn threshold_bytes(bandwidth_bytes_per_ms: f64, downtime_limit_ms: u64) -> u64 {
    let t = bandwidth_bytes_per_ms * downtime_limit_ms as f64;
    if t.is_finite() && t > 0.0 {
        t as u64
    } else {
        0
    }
}

/// Expected downtime in ms for `remaining_bytes` at the given bandwidth (`None` when the
/// bandwidth is unknown or zero).
pub fn expected_downtime_ms(remaining_bytes: u64, bandwidth_bytes_per_ms: f64) -> Option<u64> {
    (bandwidth_bytes_per_ms > 0.0).then(|| (remaining_bytes as f64 / bandwidth_bytes_per_ms) as u64)
}

/// Whether the cheap estimate is low enough to pay for an exact count (dirty-log sync).
pub fn wants_exact_pending(estimate: u64, threshold: u64) -> bool {
    estimate <= threshold
}

/// The switchover-ack gate (QEMU `migration_can_switchover`): no capability → yes; a stopped VM
/// does not wait (offline migration); otherwise only once the destination acknowledged.
pub fn can_switchover(switchover_ack: bool, vm_running: bool, acked: bool) -> bool {
    !switchover_ack || !vm_running || acked
}

/// Everything the switchover decision looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchoverInputs {
    /// Bytes still to send before the destination can run (RAM dirty + device pending).
    pub pending: u64,
    /// [`threshold_bytes`].
    pub threshold: u64,
    /// The `switchover-ack` capability.
    pub switchover_ack: bool,
    /// Whether the source VM is running.
    pub vm_running: bool,
    /// Whether `SWITCHOVER_ACK` has arrived.
    pub acked: bool,
}

/// The answer of [`decide`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Stop the VM and send the rest.
    Switchover,
    /// Keep iterating: too much left for the downtime limit.
    IteratePending,
    /// Keep iterating: it would fit, but the destination has not acknowledged yet.
    AwaitAck,
}

/// The switchover decision: `pending <= threshold` (so `pending == 0` always fits) and the ACK
/// gate is open.
pub fn decide(i: &SwitchoverInputs) -> Decision {
    if i.pending > i.threshold {
        Decision::IteratePending
    } else if !can_switchover(i.switchover_ack, i.vm_running, i.acked) {
        Decision::AwaitAck
    } else {
        Decision::Switchover
    }
}

/// `max-bandwidth` limiter for pre-copy: each [`BUFFER_DELAY`] window may carry
/// `max_bandwidth / 10` bytes. 0 = unlimited (QEMU `RATE_LIMIT_DISABLED`). The sender disables it
/// for the stop-and-copy.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    max_bytes_per_sec: u64,
    window_start: Instant,
    sent_in_window: u64,
}

impl RateLimiter {
    /// A limiter of `max_bytes_per_sec` (0 = unlimited) whose first window starts at `now`.
    pub fn new(max_bytes_per_sec: u64, now: Instant) -> Self {
        Self {
            max_bytes_per_sec,
            window_start: now,
            sent_in_window: 0,
        }
    }

    /// Changes the limit (`migrate-set-parameters max-bandwidth` during a migration).
    pub fn set_limit(&mut self, max_bytes_per_sec: u64) {
        self.max_bytes_per_sec = max_bytes_per_sec;
    }

    /// The current limit.
    pub fn limit(&self) -> u64 {
        self.max_bytes_per_sec
    }

    /// Bytes allowed per window.
    pub fn window_budget(&self) -> u64 {
        (self.max_bytes_per_sec / 10).max(1)
    }

    /// Accounts `bytes` just sent.
    pub fn record(&mut self, bytes: u64) {
        self.sent_in_window = self.sent_in_window.saturating_add(bytes);
    }

    /// How long the sender must wait before sending more (zero = go on). Starts a new window
    /// when the current one is over.
    pub fn delay(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= BUFFER_DELAY {
            self.window_start = now;
            self.sent_in_window = 0;
            return Duration::ZERO;
        }
        if self.max_bytes_per_sec == 0 || self.sent_in_window < self.window_budget() {
            Duration::ZERO
        } else {
            BUFFER_DELAY - elapsed
        }
    }

    /// Bytes the sender may still send in the current window (`u64::MAX` when unlimited).
    pub fn remaining_budget(&self) -> u64 {
        if self.max_bytes_per_sec == 0 {
            u64::MAX
        } else {
            self.window_budget().saturating_sub(self.sent_in_window)
        }
    }
}

/// Mbit/s for `bytes` over `elapsed` (0 for an empty interval).
pub fn mbps(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        bytes as f64 * 8.0 / secs / 1e6
    } else {
        0.0
    }
}

/// `count` per second over `elapsed` (0 for an empty interval).
pub fn rate_per_second(count: u64, elapsed: Duration) -> u64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        (count as f64 / secs) as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn estimator_closes_windows_of_100ms() {
        let t0 = Instant::now();
        let mut e = BandwidthEstimator::new(t0, 0, 0);
        assert_eq!(e.update(t0 + 50 * MS, 1000, 1), None);
        assert_eq!(e.bytes_per_ms(), None);
        let s = e.update(t0 + 100 * MS, 100_000, 20).expect("window closed");
        assert_eq!(s.bytes, 100_000);
        assert_eq!(s.pages, 20);
        assert_eq!(e.bytes_per_ms(), Some(1000.0));
        assert_eq!(s.pages_per_second(), 200);
        assert!((s.mbps() - 8.0).abs() < 1e-9);
        // An idle window keeps the previous estimate.
        let s = e.update(t0 + 300 * MS, 100_000, 20).expect("window closed");
        assert_eq!(s.bytes, 0);
        assert_eq!(e.bytes_per_ms(), Some(1000.0));
        // A busy one replaces it.
        e.update(t0 + 400 * MS, 150_000, 30);
        assert_eq!(e.bytes_per_ms(), Some(500.0));
    }

    #[test]
    fn threshold_and_expected_downtime() {
        // 1000 bytes/ms (≈1 MB/s) × 300 ms = 300 kB.
        assert_eq!(threshold_bytes(1000.0, 300), 300_000);
        assert_eq!(threshold_bytes(0.0, 300), 0);
        assert_eq!(threshold_bytes(f64::NAN, 300), 0);
        assert_eq!(expected_downtime_ms(600_000, 1000.0), Some(600));
        assert_eq!(expected_downtime_ms(600_000, 0.0), None);
    }

    #[test]
    fn avail_switchover_bandwidth_overrides_estimate() {
        assert_eq!(switchover_bandwidth(Some(10.0), 0), 10.0);
        assert_eq!(switchover_bandwidth(None, 0), 0.0);
        // 1 GB/s = 1e6 bytes/ms.
        assert_eq!(switchover_bandwidth(Some(10.0), 1_000_000_000), 1_000_000.0);
    }

    #[test]
    fn decision_table() {
        let base = SwitchoverInputs {
            pending: 100,
            threshold: 1000,
            switchover_ack: false,
            vm_running: true,
            acked: false,
        };
        assert_eq!(decide(&base), Decision::Switchover);
        assert_eq!(
            decide(&SwitchoverInputs {
                pending: 1001,
                ..base
            }),
            Decision::IteratePending
        );
        // Nothing measured yet: only an empty pending set fits.
        assert_eq!(
            decide(&SwitchoverInputs {
                threshold: 0,
                ..base
            }),
            Decision::IteratePending
        );
        assert_eq!(
            decide(&SwitchoverInputs {
                pending: 0,
                threshold: 0,
                ..base
            }),
            Decision::Switchover
        );
        // switchover-ack: wait for the ACK while running…
        let ack = SwitchoverInputs {
            switchover_ack: true,
            ..base
        };
        assert_eq!(decide(&ack), Decision::AwaitAck);
        assert_eq!(
            decide(&SwitchoverInputs { acked: true, ..ack }),
            Decision::Switchover
        );
        // …but a stopped VM bypasses the wait.
        assert_eq!(
            decide(&SwitchoverInputs {
                vm_running: false,
                ..ack
            }),
            Decision::Switchover
        );
        // Pending above threshold wins over the ACK state.
        assert_eq!(
            decide(&SwitchoverInputs {
                pending: 5000,
                acked: true,
                ..ack
            }),
            Decision::IteratePending
        );
        assert!(wants_exact_pending(10, 10));
        assert!(!wants_exact_pending(11, 10));
    }

    #[test]
    fn rate_limiter_windows() {
        let t0 = Instant::now();
        // 1 MB/s → 100 kB per 100 ms window.
        let mut r = RateLimiter::new(1_000_000, t0);
        assert_eq!(r.window_budget(), 100_000);
        assert_eq!(r.delay(t0), Duration::ZERO);
        r.record(60_000);
        assert_eq!(r.remaining_budget(), 40_000);
        assert_eq!(r.delay(t0 + 10 * MS), Duration::ZERO);
        r.record(40_000);
        assert_eq!(r.delay(t0 + 30 * MS), 70 * MS);
        // The next window starts fresh.
        assert_eq!(r.delay(t0 + 100 * MS), Duration::ZERO);
        assert_eq!(r.remaining_budget(), 100_000);
        // Unlimited.
        r.set_limit(0);
        r.record(u64::MAX);
        assert_eq!(r.delay(t0 + 110 * MS), Duration::ZERO);
        assert_eq!(r.remaining_budget(), u64::MAX);
        assert_eq!(r.limit(), 0);
    }

    #[test]
    fn rates() {
        assert_eq!(rate_per_second(500, Duration::from_millis(500)), 1000);
        assert_eq!(rate_per_second(500, Duration::ZERO), 0);
        assert_eq!(mbps(1_000_000, Duration::from_secs(1)), 8.0);
        assert_eq!(mbps(1, Duration::ZERO), 0.0);
    }
}
