//! QEMU's RunState (the `status` of `query-status`) and the transitions QMP and migration make.

use serde_json::{json, Value};

/// QEMU `RunState` values Tern uses (names as QEMU spells them in `query-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Created with `-S`/`--paused`, never run.
    Prelaunch,
    Running,
    Paused,
    /// Waiting for (or receiving) an incoming migration.
    InMigrate,
    /// The source after a completed outgoing migration.
    PostMigrate,
    /// The source while it serialises its final state (vCPUs stopped by migration).
    FinishMigrate,
    /// A vCPU failed (the guest crashed or KVM refused to run it).
    InternalError,
    Shutdown,
}

impl RunState {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::InMigrate => "inmigrate",
            RunState::PostMigrate => "postmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::InternalError => "internal-error",
            RunState::Shutdown => "shutdown",
        }
    }

    /// `query-status`'s reply.
    pub fn status_info(self) -> Value {
        json!({ "running": self == RunState::Running, "status": self.as_str() })
    }
}
