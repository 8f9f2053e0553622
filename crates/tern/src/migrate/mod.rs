//! Glue between the migration engine (`tern-migration`, which knows nothing of KVM) and the
//! machine (`tern-vmm`).

pub mod events;
pub mod incoming;
pub mod machine;

use std::sync::Arc;

use tern_migration::dest::DestMachine;
use tern_migration::source::SourceMachine;
use tern_vmm::Vm;

use machine::{VmComponents, VmRam, VmVcpus};

/// The machine as the sender drives it.
pub fn machine_for_source(vm: &Arc<Vm>) -> SourceMachine {
    SourceMachine {
        ram: Box::new(VmRam::new(vm.clone())),
        vcpus: Box::new(VmVcpus(vm.clone())),
        devices: Vec::new(),
        state: Box::new(VmComponents(vm.clone())),
    }
}

/// The machine as the receiver drives it.
pub fn machine_for_destination(vm: &Arc<Vm>) -> DestMachine {
    DestMachine {
        ram: Box::new(VmRam::fresh_destination(vm.clone())),
        vcpus: Box::new(VmVcpus(vm.clone())),
        loaders: Vec::new(),
        state: Box::new(VmComponents(vm.clone())),
    }
}
