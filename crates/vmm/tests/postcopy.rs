//! The post-copy demand pager under a real KVM guest: the source's RAM and state are saved,
//! the state is restored into a fresh machine whose RAM is entirely missing (registered with
//! the pager), and a fake requester answers page requests from the saved copy on another
//! thread. The guest must run on exactly as after a normal restore.

mod common;

use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use common::*;
use tern_vmm::postcopy::{GpaRange, PageRequester, Pager, Placement};
use tern_vmm::{ComponentState, RamRegionInfo, Vm, PAGE_SIZE};

/// The source's RAM, per region, as saved at its stop.
struct SavedRam(Vec<(RamRegionInfo, Vec<u8>)>);

impl SavedRam {
    fn page(&self, gpa: u64) -> &[u8] {
        let (r, bytes) = self
            .0
            .iter()
            .find(|(r, _)| gpa >= r.gpa && gpa < r.gpa + r.size)
            .expect("requested page is guest RAM");
        let off = (gpa - r.gpa) as usize;
        &bytes[off..off + PAGE_SIZE as usize]
    }

    fn whole(&self) -> &[u8] {
        &self.0[0].1
    }
}

/// Logs requests and forwards them to the serving thread.
struct Requester {
    log: Mutex<Vec<GpaRange>>,
    tx: Mutex<mpsc::Sender<Option<Vec<GpaRange>>>>,
}

impl PageRequester for Requester {
    fn request(&self, ranges: &[GpaRange]) -> Result<(), String> {
        self.log.lock().unwrap().extend_from_slice(ranges);
        self.tx
            .lock()
            .unwrap()
            .send(Some(ranges.to_vec()))
            .map_err(|e| format!("serving thread gone: {e}"))
    }
}

impl Requester {
    /// Every requested page, in request order (duplicates kept, to be asserted absent).
    fn pages(&self) -> Vec<u64> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| (0..r.pages()).map(move |i| r.gpa + i * PAGE_SIZE))
            .collect()
    }
}

/// A destination with every page missing, served by the thread `test-source`.
struct Dest {
    vm: Vm,
    pager: Arc<Pager>,
    req: Arc<Requester>,
    stop: mpsc::Sender<Option<Vec<GpaRange>>>,
    server: Option<std::thread::JoinHandle<()>>,
}

/// Starts the pager over `vm`'s RAM (every page missing) and a serving thread; when `gate` is
/// given, the server waits for it before answering its first batch.
fn serve(vm: Vm, saved: Arc<SavedRam>, gate: Option<mpsc::Receiver<()>>) -> Dest {
    let all: Vec<Vec<u64>> = vm
        .regions()
        .iter()
        .map(|r| vec![u64::MAX; r.bitmap_words()])
        .collect();
    serve_missing(vm, saved, &all, gate)
}

/// [`serve`] with only the pages of `missing` (one bitmap per region) missing.
fn serve_missing(
    vm: Vm,
    saved: Arc<SavedRam>,
    missing: &[Vec<u64>],
    gate: Option<mpsc::Receiver<()>>,
) -> Dest {
    let (tx, rx) = mpsc::channel::<Option<Vec<GpaRange>>>();
    let req = Arc::new(Requester {
        log: Mutex::new(Vec::new()),
        tx: Mutex::new(tx.clone()),
    });
    let t = std::time::Instant::now();
    let pager = Arc::new(Pager::start(vm.ram().clone(), missing, req.clone()).unwrap());
    eprintln!(
        "Pager::start over {} MiB: {:?}",
        vm.ram().total_bytes() >> 20,
        t.elapsed()
    );
    let p = pager.clone();
    let server = std::thread::Builder::new()
        .name("test-source".into())
        .spawn(move || {
            let mut gate = gate;
            while let Ok(Some(ranges)) = rx.recv() {
                if let Some(g) = gate.take() {
                    if g.recv().is_err() {
                        return; // the gate was dropped: these pages never come
                    }
                }
                for r in ranges {
                    for i in 0..r.pages() {
                        let gpa = r.gpa + i * PAGE_SIZE;
                        let page = saved.page(gpa);
                        let placed = if page.iter().all(|&b| b == 0) {
                            p.place_zero(gpa)
                        } else {
                            p.place(gpa, page)
                        };
                        assert_eq!(placed.unwrap(), Placement::Placed, "page {gpa:#x} twice");
                    }
                }
            }
        })
        .unwrap();
    Dest {
        vm,
        pager,
        req,
        stop: tx,
        server: Some(server),
    }
}

impl Drop for Dest {
    fn drop(&mut self) {
        // Stop the guest first (it may still fault), then the server, then the pager.
        let _ = self.vm.shutdown();
        let _ = self.stop.send(None);
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        let _ = self.pager.shutdown();
    }
}

/// Boots `cmdline`, lets it run, pauses, and saves its components and RAM.
fn save_source(cmdline: &str, vcpus: u32) -> (Vm, Vec<ComponentState>, Arc<SavedRam>) {
    let src = boot(cmdline, vcpus, 64);
    wait_stats(&src, vcpus, "running", |_, s| s.is_running());
    wait_heartbeats(&src, src.heartbeats().count, 5);
    src.pause().unwrap();
    let (states, saved) = save_paused(&src);
    (src, states, saved)
}

/// Components and RAM of a paused machine.
fn save_paused(src: &Vm) -> (Vec<ComponentState>, Arc<SavedRam>) {
    let states = src.save_components().unwrap();
    let saved = src
        .regions()
        .into_iter()
        .map(|r| {
            let mut buf = vec![0u8; r.size as usize];
            src.read_memory(r.gpa, &mut buf).unwrap();
            (r, buf)
        })
        .collect();
    (states, Arc::new(SavedRam(saved)))
}

/// The vCPU threads' kernel ids (all known once the machine is parked).
fn vcpu_tids(vm: &Vm) -> Vec<i32> {
    vm.vcpu_thread_ids()
        .into_iter()
        .map(|t| t.expect("vCPU thread started"))
        .collect()
}

/// The name of thread `tid` of this process.
fn thread_name(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn dump(vm: &Vm) -> Vec<u8> {
    let r = vm.regions()[0];
    let mut buf = vec![0u8; r.size as usize];
    vm.read_memory(r.gpa, &mut buf).unwrap();
    buf
}

#[test]
fn guest_runs_on_ram_fetched_on_demand_two_vcpus_faulting_concurrently() {
    let (src, states, saved) = save_source("workload=pattern mem=16 hb=1 status=0", 2);
    let last = src.heartbeats().last.unwrap();
    let before = tern_guest::pattern::check_dump(saved.whole(), 0).unwrap();
    assert!(before.is_ok(), "source pattern broken: {before:?}");
    // Each vCPU's own working set (the pattern writer's range).
    let sets: Vec<(u64, u64)> = (0..2)
        .map(|i| {
            let s = src.guest_stats(i).unwrap();
            (s.work_base, s.work_len)
        })
        .collect();
    src.shutdown().unwrap();

    let dst = serve(
        Vm::new_for_incoming(src.config()).unwrap(),
        saved.clone(),
        None,
    );
    // Pages placed before anything faulted (a background push): every 32nd page, inside the
    // working sets too. The final dump reads every page, so each would fault if it were missing.
    let early: Vec<u64> = (0..dst.vm.regions()[0].pages())
        .step_by(32)
        .map(|p| p * PAGE_SIZE)
        .collect();
    for &gpa in &early {
        let page = saved.page(gpa);
        assert_eq!(dst.pager.place(gpa, page).unwrap(), Placement::Placed);
    }
    dst.vm.restore_components(&states).unwrap();
    let vcpu_tids = vcpu_tids(&dst.vm);
    dst.pager.set_vcpu_threads(&vcpu_tids);
    dst.vm.resume().unwrap();
    wait_heartbeats(&dst.vm, dst.vm.heartbeats().count, 10);
    let next = dst.vm.heartbeats_since(last.seq);
    assert_eq!(
        next.first().map(|h| h.seq),
        Some(last.seq + 1),
        "sequence broke"
    );
    let start: Vec<u64> = (0..2)
        .map(|i| dst.vm.guest_stats(i).unwrap().pages_written)
        .collect();
    wait_stats(&dst.vm, 2, "pattern advancing on both vCPUs", |i, s| {
        s.pages_written > start[i as usize] + 1000
    });
    dst.vm.pause().unwrap();

    // Before the test reads any of it: the working sets' pages were faulted by the vCPUs
    // themselves, i.e. by KVM inside KVM_RUN (kernel-mode faults), from both vCPU threads.
    let by_vcpus = dst.req.pages();
    for (i, &(base, len)) in sets.iter().enumerate() {
        let n = by_vcpus
            .iter()
            .filter(|&&g| g >= base && g < base + len)
            .count();
        assert!(
            n > 100,
            "vCPU {i}'s working set {base:#x}+{len:#x}: only {n} pages requested"
        );
    }
    let faulting = dst.pager.faulting_threads();
    let names: HashSet<String> = faulting.iter().map(|&t| thread_name(t)).collect();
    assert!(
        vcpu_tids.iter().all(|t| faulting.contains(t))
            && names.contains("vcpu-0")
            && names.contains("vcpu-1"),
        "faulting threads {names:?}, vCPU threads {vcpu_tids:?}"
    );
    // QEMU's blocktimes: each vCPU waited; all of them at once at most as long as any one;
    // a vCPU's time is made of waits for pages, each counted from its first fault.
    let bt = dst.pager.blocktime();
    assert_eq!(bt.per_vcpu.len(), 2);
    assert!(bt.per_vcpu.iter().all(|d| !d.is_zero()), "{bt:?}");
    assert!(bt.per_vcpu.iter().all(|&d| bt.all_vcpus <= d), "{bt:?}");

    let report = tern_guest::pattern::check_dump(&dump(&dst.vm), 0).unwrap();
    assert!(
        report.is_ok(),
        "pattern broken after demand paging: {report:?}"
    );
    assert!(dst.vm.guest_panic().is_none());

    let pages = dst.req.pages();
    let distinct: HashSet<u64> = pages.iter().copied().collect();
    assert_eq!(distinct.len(), pages.len(), "a page was requested twice");
    let early_requested: Vec<_> = early.iter().filter(|g| distinct.contains(g)).collect();
    assert!(
        early_requested.is_empty(),
        "placed early, requested anyway: {early_requested:?}"
    );
    let st = dst.pager.stats();
    assert_eq!(
        st.pages_placed,
        (pages.len() + early.len()) as u64,
        "{st:?}"
    );
    assert_eq!(st.already_present, 0, "{st:?}");
    assert_eq!(
        dst.pager.missing_pages(),
        0,
        "the dump read every page: {st:?}"
    );
    // (How many drains held more than one page depends on timing: batching itself is proven
    // by the scripted unit test `one_drain_is_one_batch_of_coalesced_deduplicated_ranges`.)
    assert!(st.faults >= st.pages_requested && st.requests <= st.pages_requested);
    assert!(st.batches <= st.requests, "{st:?}");
    assert!(
        st.page_wait_total >= bt.per_vcpu[0].max(bt.per_vcpu[1]),
        "{st:?} {bt:?}"
    );
    // Every requested page was waited for (its fault came first); early pages never were.
    assert_eq!(st.page_waits(), st.pages_requested, "{st:?}");
    let (p50, p99) = (st.page_wait_quantile(0.5), st.page_wait_quantile(0.99));
    assert!(
        p50 <= p99 && p99 <= Some(st.max_page_wait),
        "{p50:?} {p99:?} {st:?}"
    );
    eprintln!(
        "post-copy restore: {st:?}; {bt:?}; page wait p50 <= {p50:?}, p99 <= {p99:?}; \
         faulting threads {names:?}; early pages {}",
        early.len()
    );
}

#[test]
fn a_vcpu_blocked_in_kvm_run_on_a_missing_page_resumes_when_it_is_placed() {
    let (src, states, saved) = save_source("workload=idle mem=8 hb=1 status=0", 1);
    src.shutdown().unwrap();
    let (open, gate) = mpsc::channel();
    let dst = serve(
        Vm::new_for_incoming(src.config()).unwrap(),
        saved,
        Some(gate),
    );
    dst.vm.restore_components(&states).unwrap();
    let tids = vcpu_tids(&dst.vm);
    dst.pager.set_vcpu_threads(&tids);
    let count = dst.vm.heartbeats().count;
    dst.vm.resume().unwrap();
    // Nothing but the guest touches RAM now, so the first request comes from its vCPU in
    // KVM_RUN; the server holds it. Wait for the fault thread to have seen it.
    let d = deadline();
    while dst.pager.stats().pages_requested == 0 {
        assert!(std::time::Instant::now() < d, "no fault from the vCPU");
        std::thread::yield_now();
    }
    assert_eq!(
        dst.pager.faulting_threads(),
        tids,
        "the held-back fault is the vCPU's"
    );
    assert_eq!(thread_name(tids[0]), "vcpu-0");
    assert_eq!(dst.pager.stats().pages_placed, 0);
    assert_eq!(
        dst.vm.heartbeats().count,
        count,
        "heartbeat without its pages"
    );
    open.send(()).unwrap();
    wait_heartbeats(&dst.vm, count, 5);
    let st = dst.pager.stats();
    assert!(
        st.pages_placed > 0 && !st.page_wait_total.is_zero(),
        "{st:?}"
    );
    // One vCPU: all vCPUs were blocked exactly when it was, at least as long as the gate
    // held its first page.
    let bt = dst.pager.blocktime();
    assert_eq!(bt.per_vcpu.len(), 1);
    assert_eq!(bt.all_vcpus, bt.per_vcpu[0], "{bt:?}");
    assert!(!bt.all_vcpus.is_zero(), "{bt:?}");
}

/// The real flow: a pre-copy pass copies all RAM while the source runs on, the source stops,
/// and only the pages it dirtied since are missing on the destination (QEMU's discard). Pages
/// copied in pre-copy and not dirtied are never requested; dirtied ones are discarded and
/// fetched, so the guest never reads the stale pre-copy bytes (the `pattern` check would see
/// a stale page as two bad transitions).
#[test]
fn after_a_precopy_pass_only_the_redirtied_pages_are_discarded_and_fetched() {
    let src = boot("workload=pattern mem=16 hb=1 status=0", 2, 64);
    wait_stats(&src, 2, "running", |_, s| s.is_running());
    let dst = Vm::new_for_incoming(src.config()).unwrap();
    src.start_dirty_log().unwrap();
    // The pre-copy pass, page by page while the guest writes.
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for r in src.regions() {
        for p in 0..r.pages() {
            let gpa = r.gpa + p * PAGE_SIZE;
            src.read_page(gpa, &mut page).unwrap();
            if page.iter().all(|&b| b == 0) {
                dst.zero_page(gpa).unwrap();
            } else {
                dst.write_page(gpa, &page).unwrap();
            }
        }
    }
    let written: Vec<u64> = (0..2)
        .map(|i| src.guest_stats(i).unwrap().pages_written)
        .collect();
    wait_stats(&src, 2, "pattern advancing after the pass", |i, s| {
        s.pages_written > written[i as usize] + 500
    });
    src.pause().unwrap();
    let mut dirty: Vec<Vec<u64>> = src
        .regions()
        .iter()
        .map(|r| vec![0u64; r.bitmap_words()])
        .collect();
    src.sync_dirty_log(&mut dirty).unwrap();
    src.stop_dirty_log().unwrap();
    let (states, saved) = save_paused(&src);
    let last = src.heartbeats().last.unwrap();
    src.shutdown().unwrap();
    let dirty_set: HashSet<u64> = src
        .regions()
        .iter()
        .zip(&dirty)
        .flat_map(|(r, bits)| {
            (0..r.pages())
                .filter(|p| bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
                .map(|p| r.gpa + p * PAGE_SIZE)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        dirty_set.len() > 500,
        "only {} pages dirtied",
        dirty_set.len()
    );

    let dst = serve_missing(dst, saved, &dirty, None);
    assert_eq!(dst.pager.missing_pages(), dirty_set.len() as u64);
    dst.vm.restore_components(&states).unwrap();
    dst.vm.resume().unwrap();
    wait_heartbeats(&dst.vm, dst.vm.heartbeats().count, 5);
    let next = dst.vm.heartbeats_since(last.seq);
    assert_eq!(
        next.first().map(|h| h.seq),
        Some(last.seq + 1),
        "sequence broke"
    );
    let start: Vec<u64> = (0..2)
        .map(|i| dst.vm.guest_stats(i).unwrap().pages_written)
        .collect();
    wait_stats(
        &dst.vm,
        2,
        "pattern advancing on the destination",
        |i, s| s.pages_written > start[i as usize] + 1000,
    );
    dst.vm.pause().unwrap();
    let by_guest = dst.req.pages().len();
    let report = tern_guest::pattern::check_dump(&dump(&dst.vm), 0).unwrap();
    assert!(report.is_ok(), "stale or lost page: {report:?}");
    let requested = dst.req.pages();
    let outside: Vec<_> = requested
        .iter()
        .filter(|g| !dirty_set.contains(g))
        .take(5)
        .collect();
    assert!(outside.is_empty(), "pre-copy pages requested: {outside:?}");
    assert!(
        !requested.is_empty(),
        "the guest touched no re-dirtied page"
    );
    assert_eq!(dst.pager.missing_pages(), 0, "the dump read every page");
    let st = dst.pager.stats();
    assert_eq!(st.pages_placed, dirty_set.len() as u64, "{st:?}");
    eprintln!(
        "pre-copy then post-copy: {} re-dirtied pages, {} requested by the guest before the \
         dump; {st:?}",
        dirty_set.len(),
        by_guest
    );
}

/// On the test bed (AMD EPYC, kernel 6.18, PVM) a kick does not get a vCPU out of a
/// userfaultfd wait inside `KVM_RUN`: the kernel retries the fault (one event per retry, tens
/// of thousands per second) until the page arrives, so a pause times out. A kernel whose kick does interrupt the wait
/// parks the vCPU instead; either way the pager must absorb the retries (one request), and
/// the machine must run on once the page is placed and it is resumed.
#[test]
fn a_pause_while_a_vcpu_waits_for_a_page_does_not_wedge_it() {
    let (src, states, saved) = save_source("workload=idle mem=8 hb=1 status=0", 1);
    src.shutdown().unwrap();
    let (open, gate) = mpsc::channel();
    let dst = serve(
        Vm::new_for_incoming(src.config()).unwrap(),
        saved,
        Some(gate),
    );
    dst.vm.restore_components(&states).unwrap();
    dst.vm.resume().unwrap();
    let d = deadline();
    while dst.pager.stats().pages_requested == 0 {
        assert!(std::time::Instant::now() < d, "no fault from the vCPU");
        std::thread::yield_now();
    }
    match dst.vm.pause() {
        Err(tern_vmm::Error::PauseTimeout { parked: 0, .. }) => {
            eprintln!("the kick left the vCPU in the fault: pause timed out")
        }
        Ok(_) => eprintln!("the kick got the vCPU out of the fault: parked"),
        Err(e) => panic!("pause: {e}"),
    }
    let st = dst.pager.stats();
    assert_eq!(
        st.pages_requested, 1,
        "the fault storm caused requests: {st:?}"
    );
    eprintln!(
        "faults while the page was held and a pause waited: {}",
        st.faults
    );
    open.send(()).unwrap();
    dst.vm.resume().unwrap();
    wait_heartbeats(&dst.vm, dst.vm.heartbeats().count, 5);
    dst.vm.pause().unwrap();
}

/// The source is lost and the held page never comes: the machine can still be torn down,
/// in the order `Vm::request_stop`, `Pager::shutdown`, `Vm::shutdown` (decision 79), without
/// the guest running another instruction (no heartbeat after the stop).
#[test]
fn a_destination_whose_pages_never_come_can_be_torn_down() {
    let (src, states, saved) = save_source("workload=idle mem=8 hb=1 status=0", 1);
    src.shutdown().unwrap();
    let (_never, gate) = mpsc::channel::<()>();
    let mut dst = serve(
        Vm::new_for_incoming(src.config()).unwrap(),
        saved,
        Some(gate),
    );
    dst.vm.restore_components(&states).unwrap();
    let count = dst.vm.heartbeats().count;
    dst.vm.resume().unwrap();
    let d = deadline();
    while dst.pager.stats().pages_requested == 0 {
        assert!(std::time::Instant::now() < d, "no fault from the vCPU");
        std::thread::yield_now();
    }
    let (done_tx, done) = mpsc::channel();
    std::thread::scope(|s| {
        let dst = &dst;
        s.spawn(move || {
            dst.vm.request_stop();
            dst.pager.shutdown().unwrap();
            dst.vm.shutdown().unwrap();
            done_tx.send(()).unwrap();
        });
        done.recv_timeout(DEADLINE)
            .expect("teardown hung on the blocked vCPU");
    });
    assert_eq!(dst.vm.status(), tern_vmm::VmStatus::Shutdown);
    assert_eq!(
        dst.vm.heartbeats().count,
        count,
        "the guest ran on a page it never received"
    );
    assert_eq!(dst.pager.stats().pages_placed, 0);
    // The server waits at the gate until `_never` drops, after `dst`: do not join it in Drop.
    dst.server.take();
}
