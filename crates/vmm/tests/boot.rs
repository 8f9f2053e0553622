//! Boots the real test guest under real KVM.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tern_vmm::VmStatus;

#[test]
fn idle_guest_heartbeats_and_reports_running() {
    let t0 = Instant::now();
    let vm = boot("workload=idle mem=16 hb=1 status=200", 1, 64);
    let s = wait_heartbeats(&vm, 0, 1);
    let first = s.last.unwrap();
    let resumed = vm.timings().first_resume_ns.unwrap();
    eprintln!(
        "time to first heartbeat: {:.3} ms after resume ({:.3} ms after Vm::new started; create {:?})",
        (first.realtime_ns.saturating_sub(resumed)) as f64 / 1e6,
        t0.elapsed().as_secs_f64() * 1e3,
        vm.timings().create
    );
    let s = wait_heartbeats(&vm, s.count, 20);
    assert!(s.last.unwrap().seq >= 21);
    wait_stats(&vm, 1, "running", |_, st| st.is_running());
    let banner = vm
        .wait_serial_line(0, deadline(), |l| l.text.starts_with("#tern-guest"))
        .expect("banner");
    assert!(banner.text.contains("entry=tern"), "{}", banner.text);
    assert_eq!(vm.status(), VmStatus::Running);
    assert!(vm.guest_panic().is_none());
    vm.shutdown().unwrap();
    assert_eq!(vm.status(), VmStatus::Shutdown);
}

#[test]
fn pause_stops_heartbeats_and_resume_continues() {
    let vm = boot("workload=dirty mem=16 rate=50 hb=1 status=0", 1, 64);
    let s = wait_heartbeats(&vm, 0, 5);
    let mut latencies = Vec::new();
    let mut count = s.count;
    for _ in 0..5 {
        let took = vm.pause().unwrap();
        latencies.push(took);
        assert!(!vm.is_running());
        assert_eq!(vm.status(), VmStatus::Paused);
        let paused = vm.heartbeats();
        let stats = vm.guest_stats(0).unwrap();
        // Observation window: nothing may arrive while paused.
        let after = vm.wait_heartbeats(paused.count, Instant::now() + Duration::from_millis(200));
        assert_eq!(after.count, paused.count, "heartbeat while paused");
        assert_eq!(stats, vm.guest_stats(0).unwrap(), "guest ran while paused");
        vm.resume().unwrap();
        assert!(vm.is_running());
        count = wait_heartbeats(&vm, paused.count, 3).count;
    }
    assert!(count > s.count);
    eprintln!("pause latencies: {latencies:?}");
}

#[test]
fn two_vcpus_both_advance() {
    let vm = boot("workload=dirty mem=32 rate=0 hb=1 status=0", 2, 128);
    wait_stats(&vm, 2, "both running", |_, s| s.is_running());
    let before: Vec<u64> = (0..2)
        .map(|i| vm.guest_stats(i).unwrap().pages_written)
        .collect();
    wait_stats(&vm, 2, "both advanced", |i, s| {
        s.pages_written > before[i as usize]
    });
    let hb = wait_heartbeats(&vm, vm.heartbeats().count, 10);
    assert_eq!(hb.last.unwrap().vcpu, 0);
    let took = vm.pause().unwrap();
    eprintln!("pause latency with 2 busy vCPUs: {took:?}");
}

/// Guest RAM on transparent huge pages (the default) is still dirty-logged per 4 KiB page: a
/// slow sequential writer dirties about as many pages as it wrote, not whole 2 MiB pages.
#[test]
fn dirty_log_is_4k_granular_on_huge_pages() {
    let vm = boot(
        "workload=dirty mem=16 rate=4 order=seq hb=1 status=0",
        1,
        64,
    );
    assert!(vm.config().huge_pages);
    wait_stats(&vm, 1, "running", |_, s| s.pages_written >= 4096);
    let huge_kib = std::fs::read_to_string("/proc/self/smaps_rollup")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("AnonHugePages:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        huge_kib >= 2048,
        "no huge page backs guest RAM ({huge_kib} KiB)"
    );
    let regions = vm.regions();
    let fresh = || -> Vec<Vec<u64>> { regions.iter().map(|r| vec![0; r.bitmap_words()]).collect() };
    vm.start_dirty_log().unwrap();
    let mut first = fresh();
    let w0 = vm.guest_stats(0).unwrap().pages_written;
    vm.sync_dirty_log(&mut first).unwrap();
    wait_stats(&vm, 1, "64 more pages", |_, s| s.pages_written >= w0 + 64);
    vm.pause().unwrap();
    let w1 = vm.guest_stats(0).unwrap().pages_written;
    let mut second = fresh();
    vm.sync_dirty_log(&mut second).unwrap();
    let work = (16u64 << 20) / 4096;
    let base = (16u64 << 20) / 4096;
    let dirty_work = (base..base + work)
        .filter(|&p| second[0][(p / 64) as usize] & (1 << (p % 64)) != 0)
        .count() as u64;
    eprintln!(
        "wrote {} pages, {dirty_work} dirty in the work area",
        w1 - w0
    );
    assert!(dirty_work > 0, "guest writes not reported");
    assert!(
        dirty_work <= (w1 - w0) + 64,
        "{dirty_work} dirty pages for {} written: not 4 KiB granular",
        w1 - w0
    );
    assert!(
        w1 - w0 < 448,
        "the writer outran the test ({} pages)",
        w1 - w0
    );
    vm.stop_dirty_log().unwrap();
    vm.resume().unwrap();
}

#[test]
fn dirty_log_reports_guest_and_vmm_writes() {
    let vm = boot("workload=dirty mem=16 rate=20 hb=1 status=0", 1, 64);
    wait_stats(&vm, 1, "running", |_, s| s.is_running());
    let regions = vm.regions();
    let mut bitmaps: Vec<Vec<u64>> = regions.iter().map(|r| vec![0; r.bitmap_words()]).collect();
    assert!(
        vm.sync_dirty_log(&mut bitmaps).is_err(),
        "sync before start"
    );
    vm.start_dirty_log().unwrap();
    let written = vm.guest_stats(0).unwrap().pages_written;
    wait_stats(&vm, 1, "more pages written", |_, s| {
        s.pages_written >= written + 64
    });
    // A VMM write lands in the VMM-side bitmap.
    let vmm_page = 0x3f0_0000u64;
    vm.write_memory(vmm_page, &[1, 2, 3]).unwrap();
    vm.sync_dirty_log(&mut bitmaps).unwrap();
    let dirty = |bm: &[u64], gpa: u64| {
        let p = (gpa / 4096) as usize;
        bm[p / 64] & (1 << (p % 64)) != 0
    };
    let set: u64 = bitmaps[0].iter().map(|w| u64::from(w.count_ones())).sum();
    let work = (16u64 << 20) / 4096;
    let work_dirty = (0..work)
        .filter(|p| dirty(&bitmaps[0], (16 << 20) + p * 4096))
        .count();
    eprintln!("dirty pages after one sync: {set} ({work_dirty} in the work area)");
    assert!(work_dirty > 0, "guest writes not reported");
    assert!(dirty(&bitmaps[0], vmm_page), "VMM write not reported");
    // The stats page is written by the guest all the time.
    assert!(dirty(&bitmaps[0], tern_guest::layout::stats_addr(0)));
    // Fetch-and-clear: a second sync after a pause sees only what was written since.
    vm.pause().unwrap();
    let mut again: Vec<Vec<u64>> = regions.iter().map(|r| vec![0; r.bitmap_words()]).collect();
    vm.sync_dirty_log(&mut again).unwrap();
    let mut third: Vec<Vec<u64>> = regions.iter().map(|r| vec![0; r.bitmap_words()]).collect();
    vm.sync_dirty_log(&mut third).unwrap();
    assert!(
        third[0].iter().all(|&w| w == 0),
        "paused guest dirtied pages"
    );
    vm.stop_dirty_log().unwrap();
    vm.resume().unwrap();
    wait_heartbeats(&vm, vm.heartbeats().count, 3);
}

#[test]
fn serial_socket_target_carries_guest_output() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serial.sock");
    let mut cfg = tern_vmm::VmConfig::with_options(
        64 << 20,
        1,
        &options("workload=idle mem=4 hb=0 status=20"),
    );
    cfg.serial = tern_vmm::SerialTarget::UnixSocket(path.clone());
    let vm = tern_vmm::Vm::new(cfg).unwrap();
    let client = UnixStream::connect(&path).unwrap();
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    vm.start().unwrap();
    // Status lines keep coming, so one arrives after the client is registered.
    let mut reader = BufReader::new(client);
    let mut line = String::new();
    while !line.starts_with("#t=") {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .expect("serial line before the deadline");
        assert!(n > 0, "serial socket closed");
    }
    // The host-side ring has the same lines with timestamps.
    assert!(vm
        .wait_serial_line(0, deadline(), |l| l.text.starts_with("#t="))
        .is_some());
}
