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

/// `hlt` at CPL 3 is a #GP; without an IDT that is a triple fault (`SHUTDOWN`). (A `hlt` at
/// CPL 0 blocks inside `KVM_RUN`: `tests/pvh_guest.rs` in the tern crate halts its APs.)
#[test]
fn cpl3_hlt_faults_and_fails_the_machine_without_killing_the_process() {
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
    assert!(f.reason.contains("SHUTDOWN"), "{}", f.reason);
    assert!(vm.resume().is_err());
    vm.pause().unwrap();
    vm.shutdown().unwrap();
}

/// `ebx = 1; loop { out 0xf10, ebx; ebx += 1; if ebx == 5 { out 0x64, 0xfe; jmp $ } }`
const BEATS_THEN_I8042_RESET: &[u8] = &[
    0xbb, 0x01, 0x00, 0x00, 0x00, // mov ebx, 1
    0x89, 0xd8, // mov eax, ebx
    0x66, 0xba, 0x10, 0x0f, // mov dx, 0xf10
    0xef, // out dx, eax
    0xff, 0xc3, // inc ebx
    0x83, 0xfb, 0x05, // cmp ebx, 5
    0x75, 0xf2, // jne -14 (mov eax, ebx)
    0xb0, 0xfe, // mov al, 0xfe
    0xe6, 0x64, // out 0x64, al
    0xeb, 0xfe, // jmp $
];

/// The i8042 reset command is reported; `system_reset` puts the vCPU back at its entry with
/// the image reloaded, and the guest starts over (its heartbeats restart at 1).
#[test]
fn i8042_reset_request_and_system_reset_restart_the_guest() {
    let vm = raw_vm(BEATS_THEN_I8042_RESET);
    let d = Instant::now() + DEADLINE;
    while vm.reset_counts().0 == 0 {
        assert!(
            Instant::now() < d,
            "no reset request; {:?}",
            vm.heartbeats()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(vm.heartbeats().last.unwrap().seq, 4);
    vm.system_reset().unwrap();
    assert_eq!(vm.reset_counts().1, 1);
    let s = vm.wait_heartbeats(5, deadline());
    assert!(s.count > 5, "{s:?}");
    let seqs: Vec<u64> = vm.heartbeats_since(0).iter().map(|h| h.seq).collect();
    assert_eq!(&seqs[..5], &[1, 2, 3, 4, 1], "{seqs:?}");
    assert_eq!(vm.status(), VmStatus::Running);
    vm.shutdown().unwrap();
}

/// `mov al, 0xfe; loop { out 0x64, al }`: a guest flooding reset requests.
const I8042_RESET_FLOOD: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfc];

/// The owner's callback hears of one request until it is served (or refused): a flood of
/// requests starts no flood of resets.
#[test]
fn a_flood_of_reset_requests_reaches_the_callback_once_until_served() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let vm = Vm::with_image(
        VmConfig::new(64 << 20, 1, ""),
        GuestImage::Raw {
            load: 0x10_0000,
            code: I8042_RESET_FLOOD,
        },
    )
    .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let c = calls.clone();
    vm.on_guest_reset(move || {
        c.fetch_add(1, Ordering::SeqCst);
    });
    vm.start().unwrap();
    let d = Instant::now() + DEADLINE;
    while vm.reset_counts().0 < 100 {
        assert!(Instant::now() < d, "requests {:?}", vm.reset_counts());
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    vm.finish_reset_request();
    let seen = vm.reset_counts().0;
    while vm.reset_counts().0 < seen + 100 {
        assert!(Instant::now() < d, "requests {:?}", vm.reset_counts());
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    vm.shutdown().unwrap();
}

/// `out 0x3f9, 2` (IER: THR-empty interrupt on), `out 0x3f8, 'x'`, `out 0xf10, 1`, `jmp $`.
const UART_THR_INTERRUPT: &[u8] = &[
    0x66, 0xba, 0xf9, 0x03, // mov dx, 0x3f9
    0xb0, 0x02, // mov al, 2
    0xee, // out dx, al
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, 0x78, // mov al, 'x'
    0xee, // out dx, al
    0xb8, 0x01, 0x00, 0x00, 0x00, // mov eax, 1
    0x66, 0xba, 0x10, 0x0f, // mov dx, 0xf10
    0xef, // out dx, eax
    0xeb, 0xfe, // jmp $
];

/// COM1's interrupt reaches the in-kernel irqchip through the irqfd on GSI 4: after the guest
/// enables the THR-empty interrupt and writes a byte, the master PIC has IRQ 4 requested (with
/// IER = 0 it has not: checked by hand).
#[test]
fn serial_interrupt_reaches_the_in_kernel_pic() {
    let vm = raw_vm(UART_THR_INTERRUPT);
    let s = vm.wait_heartbeats(0, deadline());
    assert_eq!(s.count, 1, "the guest did not get past its UART writes");
    vm.pause().unwrap();
    // KVM injects an irqfd's interrupt into the PIC from a kernel worker, asynchronously to
    // the guest's `out`: under load the heartbeat can overtake it. Read the PIC until the
    // request shows (it then stays: the guest has interrupts off), up to the deadline.
    let d = deadline();
    let irr = loop {
        let states = vm.save_components().unwrap();
        let chip = states.iter().find(|c| c.id == "irqchip").unwrap();
        let chip = tern_vmm::state::decode_component::<tern_vmm::state::vm::Irqchip<'static>>(chip)
            .unwrap();
        // SAFETY: `pic_master` was read with KVM_GET_IRQCHIP for chip 0 (the master PIC), so
        // the union holds a `kvm_pic_state`.
        let irr = unsafe { chip.pic_master.chip.pic.irr };
        if irr & (1 << 4) != 0 || Instant::now() >= d {
            break irr;
        }
        std::thread::yield_now();
    };
    assert_ne!(irr & (1 << 4), 0, "IRR {irr:#x}: IRQ 4 not requested");
    vm.shutdown().unwrap();
}
