//! Helpers for the real-KVM tests: boot the test guest, wait with deadlines.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use tern_guest::GuestOptions;
use tern_vmm::{HeartbeatSummary, Vm, VmConfig, VmStatus};

/// Generous deadline for guest progress (the machine is shared by several engineers).
pub const DEADLINE: Duration = Duration::from_secs(60);

pub fn deadline() -> Instant {
    Instant::now() + DEADLINE
}

pub fn options(cmdline: &str) -> GuestOptions {
    GuestOptions::parse(cmdline).expect("test command line")
}

/// Builds and starts a machine running the test guest.
pub fn boot(cmdline: &str, vcpus: u32, mem_mib: u64) -> Vm {
    let cfg = VmConfig::with_options(mem_mib << 20, vcpus, &options(cmdline));
    let vm = Vm::new(cfg).expect("build machine");
    vm.start().expect("start");
    vm
}

/// Waits until `n` more heartbeats than `after` arrived; panics with the machine state if not.
pub fn wait_heartbeats(vm: &Vm, after: u64, n: u64) -> HeartbeatSummary {
    let d = deadline();
    loop {
        let s = vm.wait_heartbeats(after + n - 1, d);
        if s.count >= after + n {
            return s;
        }
        if Instant::now() >= d || matches!(vm.status(), VmStatus::Failed(_)) {
            panic!(
                "expected {n} heartbeats after {after}, got {}; status {:?}; serial {:?}; events {:?}",
                s.count,
                vm.status(),
                vm.serial_lines(0),
                vm.guest_events()
            );
        }
    }
}

/// Waits (polling guest RAM between heartbeats) until `pred` holds for every vCPU's stats.
pub fn wait_stats(
    vm: &Vm,
    vcpus: u32,
    what: &str,
    pred: impl Fn(u32, &tern_guest::StatsBlock) -> bool,
) {
    let d = deadline();
    loop {
        let ok = (0..vcpus).all(|i| vm.guest_stats(i).map(|s| pred(i, &s)).unwrap_or(false));
        if ok {
            return;
        }
        if Instant::now() >= d || matches!(vm.status(), VmStatus::Failed(_)) {
            let stats: Vec<_> = (0..vcpus).map(|i| vm.guest_stats(i)).collect();
            panic!(
                "timed out waiting for {what}: stats {stats:?} status {:?}",
                vm.status()
            );
        }
        // The guest ticks every heartbeat period: use the heartbeat as the clock.
        let c = vm.heartbeats().count;
        vm.wait_heartbeats(c, (Instant::now() + Duration::from_millis(50)).min(d));
    }
}
