//! Who waits for which page, and for how long: the per-page wait, QEMU's per-vCPU blocktime
//! (`postcopy-vcpu-blocktime`: total time each vCPU was blocked on a missing page) and its
//! `postcopy-blocktime` (total time during which every vCPU was blocked at once). Pure
//! bookkeeping over explicit instants; the pager calls it under one lock.
//!
//! A wait starts when the fault thread reads the fault (a few µs after the fault itself) and
//! ends when the page is placed (the placement's wake).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::tracker::PageRef;

/// QEMU's two blocktime numbers for the vCPU threads named by
/// [`super::Pager::set_vcpu_threads`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Blocktime {
    /// Total time during which all vCPUs were blocked at once (`postcopy-blocktime`).
    pub all_vcpus: Duration,
    /// Per vCPU, in the order given, total time blocked (`postcopy-vcpu-blocktime`).
    pub per_vcpu: Vec<Duration>,
}

#[derive(Debug)]
struct PageWait {
    since: Instant,
    threads: Vec<i32>,
}

/// The open waits and the accumulated times.
#[derive(Debug, Default)]
pub struct WaitBook {
    pages: HashMap<PageRef, PageWait>,
    blocked: HashMap<i32, Instant>,
    per_thread: HashMap<i32, Duration>,
    vcpus: Vec<i32>,
    all_since: Option<Instant>,
    all_total: Duration,
}

impl WaitBook {
    /// Names the vCPU threads (kernel thread ids, by vCPU index).
    pub fn set_vcpus(&mut self, tids: &[i32], now: Instant) {
        self.vcpus = tids.to_vec();
        if self.all_since.is_none() && self.all_blocked() {
            self.all_since = Some(now);
        }
    }

    fn all_blocked(&self) -> bool {
        !self.vcpus.is_empty() && self.vcpus.iter().all(|t| self.blocked.contains_key(t))
    }

    /// Thread `tid` faulted on missing page `p` at `now`.
    pub fn fault(&mut self, p: PageRef, tid: i32, now: Instant) {
        let w = self.pages.entry(p).or_insert(PageWait {
            since: now,
            threads: Vec::new(),
        });
        if !w.threads.contains(&tid) {
            w.threads.push(tid);
        }
        self.blocked.entry(tid).or_insert(now);
        if self.all_since.is_none() && self.all_blocked() {
            self.all_since = Some(now);
        }
    }

    /// Page `p` was placed at `now`: its waiters run again. Returns how long the page was
    /// waited for (`None`: nobody faulted on it).
    pub fn placed(&mut self, p: PageRef, now: Instant) -> Option<Duration> {
        let w = self.pages.remove(&p)?;
        for tid in &w.threads {
            if let Some(since) = self.blocked.remove(tid) {
                *self.per_thread.entry(*tid).or_default() += now.saturating_duration_since(since);
                if self.vcpus.contains(tid) {
                    if let Some(all) = self.all_since.take() {
                        self.all_total += now.saturating_duration_since(all);
                    }
                }
            }
        }
        Some(now.saturating_duration_since(w.since))
    }

    /// The blocktimes accumulated so far (waits still open are not counted yet).
    pub fn blocktime(&self) -> Blocktime {
        Blocktime {
            all_vcpus: self.all_total,
            per_vcpu: self
                .vcpus
                .iter()
                .map(|t| self.per_thread.get(t).copied().unwrap_or_default())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(page: u64) -> PageRef {
        PageRef { region: 0, page }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn per_vcpu_and_all_vcpus_blocktime_follow_qemus_definitions() {
        let t0 = Instant::now();
        let mut b = WaitBook::default();
        b.set_vcpus(&[10, 11], t0);
        // vCPU 10 blocked 0..5 on page 1; vCPU 11 blocked 2..9 on page 2; both 2..5.
        b.fault(p(1), 10, t0);
        b.fault(p(2), 11, t0 + ms(2));
        // A second fault of the same thread on the same page keeps the first time.
        b.fault(p(2), 11, t0 + ms(3));
        // A non-vCPU thread (the VMM reading RAM) waits too, but is no vCPU.
        b.fault(p(2), 99, t0 + ms(4));
        assert_eq!(b.placed(p(1), t0 + ms(5)), Some(ms(5)));
        assert_eq!(b.placed(p(2), t0 + ms(9)), Some(ms(7)));
        assert_eq!(b.placed(p(2), t0 + ms(10)), None, "nobody waits any more");
        assert_eq!(b.placed(p(3), t0 + ms(10)), None, "never faulted");
        assert_eq!(
            b.blocktime(),
            Blocktime {
                all_vcpus: ms(3),
                per_vcpu: vec![ms(5), ms(7)]
            }
        );
        // Both blocked again, on one page: the overlap counts once more.
        b.fault(p(4), 11, t0 + ms(20));
        b.fault(p(4), 10, t0 + ms(21));
        b.placed(p(4), t0 + ms(25));
        let bt = b.blocktime();
        assert_eq!(bt.all_vcpus, ms(7));
        assert_eq!(bt.per_vcpu, vec![ms(9), ms(12)]);
    }

    #[test]
    fn without_named_vcpus_only_page_waits_are_known() {
        let t0 = Instant::now();
        let mut b = WaitBook::default();
        b.fault(p(1), 5, t0);
        assert_eq!(b.placed(p(1), t0 + ms(1)), Some(ms(1)));
        assert_eq!(b.blocktime(), Blocktime::default());
        // Naming the vCPUs while all are blocked starts the all-blocked clock then.
        b.fault(p(2), 5, t0 + ms(2));
        b.set_vcpus(&[5], t0 + ms(3));
        b.placed(p(2), t0 + ms(4));
        assert_eq!(b.blocktime().all_vcpus, ms(1));
        // Every thread's waits are kept, so a thread named later has its whole history.
        assert_eq!(b.blocktime().per_vcpu, vec![ms(3)]);
    }
}
