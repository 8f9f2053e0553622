//! How long each post-copy recovery took on the source, and how many pages it sent again
//! (`x-tern-postcopy-recovery` in `query-migrate`, `docs/qmp.md`): the clock runs from the
//! moment the sender takes `migrate {"resume": true}` to `RESUME_ACK` (`postcopy-active`
//! again), split at the connection (`postcopy-recover`) and at the last received bitmap.

use std::time::{Duration, Instant};

use super::Sender;
use crate::stats::Recovery;
use crate::status::MigrationStatus;

/// The attempt in progress.
#[derive(Debug, Default)]
pub(super) struct RecoveryClock {
    started: Option<Instant>,
    connected: Option<Instant>,
    bitmaps: Option<Instant>,
    missing_pages: u64,
    resent_pages: u64,
    /// The last attempt failed in this phase (for the next `error-desc`).
    failed_in: Option<&'static str>,
}

impl RecoveryClock {
    fn since(a: Option<Instant>, b: Option<Instant>) -> Duration {
        match (a, b) {
            (Some(a), Some(b)) => b.saturating_duration_since(a),
            _ => Duration::ZERO,
        }
    }
}

impl Sender {
    /// `" while …"` when the pause being entered ends a failed recovery attempt (said once).
    pub(super) fn recovery_failure_phase(&mut self) -> &'static str {
        self.recovery_clock.failed_in.take().unwrap_or("")
    }

    /// `migrate {"resume": true}` taken: a recovery attempt starts.
    pub(super) fn recovery_started(&mut self) {
        self.recovery_clock = RecoveryClock {
            started: Some(Instant::now()),
            ..RecoveryClock::default()
        };
    }

    /// The recovery channel is connected (TLS included).
    pub(super) fn recovery_connected(&mut self) {
        self.recovery_clock.connected = Some(Instant::now());
    }

    /// Every bitmap arrived: the destination lacks `missing` pages, `resent` of which this
    /// source had sent on a broken channel.
    pub(super) fn recovery_bitmaps(&mut self, missing: u64, resent: u64) {
        let c = &mut self.recovery_clock;
        c.bitmaps = Some(Instant::now());
        c.missing_pages = missing;
        c.resent_pages = resent;
    }

    /// `RESUME_ACK`: the recovery completed.
    pub(super) fn recovery_completed(&mut self) {
        let c = std::mem::take(&mut self.recovery_clock);
        let now = Some(Instant::now());
        let r = Recovery {
            total: RecoveryClock::since(c.started, now),
            connect: RecoveryClock::since(c.started, c.connected),
            bitmaps: RecoveryClock::since(c.connected, c.bitmaps),
            missing_pages: c.missing_pages,
            resent_pages: c.resent_pages,
        };
        tracing::info!(recovery = ?r, "post-copy recovery took");
        self.stats.update_postcopy_recovery(|s| s.completed(r));
    }

    /// The attempt went back to `postcopy-paused`; `status` is where it was.
    pub(super) fn recovery_failed(&mut self, status: MigrationStatus) {
        self.recovery_clock = RecoveryClock {
            failed_in: Some(match status {
                MigrationStatus::PostcopyRecoverSetup => " while connecting the recovery channel",
                _ => " during the recovery handshake (before RESUME_ACK)",
            }),
            ..RecoveryClock::default()
        };
        self.stats
            .update_postcopy_recovery(|s| s.failed_attempts += 1);
    }
}
