//! In-memory fakes of the [`crate::machine`] traits, for the engine's tests and for the glue's
//! own tests: RAM of a few MiB with a background "guest" thread dirtying pages at a
//! configurable rate, vCPU run control that really stops that thread, device handlers with
//! pre-copy data, loaders that approve the switchover (or never do), and a machine whose
//! components can be made to fail on restore.
//!
//! Everything is observable after a migration through the shared handles (`Arc` inside).
//!
//! Test code only: compiled with `cfg(test)` or the `fakes` cargo feature, which test targets
//! enable through their dev-dependencies; the production library does not contain it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use uuid::Uuid;

use crate::machine::{
    ComponentState, ComponentVersion, DirtyBitmap, MachineDescription, MachineError, MachineState,
    PagePlacer, RamBlockInfo, RamSink, RamSource, RamView, StateHandler, StateLoader,
    SwitchoverApproval,
};

mod postcopy;
mod vcpus;
pub use postcopy::FakePager;
pub use vcpus::{Dirtier, FakeVcpus};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A one-shot flag a test can wait on (set by a fake when something happens).
#[derive(Debug, Clone, Default)]
pub struct Signal {
    inner: Arc<(Mutex<bool>, Condvar)>,
}

impl Signal {
    /// An unset signal.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets it and wakes the waiters.
    pub fn set(&self) {
        *lock(&self.inner.0) = true;
        self.inner.1.notify_all();
    }

    /// Whether it is set.
    pub fn is_set(&self) -> bool {
        *lock(&self.inner.0)
    }

    /// Blocks until it is set.
    pub fn wait(&self) {
        let mut g = lock(&self.inner.0);
        while !*g {
            g = self.inner.1.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Small deterministic PRNG (xorshift64*): fakes must not depend on `rand`.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// Seeded generator (seed 0 is replaced by a constant).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[derive(Debug)]
struct RamState {
    page_size: u32,
    blocks: Vec<RamBlockInfo>,
    mem: Vec<Vec<u8>>,
    dirty: Vec<DirtyBitmap>,
    logging: bool,
    log_starts: u32,
    log_stops: u32,
    syncs: u64,
    writes_while_logging_off: u64,
    /// `release-ram`: pages the engine released (`discard_range`); reading one gives
    /// [`RELEASED_BYTE`]s, so a released page sent again cannot go unnoticed, while `mem`
    /// keeps the contents for the tests' comparisons.
    released: Vec<DirtyBitmap>,
    /// `discard_range` fails (a machine that cannot free memory).
    refuse_discard: bool,
    /// Destination: pages announced by `prepare_pages` and not written since.
    prepared: Vec<DirtyBitmap>,
    /// Destination: `prepare_pages` calls and the pages they announced.
    prepare_calls: u64,
    prepared_pages: u64,
    /// Destination: pages written with data that no `prepare_pages` announced first.
    unprepared_writes: u64,
}

/// What a released page of a [`FakeRam`] reads as (real anonymous memory would read zeros,
/// which a test could not tell from a zero page).
pub const RELEASED_BYTE: u8 = 0xdb;

/// Optional hooks on [`FakeRam`] so a test can hold the sender inside a phase.
#[derive(Debug, Clone, Default)]
pub struct RamHooks {
    /// Set when `start_dirty_log` is entered.
    pub entered_setup: Signal,
    /// When present, `start_dirty_log` blocks until it is set.
    pub setup_gate: Option<Signal>,
}

/// Guest RAM in memory; implements both [`RamSource`] and [`RamSink`]. Clones share the memory.
#[derive(Debug, Clone)]
pub struct FakeRam {
    inner: Arc<Mutex<RamState>>,
    /// Test hooks.
    pub hooks: RamHooks,
}

impl FakeRam {
    /// Zeroed RAM with the given blocks (`(id, gpa, size)`).
    pub fn new(page_size: u32, blocks: &[(&str, u64, u64)]) -> Self {
        let blocks: Vec<RamBlockInfo> = blocks
            .iter()
            .map(|(id, gpa, size)| RamBlockInfo {
                id: (*id).to_owned(),
                gpa: *gpa,
                size: *size,
            })
            .collect();
        let mem = blocks.iter().map(|b| vec![0u8; b.size as usize]).collect();
        let dirty: Vec<DirtyBitmap> = blocks
            .iter()
            .map(|b| DirtyBitmap::new(b.pages(page_size)))
            .collect();
        let released = dirty.clone();
        let prepared = dirty.clone();
        Self {
            inner: Arc::new(Mutex::new(RamState {
                page_size,
                blocks,
                mem,
                dirty,
                logging: false,
                log_starts: 0,
                log_stops: 0,
                syncs: 0,
                writes_while_logging_off: 0,
                released,
                refuse_discard: false,
                prepared,
                prepare_calls: 0,
                prepared_pages: 0,
                unprepared_writes: 0,
            })),
            hooks: RamHooks::default(),
        }
    }

    /// Destination: `(prepare_pages calls, pages they announced, pages written with data
    /// that no prepare_pages announced first)`.
    pub fn prepare_counts(&self) -> (u64, u64, u64) {
        let g = lock(&self.inner);
        (g.prepare_calls, g.prepared_pages, g.unprepared_writes)
    }

    /// Two blocks (3 MiB at 0 and 1 MiB at 4 GiB), 4 KiB pages: small but with more than one
    /// block so block indexes are exercised.
    pub fn small() -> Self {
        Self::new(4096, &[("ram0", 0, 3 << 20), ("ram1", 1 << 32, 1 << 20)])
    }

    /// Fills about `percent`% of the pages with pseudo-random bytes, leaving the rest zero.
    pub fn fill_random(&self, percent: u64, seed: u64) {
        let mut rng = XorShift::new(seed);
        let mut g = lock(&self.inner);
        let ps = g.page_size as usize;
        for block in &mut g.mem {
            for page in block.chunks_mut(ps) {
                if rng.next_u64() % 100 < percent {
                    for b in page.iter_mut() {
                        *b = rng.next_u64() as u8;
                    }
                }
            }
        }
    }

    /// Total number of pages.
    pub fn total_pages(&self) -> u64 {
        let g = lock(&self.inner);
        g.blocks.iter().map(|b| b.pages(g.page_size)).sum()
    }

    /// Writes `value` at byte `offset` of the page with global index `n` (pages of all blocks
    /// numbered in order), marking it dirty when logging is on: one guest write.
    pub fn guest_write(&self, n: u64, offset: usize, value: u64) {
        let mut g = lock(&self.inner);
        let ps = g.page_size as usize;
        let mut n = n;
        for i in 0..g.blocks.len() {
            let pages = g.blocks[i].pages(g.page_size);
            if n < pages {
                let off = (n as usize) * ps + (offset % (ps - 7));
                g.mem[i][off..off + 8].copy_from_slice(&value.to_le_bytes());
                if g.logging {
                    g.dirty[i].set(n);
                } else {
                    g.writes_while_logging_off += 1;
                }
                return;
            }
            n -= pages;
        }
    }

    /// A copy of every block's bytes.
    pub fn contents(&self) -> Vec<Vec<u8>> {
        lock(&self.inner).mem.clone()
    }

    /// The first page (block, page) whose contents differ from `other`'s, if any.
    pub fn first_difference(&self, other: &FakeRam) -> Option<(usize, u64)> {
        let a = self.contents();
        let b = other.contents();
        let ps = lock(&self.inner).page_size as usize;
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            for (p, (px, py)) in x.chunks(ps).zip(y.chunks(ps)).enumerate() {
                if px != py {
                    return Some((i, p as u64));
                }
            }
        }
        (a.len() != b.len()).then_some((a.len().min(b.len()), 0))
    }

    /// Whether dirty logging is on now.
    pub fn logging(&self) -> bool {
        lock(&self.inner).logging
    }

    /// From now on `discard_range` fails, as on a machine that cannot free memory.
    pub fn refuse_discards(&self) {
        lock(&self.inner).refuse_discard = true;
    }

    /// `release-ram`: pages released so far (`discard_range`).
    pub fn released_pages(&self) -> u64 {
        lock(&self.inner)
            .released
            .iter()
            .map(DirtyBitmap::count)
            .sum()
    }

    /// (start_dirty_log calls, stop_dirty_log calls, syncs).
    pub fn log_calls(&self) -> (u32, u32, u64) {
        let g = lock(&self.inner);
        (g.log_starts, g.log_stops, g.syncs)
    }
}

impl RamSource for FakeRam {
    fn page_size(&self) -> u32 {
        lock(&self.inner).page_size
    }

    fn blocks(&self) -> Vec<RamBlockInfo> {
        lock(&self.inner).blocks.clone()
    }

    fn read_page(&mut self, block: usize, page: u64, buf: &mut [u8]) -> Result<(), MachineError> {
        let g = lock(&self.inner);
        let ps = g.page_size as usize;
        let start = page as usize * ps;
        let src = g
            .mem
            .get(block)
            .and_then(|m| m.get(start..start + ps))
            .ok_or_else(|| MachineError::rejected("read_page", format!("{block}/{page}")))?;
        buf.copy_from_slice(src);
        if g.released.get(block).is_some_and(|r| r.get(page)) {
            buf.fill(RELEASED_BYTE);
        }
        Ok(())
    }

    fn start_dirty_log(&mut self) -> Result<(), MachineError> {
        self.hooks.entered_setup.set();
        if let Some(gate) = &self.hooks.setup_gate {
            gate.wait();
        }
        let mut g = lock(&self.inner);
        g.logging = true;
        g.log_starts += 1;
        for d in &mut g.dirty {
            d.clear();
        }
        Ok(())
    }

    fn sync_dirty_log(&mut self, bitmaps: &mut [DirtyBitmap]) -> Result<(), MachineError> {
        let mut g = lock(&self.inner);
        g.syncs += 1;
        for (out, d) in bitmaps.iter_mut().zip(g.dirty.iter_mut()) {
            out.or_with(d);
            d.clear();
        }
        Ok(())
    }

    fn stop_dirty_log(&mut self) -> Result<(), MachineError> {
        let mut g = lock(&self.inner);
        g.logging = false;
        g.log_stops += 1;
        Ok(())
    }

    fn known_zero_pages(&mut self, _bitmaps: &mut [DirtyBitmap]) -> Result<bool, MachineError> {
        Ok(false)
    }

    fn view(&self) -> Arc<dyn RamView> {
        Arc::new(self.clone())
    }

    fn discard_range(&mut self, block: usize, first: u64, pages: u64) -> Result<(), MachineError> {
        let mut g = lock(&self.inner);
        if g.refuse_discard {
            return Err(MachineError::Failed("this fake cannot free memory".into()));
        }
        let r = g
            .released
            .get_mut(block)
            .filter(|r| first.checked_add(pages).is_some_and(|end| end <= r.pages()))
            .ok_or_else(|| {
                MachineError::rejected("discard_range", format!("{block}/{first}+{pages}"))
            })?;
        for p in first..first + pages {
            r.set(p);
        }
        Ok(())
    }
}

impl RamView for FakeRam {
    fn with_range(
        &self,
        block: usize,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(&[u8]),
    ) -> Result<(), MachineError> {
        let g = lock(&self.inner);
        let bytes = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(offset.saturating_add(len)).ok())
            .and_then(|(a, b)| g.mem.get(block).and_then(|m| m.get(a..b)))
            .ok_or_else(|| {
                MachineError::rejected("with_range", format!("{block}/{offset:#x}+{len:#x}"))
            })?;
        // Released pages read as `RELEASED_BYTE`s here too (the sender reads in place).
        let ps = u64::from(g.page_size);
        let released = |p: u64| g.released.get(block).is_some_and(|r| r.get(p));
        let pages = offset / ps..offset.saturating_add(len).div_ceil(ps);
        if pages.clone().any(released) {
            let mut copy = bytes.to_vec();
            for p in pages {
                if released(p) {
                    let at = usize::try_from((p * ps).saturating_sub(offset)).unwrap_or(usize::MAX);
                    if let Some(c) = copy.get_mut(at..at.saturating_add(ps as usize)) {
                        c.fill(RELEASED_BYTE);
                    }
                }
            }
            f(&copy);
        } else {
            f(bytes);
        }
        Ok(())
    }

    fn copy_range(&self, block: usize, offset: u64, buf: &mut [u8]) -> Result<(), MachineError> {
        let len = buf.len() as u64;
        let mut copied = false;
        self.with_range(block, offset, len, &mut |b| {
            if b.len() == buf.len() {
                buf.copy_from_slice(b);
                copied = true;
            }
        })?;
        if copied {
            Ok(())
        } else {
            Err(MachineError::rejected(
                "copy_range",
                format!("{block}/{offset:#x}+{len:#x}"),
            ))
        }
    }
}

/// Multifd's receivers write through clones (they share the memory).
impl PagePlacer for FakeRam {
    fn write_page(&self, block: usize, page: u64, data: &[u8]) -> Result<(), MachineError> {
        RamSink::write_page(&mut self.clone(), block, page, data)
    }

    fn zero_page(&self, block: usize, page: u64) -> Result<(), MachineError> {
        RamSink::zero_page(&mut self.clone(), block, page)
    }

    fn prepare_pages(&self, block: usize, first: u64, count: u64) {
        RamSink::prepare_pages(&mut self.clone(), block, first, count);
    }

    fn read_page(&self, block: usize, page: u64, buf: &mut [u8]) -> Result<(), MachineError> {
        RamSource::read_page(&mut self.clone(), block, page, buf)
    }
}

impl RamSink for FakeRam {
    fn page_size(&self) -> u32 {
        lock(&self.inner).page_size
    }

    fn blocks(&self) -> Vec<RamBlockInfo> {
        lock(&self.inner).blocks.clone()
    }

    fn placer(&mut self) -> Result<Arc<dyn PagePlacer>, MachineError> {
        Ok(Arc::new(self.clone()))
    }

    fn write_page(&mut self, block: usize, page: u64, data: &[u8]) -> Result<(), MachineError> {
        let mut g = lock(&self.inner);
        let ps = g.page_size as usize;
        let start = page as usize * ps;
        let dst = g
            .mem
            .get_mut(block)
            .and_then(|m| m.get_mut(start..start + ps))
            .ok_or_else(|| MachineError::rejected("write_page", format!("{block}/{page}")))?;
        dst.copy_from_slice(data);
        match g.prepared.get_mut(block) {
            Some(p) if p.get(page) => p.unset(page),
            _ => g.unprepared_writes += 1,
        }
        Ok(())
    }

    /// Notes the pages (the memory is a `Vec`: nothing to back).
    fn prepare_pages(&mut self, block: usize, first: u64, count: u64) {
        let mut g = lock(&self.inner);
        g.prepare_calls += 1;
        g.prepared_pages += count;
        if let Some(p) = g.prepared.get_mut(block) {
            for page in first..first.saturating_add(count).min(p.pages()) {
                p.set(page);
            }
        }
    }

    fn zero_page(&mut self, block: usize, page: u64) -> Result<(), MachineError> {
        let mut g = lock(&self.inner);
        let ps = g.page_size as usize;
        let start = page as usize * ps;
        let dst = g
            .mem
            .get_mut(block)
            .and_then(|m| m.get_mut(start..start + ps))
            .ok_or_else(|| MachineError::rejected("zero_page", format!("{block}/{page}")))?;
        dst.fill(0);
        Ok(())
    }

    fn read_page(&mut self, block: usize, page: u64, buf: &mut [u8]) -> Result<(), MachineError> {
        RamSource::read_page(self, block, page, buf)
    }
}

/// What a [`FakeDevice`] or [`FakeLoader`] did (shared, inspect after the migration).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeviceLog {
    /// Setup calls.
    pub setups: u32,
    /// Bytes of pre-copy data sent / loaded.
    pub initial_bytes: usize,
    /// Chunks sent / loaded.
    pub chunks: u32,
    /// Final state saved / loaded.
    pub final_state: Option<Vec<u8>>,
    /// Cleanup calls.
    pub cleanups: u32,
    /// Whether the loader approved the switchover.
    pub approved: bool,
}

/// A source device with `initial` bytes of pre-copy data (sent in chunks of at most
/// `chunk` bytes) and a final state.
#[derive(Debug)]
pub struct FakeDevice {
    /// Id.
    pub id: String,
    /// Instance.
    pub instance: u32,
    initial: Vec<u8>,
    sent: usize,
    chunk: usize,
    final_state: Vec<u8>,
    log: Arc<Mutex<DeviceLog>>,
}

impl FakeDevice {
    /// A device named `id` with `initial_len` bytes of initial data and a 64-byte final state.
    pub fn new(id: &str, initial_len: usize, chunk: usize) -> (Self, Arc<Mutex<DeviceLog>>) {
        let log = Arc::new(Mutex::new(DeviceLog::default()));
        let initial = (0..initial_len).map(|i| (i * 7 + 3) as u8).collect();
        let final_state = (0..64u8).map(|i| i ^ 0x5a).collect();
        (
            Self {
                id: id.to_owned(),
                instance: 0,
                initial,
                sent: 0,
                chunk: chunk.max(1),
                final_state,
                log: log.clone(),
            },
            log,
        )
    }

    /// The bytes the loader must end up with (initial data, then the final state).
    pub fn expected(&self) -> (Vec<u8>, Vec<u8>) {
        (self.initial.clone(), self.final_state.clone())
    }
}

impl StateHandler for FakeDevice {
    fn id(&self) -> &str {
        &self.id
    }
    fn instance(&self) -> u32 {
        self.instance
    }
    fn version(&self) -> u32 {
        1
    }
    fn is_iterative(&self) -> bool {
        true
    }
    fn switchover_ack_needed(&self) -> bool {
        true
    }
    fn save_setup(&mut self) -> Result<(), MachineError> {
        self.sent = 0;
        lock(&self.log).setups += 1;
        Ok(())
    }
    fn pending_estimate(&mut self) -> u64 {
        (self.initial.len() - self.sent) as u64
    }
    fn pending_exact(&mut self) -> Result<u64, MachineError> {
        Ok(self.pending_estimate())
    }
    fn save_iterate(&mut self, budget: usize, out: &mut Vec<u8>) -> Result<(), MachineError> {
        let n = budget.min(self.chunk).min(self.initial.len() - self.sent);
        if n > 0 {
            out.extend_from_slice(&self.initial[self.sent..self.sent + n]);
            self.sent += n;
            let mut l = lock(&self.log);
            l.initial_bytes += n;
            l.chunks += 1;
        }
        Ok(())
    }
    fn save_complete(&mut self) -> Result<Vec<u8>, MachineError> {
        lock(&self.log).final_state = Some(self.final_state.clone());
        Ok(self.final_state.clone())
    }
    fn save_cleanup(&mut self) {
        lock(&self.log).cleanups += 1;
    }
}

/// The destination half of a [`FakeDevice`]: approves the switchover once `initial_len` bytes
/// arrived, or never (`approve_after = None`, "never finishes loading").
#[derive(Debug)]
pub struct FakeLoader {
    id: String,
    ack_needed: bool,
    approve_after: Option<usize>,
    initial: Vec<u8>,
    approval: Option<SwitchoverApproval>,
    log: Arc<Mutex<DeviceLog>>,
    /// Bytes received (initial data).
    pub received: Arc<Mutex<Vec<u8>>>,
    /// Set when the loader approved the switchover.
    pub approved: Signal,
}

impl FakeLoader {
    /// A loader for device `id`.
    pub fn new(
        id: &str,
        ack_needed: bool,
        approve_after: Option<usize>,
    ) -> (Self, Arc<Mutex<DeviceLog>>) {
        let log = Arc::new(Mutex::new(DeviceLog::default()));
        (
            Self {
                id: id.to_owned(),
                ack_needed,
                approve_after,
                initial: Vec::new(),
                approval: None,
                log: log.clone(),
                received: Arc::new(Mutex::new(Vec::new())),
                approved: Signal::new(),
            },
            log,
        )
    }

    fn maybe_approve(&mut self) -> Result<(), MachineError> {
        let Some(need) = self.approve_after else {
            return Ok(());
        };
        if self.initial.len() >= need && !lock(&self.log).approved {
            if let Some(a) = &self.approval {
                lock(&self.log).approved = true;
                a.approve()?;
                self.approved.set();
            }
        }
        Ok(())
    }
}

impl StateLoader for FakeLoader {
    fn id(&self) -> &str {
        &self.id
    }
    fn instance(&self) -> u32 {
        0
    }
    fn min_version(&self) -> u32 {
        1
    }
    fn max_version(&self) -> u32 {
        1
    }
    fn switchover_ack_needed(&self) -> bool {
        self.ack_needed
    }
    fn load_setup(&mut self, approval: SwitchoverApproval) -> Result<(), MachineError> {
        lock(&self.log).setups += 1;
        self.approval = Some(approval);
        if self.ack_needed {
            self.maybe_approve()?;
        }
        Ok(())
    }
    fn load_iterate(&mut self, _version: u32, data: &[u8]) -> Result<(), MachineError> {
        self.initial.extend_from_slice(data);
        lock(&self.received).extend_from_slice(data);
        {
            let mut l = lock(&self.log);
            l.initial_bytes += data.len();
            l.chunks += 1;
        }
        if self.ack_needed {
            self.maybe_approve()?;
        }
        Ok(())
    }
    fn load_complete(&mut self, _version: u32, data: &[u8]) -> Result<(), MachineError> {
        lock(&self.log).final_state = Some(data.to_vec());
        Ok(())
    }
    fn load_cleanup(&mut self) {
        lock(&self.log).cleanups += 1;
    }
}

/// Non-iterative machine state: a few components on the source; on the destination it records
/// what was restored, or rejects it with `reject` (to test error propagation).
#[derive(Debug, Clone)]
pub struct FakeMachine {
    /// CONFIG description.
    pub desc: MachineDescription,
    /// Components saved by the source.
    pub components: Vec<ComponentState>,
    /// Destination: components restored.
    pub restored: Arc<Mutex<Option<Vec<ComponentState>>>>,
    /// Destination: fail the restore with this text.
    pub reject: Option<String>,
}

impl FakeMachine {
    /// A machine with `vcpus` vCPU components and one "serial0".
    pub fn new(vcpus: u32, uuid: Uuid) -> Self {
        let mut components: Vec<ComponentState> = (0..vcpus)
            .map(|i| ComponentState {
                id: "vcpu".into(),
                instance: i,
                version: 1,
                data: format!("regs of vcpu {i}").into_bytes(),
            })
            .collect();
        components.push(ComponentState {
            id: "serial0".into(),
            instance: 0,
            version: 2,
            data: vec![1, 2, 3],
        });
        Self {
            desc: MachineDescription {
                vcpu_count: vcpus,
                tsc_khz: 2_000_000,
                tsc_tolerance_khz: 0,
                tsc_scaling: false,
                uuid,
                cpuid: vec![crate::machine::CpuidEntry {
                    function: 1,
                    index: 0,
                    eax: 0x306a9,
                    ebx: 0,
                    ecx: 0x8000_0000,
                    edx: 0,
                }],
                machine_blob: b"fake-machine-v1".to_vec(),
                component_sections: Some(vcpus + 1),
            },
            components,
            restored: Arc::new(Mutex::new(None)),
            reject: None,
        }
    }
}

impl MachineState for FakeMachine {
    fn describe(&self) -> MachineDescription {
        self.desc.clone()
    }
    fn check_machine_blob(&self, blob: &[u8]) -> Result<(), MachineError> {
        if blob == self.desc.machine_blob.as_slice() {
            Ok(())
        } else {
            Err(MachineError::rejected(
                "machine_blob",
                format!(
                    "source '{}', destination '{}'",
                    String::from_utf8_lossy(blob),
                    String::from_utf8_lossy(&self.desc.machine_blob)
                ),
            ))
        }
    }
    fn known_components(&self) -> Vec<ComponentVersion> {
        vec![
            ComponentVersion {
                id: "vcpu".into(),
                min_version: 1,
                max_version: 1,
            },
            ComponentVersion {
                id: "serial0".into(),
                min_version: 1,
                max_version: 2,
            },
        ]
    }
    fn save_components(&mut self) -> Result<Vec<ComponentState>, MachineError> {
        Ok(self.components.clone())
    }
    fn restore_components(&mut self, states: Vec<ComponentState>) -> Result<(), MachineError> {
        if let Some(r) = &self.reject {
            return Err(MachineError::rejected("serial0", r.clone()));
        }
        *lock(&self.restored) = Some(states);
        Ok(())
    }
}
