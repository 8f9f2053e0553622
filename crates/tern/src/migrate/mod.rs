//! Glue between the migration engine (`tern-migration`, which knows nothing of KVM) and the
//! machine (`tern-vmm`).

pub mod events;
pub mod fault;
pub mod incoming;
pub mod machine;
pub mod postcopy;
pub mod stall;

use std::sync::Arc;

use tern_migration::dest::DestMachine;
use tern_migration::machine::{StateHandler, StateLoader};
use tern_migration::source::SourceMachine;
use tern_statedev::StateDevice;
use tern_vmm::Vm;

use machine::{VmComponents, VmRam, VmVcpus};

/// The machine as the sender drives it.
pub fn machine_for_source(vm: &Arc<Vm>, devices: &[StateDevice]) -> SourceMachine {
    SourceMachine {
        ram: Box::new(VmRam::new(vm.clone())),
        vcpus: Box::new(VmVcpus::new(vm.clone(), devices.to_vec())),
        devices: devices
            .iter()
            .map(|d| Box::new(d.handler()) as Box<dyn StateHandler>)
            .collect(),
        state: Box::new(VmComponents(vm.clone())),
    }
}

/// The machine as the receiver drives it.
/// `pager` keeps the post-copy pager (if one starts) for the teardown.
pub fn machine_for_destination(
    vm: &Arc<Vm>,
    devices: &[StateDevice],
    pager: &postcopy::PagerSlot,
) -> DestMachine {
    DestMachine {
        ram: Box::new(VmRam::fresh_destination(vm.clone())),
        vcpus: Box::new(VmVcpus::new(vm.clone(), devices.to_vec())),
        loaders: devices
            .iter()
            .map(|d| Box::new(d.loader()) as Box<dyn StateLoader>)
            .collect(),
        state: Box::new(VmComponents(vm.clone())),
        postcopy: Some(Box::new(postcopy::VmPostcopy::new(
            vm.clone(),
            pager.clone(),
        ))),
    }
}
