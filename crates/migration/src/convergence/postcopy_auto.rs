//! Tern's automatic switch to post-copy (`x-tern-postcopy-auto`, issue 9 item 7;
//! docs/migration-engine.md §2.4). Pure: the sender passes in what it measured at each
//! pre-copy dirty-log sync and, when the answer says so, switches as `migrate-start-postcopy`
//! would.
//!
//! **The bound.** Judged at every sync from the end of the first pass on, while the switchover
//! rule ([`super::rule`]) has not armed (QEMU's rule has not held). Pre-copy is declared unable
//! to meet `downtime-limit` when any of these holds:
//!
//! 1. `dirty-rate-exceeds-bandwidth`: the fastest dirty rate of the last syncs
//!    ([`super::rule::RATE_MEMORY`]) is at least the measured bandwidth: every pass leaves at
//!    least what it sent, so the pending bytes never reach the threshold;
//! 2. `too-many-passes`: with `r = dirty rate / bandwidth < 1`, each pass leaves `r` times what
//!    it sent, and reaching `pending <= threshold` takes `ceil(ln(threshold / pending) / ln r)`
//!    more passes: more than [`AUTO_MAX_PASSES`];
//! 3. `no-progress`: observed, whatever the prediction says: over the last
//!    [`AUTO_PLATEAU_SYNCS`] syncs the excess (pending bytes above that sync's threshold) never
//!    fell to [`AUTO_PLATEAU_RATIO`] of the excess [`AUTO_PLATEAU_SYNCS`] syncs earlier. The
//!    excess, not the pending bytes: between syncs taken where QEMU takes them (whenever the
//!    estimate fits the threshold) a converging guest's pending bytes approach the threshold
//!    from above and shrink slowly in proportion, while their excess shrinks geometrically.
//!
//! Otherwise (`precopy-converges`) it keeps iterating. Once it said "switch" it says so again.

use std::collections::VecDeque;

/// Most further pre-copy passes predicted to reach the threshold before Tern switches.
pub const AUTO_MAX_PASSES: u32 = 5;
/// Syncs over which the excess above the threshold must shrink ([`AUTO_PLATEAU_RATIO`]).
pub const AUTO_PLATEAU_SYNCS: usize = 3;
/// The excess must fall to this share within [`AUTO_PLATEAU_SYNCS`] syncs.
pub const AUTO_PLATEAU_RATIO: f64 = 0.75;

/// What the sender measured at one pre-copy sync.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoSample {
    /// Bytes to send before the destination could run (RAM dirty + devices' pending).
    pub pending: u64,
    /// `bandwidth × downtime-limit`: what the switchover rule waits for.
    pub threshold: u64,
    /// Measured pre-copy bandwidth, bytes/ms (`None`: no window closed yet).
    pub bandwidth: Option<f64>,
    /// Fastest recent dirty rate, bytes/ms.
    pub dirty_rate: f64,
    /// Dirty-log syncs so far, this one included (2 = the first pass just ended).
    pub syncs: u64,
    /// The switchover rule armed at this sync (QEMU's rule held): pre-copy will finish.
    pub rule_armed: bool,
}

/// Which part of the bound decided (`x-tern-postcopy-auto.rule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoRule {
    /// Not judged yet: the first pass has not ended, or no bandwidth was measured.
    NotJudged,
    /// Pre-copy is predicted to meet the downtime limit within the bound: no switch.
    PrecopyConverges,
    /// Switch: the guest dirties at least as fast as pre-copy sends.
    DirtyRateExceedsBandwidth,
    /// Switch: more than [`AUTO_MAX_PASSES`] further passes predicted.
    TooManyPasses,
    /// Switch: the excess above the threshold did not shrink enough over the last syncs.
    NoProgress,
}

impl AutoRule {
    /// Every name, for the QMP schema.
    pub const ALL: [AutoRule; 5] = [
        AutoRule::NotJudged,
        AutoRule::PrecopyConverges,
        AutoRule::DirtyRateExceedsBandwidth,
        AutoRule::TooManyPasses,
        AutoRule::NoProgress,
    ];

    /// The QMP spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AutoRule::NotJudged => "not-judged",
            AutoRule::PrecopyConverges => "precopy-converges",
            AutoRule::DirtyRateExceedsBandwidth => "dirty-rate-exceeds-bandwidth",
            AutoRule::TooManyPasses => "too-many-passes",
            AutoRule::NoProgress => "no-progress",
        }
    }
}

/// The answer at one sync, with the prediction (what `query-migrate` shows).
#[derive(Debug, Clone, PartialEq)]
pub struct AutoDecision {
    /// Switch to post-copy now.
    pub switch: bool,
    pub rule: AutoRule,
    /// Further pre-copy passes predicted to reach the threshold (`None`: never, or not judged).
    pub predicted_passes: Option<u32>,
    /// Time those passes are predicted to take, ms.
    pub predicted_time_ms: Option<u64>,
    /// Human-readable why, with the numbers.
    pub reason: String,
}

/// The policy's memory over one migration.
#[derive(Debug, Clone, Default)]
pub struct AutoPostcopy {
    /// Excess (pending above the threshold) at the last judged syncs (at most
    /// [`AUTO_PLATEAU_SYNCS`] + 1).
    history: VecDeque<u64>,
    switched: Option<AutoDecision>,
}

const MIB: f64 = (1 << 20) as f64;

impl AutoPostcopy {
    /// The decision at a sync.
    pub fn at_sync(&mut self, s: &AutoSample) -> AutoDecision {
        if let Some(d) = &self.switched {
            return d.clone();
        }
        if s.rule_armed {
            return not_switching(
                AutoRule::PrecopyConverges,
                Some(0),
                Some(0),
                format!(
                    "pending {} bytes fits the threshold {}: pre-copy's switchover rule holds",
                    s.pending, s.threshold
                ),
            );
        }
        if s.syncs < 2 {
            return not_switching(
                AutoRule::NotJudged,
                None,
                None,
                "judged from the end of the first pass on".into(),
            );
        }
        let Some(b) = s.bandwidth.filter(|b| *b > 0.0 && b.is_finite()) else {
            return not_switching(
                AutoRule::NotJudged,
                None,
                None,
                "no bandwidth measured yet".into(),
            );
        };
        self.history
            .push_back(s.pending.saturating_sub(s.threshold));
        while self.history.len() > AUTO_PLATEAU_SYNCS + 1 {
            self.history.pop_front();
        }
        let d = s.dirty_rate.max(0.0);
        let r = d / b;
        let (rate_mib, bw_mib) = (d * 1000.0 / MIB, b * 1000.0 / MIB);
        let decided = if r >= 1.0 {
            AutoDecision {
                switch: true,
                rule: AutoRule::DirtyRateExceedsBandwidth,
                predicted_passes: None,
                predicted_time_ms: None,
                reason: format!(
                    "the guest dirties {rate_mib:.1} MiB/s, pre-copy sends {bw_mib:.1} MiB/s: each \
                     pass leaves at least what it sent, {:.1} MiB pending never fit the {:.1} MiB \
                     threshold",
                    s.pending as f64 / MIB,
                    s.threshold as f64 / MIB
                ),
            }
        } else {
            let (passes, time_ms) = passes_to_threshold(s.pending, s.threshold, r, b);
            if passes > AUTO_MAX_PASSES {
                AutoDecision {
                    switch: true,
                    rule: AutoRule::TooManyPasses,
                    predicted_passes: Some(passes),
                    predicted_time_ms: Some(time_ms),
                    reason: format!(
                        "{passes} more passes ({time_ms} ms) predicted to bring {:.1} MiB down to \
                         the {:.1} MiB threshold (dirty {rate_mib:.1} MiB/s, bandwidth \
                         {bw_mib:.1} MiB/s): more than {AUTO_MAX_PASSES}",
                        s.pending as f64 / MIB,
                        s.threshold as f64 / MIB
                    ),
                }
            } else if let Some(old) = self.plateau() {
                AutoDecision {
                    switch: true,
                    rule: AutoRule::NoProgress,
                    predicted_passes: Some(passes),
                    predicted_time_ms: Some(time_ms),
                    reason: format!(
                        "the excess above the threshold went from {old} to {} bytes over the \
                         last {AUTO_PLATEAU_SYNCS} syncs (never down to {:.0} %), although \
                         {passes} passes were predicted",
                        s.pending.saturating_sub(s.threshold),
                        AUTO_PLATEAU_RATIO * 100.0
                    ),
                }
            } else {
                return not_switching(
                    AutoRule::PrecopyConverges,
                    Some(passes),
                    Some(time_ms),
                    format!(
                        "{passes} more pass(es) ({time_ms} ms) predicted to bring {:.1} MiB down \
                         to the {:.1} MiB threshold (dirty {rate_mib:.1} MiB/s, bandwidth \
                         {bw_mib:.1} MiB/s): within {AUTO_MAX_PASSES}",
                        s.pending as f64 / MIB,
                        s.threshold as f64 / MIB
                    ),
                );
            }
        };
        self.switched = Some(decided.clone());
        decided
    }

    /// `Some(excess K syncs ago)` when no later sync got to [`AUTO_PLATEAU_RATIO`] of it.
    fn plateau(&self) -> Option<u64> {
        if self.history.len() <= AUTO_PLATEAU_SYNCS {
            return None;
        }
        let old = *self.history.front()?;
        let limit = AUTO_PLATEAU_RATIO * old as f64;
        let shrank = self.history.iter().skip(1).any(|p| *p as f64 <= limit);
        (!shrank).then_some(old)
    }
}

/// Passes (and their time, ms) for `pending` to fall to `threshold` when each pass leaves `r`
/// (< 1) times what it sent, at `b` bytes/ms. Capped at `u32::MAX` passes.
fn passes_to_threshold(pending: u64, threshold: u64, r: f64, b: f64) -> (u32, u64) {
    if pending <= threshold {
        return (0, 0);
    }
    let (mut left, mut passes, mut ms) = (pending as f64, 0u32, 0.0f64);
    if r <= 0.0 {
        return (1, (left / b) as u64);
    }
    let need = ((threshold.max(1) as f64 / left).ln() / r.ln()).ceil();
    if !need.is_finite() || need > 1000.0 {
        let n = if need.is_finite() {
            need.min(u32::MAX as f64) as u32
        } else {
            u32::MAX
        };
        // Geometric series: the time to send everything, ever.
        return (n, (left / b / (1.0 - r)).min(u64::MAX as f64) as u64);
    }
    while left > threshold as f64 && passes < need as u32 {
        ms += left / b;
        left *= r;
        passes += 1;
    }
    (passes, ms as u64)
}

fn not_switching(
    rule: AutoRule,
    passes: Option<u32>,
    time_ms: Option<u64>,
    reason: String,
) -> AutoDecision {
    AutoDecision {
        switch: false,
        rule,
        predicted_passes: passes,
        predicted_time_ms: time_ms,
        reason,
    }
}

#[cfg(test)]
#[path = "postcopy_auto_tests.rs"]
mod tests;
