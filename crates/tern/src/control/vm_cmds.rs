//! Machine commands: run state, memory dump, and Tern's `x-tern-*` observability extensions.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::atomic::Ordering;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use tern_migration::source::Handover;
use tern_migration::status::MigrationStatus;
use tern_qmp::{no_args, parse_args, ClientCtx, QmpError};
use tern_vmm::VmStatus;

use super::{Controller, ExitRequest, RunState};

/// The QEMU release whose QMP surface Tern mirrors (tools gate features on it).
const QEMU_COMPAT: (u32, u32, u32) = (10, 0, 0);
/// Most heartbeat records one `x-tern-heartbeats` reply carries.
const MAX_HEARTBEAT_RECORDS: usize = 200_000;
/// Longest a blocking `x-tern-wait-heartbeat` may wait.
const MAX_WAIT_MS: u64 = 60_000;
/// Chunk size of `pmemsave`.
const PMEMSAVE_CHUNK: usize = 1 << 20;

fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

pub(super) fn query_version(args: Map<String, Value>) -> Result<Value, QmpError> {
    no_args(&args)?;
    let (major, minor, micro) = QEMU_COMPAT;
    Ok(json!({
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": format!("tern-{}", env!("CARGO_PKG_VERSION")),
    }))
}

pub(super) fn query_name(args: Map<String, Value>) -> Result<Value, QmpError> {
    no_args(&args)?;
    Ok(json!({}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PmemsaveArgs {
    val: u64,
    size: u64,
    filename: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SinceArgs {
    #[serde(default)]
    since: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirtyLogArgs {
    enable: bool,
}

impl Controller {
    /// The run state, folding in a vCPU failure the machine reported on its own.
    pub(crate) fn run_state(&self) -> RunState {
        let mut st = self.run_state.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(self.vm.status(), VmStatus::Failed(_)) && *st == RunState::Running {
            *st = RunState::InternalError;
        }
        *st
    }

    pub(crate) fn set_run_state(&self, new: RunState) {
        *self.run_state.lock().unwrap_or_else(|p| p.into_inner()) = new;
    }

    pub(super) fn query_status(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        no_args(&args)?;
        Ok(self.run_state().status_info())
    }

    pub(super) fn query_uuid(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        no_args(&args)?;
        Ok(json!({ "UUID": self.vm.config().uuid.to_string() }))
    }

    /// Pauses the vCPUs (and devices) and emits `STOP`, as QEMU's `stop`.
    pub(crate) fn stop_vm(&self, new_state: RunState) -> Result<(), QmpError> {
        self.machine().pause_all().map_err(generic)?;
        self.set_run_state(new_state);
        self.events.emit("STOP", None);
        Ok(())
    }

    /// Resumes the vCPUs and emits `RESUME`.
    pub(crate) fn resume_vm(&self) -> Result<(), QmpError> {
        self.machine().resume().map_err(generic)?;
        self.stopped_by_migration.store(false, Ordering::SeqCst);
        self.set_run_state(RunState::Running);
        self.events.emit("RESUME", None);
        Ok(())
    }

    /// Refuses what would pause a destination whose post-copy lost its source: its vCPUs
    /// wait in `KVM_RUN` for pages that never come and cannot be stopped (docs/postcopy.md).
    fn refuse_if_postcopy_lost(&self) -> Result<(), QmpError> {
        if self
            .mig()
            .incoming
            .as_ref()
            .is_some_and(|i| i.postcopy_pages_missing())
        {
            return Err(QmpError::generic(
                "Post-copy is missing guest pages on this destination (its source is lost, or \
                 the migration is paused until a recovery: see query-migrate); the guest \
                 cannot be stopped, reset or resumed now, only recovered or quit",
            ));
        }
        Ok(())
    }

    pub(super) fn stop(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        no_args(&args)?;
        self.refuse_if_postcopy_lost()?;
        match self.run_state() {
            RunState::Running => self.stop_vm(RunState::Paused)?,
            // QEMU: during an incoming migration `stop` means "stay paused when it completes".
            RunState::InMigrate => {
                *self.autostart.lock().unwrap_or_else(|p| p.into_inner()) = false;
                if let Some(i) = &self.mig().incoming {
                    i.set_autostart(false);
                }
            }
            _ => {}
        }
        Ok(json!({}))
    }

    pub(super) fn cont(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        no_args(&args)?;
        self.refuse_if_postcopy_lost()?;
        let state = self.run_state();
        // An outgoing migration that is switching over (or undoing itself) owns the vCPUs: a
        // `cont` then would run the source while its final state is on the way, or after END
        // beside a destination that runs it. So would a `cont` of a guest stopped by an
        // undecided earlier migration while a new migration carries it (`postmigrate`).
        let outgoing = self.mig().outgoing.as_ref().map(|o| o.status());
        if let Some(st) = outgoing {
            let switching = matches!(
                st,
                MigrationStatus::PreSwitchover
                    | MigrationStatus::Device
                    | MigrationStatus::PostcopyActive
                    | MigrationStatus::PostcopyPaused
                    | MigrationStatus::PostcopyRecoverSetup
                    | MigrationStatus::PostcopyRecover
                    | MigrationStatus::Cancelling
            );
            if state != RunState::Running
                && (switching || (st.is_running() && state == RunState::PostMigrate))
            {
                return Err(QmpError::generic(format!(
                    "A migration is in progress ({st}); the VM cannot be resumed now (wait for a \
                     final query-migrate status, or migrate_cancel it first)"
                )));
            }
        }
        match state {
            RunState::Running => Ok(json!({})),
            RunState::Prelaunch | RunState::Paused => {
                self.resume_vm()?;
                Ok(json!({}))
            }
            // A failed incoming migration left no guest here (`exit-on-error: false`).
            RunState::InMigrate if self.mig().incoming.as_ref().is_some_and(|i| i.failed()) => {
                Err(QmpError::generic(
                    "The incoming migration failed: this process holds no guest to run (see \
                     query-migrate; quit it and start a new destination)",
                ))
            }
            // QEMU: `cont` during an incoming migration sets autostart.
            RunState::InMigrate => {
                *self.autostart.lock().unwrap_or_else(|p| p.into_inner()) = true;
                if let Some(i) = &self.mig().incoming {
                    i.set_autostart(true);
                }
                Ok(json!({}))
            }
            // The switchover rule: `cont` is refused only when the destination said the guest
            // runs there (`RESUMED`). After a file snapshot, a completion without a return
            // path (QEMU allows `cont` in `postmigrate`), a destination that stays paused
            // (`-S`) or an unconfirmed switchover, the operator decides.
            RunState::PostMigrate => {
                let runs_elsewhere = {
                    let m = self.mig();
                    !m.last_to_file
                        && m.outgoing
                            .as_ref()
                            .is_some_and(|o| o.handover() == Handover::DestinationRuns)
                };
                if runs_elsewhere {
                    return Err(QmpError::generic(
                        "The VM was migrated to another host and runs there (the destination \
                         confirmed it resumed); refusing to run a second copy of it",
                    ));
                }
                self.resume_vm()?;
                Ok(json!({}))
            }
            RunState::FinishMigrate => Err(QmpError::generic(
                "Migration is completing; the VM cannot be resumed now (wait for a final \
                 query-migrate status: the wait for the destination is bounded by \
                 x-tern-resume-timeout)",
            )),
            RunState::InternalError => Err(QmpError::generic(
                "Resetting the Virtual Machine is required",
            )),
            RunState::Shutdown => Err(QmpError::generic("The VM is shutting down")),
        }
    }

    /// QMP `system_reset`: the machine restarts from its boot image (docs/machine.md "Reset").
    pub(super) fn system_reset(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        no_args(&args)?;
        self.reset_machine(false)?;
        Ok(json!({}))
    }

    /// Resets the machine (`guest`: the guest asked, through the i8042) and emits `RESET`.
    /// Refused while a migration owns the vCPUs or the machine waits for its incoming state.
    pub(crate) fn reset_machine(&self, guest: bool) -> Result<(), QmpError> {
        self.refuse_if_postcopy_lost()?;
        if let Some(st) = self.mig().outgoing.as_ref().map(|o| o.status()) {
            if st.is_running() {
                return Err(QmpError::generic(format!(
                    "A migration is in progress ({st}); reset the VM after it ends or migrate_cancel it"
                )));
            }
        }
        if matches!(self.run_state(), RunState::InMigrate) {
            return Err(QmpError::generic(
                "The VM waits for an incoming migration; there is nothing to reset yet",
            ));
        }
        self.vm.system_reset().map_err(generic)?;
        self.events.emit(
            "RESET",
            Some(json!({"guest": guest, "reason": if guest { "guest-reset" } else { "host-qmp-system-reset" }})),
        );
        Ok(())
    }

    /// QMP `system_powerdown`: QEMU presses the ACPI power button and the guest decides. Tern's
    /// machine has no ACPI event hardware (hardware-reduced FADT, no GED or PM1 block), so
    /// no guest can see the press: the request is acknowledged and `POWERDOWN` emitted, and the
    /// guest keeps running (`quit` stops the VM). docs/machine.md "Reset and power".
    pub(super) fn system_powerdown(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        no_args(&args)?;
        self.events.emit("POWERDOWN", None);
        Ok(json!({}))
    }

    pub(super) fn quit(
        &self,
        ctx: &ClientCtx,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        no_args(&args)?;
        let quit = self.quit_handle();
        ctx.after_reply(quit);
        Ok(json!({}))
    }

    fn quit_handle(&self) -> impl FnOnce() + Send + 'static {
        let me = self.weak();
        move || {
            if let Some(ctl) = me.upgrade() {
                ctl.request_exit(ExitRequest::Quit);
            }
        }
    }

    pub(super) fn pmemsave(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let a: PmemsaveArgs = parse_args(args)?;
        let end = a.val.checked_add(a.size);
        let ram_end = self.vm.ram().end_gpa();
        if end.is_none_or(|e| e > ram_end) {
            return Err(QmpError::generic(format!(
                "Invalid addr 0x{:x}/size {} specified",
                a.val, a.size
            )));
        }
        let file = File::create(&a.filename)
            .map_err(|e| QmpError::generic(format!("Could not open '{}': {e}", a.filename)))?;
        let mut out = BufWriter::new(file);
        let mut buf = vec![0u8; PMEMSAVE_CHUNK];
        let mut gpa = a.val;
        let mut left = a.size;
        while left > 0 {
            let n = left.min(PMEMSAVE_CHUNK as u64) as usize;
            self.vm.read_memory(gpa, &mut buf[..n]).map_err(generic)?;
            out.write_all(&buf[..n])
                .map_err(|e| QmpError::generic(format!("writing '{}': {e}", a.filename)))?;
            gpa += n as u64;
            left -= n as u64;
        }
        out.flush()
            .map_err(|e| QmpError::generic(format!("writing '{}': {e}", a.filename)))?;
        Ok(json!({}))
    }

    pub(super) fn heartbeats(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let a: SinceArgs = parse_args(args)?;
        let s = self.vm.heartbeats();
        let records: Vec<Value> = self
            .vm
            .heartbeats_since(a.since)
            .into_iter()
            .take(MAX_HEARTBEAT_RECORDS)
            .map(|h| json!([h.seq, h.realtime_ns]))
            .collect();
        Ok(json!({
            "count": s.count,
            "last-seq": s.last.map(|h| h.seq).unwrap_or(0),
            "last-ns": s.last.map(|h| h.realtime_ns).unwrap_or(0),
            "max-gap-ns": s.max_gap_ns,
            "max-gap-end-seq": s.max_gap_end_seq,
            "records": records,
        }))
    }

    /// Blocks until the VMM records a heartbeat with sequence number > `after` (or `timeout-ms`
    /// passes), and returns it: lets tools wait for the guest without polling.
    pub(super) fn wait_heartbeat(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        struct WaitArgs {
            after: u64,
            #[serde(default = "default_wait_ms")]
            timeout_ms: u64,
        }
        fn default_wait_ms() -> u64 {
            10_000
        }
        let a: WaitArgs = parse_args(args)?;
        let deadline = std::time::Instant::now()
            + std::time::Duration::from_millis(a.timeout_ms.min(MAX_WAIT_MS));
        loop {
            if let Some(h) = self.vm.heartbeats_since(a.after).first() {
                return Ok(json!({"seq": h.seq, "ns": h.realtime_ns}));
            }
            if std::time::Instant::now() >= deadline {
                return Err(QmpError::generic(format!(
                    "no heartbeat after {} within {} ms",
                    a.after, a.timeout_ms
                )));
            }
            let count = self.vm.heartbeats().count;
            self.vm.wait_heartbeats(count, deadline);
        }
    }

    pub(super) fn guest_stats(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        no_args(&args)?;
        let vcpus = self.vm.config().vcpus;
        let mut out = Vec::with_capacity(vcpus as usize);
        for i in 0..vcpus {
            match self.vm.guest_stats(i) {
                Ok(s) => out.push(json!({
                    "vcpu": i,
                    "state": format!("{:?}", s.state).to_lowercase(),
                    "workload": s.workload().map(|w| w.as_str()).unwrap_or("unknown"),
                    "work-base": s.work_base,
                    "work-len": s.work_len,
                    "pages-written": s.pages_written,
                    "passes": s.passes,
                    "heartbeat-seq": s.hb_seq,
                    "loops": s.loops,
                })),
                // Before the guest wrote its block, report that instead of failing.
                Err(e) => out.push(json!({"vcpu": i, "state": "unknown", "error": e.to_string()})),
            }
        }
        Ok(json!({ "vcpus": out }))
    }

    pub(super) fn serial(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct FromArgs {
            #[serde(default)]
            from: u64,
        }
        let a: FromArgs = parse_args(args)?;
        let lines: Vec<Value> = self
            .vm
            .serial_lines(a.from)
            .into_iter()
            .map(|l| json!({"index": l.index, "ns": l.realtime_ns, "text": l.text}))
            .collect();
        Ok(json!({ "lines": lines }))
    }

    /// `x-tern-statedev`: each extra device's digest and counters.
    pub(super) fn statedev(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        no_args(&args)?;
        let list: Vec<Value> = self
            .devices
            .iter()
            .map(|d| {
                let s = d.stats();
                json!({
                    "size": d.config().size,
                    "digest": d.digest(),
                    "has-state": d.has_state(),
                    "mutations": s.mutations,
                    "initial-bytes-sent": s.initial_bytes_sent,
                    "init-done-sent": s.init_done_sent,
                    "switch-digest": s.switch_digest,
                    "prep-started": s.prep_started,
                    "prep-finished": s.prep_finished,
                    "stats": format!("{s:?}"),
                })
            })
            .collect();
        Ok(json!({ "devices": list }))
    }

    pub(super) fn dirty_log(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let a: DirtyLogArgs = parse_args(args)?;
        if self.migration_active() {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        self.dirty_log_busy()?;
        let r = if a.enable {
            self.vm.start_dirty_log()
        } else {
            self.vm.stop_dirty_log()
        };
        r.map_err(generic)?;
        Ok(json!({}))
    }
}
