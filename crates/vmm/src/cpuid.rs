//! CPU compatibility between two machines: which CPUID leaves a migration compares, with the
//! bits that legitimately differ masked out (`docs/machine.md`, "CPU compatibility").
//!
//! The source sends [`migration_cpuid`] of its vCPU 0 in the stream's CONFIG record; the
//! destination computes the same from its own vCPU 0 and requires every source leaf to be
//! present and equal. Both sides apply the same masks, so a masked bit never causes a mismatch.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// One CPUID leaf (function, sub-leaf) with its four output registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuidLeaf {
    /// Leaf (EAX input).
    pub function: u32,
    /// Sub-leaf (ECX input; 0 for leaves without sub-leaves).
    pub index: u32,
    /// Output EAX.
    pub eax: u32,
    /// Output EBX.
    pub ebx: u32,
    /// Output ECX.
    pub ecx: u32,
    /// Output EDX.
    pub edx: u32,
}

/// What a destination compares before it accepts a machine's state: the masked CPUID of
/// vCPU 0 and the guest's TSC frequency, with what the host can do about a TSC difference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuIdentity {
    /// [`migration_cpuid`] of vCPU 0.
    pub cpuid: Vec<CpuidLeaf>,
    /// The guest's TSC frequency (`KVM_GET_TSC_KHZ` of vCPU 0), `None` if KVM could not tell.
    pub tsc_khz: Option<u32>,
    /// `KVM_CAP_TSC_CONTROL`: this host can run a guest TSC at another frequency.
    pub tsc_scaling: bool,
    /// Largest TSC frequency difference a restore accepts without scaling, kHz.
    pub tsc_tolerance_khz: u32,
}

/// Which sub-leaves a rule covers.
#[derive(Clone, Copy, Debug)]
enum Sub {
    /// Exactly this one.
    One(u32),
    /// Every sub-leaf from this one on.
    From(u32),
}

/// A compared leaf: the bits kept of each register (0 = register not compared).
#[derive(Clone, Copy, Debug)]
struct Rule {
    function: u32,
    sub: Sub,
    keep: [u32; 4],
}

const ALL: u32 = u32::MAX;
/// Leaf 1 ECX bit 3: MONITOR/MWAIT, which KVM flips at run time from `IA32_MISC_ENABLE`.
const LEAF1_ECX_MONITOR: u32 = 1 << 3;
/// Leaf 1 ECX bit 27: OSXSAVE, a mirror of the guest's CR4.OSXSAVE (run-time state).
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
/// Leaf 1 EDX bit 9: APIC, cleared by KVM while the guest has its local APIC disabled.
const LEAF1_EDX_APIC: u32 = 1 << 9;
/// Leaf 7.0 ECX bit 4: OSPKE, a mirror of the guest's CR4.PKE (run-time state).
const LEAF7_ECX_OSPKE: u32 = 1 << 4;

/// The compared leaves. Not compared at all: leaf 0 EAX (highest leaf), leaf 1 EAX/EBX
/// (family/model/stepping, APIC ID, logical processor count, CLFLUSH size, brand), leaves 4,
/// 0xb, 0x1f and 0x8000_001e (cache and topology, APIC IDs), 0x8000_0008 ECX (core count),
/// the brand string, and every leaf not listed here.
const RULES: &[Rule] = &[
    // Vendor string.
    Rule {
        function: 0,
        sub: Sub::One(0),
        keep: [0, ALL, ALL, ALL],
    },
    // Feature flags.
    Rule {
        function: 1,
        sub: Sub::One(0),
        keep: [
            0,
            0,
            !(LEAF1_ECX_MONITOR | LEAF1_ECX_OSXSAVE),
            !LEAF1_EDX_APIC,
        ],
    },
    // Structured extended features.
    Rule {
        function: 7,
        sub: Sub::One(0),
        keep: [0, ALL, !LEAF7_ECX_OSPKE, ALL],
    },
    // Structured extended features, sub-leaf 1.
    Rule {
        function: 7,
        sub: Sub::One(1),
        keep: [ALL, ALL, ALL, ALL],
    },
    // XCR0 features and the largest XSAVE area.
    Rule {
        function: 0xd,
        sub: Sub::One(0),
        // EBX is the XSAVE size for the XCR0 the guest enabled: run-time state.
        keep: [ALL, 0, ALL, ALL],
    },
    // XSAVE instructions and XSS features.
    Rule {
        function: 0xd,
        sub: Sub::One(1),
        // EBX is the XSAVE size for XCR0 | IA32_XSS: run-time state.
        keep: [ALL, 0, ALL, ALL],
    },
    // Size and offset of each XSAVE component (the layout of the saved XSAVE area).
    Rule {
        function: 0xd,
        sub: Sub::From(2),
        keep: [ALL, ALL, ALL, ALL],
    },
    // KVM paravirtual features.
    Rule {
        function: 0x4000_0001,
        sub: Sub::One(0),
        keep: [ALL, 0, 0, 0],
    },
    // Extended feature flags.
    Rule {
        function: 0x8000_0001,
        sub: Sub::One(0),
        keep: [0, 0, ALL, ALL],
    },
    // Invariant TSC.
    Rule {
        function: 0x8000_0007,
        sub: Sub::One(0),
        keep: [0, 0, 0, ALL],
    },
    // Physical and linear address widths, AMD extended features.
    Rule {
        function: 0x8000_0008,
        sub: Sub::One(0),
        keep: [0xffff, ALL, 0, 0],
    },
    // AMD extended features 2.
    Rule {
        function: 0x8000_0021,
        sub: Sub::One(0),
        keep: [ALL, 0, 0, 0],
    },
];

fn rule_for(function: u32, index: u32) -> Option<&'static Rule> {
    RULES.iter().find(|r| {
        r.function == function
            && match r.sub {
                Sub::One(i) => i == index,
                Sub::From(i) => index >= i,
            }
    })
}

/// The leaves of `entries` (a vCPU's CPUID, `KVM_GET_CPUID2`) that a migration compares, with
/// the bits that legitimately differ set to 0, sorted by (function, index).
pub fn migration_cpuid(entries: &[kvm_cpuid_entry2]) -> Vec<CpuidLeaf> {
    let mut out: Vec<CpuidLeaf> = entries
        .iter()
        .filter_map(|e| {
            let index = if e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0 {
                e.index
            } else {
                0
            };
            let r = rule_for(e.function, index)?;
            Some(CpuidLeaf {
                function: e.function,
                index,
                eax: e.eax & r.keep[0],
                ebx: e.ebx & r.keep[1],
                ecx: e.ecx & r.keep[2],
                edx: e.edx & r.keep[3],
            })
        })
        .collect();
    out.sort_by_key(|l| (l.function, l.index));
    out.dedup_by_key(|l| (l.function, l.index));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == 7 || function == 0xd {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    #[test]
    fn per_vcpu_and_run_time_bits_are_masked() {
        // Two vCPUs of one machine: APIC IDs in leaf 1 EBX[31:24] and leaf 0xb EDX differ, and
        // the guest enabled OSXSAVE on one of them.
        let vcpu = |apic: u32, osxsave: u32| {
            vec![
                entry(0, 0, [0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
                entry(
                    1,
                    0,
                    [
                        0xa10f11,
                        apic << 24 | 0x0800,
                        0x7ed8_3203 | osxsave,
                        0x178b_fbff,
                    ],
                ),
                entry(0xb, 0, [1, 1, 0x100, apic]),
                entry(7, 0, [1, 0x219c_97a9, 0x0040_069c, 0x10]),
                entry(0xd, 0, [0x7, 0x340, 0x340, 0]),
                entry(0xd, 2, [0x100, 0x240, 0, 0]),
            ]
        };
        let a = migration_cpuid(&vcpu(0, 0));
        let b = migration_cpuid(&vcpu(1, LEAF1_ECX_OSXSAVE));
        assert_eq!(a, b);
        assert!(a.iter().all(|l| l.function != 0xb), "topology leaf kept");
        let leaf1 = a.iter().find(|l| l.function == 1).unwrap();
        assert_eq!((leaf1.eax, leaf1.ebx), (0, 0));
        assert_eq!(leaf1.edx, 0x178b_fbff & !LEAF1_EDX_APIC);
        // A real feature difference survives the masks.
        let mut c = vcpu(0, 0);
        c[3].ebx &= !(1 << 5); // AVX2
        let c = migration_cpuid(&c);
        let (x, y) = (
            a.iter().find(|l| l.function == 7).unwrap(),
            c.iter().find(|l| l.function == 7).unwrap(),
        );
        assert_ne!(x.ebx, y.ebx);
        // XSAVE component layout is compared.
        assert!(a
            .iter()
            .any(|l| l.function == 0xd && l.index == 2 && l.ebx == 0x240));
    }
}
