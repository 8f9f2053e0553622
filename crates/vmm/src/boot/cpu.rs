//! The boot CPU state of the kernel boot paths: the GDT, the PVH entry (32-bit protected mode,
//! paging off) and the Linux 64-bit entry (long mode, identity map), and the MSRs Linux expects
//! at reset on every vCPU. Application processors are left as KVM creates them (waiting for
//! INIT/SIPI from the boot CPU, as on hardware).

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use super::kernel::KernelEntry;
use super::layout;
use crate::error::{Error, Result};
use crate::memory::GuestRam;

/// `IA32_MISC_ENABLE`: fast strings enabled (what firmware leaves for Linux).
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `IA32_PAT` reset value.
const MSR_IA32_PAT: u32 = 0x277;
const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;
/// `IA32_MTRR_DEF_TYPE`: MTRRs on, default type write-back.
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The MSRs set on every vCPU of a kernel boot: SYSENTER and SYSCALL registers zero, the kernel
/// GS base zero, TSC 0, fast strings, PAT and MTRR default type at their firmware values.
pub const BOOT_MSRS: [(u32, u64); 11] = [
    (0x174, 0),       // IA32_SYSENTER_CS
    (0x175, 0),       // IA32_SYSENTER_ESP
    (0x176, 0),       // IA32_SYSENTER_EIP
    (0xc000_0081, 0), // STAR
    (0xc000_0082, 0), // LSTAR
    (0xc000_0083, 0), // CSTAR
    (0xc000_0084, 0), // SYSCALL_MASK
    (0xc000_0102, 0), // KERNEL_GS_BASE
    (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    (MSR_IA32_PAT, PAT_DEFAULT),
    (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
];

/// Writes the GDT at `layout::GDT`.
pub fn write_gdt(ram: &GuestRam) -> Result<()> {
    let bytes: Vec<u8> = layout::GDT_ENTRIES
        .iter()
        .flat_map(|e| e.to_le_bytes())
        .collect();
    ram.write(layout::GDT, &bytes)
}

fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The boot CPU's special registers for `entry`.
pub fn entry_sregs(mut s: kvm_sregs, entry: &KernelEntry) -> kvm_sregs {
    let data = segment(layout::SEL_DATA, 3, false);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: layout::SEL_TSS,
        type_: 11,
        present: 1,
        s: 0,
        ..Default::default()
    };
    s.gdt.base = layout::GDT;
    s.gdt.limit = (layout::GDT_ENTRIES.len() * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    match entry {
        KernelEntry::Pvh { .. } => {
            s.cs = segment(layout::SEL_CODE32, 11, false);
            s.cr0 = 0x11; // PE | ET
            s.cr3 = 0;
            s.cr4 = 0;
            s.efer = 0;
        }
        KernelEntry::Linux64 { .. } => {
            s.cs = segment(layout::SEL_CODE64, 11, true);
            s.cr0 = 0x8000_0011 | 0x20; // PG | PE | ET | NE
            s.cr3 = layout::PML4;
            s.cr4 = 0x20; // PAE
            s.efer = 0x500; // LME | LMA
        }
    }
    s
}

/// The boot CPU's general registers for `entry`.
pub fn entry_regs(entry: &KernelEntry) -> kvm_regs {
    match *entry {
        KernelEntry::Pvh { entry, start_info } => kvm_regs {
            rip: entry,
            rbx: start_info,
            rflags: 0x2,
            ..Default::default()
        },
        KernelEntry::Linux64 { entry, zero_page } => kvm_regs {
            rip: entry,
            rsi: zero_page,
            rsp: layout::BOOT_STACK_TOP,
            rbp: layout::BOOT_STACK_TOP,
            rflags: 0x2,
            ..Default::default()
        },
    }
}

/// Sets [`BOOT_MSRS`] on `vcpu` (every vCPU of a kernel boot).
pub fn set_boot_msrs(vcpu: &VcpuFd, index: u32) -> Result<()> {
    let entries: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs =
        Msrs::from_entries(&entries).map_err(|e| Error::Config(format!("boot MSRs: {e:?}")))?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| Error::kvm(format!("vcpu {index}"), "KVM_SET_MSRS", e))?;
    if set != entries.len() {
        let failed = entries.get(set).map_or(0, |e| e.index);
        return Err(Error::Vcpu {
            vcpu: index,
            reason: format!("KVM_SET_MSRS stopped at MSR {failed:#x}"),
        });
    }
    Ok(())
}

/// Puts the boot CPU at `entry`.
pub fn setup_boot_cpu(vcpu: &VcpuFd, entry: &KernelEntry) -> Result<()> {
    let sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::kvm("vcpu 0", "KVM_GET_SREGS", e))?;
    vcpu.set_sregs(&entry_sregs(sregs, entry))
        .map_err(|e| Error::kvm("vcpu 0", "KVM_SET_SREGS", e))?;
    vcpu.set_regs(&entry_regs(entry))
        .map_err(|e| Error::kvm("vcpu 0", "KVM_SET_REGS", e))
}
