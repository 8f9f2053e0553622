//! [`Pager`]: the destination's demand pager. Owns the userfaultfd, the requested/received
//! bitmaps and the fault thread; installs arriving pages.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use crate::memory::{GuestRam, RamRegionInfo, PAGE_SIZE};

use super::bitmap::set_runs;
use super::blocktime::{Blocktime, WaitBook};
use super::error::PagerError;
use super::fault::{self, FaultSource, UffdSource};
use super::stats::{Counters, PagerStats};
use super::tracker::{GpaRange, PageRef, PageTracker};
use super::uffd::{Placement, UserFd};

/// How the pager asks for pages: implemented by the migration engine (a `REQ_PAGES` on the
/// return path) and by tests.
pub trait PageRequester: Send + Sync {
    /// Asks for `ranges` (one drain of the fault queue, coalesced; every page is asked for at
    /// most once in the pager's life, and never once received). Called on the `uffd-fault`
    /// thread: must not wait for the pages themselves, which arrive through [`Pager::place`]
    /// from another thread. An `Err` stops the fault thread (the reason is kept).
    fn request(&self, ranges: &[GpaRange]) -> Result<(), String>;

    /// The fault thread stopped with `error` (read failure, refused request): faulting
    /// threads stay blocked until the pager is shut down. Default: nothing.
    fn fault_thread_failed(&self, _error: &PagerError) {}
}

/// Distinct faulting thread ids kept (for per-thread attribution; vCPUs are far fewer).
const MAX_THREADS_KEPT: usize = 256;

/// State shared by the pager's handle, its placing callers and the fault thread.
pub(crate) struct Shared {
    /// Keeps the mappings registered with `uffd` alive as long as anything can place.
    ram: Arc<GuestRam>,
    pub uffd: UserFd,
    pub tracker: PageTracker,
    pub counters: Counters,
    pub requester: Arc<dyn PageRequester>,
    /// Open waits and blocktimes.
    waits: Mutex<WaitBook>,
    threads: Mutex<Vec<i32>>,
    failure: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Discards the pages set in `discard` (the missing ones not dropped before), marks every
    /// page not missing received, opens userfaultfd and registers every region
    /// ([`Pager::start`]'s first half).
    pub(crate) fn prepare(
        ram: Arc<GuestRam>,
        missing: &[Vec<u64>],
        discard: &[Vec<u64>],
        requester: Arc<dyn PageRequester>,
    ) -> Result<Shared, PagerError> {
        let regions = ram.regions().to_vec();
        if missing.len() != regions.len() {
            return Err(PagerError::Bitmap(format!(
                "{} bitmaps for {} regions",
                missing.len(),
                regions.len()
            )));
        }
        let tracker = PageTracker::new(&regions);
        let uffd = UserFd::open()?;
        for (i, (r, bits)) in regions.iter().zip(missing).enumerate() {
            if bits.len() < r.bitmap_words() {
                return Err(PagerError::Bitmap(format!(
                    "region {i} has {} pages, its bitmap {} words",
                    r.pages(),
                    bits.len()
                )));
            }
            tracker.mark_received_words(i, bits.iter().map(|w| !w));
        }
        if discard.len() != regions.len() {
            return Err(PagerError::Bitmap(format!(
                "{} discard bitmaps for {} regions",
                discard.len(),
                regions.len()
            )));
        }
        discard_missing(&regions, discard)?;
        for r in &regions {
            uffd.register(r)?;
        }
        Ok(Shared {
            ram,
            uffd,
            tracker,
            counters: Counters::default(),
            requester,
            waits: Mutex::new(WaitBook::default()),
            threads: Mutex::new(Vec::new()),
            failure: Mutex::new(None),
        })
    }

    pub fn note_thread(&self, tid: i32) {
        let mut t = lock(&self.threads);
        if !t.contains(&tid) && t.len() < MAX_THREADS_KEPT {
            t.push(tid);
        }
    }

    /// Thread `tid` waits for page `p` since `now`.
    pub fn start_wait(&self, p: PageRef, tid: i32, now: Instant) {
        let mut w = lock(&self.waits);
        w.fault(p, tid, now);
        // Placed between the verdict and here (its `end_wait` came first): close the wait.
        // `mark_received` precedes `end_wait`'s lock, so one of the two sees the other.
        if self.tracker.is_received(p) {
            if let Some(d) = w.placed(p, Instant::now()) {
                self.counters.waited(d);
            }
        }
    }

    fn end_wait(&self, p: PageRef) {
        if let Some(d) = lock(&self.waits).placed(p, Instant::now()) {
            self.counters.waited(d);
        }
    }

    fn host_gpa(&self, p: PageRef) -> Result<(u64, u64), PagerError> {
        let gpa = self.tracker.gpa(p).unwrap_or(u64::MAX);
        match self.tracker.host(p) {
            Some(host) => Ok((host, gpa)),
            None => Err(PagerError::NotAPage {
                gpa,
                len: PAGE_SIZE,
            }),
        }
    }

    /// A fault on a page the tracker holds as here: either its placement raced the fault (the
    /// page exists: wake), or it was never missing but never populated either (a zero page the
    /// pre-copy did not write): install the zero page, which also wakes.
    pub fn resolve_present(&self, p: PageRef) -> Result<(), PagerError> {
        let (host, gpa) = self.host_gpa(p)?;
        // SAFETY: `host` is the start of page `p` of a region of `self.ram` (the tracker was
        // built from its regions), registered with `self.uffd` and mapped while `self.ram`
        // lives, which `self` keeps alive.
        if unsafe { self.uffd.zeropage(host, gpa) }? == Placement::AlreadyPresent {
            self.uffd.wake(host, gpa)?;
        }
        Counters::add(&self.counters.wakes, 1);
        Ok(())
    }

    fn finish_place(&self, p: PageRef, host: u64, gpa: u64, placed: Placement, zero: bool) {
        match placed {
            Placement::Placed => {
                Counters::add(&self.counters.pages_placed, 1);
                if zero {
                    Counters::add(&self.counters.zero_pages, 1);
                }
            }
            Placement::AlreadyPresent => {
                Counters::add(&self.counters.already_present, 1);
                // Whoever installed it woke its waiters; a wake more is harmless.
                if let Err(e) = self.uffd.wake(host, gpa) {
                    tracing::warn!("{e}");
                }
            }
        }
        self.tracker.mark_received(p);
        self.end_wait(p);
    }

    fn page(&self, gpa: u64, len: u64) -> Result<(PageRef, u64), PagerError> {
        let p = self
            .tracker
            .locate_gpa(gpa)
            .filter(|_| len == PAGE_SIZE)
            .ok_or(PagerError::NotAPage { gpa, len })?;
        Ok((p, self.host_gpa(p)?.0))
    }
}

/// The destination's demand pager over one machine's guest RAM (see `docs/postcopy.md`).
pub struct Pager {
    shared: Arc<Shared>,
    stop: EventFd,
    thread: Mutex<Option<JoinHandle<Result<(), PagerError>>>>,
    registered: AtomicBool,
}

impl std::fmt::Debug for Pager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pager")
            .field("stats", &self.stats())
            .field("missing_pages", &self.missing_pages())
            .finish()
    }
}

impl Pager {
    /// Starts paging `ram`: every page whose bit is set in `missing` (one bitmap per region,
    /// bit i = page i, the dirty-log layout) is discarded (`MADV_DONTNEED`) and will be
    /// fetched on first touch; every other page counts as received. Then every region is
    /// registered in MISSING mode (kernel-mode faults included) and the `uffd-fault` thread
    /// starts. Nothing may touch guest RAM between the call's start and its return (the guest
    /// must be stopped). On an error the pages marked missing may already be discarded (and
    /// nothing stays registered): the destination cannot run that guest any more, so ADVISE
    /// checks [`super::probe`] first.
    pub fn start(
        ram: Arc<GuestRam>,
        missing: &[Vec<u64>],
        requester: Arc<dyn PageRequester>,
    ) -> Result<Pager, PagerError> {
        Self::start_with_discard(ram, missing, missing, requester)
    }

    /// [`Pager::start`] that discards only the pages set in `discard` (one bitmap per region,
    /// a subset of `missing`): the missing pages dropped before with [`discard_now`] and not
    /// written since are registered missing without a second `MADV_DONTNEED` (the early
    /// discard, decision 200). A page in `missing` but not in `discard` must not be populated
    /// (dropped and untouched, or never written): the guest would read it without a fault.
    pub fn start_with_discard(
        ram: Arc<GuestRam>,
        missing: &[Vec<u64>],
        discard: &[Vec<u64>],
        requester: Arc<dyn PageRequester>,
    ) -> Result<Pager, PagerError> {
        let shared = Arc::new(Shared::prepare(ram, missing, discard, requester)?);
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| PagerError::Os {
            context: "creating the stop eventfd",
            source,
        })?;
        let stop_clone = stop.try_clone().map_err(|source| PagerError::Os {
            context: "cloning the stop eventfd",
            source,
        })?;
        let source = UffdSource::new(shared.clone(), stop_clone);
        Self::spawn(shared, stop, Box::new(source))
    }

    /// [`Pager::start`] with every page missing (a destination that received nothing yet).
    pub fn start_all_missing(
        ram: Arc<GuestRam>,
        requester: Arc<dyn PageRequester>,
    ) -> Result<Pager, PagerError> {
        let all: Vec<Vec<u64>> = ram
            .regions()
            .iter()
            .map(|r| vec![u64::MAX; r.bitmap_words()])
            .collect();
        Self::start(ram, &all, requester)
    }

    pub(crate) fn spawn(
        shared: Arc<Shared>,
        stop: EventFd,
        mut source: Box<dyn FaultSource>,
    ) -> Result<Pager, PagerError> {
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("uffd-fault".into())
            .spawn(move || {
                let r = fault::run(&s, source.as_mut());
                if let Err(e) = &r {
                    tracing::error!("uffd-fault thread stopped: {e}");
                    *lock(&s.failure) = Some(error_chain(e));
                    s.requester.fault_thread_failed(e);
                }
                r
            })
            .map_err(|e| PagerError::Thread(format!("spawning uffd-fault: {e}")))?;
        Ok(Pager {
            shared,
            stop,
            thread: Mutex::new(Some(thread)),
            registered: AtomicBool::new(true),
        })
    }

    /// Installs one arriving page (`UFFDIO_COPY`, which wakes every thread faulting on it).
    /// A page already there (`EEXIST`: placed before, or never missing) is left as it is and
    /// reported as [`Placement::AlreadyPresent`]; whether that is an error is the caller's
    /// rule (decision 73).
    pub fn place(&self, gpa: u64, bytes: &[u8]) -> Result<Placement, PagerError> {
        let s = &self.shared;
        let (p, host) = s.page(gpa, bytes.len() as u64)?;
        // SAFETY: `page` found `host` as the start of one page of a region of `s.ram`,
        // registered with `s.uffd` and mapped while `s.ram` lives (held by `s`); `bytes` is
        // exactly one page (checked by `page`).
        let placed = unsafe { s.uffd.copy(host, bytes, gpa) }?;
        s.finish_place(p, host, gpa, placed, false);
        Ok(placed)
    }

    /// Installs a zero page (`UFFDIO_ZEROPAGE`, waking its faulters); `EEXIST` as in
    /// [`Pager::place`].
    pub fn place_zero(&self, gpa: u64) -> Result<Placement, PagerError> {
        let s = &self.shared;
        let (p, host) = s.page(gpa, PAGE_SIZE)?;
        // SAFETY: as in `place`: `host` is one registered, mapped page of `s.ram`.
        let placed = unsafe { s.uffd.zeropage(host, gpa) }?;
        s.finish_place(p, host, gpa, placed, true);
        Ok(placed)
    }

    /// Whether the page at `gpa` is here (received or never missing).
    pub fn is_received(&self, gpa: u64) -> bool {
        self.shared
            .tracker
            .locate_gpa(gpa)
            .is_some_and(|p| self.shared.tracker.is_received(p))
    }

    /// Whether the page at `gpa` was ever requested.
    pub fn is_requested(&self, gpa: u64) -> bool {
        self.shared
            .tracker
            .locate_gpa(gpa)
            .is_some_and(|p| self.shared.tracker.is_requested(p))
    }

    /// The received bitmap per region (bit i = page i; never-missing pages set): what a
    /// recovery sends the source so it resends only the rest.
    pub fn received_bitmaps(&self) -> Vec<Vec<u64>> {
        self.shared.tracker.received_bitmaps()
    }

    /// Pages not here yet.
    pub fn missing_pages(&self) -> u64 {
        self.shared.tracker.missing_pages()
    }

    /// The regions paged.
    pub fn regions(&self) -> Vec<RamRegionInfo> {
        self.shared.tracker.regions().copied().collect()
    }

    /// The counters now.
    pub fn stats(&self) -> PagerStats {
        self.shared.counters.snapshot(PAGE_SIZE)
    }

    /// Kernel thread ids that faulted (first 256 distinct), in first-fault order.
    pub fn faulting_threads(&self) -> Vec<i32> {
        lock(&self.shared.threads).clone()
    }

    /// Names the vCPU threads (kernel thread ids by vCPU index, e.g. from
    /// [`crate::Vm::vcpu_thread_ids`]) for [`Pager::blocktime`].
    pub fn set_vcpu_threads(&self, tids: &[i32]) {
        lock(&self.shared.waits).set_vcpus(tids, Instant::now());
    }

    /// QEMU's `postcopy-blocktime` and `postcopy-vcpu-blocktime` for the vCPU threads named
    /// by [`Pager::set_vcpu_threads`] (waits still open are not counted yet).
    pub fn blocktime(&self) -> Blocktime {
        lock(&self.shared.waits).blocktime()
    }

    /// Why the fault thread stopped, if it failed (its error with causes).
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.failure).clone()
    }

    /// Stops and joins the fault thread, then unregisters every region. Threads still blocked
    /// on a missing page are woken by the unregistration and read zeros there: call this once
    /// every page is placed, or when the guest is torn down. Returns the fault thread's error
    /// if it had failed. Idempotent.
    pub fn shutdown(&self) -> Result<(), PagerError> {
        let thread = lock(&self.thread).take();
        let mut result = Ok(());
        if let Some(t) = thread {
            if let Err(e) = self.stop.write(1) {
                tracing::warn!("pager stop eventfd: {e}");
            }
            result = match t.join() {
                Ok(r) => r,
                Err(_) => Err(PagerError::Thread("uffd-fault panicked".into())),
            };
        }
        if self.registered.swap(false, Ordering::AcqRel) {
            for r in self.shared.tracker.regions() {
                let u = self.shared.uffd.unregister(r);
                if result.is_ok() {
                    result = u;
                }
            }
        }
        tracing::debug!(ram_bytes = self.shared.ram.total_bytes(), "pager shut down");
        result
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!("pager shutdown: {}", error_chain(&e));
        }
    }
}

/// Below this many missing pages the discard stays on the calling thread.
const PARALLEL_DISCARD_PAGES: u64 = 8192;

/// The early discard (decision 200): `MADV_DONTNEED` over `(region, first page, pages)` runs
/// of `ram` now, before any [`Pager`] exists, so that [`Pager::start_with_discard`] need not
/// free them while the guest is stopped. A run outside its region is refused before anything
/// is dropped. The caller guarantees nothing uses those pages meanwhile (the destination's
/// guest has not run yet). One thread, unlike the discard at the start (decision 206): the
/// guest still runs on the source meanwhile, and where source and destination share cores a
/// second discard thread takes one from its vCPUs (the blackout then begins before the stop).
pub fn discard_now(ram: &GuestRam, runs: &[(usize, u64, u64)]) -> Result<(), PagerError> {
    let regions = ram.regions();
    for &(i, first, count) in runs {
        let inside = regions
            .get(i)
            .is_some_and(|r| first.checked_add(count).is_some_and(|end| end <= r.pages()));
        if !inside {
            return Err(PagerError::Bitmap(format!(
                "discard of region {i} pages {first}+{count}: outside guest RAM"
            )));
        }
    }
    discard_runs(regions, runs)
}

/// `MADV_DONTNEED` over every run of set bits of `missing` (one bitmap per region). Freeing
/// the pages is most of `Pager::start`'s time while the guest is stopped (131 072 pages: ~50 ms
/// on one core here), so a large discard is split in two halves by pages, the second done on a
/// helper thread `uffd-discard` (decision 142).
fn discard_missing(regions: &[RamRegionInfo], missing: &[Vec<u64>]) -> Result<(), PagerError> {
    let mut runs: Vec<(usize, u64, u64)> = Vec::new();
    for (i, (r, bits)) in regions.iter().zip(missing).enumerate() {
        runs.extend(
            set_runs(bits, r.pages())
                .into_iter()
                .map(|(f, n)| (i, f, n)),
        );
    }
    discard_split(regions, runs)
}

/// [`discard_runs`], on two threads above [`PARALLEL_DISCARD_PAGES`].
fn discard_split(regions: &[RamRegionInfo], runs: Runs) -> Result<(), PagerError> {
    let total: u64 = runs.iter().map(|r| r.2).sum();
    if total < PARALLEL_DISCARD_PAGES {
        return discard_runs(regions, &runs);
    }
    let (first, second) = split_runs(runs, total / 2);
    std::thread::scope(|s| {
        let helper = std::thread::Builder::new()
            .name("uffd-discard".into())
            .spawn_scoped(s, || discard_runs(regions, &second));
        let mine = discard_runs(regions, &first);
        let theirs = match helper {
            Ok(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
            // No thread: this one does both halves.
            Err(_) => discard_runs(regions, &second),
        };
        mine.and(theirs)
    })
}

/// `(region, first page, pages)` runs.
type Runs = Vec<(usize, u64, u64)>;

/// `runs` cut after `pages` pages (a run may be cut in two).
fn split_runs(runs: Runs, pages: u64) -> (Runs, Runs) {
    let (mut first, mut second) = (Vec::new(), Vec::new());
    let mut left = pages;
    for (i, f, n) in runs {
        if left >= n {
            first.push((i, f, n));
            left -= n;
        } else {
            if left > 0 {
                first.push((i, f, left));
            }
            second.push((i, f + left, n - left));
            left = 0;
        }
    }
    (first, second)
}

/// `MADV_DONTNEED` over `(region, first page, pages)` runs.
fn discard_runs(regions: &[RamRegionInfo], runs: &[(usize, u64, u64)]) -> Result<(), PagerError> {
    for &(i, first, count) in runs {
        let r = &regions[i];
        let (off, len) = (first * PAGE_SIZE, count * PAGE_SIZE);
        // SAFETY: `host_addr + off .. + len` lies inside region `r`'s live anonymous private
        // mapping (`set_runs` stays below `r.pages()`, a cut run stays inside its run; the
        // mapping is owned by the `GuestRam` the caller holds); MADV_DONTNEED only drops its
        // pages, which then read as missing (zero-fill, or a fault once registered). The
        // caller guarantees nothing uses guest RAM meanwhile.
        let ret = unsafe {
            libc::madvise(
                (r.host_addr + off) as *mut libc::c_void,
                len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if ret != 0 {
            return Err(PagerError::Discard {
                gpa: r.gpa + off,
                len,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

/// The error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod split_tests {
    use super::split_runs;

    #[test]
    fn runs_split_by_pages_cut_a_run_and_lose_none() {
        let runs = vec![(0, 0, 3), (0, 10, 4), (1, 0, 5)];
        let (a, b) = split_runs(runs.clone(), 6);
        assert_eq!(a, vec![(0, 0, 3), (0, 10, 3)]);
        assert_eq!(b, vec![(0, 13, 1), (1, 0, 5)]);
        let (a, b) = split_runs(runs.clone(), 7);
        assert_eq!((a.len(), b), (2, vec![(1, 0, 5)]));
        assert_eq!(split_runs(runs.clone(), 0), (vec![], runs.clone()));
        assert_eq!(split_runs(runs.clone(), 12), (runs, vec![]));
    }
}
