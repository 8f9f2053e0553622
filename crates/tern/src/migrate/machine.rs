//! The migration engine's machine traits over the real VM: RAM pages and dirty log, vCPU run
//! control, and the non-iterative component state. This is the only place where
//! `tern-migration` meets `tern-vmm`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tern_migration::machine::{
    ComponentState, ComponentVersion, CpuidEntry, DirtyBitmap, MachineDescription, MachineError,
    MachineState, PagePlacer, RamBlockInfo, RamSink, RamSource, RamView, VcpuControl,
};
use tern_statedev::StateDevice;
use tern_vmm::{RamRegionInfo, Vm, PAGE_SIZE};

/// Runs `f` and logs (debug) how long it took, with the wall clock, so a guest-felt stall can be
/// matched to what the migration did at that moment (`TERN_LOG=tern::migrate=debug`).
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = std::time::Instant::now();
    let r = f();
    tracing::debug!(took_us = t.elapsed().as_micros() as u64, "{what}");
    r
}

fn failed(op: &str, e: tern_vmm::Error) -> MachineError {
    MachineError::Failed(format!("{op}: {e}"))
}

/// Guest RAM of a VM: the source side reads pages and the dirty log, the destination writes pages.
pub struct VmRam {
    vm: Arc<Vm>,
    regions: Vec<RamRegionInfo>,
    /// Reused per-region buffers for `Vm::sync_dirty_log`.
    scratch: Vec<Vec<u64>>,
    /// Destination only: pages written since the VM was created. RAM of a machine made by
    /// `Vm::new_for_incoming` is fresh anonymous memory, already zero, so a ZERO record for a
    /// page never written needs no write at all: no memset, no page fault, no memory allocated.
    /// Without this, 1 GiB of zero pages cost the destination a 1 GiB memset that lands inside
    /// the downtime (the source is done long before the destination catches up).
    written: Option<Vec<DirtyBitmap>>,
}

impl VmRam {
    pub fn new(vm: Arc<Vm>) -> Self {
        let regions = vm.regions();
        let scratch = regions
            .iter()
            .map(|r| vec![0u64; r.pages().div_ceil(64) as usize])
            .collect();
        Self {
            vm,
            regions,
            scratch,
            written: None,
        }
    }

    /// RAM of a destination machine that nothing has written yet (`Vm::new_for_incoming`).
    pub fn fresh_destination(vm: Arc<Vm>) -> Self {
        let mut r = Self::new(vm);
        r.written = Some(
            r.regions
                .iter()
                .map(|g| DirtyBitmap::new(g.pages()))
                .collect(),
        );
        r
    }

    fn gpa(&self, block: usize, page: u64) -> Result<u64, MachineError> {
        page_gpa(&self.regions, block, page)
    }

    /// Lets `fill` set bits in the cleared per-region scratch bitmaps (the VM's layout) and, when
    /// it returns true, ORs them into the engine's `bitmaps`.
    fn collect(
        &mut self,
        bitmaps: &mut [DirtyBitmap],
        fill: impl FnOnce(&mut [Vec<u64>]) -> Result<bool, MachineError>,
    ) -> Result<bool, MachineError> {
        for s in &mut self.scratch {
            s.fill(0);
        }
        let filled = fill(&mut self.scratch)?;
        if filled {
            for (dst, src) in bitmaps.iter_mut().zip(&self.scratch) {
                for (d, s) in dst.words_mut().iter_mut().zip(src) {
                    *d |= *s;
                }
            }
        }
        Ok(filled)
    }

    fn block_list(&self) -> Vec<RamBlockInfo> {
        self.regions
            .iter()
            .map(|r| RamBlockInfo {
                id: format!("ram{}", r.id),
                gpa: r.gpa,
                size: r.size,
            })
            .collect()
    }
}

impl RamSource for VmRam {
    fn page_size(&self) -> u32 {
        PAGE_SIZE as u32
    }

    fn blocks(&self) -> Vec<RamBlockInfo> {
        self.block_list()
    }

    fn read_page(&mut self, block: usize, page: u64, buf: &mut [u8]) -> Result<(), MachineError> {
        let gpa = self.gpa(block, page)?;
        self.vm
            .read_page(gpa, buf)
            .map_err(|e| failed("reading guest RAM", e))
    }

    fn start_dirty_log(&mut self) -> Result<(), MachineError> {
        timed("start_dirty_log", || self.vm.start_dirty_log())
            .map_err(|e| failed("starting dirty logging", e))
    }

    fn sync_dirty_log(&mut self, bitmaps: &mut [DirtyBitmap]) -> Result<(), MachineError> {
        let vm = self.vm.clone();
        self.collect(bitmaps, |scratch| {
            timed("sync_dirty_log", || vm.sync_dirty_log(scratch))
                .map(|()| true)
                .map_err(|e| failed("syncing the dirty log", e))
        })
        .map(|_| ())
    }

    fn stop_dirty_log(&mut self) -> Result<(), MachineError> {
        timed("stop_dirty_log", || self.vm.stop_dirty_log())
            .map_err(|e| failed("stopping dirty logging", e))
    }

    fn known_zero_pages(&mut self, bitmaps: &mut [DirtyBitmap]) -> Result<bool, MachineError> {
        let vm = self.vm.clone();
        self.collect(bitmaps, |scratch| {
            timed("untouched_pages (mincore)", || vm.untouched_pages(scratch))
                .map_err(|e| failed("finding untouched guest RAM", e))
        })
    }

    fn discard_range(&mut self, block: usize, first: u64, pages: u64) -> Result<(), MachineError> {
        let gpa = self.gpa(block, first)?;
        if pages == 0 {
            return Ok(());
        }
        // The last page must be in the block too (`gpa` checks only the first).
        let last = first
            .checked_add(pages - 1)
            .ok_or_else(|| MachineError::rejected(format!("RAM block {block}"), "page overflow"))?;
        self.gpa(block, last)?;
        timed("discard_range (release-ram)", || {
            self.vm.discard_ram(gpa, pages * PAGE_SIZE)
        })
        .map_err(|e| failed("releasing guest RAM (release-ram)", e))
    }

    fn view(&self) -> Arc<dyn RamView> {
        // The source reads everything: `mincore` cannot tell a never-touched page from one
        // swapped out, and the digest must not share the sender's assumptions.
        Arc::new(VmRamView {
            vm: self.vm.clone(),
            regions: self.regions.clone(),
        })
    }
}

/// Guest RAM read in place for the RAM digest (`x-tern-ram-digest`, vCPUs stopped) and copied
/// by multifd's sender threads (vCPUs running).
struct VmRamView {
    vm: Arc<Vm>,
    regions: Vec<RamRegionInfo>,
}

impl RamView for VmRamView {
    fn with_range(
        &self,
        block: usize,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<(), MachineError> {
        let r = self
            .regions
            .get(block)
            .ok_or_else(|| MachineError::rejected(format!("RAM block {block}"), "no such block"))?;
        self.vm
            .ram()
            .with_host_slice(r.gpa + offset, len, |b| f(b))
            .map_err(|e| failed("reading guest RAM for the digest", e))
    }

    fn copy_range(&self, block: usize, offset: u64, buf: &mut [u8]) -> Result<(), MachineError> {
        let r = self
            .regions
            .get(block)
            .ok_or_else(|| MachineError::rejected(format!("RAM block {block}"), "no such block"))?;
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > r.size) {
            return Err(MachineError::rejected(
                format!("RAM block {block}"),
                format!("{offset:#x}+{len:#x} lies beyond its {:#x} bytes", r.size),
            ));
        }
        // vm-memory's volatile copy: the vCPUs may be writing these pages meanwhile.
        self.vm
            .ram()
            .read(r.gpa + offset, buf)
            .map_err(|e| failed("reading guest RAM for a multifd batch", e))
    }
}

impl RamSink for VmRam {
    fn page_size(&self) -> u32 {
        PAGE_SIZE as u32
    }

    fn blocks(&self) -> Vec<RamBlockInfo> {
        self.block_list()
    }

    fn write_page(&mut self, block: usize, page: u64, data: &[u8]) -> Result<(), MachineError> {
        let gpa = self.gpa(block, page)?;
        if let Some(w) = self.written.as_mut().and_then(|w| w.get_mut(block)) {
            w.set(page);
        }
        if let Some(copy) = test_only_corrupted(gpa, data) {
            return self
                .vm
                .write_page(gpa, &copy)
                .map_err(|e| failed("writing guest RAM", e));
        }
        self.vm
            .write_page(gpa, data)
            .map_err(|e| failed("writing guest RAM", e))
    }

    fn zero_page(&mut self, block: usize, page: u64) -> Result<(), MachineError> {
        let gpa = self.gpa(block, page)?;
        if test_only_corrupts(gpa) {
            return self.write_page(block, page, &[0; PAGE_SIZE as usize]);
        }
        if let Some(w) = self.written.as_ref().and_then(|w| w.get(block)) {
            if !w.get(page) {
                return Ok(());
            }
        }
        self.vm
            .zero_page(gpa)
            .map_err(|e| failed("zeroing guest RAM", e))
    }

    fn read_page(&mut self, block: usize, page: u64, buf: &mut [u8]) -> Result<(), MachineError> {
        RamSource::read_page(self, block, page, buf)
    }

    fn prepare_pages(&mut self, block: usize, first: u64, count: u64) {
        if let Some(w) = self.written.as_ref().and_then(|w| w.get(block)) {
            populate_fresh(&self.vm, &self.regions, block, first, count, |p| w.get(p));
        }
    }

    fn placer(&mut self) -> Result<Arc<dyn PagePlacer>, MachineError> {
        let written = self.written.as_ref().map(|w| {
            w.iter()
                .map(|b| b.words().iter().map(|&x| AtomicU64::new(x)).collect())
                .collect()
        });
        Ok(Arc::new(VmPlacer {
            vm: self.vm.clone(),
            regions: self.regions.clone(),
            written,
        }))
    }
}

/// Guest RAM written by multifd's receiver threads: the host mapping `write_page` uses, and the
/// "written" bitmap (decision 7) as atomic words so a ZERO entry for a page never written still
/// costs nothing.
struct VmPlacer {
    vm: Arc<Vm>,
    regions: Vec<RamRegionInfo>,
    written: Option<Vec<Vec<AtomicU64>>>,
}

impl VmPlacer {
    fn gpa(&self, block: usize, page: u64) -> Result<u64, MachineError> {
        page_gpa(&self.regions, block, page)
    }

    fn word(&self, block: usize, page: u64) -> Option<(&AtomicU64, u64)> {
        let w = self
            .written
            .as_ref()?
            .get(block)?
            .get((page / 64) as usize)?;
        Some((w, 1u64 << (page % 64)))
    }
}

impl PagePlacer for VmPlacer {
    fn write_page(&self, block: usize, page: u64, data: &[u8]) -> Result<(), MachineError> {
        let gpa = self.gpa(block, page)?;
        if let Some((w, bit)) = self.word(block, page) {
            // Ordering: a page's writes of two generations are ordered by the engine's sync
            // barrier (a mutex), so a relaxed bit suffices.
            w.fetch_or(bit, Ordering::Relaxed);
        }
        if let Some(copy) = test_only_corrupted(gpa, data) {
            return self
                .vm
                .write_page(gpa, &copy)
                .map_err(|e| failed("writing guest RAM", e));
        }
        self.vm
            .write_page(gpa, data)
            .map_err(|e| failed("writing guest RAM", e))
    }

    fn read_page(&self, block: usize, page: u64, buf: &mut [u8]) -> Result<(), MachineError> {
        let gpa = self.gpa(block, page)?;
        self.vm
            .read_page(gpa, buf)
            .map_err(|e| failed("reading guest RAM", e))
    }

    fn zero_page(&self, block: usize, page: u64) -> Result<(), MachineError> {
        let gpa = self.gpa(block, page)?;
        if test_only_corrupts(gpa) {
            return self.write_page(block, page, &[0; PAGE_SIZE as usize]);
        }
        if let Some((w, bit)) = self.word(block, page) {
            if w.load(Ordering::Relaxed) & bit == 0 {
                return Ok(());
            }
        }
        self.vm
            .zero_page(gpa)
            .map_err(|e| failed("zeroing guest RAM", e))
    }

    fn prepare_pages(&self, block: usize, first: u64, count: u64) {
        if self.written.is_none() {
            return;
        }
        populate_fresh(&self.vm, &self.regions, block, first, count, |p| {
            self.word(block, p)
                .is_some_and(|(w, bit)| w.load(Ordering::Relaxed) & bit != 0)
        });
    }
}

/// Set once the kernel refused `MADV_POPULATE_WRITE` as unknown (before Linux 5.14): the
/// destination's first writes then fault page by page, as they did before decision 233.
static POPULATE_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// Backs the pages of `block` in `first .. first + count` that were never written (`written`
/// says which were) with host memory, one `MADV_POPULATE_WRITE` per run of them: a fresh
/// destination's first write to a page otherwise costs a page fault each (decision 233). A
/// range outside the block is left alone (the writes that follow report it); a failure only
/// costs the faults it would have saved.
fn populate_fresh(
    vm: &Vm,
    regions: &[RamRegionInfo],
    block: usize,
    first: u64,
    count: u64,
    written: impl Fn(u64) -> bool,
) {
    if POPULATE_UNSUPPORTED.load(Ordering::Relaxed) {
        return;
    }
    let Some(r) = regions.get(block) else {
        return;
    };
    let Some(end) = first.checked_add(count).filter(|&e| e <= r.pages()) else {
        return;
    };
    let mut p = first;
    while p < end {
        if written(p) {
            p += 1;
            continue;
        }
        let start = p;
        while p < end && !written(p) {
            p += 1;
        }
        match vm
            .ram()
            .populate_write(r.gpa + start * PAGE_SIZE, (p - start) * PAGE_SIZE)
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!("MADV_POPULATE_WRITE unknown to this kernel: pages fault in");
                POPULATE_UNSUPPORTED.store(true, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "populating guest RAM before writing it");
                return;
            }
        }
    }
}

/// Run control of the machine: the vCPUs and the extra devices stop and go together (a device's
/// state must not change once the vCPUs are stopped for the switchover). Run-state bookkeeping
/// (QMP STOP/RESUME, `query-status`) happens in the event sink, which the engine calls right
/// after these.
pub struct VmVcpus {
    vm: Arc<Vm>,
    devices: Vec<StateDevice>,
}

impl VmVcpus {
    pub fn new(vm: Arc<Vm>, devices: Vec<StateDevice>) -> Self {
        Self { vm, devices }
    }

    /// Stops the vCPUs, then freezes the devices.
    pub fn pause_all(&self) -> Result<(), MachineError> {
        self.vm
            .pause()
            .map_err(|e| failed("pausing the vCPUs", e))?;
        for d in &self.devices {
            d.pause();
        }
        Ok(())
    }

    /// Lets the devices run, then the vCPUs.
    pub fn resume(&self) -> Result<(), MachineError> {
        for d in &self.devices {
            d.resume();
        }
        self.vm
            .resume()
            .map_err(|e| failed("resuming the vCPUs", e))
    }
}

impl VcpuControl for VmVcpus {
    fn pause(&mut self) -> Result<(), MachineError> {
        self.pause_all()
    }

    fn resume(&mut self) -> Result<(), MachineError> {
        VmVcpus::resume(self)
    }

    fn is_running(&self) -> bool {
        self.vm.is_running()
    }

    fn set_throttle(&mut self, pct: u8) -> Result<(), MachineError> {
        self.vm
            .set_cpu_throttle(pct)
            .map_err(|e| failed("throttling the vCPUs", e))
    }

    fn can_throttle(&self) -> bool {
        true
    }
}

/// What must match between source and destination beyond RAM and vCPU count.
#[derive(serde::Serialize, serde::Deserialize, PartialEq, Eq, Debug)]
struct MachineBlob {
    memory_bytes: u64,
    vcpus: u32,
}

/// The non-iterative machine components (vCPUs, irqchip, PIT, clock, UART, control port,
/// machine config).
pub struct VmComponents(pub Arc<Vm>);

impl VmComponents {
    fn blob(&self) -> MachineBlob {
        let c = self.0.config();
        MachineBlob {
            memory_bytes: c.memory_bytes,
            vcpus: c.vcpus,
        }
    }
}

/// TEST ONLY (`tern run --x-test-only-cpuid-xor` / `--x-test-only-tsc-khz`): makes this
/// process describe a CPU it does not have, so the tests can provoke the CONFIG CPU checks on a
/// single host. Never set in normal operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TestOnlyCpuOverrides {
    /// `(leaf, sub-leaf, register 0..=3 for eax..edx, mask)`: XORed into that compared leaf.
    pub cpuid_xor: Option<(u32, u32, usize, u32)>,
    /// Pretend the guest TSC runs at this rate, on a host that cannot scale it.
    pub tsc_khz: Option<u32>,
}

static TEST_ONLY_CPU_OVERRIDES: OnceLock<TestOnlyCpuOverrides> = OnceLock::new();

/// TEST ONLY: see [`TestOnlyCpuOverrides`]. Set once, at start.
pub fn set_test_only_cpu_overrides(o: TestOnlyCpuOverrides) {
    if o != TestOnlyCpuOverrides::default() {
        let _ = TEST_ONLY_CPU_OVERRIDES.set(o);
    }
}

static TEST_ONLY_CORRUPT_RAM: OnceLock<u64> = OnceLock::new();

/// TEST ONLY (`tern run --x-test-only-corrupt-ram GPA`): an incoming migration writes the page
/// holding `gpa` with that byte flipped, a fault the stream checksum cannot see (the RAM digest
/// must). Set once, at start; never in normal operation.
pub fn set_test_only_corrupt_ram(gpa: u64) {
    let _ = TEST_ONLY_CORRUPT_RAM.set(gpa);
}

/// TEST ONLY: whether `--x-test-only-corrupt-ram` names the page `gpa`. A ZERO entry for it
/// is then written as a zero page with the byte flipped (a `pattern` page whose only byte
/// wrapped to 0 arrives as ZERO: without this the fault was skipped in ~1 run of 256).
fn test_only_corrupts(gpa: u64) -> bool {
    TEST_ONLY_CORRUPT_RAM
        .get()
        .is_some_and(|&bad| bad / PAGE_SIZE == gpa / PAGE_SIZE)
}

/// TEST ONLY: the bytes to write instead of `data` at the page `gpa` when
/// `--x-test-only-corrupt-ram` names it (main stream and multifd channels alike).
fn test_only_corrupted(gpa: u64, data: &[u8]) -> Option<Vec<u8>> {
    let bad = *TEST_ONLY_CORRUPT_RAM.get()?;
    if !test_only_corrupts(gpa) {
        return None;
    }
    let mut copy = data.to_vec();
    if let Some(b) = copy.get_mut((bad % PAGE_SIZE) as usize) {
        *b ^= 0x5a;
    }
    Some(copy)
}

/// The CPU part of CONFIG: the masked CPUID of vCPU 0 and the TSC frequency, with the test-only
/// overrides applied.
fn cpu_description(vm: &Vm) -> (Vec<CpuidEntry>, u32, bool, u32) {
    let id = vm.cpu_identity();
    let mut cpuid: Vec<CpuidEntry> = id
        .cpuid
        .iter()
        .map(|l| CpuidEntry {
            function: l.function,
            index: l.index,
            eax: l.eax,
            ebx: l.ebx,
            ecx: l.ecx,
            edx: l.edx,
        })
        .collect();
    let (mut tsc_khz, mut scaling) = (id.tsc_khz.unwrap_or(0), id.tsc_scaling);
    if let Some(o) = TEST_ONLY_CPU_OVERRIDES.get() {
        if let Some((function, index, reg, mask)) = o.cpuid_xor {
            if let Some(e) = cpuid
                .iter_mut()
                .find(|e| e.function == function && e.index == index)
            {
                match reg {
                    0 => e.eax ^= mask,
                    1 => e.ebx ^= mask,
                    2 => e.ecx ^= mask,
                    _ => e.edx ^= mask,
                }
            }
        }
        if let Some(k) = o.tsc_khz {
            (tsc_khz, scaling) = (k, false);
        }
    }
    (cpuid, tsc_khz, scaling, id.tsc_tolerance_khz)
}

impl MachineState for VmComponents {
    fn describe(&self) -> MachineDescription {
        let c = self.0.config();
        let (cpuid, tsc_khz, tsc_scaling, tsc_tolerance_khz) = cpu_description(&self.0);
        MachineDescription {
            vcpu_count: c.vcpus,
            tsc_khz,
            tsc_tolerance_khz,
            tsc_scaling,
            uuid: c.uuid,
            cpuid,
            machine_blob: serde_json::to_vec(&self.blob()).unwrap_or_default(),
            component_sections: u32::try_from(tern_vmm::state::snapshot::saved_component_count(
                c.vcpus,
            ))
            .ok(),
        }
    }

    fn check_machine_blob(&self, blob: &[u8]) -> Result<(), MachineError> {
        let theirs: MachineBlob = serde_json::from_slice(blob)
            .map_err(|e| MachineError::rejected("machine configuration", e.to_string()))?;
        let ours = self.blob();
        if theirs.memory_bytes != ours.memory_bytes {
            return Err(MachineError::rejected(
                "memory size",
                format!(
                    "source has {} bytes, this machine {}",
                    theirs.memory_bytes, ours.memory_bytes
                ),
            ));
        }
        if theirs.vcpus != ours.vcpus {
            return Err(MachineError::rejected(
                "vCPU count",
                format!("source has {}, this machine {}", theirs.vcpus, ours.vcpus),
            ));
        }
        Ok(())
    }

    fn known_components(&self) -> Vec<ComponentVersion> {
        tern_vmm::state::snapshot::known_components()
            .into_iter()
            .map(|(id, min_version, max_version)| ComponentVersion {
                id: id.to_string(),
                min_version,
                max_version,
            })
            .collect()
    }

    fn save_components(&mut self) -> Result<Vec<ComponentState>, MachineError> {
        let states = self
            .0
            .save_components()
            .map_err(|e| failed("saving the machine state", e))?;
        Ok(states
            .into_iter()
            .map(|s| ComponentState {
                id: s.id,
                instance: s.instance,
                version: s.version,
                data: s.data,
            })
            .collect())
    }

    fn restore_components(&mut self, states: Vec<ComponentState>) -> Result<(), MachineError> {
        let states: Vec<tern_vmm::ComponentState> = states
            .into_iter()
            .map(|s| tern_vmm::ComponentState {
                id: s.id,
                instance: s.instance,
                version: s.version,
                data: s.data,
            })
            .collect();
        self.0
            .restore_components(&states)
            .map_err(|e| MachineError::rejected("machine state", e.to_string()))
    }
}

/// The guest-physical address of `page` of RAM block `block`, checked against `regions` (the
/// block and page numbers come from the peer's stream).
fn page_gpa(regions: &[RamRegionInfo], block: usize, page: u64) -> Result<u64, MachineError> {
    let r = regions
        .get(block)
        .ok_or_else(|| MachineError::rejected(format!("RAM block {block}"), "no such block"))?;
    if page >= r.pages() {
        return Err(MachineError::rejected(
            format!("RAM block {block} page {page}"),
            format!("past the end ({} pages)", r.pages()),
        ));
    }
    Ok(r.gpa + page * PAGE_SIZE)
}
