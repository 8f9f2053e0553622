//! A domain as the daemon holds it: its definition, state and reason, its VMM (when active),
//! and its job.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use virt::conf::DomainDef;
use virt::{DomainState, Error, JobInfo, Result};
use virt_util::Monitor;

/// A running VMM process.
pub struct Vmm {
    pub pid: u32,
    pub monitor: Mutex<Monitor>,
}

impl Vmm {
    /// Runs a QMP command on the control connection.
    pub fn qmp(&self, cmd: &str, args: Value) -> Result<Value> {
        self.monitor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .execute(cmd, args)
            .map_err(|e| Error::Monitor(e.to_string()))
    }
}

/// Which way a migration job goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    MigrationOut,
    MigrationIn,
}

impl JobKind {
    pub fn operation(self) -> &'static str {
        match self {
            JobKind::MigrationOut => "Outgoing migration",
            JobKind::MigrationIn => "Incoming migration",
        }
    }
}

/// The job running on a domain.
pub struct ActiveJob {
    pub kind: JobKind,
    pub phase: &'static str,
    pub started: Instant,
    pub abort_requested: bool,
    pub notes: Vec<String>,
    /// Destination only: leave the domain paused after Finish (`--suspend`), make it
    /// persistent (`--persistent`).
    pub suspend: bool,
    pub persistent: bool,
    /// Source: closes the connection to the destination daemon (an abort in Prepare).
    pub peer: Option<virt::ShutdownHandle>,
    /// Source: `suspend` was called during the job (the guest travels paused).
    pub user_suspended: bool,
    /// Destination of a tunnelled migration: the incoming VMM's unix socket, which one
    /// `MigrateTunnel` connection may feed (taken by it).
    pub tunnel: Option<std::path::PathBuf>,
    /// The migration was started with `--postcopy` (`postcopy-ram` on both VMMs).
    pub postcopy: bool,
    /// This side's VMM reported `postcopy-active`: from here the source never runs the guest
    /// again and the destination's VMM is never killed by a daemon (docs/management.md §5c).
    pub postcopy_switched: bool,
    /// A resume of a failed post-copy migration (`--postcopy-resume`, §5d).
    pub resume: bool,
}

/// Mutable state of a domain.
pub struct DomainInner {
    pub def: DomainDef,
    pub persistent: bool,
    pub state: DomainState,
    pub reason: String,
    pub id: Option<u32>,
    pub vmm: Option<Arc<Vmm>>,
    /// The reason to record when the VMM goes away (set by destroy/shutdown/migration).
    pub stop_reason: Option<&'static str>,
    /// The last `MIGRATION` event status from the VMM.
    pub mig_status: Option<String>,
    pub job: Option<ActiveJob>,
    pub last_job: Option<JobInfo>,
    /// Set once the domain is gone from the daemon (undefined transient).
    pub removed: bool,
    /// This domain's VMM is one side of a post-copy migration that failed after the switch
    /// and can be resumed (`MigrationOut`: the source, paused for good unless resumed;
    /// `MigrationIn`: the destination, running on the pages it has). Kept in the status file.
    pub postcopy_failed: Option<JobKind>,
}

/// A domain.
pub struct Domain {
    pub name: String,
    pub uuid: String,
    inner: Mutex<DomainInner>,
    /// Signalled on every state, VMM or migration-status change.
    pub changed: Condvar,
}

impl Domain {
    pub fn new(def: DomainDef, persistent: bool) -> Arc<Domain> {
        Arc::new(Domain {
            name: def.name.clone(),
            uuid: def.uuid.to_string(),
            inner: Mutex::new(DomainInner {
                def,
                persistent,
                state: DomainState::Shutoff,
                reason: "unknown".into(),
                id: None,
                vmm: None,
                stop_reason: None,
                mig_status: None,
                job: None,
                last_job: None,
                removed: false,
                postcopy_failed: None,
            }),
            changed: Condvar::new(),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, DomainInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The running VMM, or "domain is not running".
    pub fn vmm(&self) -> Result<Arc<Vmm>> {
        self.lock()
            .vmm
            .clone()
            .ok_or_else(|| Error::OperationInvalid("domain is not running".into()))
    }

    /// Waits (at most `timeout`) until `cond` holds; returns whether it does.
    pub fn wait_until(&self, timeout: Duration, cond: impl Fn(&DomainInner) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            if cond(&g) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .changed
                .wait_timeout(g, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Sets state and reason and wakes waiters.
    pub fn set_state(&self, state: DomainState, reason: &str) {
        let mut g = self.lock();
        g.state = state;
        g.reason = reason.to_string();
        drop(g);
        self.changed.notify_all();
    }

    /// Starts a job; refused while another runs (libvirt: "another job is running").
    pub fn begin_job(&self, kind: JobKind) -> Result<()> {
        let mut g = self.lock();
        if let Some(j) = &g.job {
            return Err(Error::OperationInvalid(format!(
                "cannot acquire state change lock: job '{}' is running (phase {})",
                j.kind.operation(),
                j.phase
            )));
        }
        g.job = Some(ActiveJob {
            kind,
            phase: "begin",
            started: Instant::now(),
            abort_requested: false,
            notes: Vec::new(),
            suspend: false,
            persistent: false,
            peer: None,
            user_suspended: false,
            tunnel: None,
            postcopy: false,
            postcopy_switched: false,
            resume: false,
        });
        g.mig_status = None;
        Ok(())
    }

    pub fn set_phase(&self, phase: &'static str) {
        if let Some(j) = self.lock().job.as_mut() {
            j.phase = phase;
        }
        tracing::info!("{}: migration phase {phase}", self.name);
    }

    /// Whether this side's VMM switched the job's migration to post-copy.
    pub fn postcopy_switched(&self) -> bool {
        self.lock()
            .job
            .as_ref()
            .is_some_and(|j| j.postcopy_switched)
    }

    pub fn abort_requested(&self) -> bool {
        self.lock().job.as_ref().is_some_and(|j| j.abort_requested)
    }

    /// Ends the job, keeping its final statistics for `domjobinfo --completed`.
    pub fn end_job(&self, info: JobInfo) {
        let mut g = self.lock();
        g.job = None;
        g.last_job = Some(info);
        drop(g);
        self.changed.notify_all();
    }
}
