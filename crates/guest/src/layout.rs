//! Guest physical memory layout, ports and limits of the test guest.
//!
//! This file is shared verbatim with the guest program (`guest-src/main.rs` includes it with
//! `#[path]`), so it must only use `core` and must not contain `unsafe` code. Everything here is a
//! contract between the guest, the VMM (`tern-vmm`) and the host-side checkers.

/// Size of a guest page as the workloads see it.
pub const PAGE_SIZE: u64 = 0x1000;

/// Direct entry: the VMM-built PML4 (one page).
pub const PML4: u64 = 0x1000;
/// Direct entry: the VMM-built PDPT (one page, one entry per GiB).
pub const PDPT: u64 = 0x2000;
/// Optional place for a VMM-written GDT (see [`GDT_ENTRIES`]); one page.
pub const GDT: u64 = 0x3000;
/// Command line (NUL-terminated) for the direct entry.
pub const CMDLINE: u64 = 0x7000;
/// Maximum command-line size in bytes, including the terminating NUL.
pub const CMDLINE_MAX: u64 = 0x1000;
/// Direct entry: first page directory (2 MiB pages); PD `i` maps GiB `i`.
pub const PD_BASE: u64 = 0x10000;
/// Direct entry: end (exclusive) of the page-directory area: 128 PDs, so at most 128 GiB mapped.
pub const PD_END: u64 = 0x90000;
/// Number of page directories the direct-entry area can hold.
pub const MAX_PDS: u64 = (PD_END - PD_BASE) / PAGE_SIZE;

/// Load (and link) address of the guest image.
pub const IMAGE_BASE: u64 = 0x10_0000;
/// The image must end below this address.
pub const IMAGE_END: u64 = 0x20_0000;

/// Per-vCPU stacks: vCPU `i` owns `[STACK_BASE + i * STACK_SIZE, stack_top(i))`.
pub const STACK_BASE: u64 = 0x20_0000;
/// Stack size per vCPU.
pub const STACK_SIZE: u64 = 0x4000;
/// End of the stack area.
pub const STACK_END: u64 = 0x40_0000;
/// Maximum number of vCPUs the layout supports.
pub const MAX_VCPUS: u32 = ((STACK_END - STACK_BASE) / STACK_SIZE) as u32;

/// Per-vCPU stats blocks: vCPU `i`'s block is at `STATS_BASE + i * STATS_STRIDE`.
pub const STATS_BASE: u64 = 0x40_0000;
/// Distance between two stats blocks (one page each, so vCPUs never share a page).
pub const STATS_STRIDE: u64 = 0x1000;
/// End of the stats area.
pub const STATS_END: u64 = STATS_BASE + MAX_VCPUS as u64 * STATS_STRIDE;

/// Start of the workload area (16 MiB).
pub const WORK_BASE: u64 = 0x100_0000;
/// Largest `mem=` (MiB) accepted (Tern direct entry; the VMM maps all RAM).
pub const MAX_MEM_MIB: u64 = 64 * 1024;
/// Largest working set under the PVH entry (its own page tables map 4 GiB; stay below 3 GiB
/// where PC machines put their PCI hole).
pub const PVH_MAX_MEM_MIB: u64 = 3 * 1024 - (WORK_BASE >> 20);

/// Guest-control port base (Tern only). All accesses are 4-byte `out`s.
pub const CONTROL_PORT: u16 = 0xf10;
/// `out` the heartbeat sequence number here.
pub const CONTROL_HEARTBEAT: u16 = CONTROL_PORT;
/// `out` a number of microseconds here to be parked that long (may return early).
pub const CONTROL_IDLE: u16 = CONTROL_PORT + 4;
/// `out` a guest event code here.
pub const CONTROL_EVENT: u16 = CONTROL_PORT + 8;
/// Number of bytes of port space the control port occupies.
pub const CONTROL_PORT_LEN: u16 = 12;
/// Guest event: every vCPU finished its setup (fill) and the workload runs.
pub const EVENT_RUNNING: u32 = 1;
/// Guest event: panic; the low 16 bits are the source line of the panic.
pub const EVENT_PANIC: u32 = 0xdead_0000;

/// COM1 data port (status lines, and heartbeats under QEMU).
pub const COM1: u16 = 0x3f8;
/// Under QEMU a heartbeat is the byte `HB_SERIAL_BASE + seq % 32` on COM1.
pub const HB_SERIAL_BASE: u8 = 0x40;

/// `r8` on the Tern direct entry ("TERNBOOT" little-endian).
pub const ENTRY_MAGIC_TERN: u64 = u64::from_le_bytes(*b"TERNBOOT");
/// What the PVH entry passes to the common 64-bit code in `r8` ("TERN-PVH").
pub const ENTRY_MAGIC_PVH: u64 = u64::from_le_bytes(*b"TERN-PVH");

/// GDT selectors used by both entries (the PVH entry builds this GDT inside the image).
pub const SEL_KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const SEL_KERNEL_DS: u16 = 0x10;
/// User data selector (RPL 3), for SS/DS/ES/FS/GS at CPL 3.
pub const SEL_USER_DS: u16 = 0x23;
/// User 64-bit code selector (RPL 3), CS at CPL 3.
pub const SEL_USER_CS: u16 = 0x2b;
/// The GDT both entries assume (index = selector / 8): null, kernel code64, kernel data,
/// user code32 (unused, keeps the SYSRET layout), user data, user code64.
pub const GDT_ENTRIES: [u64; 6] = [
    0,
    0x00af_9a00_0000_ffff,
    0x00cf_9200_0000_ffff,
    0x00cf_fa00_0000_ffff,
    0x00cf_f200_0000_ffff,
    0x00af_fa00_0000_ffff,
];
/// RFLAGS on entry to the 64-bit code: IOPL 3, IF 0, reserved bit 1.
pub const ENTRY_RFLAGS: u64 = 0x3002;

/// Stats block: magic value ("TERNSTAT" little-endian).
pub const STATS_MAGIC: u64 = u64::from_le_bytes(*b"TERNSTAT");
/// Stats block field offsets (bytes; every field is a little-endian `u64`).
pub mod stats_off {
    /// [`super::STATS_MAGIC`], written last during initialisation.
    pub const MAGIC: u64 = 0x00;
    /// One of the `STATE_*` values.
    pub const STATE: u64 = 0x08;
    /// One of the `WORKLOAD_*` values.
    pub const WORKLOAD: u64 = 0x10;
    /// This vCPU's index.
    pub const VCPU: u64 = 0x18;
    /// Number of vCPUs.
    pub const VCPUS: u64 = 0x20;
    /// GPA of this vCPU's work share.
    pub const WORK_BASE: u64 = 0x28;
    /// Length in bytes of this vCPU's work share.
    pub const WORK_LEN: u64 = 0x30;
    /// Pages written so far (fill, zeroing and workload writes).
    pub const PAGES_WRITTEN: u64 = 0x38;
    /// Full passes over the share (random order: every `pages` writes count as one pass).
    pub const PASSES: u64 = 0x40;
    /// Last heartbeat sequence number (vCPU 0 only), stored before it is announced.
    pub const HB_SEQ: u64 = 0x48;
    /// TSC frequency the guest uses, kHz.
    pub const TSC_KHZ: u64 = 0x50;
    /// Main-loop iterations.
    pub const LOOPS: u64 = 0x58;
    /// `rate=` (MiB/s, total over all vCPUs).
    pub const RATE: u64 = 0x60;
    /// `FLAG_*` bits.
    pub const FLAGS: u64 = 0x68;
    /// Size of the defined part of the block.
    pub const SIZE: u64 = 0x70;
}
/// State: initialising (options parsed, stats block set up).
pub const STATE_BOOTING: u64 = 1;
/// State: filling (idle fill, or zeroing the pattern share).
pub const STATE_FILLING: u64 = 2;
/// State: running the workload.
pub const STATE_RUNNING: u64 = 3;
/// State: a Rust panic happened on this vCPU.
pub const STATE_PANICKED: u64 = 4;
/// Workload id: idle.
pub const WORKLOAD_IDLE: u64 = 0;
/// Workload id: dirty.
pub const WORKLOAD_DIRTY: u64 = 1;
/// Workload id: pattern.
pub const WORKLOAD_PATTERN: u64 = 2;
/// Flag: `order=random`.
pub const FLAG_RANDOM: u64 = 1;
/// Flag: booted through the PVH entry (QEMU).
pub const FLAG_PVH: u64 = 2;

/// Initial stack pointer of vCPU `i` (16-byte aligned).
pub const fn stack_top(i: u32) -> u64 {
    STACK_BASE + (i as u64 + 1) * STACK_SIZE
}

/// GPA of vCPU `i`'s stats block.
pub const fn stats_addr(i: u32) -> u64 {
    STATS_BASE + i as u64 * STATS_STRIDE
}

/// vCPU `vcpu`'s share of a working set of `total_bytes`: `(gpa, len)`.
///
/// The working set starts at [`WORK_BASE`] and is split in `vcpus` equal, contiguous,
/// page-aligned shares (the remainder below one page per vCPU is unused).
/// Returns `(WORK_BASE, 0)` when `vcpus == 0` or `vcpu >= vcpus`.
pub const fn work_share(vcpu: u32, vcpus: u32, total_bytes: u64) -> (u64, u64) {
    if vcpus == 0 || vcpu >= vcpus {
        return (WORK_BASE, 0);
    }
    let share = total_bytes / vcpus as u64 / PAGE_SIZE * PAGE_SIZE;
    (WORK_BASE + vcpu as u64 * share, share)
}
