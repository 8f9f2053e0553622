//! One live migration between a freshly spawned pair of VMs: spawn the destination and the
//! source, wait for the guest, let the suite prepare both sides, migrate with the CPU time of
//! each process measured around it, tear both down. Any error on the way becomes an `error`
//! [`Outcome`], so a suite always has a row to print.

use std::time::Duration;

use serde_json::Value;

use crate::link::Link;
use crate::migrate::{live_migrate, MigParams, Outcome};
use crate::precopy::vm_memory;
use crate::vm::{Guest, Kind, Spec, Vm};
use crate::Ctx;

/// How the two VMs of a pair are made, beyond the link, the guest and the VMM.
pub struct PairSpec<'a> {
    /// Goes into both VM names: `{vmm}-{tag}-{n}-src` / `-dst`.
    pub tag: &'a str,
    pub vcpus: u32,
    pub device: Option<String>,
    /// `-object` / `--object` arguments of the source and of the destination.
    pub src_objects: Vec<String>,
    pub dst_objects: Vec<String>,
}

impl<'a> PairSpec<'a> {
    /// One vCPU, no device, no objects.
    pub fn new(tag: &'a str) -> PairSpec<'a> {
        PairSpec {
            tag,
            vcpus: 1,
            device: None,
            src_objects: Vec::new(),
            dst_objects: Vec::new(),
        }
    }
}

/// CPU time (user + system) of a process in seconds, from `/proc/PID/stat`.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// Spawns destination + source, waits for the guest, runs `prepare` on (source, destination),
/// migrates, tears down. The outcome carries the CPU seconds each process spent from just
/// before `migrate` to the final status (`src_cpu_s`, `dst_cpu_s`).
pub fn migrate_pair(
    ctx: &Ctx,
    link: &Link,
    guest: &Guest,
    kind: Kind,
    pair: &PairSpec,
    p: &MigParams,
    prepare: impl FnOnce(&mut Vm, &mut Vm) -> anyhow::Result<()>,
) -> Outcome {
    let base = format!(
        "{}-{}-{}",
        kind.label().to_lowercase(),
        pair.tag,
        crate::facts::realtime_ns() % 1_000_000
    );
    let spec = |role: &str, ns, incoming: bool| Spec {
        kind,
        name: format!("{base}-{role}"),
        memory_mib: guest.ram_mib.unwrap_or(vm_memory(guest.mem)),
        vcpus: pair.vcpus,
        guest: guest.clone(),
        netns: ns,
        incoming,
        device: pair.device.clone(),
        objects: if incoming {
            pair.dst_objects.clone()
        } else {
            pair.src_objects.clone()
        },
        qemu_args: Vec::new(),
    };
    let res = (|| -> anyhow::Result<Outcome> {
        let mut dst = Vm::spawn(&ctx.bins, &spec("dst", link.dst_ns, true))?;
        let mut src = Vm::spawn(&ctx.bins, &spec("src", link.src_ns, false))?;
        src.wait_ready(guest, Duration::from_secs(90))?;
        prepare(&mut src, &mut dst)?;
        let cpu0 = (cpu_secs(src.pid()), cpu_secs(dst.pid()));
        let mut out = live_migrate(&mut src, &mut dst, &link.host, p);
        out.src_cpu_s = cpu0.0.zip(cpu_secs(src.pid())).map(|(a, b)| b - a);
        out.dst_cpu_s = cpu0.1.zip(cpu_secs(dst.pid())).map(|(a, b)| b - a);
        if out.result != "completed" {
            tracing::warn!("source log: {}", crate::vm::log_tail(&src.log));
            tracing::warn!("destination log: {}", crate::vm::log_tail(&dst.log));
        }
        src.quit();
        dst.quit();
        Ok(out)
    })();
    res.unwrap_or_else(|e| Outcome {
        result: "error".into(),
        error: Some(format!("{e:#}")),
        src_final: Value::Null,
        dst_final: Value::Null,
        ..Outcome::default()
    })
}
