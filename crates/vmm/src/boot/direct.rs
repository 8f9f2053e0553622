//! Direct entry into the test guest (docs/architecture.md, "Tern direct entry"): ELF loading,
//! identity page tables with 2 MiB user pages, a GDT, command line, and the initial vCPU
//! registers (64-bit, CPL 3, IOPL 3, IF 0).

use std::io::Cursor;

use kvm_bindings::{kvm_mp_state, kvm_regs, kvm_segment, kvm_sregs, CpuId, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::GuestAddress;

use crate::abi;
use crate::error::{Error, Result};
use crate::memory::{GuestRam, PAGE_SIZE};

/// CR0: PE | MP | ET | NE | WP | PG.
pub const CR0: u64 = 0x1 | 0x2 | 0x10 | 0x20 | 0x1_0000 | 0x8000_0000;
/// CR4: PAE | OSFXSR | OSXMMEXCPT.
pub const CR4: u64 = 0x20 | 0x200 | 0x400;
/// EFER: LME | LMA.
pub const EFER: u64 = 0x100 | 0x400;
/// Page-table entry bits: present, writable, user.
const PTE_PWU: u64 = 0x7;
/// Large-page bit.
const PTE_PS: u64 = 0x80;

/// Where the boot structures went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// Entry point.
    pub entry: u64,
    /// GPA of the GDT.
    pub gdt: u64,
    /// End of the loaded image.
    pub image_end: u64,
}

/// Writes the identity map of `[0, ram.end_gpa())` (2 MiB pages, U/S set): PML4 at
/// `layout::PML4`, one PDPT at `layout::PDPT`, PD `i` (GiB `i`) at `layout::PD_BASE + i * 4 KiB`;
/// and the GDT at `layout::GDT`. Returns the GDT address.
pub fn write_page_tables(ram: &GuestRam) -> Result<u64> {
    let end = ram.end_gpa().next_multiple_of(2 << 20);
    let gigs = end.div_ceil(1 << 30);
    if gigs > abi::MAX_PDS {
        return Err(Error::Config(format!(
            "RAM up to {end:#x} needs {gigs} page directories, the layout has {}",
            abi::MAX_PDS
        )));
    }
    let mut pdpt = [0u64; 512];
    for g in 0..gigs {
        let pd = abi::PD_BASE + g * PAGE_SIZE;
        let mut entries = [0u64; 512];
        for (i, e) in entries.iter_mut().enumerate() {
            let addr = (g << 30) + ((i as u64) << 21);
            if addr < end {
                *e = addr | PTE_PWU | PTE_PS;
            }
        }
        ram.write(pd, &entries_bytes(&entries))?;
        pdpt[g as usize] = pd | PTE_PWU;
    }
    ram.write(abi::PDPT, &entries_bytes(&pdpt))?;
    let mut pml4 = [0u64; 512];
    pml4[0] = abi::PDPT | PTE_PWU;
    ram.write(abi::PML4, &entries_bytes(&pml4))?;
    ram.write(abi::GDT, &entries_bytes(&abi::GDT_ENTRIES))?;
    Ok(abi::GDT)
}

fn entries_bytes(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Loads the ELF image, the page tables, the GDT and the command line into guest RAM.
pub fn load_guest(ram: &GuestRam, elf: &[u8], cmdline: &str) -> Result<BootInfo> {
    let mut image = Cursor::new(elf);
    let loaded = Elf::load(
        ram.memory(),
        None,
        &mut image,
        Some(GuestAddress(abi::IMAGE_BASE)),
    )
    .map_err(Error::Load)?;
    if loaded.kernel_end > abi::IMAGE_END {
        return Err(Error::Config(format!(
            "guest image ends at {:#x}, past the image area end {:#x}",
            loaded.kernel_end,
            abi::IMAGE_END
        )));
    }
    let gdt = write_page_tables(ram)?;
    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    if cmd.len() > abi::CMDLINE_MAX {
        return Err(Error::Config("command line too long".into()));
    }
    ram.write(abi::CMDLINE, &cmd)?;
    Ok(BootInfo {
        entry: loaded.kernel_load.0,
        gdt,
        image_end: loaded.kernel_end,
    })
}

fn user_segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The special registers of the direct entry.
pub fn entry_sregs(mut sregs: kvm_sregs, gdt: u64) -> kvm_sregs {
    sregs.cs = user_segment(abi::SEL_USER_CS, true);
    let data = user_segment(abi::SEL_USER_DS, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = gdt;
    sregs.gdt.limit = (abi::GDT_ENTRIES.len() * 8 - 1) as u16;
    // No IDT: an exception in the guest becomes a triple fault, reported as SHUTDOWN.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0;
    sregs.cr3 = abi::PML4;
    sregs.cr4 = CR4;
    sregs.efer = EFER;
    sregs
}

/// The general registers of the direct entry for vCPU `index` of `count`.
pub fn entry_regs(entry: u64, index: u32, count: u32, tsc_khz: u32) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: abi::stack_top(index),
        rdi: u64::from(index),
        rsi: u64::from(count),
        rdx: abi::CMDLINE,
        rcx: u64::from(tsc_khz),
        r8: abi::ENTRY_MAGIC_TERN,
        rflags: abi::ENTRY_RFLAGS,
        ..Default::default()
    }
}

/// Puts `vcpu` at the direct entry.
pub fn setup_vcpu(
    vcpu: &VcpuFd,
    index: u32,
    count: u32,
    boot: &BootInfo,
    tsc_khz: u32,
) -> Result<()> {
    let ctx = || format!("vcpu {index}");
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::kvm(ctx(), "KVM_GET_SREGS", e))?;
    vcpu.set_sregs(&entry_sregs(sregs, boot.gdt))
        .map_err(|e| Error::kvm(ctx(), "KVM_SET_SREGS", e))?;
    vcpu.set_regs(&entry_regs(boot.entry, index, count, tsc_khz))
        .map_err(|e| Error::kvm(ctx(), "KVM_SET_REGS", e))?;
    // With the in-kernel LAPIC, application processors start waiting for INIT/SIPI: every vCPU
    // of the direct entry starts at once.
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(|e| Error::kvm(ctx(), "KVM_SET_MP_STATE", e))?;
    Ok(())
}

/// CPUID leaf 1 ECX: running under a hypervisor.
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;

/// CPUID for vCPU `index`: the supported set (`KVM_GET_SUPPORTED_CPUID`, which has KVM's
/// leaves 0x4000_0000/0x4000_0001) with the APIC ID patched in and the hypervisor bit set.
pub fn vcpu_cpuid(supported: &CpuId, index: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24);
                e.ecx |= CPUID_1_ECX_HYPERVISOR;
            }
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RamBackend;

    #[test]
    fn page_tables_map_all_ram_as_user_2m_pages() {
        let ram = GuestRam::new(&[(0, 64 << 20)], RamBackend::AnonymousPrivate).unwrap();
        let gdt = write_page_tables(&ram).unwrap();
        let read = |gpa: u64| {
            let mut e = [0u8; 8];
            ram.read(gpa, &mut e).unwrap();
            u64::from_le_bytes(e)
        };
        assert_eq!(read(abi::PML4), abi::PDPT | PTE_PWU);
        assert_eq!(read(abi::PDPT), abi::PD_BASE | PTE_PWU);
        assert_eq!(read(abi::PD_BASE + 31 * 8), (31 << 21) | 0x87);
        assert_eq!(read(abi::PD_BASE + 32 * 8), 0);
        assert_eq!(gdt, abi::GDT);
        assert_eq!(read(abi::GDT + 5 * 8), abi::GDT_ENTRIES[5]);
    }
}
