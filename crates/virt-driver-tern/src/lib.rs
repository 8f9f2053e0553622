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
}
