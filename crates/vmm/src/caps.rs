//! What this host's KVM offers, probed once per process on a throwaway VM.

use std::sync::OnceLock;

use kvm_bindings::{kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

use crate::error::{Error, Result};

/// `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_TSC_DEADLINE`.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Host capabilities relevant to state save/restore.
#[derive(Clone, Debug)]
pub struct HostCaps {
    /// `KVM_GET_SUPPORTED_CPUID`.
    pub supported_cpuid: CpuId,
    /// `KVM_CAP_XSAVE2` size in bytes (0 = use `KVM_GET_XSAVE`).
    pub xsave2_size: usize,
    /// `KVM_CAP_XSAVE`.
    pub xsave: bool,
    /// `KVM_CAP_XCRS`.
    pub xcrs: bool,
    /// `KVM_CAP_DEBUGREGS`.
    pub debugregs: bool,
    /// `KVM_CAP_VCPU_EVENTS`.
    pub vcpu_events: bool,
    /// `KVM_CAP_NESTED_STATE` (maximum size; 0 = unavailable).
    pub nested_state: i32,
    /// `KVM_CAP_TSC_CONTROL` (`KVM_SET_TSC_KHZ` usable).
    pub tsc_control: bool,
    /// `KVM_CAP_ADJUST_CLOCK` flags.
    pub adjust_clock: i32,
    /// `KVM_GET_MSR_INDEX_LIST` filtered to the MSRs this host both reads and writes back.
    pub msrs: Vec<u32>,
    /// MSRs of the index list that failed the get/set probe (logged once).
    pub msrs_rejected: Vec<u32>,
}

impl HostCaps {
    /// The probed capabilities (probed on first use).
    pub fn get(kvm: &Kvm) -> Result<&'static HostCaps> {
        static CAPS: OnceLock<HostCaps> = OnceLock::new();
        if let Some(c) = CAPS.get() {
            return Ok(c);
        }
        let caps = Self::probe(kvm)?;
        Ok(CAPS.get_or_init(|| caps))
    }

    fn probe(kvm: &Kvm) -> Result<HostCaps> {
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::kvm("host", "KVM_GET_SUPPORTED_CPUID", e))?;
        let vm = kvm
            .create_vm()
            .map_err(|e| Error::kvm("host probe", "KVM_CREATE_VM", e))?;
        let xsave2 = vm.check_extension_int(Cap::Xsave2);
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| Error::kvm("host probe", "KVM_CREATE_VCPU", e))?;
        vcpu.set_cpuid2(&supported_cpuid)
            .map_err(|e| Error::kvm("host probe", "KVM_SET_CPUID2", e))?;
        let list = kvm
            .get_msr_index_list()
            .map_err(|e| Error::kvm("host", "KVM_GET_MSR_INDEX_LIST", e))?;
        let mut msrs = Vec::new();
        let mut msrs_rejected = Vec::new();
        for &index in list.as_slice() {
            let entry = kvm_msr_entry {
                index,
                ..Default::default()
            };
            let ok = Msrs::from_entries(&[entry]).ok().is_some_and(|mut m| {
                matches!(vcpu.get_msrs(&mut m), Ok(1)) && matches!(vcpu.set_msrs(&m), Ok(1))
            });
            if ok {
                msrs.push(index);
            } else {
                msrs_rejected.push(index);
            }
        }
        let caps = HostCaps {
            supported_cpuid,
            xsave2_size: usize::try_from(xsave2).unwrap_or(0),
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            debugregs: kvm.check_extension(Cap::Debugregs),
            vcpu_events: kvm.check_extension(Cap::VcpuEvents),
            nested_state: kvm.check_extension_int(Cap::NestedState),
            tsc_control: kvm.check_extension(Cap::TscControl),
            adjust_clock: kvm.check_extension_int(Cap::AdjustClock),
            msrs,
            msrs_rejected,
        };
        tracing::info!(
            msrs = caps.msrs.len(),
            rejected = ?caps.msrs_rejected,
            xsave2 = caps.xsave2_size,
            "KVM host probe"
        );
        if caps.nested_state <= 0 {
            tracing::info!("KVM_CAP_NESTED_STATE = 0: nested state is not saved (recorded absent)");
        }
        if !caps.tsc_control {
            tracing::info!("KVM_CAP_TSC_CONTROL = 0: the TSC frequency is checked, not set");
        }
        Ok(caps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_finds_the_tsc_msr() {
        let kvm = Kvm::new().unwrap();
        let caps = HostCaps::get(&kvm).unwrap();
        eprintln!(
            "msrs kept {} {:x?}\nrejected {:x?}\nxsave2 {} xcrs {} debugregs {} events {} nested {} tsc_control {} adjust_clock {:#x}",
            caps.msrs.len(),
            caps.msrs,
            caps.msrs_rejected,
            caps.xsave2_size,
            caps.xcrs,
            caps.debugregs,
            caps.vcpu_events,
            caps.nested_state,
            caps.tsc_control,
            caps.adjust_clock
        );
        assert!(caps.msrs.contains(&MSR_IA32_TSC));
        // Probing twice gives the same (cached) answer.
        assert!(std::ptr::eq(caps, HostCaps::get(&kvm).unwrap()));
    }
}
