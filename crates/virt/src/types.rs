//! Domain states, info and events, with libvirt's names.

use serde::{Deserialize, Serialize};

use crate::job::JobInfo;

/// `virDomainState`, with virsh's spelling in [`DomainState::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DomainState {
    Running,
    Paused,
    Shutdown,
    Shutoff,
    Crashed,
}

impl DomainState {
    /// virsh's word for the state (`list`, `domstate`, `dominfo`).
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::Shutdown => "in shutdown",
            DomainState::Shutoff => "shut off",
            DomainState::Crashed => "crashed",
        }
    }

    /// Whether a VMM process exists for the domain.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            DomainState::Running | DomainState::Paused | DomainState::Shutdown
        )
    }
}

/// One row of `list`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DomainSummary {
    /// `None` for an inactive domain (virsh prints `-`).
    pub id: Option<u32>,
    pub name: String,
    pub state: DomainState,
}

/// `dominfo`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DomainInfo {
    pub id: Option<u32>,
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    /// libvirt's state reason (`booted`, `migrated`, `user`, `destroyed`, ...).
    pub reason: String,
    pub vcpus: u32,
    pub max_memory_kib: u64,
    pub used_memory_kib: u64,
    pub persistent: bool,
    /// The hypervisor driver (`tern` or `qemu`).
    pub driver: String,
    /// The VMM binary.
    pub emulator: String,
    /// The VMM's pid when active.
    pub pid: Option<u32>,
}

/// Lifecycle events (`VIR_DOMAIN_EVENT_*`) with libvirt's detail words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LifecycleEvent {
    Defined,
    Undefined,
    Started,
    Suspended,
    Resumed,
    Stopped,
}

impl LifecycleEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleEvent::Defined => "Defined",
            LifecycleEvent::Undefined => "Undefined",
            LifecycleEvent::Started => "Started",
            LifecycleEvent::Suspended => "Suspended",
            LifecycleEvent::Resumed => "Resumed",
            LifecycleEvent::Stopped => "Stopped",
        }
    }
}

/// An event about one domain (what `event --loop` prints).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum DomainEvent {
    /// `event 'lifecycle' for domain 'NAME': Started Booted`
    Lifecycle {
        domain: String,
        event: LifecycleEvent,
        /// libvirt's detail word (`Booted`, `Migrated`, `Paused`, `Destroyed`, ...)
        detail: String,
    },
    /// `event 'migration-iteration' for domain 'NAME': iteration: 'N'`
    MigrationIteration { domain: String, iteration: u64 },
    /// `event 'job-completed' for domain 'NAME':` followed by the statistics
    JobCompleted { domain: String, info: Box<JobInfo> },
}

impl DomainEvent {
    /// The domain the event is about.
    pub fn domain(&self) -> &str {
        match self {
            DomainEvent::Lifecycle { domain, .. }
            | DomainEvent::MigrationIteration { domain, .. }
            | DomainEvent::JobCompleted { domain, .. } => domain,
        }
    }

    /// libvirt's event name (`event --event NAME`).
    pub fn name(&self) -> &'static str {
        match self {
            DomainEvent::Lifecycle { .. } => "lifecycle",
            DomainEvent::MigrationIteration { .. } => "migration-iteration",
            DomainEvent::JobCompleted { .. } => "job-completed",
        }
    }

    /// One line as `virsh event --loop` prints it (job-completed: followed by its stats).
    pub fn to_virsh_line(&self) -> String {
        match self {
            DomainEvent::Lifecycle {
                domain,
                event,
                detail,
            } => format!(
                "event 'lifecycle' for domain '{domain}': {} {detail}",
                event.as_str()
            ),
            DomainEvent::MigrationIteration { domain, iteration } => format!(
                "event 'migration-iteration' for domain '{domain}': iteration: '{iteration}'"
            ),
            DomainEvent::JobCompleted { domain, info } => {
                let mut s = format!("event 'job-completed' for domain '{domain}':");
                for (k, v) in info.raw_stats() {
                    s.push_str(&format!("\n\t{k}: {v}"));
                }
                s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JobInfo, JobType};

    #[test]
    fn event_lines_as_virsh_prints_them() {
        let l = DomainEvent::Lifecycle {
            domain: "vm1".into(),
            event: LifecycleEvent::Resumed,
            detail: "Migrated".into(),
        };
        assert_eq!(
            l.to_virsh_line(),
            "event 'lifecycle' for domain 'vm1': Resumed Migrated"
        );
        let i = DomainEvent::MigrationIteration {
            domain: "vm1".into(),
            iteration: 3,
        };
        assert_eq!(
            i.to_virsh_line(),
            "event 'migration-iteration' for domain 'vm1': iteration: '3'"
        );
        let j = DomainEvent::JobCompleted {
            domain: "vm1".into(),
            info: Box::new(JobInfo {
                job_type: JobType::Completed,
                operation: Some("Outgoing migration".into()),
                downtime_ms: Some(2),
                ..Default::default()
            }),
        };
        assert_eq!(
            j.to_virsh_line(),
            "event 'job-completed' for domain 'vm1':\n\toperation: Outgoing migration\n\tdowntime: 2\n\tsuccess: true"
        );
        assert_eq!(j.name(), "job-completed");
        assert_eq!(DomainState::Shutoff.as_str(), "shut off");
    }
}
