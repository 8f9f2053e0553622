//! Engine events → QMP: `MIGRATION` / `MIGRATION_PASS` (only with the `events` capability, as
//! QEMU), `STOP` / `RESUME` (always), the run state `query-status` reports, and the end of the
//! process after a failed incoming migration with `exit-on-error`.

use std::sync::atomic::Ordering;
use std::sync::Weak;

use serde_json::json;
use tern_migration::events::EventSink;
use tern_migration::stats::MigrationStats;
use tern_migration::status::MigrationStatus;

use crate::control::{Controller, ExitRequest, RunState};
use crate::migrate::stall::StallFeed;

/// Which end of the migration this process is.
#[derive(Clone)]
enum Side {
    /// The source; the vCPU stall meter goes into the stats at the stop and at the end.
    Source { stall: StallFeed },
    /// The destination; with `exit-on-error`, the stats to take the error from.
    Destination {
        exit_on_error: Option<MigrationStats>,
    },
}

/// Forwards one migration's events to the QMP clients.
pub struct QmpMigrationEvents {
    ctl: Weak<Controller>,
    side: Side,
    events_cap: bool,
}

impl QmpMigrationEvents {
    pub fn source(ctl: Weak<Controller>, events_cap: bool, stall: StallFeed) -> Self {
        Self {
            ctl,
            side: Side::Source { stall },
            events_cap,
        }
    }

    /// The destination's events. With `exit_on_error` (its stats), a failed incoming migration
    /// ends the process: the engine reports `failed` only after it sent `ERROR` + `SHUT{1}` on
    /// the return path and gave the source the time to read them.
    pub fn destination(
        ctl: Weak<Controller>,
        events_cap: bool,
        exit_on_error: Option<MigrationStats>,
    ) -> Self {
        Self {
            ctl,
            side: Side::Destination { exit_on_error },
            events_cap,
        }
    }
}

impl EventSink for QmpMigrationEvents {
    fn migration_status(&self, status: MigrationStatus) {
        let Some(ctl) = self.ctl.upgrade() else {
            return;
        };
        if let Side::Source { stall } = &self.side {
            if status.is_terminal() {
                stall.publish();
            }
        }
        match (&self.side, status) {
            // The source's VM stays stopped after a successful migration (QEMU's
            // `postmigrate`), and after an unconfirmed one: `cont` decides (see `cont`).
            (Side::Source { .. }, MigrationStatus::Completed | MigrationStatus::Unconfirmed) => {
                ctl.set_run_state(RunState::PostMigrate)
            }
            (Side::Destination { .. }, MigrationStatus::Completed)
                if ctl.run_state() == RunState::InMigrate =>
            {
                ctl.set_run_state(RunState::Paused);
            }
            // Post-copy lost its source after the guest started here: pages are missing and
            // the vCPUs that touch them stay blocked. Never shown as a healthy running guest.
            (Side::Destination { .. }, MigrationStatus::Failed)
                if ctl.run_state() == RunState::Running =>
            {
                ctl.set_run_state(RunState::InternalError);
            }
            // Failed after the post-copy switch: the source stayed paused (a failure before it
            // resumed the guest first), and the guest may run on the destination.
            (Side::Source { .. }, MigrationStatus::Failed)
                if ctl.run_state() == RunState::FinishMigrate =>
            {
                ctl.set_run_state(RunState::PostMigrate);
            }
            _ => {}
        }
        if self.events_cap {
            ctl.events
                .emit("MIGRATION", Some(json!({ "status": status.as_str() })));
        }
        if let (
            Side::Destination {
                exit_on_error: Some(stats),
            },
            MigrationStatus::Failed,
        ) = (&self.side, status)
        {
            let error = stats
                .snapshot()
                .error_desc
                .unwrap_or_else(|| "no reason given".into());
            ctl.request_exit(ExitRequest::IncomingFailed(error));
        }
    }

    fn migration_pass(&self, pass: u64) {
        if !self.events_cap {
            return;
        }
        if let Some(ctl) = self.ctl.upgrade() {
            ctl.events
                .emit("MIGRATION_PASS", Some(json!({ "pass": pass })));
        }
    }

    fn vm_stopped(&self) {
        if let Side::Source { stall } = &self.side {
            stall.publish();
        }
        if let Some(ctl) = self.ctl.upgrade() {
            ctl.stopped_by_migration.store(true, Ordering::SeqCst);
            ctl.set_run_state(RunState::FinishMigrate);
            ctl.events.emit("STOP", None);
        }
    }

    fn vm_resumed(&self) {
        if let Some(ctl) = self.ctl.upgrade() {
            ctl.stopped_by_migration.store(false, Ordering::SeqCst);
            ctl.set_run_state(RunState::Running);
            ctl.events.emit("RESUME", None);
        }
    }
}
