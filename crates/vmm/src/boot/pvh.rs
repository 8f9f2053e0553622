//! The PVH boot protocol (<https://xenbits.xen.org/docs/unstable/misc/pvh.html>): `hvm_start_info`
//! with the command line, the memory map, the RSDP and the initrd as module 0.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use super::kernel::Initrd;
use super::{layout, memmap};
use crate::error::{Error, Result};
use crate::memory::GuestRam;

/// `hvm_start_info.magic`.
pub const START_MAGIC: u32 = 0x336e_c578;

fn write_obj<T: vm_memory::ByteValued>(ram: &GuestRam, gpa: u64, v: T) -> Result<()> {
    ram.memory()
        .write_obj(v, GuestAddress(gpa))
        .map_err(|e| Error::Memory(format!("writing PVH boot data at {gpa:#x}: {e}")))
}

/// Writes `hvm_start_info` (version 1), the module list and the memory map; returns its GPA.
pub fn write_start_info(ram: &GuestRam, initrd: Option<Initrd>, rsdp: u64) -> Result<u64> {
    let map = memmap::memory_map(ram.regions());
    if map.len() > layout::MEMMAP_MAX {
        return Err(Error::Config("too many memory map entries".into()));
    }
    for (i, e) in map.iter().enumerate() {
        write_obj(
            ram,
            layout::MEMMAP + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64,
            hvm_memmap_table_entry {
                addr: e.addr,
                size: e.size,
                type_: e.kind,
                reserved: 0,
            },
        )?;
    }
    let mut info = hvm_start_info {
        magic: START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE,
        rsdp_paddr: rsdp,
        memmap_paddr: layout::MEMMAP,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some(i) = initrd {
        write_obj(
            ram,
            layout::MODLIST,
            hvm_modlist_entry {
                paddr: i.addr,
                size: i.size,
                cmdline_paddr: 0,
                reserved: 0,
            },
        )?;
        info.nr_modules = 1;
        info.modlist_paddr = layout::MODLIST;
    }
    write_obj(ram, layout::START_INFO, info)?;
    Ok(layout::START_INFO)
}
