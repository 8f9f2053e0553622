//! The destination side of a migration in a `tern run --incoming` process.

use std::sync::Arc;

use tern_migration::dest::{self, DestHandle, DestOptions};
use tern_migration::liveness::LivenessTimeout;
use tern_migration::params::{Capabilities, Capability, Parameters};
use tern_migration::stats::{MigrationStats, Role};
use tern_migration::transport::{Listener, MigrationUri};
use tern_qmp::QmpError;

use super::events::QmpMigrationEvents;
use super::machine_for_destination;
use crate::control::Controller;

/// An incoming migration: bound listener (so `query-migrate` reports the real port) and the
/// receiver thread.
pub struct Incoming {
    handle: DestHandle,
}

impl Incoming {
    /// Binds `uri` and starts the receiver thread.
    pub fn start(
        ctl: &Controller,
        uri: MigrationUri,
        caps: &Capabilities,
        params: &Parameters,
        autostart: bool,
    ) -> Result<Self, QmpError> {
        let listener = Listener::bind(&uri).map_err(|e| QmpError::generic(format!("{e}")))?;
        let mut opts = DestOptions::from_qemu(caps, autostart);
        opts.liveness = LivenessTimeout::from_millis(params.x_tern_liveness_timeout);
        let events = Arc::new(QmpMigrationEvents::destination(
            ctl.weak(),
            caps.get(Capability::Events),
        ));
        let machine = machine_for_destination(&ctl.vm, &ctl.devices);
        let handle = dest::incoming(
            machine,
            dest::Incoming::Listener(listener),
            opts,
            events,
            MigrationStats::new(Role::Destination),
        )
        .map_err(|e| QmpError::generic(e.to_string()))?;
        Ok(Self { handle })
    }

    pub fn stats(&self) -> &MigrationStats {
        self.handle.stats()
    }

    pub fn finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Cancels a receive in progress and waits for the thread.
    pub fn cancel_and_join(self) {
        self.handle.cancel();
        let _ = self.handle.join();
    }
}
