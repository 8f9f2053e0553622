//! Machine configuration.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::abi;
use crate::devices::serial::SerialTarget;
use crate::error::{Error, Result};
use crate::memory::{RamBackend, PAGE_SIZE};

/// Smallest RAM the guest layout fits in (image, stacks, stats, workload area start).
pub const MIN_MEMORY: u64 = 32 << 20;
/// RAM the identity page tables of the page-table area can map.
pub const MAX_MEMORY: u64 = 64 << 30;

/// What a machine is made of. Serialised as the `machine` component, so a destination can check
/// that it was created with the same shape.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// RAM in bytes (multiple of 2 MiB).
    pub memory_bytes: u64,
    /// vCPU count.
    pub vcpus: u32,
    /// Guest command line (`key=value ...`, see the guest contract).
    pub cmdline: String,
    /// Serial output target (host-side; not compared on restore).
    pub serial: SerialTarget,
    /// Machine UUID.
    pub uuid: Uuid,
    /// How RAM is backed (host-side; not compared on restore).
    pub ram_backend: RamBackend,
    /// Ask for transparent huge pages on guest RAM (`madvise(MADV_HUGEPAGE)`, as QEMU does):
    /// host-side, not compared on restore (docs/machine.md "Guest RAM on huge pages").
    #[serde(default = "huge_pages_default")]
    pub huge_pages: bool,
}

fn huge_pages_default() -> bool {
    true
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            memory_bytes: 256 << 20,
            vcpus: 1,
            cmdline: String::new(),
            serial: SerialTarget::None,
            uuid: Uuid::nil(),
            ram_backend: RamBackend::AnonymousPrivate,
            huge_pages: true,
        }
    }
}

impl VmConfig {
    /// A config with a fresh random UUID.
    pub fn new(memory_bytes: u64, vcpus: u32, cmdline: impl Into<String>) -> Self {
        VmConfig {
            memory_bytes,
            vcpus,
            cmdline: cmdline.into(),
            uuid: Uuid::new_v4(),
            ..Default::default()
        }
    }

    /// A config running the test guest with `options`.
    pub fn with_options(memory_bytes: u64, vcpus: u32, options: &abi::GuestOptions) -> Self {
        Self::new(memory_bytes, vcpus, options.to_cmdline())
    }

    /// The command line parsed as guest options.
    pub fn guest_options(&self) -> Result<abi::GuestOptions> {
        abi::GuestOptions::parse(&self.cmdline)
            .map_err(|e| Error::Config(format!("guest command line: {e}")))
    }

    /// Checks the config against what the VMM and the guest layout support.
    pub fn validate(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > abi::MAX_VCPUS {
            return Err(Error::Config(format!(
                "vcpus = {} (supported: 1..={})",
                self.vcpus,
                abi::MAX_VCPUS
            )));
        }
        if self.memory_bytes < MIN_MEMORY || self.memory_bytes > MAX_MEMORY {
            return Err(Error::Config(format!(
                "memory = {:#x} bytes (supported: {MIN_MEMORY:#x}..={MAX_MEMORY:#x})",
                self.memory_bytes
            )));
        }
        if !self.memory_bytes.is_multiple_of(2 << 20)
            || !self.memory_bytes.is_multiple_of(PAGE_SIZE)
        {
            return Err(Error::Config(format!(
                "memory = {:#x} bytes is not a multiple of 2 MiB",
                self.memory_bytes
            )));
        }
        // A command line the strict parser rejects is still passed on (the guest reports and
        // ignores bad options); one it understands must fit in RAM.
        if let Ok(o) = abi::GuestOptions::parse(&self.cmdline) {
            if o.min_ram_bytes() > self.memory_bytes {
                return Err(Error::Config(format!(
                    "the guest's working set needs {:#x} bytes of RAM, the machine has {:#x}",
                    o.min_ram_bytes(),
                    self.memory_bytes
                )));
            }
        }
        if self.cmdline.len() >= abi::CMDLINE_MAX || self.cmdline.contains('\0') {
            return Err(Error::Config(format!(
                "command line is {} bytes or contains NUL (max {})",
                self.cmdline.len(),
                abi::CMDLINE_MAX - 1
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_bad_shapes() {
        assert!(VmConfig::new(256 << 20, 2, "workload=idle")
            .validate()
            .is_ok());
        assert!(VmConfig::new(256 << 20, 0, "").validate().is_err());
        assert!(VmConfig::new((256 << 20) + 4096, 1, "").validate().is_err());
        assert!(VmConfig::new(1 << 20, 1, "").validate().is_err());
        assert!(VmConfig::new(256 << 20, 1, "a\0b").validate().is_err());
        assert!(VmConfig::new(64 << 20, 1, "workload=dirty mem=64")
            .validate()
            .is_err());
    }
}
