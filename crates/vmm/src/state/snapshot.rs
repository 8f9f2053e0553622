//! Saving all components of a machine, and restoring them after validating the whole set.

use kvm_ioctls::VmFd;

use super::boot::BootComponent;
use super::cpu::{VcpuComponent, VcpuState};
use super::devices::{ControlComponent, I8042Component, SerialComponent};
use super::machine::{MachineComponent, MachineState};
use super::vm::{ClockState, Irqchip, IrqchipState, KvmClock, Pit};
use super::{decode_component, save_component, ComponentState, Persist};
use crate::boot::source::{BootKind, BootSource};
use crate::caps::HostCaps;
use crate::config::VmConfig;
use crate::devices::control::GuestControlState;
use crate::devices::i8042::I8042State;
use crate::devices::serial::SerialDeviceState;
use crate::error::{Error, Result};
use crate::memory::RamRegionInfo;
use crate::vcpu::{lock_vcpu, Shared, SharedVcpu};

/// Every component a machine saves and restores: `(id, oldest version, newest version)` it
/// loads, straight from each [`Persist`] implementation (versions start at 1; restore accepts
/// any version up to `VERSION`).
pub fn known_components() -> Vec<(&'static str, u32, u32)> {
    fn entry<P: Persist>() -> (&'static str, u32, u32) {
        (P::ID, 1, P::VERSION)
    }
    vec![
        entry::<MachineComponent<'static>>(),
        entry::<KvmClock<'static>>(),
        entry::<Irqchip<'static>>(),
        entry::<Pit<'static>>(),
        entry::<SerialComponent<'static>>(),
        entry::<ControlComponent<'static>>(),
        entry::<I8042Component<'static>>(),
        entry::<BootComponent<'static>>(),
        entry::<VcpuComponent<'static>>(),
    ]
}

/// How many component states [`save_all`] produces, and [`restore_all`] takes, for a machine
/// with `vcpus` vCPUs: every component of [`known_components`] once, except the vCPU
/// component, which comes once per vCPU.
pub fn saved_component_count(vcpus: u32) -> usize {
    known_components().len() - 1 + vcpus as usize
}

/// The parts of a machine the state functions work on.
pub struct MachineParts<'a> {
    /// The VM fd.
    pub vm: &'a VmFd,
    /// The vCPUs (all parked).
    pub vcpus: &'a [SharedVcpu],
    /// Devices.
    pub shared: &'a Shared,
    /// RAM regions.
    pub regions: &'a [RamRegionInfo],
    /// Host capabilities.
    pub caps: &'static HostCaps,
    /// What the machine booted (and resets into).
    pub boot: &'a std::sync::Mutex<Option<BootSource>>,
}

/// How long the parts of a save took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SaveBreakdown {
    /// machine, kvmclock, irqchip, pit, serial, guest-control.
    pub vm_and_devices: std::time::Duration,
    /// All vCPUs.
    pub vcpus: std::time::Duration,
}

/// Saves every component: machine, kvmclock, irqchip, pit, serial, guest-control, i8042, boot, cpu 0..n.
pub fn save_all(
    parts: &MachineParts<'_>,
    config: &VmConfig,
) -> Result<(Vec<ComponentState>, SaveBreakdown)> {
    let t0 = std::time::Instant::now();
    let mut config = config.clone();
    let mut out = Vec::with_capacity(6 + parts.vcpus.len());
    out.push(save_component(
        &MachineComponent {
            config: &mut config,
            regions: parts.regions,
        },
        0,
    )?);
    out.push(save_component(&KvmClock(parts.vm), 0)?);
    out.push(save_component(&Irqchip(parts.vm), 0)?);
    out.push(save_component(&Pit(parts.vm), 0)?);
    out.push(save_component(
        &SerialComponent(&parts.shared.bus.serial),
        0,
    )?);
    out.push(save_component(
        &ControlComponent(&parts.shared.bus.control),
        0,
    )?);
    out.push(save_component(&I8042Component(&parts.shared.bus.i8042), 0)?);
    out.push(save_component(&BootComponent(parts.boot), 0)?);
    let t1 = std::time::Instant::now();
    for (i, fd) in parts.vcpus.iter().enumerate() {
        let fd = lock_vcpu(fd);
        out.push(save_component(
            &VcpuComponent {
                index: i as u32,
                fd: &fd,
                caps: parts.caps,
            },
            i as u32,
        )?);
    }
    let breakdown = SaveBreakdown {
        vm_and_devices: t1 - t0,
        vcpus: t1.elapsed(),
    };
    Ok((out, breakdown))
}

/// Every component state decoded and checked against the machine.
struct Decoded {
    machine: MachineState,
    clock: ClockState,
    irqchip: IrqchipState,
    pit: kvm_bindings::kvm_pit_state2,
    serial: SerialDeviceState,
    control: GuestControlState,
    i8042: I8042State,
    boot: BootKind,
    cpus: Vec<VcpuState>,
}

fn put<T>(slot: &mut Option<T>, c: &ComponentState, value: T) -> Result<()> {
    if c.instance != 0 {
        return Err(Error::component(
            &c.id,
            c.instance,
            "this machine has only instance 0",
        ));
    }
    if slot.is_some() {
        return Err(Error::component(&c.id, c.instance, "duplicate component"));
    }
    *slot = Some(value);
    Ok(())
}

fn missing(id: &str, instance: u32) -> Error {
    Error::component(id, instance, "missing from the saved state")
}

fn decode_all(states: &[ComponentState], vcpus: usize) -> Result<Decoded> {
    let mut machine = None;
    let mut clock = None;
    let mut irqchip = None;
    let mut pit = None;
    let mut serial = None;
    let mut control = None;
    let mut i8042 = None;
    let mut boot = None;
    let mut cpus: Vec<Option<VcpuState>> = vec![None; vcpus];
    for c in states {
        match c.id.as_str() {
            MachineComponent::ID => put(&mut machine, c, decode_component::<MachineComponent>(c)?)?,
            KvmClock::ID => put(&mut clock, c, decode_component::<KvmClock>(c)?)?,
            Irqchip::ID => put(&mut irqchip, c, decode_component::<Irqchip>(c)?)?,
            Pit::ID => put(&mut pit, c, decode_component::<Pit>(c)?)?,
            SerialComponent::ID => put(&mut serial, c, decode_component::<SerialComponent>(c)?)?,
            ControlComponent::ID => {
                let s = decode_component::<ControlComponent>(c)?;
                s.check()
                    .map_err(|reason| Error::component(&c.id, c.instance, reason))?;
                put(&mut control, c, s)?
            }
            I8042Component::ID => put(&mut i8042, c, decode_component::<I8042Component>(c)?)?,
            BootComponent::ID => put(&mut boot, c, decode_component::<BootComponent>(c)?)?,
            VcpuComponent::ID => {
                let state = decode_component::<VcpuComponent>(c)?;
                let slot = cpus.get_mut(c.instance as usize).ok_or_else(|| {
                    Error::component(&c.id, c.instance, format!("this machine has {vcpus} vCPUs"))
                })?;
                if slot.is_some() {
                    return Err(Error::component(&c.id, c.instance, "duplicate component"));
                }
                *slot = Some(state);
            }
            other => {
                return Err(Error::component(
                    other,
                    c.instance,
                    "unknown component: this machine has no such device",
                ))
            }
        }
    }
    let cpus = cpus
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.ok_or_else(|| missing(VcpuComponent::ID, i as u32)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Decoded {
        machine: machine.ok_or_else(|| missing(MachineComponent::ID, 0))?,
        clock: clock.ok_or_else(|| missing(KvmClock::ID, 0))?,
        irqchip: irqchip.ok_or_else(|| missing(Irqchip::ID, 0))?,
        pit: pit.ok_or_else(|| missing(Pit::ID, 0))?,
        serial: serial.ok_or_else(|| missing(SerialComponent::ID, 0))?,
        control: control.ok_or_else(|| missing(ControlComponent::ID, 0))?,
        // Optional: a stream from a Tern without the i8042 restores it in its reset state.
        i8042: i8042.unwrap_or_default(),
        // Optional too: a Tern without it only booted the test guest.
        boot: boot.unwrap_or_default(),
        cpus,
    })
}

/// Validates the whole set (ids, instances, versions, payloads, machine shape) and only then
/// restores: machine, PIT, kvmclock, irqchip, serial, guest-control, i8042, boot, then the vCPUs in order.
pub fn restore_all(
    parts: &MachineParts<'_>,
    config: &mut VmConfig,
    states: &[ComponentState],
) -> Result<()> {
    let d = decode_all(states, parts.vcpus.len())?;
    let mut machine = MachineComponent {
        config,
        regions: parts.regions,
    };
    machine.check(&d.machine)?;
    // Nothing has touched KVM or the devices up to here.
    machine.restore(&d.machine)?;
    Pit(parts.vm).restore(&d.pit)?;
    KvmClock(parts.vm).restore(&d.clock)?;
    Irqchip(parts.vm).restore(&d.irqchip)?;
    SerialComponent(&parts.shared.bus.serial).restore(&d.serial)?;
    ControlComponent(&parts.shared.bus.control).restore(&d.control)?;
    I8042Component(&parts.shared.bus.i8042).restore(&d.i8042)?;
    BootComponent(parts.boot).restore(&d.boot)?;
    for (i, (fd, state)) in parts.vcpus.iter().zip(&d.cpus).enumerate() {
        let fd = lock_vcpu(fd);
        VcpuComponent {
            index: i as u32,
            fd: &fd,
            caps: parts.caps,
        }
        .restore(state)?;
    }
    Ok(())
}
