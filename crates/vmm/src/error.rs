//! The crate's error type: every variant says which component and which operation failed.

use std::io;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Errors of the machine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{component}: {ioctl} failed")]
    Kvm {
        /// Which component issued the ioctl (e.g. `vcpu 1`, `vm`, `memory`).
        component: String,
        /// The ioctl, e.g. `KVM_SET_SREGS`.
        ioctl: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The machine configuration is invalid.
    #[error("invalid machine configuration: {0}")]
    Config(String),
    /// Allocating or mapping guest memory failed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A guest physical address range is not backed by RAM.
    #[error("guest address range {gpa:#x}+{len:#x} is not RAM")]
    BadAddress {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
    },
    /// Loading the guest image failed.
    #[error("loading the guest image")]
    Load(#[source] linux_loader::loader::Error),
    /// An I/O error with context.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The operation needs a state the machine is not in.
    #[error("machine state: {0}")]
    State(String),
    /// Pausing the vCPUs did not complete in time.
    #[error("pause: {parked} of {total} vCPUs parked after {waited_ms} ms")]
    PauseTimeout {
        /// vCPUs parked when giving up.
        parked: usize,
        /// vCPU count.
        total: usize,
        /// How long we waited.
        waited_ms: u64,
    },
    /// Dirty logging was used in the wrong state or with wrong buffers.
    #[error("dirty log: {0}")]
    DirtyLog(String),
    /// A component's saved state could not be encoded or decoded.
    #[error("component {id}[{instance}]: payload: {source}")]
    Codec {
        /// Component id.
        id: String,
        /// Component instance.
        instance: u32,
        /// The postcard error.
        #[source]
        source: postcard::Error,
    },
    /// The set of component states does not fit this machine.
    #[error("component {id}[{instance}]: {reason}")]
    Component {
        /// Component id.
        id: String,
        /// Component instance.
        instance: u32,
        /// Why it does not fit.
        reason: String,
    },
    /// A stats block in guest RAM could not be decoded.
    #[error("vcpu {vcpu}: stats block")]
    GuestStats {
        /// vCPU index.
        vcpu: u32,
        /// What is wrong with it.
        #[source]
        source: tern_guest::Error,
    },
    /// A vCPU thread failed.
    #[error("vcpu {vcpu}: {reason}")]
    Vcpu {
        /// vCPU index.
        vcpu: u32,
        /// What happened.
        reason: String,
    },
}

impl Error {
    /// A KVM ioctl error with context.
    pub(crate) fn kvm(
        component: impl Into<String>,
        ioctl: &'static str,
        source: kvm_ioctls::Error,
    ) -> Self {
        Error::Kvm {
            component: component.into(),
            ioctl,
            source,
        }
    }

    /// An I/O error with context.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A component mismatch.
    pub(crate) fn component(id: &str, instance: u32, reason: impl Into<String>) -> Self {
        Error::Component {
            id: id.to_string(),
            instance,
            reason: reason.into(),
        }
    }
}
