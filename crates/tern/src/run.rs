//! `tern run`: one VM process with a QMP control socket.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tern_qmp::{EventSink, QemuVersion, QmpServer, ServerConfig};
use tern_statedev::{StateDevConfig, StateDevice};
use tern_vmm::boot::kernel::{BootProtocol, KernelImage};
use tern_vmm::{GuestImage, SerialTarget, Vm, VmConfig};

use crate::args::{BootProtocolArg, RunArgs};
use crate::control::{Controller, ExitRequest, QmpDispatch, RunState};

/// First word of the line `tern run` prints on stderr once its QMP socket accepts clients.
pub const READY_PREFIX: &str = "tern: ready";

/// Parses `--serial`.
pub fn parse_serial(s: &str) -> Result<SerialTarget> {
    Ok(match s {
        "none" => SerialTarget::None,
        "stdout" | "stdio" => SerialTarget::Stdout,
        _ => {
            if let Some(p) = s.strip_prefix("file:") {
                SerialTarget::File(PathBuf::from(p))
            } else if let Some(p) = s.strip_prefix("unix:") {
                SerialTarget::UnixSocket(PathBuf::from(p))
            } else {
                bail!("--serial {s:?}: expected none, stdout, file:PATH or unix:PATH")
            }
        }
    })
}

/// Builds the machine configuration from the command line.
pub fn vm_config(a: &RunArgs) -> Result<VmConfig> {
    if a.kernel.is_some() {
        let mut cfg = VmConfig::new(
            a.memory,
            a.vcpus,
            a.guest.append.clone().unwrap_or_default(),
        );
        cfg.serial = parse_serial(&a.serial)?;
        cfg.huge_pages = a.huge_pages;
        if let Some(u) = a.uuid {
            cfg.uuid = u;
        }
        cfg.validate().context("machine configuration")?;
        return Ok(cfg);
    }
    let opts = a.guest.options().context("guest options")?;
    if opts.min_ram_bytes() > a.memory {
        bail!(
            "--work-mem {} MiB does not fit in --memory {} MiB (the workload area starts at {} MiB)",
            opts.mem_mib,
            a.memory >> 20,
            tern_guest::layout::WORK_BASE >> 20
        );
    }
    // The guest's working set is one linear GPA range from WORK_BASE; RAM past 3 GiB continues
    // above the 32-bit hole (LAPIC/IOAPIC/TSS live there), so the range must end below it.
    // (QEMU's PVH guest has the same limit.)
    let hole = tern_vmm::memory::HOLE_START;
    if opts.min_ram_bytes() > hole {
        bail!(
            "--work-mem {} MiB: the workload area ({} MiB to {} MiB) must end below the 32-bit hole at {} MiB (at most {} MiB)",
            opts.mem_mib,
            tern_guest::layout::WORK_BASE >> 20,
            opts.min_ram_bytes() >> 20,
            hole >> 20,
            (hole - tern_guest::layout::WORK_BASE) >> 20
        );
    }
    let mut cfg = VmConfig::new(a.memory, a.vcpus, opts.to_cmdline());
    cfg.serial = parse_serial(&a.serial)?;
    cfg.huge_pages = a.huge_pages;
    if let Some(u) = a.uuid {
        cfg.uuid = u;
    }
    cfg.validate().context("machine configuration")?;
    Ok(cfg)
}

/// Reads `--kernel` and `--initrd`.
pub fn kernel_image(a: &RunArgs) -> Result<Option<KernelImage>> {
    let Some(k) = &a.kernel else { return Ok(None) };
    let kernel = std::fs::read(k).with_context(|| format!("--kernel {}", k.display()))?;
    let initrd = match &a.initrd {
        Some(i) => Some(std::fs::read(i).with_context(|| format!("--initrd {}", i.display()))?),
        None => None,
    };
    Ok(Some(KernelImage {
        kernel,
        initrd,
        protocol: match a.boot_protocol {
            BootProtocolArg::Auto => BootProtocol::Auto,
            BootProtocolArg::Pvh => BootProtocol::Pvh,
            BootProtocolArg::Linux => BootProtocol::Linux,
        },
    }))
}

/// Builds the `--device` devices (`statedev,...`); `incoming` ones wait for their state.
pub fn devices(specs: &[String], incoming: bool) -> Result<Vec<StateDevice>> {
    specs
        .iter()
        .map(|spec| {
            let opts = spec
                .strip_prefix("statedev,")
                .or_else(|| (spec == "statedev").then_some(""))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--device {spec:?}: unknown device (known: statedev,size=...,setup-ms=...)"
                    )
                })?;
            let cfg = StateDevConfig::parse(opts).with_context(|| format!("--device {spec}"))?;
            let d = if incoming {
                StateDevice::new_incoming(cfg)
            } else {
                StateDevice::new(cfg)
            };
            d.with_context(|| format!("--device {spec}"))
        })
        .collect()
}

/// Runs the VM until `quit` (QMP) or a signal.
pub fn run(a: RunArgs) -> Result<()> {
    let cfg = vm_config(&a)?;
    crate::migrate::machine::set_test_only_cpu_overrides(
        crate::migrate::machine::TestOnlyCpuOverrides {
            cpuid_xor: a.x_test_only_cpuid_xor,
            tsc_khz: a.x_test_only_tsc_khz,
        },
    );
    if let Some(gpa) = a.x_test_only_corrupt_ram {
        crate::migrate::machine::set_test_only_corrupt_ram(gpa);
    }
    let incoming = a.incoming.clone();
    let kernel = kernel_image(&a)?;
    let image = kernel.as_ref().map(GuestImage::Kernel);
    let vm = Arc::new(if incoming.is_some() {
        Vm::new_for_incoming_with_image(cfg, image)
            .context("creating the VM for an incoming migration")?
    } else {
        Vm::with_image(cfg, image.unwrap_or(GuestImage::Builtin)).context("creating the VM")?
    });

    let devices = devices(&a.devices, incoming.is_some())?;
    let events = EventSink::new();
    let (quit_tx, quit_rx) = mpsc::channel();
    let state = match (&incoming, a.paused) {
        (Some(_), _) => RunState::InMigrate,
        (None, true) => RunState::Prelaunch,
        (None, false) => RunState::Running,
    };
    let ctl = Controller::new(
        vm.clone(),
        devices,
        events.clone(),
        state,
        !a.paused,
        quit_tx,
    );
    for spec in &a.objects {
        let args = crate::control::objects::parse_cli(spec).map_err(anyhow::Error::msg)?;
        ctl.object_add(args)
            .map_err(|e| anyhow::anyhow!("--object {spec}: {}", e.desc))?;
    }
    let mut scfg = ServerConfig::new(
        QemuVersion {
            major: 10,
            minor: 0,
            micro: 0,
        },
        format!("tern-{}", env!("CARGO_PKG_VERSION")),
    );
    scfg.events = events.clone();
    // A guest reset request (i8042) comes on a vCPU thread, which cannot wait for itself to
    // park: the reset runs on its own short-lived thread.
    let weak = Arc::downgrade(&ctl);
    vm.on_guest_reset(move || {
        let weak = weak.clone();
        let spawned = std::thread::Builder::new()
            .name("vm-reset".into())
            .spawn(move || {
                if let Some(ctl) = weak.upgrade() {
                    if let Err(e) = ctl.reset_machine(true) {
                        tracing::warn!("guest reset request dropped: {}", e.desc);
                        ctl.vm.finish_reset_request();
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("guest reset: cannot spawn vm-reset: {e}");
        }
    });
    let server = QmpServer::bind(&a.qmp, Arc::new(QmpDispatch(ctl.clone())), scfg)
        .with_context(|| format!("QMP socket {}", a.qmp.display()))?;

    if state == RunState::Running {
        ctl.machine().resume().context("starting the vCPUs")?;
    }
    if let Some(uri) = incoming.filter(|u| u != "defer") {
        ctl.start_incoming(&uri, true)
            .map_err(|e| anyhow::anyhow!("--incoming {uri}: {}", e.desc))?;
    }

    // Parents (tern demo, tests, benchmarks) wait for this line instead of polling the socket.
    eprintln!(
        "{READY_PREFIX} qmp={} pid={}",
        a.qmp.display(),
        std::process::id()
    );

    // Wait for `quit` (or a failed incoming migration with `exit-on-error`). A closed channel
    // (controller dropped) also ends the process.
    let why = quit_rx.recv().unwrap_or(ExitRequest::Quit);
    let reason = match why {
        ExitRequest::Quit => "host-qmp-quit",
        ExitRequest::IncomingFailed(_) => "host-error",
    };
    events.emit(
        "SHUTDOWN",
        Some(serde_json::json!({"guest": false, "reason": reason})),
    );
    ctl.set_run_state(RunState::Shutdown);
    ctl.shutdown_migration();
    let vm_result = vm.shutdown();
    server.shutdown();
    vm_result.context("shutting the VM down")?;
    if let ExitRequest::IncomingFailed(e) = why {
        // QEMU's exit-on-error: the error on stderr, a non-zero status.
        bail!("incoming migration failed (exit-on-error): {e}");
    }
    Ok(())
}
