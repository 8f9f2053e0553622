//! Where the kernel boot paths (`--kernel`) put what the VMM writes into guest RAM. All below
//! 1 MiB, where a kernel image (loaded at 1 MiB or higher) never lands.
//!
//! | GPA | what |
//! | --- | --- |
//! | `0x500` | GDT: null, 0x08 code32, 0x10 code64, 0x18 data, 0x20 TSS (32-bit, base 0) |
//! | `0x5000..0x6000` | boot stack of the Linux 64-bit entry |
//! | `0x6000` | PVH `hvm_start_info`, its module list at `0x6100`, memory map at `0x6200` |
//! | `0x7000` | Linux `boot_params` (the "zero page") |
//! | `0x8000..0x9000` | left free: a guest's AP trampoline (SIPI vector 8) may live here |
//! | `0x9000` | PML4, `0xa000` PDPT, `0xb000..0xf000` 4 PDs: 4 GiB identity map (Linux entry) |
//! | `0x20000` | the kernel command line (NUL-terminated) |
//! | `0x9fc00..0xa0000` | EBDA (reserved in the memory map) |
//! | `0xe0000..0x100000` | ACPI tables, RSDP first (reserved; Linux also scans here for the RSDP) |

/// The GDT.
pub const GDT: u64 = 0x500;
/// GDT entries (index = selector / 8).
pub const GDT_ENTRIES: [u64; 5] = [
    0,
    0x00cf_9b00_0000_ffff, // 0x08: 32-bit code, flat
    0x00af_9b00_0000_ffff, // 0x10: 64-bit code (Linux __BOOT_CS)
    0x00cf_9300_0000_ffff, // 0x18: data, flat (Linux __BOOT_DS)
    0x0080_8b00_0000_0067, // 0x20: 32-bit TSS, busy, base 0, limit 0x67
];
/// 32-bit code selector (PVH entry).
pub const SEL_CODE32: u16 = 0x08;
/// 64-bit code selector (Linux 64-bit entry).
pub const SEL_CODE64: u16 = 0x10;
/// Data selector.
pub const SEL_DATA: u16 = 0x18;
/// TSS selector.
pub const SEL_TSS: u16 = 0x20;
/// Top of the boot stack (Linux 64-bit entry).
pub const BOOT_STACK_TOP: u64 = 0x5ff0;
/// PVH `hvm_start_info`.
pub const START_INFO: u64 = 0x6000;
/// PVH module list (the initrd).
pub const MODLIST: u64 = 0x6100;
/// PVH memory map.
pub const MEMMAP: u64 = 0x6200;
/// Room for PVH memory map entries (24 bytes each).
pub const MEMMAP_MAX: usize = 64;
/// Linux `boot_params`.
pub const ZERO_PAGE: u64 = 0x7000;
/// PML4 of the Linux entry's identity map.
pub const PML4: u64 = 0x9000;
/// Its PDPT.
pub const PDPT: u64 = 0xa000;
/// Its first PD (4 consecutive pages: 4 GiB).
pub const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Largest command line including the NUL.
pub const CMDLINE_MAX: usize = 4096;
/// Start of the EBDA (reserved up to 640 KiB).
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the legacy hole.
pub const LEGACY_HOLE: u64 = 0xa0000;
/// ACPI tables (RSDP first).
pub const ACPI_START: u64 = 0xe0000;
/// End of the BIOS area.
pub const HIMEM: u64 = 0x10_0000;
