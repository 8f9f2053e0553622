//! Domain definitions in libvirt's domain XML (the subset documented in `docs/management.md`):
//! parsed with `roxmltree`, validated strictly (an unknown element or attribute, or a bad value,
//! is an error naming it: nothing is silently dropped), and formatted back.

mod format;
mod parse;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use format::format_domain;
pub use parse::parse_domain;

/// The XML namespace of Tern's own elements (`<tern:workload>`).
pub const TERN_NS: &str = "http://tern.dev/schemas/domain/1.0";

/// Errors of this crate: each names the element or attribute at fault.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ConfError {
    #[error("XML error: {0}")]
    Syntax(String),
    #[error("unsupported element <{0}> (not part of Tern's domain XML subset)")]
    UnknownElement(String),
    #[error("unsupported attribute '{attr}' on <{element}>")]
    UnknownAttribute { element: String, attr: String },
    #[error("missing required element <{0}>")]
    MissingElement(String),
    #[error("element <{0}> given more than once")]
    Duplicate(String),
    #[error("invalid value '{value}' for {what}: {why}")]
    BadValue {
        what: String,
        value: String,
        why: String,
    },
}

/// Which hypervisor driver runs a domain. Decided by the basename of `<emulator>`: `tern` →
/// [`DriverKind::Tern`], `qemu-system-*` / `qemu-kvm` → [`DriverKind::Qemu`]; no `<emulator>`
/// means Tern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub enum DriverKind {
    Tern,
    Qemu,
}

impl DriverKind {
    pub fn name(self) -> &'static str {
        match self {
            DriverKind::Tern => "tern",
            DriverKind::Qemu => "qemu",
        }
    }
}

/// `<os>`: type `hvm`, and an optional direct kernel boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsDef {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
}

/// `<serial type='file|unix|null'>` (the first serial port, the guest's console).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SerialDef {
    /// `<serial type='file'><source path='...'/></serial>`
    File(PathBuf),
    /// `<serial type='unix'><source mode='bind' path='...'/></serial>` (the VMM listens)
    Unix(PathBuf),
    /// `<serial type='null'/>`
    Null,
}

/// The test guest's workload, Tern's own element `<tern:workload>` (both drivers run the same
/// guest: Tern built in, QEMU from `tern guest-image`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadDef {
    /// `idle`, `dirty` or `pattern`.
    pub kind: String,
    /// Working set in MiB (`mem`).
    pub mem_mib: u64,
    /// Dirty rate in MiB/s for `dirty` (`rate`, 0 = as fast as possible).
    pub rate_mib_s: u64,
    /// `seq` or `random` (`order`).
    pub order: String,
}

/// A domain definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainDef {
    pub name: String,
    pub uuid: uuid::Uuid,
    /// `<memory>` in KiB.
    pub memory_kib: u64,
    /// `<currentMemory>` in KiB (= memory when absent; no balloon: must equal memory).
    pub current_memory_kib: u64,
    pub vcpus: u32,
    pub os: OsDef,
    /// `<emulator>`: the VMM binary (absent: the daemon's default `tern`).
    pub emulator: Option<PathBuf>,
    pub serial: Option<SerialDef>,
    pub workload: Option<WorkloadDef>,
}

impl DomainDef {
    /// The driver this definition selects.
    pub fn driver(&self) -> DriverKind {
        driver_of(self.emulator.as_deref())
    }

    /// Memory in MiB (rounded up).
    pub fn memory_mib(&self) -> u64 {
        self.memory_kib.div_ceil(1024)
    }
}

/// The driver an `<emulator>` path selects.
pub fn driver_of(emulator: Option<&std::path::Path>) -> DriverKind {
    let base = emulator
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("tern");
    if base.starts_with("qemu-system-") || base == "qemu-kvm" {
        DriverKind::Qemu
    } else {
        DriverKind::Tern
    }
}

/// Checks a domain name as libvirt does (non-empty, no '/', printable, at most 255 bytes).
pub fn check_name(name: &str) -> Result<(), ConfError> {
    let bad = |why: &str| ConfError::BadValue {
        what: "<name>".into(),
        value: name.into(),
        why: why.into(),
    };
    if name.is_empty() {
        return Err(bad("a domain name may not be empty"));
    }
    if name.len() > 255 {
        return Err(bad("longer than 255 bytes"));
    }
    if name.contains('/') || name.chars().any(|c| c.is_control()) {
        return Err(bad("contains '/' or a control character"));
    }
    if name.trim() != name {
        return Err(bad("leading or trailing whitespace"));
    }
    Ok(())
}
