//! The `tern` hypervisor driver: a domain is a `tern run` process with the built-in test guest
//! (or a kernel given in `<os>`), controlled over its QMP socket. Depends only on `virt`,
//! `virt-util` and `virt-conf` (libvirt's driver rule).

use std::path::PathBuf;

use virt::conf::{DomainDef, DriverKind, SerialDef};
use virt::{Error, HypervisorDriver, LaunchCommand, LaunchMode, Result, VmmPaths};

/// The driver; `tern` is the binary used for definitions without `<emulator>`.
pub struct TernDriver {
    pub tern: PathBuf,
}

impl TernDriver {
    pub fn new(tern: PathBuf) -> Self {
        TernDriver { tern }
    }
}

impl HypervisorDriver for TernDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Tern
    }

    fn emulator(&self, def: &DomainDef) -> PathBuf {
        def.emulator.clone().unwrap_or_else(|| self.tern.clone())
    }

    fn check(&self, def: &DomainDef) -> Result<()> {
        let exe = self.emulator(def);
        if !exe.is_file() {
            return Err(Error::OperationFailed(format!(
                "the tern driver's emulator {} does not exist",
                exe.display()
            )));
        }
        Ok(())
    }

    fn launch(&self, def: &DomainDef, paths: &VmmPaths, mode: LaunchMode) -> Result<LaunchCommand> {
        self.check(def)?;
        let mut a: Vec<String> = vec![
            "run".into(),
            "--qmp".into(),
            paths.qmp.display().to_string(),
            "--memory".into(),
            format!("{}M", def.memory_mib()),
            "--vcpus".into(),
            def.vcpus.to_string(),
            "--uuid".into(),
            def.uuid.to_string(),
        ];
        match &def.serial {
            Some(SerialDef::File(p)) => {
                a.extend(["--serial".into(), format!("file:{}", p.display())])
            }
            Some(SerialDef::Unix(p)) => {
                a.extend(["--serial".into(), format!("unix:{}", p.display())])
            }
            Some(SerialDef::Null) | None => a.extend(["--serial".into(), "none".into()]),
        }
        if let Some(w) = &def.workload {
            a.extend([
                "--workload".into(),
                w.kind.clone(),
                "--work-mem".into(),
                w.mem_mib.to_string(),
                "--rate".into(),
                w.rate_mib_s.to_string(),
                "--order".into(),
                w.order.clone(),
            ]);
        }
        // Direct kernel boot (`tern run --kernel/--initrd`, from the guests issue).
        if let Some(k) = &def.os.kernel {
            a.extend(["--kernel".into(), k.display().to_string()]);
        }
        if let Some(i) = &def.os.initrd {
            a.extend(["--initrd".into(), i.display().to_string()]);
        }
        if let Some(c) = &def.os.cmdline {
            a.extend(["--append".into(), c.clone()]);
        }
        match mode {
            LaunchMode::Run => {}
            LaunchMode::Paused => a.push("-S".into()),
            LaunchMode::Incoming => a.extend(["-S".into(), "--incoming".into(), "defer".into()]),
        }
        Ok(LaunchCommand {
            program: self.emulator(def),
            args: a,
        })
    }

    fn shares_qmp_socket(&self) -> bool {
        true
    }

    fn destination_decides(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> VmmPaths {
        VmmPaths {
            dir: "/run/tern/domains/vm".into(),
            qmp: "/run/tern/domains/vm/qmp.sock".into(),
            qmp_events: "/run/tern/domains/vm/qmp.sock".into(),
            log: "/run/tern/domains/vm/vmm.log".into(),
        }
    }

    #[test]
    fn command_lines() {
        let def = virt::conf::parse_domain(
            "<domain type='kvm' xmlns:tern='http://tern.dev/schemas/domain/1.0'><name>vm</name>\
             <memory unit='GiB'>1</memory><vcpu>2</vcpu><os><type>hvm</type>\
             <kernel>/k</kernel><cmdline>a=b</cmdline></os>\
             <devices><emulator>/bin/sh</emulator></devices>\
             <tern:workload type='dirty' mem='64' rate='50'/></domain>",
        )
        .expect("xml");
        let d = TernDriver::new("/nonexistent/tern".into());
        let run = d.launch(&def, &paths(), LaunchMode::Run).expect("run");
        let a = run.args.join(" ");
        assert_eq!(run.program, std::path::PathBuf::from("/bin/sh"));
        assert!(
            a.starts_with("run --qmp /run/tern/domains/vm/qmp.sock --memory 1024M --vcpus 2"),
            "{a}"
        );
        assert!(
            a.contains("--workload dirty --work-mem 64 --rate 50 --order seq"),
            "{a}"
        );
        assert!(
            a.contains("--kernel /k") && a.contains("--append a=b"),
            "{a}"
        );
        assert!(!a.contains("-S"), "{a}");
        let inc = d
            .launch(&def, &paths(), LaunchMode::Incoming)
            .expect("incoming");
        assert!(inc.args.join(" ").ends_with("-S --incoming defer"));
        let e = TernDriver::new("/nonexistent/tern".into())
            .launch(
                &virt::conf::parse_domain(
                    "<domain type='kvm'><name>x</name><memory unit='MiB'>64</memory><os><type>hvm</type></os></domain>",
                )
                .expect("xml"),
                &paths(),
                LaunchMode::Run,
            )
            .expect_err("no tern binary");
        assert!(e.to_string().contains("/nonexistent/tern"), "{e}");
    }
}
