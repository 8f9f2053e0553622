//! Counters of the demand pager, with QEMU's meaning where QEMU has the number.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A snapshot of the pager's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagerStats {
    /// Fault events read from userfaultfd (every faulting access, repeats included).
    pub faults: u64,
    /// Page ranges requested (QEMU's `postcopy-requests`: one per requested range).
    pub requests: u64,
    /// Pages requested (each at most once).
    pub pages_requested: u64,
    /// Calls of [`super::PageRequester::request`] (one per drain of the fault queue that
    /// needed anything).
    pub batches: u64,
    /// Pages installed with `UFFDIO_COPY` or `UFFDIO_ZEROPAGE`.
    pub pages_placed: u64,
    /// Of those, zero pages (`UFFDIO_ZEROPAGE`).
    pub zero_pages: u64,
    /// Bytes installed (`pages_placed` × page size: QEMU's `postcopy-bytes` on the receiving
    /// side).
    pub bytes_placed: u64,
    /// Placements that found the page already there (`EEXIST`): nothing was written.
    pub already_present: u64,
    /// Faults on pages already here that only needed a wake.
    pub wakes: u64,
    /// Sum over faulted pages of the time from the first fault on the page (as read by the
    /// fault thread) to its placement. Per page: two threads waiting on one page count once.
    /// QEMU's per-vCPU numbers are [`super::Pager::blocktime`].
    pub page_wait_total: Duration,
    /// Longest wait of one faulted page.
    pub max_page_wait: Duration,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub faults: AtomicU64,
    pub requests: AtomicU64,
    pub pages_requested: AtomicU64,
    pub batches: AtomicU64,
    pub pages_placed: AtomicU64,
    pub zero_pages: AtomicU64,
    pub already_present: AtomicU64,
    pub wakes: AtomicU64,
    pub blocktime_ns: AtomicU64,
    pub max_wait_ns: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn waited(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.blocktime_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_wait_ns.fetch_max(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self, page_size: u64) -> PagerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let placed = get(&self.pages_placed);
        PagerStats {
            faults: get(&self.faults),
            requests: get(&self.requests),
            pages_requested: get(&self.pages_requested),
            batches: get(&self.batches),
            pages_placed: placed,
            zero_pages: get(&self.zero_pages),
            bytes_placed: placed * page_size,
            already_present: get(&self.already_present),
            wakes: get(&self.wakes),
            page_wait_total: Duration::from_nanos(get(&self.blocktime_ns)),
            max_page_wait: Duration::from_nanos(get(&self.max_wait_ns)),
        }
    }
}
