//! Hand-written guest code under real KVM: the VMM's own paths without the test guest.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tern_vmm::{GuestImage, Vm, VmConfig, VmStatus};

/// `ebx = 1; loop { out 0xf10, ebx; ebx += 1; out 0xf14, 1000 }`
const HEARTBEAT_LOOP: &[u8] = &[
    0xbb, 0x01, 0x00, 0x00, 0x00, // mov ebx, 1
    0x89, 0xd8, // mov eax, ebx
    0x66, 0xba, 0x10, 0x0f, // mov dx, 0xf10
    0xef, // out dx, eax
    0xff, 0xc3, // inc ebx
    0xb8, 0xe8, 0x03, 0x00, 0x00, // mov eax, 1000
    0x66, 0xba, 0x14, 0x0f, // mov dx, 0xf14
    0xef, // out dx, eax
    0xeb, 0xeb, // jmp -21
];

fn raw_vm(code: &[u8]) -> Vm {
    let vm = Vm::with_image(
        VmConfig::new(64 << 20, 1, ""),
        GuestImage::Raw {
            load: 0x10_0000,
            code,
        },
    )
    .unwrap();
    vm.start().unwrap();
    vm
}

#[test]
fn raw_heartbeat_loop() {
    let vm = raw_vm(HEARTBEAT_LOOP);
    let s = vm.wait_heartbeats(10, deadline());
    if s.count <= 10 {
        let _ = vm.pause();
        panic!(
            "heartbeats {s:?} exits {:?} status {:?} regs {:?}",
            vm.exit_stats(),
            vm.status(),
            vm.describe_vcpu(0)
        );
    }
    assert_eq!(s.last.unwrap().seq, s.count);
}

#[test]
fn hlt_fails_the_machine_without_killing_the_process() {
    let vm = raw_vm(&[0xf4]);
    let d = Instant::now() + DEADLINE;
    while !matches!(vm.status(), VmStatus::Failed(_)) {
        assert!(Instant::now() < d, "status {:?}", vm.status());
        std::thread::sleep(Duration::from_millis(1));
    }
    let VmStatus::Failed(f) = vm.status() else {
        unreachable!()
    };
    eprintln!("failure: {f:?}");
    assert_eq!(f.vcpu, 0);
    assert!(vm.resume().is_err());
    vm.pause().unwrap();
    vm.shutdown().unwrap();
}
