//! The guest contract as the VMM sees it (docs/architecture.md, "The test guest contract").
//!
//! Everything the VMM takes from `tern_guest` goes through this module.

pub use tern_guest::layout::{
    stack_top, stats_addr, CONTROL_PORT, CONTROL_PORT_LEN, ENTRY_MAGIC_TERN, ENTRY_RFLAGS, GDT,
    GDT_ENTRIES, IMAGE_BASE, IMAGE_END, MAX_PDS, MAX_VCPUS, PDPT, PD_BASE, PML4, SEL_USER_CS,
    SEL_USER_DS, STATS_STRIDE, WORK_BASE,
};
pub use tern_guest::{GuestOptions, StatsBlock};

/// Maximum command line length including the NUL.
pub const CMDLINE_MAX: usize = tern_guest::layout::CMDLINE_MAX as usize;
/// GPA of the NUL-terminated command line.
pub const CMDLINE: u64 = tern_guest::layout::CMDLINE;

/// The guest ELF image.
pub fn guest_elf() -> &'static [u8] {
    tern_guest::GUEST_ELF
}
