//! `tern-guest`: the Tern test guest.
//!
//! * [`GUEST_ELF`]: the freestanding guest program (built by `build.rs` from `guest-src/`),
//!   with a Tern direct entry (`e_entry`, 64-bit) and a PVH entry (for QEMU `-kernel`).
//! * [`layout`]: its memory layout, ports and limits (the contract with the VMM).
//! * [`GuestOptions`]: its command line.
//! * [`StatsBlock`]: the per-vCPU stats blocks it keeps in guest RAM.
//! * [`pattern`]: the checker for the `pattern` workload (QEMU's migration-test rule).
//! * [`fill`]: the `idle` workload's fill content.
//! * [`host_cpu`]: the host's CPU vendor/model and the QEMU `-cpu` model chosen from it.
//!
//! See `docs/guest.md`.

pub mod fill;
pub mod host_cpu;
pub mod layout;
mod options;
pub mod pattern;
mod stats;

pub use options::{GuestOptions, Order, Workload};
pub use stats::{GuestState, StatsBlock};

/// The guest program: a static ELF64 linked at [`layout::IMAGE_BASE`].
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));

/// Errors of this crate.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A command-line token is not `key=value`.
    #[error("guest option {0:?} is not key=value")]
    NotKeyValue(String),
    /// Unknown command-line key (the guest itself ignores these).
    #[error("unknown guest option {0:?}")]
    UnknownOption(String),
    /// A command-line value is invalid.
    #[error("invalid value {value:?} for guest option {key:?}: {reason}")]
    BadValue {
        key: String,
        value: String,
        reason: &'static str,
    },
    /// A byte range is too short to hold what was asked for.
    #[error("{what}: need {need} bytes, have {have}")]
    TooShort {
        what: &'static str,
        need: u64,
        have: u64,
    },
    /// The host's CPU description cannot be read.
    #[error("cannot read {path}: {reason}")]
    HostCpu { path: &'static str, reason: String },
    /// A stats block does not start with [`layout::STATS_MAGIC`].
    #[error("no stats block at GPA {gpa:#x} (magic {magic:#x})")]
    BadStatsMagic { gpa: u64, magic: u64 },
    /// Stats blocks are inconsistent (e.g. vCPU count).
    #[error("inconsistent stats blocks: {0}")]
    BadStats(String),
    /// The guest is not running the `pattern` workload.
    #[error("vCPU {vcpu} runs workload {workload}, not pattern")]
    NotPattern { vcpu: u32, workload: u64 },
    /// A range to check is not page aligned.
    #[error("range {gpa:#x}+{len:#x} is not page aligned")]
    Unaligned { gpa: u64, len: u64 },
    /// A range to check is not inside the dump.
    #[error("range {gpa:#x}+{len:#x} is outside the dump {dump_gpa:#x}+{dump_len:#x}")]
    OutsideDump {
        gpa: u64,
        len: u64,
        dump_gpa: u64,
        dump_len: u64,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
