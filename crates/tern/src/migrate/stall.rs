//! The guest-felt stall of an outgoing migration: the VM's vCPU stall meter (`tern_vmm::stall`:
//! the longest time a vCPU that wanted to run was kept out of `KVM_RUN`) fed into the engine's
//! stats, which show it beside the downtime as `x-tern-max-guest-stall` (docs/qmp.md).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_migration::stats::MigrationStats;
use tern_vmm::Vm;

/// The meter of one VM and the stats of one outgoing migration.
#[derive(Clone)]
pub struct StallFeed {
    vm: Arc<Vm>,
    stats: MigrationStats,
}

impl StallFeed {
    /// Starts a new measurement window (the meter is reset) for the migration about to start.
    pub fn start(vm: Arc<Vm>, stats: MigrationStats) -> Self {
        vm.reset_vcpu_stall();
        Self { vm, stats }
    }

    /// Copies the largest stall so far into the stats.
    pub fn publish(&self) {
        publish(&self.vm, &self.stats);
    }
}

/// Copies `vm`'s largest vCPU stall since the last reset into `stats`.
pub fn publish(vm: &Vm, stats: &MigrationStats) {
    let max = vm.max_vcpu_stall();
    let now = Instant::now();
    let ago_ns = tern_vmm::devices::control::realtime_ns().saturating_sub(max.start_realtime_ns);
    let began = if max.ns == 0 {
        now
    } else {
        now.checked_sub(Duration::from_nanos(ago_ns)).unwrap_or(now)
    };
    stats.set_vcpu_stall(Duration::from_nanos(max.ns), began);
}
