//! Event delivery from the migration threads to the caller (the QMP server in the glue).
//!
//! The engine calls the sink on every state change and every dirty-log sync, from the `mig-src`
//! / `mig-dst` threads. Gating is the caller's job: QEMU emits `MIGRATION` and `MIGRATION_PASS`
//! only when the `events` capability is on, while `STOP` / `RESUME` are run-state events that
//! are always emitted. Implementations must not block for long (they run on the migration
//! thread, possibly inside the downtime).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::status::MigrationStatus;

/// Receives the engine's events.
pub trait EventSink: Send + Sync {
    /// `MIGRATION {"status": …}`: the migration entered `status`.
    fn migration_status(&self, status: MigrationStatus);
    /// `MIGRATION_PASS {"pass": n}`: dirty-log sync number `pass` (from 1) happened.
    fn migration_pass(&self, pass: u64);
    /// The engine paused the vCPUs (QMP `STOP`).
    fn vm_stopped(&self);
    /// The engine resumed the vCPUs (QMP `RESUME`): the source after a failed switchover, the
    /// destination after a successful load.
    fn vm_resumed(&self);
}

/// A sink that drops everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEvents;

impl EventSink for NoEvents {
    fn migration_status(&self, _: MigrationStatus) {}
    fn migration_pass(&self, _: u64) {}
    fn vm_stopped(&self) {}
    fn vm_resumed(&self) {}
}

/// One recorded event (see [`RecordingSink`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `MIGRATION`.
    Status(MigrationStatus),
    /// `MIGRATION_PASS`.
    Pass(u64),
    /// `STOP`.
    Stop,
    /// `RESUME`.
    Resume,
}

/// A sink that records every event in order, and lets a thread wait for one (tests, and glue
/// code that wants to wait for a state without polling).
#[derive(Debug, Default)]
pub struct RecordingSink {
    events: Mutex<Vec<Event>>,
    cond: std::sync::Condvar,
}

impl RecordingSink {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }

    /// The statuses in order.
    pub fn statuses(&self) -> Vec<MigrationStatus> {
        self.lock()
            .iter()
            .filter_map(|e| match e {
                Event::Status(s) => Some(*s),
                _ => None,
            })
            .collect()
    }

    /// Blocks until an event satisfying `pred` has been recorded (returns at once when one
    /// already was), or `timeout` has passed (then `None`). Every wait is bounded: a
    /// migration that ended before the awaited event would otherwise block forever.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Event) -> bool) -> Option<Event> {
        let end = Instant::now() + timeout;
        let mut ev = self.lock();
        loop {
            if let Some(e) = ev.iter().find(|e| pred(e)) {
                return Some(e.clone());
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            ev = self
                .cond
                .wait_timeout(ev, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Blocks until `status` was entered or `timeout` passed; returns whether it was.
    pub fn wait_status(&self, status: MigrationStatus, timeout: Duration) -> bool {
        self.wait_for(timeout, |e| *e == Event::Status(status))
            .is_some()
    }

    /// Blocks until `MIGRATION_PASS` `pass` (or a later one) was emitted or `timeout` passed;
    /// returns whether it was.
    pub fn wait_pass(&self, pass: u64, timeout: Duration) -> bool {
        self.wait_for(timeout, |e| matches!(e, Event::Pass(p) if *p >= pass))
            .is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, e: Event) {
        self.lock().push(e);
        self.cond.notify_all();
    }
}

impl EventSink for RecordingSink {
    fn migration_status(&self, status: MigrationStatus) {
        self.push(Event::Status(status));
    }
    fn migration_pass(&self, pass: u64) {
        self.push(Event::Pass(pass));
    }
    fn vm_stopped(&self) {
        self.push(Event::Stop);
    }
    fn vm_resumed(&self) {
        self.push(Event::Resume);
    }
}
