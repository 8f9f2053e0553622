//! `auto-converge` in the sender: the policy of [`crate::throttle`] fed at every pass boundary,
//! its percentage applied through [`crate::machine::VcpuControl::set_throttle`] and published
//! as `cpu-throttle-percentage`, and the throttle removed at every end of the migration.
//!
//! QEMU sends no event when the throttle changes; neither does Tern.

use std::time::Instant;

use super::{Sender, SourceError};
use crate::machine::MachineError;
use crate::stats::error_chain;
use crate::throttle::{PeriodMeter, ThrottleDecision, ThrottlePolicy};

/// The auto-converge state of one migration.
#[derive(Debug)]
pub(super) struct AutoConverge {
    policy: ThrottlePolicy,
    meter: PeriodMeter,
}

impl Sender {
    /// Setup: when `auto-converge` is on, checks that the machine can throttle its vCPUs (or
    /// fails before anything but the header was sent) and starts the first sync period.
    pub(super) fn setup_auto_converge(&mut self, now: Instant) -> Result<(), SourceError> {
        if !self.opts.auto_converge {
            return Ok(());
        }
        if !self.m.vcpus.can_throttle() {
            return Err(SourceError::Machine {
                op: "starting auto-converge",
                source: MachineError::rejected(
                    "auto-converge",
                    "this machine cannot throttle its vCPUs",
                ),
            });
        }
        let params = self.shared.lock().tuning.throttle;
        let at = now.saturating_duration_since(self.started);
        // Every byte sent counts, the multifd channels' too.
        let transferred =
            self.writer.as_ref().map_or(0, |w| w.bytes_written()) + self.multifd_bytes();
        self.auto_converge = Some(AutoConverge {
            policy: ThrottlePolicy::new(params),
            meter: PeriodMeter::new(self.opts.throttle_period, at, transferred),
        });
        Ok(())
    }

    /// A pre-copy sync at `now` found `bytes_dirty` dirtied bytes: judge the sync period it
    /// may end, and raise the throttle when the policy says so. Not called once the switchover
    /// rule has armed (decision 80: the bounded extra passes run at the throttle reached).
    pub(super) fn throttle_after_sync(
        &mut self,
        now: Instant,
        bytes_dirty: u64,
    ) -> Result<(), SourceError> {
        let transferred =
            self.writer.as_ref().map_or(0, |w| w.bytes_written()) + self.multifd_bytes();
        let Some(ac) = self.auto_converge.as_mut() else {
            return Ok(());
        };
        let at = now.saturating_duration_since(self.started);
        let Some(period) = ac.meter.at_sync(at, bytes_dirty, transferred) else {
            return Ok(());
        };
        // Parameters may change while the migration runs (QEMU reads them at each raise).
        ac.policy.set_params(self.shared.lock().tuning.throttle);
        let ThrottleDecision::Set(pct) = ac.policy.after_sync(period) else {
            return Ok(());
        };
        tracing::info!(
            pct,
            bytes_dirty = period.bytes_dirty,
            bytes_transferred = period.bytes_transferred,
            "auto-converge: throttling the vCPUs"
        );
        self.m
            .vcpus
            .set_throttle(pct)
            .map_err(|source| SourceError::Machine {
                op: "throttling the vCPUs (auto-converge)",
                source,
            })?;
        self.stats.set_cpu_throttle_percentage(pct);
        Ok(())
    }

    /// QEMU 9.2+'s periodic sync (`cpu_throttle_dirty_sync_timer_tick`): with auto-converge,
    /// once the first pass is over and until the switchover rule arms, a pass that has gone
    /// [`SourceOptions::throttle_sync_every`](super::SourceOptions) without a sync gets one, so
    /// a slow link (passes of many seconds) still feeds the policy.
    pub(super) fn periodic_sync_due(&self, now: Instant) -> bool {
        if self.auto_converge.is_none() || self.rule.armed() {
            return false;
        }
        let Some(ram) = self.ram.as_ref() else {
            return false;
        };
        ram.dirty_sync_count >= 2
            && ram
                .last_sync()
                .is_some_and(|t| now.saturating_duration_since(t) >= self.opts.throttle_sync_every)
    }

    /// Every end (completed, failed, cancelled, unconfirmed): the vCPUs run at full speed
    /// again, or stay paused without a throttle waiting for them.
    pub(super) fn remove_throttle(&mut self) {
        let Some(ac) = self.auto_converge.as_mut() else {
            return;
        };
        ac.policy.reset();
        if let Err(e) = self.m.vcpus.set_throttle(0) {
            tracing::error!(error = %error_chain(&e), "auto-converge: cannot remove the throttle");
        }
        self.stats.set_cpu_throttle_percentage(0);
    }
}
