//! The Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst): `boot_params` (the "zero
//! page") with the setup header (the bzImage's, or a minimal one for a vmlinux), the E820 map,
//! the command line, the initrd and `acpi_rsdp_addr`; and the identity map the protocol asks for.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use super::kernel::Initrd;
use super::{layout, memmap};
use crate::error::{Error, Result};
use crate::memory::{GuestRam, PAGE_SIZE};

/// `setup_header.boot_flag`.
const BOOT_FLAG: u16 = 0xaa55;
/// `setup_header.header`: "HdrS".
const HDRS: u32 = 0x5372_6448;
/// `type_of_loader`: undefined boot loader.
const LOADER_UNDEFINED: u8 = 0xff;
/// Where an initrd may end at most when the kernel does not say (boot protocol default).
pub const INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Page-table bits: present, writable, 2 MiB page.
const PDE_2M: u64 = 0x83;

/// Writes `boot_params` at `layout::ZERO_PAGE`; returns its GPA.
pub fn write_boot_params(
    ram: &GuestRam,
    hdr: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<Initrd>,
    rsdp: u64,
) -> Result<u64> {
    let mut p = boot_params::default();
    if let Some(h) = hdr {
        p.hdr = h;
    } else {
        p.hdr.boot_flag = BOOT_FLAG;
        p.hdr.header = HDRS;
        p.hdr.kernel_alignment = 0x100_0000;
    }
    p.hdr.type_of_loader = LOADER_UNDEFINED;
    p.hdr.cmd_line_ptr = layout::CMDLINE as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some(i) = initrd {
        p.hdr.ramdisk_image = i.addr as u32;
        p.hdr.ramdisk_size = i.size as u32;
    }
    p.acpi_rsdp_addr = rsdp;
    let map = memmap::memory_map(ram.regions());
    if map.len() > p.e820_table.len() {
        return Err(Error::Config("too many E820 entries".into()));
    }
    for (slot, e) in p.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    p.e820_entries = map.len() as u8;
    ram.memory()
        .write_obj(p, GuestAddress(layout::ZERO_PAGE))
        .map_err(|e| Error::Memory(format!("writing boot_params: {e}")))?;
    Ok(layout::ZERO_PAGE)
}

/// Identity map of the first 4 GiB with 2 MiB supervisor pages (PML4, one PDPT, 4 PDs).
pub fn write_page_tables(ram: &GuestRam) -> Result<()> {
    let mut pml4 = vec![0u8; PAGE_SIZE as usize];
    pml4[..8].copy_from_slice(&(layout::PDPT | 0x3).to_le_bytes());
    ram.write(layout::PML4, &pml4)?;
    let mut pdpt = vec![0u8; PAGE_SIZE as usize];
    for g in 0..4u64 {
        let pd = layout::PD + g * PAGE_SIZE;
        pdpt[(g * 8) as usize..][..8].copy_from_slice(&(pd | 0x3).to_le_bytes());
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| (((g << 30) + (i << 21)) | PDE_2M).to_le_bytes())
            .collect();
        ram.write(pd, &entries)?;
    }
    ram.write(layout::PDPT, &pdpt)
}
