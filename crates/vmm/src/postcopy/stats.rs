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
    /// Page waits by power of two: bucket i counts waits of `2^i ..< 2^(i+1)` µs (bucket 0
    /// also below 1 µs, the last also everything longer).
    pub page_wait_histogram: [u64; WAIT_BUCKETS],
}

/// Buckets of [`PagerStats::page_wait_histogram`] (the last starts at 2^31 µs, ~36 min).
pub const WAIT_BUCKETS: usize = 32;

impl PagerStats {
    /// Page waits counted in the histogram.
    pub fn page_waits(&self) -> u64 {
        self.page_wait_histogram.iter().sum()
    }

    /// An upper bound of the `q` quantile (0.0..=1.0) of page waits, from the histogram: the
    /// end of the bucket holding it, so at most twice the true value. `None` before any wait.
    pub fn page_wait_quantile(&self, q: f64) -> Option<Duration> {
        let n = self.page_waits();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.page_wait_histogram.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(
                    Duration::from_micros(1u64 << (i + 1))
                        .min(self.max_page_wait.max(Duration::from_micros(1))),
                );
            }
        }
        Some(self.max_page_wait)
    }
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
    pub histogram: [AtomicU64; WAIT_BUCKETS],
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn waited(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.blocktime_ns.fetch_add(ns, Ordering::Relaxed);
        self.max_wait_ns.fetch_max(ns, Ordering::Relaxed);
        let us = ns / 1000;
        let bucket = if us == 0 { 0 } else { us.ilog2() as usize };
        if let Some(b) = self.histogram.get(bucket.min(WAIT_BUCKETS - 1)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
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
            page_wait_histogram: std::array::from_fn(|i| get(&self.histogram[i])),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_histogram_and_quantiles() {
        let c = Counters::default();
        assert_eq!(c.snapshot(4096).page_wait_quantile(0.5), None);
        for us in [0u64, 3, 5, 6, 7, 40, 100, 100, 100, 9000] {
            c.waited(Duration::from_micros(us));
        }
        let s = c.snapshot(4096);
        assert_eq!(s.page_waits(), 10);
        assert_eq!(s.page_wait_histogram[0], 1, "below 1 µs");
        assert_eq!(s.page_wait_histogram[1], 1, "3 µs");
        assert_eq!(s.page_wait_histogram[2], 3, "5, 6, 7 µs");
        assert_eq!(s.page_wait_histogram[5], 1, "40 µs (32..64)");
        assert_eq!(s.page_wait_histogram[6], 3, "3 × 100 µs (64..128)");
        assert_eq!(s.page_wait_histogram[13], 1, "9000 µs");
        // Median: the 5th wait (7 µs) → bucket 2's end, 8 µs.
        assert_eq!(s.page_wait_quantile(0.5), Some(Duration::from_micros(8)));
        // p99 and max: the longest, capped by the true maximum.
        assert_eq!(
            s.page_wait_quantile(0.99),
            Some(Duration::from_micros(9000))
        );
        assert_eq!(s.page_wait_quantile(1.0), Some(s.max_page_wait));
        assert_eq!(s.page_wait_quantile(0.0), Some(Duration::from_micros(2)));
    }
}
