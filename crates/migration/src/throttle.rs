//! Auto-converge policy (QEMU's `auto-converge` capability): when to throttle the guest's
//! vCPUs and by how much. Pure logic, no clock and no KVM: the engine feeds it one
//! [`ThrottlePolicy::after_sync`] per dirty sync and applies the percentage it returns
//! through the machine, which turns a percentage into vCPU time slicing (QEMU's ratio; the
//! VMM's `throttle::slice` cuts it into sleeps of at most 50 ms, decision 243).
//!
//! Semantics follow QEMU's `migration/ram.c` (`migration_trigger_throttle`,
//! `mig_throttle_guest_down`), `system/cpu-throttle.c` (10 ms timeslice, 1..=99 %) and the
//! parameters of `migration/options.c` (checked in [`crate::params`]).

use std::time::Duration;

use crate::params::Parameters;

/// QEMU's default `cpu-throttle-initial`, percent.
pub const DEFAULT_CPU_THROTTLE_INITIAL: u8 = 20;
/// QEMU's default `cpu-throttle-increment`, percent.
pub const DEFAULT_CPU_THROTTLE_INCREMENT: u8 = 10;
/// QEMU's default `max-cpu-throttle`, percent.
pub const DEFAULT_MAX_CPU_THROTTLE: u8 = 99;
/// QEMU's default `throttle-trigger-threshold`, percent.
pub const DEFAULT_THROTTLE_TRIGGER_THRESHOLD: u8 = 50;
/// QEMU's `CPU_THROTTLE_PCT_MIN`.
pub const THROTTLE_PCT_MIN: u8 = 1;
/// QEMU's `CPU_THROTTLE_PCT_MAX`.
pub const THROTTLE_PCT_MAX: u8 = 99;
/// QEMU's `CPU_THROTTLE_TIMESLICE_NS`: the running part of one throttle period (Tern's VMM keeps
/// it while the sleep is at most 50 ms, decision 243).
pub const THROTTLE_TIMESLICE: Duration = Duration::from_millis(10);
/// QEMU's `migration_bitmap_sync` judges the dirty rate over sync periods longer than one
/// second (the syncs in between add their dirtied pages to the period).
pub const SYNC_PERIOD: Duration = Duration::from_secs(1);
/// QEMU's `CPU_THROTTLE_DIRTY_SYNC_TIMESLICE_MS` (9.2+): with auto-converge, a pass that has
/// gone this long without a dirty sync gets one, so the policy is not starved by long passes.
pub const PERIODIC_SYNC: Duration = Duration::from_secs(5);

/// The auto-converge parameters (QEMU's `cpu-throttle-*`, `max-cpu-throttle`,
/// `throttle-trigger-threshold`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThrottleParams {
    /// `cpu-throttle-initial`: the first throttle, percent (1..=99).
    pub initial: u8,
    /// `cpu-throttle-increment`: each further raise, percent (1..=99).
    pub increment: u8,
    /// `cpu-throttle-tailslow`: near the end, raise only as much as the dirty rate needs.
    pub tailslow: bool,
    /// `max-cpu-throttle`: the ceiling, percent (1..=99).
    pub max: u8,
    /// `throttle-trigger-threshold`: dirtied bytes above this percentage of the transferred
    /// bytes of a sync period count as "dirty rate high" (1..=100).
    pub trigger_threshold: u8,
}

impl Default for ThrottleParams {
    fn default() -> Self {
        Self {
            initial: DEFAULT_CPU_THROTTLE_INITIAL,
            increment: DEFAULT_CPU_THROTTLE_INCREMENT,
            tailslow: false,
            max: DEFAULT_MAX_CPU_THROTTLE,
            trigger_threshold: DEFAULT_THROTTLE_TRIGGER_THRESHOLD,
        }
    }
}

impl ThrottleParams {
    /// The auto-converge part of the migration parameters (checked there, with QEMU's
    /// ranges and error texts, by [`Parameters::check`]).
    pub fn from_parameters(p: &Parameters) -> Self {
        Self {
            initial: p.cpu_throttle_initial,
            increment: p.cpu_throttle_increment,
            tailslow: p.cpu_throttle_tailslow,
            max: p.max_cpu_throttle,
            trigger_threshold: p.throttle_trigger_threshold,
        }
    }
}

/// One dirty sync period, as the engine counted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncPeriod {
    /// Bytes found dirty by this sync (dirty pages × page size).
    pub bytes_dirty: u64,
    /// Bytes put on the wire since the previous sync.
    pub bytes_transferred: u64,
}

/// Groups dirty syncs into the periods the policy judges (QEMU's `time_last_bitmap_sync`,
/// `num_dirty_pages_period`, `bytes_xfer_prev`): a sync that ends a period of at least
/// `min_period` yields the period's totals, shorter ones only add their dirtied bytes. Pure:
/// times are offsets from the start of the migration.
#[derive(Clone, Debug)]
pub struct PeriodMeter {
    min_period: Duration,
    started: Duration,
    transferred_at_start: u64,
    bytes_dirty: u64,
}

impl PeriodMeter {
    /// The first period starts at `at`, with `transferred` bytes already on the wire.
    pub fn new(min_period: Duration, at: Duration, transferred: u64) -> Self {
        Self {
            min_period,
            started: at,
            transferred_at_start: transferred,
            bytes_dirty: 0,
        }
    }

    /// One sync at `at` found `bytes_dirty` dirty; `transferred` bytes are on the wire so far
    /// (a running total). Returns the period when this sync ends one.
    pub fn at_sync(
        &mut self,
        at: Duration,
        bytes_dirty: u64,
        transferred: u64,
    ) -> Option<SyncPeriod> {
        self.bytes_dirty = self.bytes_dirty.saturating_add(bytes_dirty);
        if at.saturating_sub(self.started) < self.min_period {
            return None;
        }
        let period = SyncPeriod {
            bytes_dirty: self.bytes_dirty,
            bytes_transferred: transferred.saturating_sub(self.transferred_at_start),
        };
        self.started = at;
        self.transferred_at_start = transferred;
        self.bytes_dirty = 0;
        Some(period)
    }
}

/// What the policy decided after a sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThrottleDecision {
    /// Leave the throttle as it is.
    Keep,
    /// Set the throttle to this percentage (1..=99).
    Set(u8),
}

/// The auto-converge state of one migration (QEMU's `dirty_rate_high_cnt` and the current
/// `cpu_throttle` percentage).
#[derive(Clone, Debug, Default)]
pub struct ThrottlePolicy {
    params: ThrottleParams,
    high_count: u32,
    percentage: u8,
}

impl ThrottlePolicy {
    /// A policy with throttling off.
    pub fn new(params: ThrottleParams) -> Self {
        Self {
            params,
            high_count: 0,
            percentage: 0,
        }
    }

    /// Parameters may change while the migration runs (QEMU reads them at each raise).
    pub fn set_params(&mut self, params: ThrottleParams) {
        self.params = params;
    }

    /// Current throttle percentage, 0 when not throttling (`cpu-throttle-percentage`).
    pub fn percentage(&self) -> u8 {
        self.percentage
    }

    /// Whether the guest is throttled.
    pub fn active(&self) -> bool {
        self.percentage > 0
    }

    /// Forget the throttle (the migration ended; the caller removes it from the machine).
    pub fn reset(&mut self) {
        self.percentage = 0;
        self.high_count = 0;
    }

    /// QEMU's `migration_trigger_throttle`: a period whose dirtied bytes exceed
    /// `throttle-trigger-threshold`% of its transferred bytes is "high"; the second high
    /// period (not necessarily consecutive, as QEMU's counter) raises the throttle.
    pub fn after_sync(&mut self, period: SyncPeriod) -> ThrottleDecision {
        let threshold = period
            .bytes_transferred
            .saturating_mul(u64::from(self.params.trigger_threshold))
            / 100;
        if period.bytes_dirty <= threshold {
            return ThrottleDecision::Keep;
        }
        self.high_count += 1;
        if self.high_count < 2 {
            return ThrottleDecision::Keep;
        }
        self.high_count = 0;
        let next = self.raise(period.bytes_dirty, threshold);
        if next == self.percentage {
            return ThrottleDecision::Keep;
        }
        self.percentage = next;
        ThrottleDecision::Set(next)
    }

    /// QEMU's `mig_throttle_guest_down`.
    fn raise(&self, bytes_dirty: u64, bytes_threshold: u64) -> u8 {
        let p = self.params;
        let wanted = if self.percentage == 0 {
            u64::from(p.initial)
        } else {
            let inc = if p.tailslow {
                // The CPU share at which the dirty rate would meet the threshold.
                let cpu_now = 100 - u64::from(self.percentage);
                let cpu_ideal =
                    (cpu_now as f64 * bytes_threshold as f64 / bytes_dirty as f64) as u64;
                (cpu_now - cpu_ideal.min(cpu_now)).min(u64::from(p.increment))
            } else {
                u64::from(p.increment)
            };
            (u64::from(self.percentage) + inc).min(u64::from(p.max))
        };
        // cpu_throttle_set clamps to 1..=99.
        wanted.clamp(u64::from(THROTTLE_PCT_MIN), u64::from(THROTTLE_PCT_MAX)) as u8
    }
}

#[cfg(test)]
#[path = "throttle_tests.rs"]
mod tests;
