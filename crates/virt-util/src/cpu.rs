//! QEMU's `-cpu` for the test guest on this host: the vendor rule of `tern_guest::host_cpu`
//! (copied, not linked: drivers must not depend on the VMM's crates). `host` on Intel,
//! `host,-arch-capabilities` elsewhere (AMD: PVM's KVM reports an `arch-capabilities` QEMU
//! cannot set); `$TERN_QEMU_CPU` overrides.

/// The environment variable that overrides the choice (same as `tern_guest::host_cpu`).
pub const QEMU_CPU_ENV: &str = "TERN_QEMU_CPU";

/// The `-cpu` value for this host.
pub fn qemu_cpu() -> String {
    if let Ok(v) = std::env::var(QEMU_CPU_ENV) {
        if !v.trim().is_empty() {
            return v.trim().to_string();
        }
    }
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpu_for_cpuinfo(&info).to_string()
}

fn cpu_for_cpuinfo(info: &str) -> &'static str {
    let vendor = info
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "vendor_id").then(|| v.trim())
        })
        .unwrap_or("");
    if vendor == "GenuineIntel" {
        "host"
    } else {
        "host,-arch-capabilities"
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn vendor_rule() {
        assert_eq!(
            super::cpu_for_cpuinfo("vendor_id\t: GenuineIntel\n"),
            "host"
        );
        assert_eq!(
            super::cpu_for_cpuinfo("vendor_id\t: AuthenticAMD\n"),
            "host,-arch-capabilities"
        );
    }
}
