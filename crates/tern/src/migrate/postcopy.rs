//! Post-copy on the destination: the engine's [`PostcopySink`] over the vmm's demand pager
//! (`tern_vmm::postcopy`, `docs/postcopy.md`). Blocks are the VM's RAM regions in order, as in
//! [`super::machine::VmRam`].

use std::sync::{Arc, Mutex, MutexGuard};

use tern_migration::machine::{
    DirtyBitmap, MachineError, PageRange, PageRequester, PostcopyPagingStats, PostcopySink,
};
use tern_migration::stats::PostcopyLatency;
use tern_vmm::postcopy::{self as pc, GpaRange, Pager, Placement};
use tern_vmm::{RamRegionInfo, Vm, PAGE_SIZE};

/// Where the running pager is kept once the engine is done with the machine: a destination
/// whose source was lost after `POSTCOPY_RUN` keeps its vCPUs blocked on the missing pages
/// (decision 74) until the process tears the VM down with [`PagerSlot::teardown`].
#[derive(Clone, Default)]
pub struct PagerSlot(Arc<Mutex<Option<Arc<Pager>>>>);

impl PagerSlot {
    fn lock(&self) -> MutexGuard<'_, Option<Arc<Pager>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a pager still runs (paging, or kept after the source was lost).
    pub fn is_active(&self) -> bool {
        self.lock().is_some()
    }

    /// Tears a paging destination down in the only order that completes (`docs/postcopy.md`,
    /// "Facts"): the vCPUs are told to stop first, then the pager unregisters (a vCPU blocked
    /// on a page leaves `KVM_RUN` on its pending kick), and the caller then shuts the VM down.
    /// Nothing when no pager runs.
    pub fn teardown(&self, vm: &Vm) {
        let Some(pager) = self.lock().take() else {
            return;
        };
        vm.request_stop();
        if let Err(e) = pager.shutdown() {
            tracing::warn!(error = %pc::error_chain(&e), "post-copy pager shutdown");
        }
    }
}

/// The engine's requester seen from the pager: guest-physical ranges become (block, page)
/// ranges, one call per drain.
struct Requests {
    regions: Vec<RamRegionInfo>,
    engine: Arc<dyn PageRequester>,
}

impl pc::PageRequester for Requests {
    fn request(&self, ranges: &[GpaRange]) -> Result<(), String> {
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            let (block, region) = self
                .regions
                .iter()
                .enumerate()
                .find(|(_, g)| r.gpa >= g.gpa && r.gpa - g.gpa < g.size)
                .ok_or_else(|| format!("fault range at GPA {:#x} outside guest RAM", r.gpa))?;
            let first = (r.gpa - region.gpa) / PAGE_SIZE;
            out.push(PageRange {
                block: u16::try_from(block).map_err(|_| format!("block {block}"))?,
                first: u32::try_from(first).map_err(|_| format!("page {first}"))?,
                count: u32::try_from(r.pages()).map_err(|_| format!("{} pages", r.pages()))?,
            });
        }
        self.engine
            .request(&out)
            .map_err(|e| tern_migration::stats::error_chain(&e))
    }
}

/// [`PostcopySink`] over a [`Vm`]'s RAM.
pub struct VmPostcopy {
    vm: Arc<Vm>,
    regions: Vec<RamRegionInfo>,
    slot: PagerSlot,
}

impl VmPostcopy {
    pub fn new(vm: Arc<Vm>, slot: PagerSlot) -> Self {
        let regions = vm.regions();
        Self { vm, regions, slot }
    }

    fn pager(&self) -> Result<Arc<Pager>, MachineError> {
        self.slot
            .lock()
            .clone()
            .ok_or_else(|| MachineError::Failed("demand paging has not started".into()))
    }

    fn gpa(&self, block: usize, page: u64) -> Result<u64, MachineError> {
        let r = self
            .regions
            .get(block)
            .filter(|r| page < r.pages())
            .ok_or_else(|| {
                MachineError::rejected(format!("RAM block {block} page {page}"), "no such page")
            })?;
        Ok(r.gpa + page * PAGE_SIZE)
    }
}

fn pager_error(op: &str, e: &pc::PagerError) -> MachineError {
    MachineError::Failed(format!("{op}: {}", pc::error_chain(e)))
}

impl PostcopySink for VmPostcopy {
    fn probe(&mut self) -> Result<(), MachineError> {
        pc::probe().map_err(|e| pager_error("userfaultfd demand paging", &e))
    }

    fn drop_pages(&mut self, block: usize, runs: &[(u64, u64)]) -> Result<(), MachineError> {
        let runs: Vec<(usize, u64, u64)> = runs.iter().map(|&(f, n)| (block, f, n)).collect();
        pc::discard_now(self.vm.ram(), &runs)
            .map_err(|e| pager_error("dropping re-dirtied pages (early discard)", &e))
    }

    fn start(
        &mut self,
        missing: &[DirtyBitmap],
        dropped: &[DirtyBitmap],
        requester: Arc<dyn PageRequester>,
    ) -> Result<(), MachineError> {
        // Same layout (bit i of word i/64 = page i), one bitmap per region. Discarded now:
        // the missing pages the early discard did not drop already.
        let words: Vec<Vec<u64>> = missing.iter().map(|m| m.words().to_vec()).collect();
        let discard: Vec<Vec<u64>> = missing
            .iter()
            .enumerate()
            .map(|(b, m)| {
                let d = dropped.get(b).map(DirtyBitmap::words).unwrap_or(&[]);
                m.words()
                    .iter()
                    .enumerate()
                    .map(|(i, w)| w & !d.get(i).copied().unwrap_or(0))
                    .collect()
            })
            .collect();
        let requests = Arc::new(Requests {
            regions: self.regions.clone(),
            engine: requester,
        });
        let pager = Pager::start_with_discard(self.vm.ram().clone(), &words, &discard, requests)
            .map_err(|e| pager_error("starting the demand pager", &e))?;
        let tids: Vec<i32> = self.vm.vcpu_thread_ids().into_iter().flatten().collect();
        pager.set_vcpu_threads(&tids);
        *self.slot.lock() = Some(Arc::new(pager));
        Ok(())
    }

    fn place(&mut self, block: usize, page: u64, data: &[u8]) -> Result<bool, MachineError> {
        let gpa = self.gpa(block, page)?;
        let placed = self
            .pager()?
            .place(gpa, data)
            .map_err(|e| pager_error("UFFDIO_COPY", &e))?;
        Ok(placed == Placement::Placed)
    }

    fn place_zero(&mut self, block: usize, page: u64) -> Result<bool, MachineError> {
        let gpa = self.gpa(block, page)?;
        let placed = self
            .pager()?
            .place_zero(gpa)
            .map_err(|e| pager_error("UFFDIO_ZEROPAGE", &e))?;
        Ok(placed == Placement::Placed)
    }

    fn stats(&self) -> PostcopyPagingStats {
        let Ok(p) = self.pager() else {
            return PostcopyPagingStats::default();
        };
        let s = p.stats();
        let b = p.blocktime();
        PostcopyPagingStats {
            requests: s.requests,
            pages_placed: s.pages_placed,
            bytes_placed: s.bytes_placed,
            blocktime: b.all_vcpus,
            vcpu_blocktime: b.per_vcpu,
            latency: page_wait_latency(&s),
        }
    }

    fn finish(&mut self) -> Result<(), MachineError> {
        let Some(p) = self.slot.lock().take() else {
            return Ok(());
        };
        p.shutdown()
            .map_err(|e| pager_error("stopping the demand pager", &e))
    }
}

/// The pager's fault → placement waits as the engine reports them (`postcopy-latency`,
/// `x-tern-postcopy-latency`); `None` before any page was waited for.
fn page_wait_latency(s: &tern_vmm::postcopy::PagerStats) -> Option<PostcopyLatency> {
    let pages = s.page_waits();
    if pages == 0 {
        return None;
    }
    let n = u32::try_from(pages).unwrap_or(u32::MAX);
    Some(PostcopyLatency {
        pages,
        average: s.page_wait_total / n,
        median: s.page_wait_quantile(0.5).unwrap_or_default(),
        p99: s.page_wait_quantile(0.99).unwrap_or_default(),
        max: s.max_page_wait,
    })
}
