//! Tern's switchover rule: QEMU's rule, plus a bounded number of downtime-minimising extra
//! passes (docs/migration-engine.md §2.1). Pure: the sender passes in what it measured at each
//! dirty-log sync (times as offsets from the start of the migration) and acts on the answer.
//!
//! * **Where it syncs** ([`SwitchoverRule::should_sync`]): exactly where QEMU does (whenever the
//!   pending estimate fits the threshold) until QEMU's rule holds; during an extra pass, at the
//!   end of the pass (or at the pass's deadline).
//! * **QEMU's moment** ("armed"): the first sync where `pending <= threshold` and the
//!   switchover-ack gate is open. From then on the rule never goes back: it switches at the
//!   moment itself, or after at most [`MAX_EXTRA_PASSES`] extra passes, within
//!   [`extra_time_budget`] and within twice the bytes pending at the moment; a pass that ends
//!   above the threshold with more pending than it began with (the guest outran the
//!   prediction) switches at once too. One that ends above it with less (the link slowed, the
//!   threshold shrank with the bandwidth, and the pass was cut at its deadline) goes on under
//!   the same bounds.
//! * **An extra pass is taken** only when it is predicted to leave at most
//!   [`EXTRA_PASS_MAX_RATIO`] of the pending bytes (the fastest dirty rate of the last
//!   [`RATE_MEMORY`] syncs × the pass's duration) and each one taken did cut them by at least a
//!   quarter.

use std::time::Duration;

/// Most extra passes after QEMU's rule held.
pub const MAX_EXTRA_PASSES: u32 = 5;
/// Expected downtime at or below which another pass is not worth it.
pub const GOOD_ENOUGH_DOWNTIME_MS: f64 = 1.0;
/// Shortest time budget of the extra passes (see [`extra_time_budget`]).
pub const MIN_EXTRA_TIME: Duration = Duration::from_secs(1);
/// Shortest deadline of one extra pass.
pub const MIN_PASS_DEADLINE: Duration = Duration::from_millis(100);
/// How many syncs' dirty rates the prediction looks back on.
pub const RATE_MEMORY: usize = 4;
/// An extra pass is taken when it is predicted to leave at most this share of the pending
/// bytes, and the minimizer stops once a pass left more (the bounds above end it anyway).
/// Halving (0.5) was tried first: the `pattern` demo guest, which dirties at about half the
/// loopback rate, then often switched at QEMU's moment with ~140 MB left (44–96 ms downtime in
/// 3 of 6 runs, against 2–8 ms for the unbounded minimizer before).
pub const EXTRA_PASS_MAX_RATIO: f64 = 0.75;

/// Time the extra passes may take together, from QEMU's moment: twice the downtime limit
/// (the first extra pass fits the limit; the bound ends a series that shrinks slowly), at least
/// [`MIN_EXTRA_TIME`].
pub fn extra_time_budget(downtime_limit_ms: u64) -> Duration {
    Duration::from_millis(downtime_limit_ms.saturating_mul(2)).max(MIN_EXTRA_TIME)
}

/// How long the drain before the stop (§2.1 item 4: `PING`, wait for its `PONG`) may wait for
/// the destination to load what is queued in the socket buffers. While it waits the queue
/// shrinks at the link's rate and the final copy grows at the guest's dirty rate, so the final
/// copy's bytes (dirtied + still queued) fall only while the guest dirties slower than the
/// link: at `dirty_rate >= bandwidth` (bytes/ms both; the fastest recent rate; a bandwidth of
/// 0 is unknown and compares with nothing) the drain cannot pay and is skipped. Otherwise it
/// waits while the dirtied bytes still fit the threshold's
/// slack, at most the downtime limit. (It waited by the slack alone before: a guest that
/// dirtied faster than the link spent the slack while the queue stood still, and the final copy
/// then carried both: 340 ms downtime against a 300 ms limit on the 1 Gbit/s link.)
pub fn drain_wait(
    pending: u64,
    threshold: u64,
    dirty_rate: f64,
    bandwidth: f64,
    downtime_limit_ms: u64,
) -> Duration {
    let limit_ms = downtime_limit_ms as f64;
    if !(dirty_rate.is_finite() && bandwidth.is_finite()) {
        return Duration::ZERO;
    }
    // An unknown bandwidth (no window closed yet) cannot be compared: the slack decides.
    if bandwidth > 0.0 && dirty_rate >= bandwidth {
        return Duration::ZERO;
    }
    let ms = if dirty_rate > 0.0 {
        (threshold.saturating_sub(pending) as f64 / dirty_rate).min(limit_ms)
    } else {
        limit_ms
    };
    Duration::from_secs_f64(ms.max(0.0) / 1000.0)
}

/// What the sender measured at one dirty-log sync.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyncSample {
    /// Exact bytes to send before the destination can run (RAM dirty + devices' pending).
    pub pending: u64,
    /// `bandwidth × downtime-limit` ([`super::threshold_bytes`]).
    pub threshold: u64,
    /// Bandwidth the decision assumes, bytes/ms ([`super::switchover_bandwidth`]).
    pub bandwidth: f64,
    /// Bytes the guest dirtied per ms since the previous sync.
    pub dirty_rate: f64,
    /// The switchover-ack gate ([`super::can_switchover`]) is open.
    pub gate_open: bool,
    /// The source VM runs (a stopped one dirties nothing: no extra pass).
    pub vm_running: bool,
    /// Bytes sent so far.
    pub transferred: u64,
    /// Time since the migration started.
    pub at: Duration,
    /// `downtime-limit` in ms.
    pub downtime_limit_ms: u64,
}

/// Why the rule decided what it decided (`x-tern-switchover-decision.rule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleName {
    /// QEMU's rule does not hold: keep iterating.
    AboveThreshold,
    /// QEMU's rule holds but the destination has not acknowledged (`switchover-ack`).
    AwaitAck,
    /// Switch at QEMU's moment: another pass is not expected to cut the pending bytes enough.
    QemuThreshold,
    /// Switch: the expected downtime is already at most [`GOOD_ENOUGH_DOWNTIME_MS`].
    GoodEnough,
    /// Keep iterating: one more pass is expected to leave at most 3/4 of the pending bytes.
    MinimizerExtraPass,
    /// Switch: the last extra pass cut the pending bytes by less than a quarter.
    MinimizerPlateau,
    /// Switch: the extra passes' count, time or byte bound is reached.
    BoundReached,
    /// Switch: an extra pass ended above the threshold with more pending than it began with
    /// (the guest sped up); no further pass.
    Regrew,
}

impl RuleName {
    /// Every name, for the QMP schema.
    pub const ALL: [RuleName; 8] = [
        RuleName::AboveThreshold,
        RuleName::AwaitAck,
        RuleName::QemuThreshold,
        RuleName::GoodEnough,
        RuleName::MinimizerExtraPass,
        RuleName::MinimizerPlateau,
        RuleName::BoundReached,
        RuleName::Regrew,
    ];

    /// The QMP spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RuleName::AboveThreshold => "above-threshold",
            RuleName::AwaitAck => "await-ack",
            RuleName::QemuThreshold => "qemu-threshold",
            RuleName::GoodEnough => "good-enough",
            RuleName::MinimizerExtraPass => "minimizer-extra-pass",
            RuleName::MinimizerPlateau => "minimizer-plateau",
            RuleName::BoundReached => "bound-reached",
            RuleName::Regrew => "regrew",
        }
    }
}

/// The answer at one sync, and why (what `query-migrate` shows).
#[derive(Debug, Clone, PartialEq)]
pub struct RuleDecision {
    /// Stop the VM now.
    pub switch: bool,
    /// Which rule decided.
    pub rule: RuleName,
    /// Syncs since QEMU's rule first held (`None` while it has not).
    pub passes_since_qemu_would_switch: Option<u32>,
    /// `pending / bandwidth` (`None` when the bandwidth is unknown).
    pub expected_downtime_ms: Option<u64>,
    /// Human-readable why, with the numbers.
    pub reason: String,
}

/// State once QEMU's rule held.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Armed {
    at: Duration,
    transferred: u64,
    pending: u64,
    /// Syncs since the moment.
    passes: u32,
    /// Pending bytes at the previous sync.
    previous: u64,
    /// When the current extra pass must be judged, finished or not.
    pass_deadline: Duration,
}

/// Tern's switchover rule (see the module documentation). One per migration.
#[derive(Debug, Clone, Default)]
pub struct SwitchoverRule {
    armed: Option<Armed>,
    rates: [f64; RATE_MEMORY],
    samples: usize,
}

impl SwitchoverRule {
    /// Whether the sender should sync the dirty log now. `estimate`: pending estimate (RAM left
    /// in this pass + devices' estimates); `remaining`: RAM left in this pass.
    pub fn should_sync(&self, estimate: u64, threshold: u64, remaining: u64, at: Duration) -> bool {
        match &self.armed {
            // QEMU: whenever the estimate fits.
            None => estimate <= threshold,
            // An extra pass: judged at its end, or at its deadline.
            Some(a) => remaining == 0 || at >= a.pass_deadline,
        }
    }

    /// Whether QEMU's rule has held (the rule is committed to switching).
    pub fn armed(&self) -> bool {
        self.armed.is_some()
    }

    /// Fastest dirty rate (bytes/ms) of the last [`RATE_MEMORY`] syncs.
    pub fn recent_max_dirty_rate(&self) -> f64 {
        let n = self.samples.min(RATE_MEMORY);
        self.rates[..n].iter().copied().fold(0.0, f64::max)
    }

    /// The decision at a sync.
    pub fn at_sync(&mut self, s: &SyncSample) -> RuleDecision {
        if s.dirty_rate.is_finite() && s.dirty_rate >= 0.0 {
            self.rates[self.samples % RATE_MEMORY] = s.dirty_rate;
            self.samples += 1;
        }
        let expected = expected_ms(s.pending, s.bandwidth);
        let fits = s.pending <= s.threshold;
        let Some(mut a) = self.armed else {
            if !fits {
                return decision(
                    false,
                    RuleName::AboveThreshold,
                    None,
                    expected,
                    format!(
                        "pending {} bytes above the threshold {} (bandwidth × downtime-limit)",
                        s.pending, s.threshold
                    ),
                );
            }
            if !s.gate_open {
                return decision(
                    false,
                    RuleName::AwaitAck,
                    None,
                    expected,
                    "pending fits the threshold; waiting for the destination's switchover ACK"
                        .into(),
                );
            }
            let a = Armed {
                at: s.at,
                transferred: s.transferred,
                pending: s.pending,
                passes: 0,
                previous: s.pending,
                pass_deadline: s.at,
            };
            self.armed = Some(a);
            if let Some(d) = self.good_enough(s, expected, 0) {
                return d;
            }
            if !s.vm_running {
                return decision(
                    true,
                    RuleName::QemuThreshold,
                    Some(0),
                    expected,
                    "pending fits the threshold and the VM is stopped (nothing dirties)".into(),
                );
            }
            return self.judge_extra_pass(s, a, expected);
        };
        a.passes += 1;
        self.armed = Some(a);
        let n = Some(a.passes);
        // Above the threshold with more pending than the pass began with: the guest outran the
        // prediction. Above it with less: the pass was cut at its deadline because the link
        // slowed (the threshold shrank with the bandwidth); the bounds below still end it.
        if !fits && s.pending >= a.previous {
            return decision(
                true,
                RuleName::Regrew,
                n,
                expected,
                format!(
                    "an extra pass ended with {} bytes pending (it began with {}), above the \
                     threshold {}: the guest dirtied faster than predicted; switching now, \
                     QEMU's rule held {} passes ago",
                    s.pending, a.previous, s.threshold, a.passes
                ),
            );
        }
        if let Some(d) = self.good_enough(s, expected, a.passes) {
            return d;
        }
        if !s.vm_running {
            return decision(
                true,
                RuleName::QemuThreshold,
                n,
                expected,
                "pending fits the threshold and the VM is stopped (nothing dirties)".into(),
            );
        }
        let spent = s.at.saturating_sub(a.at);
        let budget = extra_time_budget(s.downtime_limit_ms);
        let extra_bytes = s.transferred.saturating_sub(a.transferred);
        let byte_budget = a.pending.saturating_mul(2);
        let bound = if a.passes >= MAX_EXTRA_PASSES {
            Some(format!("{MAX_EXTRA_PASSES} extra passes taken"))
        } else if spent >= budget {
            Some(format!(
                "{} ms spent in extra passes (budget {} ms)",
                spent.as_millis(),
                budget.as_millis()
            ))
        } else if extra_bytes.saturating_add(s.pending) > byte_budget {
            Some(format!(
                "{extra_bytes} bytes sent in extra passes, another {} would exceed {byte_budget} \
                 (twice the pending bytes when QEMU's rule held)",
                s.pending
            ))
        } else {
            None
        };
        if let Some(why) = bound {
            return decision(true, RuleName::BoundReached, n, expected, why);
        }
        if s.pending.saturating_mul(4) > a.previous.saturating_mul(3) {
            return decision(
                true,
                RuleName::MinimizerPlateau,
                n,
                expected,
                format!(
                    "the last extra pass took pending from {} to {} bytes (cut by less than a quarter)",
                    a.previous, s.pending
                ),
            );
        }
        self.judge_extra_pass(s, a, expected)
    }

    /// Switch if the expected downtime is already negligible.
    fn good_enough(
        &self,
        s: &SyncSample,
        expected: Option<f64>,
        passes: u32,
    ) -> Option<RuleDecision> {
        let tiny = s.pending == 0 || expected.is_some_and(|e| e <= GOOD_ENOUGH_DOWNTIME_MS);
        tiny.then(|| {
            decision(
                true,
                RuleName::GoodEnough,
                Some(passes),
                expected,
                format!(
                    "{} bytes pending: expected downtime at most {GOOD_ENOUGH_DOWNTIME_MS} ms",
                    s.pending
                ),
            )
        })
    }

    /// Another pass if it is predicted to leave at most [`EXTRA_PASS_MAX_RATIO`] of the pending bytes.
    fn judge_extra_pass(
        &mut self,
        s: &SyncSample,
        mut a: Armed,
        expected: Option<f64>,
    ) -> RuleDecision {
        let n = Some(a.passes);
        let rate = self.recent_max_dirty_rate();
        let Some(pass_ms) = expected else {
            return decision(
                true,
                RuleName::QemuThreshold,
                n,
                expected,
                "bandwidth unknown: no prediction for another pass".into(),
            );
        };
        let predicted = rate * pass_ms;
        let against = if s.pending <= s.threshold {
            format!(
                "pending {} bytes fits the threshold {}",
                s.pending, s.threshold
            )
        } else {
            format!(
                "pending {} bytes, down from {}, is above the threshold {} of a slower link",
                s.pending, a.previous, s.threshold
            )
        };
        if predicted > EXTRA_PASS_MAX_RATIO * s.pending as f64 {
            return decision(
                true,
                RuleName::QemuThreshold,
                n,
                expected,
                format!(
                    "{against}; another pass ({pass_ms:.0} ms at {rate:.0} bytes/ms dirtied) is \
                     predicted to leave {predicted:.0} bytes, not 3/4 of it"
                ),
            );
        }
        let need = Duration::from_secs_f64((2.0 * pass_ms / 1000.0).min(600.0));
        let budget_end = a.at + extra_time_budget(s.downtime_limit_ms);
        a.pass_deadline = (s.at + need.max(MIN_PASS_DEADLINE)).min(budget_end);
        a.previous = s.pending;
        self.armed = Some(a);
        decision(
            false,
            RuleName::MinimizerExtraPass,
            n,
            expected,
            format!("{against}; another pass is predicted to leave {predicted:.0} bytes"),
        )
    }
}

fn expected_ms(pending: u64, bandwidth: f64) -> Option<f64> {
    (bandwidth > 0.0 && bandwidth.is_finite()).then(|| pending as f64 / bandwidth)
}

fn decision(
    switch: bool,
    rule: RuleName,
    passes: Option<u32>,
    expected: Option<f64>,
    reason: String,
) -> RuleDecision {
    RuleDecision {
        switch,
        rule,
        passes_since_qemu_would_switch: passes,
        expected_downtime_ms: expected.map(|e| e.min(u64::MAX as f64) as u64),
        reason,
    }
}

#[cfg(test)]
#[path = "rule_tests.rs"]
mod tests;
