//! The `qemu` hypervisor driver: a domain is a `qemu-system-x86_64` process, controlled over
//! QMP (the first consumer of Tern's QMP compatibility is this management layer: the same
//! shared monitor code drives both). The test guest runs from `tern guest-image`'s ELF (PVH
//! entry) unless `<os><kernel>` names another kernel. Depends only on `virt`, `virt-util` and
//! `virt-conf`.

use std::path::PathBuf;

use virt::conf::{DomainDef, DriverKind, SerialDef};
use virt::{Error, HypervisorDriver, LaunchCommand, LaunchMode, Result, VmmPaths};

/// The driver. `guest_image`: the test guest ELF for definitions without `<kernel>`.
pub struct QemuDriver {
    pub guest_image: Option<PathBuf>,
}

impl QemuDriver {
    pub fn new(guest_image: Option<PathBuf>) -> Self {
        QemuDriver { guest_image }
    }
}

/// The guest command line of `<tern:workload>` (the test guest's `key=value` options).
fn workload_cmdline(def: &DomainDef) -> String {
    match &def.workload {
        Some(w) => format!(
            "workload={} mem={} rate={} order={}",
            w.kind, w.mem_mib, w.rate_mib_s, w.order
        ),
        None => "workload=idle".into(),
    }
}

impl HypervisorDriver for QemuDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Qemu
    }

    fn emulator(&self, def: &DomainDef) -> PathBuf {
        def.emulator
            .clone()
            .unwrap_or_else(|| PathBuf::from("/usr/bin/qemu-system-x86_64"))
    }

    fn check(&self, def: &DomainDef) -> Result<()> {
        let exe = self.emulator(def);
        if !exe.is_file() {
            return Err(Error::OperationFailed(format!(
                "the qemu driver's emulator {} does not exist (install qemu-system-x86)",
                exe.display()
            )));
        }
        if def.os.kernel.is_none() && self.guest_image.is_none() {
            return Err(Error::OperationFailed(
                "the qemu driver has no test guest image (ternd could not run `tern guest-image`) and the definition names no <kernel>".into(),
            ));
        }
        if def.vcpus != 1 && def.os.kernel.is_none() {
            return Err(Error::Unsupported(format!(
                "the test guest's PVH entry (used under QEMU) runs one vCPU; <vcpu> is {}",
                def.vcpus
            )));
        }
        Ok(())
    }

    fn launch(&self, def: &DomainDef, paths: &VmmPaths, mode: LaunchMode) -> Result<LaunchCommand> {
        self.check(def)?;
        let kernel = def
            .os
            .kernel
            .clone()
            .or_else(|| self.guest_image.clone())
            .ok_or_else(|| Error::Internal("no kernel".into()))?;
        let mut append = workload_cmdline(def);
        if let Some(c) = &def.os.cmdline {
            append = if def.os.kernel.is_some() {
                c.clone()
            } else {
                format!("{append} {c}")
            };
        }
        let mut a: Vec<String> = vec![
            "-name".into(),
            def.name.clone(),
            "-uuid".into(),
            def.uuid.to_string(),
            "-accel".into(),
            "kvm".into(),
            "-cpu".into(),
            virt_util::cpu::qemu_cpu(),
            "-machine".into(),
            "pc".into(),
            "-m".into(),
            format!("{}M", def.memory_mib()),
            "-smp".into(),
            def.vcpus.to_string(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-kernel".into(),
            kernel.display().to_string(),
            "-append".into(),
            append,
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", paths.qmp.display()),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", paths.qmp_events.display()),
        ];
        if let Some(i) = &def.os.initrd {
            a.extend(["-initrd".into(), i.display().to_string()]);
        }
        match &def.serial {
            Some(SerialDef::File(p)) => {
                a.extend(["-serial".into(), format!("file:{}", p.display())])
            }
            Some(SerialDef::Unix(p)) => a.extend([
                "-serial".into(),
                format!("unix:{},server=on,wait=off", p.display()),
            ]),
            Some(SerialDef::Null) | None => a.extend(["-serial".into(), "null".into()]),
        }
        match mode {
            LaunchMode::Run => {}
            LaunchMode::Paused => a.push("-S".into()),
            LaunchMode::Incoming => a.extend(["-S".into(), "-incoming".into(), "defer".into()]),
        }
        Ok(LaunchCommand {
            program: self.emulator(def),
            args: a,
        })
    }

    fn shares_qmp_socket(&self) -> bool {
        false
    }

    fn destination_decides(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines() {
        let def = virt::conf::parse_domain(
            "<domain type='kvm' xmlns:tern='http://tern.dev/schemas/domain/1.0'><name>q</name>\
             <memory unit='MiB'>256</memory><os><type>hvm</type></os>\
             <devices><emulator>/bin/sh</emulator></devices>\
             <tern:workload type='pattern' mem='32'/></domain>",
        )
        .expect("xml");
        let p = VmmPaths {
            dir: "/r".into(),
            qmp: "/r/qmp.sock".into(),
            qmp_events: "/r/qmp-events.sock".into(),
            log: "/r/vmm.log".into(),
        };
        let d = QemuDriver::new(Some("/r/guest.elf".into()));
        let inc = d.launch(&def, &p, LaunchMode::Incoming).expect("incoming");
        let a = inc.args.join(" ");
        assert!(a.contains("-accel kvm -cpu host"), "{a}");
        assert!(
            a.contains("-kernel /r/guest.elf -append workload=pattern mem=32 rate=0 order=seq"),
            "{a}"
        );
        assert!(
            a.contains("-qmp unix:/r/qmp.sock,server=on,wait=off -qmp unix:/r/qmp-events.sock"),
            "{a}"
        );
        assert!(a.ends_with("-S -incoming defer"), "{a}");
        let two = virt::conf::parse_domain(
            "<domain type='kvm'><name>q</name><memory unit='MiB'>256</memory><vcpu>2</vcpu>\
             <os><type>hvm</type></os><devices><emulator>/bin/sh</emulator></devices></domain>",
        )
        .expect("xml");
        let e = d.check(&two).expect_err("2 vCPUs");
        assert!(e.to_string().contains("one vCPU"), "{e}");
    }
}
