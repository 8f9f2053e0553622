//! `tern run --kernel`: loading a kernel Tern did not write. The format decides the protocol:
//! a bzImage (`HdrS` at 0x202) boots through the Linux 64-bit boot protocol; an ELF with the Xen
//! PVH note (type 18) through PVH unless [`BootProtocol::Linux`] is asked for; any other 64-bit
//! ELF (a vmlinux without the note) through the Linux 64-bit boot protocol at `e_entry`.

use std::io::Cursor;

use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::GuestAddress;

use super::{acpi, layout, linux, memmap, pvh};
use crate::error::{Error, Result};
use crate::memory::{GuestRam, PAGE_SIZE};

/// Which entry of the kernel to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BootProtocol {
    /// PVH when the ELF has the note, else the Linux 64-bit protocol (QEMU's choice too).
    #[default]
    Auto,
    /// The PVH entry (32-bit protected mode, `hvm_start_info`); an error without the note.
    Pvh,
    /// The Linux 64-bit boot protocol (long mode, `boot_params`).
    Linux,
}

/// A kernel, its initrd and which entry to use (the command line is the machine's).
#[derive(Clone, Debug, Default)]
pub struct KernelImage {
    /// The kernel file: an ELF (PVH or vmlinux) or a bzImage.
    pub kernel: Vec<u8>,
    /// The initrd, if any.
    pub initrd: Option<Vec<u8>>,
    /// Which entry.
    pub protocol: BootProtocol,
}

/// Where the boot CPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelEntry {
    /// PVH: 32-bit protected mode at `entry`, `ebx` = `start_info`.
    Pvh {
        /// The PVH entry point.
        entry: u64,
        /// GPA of `hvm_start_info`.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol: long mode at `entry`, `rsi` = `zero_page`.
    Linux64 {
        /// The 64-bit entry point.
        entry: u64,
        /// GPA of `boot_params`.
        zero_page: u64,
    },
}

/// Where the initrd went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initrd {
    /// GPA.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

fn is_bzimage(k: &[u8]) -> bool {
    k.get(0x202..0x206) == Some(b"HdrS".as_slice())
}

/// Puts the initrd at the highest page-aligned address below `max_end` (and the end of low RAM)
/// above `kernel_end`.
fn load_initrd(ram: &GuestRam, initrd: &[u8], kernel_end: u64, max_end: u64) -> Result<Initrd> {
    let top = memmap::low_ram_end(ram.regions()).min(max_end);
    let size = initrd.len() as u64;
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= kernel_end.next_multiple_of(PAGE_SIZE))
        .ok_or_else(|| {
            Error::Config(format!(
                "the initrd ({size} bytes) does not fit between the kernel's end {kernel_end:#x} and {top:#x}"
            ))
        })?;
    ram.write(addr, initrd)?;
    Ok(Initrd { addr, size })
}

fn write_cmdline(ram: &GuestRam, cmdline: &str) -> Result<usize> {
    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    if cmd.len() > layout::CMDLINE_MAX || cmdline.contains('\0') {
        return Err(Error::Config(format!(
            "the kernel command line is {} bytes or contains NUL (max {})",
            cmdline.len(),
            layout::CMDLINE_MAX - 1
        )));
    }
    ram.write(layout::CMDLINE, &cmd)?;
    Ok(cmd.len())
}

/// Loads `image` with `cmdline` into `ram` for `vcpus` vCPUs: the kernel, the initrd, the
/// command line, the ACPI tables, and the protocol's boot structures. Returns the boot CPU's entry.
pub fn load_kernel(
    ram: &GuestRam,
    vcpus: u32,
    image: &KernelImage,
    cmdline: &str,
) -> Result<KernelEntry> {
    let cmdline_len = write_cmdline(ram, cmdline)?;
    let tables = acpi::build(vcpus)?;
    tables.write(ram)?;
    let mem = ram.memory();
    let mut file = Cursor::new(image.kernel.as_slice());
    if is_bzimage(&image.kernel) {
        if image.protocol == BootProtocol::Pvh {
            return Err(Error::Config(
                "a bzImage has no PVH entry (boot its vmlinux, or use the Linux protocol)".into(),
            ));
        }
        let loaded = BzImage::load(mem, None, &mut file, Some(GuestAddress(layout::HIMEM)))
            .map_err(Error::Load)?;
        let hdr = loaded
            .setup_header
            .ok_or_else(|| Error::Config("bzImage without a setup header".into()))?;
        let initrd = match &image.initrd {
            Some(i) => Some(load_initrd(
                ram,
                i,
                loaded.kernel_end,
                u64::from(hdr.initrd_addr_max) + 1,
            )?),
            None => None,
        };
        let zero_page =
            linux::write_boot_params(ram, Some(hdr), cmdline_len, initrd, tables.rsdp())?;
        linux::write_page_tables(ram)?;
        // The 64-bit entry of a bzImage is 0x200 past the start of its protected-mode code.
        return Ok(KernelEntry::Linux64 {
            entry: loaded.kernel_load.0 + 0x200,
            zero_page,
        });
    }
    let loaded =
        Elf::load(mem, None, &mut file, Some(GuestAddress(layout::HIMEM))).map_err(Error::Load)?;
    let pvh_entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
        _ => None,
    };
    let initrd = match &image.initrd {
        Some(i) => Some(load_initrd(
            ram,
            i,
            loaded.kernel_end,
            linux::INITRD_ADDR_MAX + 1,
        )?),
        None => None,
    };
    match (image.protocol, pvh_entry) {
        (BootProtocol::Auto | BootProtocol::Pvh, Some(entry)) => {
            let start_info = pvh::write_start_info(ram, initrd, tables.rsdp())?;
            Ok(KernelEntry::Pvh { entry, start_info })
        }
        (BootProtocol::Pvh, None) => Err(Error::Config(
            "the kernel has no PVH entry (ELF note XEN_ELFNOTE_PHYS32_ENTRY)".into(),
        )),
        (BootProtocol::Auto | BootProtocol::Linux, _) => {
            let zero_page =
                linux::write_boot_params(ram, None, cmdline_len, initrd, tables.rsdp())?;
            linux::write_page_tables(ram)?;
            Ok(KernelEntry::Linux64 {
                entry: loaded.kernel_load.0,
                zero_page,
            })
        }
    }
}
