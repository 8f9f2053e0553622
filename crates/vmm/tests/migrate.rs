//! Save every component and RAM of a running test guest, restore into a second machine in the
//! same process, and check the guest carries on exactly.

mod common;

use std::time::Instant;

use common::*;
use tern_vmm::state::cpu::VcpuState;
use tern_vmm::{ComponentState, Vm, VmStatus, PAGE_SIZE};

/// Copies all RAM page by page (zero pages via `zero_page`); returns (pages, zero pages).
fn copy_ram(src: &Vm, dst: &Vm) -> (u64, u64) {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let (mut pages, mut zero) = (0, 0);
    for r in src.regions() {
        for p in 0..r.pages() {
            let gpa = r.gpa + p * PAGE_SIZE;
            src.read_page(gpa, &mut page).unwrap();
            if page.iter().all(|&b| b == 0) {
                dst.zero_page(gpa).unwrap();
                zero += 1;
            } else {
                dst.write_page(gpa, &page).unwrap();
            }
            pages += 1;
        }
    }
    (pages, zero)
}

fn dump(vm: &Vm) -> Vec<u8> {
    let r = vm.regions()[0];
    let mut buf = vec![0u8; r.size as usize];
    vm.read_memory(r.gpa, &mut buf).unwrap();
    buf
}

fn cpu_state(states: &[ComponentState], i: u32) -> VcpuState {
    let c = states
        .iter()
        .find(|c| c.id == "cpu" && c.instance == i)
        .unwrap();
    postcard::from_bytes(&c.data).unwrap()
}

#[test]
fn restore_into_second_machine_continues_heartbeats_and_pattern() {
    let src = boot("workload=pattern mem=32 hb=1 status=0", 2, 128);
    wait_stats(&src, 2, "running", |_, s| s.is_running());
    wait_heartbeats(&src, src.heartbeats().count, 10);
    src.pause().unwrap();
    let t = Instant::now();
    let states = src.save_components().unwrap();
    // Every saved component is one the restore side lists as known (what the migration reader
    // checks streams against), at a version it accepts.
    let known = tern_vmm::state::snapshot::known_components();
    for c in &states {
        assert!(
            known
                .iter()
                .any(|(id, lo, hi)| *id == c.id && (*lo..=*hi).contains(&c.version)),
            "component {} v{} missing from known_components() {known:?}",
            c.id,
            c.version
        );
    }
    assert_eq!(
        states.len(),
        tern_vmm::state::snapshot::saved_component_count(src.config().vcpus),
        "saved_component_count() (the destination's SECTION bound) disagrees with a real save"
    );
    let save_wall = t.elapsed();
    let last = src.heartbeats().last.unwrap();
    eprintln!(
        "save breakdown: {:?}",
        src.timings().last_save_breakdown.unwrap()
    );
    let bytes: usize = states.iter().map(|c| c.data.len()).sum();
    eprintln!(
        "save_components: {:?} (wall {save_wall:?}), {} components, {bytes} bytes; last heartbeat {}",
        src.timings().last_save.unwrap(),
        states.len(),
        last.seq
    );
    let before = tern_guest::pattern::check_dump(&dump(&src), 0).unwrap();
    assert!(before.is_ok(), "source pattern broken: {before:?}");

    let t = Instant::now();
    let dst = Vm::new_for_incoming(src.config()).unwrap();
    eprintln!("new_for_incoming: {:?}", t.elapsed());
    assert_eq!(dst.status(), VmStatus::Incoming);
    // Same host: what a migration compares (masked CPUID, TSC rate) is equal before the
    // restore (fresh machine) and after it (the source's CPUID set on the vCPUs).
    let identity = src.cpu_identity();
    assert!(!identity.cpuid.is_empty(), "no CPUID leaf compared");
    assert!(identity.tsc_khz.is_some_and(|k| k > 0), "{identity:?}");
    assert_eq!(dst.cpu_identity(), identity);
    let t = Instant::now();
    let (pages, zero) = copy_ram(&src, &dst);
    eprintln!("copied {pages} pages ({zero} zero) in {:?}", t.elapsed());
    let after_copy = tern_guest::pattern::check_dump(&dump(&dst), 0).unwrap();
    assert!(after_copy.is_ok());
    dst.restore_components(&states).unwrap();
    eprintln!(
        "restore_components: {:?}",
        dst.timings().last_restore.unwrap()
    );
    assert_eq!(dst.config().uuid, src.config().uuid);
    assert_eq!(dst.cpu_identity(), identity);

    // The restored machine saves the same vCPU state it was given.
    let again = dst.save_components().unwrap();
    for i in 0..2 {
        let (a, b) = (cpu_state(&states, i), cpu_state(&again, i));
        assert_eq!(a.regs, b.regs, "vcpu {i} regs");
        assert_eq!(a.sregs, b.sregs, "vcpu {i} sregs");
        assert_eq!(a.fpu, b.fpu, "vcpu {i} fpu");
        assert_eq!(a.xsave, b.xsave, "vcpu {i} xsave");
        assert_eq!(a.lapic, b.lapic, "vcpu {i} lapic");
        assert!(b.tsc >= a.tsc, "vcpu {i} TSC went backwards");
    }
    src.shutdown().unwrap();

    dst.resume().unwrap();
    let s = wait_heartbeats(&dst, dst.heartbeats().count, 10);
    let next = dst.heartbeats_since(last.seq);
    assert_eq!(
        next.first().map(|h| h.seq),
        Some(last.seq + 1),
        "sequence broke"
    );
    assert!(s.count >= states.len() as u64);
    let gap = next[0].realtime_ns - last.realtime_ns;
    eprintln!(
        "guest-visible heartbeat gap across save/restore: {:.3} ms",
        gap as f64 / 1e6
    );
    let st: Vec<u64> = (0..2)
        .map(|i| dst.guest_stats(i).unwrap().pages_written)
        .collect();
    wait_stats(&dst, 2, "pattern advancing", |i, s| {
        s.pages_written > st[i as usize]
    });
    dst.pause().unwrap();
    let report = tern_guest::pattern::check_dump(&dump(&dst), 0).unwrap();
    assert!(report.is_ok(), "pattern broken after restore: {report:?}");
    assert!(dst.guest_panic().is_none());
}

#[test]
fn restore_validates_the_whole_set_before_touching_anything() {
    let src = boot("workload=idle mem=8 hb=1 status=0", 2, 64);
    wait_heartbeats(&src, 0, 3);
    src.pause().unwrap();
    let good = src.save_components().unwrap();
    let dst = Vm::new_for_incoming(src.config()).unwrap();
    let err =
        |states: Vec<ComponentState>| dst.restore_components(&states).unwrap_err().to_string();

    let mut s = good.clone();
    s.push(ComponentState {
        id: "virtio-net".into(),
        instance: 0,
        version: 1,
        data: vec![],
    });
    assert!(err(s).contains("virtio-net"), "unknown component not named");

    let mut s = good.clone();
    s.iter_mut().find(|c| c.id == "pit").unwrap().version = 99;
    assert!(err(s).contains("newer"));

    let mut s = good.clone();
    s.retain(|c| !(c.id == "cpu" && c.instance == 1));
    let e = err(s);
    assert!(e.contains("cpu[1]") && e.contains("missing"), "{e}");

    let mut s = good.clone();
    let c = s.iter_mut().find(|c| c.id == "irqchip").unwrap();
    c.data.truncate(c.data.len() / 2);
    assert!(err(s).contains("irqchip"));

    let mut s = good.clone();
    let dup = s[0].clone();
    s.push(dup);
    assert!(err(s).contains("duplicate"));

    let mut s = good.clone();
    s.iter_mut().find(|c| c.id == "cpu").unwrap().instance = 7;
    assert!(err(s).contains("cpu[7]"));

    let one = Vm::new_for_incoming(tern_vmm::VmConfig {
        vcpus: 1,
        ..src.config()
    })
    .unwrap();
    assert!(one.restore_components(&good).is_err());

    // Nothing was touched: the full set still restores and the guest runs on. Without the
    // i8042 (a stream from a Tern that had none), which is optional: its reset state.
    let (_, _) = copy_ram(&src, &dst);
    let mut without_i8042 = good.clone();
    without_i8042.retain(|c| c.id != "i8042");
    assert_eq!(without_i8042.len() + 1, good.len());
    dst.restore_components(&without_i8042).unwrap();
    dst.resume().unwrap();
    wait_heartbeats(&dst, dst.heartbeats().count, 3);
}
