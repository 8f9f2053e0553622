//! vCPU state: everything KVM holds for one vCPU.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, kvm_xsave2, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{KvmNestedStateBuffer, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::fam::FamStruct;

use super::Persist;
use crate::caps::{HostCaps, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};
use crate::error::{Error, Result};

/// Allowed difference of TSC frequency between source and destination (kHz).
pub const TSC_KHZ_TOLERANCE: u32 = 1000;

/// x87/SSE state (`kvm_fpu`, which kvm-bindings does not serialise).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers.
    pub fpr: Vec<[u8; 16]>,
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM registers.
    pub xmm: Vec<[u8; 16]>,
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> Result<kvm_fpu> {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        if self.fpr.len() != f.fpr.len() || self.xmm.len() != f.xmm.len() {
            return Err(Error::component(
                "cpu",
                0,
                format!(
                    "fpu state has {} x87 and {} xmm registers",
                    self.fpr.len(),
                    self.xmm.len()
                ),
            ));
        }
        f.fpr.copy_from_slice(&self.fpr);
        f.xmm.copy_from_slice(&self.xmm);
        Ok(f)
    }
}

/// One MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrValue {
    /// MSR index.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// The complete state of one vCPU.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID as set on the vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE.
    pub fpu: FpuState,
    /// XSAVE area (`KVM_GET_XSAVE2`, or `KVM_GET_XSAVE`), as 32-bit words; `None` without XSAVE.
    pub xsave: Option<Vec<u32>>,
    /// XCRs; `None` without `KVM_CAP_XCRS`.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers; `None` without `KVM_CAP_DEBUGREGS`.
    pub debugregs: Option<kvm_debugregs>,
    /// MSRs (the host's index list, filtered by what reads and writes back).
    pub msrs: Vec<MsrValue>,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions/interrupts/NMI/SMI; `None` without `KVM_CAP_VCPU_EVENTS`.
    pub events: Option<kvm_vcpu_events>,
    /// MP state.
    pub mp_state: kvm_mp_state,
    /// `IA32_TSC` at save time (also among `msrs`).
    pub tsc: u64,
    /// TSC frequency of the source (`KVM_GET_TSC_KHZ`); `None` if the host could not tell.
    pub tsc_khz: Option<u32>,
    /// Nested virtualisation state (postcard of `KvmNestedStateBuffer`); `None` when the
    /// source host has no `KVM_CAP_NESTED_STATE` (recorded absent).
    pub nested: Option<Vec<u8>>,
    /// Names of state the source host could not provide.
    pub absent: Vec<String>,
}

/// One vCPU seen as a component.
pub struct VcpuComponent<'a> {
    /// vCPU index.
    pub index: u32,
    /// The vCPU (must not be in `KVM_RUN`).
    pub fd: &'a VcpuFd,
    /// Host capabilities.
    pub caps: &'static HostCaps,
}

impl VcpuComponent<'_> {
    fn ctx(&self) -> String {
        format!("vcpu {}", self.index)
    }

    fn kvm(&self, ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error + '_ {
        move |e| Error::kvm(self.ctx(), ioctl, e)
    }

    fn xsave_fam_len(&self) -> usize {
        self.caps
            .xsave2_size
            .saturating_sub(std::mem::size_of::<kvm_xsave>())
            .div_ceil(std::mem::size_of::<<kvm_xsave2 as FamStruct>::Entry>())
    }

    fn get_xsave(&self) -> Result<Option<Vec<u32>>> {
        if self.caps.xsave2_size > 0 {
            let mut xsave = Xsave::new(self.xsave_fam_len())
                .map_err(|e| Error::State(format!("allocating the XSAVE buffer: {e:?}")))?;
            // SAFETY: the buffer was sized from KVM_CAP_XSAVE2, which is what the kernel writes;
            // no XSTATE feature is enabled dynamically after the probe.
            unsafe { self.fd.get_xsave2(&mut xsave) }.map_err(self.kvm("KVM_GET_XSAVE2"))?;
            let s = xsave.as_fam_struct_ref();
            let mut words = s.xsave.region.to_vec();
            words.extend_from_slice(xsave.as_slice());
            Ok(Some(words))
        } else if self.caps.xsave {
            let x = self.fd.get_xsave().map_err(self.kvm("KVM_GET_XSAVE"))?;
            Ok(Some(x.region.to_vec()))
        } else {
            Ok(None)
        }
    }

    fn set_xsave(&self, words: &[u32]) -> Result<()> {
        let region_len = kvm_xsave::default().region.len();
        if words.len() < region_len {
            return Err(Error::component(
                "cpu",
                self.index,
                format!("XSAVE area of {} words", words.len()),
            ));
        }
        let extra = &words[region_len..];
        if self.caps.xsave2_size > 0 {
            if extra.len() > self.xsave_fam_len() {
                return Err(Error::component(
                    "cpu",
                    self.index,
                    format!(
                        "XSAVE area of {} bytes does not fit this host's {}",
                        words.len() * 4,
                        self.caps.xsave2_size
                    ),
                ));
            }
            let mut xsave = Xsave::new(self.xsave_fam_len())
                .map_err(|e| Error::State(format!("allocating the XSAVE buffer: {e:?}")))?;
            // SAFETY: `as_mut_fam_struct` only exposes the header; we copy the fixed region.
            unsafe { xsave.as_mut_fam_struct() }
                .xsave
                .region
                .copy_from_slice(&words[..region_len]);
            xsave.as_mut_slice()[..extra.len()].copy_from_slice(extra);
            // SAFETY: the buffer is sized from KVM_CAP_XSAVE2, as the kernel expects.
            unsafe { self.fd.set_xsave2(&xsave) }.map_err(self.kvm("KVM_SET_XSAVE"))
        } else {
            if extra.iter().any(|&w| w != 0) {
                return Err(Error::component(
                    "cpu",
                    self.index,
                    "XSAVE area larger than 4 KiB on a host without KVM_CAP_XSAVE2",
                ));
            }
            let mut x = kvm_xsave::default();
            x.region.copy_from_slice(&words[..region_len]);
            // SAFETY: the host has no XSAVE2, so the kernel reads exactly `kvm_xsave`'s 4 KiB.
            unsafe { self.fd.set_xsave(&x) }.map_err(self.kvm("KVM_SET_XSAVE"))
        }
    }

    fn get_msrs(&self) -> Result<Vec<MsrValue>> {
        let entries: Vec<kvm_msr_entry> = self
            .caps
            .msrs
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| Error::State(format!("MSR list of {}: {e:?}", entries.len())))?;
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(self.kvm("KVM_GET_MSRS"))?;
        if n != entries.len() {
            return Err(Error::Vcpu {
                vcpu: self.index,
                reason: format!(
                    "KVM_GET_MSRS read {n} of {} MSRs (stopped at {:#x})",
                    entries.len(),
                    entries[n].index
                ),
            });
        }
        Ok(msrs
            .as_slice()
            .iter()
            .map(|e| MsrValue {
                index: e.index,
                data: e.data,
            })
            .collect())
    }

    fn set_msrs(&self, values: &[MsrValue]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let entries: Vec<kvm_msr_entry> = values
            .iter()
            .map(|v| kvm_msr_entry {
                index: v.index,
                data: v.data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| {
            Error::component("cpu", self.index, format!("{} MSRs: {e:?}", entries.len()))
        })?;
        let n = self.fd.set_msrs(&msrs).map_err(self.kvm("KVM_SET_MSRS"))?;
        if n != entries.len() {
            return Err(Error::Vcpu {
                vcpu: self.index,
                reason: format!(
                    "KVM_SET_MSRS wrote {n} of {} MSRs: MSR {:#x} (value {:#x}) rejected",
                    entries.len(),
                    entries[n].index,
                    entries[n].data
                ),
            });
        }
        Ok(())
    }

    fn check_tsc_khz(&self, source: Option<u32>) -> Result<()> {
        let Some(src) = source else { return Ok(()) };
        let here = self.fd.get_tsc_khz().ok();
        if here.is_some_and(|h| h.abs_diff(src) <= TSC_KHZ_TOLERANCE) {
            return Ok(());
        }
        if self.caps.tsc_control {
            return self
                .fd
                .set_tsc_khz(src)
                .map_err(self.kvm("KVM_SET_TSC_KHZ"));
        }
        Err(Error::component(
            "cpu",
            self.index,
            format!(
                "TSC runs at {here:?} kHz here, {src} kHz on the source, and KVM_CAP_TSC_CONTROL is 0"
            ),
        ))
    }
}

impl Persist for VcpuComponent<'_> {
    const ID: &'static str = "cpu";
    const VERSION: u32 = 1;
    type State = VcpuState;

    fn save(&self) -> Result<VcpuState> {
        let fd = self.fd;
        let mut absent = Vec::new();
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(self.kvm("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let regs = fd.get_regs().map_err(self.kvm("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(self.kvm("KVM_GET_SREGS"))?;
        let fpu = FpuState::from(&fd.get_fpu().map_err(self.kvm("KVM_GET_FPU"))?);
        let xsave = self.get_xsave()?;
        if xsave.is_none() {
            absent.push("xsave".to_string());
        }
        let xcrs = if self.caps.xcrs {
            Some(fd.get_xcrs().map_err(self.kvm("KVM_GET_XCRS"))?)
        } else {
            absent.push("xcrs".to_string());
            None
        };
        let debugregs = if self.caps.debugregs {
            Some(fd.get_debug_regs().map_err(self.kvm("KVM_GET_DEBUGREGS"))?)
        } else {
            absent.push("debugregs".to_string());
            None
        };
        let msrs = self.get_msrs()?;
        let lapic = fd.get_lapic().map_err(self.kvm("KVM_GET_LAPIC"))?;
        let events = if self.caps.vcpu_events {
            Some(
                fd.get_vcpu_events()
                    .map_err(self.kvm("KVM_GET_VCPU_EVENTS"))?,
            )
        } else {
            absent.push("vcpu_events".to_string());
            None
        };
        let mp_state = fd.get_mp_state().map_err(self.kvm("KVM_GET_MP_STATE"))?;
        let nested = if self.caps.nested_state > 0 {
            let mut buf = KvmNestedStateBuffer::empty();
            match fd
                .nested_state(&mut buf)
                .map_err(self.kvm("KVM_GET_NESTED_STATE"))?
            {
                Some(_) => Some(postcard::to_allocvec(&buf).map_err(|source| Error::Codec {
                    id: "cpu".into(),
                    instance: self.index,
                    source,
                })?),
                None => None,
            }
        } else {
            absent.push("nested_state".to_string());
            None
        };
        let tsc = msrs
            .iter()
            .find(|m| m.index == MSR_IA32_TSC)
            .map(|m| m.data)
            .unwrap_or(0);
        let tsc_khz = fd.get_tsc_khz().ok();
        if tsc_khz.is_none() {
            absent.push("tsc_khz".to_string());
        }
        Ok(VcpuState {
            cpuid,
            regs,
            sregs,
            fpu,
            xsave,
            xcrs,
            debugregs,
            msrs,
            lapic,
            events,
            mp_state,
            tsc,
            tsc_khz,
            nested,
            absent,
        })
    }

    /// Order (TESTBED): cpuid2, sregs, MSRs, xsave, xcrs, debugregs, LAPIC, TSC_DEADLINE again,
    /// mp_state, regs, fpu, vcpu_events.
    fn restore(&mut self, s: &VcpuState) -> Result<()> {
        let fd = self.fd;
        self.check_tsc_khz(s.tsc_khz)?;
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| {
            Error::component(
                "cpu",
                self.index,
                format!("{} CPUID entries: {e:?}", s.cpuid.len()),
            )
        })?;
        fd.set_cpuid2(&cpuid).map_err(self.kvm("KVM_SET_CPUID2"))?;
        if let Some(nested) = &s.nested {
            if self.caps.nested_state <= 0 {
                return Err(Error::component(
                    "cpu",
                    self.index,
                    "the source saved nested state and this host has no KVM_CAP_NESTED_STATE",
                ));
            }
            let buf: KvmNestedStateBuffer =
                postcard::from_bytes(nested).map_err(|source| Error::Codec {
                    id: "cpu".into(),
                    instance: self.index,
                    source,
                })?;
            fd.set_nested_state(&buf)
                .map_err(self.kvm("KVM_SET_NESTED_STATE"))?;
        }
        fd.set_sregs(&s.sregs).map_err(self.kvm("KVM_SET_SREGS"))?;
        self.set_msrs(&s.msrs)?;
        if let Some(x) = &s.xsave {
            self.set_xsave(x)?;
        }
        if let Some(x) = &s.xcrs {
            fd.set_xcrs(x).map_err(self.kvm("KVM_SET_XCRS"))?;
        }
        if let Some(d) = &s.debugregs {
            fd.set_debug_regs(d)
                .map_err(self.kvm("KVM_SET_DEBUGREGS"))?;
        }
        fd.set_lapic(&s.lapic).map_err(self.kvm("KVM_SET_LAPIC"))?;
        let deadline: Vec<MsrValue> = s
            .msrs
            .iter()
            .filter(|m| m.index == MSR_IA32_TSC_DEADLINE)
            .copied()
            .collect();
        self.set_msrs(&deadline)?;
        fd.set_mp_state(s.mp_state)
            .map_err(self.kvm("KVM_SET_MP_STATE"))?;
        fd.set_regs(&s.regs).map_err(self.kvm("KVM_SET_REGS"))?;
        fd.set_fpu(&s.fpu.to_kvm()?)
            .map_err(self.kvm("KVM_SET_FPU"))?;
        if let Some(e) = &s.events {
            fd.set_vcpu_events(e)
                .map_err(self.kvm("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_util::round_trip;
    use kvm_ioctls::Kvm;

    fn vcpu(kvm: &Kvm) -> (kvm_ioctls::VmFd, VcpuFd) {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let caps = HostCaps::get(kvm).unwrap();
        let fd = vm.create_vcpu(0).unwrap();
        fd.set_cpuid2(&caps.supported_cpuid).unwrap();
        (vm, fd)
    }

    #[test]
    fn vcpu_state_round_trip() {
        let kvm = Kvm::new().unwrap();
        let caps = HostCaps::get(&kvm).unwrap();
        let (_vm_a, a) = vcpu(&kvm);
        let (_vm_b, b) = vcpu(&kvm);
        // Make the source state distinctive.
        let mut regs = a.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.r15 = 0xfeed;
        regs.rip = 0x10_0000;
        a.set_regs(&regs).unwrap();
        let mut sregs = a.get_sregs().unwrap();
        sregs = crate::boot::entry_sregs(sregs, 0x8000);
        a.set_sregs(&sregs).unwrap();
        let mut fpu = a.get_fpu().unwrap();
        fpu.xmm[3] = [7; 16];
        a.set_fpu(&fpu).unwrap();
        let src = VcpuComponent {
            index: 0,
            fd: &a,
            caps,
        };
        let mut dst = VcpuComponent {
            index: 0,
            fd: &b,
            caps,
        };
        let (first, second) = round_trip(&src, &mut dst, |s| {
            // The TSC keeps counting between the two saves.
            s.tsc = 0;
            for m in &mut s.msrs {
                if m.index == MSR_IA32_TSC {
                    m.data = 0;
                }
            }
        });
        assert_eq!(second.regs.rax, 0x1234_5678);
        assert_eq!(second.fpu.xmm[3], [7; 16]);
        assert!(second.tsc >= first.tsc, "TSC went backwards across restore");
        assert!(first.absent.contains(&"nested_state".to_string()) || caps.nested_state > 0);
    }
}
