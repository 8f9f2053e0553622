//! Migration commands, QEMU's names and semantics: capabilities, parameters, `migrate`,
//! `migrate-incoming`, `query-migrate`, `migrate_cancel`, `migrate-continue`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use serde::Deserialize;
use serde_json::{json, Map, Value};
use tern_migration::params::{check_not_running, Capabilities, Capability, Parameters};
use tern_migration::source::{
    recovery, Handover, SourceError, SourceHandle, SourceOptions, Target, Tuning,
};
use tern_migration::stats::{MigrationStats, Role};
use tern_migration::status::MigrationStatus;
use tern_migration::transport::tls_stream::{ClientTls, ServerTls};
use tern_migration::transport::MigrationUri;
use tern_qmp::{no_args, parse_args, QmpError};

use super::migration_address::{self, Direction, MigrationChannel};
use super::{Controller, RunState};
use crate::migrate::events::QmpMigrationEvents;
use crate::migrate::incoming::Incoming;
use crate::migrate::machine_for_source;
use crate::migrate::stall::StallFeed;

/// Migration state of one process (either direction).
#[derive(Default)]
pub(crate) struct MigrationCtl {
    pub(crate) caps: Capabilities,
    pub(crate) params: Parameters,
    /// The current or last outgoing migration.
    pub(crate) outgoing: Option<SourceHandle>,
    /// The incoming migration (at most one per process, like QEMU).
    pub(crate) incoming: Option<Incoming>,
    /// Whether the last outgoing migration went to a file (a snapshot: the source may `cont`).
    pub(crate) last_to_file: bool,
    /// An outgoing migration handed the guest over without learning where it runs
    /// (`x-tern-unconfirmed`, or a destination that stays paused), and no later migration
    /// decided it (one that failed before END leaves this as it was).
    pub(crate) undecided: bool,
    /// The objects (`tls-creds`, `tls-authz`) the latest migration uses: `object-del` refuses
    /// them while it runs.
    pub(crate) tls_objects: Vec<String>,
}

impl MigrationCtl {
    /// Status of the migration `query-migrate` reports.
    pub(crate) fn status(&self) -> MigrationStatus {
        if let Some(o) = &self.outgoing {
            return o.status();
        }
        if let Some(i) = &self.incoming {
            return i.stats().status();
        }
        MigrationStatus::None
    }
}

const TLS_NEEDS_SOCKET: &str =
    "tls-creds is set, but a file: migration cannot use TLS (it needs tcp: or unix:); clear \
     tls-creds for a file";

fn param_err(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateArgs {
    uri: Option<String>,
    channels: Option<Vec<MigrationChannel>>,
    /// QEMU accepts and ignores `detach` (always detached).
    #[serde(default)]
    #[allow(dead_code)]
    detach: Option<bool>,
    #[serde(default)]
    resume: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IncomingArgs {
    uri: Option<String>,
    channels: Option<Vec<MigrationChannel>>,
    #[serde(default, rename = "exit-on-error")]
    exit_on_error: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecoverArgs {
    uri: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContinueArgs {
    state: MigrationStatus,
}

impl Controller {
    pub(crate) fn mig(&self) -> MutexGuard<'_, MigrationCtl> {
        self.migration.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn query_migrate_capabilities(
        &self,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        no_args(&args)?;
        Ok(self.mig().caps.to_query_json())
    }

    pub(super) fn query_migrate_parameters(
        &self,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        no_args(&args)?;
        Ok(self.mig().params.to_query_json())
    }

    pub(super) fn migrate_set_capabilities(
        &self,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let mut m = self.mig();
        check_not_running(m.status()).map_err(param_err)?;
        if m.incoming.as_ref().is_some_and(|i| !i.finished()) {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        let params = m.params.clone();
        m.caps
            .apply_json(&Value::Object(args), &params)
            .map_err(param_err)?;
        Ok(json!({}))
    }

    pub(super) fn migrate_set_parameters(
        &self,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let mut m = self.mig();
        let caps = m.caps.clone();
        m.params
            .apply_json(&Value::Object(args), &caps)
            .map_err(param_err)?;
        // QEMU applies bandwidth and downtime changes to a running migration at once.
        let tuning = Tuning::from_params(&m.params);
        if let Some(o) = &m.outgoing {
            if o.status().is_running() {
                o.set_tuning(tuning);
            }
        }
        Ok(json!({}))
    }

    pub(super) fn migrate(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let a: MigrateArgs = parse_args(args)?;
        if a.resume == Some(true) {
            // Post-copy recovery (QEMU `migrate_prepare` with resume): only a paused
            // post-copy migration; the new channel runs with the TLS it started with.
            let uri = migration_address::resolve(a.uri, a.channels, Direction::Outgoing)?;
            let m = self.mig();
            let o = m
                .outgoing
                .as_ref()
                .ok_or_else(|| QmpError::generic(recovery::RESUME_NOT_PAUSED))?;
            o.resume(uri).map_err(QmpError::generic)?;
            return Ok(json!({}));
        }
        let uri = migration_address::resolve(a.uri, a.channels, Direction::Outgoing)?;
        let mut m = self.mig();
        // QEMU's migrate_prepare order: an outgoing migration in progress, then a guest that
        // is still (or was, and failed) waiting for an incoming one: sending the empty VM of a
        // destination would hand a guest that does not exist to the next one.
        if let Some(o) = &m.outgoing {
            check_not_running(o.status()).map_err(param_err)?;
            // The guest runs on the destination (it said `RESUMED`): this copy is stale, and
            // shipping it would hand a second copy to a third host (QEMU refuses every
            // `postmigrate` source with this text; Tern still lets an undecided one go on).
            if !m.last_to_file && o.handover() == Handover::DestinationRuns {
                return Err(QmpError::generic(
                    "Can't migrate the vm that was paused due to previous migration",
                ));
            }
        }
        if let Some(st) = m.incoming.as_ref().map(|i| i.stats().status()) {
            if st.is_terminal() && st != MigrationStatus::Completed {
                return Err(QmpError::generic(format!(
                    "The incoming migration ended {st}: this VM holds no complete guest to migrate",
                )));
            }
        }
        // A `dirty-bitmap` measurement owns the dirty log until it ends (decision 87).
        self.dirty_log_busy()?;
        let state = self.run_state();
        if state == RunState::InMigrate {
            return Err(QmpError::generic(
                "Guest is waiting for an incoming migration",
            ));
        }
        if uri.is_file()
            && (m.caps.get(Capability::ReturnPath) || m.caps.get(Capability::SwitchoverAck))
        {
            return Err(QmpError::generic(
                "Capability 'return-path' needs a socket: it cannot be used with a file: URI",
            ));
        }
        let tls = self.source_tls(&m.params, &uri)?;
        let to_file = uri.is_file();
        let mut opts = SourceOptions::from_qemu(&m.caps, &m.params);
        opts.x_test_hold_before_postcopy_stop =
            crate::migrate::fault::hold_at("postcopy-before-stop");
        m.tls_objects = tls.iter().map(|_| m.params.tls_creds.clone()).collect();
        opts.tls = tls;
        // A guest that an earlier migration stopped, and that nobody has run since because that
        // migration stayed undecided (unconfirmed, or a destination that stays paused), was
        // running: the next destination runs it. (Not after a file snapshot, a completion
        // without a return path, or a destination that runs it: there it travels paused.)
        if let Some(o) = &m.outgoing {
            match o.handover() {
                Handover::Unconfirmed | Handover::DestinationPaused => m.undecided = true,
                // Failed or cancelled before END: the earlier verdict still stands.
                Handover::NotHandedOver => {}
                Handover::DestinationRuns | Handover::NoReturnPath => m.undecided = false,
            }
        }
        opts.stopped_by_earlier_migration = state == RunState::PostMigrate
            && self.stopped_by_migration.load(Ordering::SeqCst)
            && !m.last_to_file
            && m.undecided;
        let stats = MigrationStats::new(Role::Source);
        let events = Arc::new(QmpMigrationEvents::source(
            self.weak(),
            m.caps.get(Capability::Events),
            StallFeed::start(self.vm.clone(), stats.clone()),
        ));
        let machine = machine_for_source(&self.vm, &self.devices);
        let handle =
            tern_migration::source::migrate(machine, Target::Uri(uri), opts, events, stats)
                .map_err(param_err)?;
        m.outgoing = Some(handle);
        m.last_to_file = to_file;
        Ok(json!({}))
    }

    pub(super) fn migrate_incoming(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let a: IncomingArgs = parse_args(args)?;
        let exit_on_error = a.exit_on_error.unwrap_or(true);
        self.start_incoming_at(
            || migration_address::resolve(a.uri, a.channels, Direction::Incoming),
            exit_on_error,
        )?;
        Ok(json!({}))
    }

    /// Starts listening for an incoming migration at `uri` (`--incoming URI` on the command
    /// line, which implies `exit_on_error`, as QEMU's `-incoming`).
    pub fn start_incoming(&self, uri: &str, exit_on_error: bool) -> Result<(), QmpError> {
        self.start_incoming_at(|| uri.parse().map_err(param_err), exit_on_error)
    }

    /// Starts listening at the address `address` gives (read after the state checks, as QEMU).
    /// With `exit_on_error` a failed incoming migration ends the process with a non-zero status
    /// and the error on stderr; without, it stays in `inmigrate` with the error in
    /// `query-migrate` and refuses `cont`.
    fn start_incoming_at(
        &self,
        address: impl FnOnce() -> Result<MigrationUri, QmpError>,
        exit_on_error: bool,
    ) -> Result<(), QmpError> {
        if self.run_state() != super::RunState::InMigrate {
            return Err(QmpError::generic(
                "'-incoming' was not specified on the command line",
            ));
        }
        let uri = address()?;
        let mut m = self.mig();
        if m.incoming.is_some() {
            return Err(QmpError::generic(
                "The incoming migration has already been started",
            ));
        }
        let (caps, params) = (m.caps.clone(), m.params.clone());
        let tls = self.destination_tls(&params, &uri)?;
        m.tls_objects = match tls {
            Some(_) => [&params.tls_creds, &params.tls_authz]
                .into_iter()
                .filter(|id| !id.is_empty())
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        let autostart = *self.autostart.lock().unwrap_or_else(|p| p.into_inner());
        let inc = Incoming::start(self, uri, &caps, &params, autostart, exit_on_error, tls)?;
        m.incoming = Some(inc);
        Ok(())
    }

    pub(super) fn query_migrate(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        no_args(&args)?;
        let m = self.mig();
        if let Some(o) = &m.outgoing {
            let stats = o.stats();
            // Live while the guest runs on this side; frozen at the stop and at the end.
            if matches!(
                stats.status(),
                MigrationStatus::Setup | MigrationStatus::Active
            ) {
                crate::migrate::stall::publish(&self.vm, stats);
            }
            return Ok(stats.to_query_migrate_json());
        }
        if let Some(i) = &m.incoming {
            return Ok(i.stats().to_query_migrate_json());
        }
        Ok(json!({}))
    }

    pub(super) fn migrate_cancel(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        no_args(&args)?;
        let m = self.mig();
        if let Some(o) = &m.outgoing {
            o.cancel();
        }
        // On the destination: the incoming migration ends `failed` ("incoming migration
        // cancelled"), then `exit-on-error` applies.
        if let Some(i) = &m.incoming {
            if !i.cancel() {
                return Err(QmpError::generic(
                    "The incoming migration has loaded the whole guest and is handing it over; \
                     it can no longer be cancelled (see query-migrate and query-status)",
                ));
            }
        }
        Ok(json!({}))
    }

    /// QEMU's `migrate-start-postcopy` (`qmp_migrate_start_postcopy`): refused without the
    /// `postcopy-ram` capability, or when no migration was ever started; otherwise the
    /// running migration switches to post-copy at the next round in which the device state
    /// fits (a migration that already ended ignores it, as QEMU does).
    pub(super) fn migrate_start_postcopy(
        &self,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        no_args(&args)?;
        let m = self.mig();
        if !m.caps.get(Capability::PostcopyRam) {
            return Err(QmpError::generic(
                SourceError::PostcopyNotEnabled.to_string(),
            ));
        }
        let o = m
            .outgoing
            .as_ref()
            .ok_or_else(|| QmpError::generic(SourceError::PostcopyNotRunning.to_string()))?;
        match o.start_postcopy() {
            Ok(()) | Err(SourceError::PostcopyNotRunning) => Ok(json!({})),
            Err(e) => Err(QmpError::generic(e.to_string())),
        }
    }

    /// QEMU's `migrate-pause`: in `postcopy-active` or `postcopy-recover` (source first,
    /// then destination, as QEMU), shut the channel down: both sides go `postcopy-paused`.
    pub(super) fn migrate_pause(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        no_args(&args)?;
        let m = self.mig();
        let pausable = |st: MigrationStatus| {
            matches!(
                st,
                MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover
            )
        };
        if let Some(o) = m.outgoing.as_ref().filter(|o| pausable(o.status())) {
            o.pause().map_err(QmpError::generic)?;
            return Ok(json!({}));
        }
        if let Some(i) = &m.incoming {
            i.pause()?;
            return Ok(json!({}));
        }
        Err(QmpError::generic(recovery::PAUSE_NOT_POSTCOPY))
    }

    /// QEMU's `migrate-recover {uri}` on the destination: in `postcopy-paused`, listen at
    /// `uri` for the source's recovery channel.
    pub(super) fn migrate_recover(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let a: RecoverArgs = parse_args(args)?;
        let m = self.mig();
        let i = m
            .incoming
            .as_ref()
            .ok_or_else(|| QmpError::generic(tern_migration::dest::RECOVER_NOT_PAUSED))?;
        let uri: MigrationUri = a.uri.parse().map_err(param_err)?;
        if uri.is_file() {
            return Err(QmpError::generic(
                "migrate-recover needs a socket: a file cannot carry a recovery channel",
            ));
        }
        i.recover(&uri)?;
        Ok(json!({}))
    }

    pub(super) fn migrate_continue(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let a: ContinueArgs = parse_args(args)?;
        let m = self.mig();
        let o = m.outgoing.as_ref().ok_or_else(|| {
            QmpError::generic(format!(
                "Migration not in expected state: {}",
                MigrationStatus::None.as_str()
            ))
        })?;
        if a.state != MigrationStatus::PreSwitchover || o.status() != MigrationStatus::PreSwitchover
        {
            return Err(QmpError::generic(format!(
                "Migration not in expected state: {}",
                o.status().as_str()
            )));
        }
        o.continue_switchover().map_err(param_err)?;
        Ok(json!({}))
    }

    /// The source's TLS (`tls-creds` set): the object must be client credentials; the host
    /// name checked is `tls-hostname`, else the URI's host (none for `unix:`, as QEMU).
    fn source_tls(
        &self,
        params: &Parameters,
        uri: &MigrationUri,
    ) -> Result<Option<ClientTls>, QmpError> {
        if params.tls_creds.is_empty() {
            return Ok(None);
        }
        if uri.is_file() {
            return Err(QmpError::generic(TLS_NEEDS_SOCKET));
        }
        let host = match (params.tls_hostname.as_str(), uri) {
            ("", MigrationUri::Tcp { host, .. }) => Some(host.as_str()),
            ("", _) => None,
            (h, _) => Some(h),
        };
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .client_tls(&params.tls_creds, host)
            .map(Some)
    }

    /// The destination's TLS (`tls-creds` set): server credentials, and `tls-authz` when set.
    fn destination_tls(
        &self,
        params: &Parameters,
        uri: &MigrationUri,
    ) -> Result<Option<ServerTls>, QmpError> {
        if params.tls_creds.is_empty() {
            return Ok(None);
        }
        if uri.is_file() {
            return Err(QmpError::generic(TLS_NEEDS_SOCKET));
        }
        self.objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .server_tls(&params.tls_creds, &params.tls_authz)
            .map(Some)
    }

    /// The objects the migration in progress uses (none when none runs).
    pub(crate) fn tls_objects_in_use(&self) -> Vec<String> {
        if self.migration_active() {
            self.mig().tls_objects.clone()
        } else {
            Vec::new()
        }
    }

    /// Whether a migration (either direction) is in progress.
    pub(crate) fn migration_active(&self) -> bool {
        let m = self.mig();
        m.status().is_running() || m.incoming.as_ref().is_some_and(|i| !i.finished())
    }

    /// Cancels any migration before the process exits.
    pub fn shutdown_migration(&self) {
        self.dirty_rate.stop();
        let mut m = self.mig();
        if let Some(o) = m.outgoing.take() {
            o.cancel();
            drop(m);
            let _ = o.join();
            m = self.mig();
        }
        if let Some(i) = m.incoming.take() {
            drop(m);
            i.cancel_and_join();
        }
    }
}
