//! Guest RAM: vm-memory regions with a VMM-side dirty bitmap, KVM memslots, dirty logging.
//!
//! Every access the VMM makes to guest RAM goes through vm-memory (`Bytes`), so VMM writes land
//! in the region's `AtomicBitmap`; the guest's own writes are tracked by KVM
//! (`KVM_MEM_LOG_DIRTY_PAGES` + `KVM_GET_DIRTY_LOG`). `sync_dirty_log` ORs both.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_userspace_memory_region, KVMIO, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

use crate::error::{Error, Result};

/// Guest page size used by dirty logging and the page API.
pub const PAGE_SIZE: u64 = 4096;
/// Start of the 32-bit PCI hole: RAM above this goes to 4 GiB and up.
pub const HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit hole.
pub const HOLE_END: u64 = 0x1_0000_0000;

/// The guest memory type of this VMM.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Pages per `KVM_CLEAR_DIRTY_LOG` call (64 MiB). KVM holds its MMU lock for one call, and a
/// vCPU that faults waits for it: bounded chunks keep every wait short (docs/machine.md).
pub const CLEAR_CHUNK_PAGES: u64 = 16384;

/// How guest RAM is backed on the host. Only anonymous private memory exists today; the enum is
/// the place where a memfd/shared backend (local migration, post-copy) plugs in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RamBackend {
    /// `mmap(MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE)`.
    #[default]
    AnonymousPrivate,
}

/// One RAM block as the migration engine sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRegionInfo {
    /// Region id (= KVM memslot number).
    pub id: u32,
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Size in bytes (a multiple of [`PAGE_SIZE`]).
    pub size: u64,
    /// Host virtual address of the first byte (for uffd registration and the like).
    pub host_addr: u64,
}

impl RamRegionInfo {
    /// Pages in this region.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// `u64` words a dirty bitmap of this region needs.
    pub fn bitmap_words(&self) -> usize {
        usize::try_from(self.pages().div_ceil(64)).unwrap_or(usize::MAX)
    }
}

/// The RAM layout for `mem_bytes` of RAM: below the 32-bit hole, then above 4 GiB.
pub fn ram_layout(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= HOLE_START {
        vec![(0, mem_bytes)]
    } else {
        vec![(0, HOLE_START), (HOLE_END, mem_bytes - HOLE_START)]
    }
}

/// Guest RAM plus its KVM registration.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemory,
    regions: Vec<RamRegionInfo>,
    /// Dirty-log scratch buffers (one per region), `Some` while dirty logging is on.
    dirty: Mutex<Option<Vec<Vec<u64>>>>,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with `INITIALLY_SET` is on for the VM: turning dirty
    /// logging on write-protects nothing, `KVM_GET_DIRTY_LOG` only reads, and this VMM
    /// write-protects (`KVM_CLEAR_DIRTY_LOG`) in bounded chunks.
    manual_protect: AtomicBool,
}

impl GuestRam {
    /// Allocates RAM for `layout` (`(gpa, size)` pairs, page aligned, sorted).
    pub fn new(layout: &[(u64, u64)], backend: RamBackend) -> Result<Self> {
        Self::with_huge_pages(layout, backend, false)
    }

    /// Like [`GuestRam::new`]; with `huge_pages`, every region is `madvise(MADV_HUGEPAGE)`d
    /// (transparent huge pages where the host's THP mode is `madvise` or `always`; a host that
    /// refuses is logged, not an error). Dirty logging stays 4 KiB granular: KVM maps a slot
    /// with logging on in 4 KiB pages.
    pub fn with_huge_pages(
        layout: &[(u64, u64)],
        backend: RamBackend,
        huge_pages: bool,
    ) -> Result<Self> {
        let page = NonZeroUsize::new(PAGE_SIZE as usize)
            .ok_or_else(|| Error::Memory("zero page size".into()))?;
        let mut regions = Vec::with_capacity(layout.len());
        for &(gpa, size) in layout {
            if size == 0 || !gpa.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
                return Err(Error::Memory(format!(
                    "region {gpa:#x}+{size:#x} is empty or not page aligned"
                )));
            }
            let len = usize::try_from(size)
                .map_err(|_| Error::Memory(format!("region size {size:#x} too large")))?;
            let flags = match backend {
                RamBackend::AnonymousPrivate => {
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE
                }
            };
            let mapping = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::new(len, page))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .build()
                .map_err(|e| Error::Memory(format!("mmap of {size:#x} bytes: {e}")))?;
            if huge_pages {
                advise_huge(mapping.as_ptr(), len, gpa);
            }
            let region = GuestRegionMmap::new(mapping, GuestAddress(gpa))
                .ok_or_else(|| Error::Memory(format!("region {gpa:#x}+{size:#x} overflows")))?;
            regions.push(region);
        }
        let mem = GuestMemory::from_regions(regions)
            .map_err(|e| Error::Memory(format!("region collection: {e}")))?;
        let regions = mem
            .iter()
            .enumerate()
            .map(|(i, r)| RamRegionInfo {
                id: i as u32,
                gpa: r.start_addr().0,
                size: r.len(),
                host_addr: r.as_ptr() as u64,
            })
            .collect();
        Ok(GuestRam {
            mem,
            regions,
            dirty: Mutex::new(None),
            manual_protect: AtomicBool::new(false),
        })
    }

    /// `madvise(MADV_HUGEPAGE)` on every region (e.g. once an incoming migration has written
    /// RAM); failures are logged.
    pub fn advise_huge_pages(&self) {
        for r in &self.regions {
            advise_huge(r.host_addr as *mut u8, r.size as usize, r.gpa);
        }
    }

    /// The vm-memory view (for loaders).
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The RAM regions.
    pub fn regions(&self) -> &[RamRegionInfo] {
        &self.regions
    }

    /// Total RAM in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Highest guest physical address + 1.
    pub fn end_gpa(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.gpa + r.size)
            .max()
            .unwrap_or(0)
    }

    fn set_slots(&self, vm: &VmFd, log_dirty: bool) -> Result<()> {
        for r in &self.regions {
            let region = kvm_userspace_memory_region {
                slot: r.id,
                flags: if log_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: r.host_addr,
            };
            // SAFETY: the host range is a live mapping owned by `self.mem`, which outlives the
            // VM's use of it (the VM is dropped before the memory, see `Vm`'s field order and
            // `Vm::shutdown`), and the regions never overlap.
            unsafe { vm.set_user_memory_region(region) }.map_err(|e| {
                Error::kvm(
                    format!("memory slot {}", r.id),
                    "KVM_SET_USER_MEMORY_REGION",
                    e,
                )
            })?;
        }
        Ok(())
    }

    /// Registers every region as a KVM memslot (slot number = region id).
    pub fn register(&self, vm: &VmFd) -> Result<()> {
        self.set_slots(vm, false)
    }

    fn check(&self, gpa: u64, len: usize) -> Result<()> {
        let ok = gpa.checked_add(len as u64).is_some_and(|end| {
            self.regions
                .iter()
                .any(|r| gpa >= r.gpa && end <= r.gpa + r.size)
        });
        if ok {
            Ok(())
        } else {
            Err(Error::BadAddress {
                gpa,
                len: len as u64,
            })
        }
    }

    /// Reads guest memory (must lie inside one region).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.check(gpa, buf.len())?;
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| Error::Memory(format!("read {gpa:#x}+{:#x}: {e}", buf.len())))
    }

    /// Hands `f` guest memory `gpa..gpa+len` (inside one region) in place, without a copy: for
    /// hashing the whole of RAM (the migration's RAM digest) at memory speed. Only meaningful
    /// while nothing writes that range (vCPUs stopped, no device writing): a concurrent guest
    /// write would only make the bytes stale, not the access unsound for the host.
    pub fn with_host_slice<T>(&self, gpa: u64, len: u64, f: impl FnOnce(&[u8]) -> T) -> Result<T> {
        let n = usize::try_from(len).map_err(|_| Error::BadAddress { gpa, len })?;
        self.check(gpa, n)?;
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa + len <= r.gpa + r.size)
            .ok_or(Error::BadAddress { gpa, len })?;
        let host = (r.host_addr + (gpa - r.gpa)) as *const u8;
        // SAFETY: `check` proved the range lies inside one region, whose host mapping
        // (`r.host_addr`, `r.size` bytes, readable, owned by `self.mem`) lives as long as `self`,
        // which the borrow keeps alive for the call. Guest RAM is plain anonymous memory: every
        // byte is initialised (zero or written). Callers only read it while the guest is stopped.
        let bytes = unsafe { std::slice::from_raw_parts(host, n) };
        Ok(f(bytes))
    }

    /// Writes guest memory (must lie inside one region); marks the pages dirty in the VMM bitmap.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<()> {
        self.check(gpa, buf.len())?;
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|e| Error::Memory(format!("write {gpa:#x}+{:#x}: {e}", buf.len())))
    }

    fn check_page(gpa: u64, len: usize) -> Result<()> {
        if !gpa.is_multiple_of(PAGE_SIZE) || len as u64 != PAGE_SIZE {
            return Err(Error::BadAddress {
                gpa,
                len: len as u64,
            });
        }
        Ok(())
    }

    /// Reads one page.
    pub fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        Self::check_page(gpa, buf.len())?;
        self.read(gpa, buf)
    }

    /// Writes one page.
    pub fn write_page(&self, gpa: u64, buf: &[u8]) -> Result<()> {
        Self::check_page(gpa, buf.len())?;
        self.write(gpa, buf)
    }

    /// Makes a page read as zeros. A page that already reads as zeros is left alone, so a fresh
    /// destination does not allocate memory for zero pages.
    pub fn zero_page(&self, gpa: u64) -> Result<()> {
        let mut buf = [0u8; PAGE_SIZE as usize];
        self.read_page(gpa, &mut buf)?;
        if buf.iter().all(|&b| b == 0) {
            return Ok(());
        }
        buf.fill(0);
        self.write_page(gpa, &buf)
    }

    /// The host address and length of guest memory `gpa..gpa+len`, which must be page aligned
    /// and lie inside one region (for `madvise` on it).
    fn host_range(&self, gpa: u64, len: u64) -> Result<(*mut libc::c_void, usize)> {
        let n = usize::try_from(len).map_err(|_| Error::BadAddress { gpa, len })?;
        if !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Error::BadAddress { gpa, len });
        }
        self.check(gpa, n)?;
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa + len <= r.gpa + r.size)
            .ok_or(Error::BadAddress { gpa, len })?;
        Ok(((r.host_addr + (gpa - r.gpa)) as *mut libc::c_void, n))
    }

    /// Backs guest memory `gpa..gpa+len` (page aligned, inside one region) with writable host
    /// pages now, in one `madvise(MADV_POPULATE_WRITE)` (Linux 5.14+), instead of one page
    /// fault per 4 KiB page on the first write: an incoming migration about to write a run of
    /// fresh pages (decision 233). Contents are unchanged (fresh pages stay zero until written).
    /// `Ok(false)`: the kernel does not know the advice (nothing happened; the writes will
    /// fault as before).
    pub fn populate_write(&self, gpa: u64, len: u64) -> Result<bool> {
        let (host, n) = self.host_range(gpa, len)?;
        // SAFETY: `host_range` proved the range lies inside one region, whose host mapping
        // (owned by `self.mem`) lives as long as `self`, and is page aligned.
        // MADV_POPULATE_WRITE only faults the pages in
        // for writing (as a write would); it never changes their contents.
        let ret = unsafe { libc::madvise(host, n, libc::MADV_POPULATE_WRITE) };
        if ret == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Ok(false);
        }
        Err(Error::Memory(format!(
            "madvise(MADV_POPULATE_WRITE) of guest RAM {gpa:#x}+{len:#x}: {e}"
        )))
    }

    /// Frees guest memory `gpa..gpa+len` (page aligned, inside one region) on the host: the
    /// source's `release-ram` after post-copy sent those pages (QEMU's `ram_discard_range`).
    /// The backend is anonymous private memory, so `MADV_DONTNEED` returns the pages to the
    /// host and they read as zeros afterwards (a shared or file backend would need
    /// `fallocate(FALLOC_FL_PUNCH_HOLE)` as well). Only for memory nothing needs any more: the
    /// caller's vCPUs are stopped for good.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<()> {
        let (host, n) = self.host_range(gpa, len)?;
        // SAFETY: `host_range` proved `gpa..gpa+len` lies inside one region, whose host
        // mapping (anonymous private, owned by `self.mem`) lives as long as `self`, and is page
        // aligned. MADV_DONTNEED only drops the pages' contents
        // (later reads see zero-filled pages): no Rust reference into guest memory exists
        // (every access copies through `vm-memory`'s volatile slices), so no value changes
        // under a live reference.
        let ret = unsafe { libc::madvise(host, n, libc::MADV_DONTNEED) };
        if ret != 0 {
            return Err(Error::Memory(format!(
                "madvise(MADV_DONTNEED) of guest RAM {gpa:#x}+{len:#x}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Records that the VM has `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with `INITIALLY_SET` on
    /// (see [`GuestRam::sync_dirty_log`]).
    pub fn set_manual_protect(&self, on: bool) {
        self.manual_protect.store(on, Ordering::Relaxed);
    }

    /// Whether dirty pages are write-protected by this VMM (`KVM_CLEAR_DIRTY_LOG`).
    pub fn manual_protect(&self) -> bool {
        self.manual_protect.load(Ordering::Relaxed)
    }

    /// `KVM_CLEAR_DIRTY_LOG` of the set bits of `bits` (bit i = page i of region `r`), in chunks
    /// of [`CLEAR_CHUNK_PAGES`]; chunks without a set bit are skipped.
    fn clear_dirty(vm: &VmFd, r: &RamRegionInfo, bits: &mut [u64]) -> Result<()> {
        let pages = r.pages();
        let words_per_chunk = (CLEAR_CHUNK_PAGES / 64) as usize;
        for (i, chunk) in bits.chunks_mut(words_per_chunk).enumerate() {
            if chunk.iter().all(|&w| w == 0) {
                continue;
            }
            let first_page = (i * words_per_chunk * 64) as u64;
            if first_page >= pages {
                break;
            }
            let num_pages = (chunk.len() as u64 * 64).min(pages - first_page);
            let clear = kvm_clear_dirty_log {
                slot: r.id,
                num_pages: u32::try_from(num_pages).unwrap_or(u32::MAX),
                first_page,
                __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: chunk.as_mut_ptr() as *mut libc::c_void,
                },
            };
            // SAFETY: `chunk` holds `num_pages` bits (rounded up to 64) for the pages from
            // `first_page` (a multiple of 64) of the slot, which is what KVM reads; the struct
            // lives across the call and the fd is a VM fd.
            let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
            if ret != 0 {
                return Err(Error::kvm(
                    format!("memory slot {} pages {first_page}+{num_pages}", r.id),
                    "KVM_CLEAR_DIRTY_LOG",
                    kvm_ioctls::Error::last(),
                ));
            }
        }
        Ok(())
    }

    /// Starts dirty logging: re-registers every slot with `KVM_MEM_LOG_DIRTY_PAGES` and clears
    /// the VMM-side bitmaps. With manual protection the registration write-protects nothing
    /// (every page starts dirty) and the pages are then write-protected here, chunk by chunk, so
    /// the guest never waits for a walk over the whole slot (measured: 10–25 ms for 1–2 GiB).
    pub fn start_dirty_log(&self, vm: &VmFd) -> Result<()> {
        let mut dirty = self.dirty.lock().map_err(|_| poisoned())?;
        let t = std::time::Instant::now();
        self.set_slots(vm, true)?;
        let registered = t.elapsed();
        if self.manual_protect() {
            for r in &self.regions {
                let mut all = vec![u64::MAX; r.bitmap_words()];
                Self::clear_dirty(vm, r, &mut all)?;
            }
        }
        tracing::debug!(
            manual_protect = self.manual_protect(),
            register_us = registered.as_micros() as u64,
            write_protect_us = (t.elapsed() - registered).as_micros() as u64,
            "dirty logging on"
        );
        for r in self.mem.iter() {
            (**r).bitmap().reset();
        }
        *dirty = Some(
            self.regions
                .iter()
                .map(|r| vec![0u64; r.bitmap_words()])
                .collect(),
        );
        Ok(())
    }

    /// Whether dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty.lock().map(|d| d.is_some()).unwrap_or(false)
    }

    /// Marks (ORs into `out`, one bitmap per region) the pages that were never touched: anonymous
    /// memory that is not resident (`mincore(2)`) reads as zero. Only true without swap (a
    /// swapped-out page is not resident either), so with swap configured it marks nothing and
    /// returns false.
    pub fn untouched_pages(&self, out: &mut [Vec<u64>]) -> Result<bool> {
        if swap_configured() || out.len() != self.regions.len() {
            return Ok(false);
        }
        for (r, bits) in self.regions.iter().zip(out.iter_mut()) {
            let pages = r.pages() as usize;
            let mut vec = vec![0u8; pages];
            // SAFETY: `host_addr..host_addr+size` is this region's live mapping (page aligned,
            // owned by `self.mem` for as long as `self` lives) and `vec` has one byte per page,
            // which is what mincore(2) writes.
            let ret = unsafe {
                libc::mincore(
                    r.host_addr as *mut libc::c_void,
                    r.size as usize,
                    vec.as_mut_ptr(),
                )
            };
            if ret != 0 {
                return Err(Error::io(
                    "mincore on guest RAM",
                    std::io::Error::last_os_error(),
                ));
            }
            for (p, v) in vec.iter().enumerate() {
                if v & 1 == 0 {
                    if let Some(w) = bits.get_mut(p / 64) {
                        *w |= 1 << (p % 64);
                    }
                }
            }
        }
        Ok(true)
    }

    /// Fetches and clears the dirty pages since the last call (or since `start_dirty_log`) and
    /// ORs them into `out` (one bitmap per region, bit i = page i of the region, each at least
    /// [`RamRegionInfo::bitmap_words`] long).
    pub fn sync_dirty_log(&self, vm: &VmFd, out: &mut [Vec<u64>]) -> Result<()> {
        let mut dirty = self.dirty.lock().map_err(|_| poisoned())?;
        let scratch = dirty
            .as_mut()
            .ok_or_else(|| Error::DirtyLog("dirty logging is not started".into()))?;
        if out.len() != self.regions.len() {
            return Err(Error::DirtyLog(format!(
                "{} bitmaps given, {} regions",
                out.len(),
                self.regions.len()
            )));
        }
        for ((r, buf), (scratch, region)) in self
            .regions
            .iter()
            .zip(out.iter_mut())
            .zip(scratch.iter_mut().zip(self.mem.iter()))
        {
            if buf.len() < r.bitmap_words() {
                return Err(Error::DirtyLog(format!(
                    "bitmap for region {} has {} words, needs {}",
                    r.id,
                    buf.len(),
                    r.bitmap_words()
                )));
            }
            let log = kvm_dirty_log {
                slot: r.id,
                padding1: 0,
                __bindgen_anon_1: kvm_bindings::kvm_dirty_log__bindgen_ty_1 {
                    dirty_bitmap: scratch.as_mut_ptr() as *mut libc::c_void,
                },
            };
            // SAFETY: `scratch` holds one bit per page of the slot (rounded up to 64 bits), which
            // is what KVM writes; the fd is a VM fd and the struct lives across the call.
            let ret = unsafe { ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
            if ret != 0 {
                return Err(Error::kvm(
                    format!("memory slot {}", r.id),
                    "KVM_GET_DIRTY_LOG",
                    kvm_ioctls::Error::last(),
                ));
            }
            if self.manual_protect() {
                // GET only read the bits: clear them (and write-protect those pages) before
                // the caller reads the pages, so a write after this point is caught next time.
                let words = r.bitmap_words().min(scratch.len());
                Self::clear_dirty(vm, r, &mut scratch[..words])?;
            }
            let vmm = (**region).bitmap().get_and_reset();
            for (i, word) in buf.iter_mut().take(r.bitmap_words()).enumerate() {
                *word |= scratch[i] | vmm.get(i).copied().unwrap_or(0);
            }
        }
        Ok(())
    }

    /// Stops dirty logging: re-registers the slots without `KVM_MEM_LOG_DIRTY_PAGES`.
    pub fn stop_dirty_log(&self, vm: &VmFd) -> Result<()> {
        let mut dirty = self.dirty.lock().map_err(|_| poisoned())?;
        if dirty.is_none() {
            return Ok(());
        }
        self.set_slots(vm, false)?;
        *dirty = None;
        Ok(())
    }
}

/// `madvise(MADV_HUGEPAGE)` on one guest RAM mapping; a refusal is logged (4 KiB pages then).
fn advise_huge(addr: *mut u8, len: usize, gpa: u64) {
    // SAFETY: `addr..addr+len` is a live guest RAM mapping owned by a `GuestRam` (page aligned);
    // MADV_HUGEPAGE only changes how the kernel backs it, never its contents.
    let r = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    if r != 0 {
        tracing::warn!(
            "madvise(MADV_HUGEPAGE) on guest RAM {gpa:#x}+{len:#x}: {}; 4 KiB pages",
            std::io::Error::last_os_error()
        );
    }
}

fn poisoned() -> Error {
    Error::State("dirty-log lock poisoned by a panicked thread".into())
}

/// Whether the host has swap (then a non-resident page may hold data).
fn swap_configured() -> bool {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("SwapTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        // Unknown: assume swap, the safe answer.
        .is_none_or(|kb| kb > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_at_hole() {
        assert_eq!(ram_layout(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(
            ram_layout(4 << 30),
            vec![(0, HOLE_START), (HOLE_END, (4 << 30) - HOLE_START)]
        );
    }

    #[test]
    fn read_write_page_and_bounds() {
        let ram = GuestRam::new(&[(0, 1 << 20)], RamBackend::AnonymousPrivate).unwrap();
        let page = [0xabu8; PAGE_SIZE as usize];
        ram.write_page(0x2000, &page).unwrap();
        let mut back = [0u8; PAGE_SIZE as usize];
        ram.read_page(0x2000, &mut back).unwrap();
        assert_eq!(back, page);
        ram.zero_page(0x2000).unwrap();
        ram.read_page(0x2000, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0));
        assert!(ram.read_page(0x2001, &mut back).is_err());
        assert!(ram.read_page(1 << 20, &mut back).is_err());
        assert!(ram.write(u64::MAX - 1, &[0, 0]).is_err());
    }

    #[test]
    fn discard_frees_pages_which_then_read_as_zero() {
        let ram = GuestRam::new(&[(0, 1 << 20)], RamBackend::AnonymousPrivate).unwrap();
        let page = [0x5au8; PAGE_SIZE as usize];
        for gpa in [0x3000, 0x4000, 0x5000] {
            ram.write_page(gpa, &page).unwrap();
        }
        ram.discard(0x3000, 2 * PAGE_SIZE).unwrap();
        let mut back = [1u8; PAGE_SIZE as usize];
        for gpa in [0x3000, 0x4000] {
            ram.read_page(gpa, &mut back).unwrap();
            assert!(back.iter().all(|&b| b == 0), "{gpa:#x} released");
        }
        ram.read_page(0x5000, &mut back).unwrap();
        assert_eq!(back, page, "the next page is kept");
        assert!(ram.discard(0x3001, PAGE_SIZE).is_err(), "unaligned");
        assert!(
            ram.discard(0xff000, 2 * PAGE_SIZE).is_err(),
            "past the region"
        );
    }
}
