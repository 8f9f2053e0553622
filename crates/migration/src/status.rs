//! `MigrationStatus`: QEMU's `MigrationStatus` enum with QEMU's strings (`qapi/migration.json`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// State of a migration, as reported by `query-migrate` and the `MIGRATION` event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration has ever happened.
    #[default]
    None,
    /// Migration initiated (channels, setup).
    Setup,
    /// Cancel in progress.
    Cancelling,
    /// Cancelled.
    Cancelled,
    /// Pre-copy iterating.
    Active,
    /// Post-copy running.
    PostcopyActive,
    /// Post-copy interrupted (network).
    PostcopyPaused,
    /// Source-only setup phase of a post-copy recovery.
    PostcopyRecoverSetup,
    /// Post-copy recovery handshake.
    PostcopyRecover,
    /// Done.
    Completed,
    /// An error occurred, clean-up under way.
    Failing,
    /// An error occurred, clean-up done.
    Failed,
    /// COLO checkpointing.
    Colo,
    /// Paused before device serialisation (`pause-before-switchover`).
    PreSwitchover,
    /// Device state serialisation (switchover).
    Device,
    /// Waiting for the guest to unplug a failover primary.
    WaitUnplug,
    /// Like `postcopy-active`, but the destination still loads device state.
    PostcopyDevice,
    /// Tern (source only, final): the whole state was sent (END flushed) but the destination
    /// never confirmed that it runs (no `RESUMED`, no explicit failure: the return path closed,
    /// broke, or `x-tern-resume-timeout` expired). The source stays paused with its memory; it
    /// accepts `cont` (the operator checked that the destination does not run) and a new
    /// `migrate`. Not a plain `failed`, which QEMU tooling reads as "safe to resume the source".
    #[serde(rename = "x-tern-unconfirmed")]
    Unconfirmed,
}

impl MigrationStatus {
    /// Every status, in QEMU's enum order, then Tern's own.
    pub const ALL: [MigrationStatus; 18] = [
        Self::None,
        Self::Setup,
        Self::Cancelling,
        Self::Cancelled,
        Self::Active,
        Self::PostcopyDevice,
        Self::PostcopyActive,
        Self::PostcopyPaused,
        Self::PostcopyRecoverSetup,
        Self::PostcopyRecover,
        Self::Completed,
        Self::Failing,
        Self::Failed,
        Self::Colo,
        Self::PreSwitchover,
        Self::Device,
        Self::WaitUnplug,
        Self::Unconfirmed,
    ];

    /// QEMU's string for this status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Active => "active",
            Self::PostcopyActive => "postcopy-active",
            Self::PostcopyPaused => "postcopy-paused",
            Self::PostcopyRecoverSetup => "postcopy-recover-setup",
            Self::PostcopyRecover => "postcopy-recover",
            Self::Completed => "completed",
            Self::Failing => "failing",
            Self::Failed => "failed",
            Self::Colo => "colo",
            Self::PreSwitchover => "pre-switchover",
            Self::Device => "device",
            Self::WaitUnplug => "wait-unplug",
            Self::PostcopyDevice => "postcopy-device",
            Self::Unconfirmed => "x-tern-unconfirmed",
        }
    }

    /// A migration is under way (QEMU `migration_is_running`): capabilities and parameters that
    /// only apply at start may not change; a new `migrate` is refused.
    pub fn is_running(self) -> bool {
        matches!(
            self,
            Self::Setup
                | Self::Active
                | Self::PostcopyDevice
                | Self::PostcopyActive
                | Self::PostcopyPaused
                | Self::PostcopyRecoverSetup
                | Self::PostcopyRecover
                | Self::PreSwitchover
                | Self::Device
                | Self::WaitUnplug
                | Self::Cancelling
                | Self::Failing
                | Self::Colo
        )
    }

    /// The migration is transferring or about to (QEMU `migration_is_active`): `active`,
    /// the post-copy transfer states and the switchover states.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            Self::Active
                | Self::PostcopyDevice
                | Self::PostcopyActive
                | Self::PreSwitchover
                | Self::Device
        )
    }

    /// In one of the post-copy states.
    pub fn is_postcopy(self) -> bool {
        matches!(
            self,
            Self::PostcopyDevice
                | Self::PostcopyActive
                | Self::PostcopyPaused
                | Self::PostcopyRecoverSetup
                | Self::PostcopyRecover
        )
    }

    /// A final state: `completed`, `failed`, `cancelled` or Tern's `x-tern-unconfirmed` (a new
    /// migration may start; `none` is also "not running" but not an end).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Cancelled | Self::Unconfirmed
        )
    }

    /// `migrate_cancel` has something to cancel in this state.
    pub fn is_cancellable(self) -> bool {
        self.is_running() && !matches!(self, Self::Cancelling | Self::Failing)
    }
}

impl fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error of [`MigrationStatus::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown migration status '{0}'")]
pub struct UnknownStatus(pub String);

impl FromStr for MigrationStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_round_trip_and_match_serde() {
        assert_eq!(MigrationStatus::ALL.len(), 18);
        for s in MigrationStatus::ALL {
            assert_eq!(s.as_str().parse::<MigrationStatus>(), Ok(s));
            let j = serde_json::to_value(s).unwrap();
            assert_eq!(j, serde_json::Value::String(s.as_str().to_owned()));
            assert_eq!(s.to_string(), s.as_str());
        }
        assert!("bogus".parse::<MigrationStatus>().is_err());
        assert_eq!(MigrationStatus::default(), MigrationStatus::None);
    }

    #[test]
    fn predicates() {
        use MigrationStatus as S;
        assert!(S::Active.is_running() && S::Active.is_active());
        assert!(S::Setup.is_running() && !S::Setup.is_active());
        assert!(S::PreSwitchover.is_running() && S::Device.is_active());
        for s in [
            S::None,
            S::Completed,
            S::Failed,
            S::Cancelled,
            S::Unconfirmed,
        ] {
            assert!(!s.is_running(), "{s}");
            assert!(!s.is_active(), "{s}");
        }
        assert!(S::Completed.is_terminal() && !S::None.is_terminal());
        assert!(S::Unconfirmed.is_terminal() && !S::Unconfirmed.is_cancellable());
        assert_eq!(S::Unconfirmed.as_str(), "x-tern-unconfirmed");
        assert!(S::PostcopyPaused.is_postcopy() && !S::Active.is_postcopy());
        assert!(S::Active.is_cancellable() && !S::Cancelling.is_cancellable());
    }
}
