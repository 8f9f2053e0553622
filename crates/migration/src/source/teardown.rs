//! The end of a migration on the source: the common cleanup, the final statistics, and a
//! failure's handling (split out of `flow.rs`).

use std::time::{Duration, Instant};

use super::flow::CANCELLED_DESC;
use super::*;

impl Sender {
    /// Common end: dirty log off, devices cleaned up, sockets closed, return path joined.
    pub(super) fn cleanup(&mut self) {
        self.stop_dirty_log();
        for dev in &mut self.m.devices {
            dev.save_cleanup();
        }
        // Shut the sockets down before dropping the writer: its drop flushes, which must not
        // block on a destination that stopped reading.
        self.shared.io.cancel();
        self.writer = None;
        self.multifd = None;
        if let Some(t) = self.rp_thread.take() {
            let _ = t.join();
        }
    }

    pub(super) fn complete_stats(&self) {
        let s = self.stats.snapshot();
        let ms = s.total_time_ms.saturating_sub(s.setup_time_ms);
        if ms > 0 {
            let mbps = s.ram.transferred as f64 * 8.0 / ms as f64 / 1000.0;
            self.stats.update(|r, _| r.mbps = mbps);
        }
    }

    /// A write failed (the destination closed or reset the channel): its reason may still be
    /// on its way up the return path, behind the failure we saw first. Wait a bounded moment
    /// for it (or for the return path to end) before the sockets are aborted, so
    /// `error-desc` names what the destination refused rather than `Broken pipe`.
    pub(super) fn await_destination_reason(&self) {
        const GRACE: Duration = Duration::from_millis(500);
        let deadline = Instant::now() + GRACE;
        let mut f = self.shared.lock();
        while f.return_path
            && f.dest_error.is_none()
            && f.rp_fault.is_none()
            && !f.rp_closed
            && f.shut_at.is_none()
        {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            f = self
                .shared
                .cv
                .wait_timeout(f, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Failure or cancel: undo everything, say why. Returns (status, error-desc).
    ///
    /// The guest runs again first and the cleanup follows (QEMU restarts the VM in
    /// `migration_iteration_finish`, before its cleanup): turning dirty logging off
    /// re-registers every memslot and joining the return-path thread waits for the socket, none
    /// of which needs the vCPUs stopped. The status turns final only after the cleanup, so a
    /// new `migrate` cannot race with it.
    pub(super) fn fail(&mut self, e: SourceError) -> (MigrationStatus, Option<String>) {
        // After END the destination may be running: the source stays paused (not resumed, no
        // `cancelled`), whatever else happened.
        // After POSTCOPY_RUN the destination may run the guest: never resume it here.
        let postcopy_ran = self.shared.lock().postcopy_run_sent;
        let e = match e {
            e if postcopy_ran => SourceError::AfterPostcopySwitch {
                pages: self.ram.as_ref().map_or(0, |r| r.remaining_pages()),
                source: Box::new(e),
            },
            e => e,
        };
        let unconfirmed = postcopy_ran || matches!(e, SourceError::Unconfirmed { .. });
        let cancelled =
            !unconfirmed && (matches!(e, SourceError::Cancelled) || self.shared.lock().cancel);
        if cancelled {
            self.set_status(MigrationStatus::Cancelling);
        }
        if self.paused_by_us && !unconfirmed {
            match self.m.vcpus.resume() {
                Ok(()) => {
                    self.paused_by_us = false;
                    self.events.vm_resumed();
                }
                Err(re) => tracing::error!(error = %error_chain(&re), "cannot resume the source"),
            }
        }
        if !unconfirmed {
            self.stats.downtime_abort();
        }
        if matches!(e, SourceError::Wire(_) | SourceError::Multifd(_)) && !cancelled {
            self.await_destination_reason();
        }
        // Aborting the sockets lets the return-path thread drain what the destination said.
        self.cleanup();
        let f = self.shared.lock();
        let desc = if unconfirmed {
            error_chain(&e)
        } else if cancelled {
            CANCELLED_DESC.to_owned()
        } else if let Some(d) = &f.dest_error {
            format!("destination failed: {d}")
        } else if let (SourceError::Wire(_), Some(r)) = (&e, &f.rp_fault) {
            r.clone()
        } else {
            error_chain(&e)
        };
        drop(f);
        tracing::warn!(error = %desc, "outgoing migration did not complete");
        self.stats.set_error(desc.clone());
        let status = if postcopy_ran {
            MigrationStatus::Failed
        } else if unconfirmed {
            MigrationStatus::Unconfirmed
        } else if cancelled {
            MigrationStatus::Cancelled
        } else {
            MigrationStatus::Failed
        };
        (status, Some(desc))
    }
}
