//! The host's CPU as `/proc/cpuinfo` describes it, and the QEMU `-cpu` model the test guest runs
//! with on it.
//!
//! Every QEMU command line of the project (the QEMU tests, `tern-bench`) takes its `-cpu` from
//! [`qemu_cpu`], so the choice is made in one place, at run time, from the host's vendor:
//!
//! * `GenuineIntel`: [`QEMU_CPU_INTEL`] = `host`;
//! * anything else (`AuthenticAMD`, ...): [`QEMU_CPU_OTHER`] = `host,-arch-capabilities`. On the
//!   AMD PVM hosts, QEMU 10 with plain `host` aborts at start ("failed to set MSR 0x10a": PVM
//!   refuses the `IA32_ARCH_CAPABILITIES` value QEMU derives for the guest). Without the feature
//!   QEMU writes 0 to that MSR, which KVM accepts on every host, so this model also suits Intel.
//!
//! `$TERN_QEMU_CPU` ([`QEMU_CPU_ENV`]), when set and not empty, overrides the choice.
//! See docs/guest.md "Running the guest under QEMU".

use serde::Serialize;

use crate::{Error, Result};

/// Where the host's CPU description is read from.
pub const CPUINFO_PATH: &str = "/proc/cpuinfo";
/// Environment variable that, when set and not empty, is the QEMU `-cpu` argument to use.
pub const QEMU_CPU_ENV: &str = "TERN_QEMU_CPU";
/// QEMU `-cpu` model on Intel hosts.
pub const QEMU_CPU_INTEL: &str = "host";
/// QEMU `-cpu` model on every other host (AMD: `-cpu host` aborts there, see the module doc).
pub const QEMU_CPU_OTHER: &str = "host,-arch-capabilities";

/// CPU vendor, from `/proc/cpuinfo`'s `vendor_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CpuVendor {
    /// `GenuineIntel`.
    Intel,
    /// `AuthenticAMD`.
    Amd,
    /// Any other or no `vendor_id`.
    Other,
}

/// The first CPU of `/proc/cpuinfo` (all CPUs of these hosts are the same).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostCpu {
    /// `vendor_id`, e.g. `AuthenticAMD` (empty if absent).
    pub vendor_id: String,
    /// `model name`, e.g. `AMD EPYC` (empty if absent).
    pub model_name: String,
    /// `cpu family` (decimal).
    pub family: Option<u32>,
    /// `model` (decimal).
    pub model: Option<u32>,
    /// `stepping` (decimal).
    pub stepping: Option<u32>,
}

impl HostCpu {
    /// Parses the first processor's block of a `/proc/cpuinfo` text (`key<tabs>: value` lines up
    /// to the first empty line). Missing fields stay empty / `None`.
    pub fn parse(cpuinfo: &str) -> HostCpu {
        let mut cpu = HostCpu {
            vendor_id: String::new(),
            model_name: String::new(),
            family: None,
            model: None,
            stepping: None,
        };
        let block = cpuinfo
            .lines()
            .skip_while(|l| l.trim().is_empty())
            .take_while(|l| !l.trim().is_empty());
        for line in block {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "vendor_id" => cpu.vendor_id = value.to_string(),
                "model name" => cpu.model_name = value.to_string(),
                "cpu family" => cpu.family = value.parse().ok(),
                "model" => cpu.model = value.parse().ok(),
                "stepping" => cpu.stepping = value.parse().ok(),
                _ => {}
            }
        }
        cpu
    }

    /// Reads and parses [`CPUINFO_PATH`].
    pub fn read() -> Result<HostCpu> {
        let text = std::fs::read_to_string(CPUINFO_PATH).map_err(|e| Error::HostCpu {
            path: CPUINFO_PATH,
            reason: e.to_string(),
        })?;
        Ok(HostCpu::parse(&text))
    }

    /// The vendor named by `vendor_id`.
    pub fn vendor(&self) -> CpuVendor {
        match self.vendor_id.as_str() {
            "GenuineIntel" => CpuVendor::Intel,
            "AuthenticAMD" => CpuVendor::Amd,
            _ => CpuVendor::Other,
        }
    }

    /// The QEMU `-cpu` model for this CPU (ignores [`QEMU_CPU_ENV`]; see [`qemu_cpu`]).
    pub fn qemu_cpu_model(&self) -> &'static str {
        match self.vendor() {
            CpuVendor::Intel => QEMU_CPU_INTEL,
            CpuVendor::Amd | CpuVendor::Other => QEMU_CPU_OTHER,
        }
    }

    /// One line for logs and result files, e.g. `AuthenticAMD AMD EPYC (family 25 model 17
    /// stepping 1)`.
    pub fn describe(&self) -> String {
        let num = |v: Option<u32>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
        format!(
            "{} {} (family {} model {} stepping {})",
            if self.vendor_id.is_empty() {
                "unknown-vendor"
            } else {
                &self.vendor_id
            },
            if self.model_name.is_empty() {
                "unknown-model"
            } else {
                &self.model_name
            },
            num(self.family),
            num(self.model),
            num(self.stepping)
        )
    }
}

/// The `-cpu` argument for QEMU on this host: `$TERN_QEMU_CPU` if set and not empty, else
/// [`HostCpu::qemu_cpu_model`] of [`HostCpu::read`].
pub fn qemu_cpu() -> Result<String> {
    choose_qemu_cpu(std::env::var(QEMU_CPU_ENV).ok().as_deref(), HostCpu::read)
}

fn choose_qemu_cpu(env: Option<&str>, read: impl FnOnce() -> Result<HostCpu>) -> Result<String> {
    match env.map(str::trim).filter(|s| !s.is_empty()) {
        Some(model) => Ok(model.to_string()),
        None => Ok(read()?.qemu_cpu_model().to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start of `/proc/cpuinfo` on the AMD PVM hosts (two CPUs; only the first counts).
    const AMD: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n\
        model\t\t: 17\nmodel name\t: AMD EPYC\nstepping\t: 1\ncpu MHz\t\t: 2596.132\n\
        flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep\n\nprocessor\t: 1\n\
        vendor_id\t: GenuineIntel\nmodel name\t: not the first CPU\n";
    /// The same for the Intel PVM hosts.
    const INTEL: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n\
        model\t\t: 143\nmodel name\t: Intel(R) Xeon(R) Processor\nstepping\t: 8\n\n";

    #[test]
    fn amd_gets_host_without_arch_capabilities() {
        let cpu = HostCpu::parse(AMD);
        assert_eq!(
            cpu,
            HostCpu {
                vendor_id: "AuthenticAMD".into(),
                model_name: "AMD EPYC".into(),
                family: Some(25),
                model: Some(17),
                stepping: Some(1),
            }
        );
        assert_eq!(cpu.vendor(), CpuVendor::Amd);
        assert_eq!(cpu.qemu_cpu_model(), "host,-arch-capabilities");
        assert_eq!(
            cpu.describe(),
            "AuthenticAMD AMD EPYC (family 25 model 17 stepping 1)"
        );
    }

    #[test]
    fn intel_gets_plain_host() {
        let cpu = HostCpu::parse(INTEL);
        assert_eq!(cpu.vendor(), CpuVendor::Intel);
        assert_eq!(cpu.model_name, "Intel(R) Xeon(R) Processor");
        assert_eq!(
            (cpu.family, cpu.model, cpu.stepping),
            (Some(6), Some(143), Some(8))
        );
        assert_eq!(cpu.qemu_cpu_model(), "host");
    }

    #[test]
    fn unknown_or_missing_vendor_gets_the_portable_model() {
        let hygon = HostCpu::parse("vendor_id\t: HygonGenuine\nmodel\t\t: x\n");
        assert_eq!(hygon.vendor(), CpuVendor::Other);
        assert_eq!(hygon.model, None, "a non-number model is None");
        assert_eq!(hygon.qemu_cpu_model(), QEMU_CPU_OTHER);
        let empty = HostCpu::parse("");
        assert_eq!(empty.vendor(), CpuVendor::Other);
        assert_eq!(empty.qemu_cpu_model(), QEMU_CPU_OTHER);
        assert_eq!(
            empty.describe(),
            "unknown-vendor unknown-model (family ? model ? stepping ?)"
        );
    }

    #[test]
    fn environment_overrides_the_vendor_choice() {
        let amd = || Ok(HostCpu::parse(AMD));
        assert_eq!(
            choose_qemu_cpu(Some("EPYC-v4"), amd).unwrap(),
            "EPYC-v4",
            "a set variable wins"
        );
        assert_eq!(
            choose_qemu_cpu(Some("  "), amd).unwrap(),
            QEMU_CPU_OTHER,
            "an empty variable is ignored"
        );
        assert_eq!(
            choose_qemu_cpu(None, || Ok(HostCpu::parse(INTEL))).unwrap(),
            QEMU_CPU_INTEL
        );
        let unreadable = || {
            Err(Error::HostCpu {
                path: CPUINFO_PATH,
                reason: "gone".into(),
            })
        };
        assert!(choose_qemu_cpu(None, unreadable).is_err());
        assert_eq!(
            choose_qemu_cpu(Some("host"), unreadable).unwrap(),
            "host",
            "the override needs no cpuinfo"
        );
    }

    #[test]
    fn this_hosts_cpuinfo_parses() {
        // The real file, not a sample: an x86 Linux host names its vendor and family.
        let cpu = HostCpu::read().unwrap();
        assert!(!cpu.vendor_id.is_empty(), "{cpu:?}");
        assert!(cpu.family.is_some(), "{cpu:?}");
    }
}
