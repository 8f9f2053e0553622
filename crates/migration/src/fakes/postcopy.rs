//! [`FakePager`]: a [`PostcopySink`] over a [`FakeRam`] whose "guest faults" are driven by the
//! test ([`FakePager::fault`]), standing in for the vmm's userfaultfd pager.

use std::sync::{Arc, Condvar, Mutex};

use super::{lock, FakeRam};
use crate::machine::{
    DirtyBitmap, MachineError, PageRange, PageRequester, PostcopyPagingStats, PostcopySink, RamSink,
};

#[derive(Default)]
struct State {
    probe_error: Option<String>,
    drop_error: Option<String>,
    missing: Vec<DirtyBitmap>,
    requester: Option<Arc<dyn PageRequester>>,
    started: bool,
    finished: bool,
    stats: PostcopyPagingStats,
    /// Pages zeroed by `drop_pages` (the early discard) and by `start`.
    dropped_early: u64,
    dropped_at_start: u64,
}

/// A demand pager in memory; clones share their state.
#[derive(Clone)]
pub struct FakePager {
    ram: FakeRam,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl std::fmt::Debug for FakePager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakePager")
    }
}

impl FakePager {
    /// Pages into `ram` (the destination's [`FakeRam`]).
    pub fn new(ram: FakeRam) -> Self {
        Self {
            ram,
            state: Arc::new((Mutex::new(State::default()), Condvar::new())),
        }
    }

    /// `probe` fails with `reason` (a host without userfaultfd).
    pub fn refuse(&self, reason: &str) {
        lock(&self.state.0).probe_error = Some(reason.into());
    }

    /// `drop_pages` (the early discard) fails with `reason`.
    pub fn refuse_drop(&self, reason: &str) {
        lock(&self.state.0).drop_error = Some(reason.into());
    }

    /// Waits until paging started (`POSTCOPY_LISTEN`).
    pub fn wait_started(&self) {
        let (m, cv) = &*self.state;
        let mut g = lock(m);
        while !g.started {
            g = cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The guest touches `page` of `block`: requested when missing (once, like the pager).
    /// Returns the ranges requested (one per page not requested before).
    pub fn fault(&self, block: u16, page: u32, count: u32) -> Result<u64, MachineError> {
        let (req, ranges) = {
            let mut g = lock(&self.state.0);
            let Some(m) = g.missing.get_mut(usize::from(block)) else {
                return Ok(0);
            };
            let mut ranges = Vec::new();
            for p in u64::from(page)..u64::from(page) + u64::from(count) {
                if m.get(p) {
                    m.unset(p);
                    ranges.push(PageRange {
                        block,
                        first: p as u32,
                        count: 1,
                    });
                }
            }
            g.stats.requests += ranges.len() as u64;
            (g.requester.clone(), ranges)
        };
        match (req, ranges.is_empty()) {
            (Some(r), false) => r.request(&ranges).map(|()| ranges.len() as u64),
            _ => Ok(0),
        }
    }

    /// Pages dropped by the early discard (`drop_pages`) and by `start` (the blackout's share).
    pub fn dropped(&self) -> (u64, u64) {
        let g = lock(&self.state.0);
        (g.dropped_early, g.dropped_at_start)
    }

    /// Whether paging started (`POSTCOPY_LISTEN`).
    pub fn started(&self) -> bool {
        lock(&self.state.0).started
    }

    /// Pages still missing (never placed).
    pub fn finished(&self) -> bool {
        lock(&self.state.0).finished
    }

    /// The counters.
    pub fn paging_stats(&self) -> PostcopyPagingStats {
        lock(&self.state.0).stats.clone()
    }

    fn placed(&self, block: usize, page: u64, bytes: u64) -> bool {
        let mut g = lock(&self.state.0);
        if let Some(m) = g.missing.get_mut(block) {
            m.unset(page);
        }
        g.stats.pages_placed += 1;
        g.stats.bytes_placed += bytes;
        true
    }
}

impl PostcopySink for FakePager {
    fn probe(&mut self) -> Result<(), MachineError> {
        match &lock(&self.state.0).probe_error {
            Some(r) => Err(MachineError::rejected("userfaultfd", r.clone())),
            None => Ok(()),
        }
    }

    fn drop_pages(&mut self, block: usize, runs: &[(u64, u64)]) -> Result<(), MachineError> {
        if let Some(r) = &lock(&self.state.0).drop_error {
            return Err(MachineError::Failed(r.clone()));
        }
        let mut n = 0;
        for &(first, count) in runs {
            for p in first..first + count {
                self.ram.zero_page(block, p)?;
                n += 1;
            }
        }
        lock(&self.state.0).dropped_early += n;
        Ok(())
    }

    fn start(
        &mut self,
        missing: &[DirtyBitmap],
        dropped: &[DirtyBitmap],
        requester: Arc<dyn PageRequester>,
    ) -> Result<(), MachineError> {
        // Like MADV_DONTNEED: a missing page reads zero until it is placed (one dropped early
        // reads zero already).
        let mut n = 0;
        for (b, m) in missing.iter().enumerate() {
            for p in 0..m.pages() {
                if m.get(p) && !dropped.get(b).is_some_and(|d| d.get(p)) {
                    self.ram.zero_page(b, p)?;
                    n += 1;
                }
            }
        }
        let (mx, cv) = &*self.state;
        let mut g = lock(mx);
        g.dropped_at_start += n;
        g.missing = missing.to_vec();
        g.requester = Some(requester);
        g.started = true;
        cv.notify_all();
        Ok(())
    }

    fn place(&mut self, block: usize, page: u64, data: &[u8]) -> Result<bool, MachineError> {
        self.ram.write_page(block, page, data)?;
        Ok(self.placed(block, page, data.len() as u64))
    }

    fn place_zero(&mut self, block: usize, page: u64) -> Result<bool, MachineError> {
        self.ram.zero_page(block, page)?;
        let ps = u64::from(RamSink::page_size(&self.ram));
        Ok(self.placed(block, page, ps))
    }

    fn stats(&self) -> PostcopyPagingStats {
        lock(&self.state.0).stats.clone()
    }

    fn finish(&mut self) -> Result<(), MachineError> {
        lock(&self.state.0).finished = true;
        Ok(())
    }
}
