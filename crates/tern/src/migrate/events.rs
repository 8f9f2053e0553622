//! Engine events → QMP: `MIGRATION` / `MIGRATION_PASS` (only with the `events` capability, as
//! QEMU), `STOP` / `RESUME` (always), and the run state `query-status` reports.

use std::sync::Weak;

use serde_json::json;
use tern_migration::events::EventSink;
use tern_migration::status::MigrationStatus;

use crate::control::{Controller, RunState};

/// Which end of the migration this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// Forwards one migration's events to the QMP clients.
pub struct QmpMigrationEvents {
    ctl: Weak<Controller>,
    side: Side,
    events_cap: bool,
}

impl QmpMigrationEvents {
    pub fn source(ctl: Weak<Controller>, events_cap: bool) -> Self {
        Self {
            ctl,
            side: Side::Source,
            events_cap,
        }
    }

    pub fn destination(ctl: Weak<Controller>, events_cap: bool) -> Self {
        Self {
            ctl,
            side: Side::Destination,
            events_cap,
        }
    }
}

impl EventSink for QmpMigrationEvents {
    fn migration_status(&self, status: MigrationStatus) {
        let Some(ctl) = self.ctl.upgrade() else {
            return;
        };
        match (self.side, status) {
            // The source's VM stays stopped after a successful migration: the destination owns
            // the guest now (QEMU's `postmigrate`).
            (Side::Source, MigrationStatus::Completed) => ctl.set_run_state(RunState::PostMigrate),
            (Side::Destination, MigrationStatus::Completed)
                if ctl.run_state() == RunState::InMigrate =>
            {
                ctl.set_run_state(RunState::Paused);
            }
            _ => {}
        }
        if self.events_cap {
            ctl.events
                .emit("MIGRATION", Some(json!({ "status": status.as_str() })));
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
        if let Some(ctl) = self.ctl.upgrade() {
            ctl.set_run_state(RunState::FinishMigrate);
            ctl.events.emit("STOP", None);
        }
    }

    fn vm_resumed(&self) {
        if let Some(ctl) = self.ctl.upgrade() {
            ctl.set_run_state(RunState::Running);
            ctl.events.emit("RESUME", None);
        }
    }
}
