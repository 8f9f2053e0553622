//! The destination side of a migration in a `tern run --incoming` process.

use std::sync::Arc;

use tern_migration::dest::{self, DestHandle, DestOptions};
use tern_migration::liveness::LivenessTimeout;
use tern_migration::params::{Capabilities, Capability, Parameters};
use tern_migration::stats::{MigrationStats, Role};
use tern_migration::status::MigrationStatus;
use tern_migration::transport::tls_stream::ServerTls;
use tern_migration::transport::{Listener, MigrationUri};
use tern_qmp::QmpError;

use super::events::QmpMigrationEvents;
use super::machine_for_destination;
use super::postcopy::PagerSlot;
use crate::control::Controller;

/// An incoming migration: bound listener (so `query-migrate` reports the real port) and the
/// receiver thread.
pub struct Incoming {
    handle: DestHandle,
    /// The post-copy pager, kept after the engine ends (see [`PagerSlot::teardown`]).
    pager: PagerSlot,
    vm: Arc<tern_vmm::Vm>,
}

impl Incoming {
    /// Binds `uri` and starts the receiver thread. With `exit_on_error` (QEMU's default) a
    /// failed incoming migration ends the process with a non-zero status.
    pub fn start(
        ctl: &Controller,
        uri: MigrationUri,
        caps: &Capabilities,
        params: &Parameters,
        autostart: bool,
        exit_on_error: bool,
        tls: Option<ServerTls>,
    ) -> Result<Self, QmpError> {
        let listener = Listener::bind(&uri).map_err(|e| QmpError::generic(format!("{e}")))?;
        let mut opts = DestOptions::from_qemu(caps, autostart);
        opts.liveness = LivenessTimeout::from_millis(params.x_tern_liveness_timeout);
        opts.tls = tls;
        opts.multifd_channels = caps
            .get(Capability::Multifd)
            .then_some(u16::from(params.multifd_channels));
        // `qpl` / `uadk` / `qatzip` never get here with multifd on (the parameters refuse them).
        opts.multifd_compression = params
            .multifd_compression
            .wire()
            .unwrap_or(tern_migration::wire::Compression::None);
        let stats = MigrationStats::new(Role::Destination);
        let events = Arc::new(QmpMigrationEvents::destination(
            ctl.weak(),
            caps.get(Capability::Events),
            exit_on_error.then(|| stats.clone()),
        ));
        let pager = PagerSlot::default();
        let machine = machine_for_destination(&ctl.vm, &ctl.devices, &pager);
        let handle = dest::incoming(
            machine,
            dest::Incoming::Listener(listener),
            opts,
            events,
            stats,
        )
        .map_err(|e| QmpError::generic(e.to_string()))?;
        Ok(Self {
            handle,
            pager,
            vm: ctl.vm.clone(),
        })
    }

    pub fn stats(&self) -> &MigrationStats {
        self.handle.stats()
    }

    pub fn finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// The incoming migration failed (cancelled included): this process holds no guest.
    pub fn failed(&self) -> bool {
        self.handle.status() == MigrationStatus::Failed
    }

    /// Post-copy lacks pages here, for good (failed after the guest started) or until a
    /// recovery (`postcopy-paused`, `postcopy-recover`): the vCPUs that touch a missing page
    /// stay blocked (decisions 94, 111). Nothing may pause, reset or resume the guest then.
    pub fn postcopy_pages_missing(&self) -> bool {
        let waiting = matches!(
            self.handle.status(),
            MigrationStatus::PostcopyPaused | MigrationStatus::PostcopyRecover
        );
        (self.failed() || waiting) && self.pager.is_active()
    }

    /// `migrate-pause` on the destination.
    pub fn pause(&self) -> Result<(), QmpError> {
        self.handle.pause().map_err(QmpError::generic)
    }

    /// `migrate-recover`: binds `uri` (a bad address fails the command) and hands the
    /// listener to the paused receiver.
    pub fn recover(&self, uri: &MigrationUri) -> Result<(), QmpError> {
        if self.handle.status() != MigrationStatus::PostcopyPaused {
            return Err(QmpError::generic(dest::RECOVER_NOT_PAUSED));
        }
        let listener = Listener::bind(uri).map_err(|e| QmpError::generic(format!("{e}")))?;
        self.handle.recover(listener).map_err(QmpError::generic)
    }

    /// `migrate_cancel` on the destination: the migration ends `failed` ("incoming migration
    /// cancelled"); a no-op once it ended; false (nothing done) once the guest was loaded.
    pub fn cancel(&self) -> bool {
        self.handle.cancel()
    }

    /// `stop` / `cont` during `inmigrate`: whether the guest runs once loaded. False when the
    /// guest was already loaded and that was decided.
    pub fn set_autostart(&self, on: bool) -> bool {
        self.handle.set_autostart(on)
    }

    /// Cancels a receive in progress and waits for the thread; a post-copy pager still
    /// running (the source was lost with pages missing) is torn down first, in the order that
    /// lets the blocked vCPUs go (the caller then shuts the VM down).
    pub fn cancel_and_join(self) {
        // Also a post-copy migration that runs or waits for a recovery (its guest's
        // missing pages are lost with this process anyway).
        self.handle.abandon();
        let _ = self.handle.join();
        self.pager.teardown(&self.vm);
    }
}
