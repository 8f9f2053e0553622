//! `auto-converge` time slicing on a real guest: throttled vCPUs are kicked and sleep outside
//! `KVM_RUN`, the guest still advances, a pause ends the sleeps, and 0 removes the throttle.
//! Polling with deadlines; nothing asserts on timing.

mod common;

use std::time::Instant;

use common::*;

/// Polls `pred` until it holds or the test deadline passes.
fn wait_for(what: &str, mut pred: impl FnMut() -> bool) {
    let end = deadline();
    while !pred() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[test]
fn throttled_vcpus_sleep_between_slices_and_a_pause_cuts_the_sleep_short() {
    let vm = boot("workload=dirty mem=32 rate=0 hb=1 status=0", 2, 128);
    wait_stats(&vm, 2, "both running", |_, s| s.is_running());
    assert_eq!(vm.cpu_throttle().pct, 0);

    vm.set_cpu_throttle(50).unwrap();
    assert_eq!(vm.cpu_throttle().pct, 50);
    wait_for("throttle sleeps", || vm.cpu_throttle().sleeps >= 10);
    // The guest still runs, on both vCPUs.
    let before: Vec<u64> = (0..2)
        .map(|i| vm.guest_stats(i).unwrap().pages_written)
        .collect();
    wait_stats(&vm, 2, "both advanced while throttled", |i, s| {
        s.pages_written > before[i as usize]
    });

    // 99 %: 990 ms asleep per 10 ms slice; the pause must not wait for the sleeps.
    vm.set_cpu_throttle(255).unwrap();
    assert_eq!(vm.cpu_throttle().pct, 99, "clamped");
    let slept = vm.cpu_throttle().sleeps;
    wait_for("a 99 % sleep", || vm.cpu_throttle().sleeps > slept);
    vm.pause().unwrap();
    assert!(
        vm.cpu_throttle().interrupted >= 1,
        "the pause ended the sleep: {:?}",
        vm.cpu_throttle()
    );
    vm.resume().unwrap();

    // 0 removes it: once set, no further sleep starts and the guest keeps running.
    vm.set_cpu_throttle(0).unwrap();
    let after = vm.cpu_throttle().sleeps;
    let hb = vm.heartbeats().count;
    wait_heartbeats(&vm, hb, 50);
    assert_eq!(
        vm.cpu_throttle().sleeps,
        after,
        "slept after the throttle was removed"
    );
    vm.shutdown().unwrap();
    assert!(vm.set_cpu_throttle(10).is_err(), "refused after shutdown");
}
