//! The traits through which the engine drives a machine. The engine knows nothing of KVM:
//! `tern-vmm` (through the glue in `crates/tern`) implements these over the real VM, the tests
//! implement them over in-memory fakes (`fakes`, behind the `fakes` feature).
//!
//! | trait | side | QEMU analogue |
//! | --- | --- | --- |
//! | [`RamSource`] | source | `ram_save_*` + `memory_global_dirty_log_*` |
//! | [`RamSink`] | destination | `ram_load_precopy` |
//! | [`VcpuControl`] | both | `vm_stop` / `vm_start` / `runstate_is_running` |
//! | [`StateHandler`] | source | `SaveVMHandlers` of an iterable device (without RAM) |
//! | [`StateLoader`] | destination | the load half of `SaveVMHandlers` |
//! | [`MachineState`] | both | every non-iterative `VMStateDescription` (vCPUs, irqchip, PIT, clock, UART, …) |
//!
//! Every method is mandatory: a forgotten implementation must not silently migrate nothing.
//! Errors are [`MachineError`]; the engine puts their text into `error-desc`.

use std::sync::{Arc, Mutex};

pub use crate::digest::RamView;
use crate::wire::StreamConfig;
pub use crate::wire::{ComponentVersion, CpuidEntry, RamBlockInfo};
use uuid::Uuid;

/// Errors a machine implementation reports to the engine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// An OS call failed (an ioctl, an mmap access, …).
    #[error("{op}")]
    Io {
        /// What the machine was doing ("KVM_GET_DIRTY_LOG slot 0").
        op: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The incoming data is not acceptable for this machine (destination-side validation:
    /// wrong size, unknown component, out-of-range value). `what` names the offending item.
    #[error("{what}: {reason}")]
    Rejected {
        /// The component or field that was rejected ("vcpu 1 state", "serial0").
        what: String,
        /// Why.
        reason: String,
    },
    /// Anything else, with a message that stands on its own.
    #[error("{0}")]
    Failed(String),
}

impl MachineError {
    /// Shorthand for [`MachineError::Rejected`].
    pub fn rejected(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Rejected {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// A dirty bitmap for one RAM block: bit `p` of word `p / 64` is page `p` (the layout of
/// `KVM_GET_DIRTY_LOG`, so an implementation can OR the kernel's words straight in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// An all-clear bitmap for `pages` pages.
    pub fn new(pages: u64) -> Self {
        Self {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    /// Number of pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The raw words (bit `p % 64` of word `p / 64` is page `p`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The raw words, for OR-ing a kernel bitmap in. Bits past [`Self::pages`] must stay clear.
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// Marks page `p` dirty (ignored past the end).
    pub fn set(&mut self, p: u64) {
        if p < self.pages {
            self.words[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// Clears page `p` (ignored past the end).
    pub fn unset(&mut self, p: u64) {
        if p < self.pages {
            self.words[(p / 64) as usize] &= !(1 << (p % 64));
        }
    }

    /// Whether page `p` is dirty.
    pub fn get(&self, p: u64) -> bool {
        p < self.pages && self.words[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    /// Marks every page dirty (the first pass sends everything).
    pub fn set_all(&mut self) {
        self.words.fill(u64::MAX);
        let tail = self.pages % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last = (1u64 << tail) - 1;
            }
        }
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// ORs `other` into `self` (same size required; extra words are ignored).
    pub fn or_with(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    /// Finds the first dirty page at or after `from`, clears it and returns it.
    pub fn take_next(&mut self, from: u64) -> Option<u64> {
        if from >= self.pages {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut mask = u64::MAX << (from % 64);
        while w < self.words.len() {
            let bits = self.words[w] & mask;
            if bits != 0 {
                let bit = bits.trailing_zeros();
                self.words[w] &= !(1u64 << bit);
                return Some(w as u64 * 64 + u64::from(bit));
            }
            w += 1;
            mask = u64::MAX;
        }
        None
    }
}

/// Guest RAM on the source.
///
/// Pages are read while the vCPUs run (pre-copy), so a page may change during or after the read:
/// the dirty log makes that safe, as long as logging was started before the first read of the
/// page. The engine calls, in order: [`RamSource::start_dirty_log`], then reads every page (first
/// pass), then repeatedly [`RamSource::sync_dirty_log`] and reads the pages it reported, and finally
/// (on success, failure or cancel) [`RamSource::stop_dirty_log`].
pub trait RamSource: Send {
    /// Page size in bytes (4096 on x86-64).
    fn page_size(&self) -> u32;
    /// The RAM blocks, in a fixed order; block indexes below refer to this list (and to the
    /// CONFIG record's list).
    fn blocks(&self) -> Vec<RamBlockInfo>;
    /// Copies page `page` of block `block` into `buf` (`buf.len() == page_size()`).
    fn read_page(&mut self, block: usize, page: u64, buf: &mut [u8]) -> Result<(), MachineError>;
    /// Turns dirty logging on for every block (`KVM_MEM_LOG_DIRTY_PAGES`) and clears any stale
    /// dirty state, so that every write from now on is reported by the next sync.
    fn start_dirty_log(&mut self) -> Result<(), MachineError>;
    /// Fetch-and-clear: ORs every page written since the previous sync (or since
    /// `start_dirty_log`) into `bitmaps[block]` (the kernel's log OR'd with the VMM's own writes)
    /// and clears the machine's log. `bitmaps.len() == blocks().len()`.
    fn sync_dirty_log(&mut self, bitmaps: &mut [DirtyBitmap]) -> Result<(), MachineError>;
    /// Turns dirty logging off (vCPUs stop paying the write-fault cost). Called on every end.
    fn stop_dirty_log(&mut self) -> Result<(), MachineError>;
    /// Marks in `bitmaps[block]` the pages that are known to read as zero without reading them
    /// (e.g. anonymous memory never touched, `mincore(2)`), so the first pass sends them as ZERO
    /// records without copying them. Called once, after `start_dirty_log` (a page written after
    /// this call is in the next sync). Returns false when the machine cannot tell (nothing
    /// marked).
    fn known_zero_pages(&mut self, bitmaps: &mut [DirtyBitmap]) -> Result<bool, MachineError>;
    /// Read access to guest RAM for the RAM digest (`x-tern-ram-digest`), used from other
    /// threads while the vCPUs are stopped. It reads memory where it lies (never "zero" from a
    /// guess such as `mincore`, which a swapped-out page would defeat).
    fn view(&self) -> Arc<dyn RamView>;
    /// `release-ram`: frees pages `first .. first + pages` of block `block` on this host
    /// (QEMU's `ram_discard_range`: `MADV_DONTNEED` on anonymous memory, a punched hole on a
    /// file backend), so the source shrinks as post-copy goes on. Called only with the vCPUs
    /// stopped for good (after `POSTCOPY_RUN`), and only for pages the destination confirmed it
    /// holds (decision 180): the engine never reads them again. Their contents afterwards are
    /// unspecified (zeros on anonymous memory). A machine that cannot free memory returns an
    /// error; the engine then stops releasing and the migration goes on.
    fn discard_range(&mut self, block: usize, first: u64, pages: u64) -> Result<(), MachineError>;
}

/// Guest RAM on the destination. The engine has checked `block` and `page` against
/// [`RamSink::blocks`] before calling; an implementation may check again.
pub trait RamSink: Send {
    /// Page size in bytes; must equal the source's.
    fn page_size(&self) -> u32;
    /// The RAM blocks; the source's must be identical (same order, id, GPA, size).
    fn blocks(&self) -> Vec<RamBlockInfo>;
    /// Writes one page (`data.len() == page_size()`).
    fn write_page(&mut self, block: usize, page: u64, data: &[u8]) -> Result<(), MachineError>;
    /// Makes the page all zeroes. Fresh anonymous memory is already zero, so an implementation
    /// may skip the write when it knows the page was never written (keeps it unallocated).
    fn zero_page(&mut self, block: usize, page: u64) -> Result<(), MachineError>;
    /// A hint before a verified batch is placed: pages `first .. first + count` of `block`
    /// are about to be written with data. An implementation may back the ones never written
    /// with host memory in one go (instead of a page fault per page, decision 233). Out-of-range
    /// pages are ignored here (the writes that follow report them).
    fn prepare_pages(&mut self, block: usize, first: u64, count: u64);
    /// Copies page `page` of block `block` out of guest memory into `buf` (`buf.len() ==
    /// page_size()`): the RAM digest reads back every page it loaded.
    fn read_page(&mut self, block: usize, page: u64, buf: &mut [u8]) -> Result<(), MachineError>;
    /// A writer of guest memory that several threads may use at once (multifd's receivers,
    /// `docs/migration-engine.md` §2.5). Asked for once, before any page came through it;
    /// while the engine uses it, it does not call this sink's own `write_page` /
    /// `zero_page`. It must keep this sink's promises: `zero_page` may still skip a page never
    /// written.
    fn placer(&mut self) -> Result<Arc<dyn PagePlacer>, MachineError>;
}

/// Guest RAM written from several threads at once ([`RamSink::placer`]). The engine checked
/// `block` and `page` against the sink's blocks; an implementation may check again.
pub trait PagePlacer: Send + Sync {
    /// Writes one page (`data.len()` = the page size).
    fn write_page(&self, block: usize, page: u64, data: &[u8]) -> Result<(), MachineError>;
    /// Makes the page all zeroes (may skip a page never written, as [`RamSink::zero_page`]).
    fn zero_page(&self, block: usize, page: u64) -> Result<(), MachineError>;
    /// As [`RamSink::prepare_pages`].
    fn prepare_pages(&self, block: usize, first: u64, count: u64);
    /// As [`RamSink::read_page`]: the RAM digest reads back every page a receiver loaded
    /// (decision 252). Only the calling thread writes this page meanwhile.
    fn read_page(&self, block: usize, page: u64, buf: &mut [u8]) -> Result<(), MachineError>;
}

/// A run of pages of one RAM block the destination asks for (one `REQ_PAGES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    /// Block index (CONFIG order).
    pub block: u16,
    /// First page.
    pub first: u32,
    /// Pages, 1 ..= [`crate::wire::RP_MAX_REQ_PAGES`].
    pub count: u32,
}

/// How a [`PostcopySink`] asks for the pages its guest faults on; implemented by the engine
/// (a `REQ_PAGES` per range on the return path). Called on the machine's fault thread with one
/// batch (every range of one drain of its fault queue); must not wait for the pages.
pub trait PageRequester: Send + Sync {
    /// Asks the source for `ranges`. An error stops the machine's fault thread: its faulting
    /// vCPUs stay blocked (decision 74).
    fn request(&self, ranges: &[PageRange]) -> Result<(), MachineError>;
}

/// Demand-paging counters of a [`PostcopySink`] (QEMU's destination-side post-copy numbers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostcopyPagingStats {
    /// Ranges requested (each a `REQ_PAGES`).
    pub requests: u64,
    /// Pages installed since paging started (copies and zero pages).
    pub pages_placed: u64,
    /// Bytes installed.
    pub bytes_placed: u64,
    /// QEMU's `postcopy-blocktime`: total time during which every vCPU was blocked at once.
    pub blocktime: std::time::Duration,
    /// QEMU's `postcopy-vcpu-blocktime`: per vCPU, total time blocked on missing pages.
    pub vcpu_blocktime: Vec<std::time::Duration>,
    /// Fault → placement waits (`None`: the machine does not measure them).
    pub latency: Option<crate::stats::PostcopyLatency>,
}

/// Post-copy on the destination (QEMU `postcopy-ram.c`): guest RAM paged on demand. The engine
/// calls [`PostcopySink::probe`] at `POSTCOPY_ADVISE`, [`PostcopySink::start`] at
/// `POSTCOPY_LISTEN` (vCPUs stopped), places every page that arrives after it, and calls
/// [`PostcopySink::finish`] once every page is here. A machine without one refuses
/// `postcopy-ram`.
pub trait PostcopySink: Send {
    /// Whether this machine can page on demand (`POSTCOPY_ADVISE`); the error says what is
    /// missing. Nothing is changed.
    fn probe(&mut self) -> Result<(), MachineError>;
    /// The early discard (stream version 7, `docs/postcopy.md` §2a): drops the contents of
    /// the pages `runs` (`(first page, pages)`, ascending, inside the block) of `block` now,
    /// before [`PostcopySink::start`], so that they never read stale. The guest does not run
    /// on this side yet, and nothing reads these pages until `start` (a page written again in
    /// pre-copy is written whole).
    fn drop_pages(&mut self, block: usize, runs: &[(u64, u64)]) -> Result<(), MachineError>;
    /// Starts paging: the pages set in `missing[block]` are fetched through `requester` on
    /// first touch, every other page is here. Those of them not also set in `dropped[block]`
    /// are dropped first (never read stale); `dropped` (⊆ `missing`) are the pages
    /// [`PostcopySink::drop_pages`] dropped and nothing wrote since: not dropped twice.
    /// Guest stopped.
    fn start(
        &mut self,
        missing: &[DirtyBitmap],
        dropped: &[DirtyBitmap],
        requester: Arc<dyn PageRequester>,
    ) -> Result<(), MachineError>;
    /// Installs one page and wakes whoever waits for it. `Ok(false)`: the page was already
    /// there and nothing was written (the engine decides: decision 73 says it is an error).
    fn place(&mut self, block: usize, page: u64, data: &[u8]) -> Result<bool, MachineError>;
    /// Installs a zero page; as [`PostcopySink::place`].
    fn place_zero(&mut self, block: usize, page: u64) -> Result<bool, MachineError>;
    /// The counters so far.
    fn stats(&self) -> PostcopyPagingStats;
    /// Every page is here: stop paging (a no-op before `start`).
    fn finish(&mut self) -> Result<(), MachineError>;
}

/// Run control of the vCPUs. The engine calls `pause` at the switchover (source), `resume` on
/// failure of the switchover (source) and after the load (destination). QMP `stop`/`cont` may
/// change the run state concurrently; the engine only reads it through `is_running`.
pub trait VcpuControl: Send {
    /// Stops every vCPU and returns once none runs guest code (the downtime starts here).
    fn pause(&mut self) -> Result<(), MachineError>;
    /// Lets every vCPU run again.
    fn resume(&mut self) -> Result<(), MachineError>;
    /// Whether the guest is running now.
    fn is_running(&self) -> bool;
    /// Auto-converge: let every vCPU run only `100 - pct` % of the time by time slicing
    /// (QEMU's `cpu_throttle` ratio; Tern's VMM cuts it into sleeps of at most 50 ms, decision
    /// 243); `pct == 0` removes the throttle. The
    /// engine removes it whenever a migration ends. A machine that cannot throttle keeps
    /// this default and [`VcpuControl::can_throttle`]'s, and a migration with `auto-converge`
    /// fails at its setup, before anything is sent.
    fn set_throttle(&mut self, pct: u8) -> Result<(), MachineError> {
        if pct == 0 {
            return Ok(());
        }
        Err(MachineError::rejected(
            "auto-converge",
            "this machine cannot throttle its vCPUs",
        ))
    }
    /// Whether [`VcpuControl::set_throttle`] works here (asked before an `auto-converge`
    /// migration starts).
    fn can_throttle(&self) -> bool {
        false
    }
}

/// A source-side device with state of its own beside RAM, QEMU's `SaveVMHandlers`.
///
/// An iterative handler sends chunks while the VM runs (QEMU `save_live_iterate`, stream
/// `DEVICE_CHUNK`) and its final state once the VM is stopped (`save_complete`, stream `SECTION`).
/// A non-iterative handler is only asked for `save_complete`. Iterative handlers are iterated
/// fairly with RAM: one bounded chunk each per round, never "one device until it is done".
pub trait StateHandler: Send {
    /// Component id, unique together with `instance` ("state-dev").
    fn id(&self) -> &str;
    /// Instance number.
    fn instance(&self) -> u32;
    /// Version of the state layout this handler writes.
    fn version(&self) -> u32;
    /// Whether it sends data during pre-copy.
    fn is_iterative(&self) -> bool;
    /// Whether the matching destination loader waits for its initial data before it approves the
    /// switchover (informational on the source; the destination decides).
    fn switchover_ack_needed(&self) -> bool;
    /// Called once before the first iteration.
    fn save_setup(&mut self) -> Result<(), MachineError>;
    /// Cheap estimate of the bytes it still has to send before the switchover (QEMU
    /// `state_pending_estimate`).
    fn pending_estimate(&mut self) -> u64;
    /// Exact count, may be expensive (QEMU `state_pending_exact`); called only when the estimate
    /// is already below the switchover threshold.
    fn pending_exact(&mut self) -> Result<u64, MachineError>;
    /// Appends at most `budget` bytes of pre-copy data to `out` (nothing when it has nothing to
    /// send now). Each non-empty call becomes one `DEVICE_CHUNK`.
    fn save_iterate(&mut self, budget: usize, out: &mut Vec<u8>) -> Result<(), MachineError>;
    /// The final state, with the VM stopped (one `SECTION`).
    fn save_complete(&mut self) -> Result<Vec<u8>, MachineError>;
    /// Called once at the end, whatever the outcome (release buffers, reset tracking).
    fn save_cleanup(&mut self);
}

/// Lets a destination loader approve the switchover ("my initial data is loaded"), QEMU's
/// `qemu_loadvm_approve_switchover`. Cheap to clone, usable from any thread. When every loader
/// that asked for an ACK has approved, the engine sends `SWITCHOVER_ACK` on the return path.
#[derive(Clone)]
pub struct SwitchoverApproval {
    inner: Arc<dyn Fn() -> Result<(), String> + Send + Sync>,
}

impl SwitchoverApproval {
    /// Builds a handle from the engine's callback (engine-internal, public for tests and glue).
    pub fn new(f: impl Fn() -> Result<(), String> + Send + Sync + 'static) -> Self {
        Self { inner: Arc::new(f) }
    }

    /// Approves once. Approving more often than loaders asked is an error (QEMU `-EINVAL`).
    pub fn approve(&self) -> Result<(), MachineError> {
        (self.inner)().map_err(MachineError::Failed)
    }
}

impl std::fmt::Debug for SwitchoverApproval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SwitchoverApproval")
    }
}

/// A destination-side device loader, the counterpart of a [`StateHandler`] with the same id and
/// instance.
pub trait StateLoader: Send {
    /// Component id.
    fn id(&self) -> &str;
    /// Instance number.
    fn instance(&self) -> u32;
    /// Oldest state version it can load.
    fn min_version(&self) -> u32;
    /// Newest state version it can load.
    fn max_version(&self) -> u32;
    /// Whether the switchover must wait for this loader's approval (only asked when the
    /// `switchover-ack` capability is on).
    fn switchover_ack_needed(&self) -> bool;
    /// Called once after CONFIG was accepted. `approval` is the handle to call when the initial
    /// data is loaded (only meaningful when `switchover_ack_needed` returned true); it may be
    /// called from any thread, now or later.
    fn load_setup(&mut self, approval: SwitchoverApproval) -> Result<(), MachineError>;
    /// One pre-copy chunk (`DEVICE_CHUNK`) of `version`.
    fn load_iterate(&mut self, version: u32, data: &[u8]) -> Result<(), MachineError>;
    /// The final state (`SECTION`), VM stopped on both sides.
    fn load_complete(&mut self, version: u32, data: &[u8]) -> Result<(), MachineError>;
    /// Called once at the end, whatever the outcome; after a failure it discards what was loaded.
    fn load_cleanup(&mut self);
}

/// The state of one non-iterative machine component (QEMU `SECTION_FULL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentState {
    /// Component id ("vcpu", "irqchip", "serial0").
    pub id: String,
    /// Instance number (vCPU index, …).
    pub instance: u32,
    /// The component's own state version.
    pub version: u32,
    /// Opaque bytes (postcard of the component's serde struct).
    pub data: Vec<u8>,
}

/// What the CONFIG record says about the machine besides its RAM (checked by the destination).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MachineDescription {
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Guest TSC frequency in kHz (0 = unknown: not compared).
    pub tsc_khz: u32,
    /// Destination: largest TSC frequency difference it accepts without scaling, in kHz.
    pub tsc_tolerance_khz: u32,
    /// Destination: it can run the guest's TSC at any source frequency (TSC scaling).
    pub tsc_scaling: bool,
    /// The VM's UUID (compared when either side has `validate-uuid`).
    pub uuid: Uuid,
    /// CPUID leaves the saved vCPU state depends on, with the bits that legitimately differ
    /// masked (the destination must have each leaf, equal).
    pub cpuid: Vec<CpuidEntry>,
    /// Opaque machine configuration, compared byte for byte by the machine itself.
    pub machine_blob: Vec<u8>,
    /// Destination: how many component states (`SECTION`s) `restore_components` takes for this
    /// machine; with the loaders it bounds the SECTIONs the receiver keeps until END. `None`:
    /// only the stream's `Limits::max_sections` applies.
    pub component_sections: Option<u32>,
}

impl MachineDescription {
    /// The CONFIG record for this machine with its RAM (`page_size`, `ram_blocks`): what a
    /// source sends and what a destination expects.
    pub fn stream_config(&self, page_size: u32, ram_blocks: Vec<RamBlockInfo>) -> StreamConfig {
        StreamConfig {
            page_size,
            vcpu_count: self.vcpu_count,
            tsc_khz: self.tsc_khz,
            vm_uuid: self.uuid,
            ram_blocks,
            cpuid: self.cpuid.clone(),
            machine_blob: self.machine_blob.clone(),
        }
    }
}

/// The non-iterative part of the machine (vCPU registers, irqchip, PIT, clock, UART, control
/// port): saved once with the VM stopped, restored once before the destination resumes.
pub trait MachineState: Send {
    /// Describes this machine for CONFIG (source) or for checking CONFIG (destination).
    fn describe(&self) -> MachineDescription;
    /// Destination: checks the source's `machine_blob` against this machine (the engine has
    /// already compared every other CONFIG field). An error names the mismatching field.
    fn check_machine_blob(&self, blob: &[u8]) -> Result<(), MachineError>;
    /// Destination: the non-iterative component ids it restores, with the versions it accepts,
    /// so that an unknown component or version in the stream is rejected by the reader before
    /// anything is handed over.
    fn known_components(&self) -> Vec<ComponentVersion>;
    /// Source, VM stopped: every component's state, in restore order.
    fn save_components(&mut self) -> Result<Vec<ComponentState>, MachineError>;
    /// Destination, VM stopped: validates and restores all of them (all or nothing; on error the
    /// machine is left unusable and the engine reports the migration failed).
    fn restore_components(&mut self, states: Vec<ComponentState>) -> Result<(), MachineError>;
}

/// Shared-ownership adaptor: lets the glue keep a handle on a machine part while the engine
/// drives it (`Arc<Mutex<T>>` implements each trait when `T` does).
impl<T: VcpuControl> VcpuControl for Arc<Mutex<T>> {
    fn pause(&mut self) -> Result<(), MachineError> {
        lock(self)?.pause()
    }
    fn resume(&mut self) -> Result<(), MachineError> {
        lock(self)?.resume()
    }
    fn is_running(&self) -> bool {
        self.lock().map(|g| g.is_running()).unwrap_or(false)
    }
    fn set_throttle(&mut self, pct: u8) -> Result<(), MachineError> {
        lock(self)?.set_throttle(pct)
    }
    fn can_throttle(&self) -> bool {
        self.lock().map(|g| g.can_throttle()).unwrap_or(false)
    }
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, MachineError> {
    m.lock()
        .map_err(|_| MachineError::Failed("machine lock poisoned".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_set_take_count() {
        let mut b = DirtyBitmap::new(130);
        assert_eq!(b.words().len(), 3);
        b.set(0);
        b.set(64);
        b.set(129);
        b.set(130); // past the end: ignored
        assert_eq!(b.count(), 3);
        assert!(b.get(129) && !b.get(128) && !b.get(130));
        assert_eq!(b.take_next(1), Some(64));
        assert_eq!(b.take_next(0), Some(0));
        assert_eq!(b.take_next(0), Some(129));
        assert_eq!(b.take_next(0), None);
        b.set_all();
        assert_eq!(b.count(), 130);
        let mut c = DirtyBitmap::new(130);
        c.or_with(&b);
        assert_eq!(c.count(), 130);
        c.clear();
        assert_eq!(c.count(), 0);
    }

    #[test]
    fn bitmap_exact_multiple_of_64() {
        let mut b = DirtyBitmap::new(128);
        b.set_all();
        assert_eq!(b.count(), 128);
        assert_eq!(b.take_next(127), Some(127));
        assert_eq!(b.take_next(128), None);
    }
}
