//! The machine's shape (config and memory layout) as a component: the destination checks it
//! matches before anything else is restored.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Persist;
use crate::config::VmConfig;
use crate::error::{Error, Result};
use crate::memory::RamRegionInfo;

/// The guest-visible machine configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineState {
    /// RAM bytes.
    pub memory_bytes: u64,
    /// vCPU count.
    pub vcpus: u32,
    /// Guest command line.
    pub cmdline: String,
    /// Machine UUID.
    pub uuid: Uuid,
    /// RAM regions `(id, gpa, size)`.
    pub regions: Vec<(u32, u64, u64)>,
}

/// The machine config as a component.
pub struct MachineComponent<'a> {
    /// The machine's config (restore adopts the source's UUID and command line).
    pub config: &'a mut VmConfig,
    /// The machine's RAM regions.
    pub regions: &'a [RamRegionInfo],
}

impl MachineComponent<'_> {
    /// Errors unless `s` describes a machine of this shape (vCPUs, RAM, layout).
    pub fn check(&self, s: &MachineState) -> Result<()> {
        let mismatch = |what: String| Err(Error::component("machine", 0, what));
        if s.vcpus != self.config.vcpus {
            return mismatch(format!(
                "source has {} vCPUs, this machine {}",
                s.vcpus, self.config.vcpus
            ));
        }
        if s.memory_bytes != self.config.memory_bytes {
            return mismatch(format!(
                "source has {:#x} bytes of RAM, this machine {:#x}",
                s.memory_bytes, self.config.memory_bytes
            ));
        }
        let here: Vec<(u32, u64, u64)> =
            self.regions.iter().map(|r| (r.id, r.gpa, r.size)).collect();
        if s.regions != here {
            return mismatch(format!(
                "source RAM layout {:x?} differs from {here:x?}",
                s.regions
            ));
        }
        Ok(())
    }
}

impl Persist for MachineComponent<'_> {
    const ID: &'static str = "machine";
    const VERSION: u32 = 1;
    type State = MachineState;

    fn save(&self) -> Result<MachineState> {
        Ok(MachineState {
            memory_bytes: self.config.memory_bytes,
            vcpus: self.config.vcpus,
            cmdline: self.config.cmdline.clone(),
            uuid: self.config.uuid,
            regions: self.regions.iter().map(|r| (r.id, r.gpa, r.size)).collect(),
        })
    }

    fn restore(&mut self, s: &MachineState) -> Result<()> {
        self.check(s)?;
        if self.config.uuid != s.uuid {
            tracing::info!("adopting the source's UUID {}", s.uuid);
            self.config.uuid = s.uuid;
        }
        if self.config.cmdline != s.cmdline {
            tracing::info!("adopting the source's command line {:?}", s.cmdline);
            self.config.cmdline = s.cmdline.clone();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_util::round_trip;

    #[test]
    fn machine_round_trip_and_mismatch() {
        let regions = [RamRegionInfo {
            id: 0,
            gpa: 0,
            size: 256 << 20,
            host_addr: 0,
        }];
        let mut a_cfg = VmConfig::new(256 << 20, 2, "workload=idle");
        let mut b_cfg = VmConfig::new(256 << 20, 2, "");
        let a = MachineComponent {
            config: &mut a_cfg,
            regions: &regions,
        };
        let mut b = MachineComponent {
            config: &mut b_cfg,
            regions: &regions,
        };
        let (first, _) = round_trip(&a, &mut b, |_| {});
        assert_eq!(b.config.uuid, first.uuid);
        let mut c_cfg = VmConfig::new(256 << 20, 1, "");
        let mut c = MachineComponent {
            config: &mut c_cfg,
            regions: &regions,
        };
        assert!(c.restore(&first).is_err());
    }
}
