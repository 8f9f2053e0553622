//! VM-level KVM state: kvmclock, the in-kernel irqchip (PIC master/slave, IOAPIC), PIT2.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::Persist;
use crate::error::{Error, Result};

/// kvmclock as saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockState {
    /// Guest clock in ns.
    pub clock: u64,
    /// `KVM_CLOCK_*` flags reported by `KVM_GET_CLOCK`.
    pub flags: u32,
    /// Host `CLOCK_REALTIME` at the read, valid with `KVM_CLOCK_REALTIME`.
    pub realtime: u64,
    /// Host TSC at the read, valid with `KVM_CLOCK_HOST_TSC`.
    pub host_tsc: u64,
}

/// The VM's kvmclock.
pub struct KvmClock<'a>(pub &'a VmFd);

impl Persist for KvmClock<'_> {
    const ID: &'static str = "kvmclock";
    const VERSION: u32 = 1;
    type State = ClockState;

    fn save(&self) -> Result<ClockState> {
        let c = self
            .0
            .get_clock()
            .map_err(|e| Error::kvm("kvmclock", "KVM_GET_CLOCK", e))?;
        Ok(ClockState {
            clock: c.clock,
            flags: c.flags,
            realtime: c.realtime,
            host_tsc: c.host_tsc,
        })
    }

    /// Sets the clock keeping only `KVM_CLOCK_REALTIME` in the flags, so KVM advances the guest
    /// clock by the real time that passed since the save.
    fn restore(&mut self, s: &ClockState) -> Result<()> {
        let data = kvm_clock_data {
            clock: s.clock,
            flags: s.flags & KVM_CLOCK_REALTIME,
            realtime: s.realtime,
            ..Default::default()
        };
        self.0
            .set_clock(&data)
            .map_err(|e| Error::kvm("kvmclock", "KVM_SET_CLOCK", e))
    }
}

/// The in-kernel interrupt controllers.
#[derive(Clone, Serialize, Deserialize)]
pub struct IrqchipState {
    /// PIC master.
    pub pic_master: kvm_irqchip,
    /// PIC slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
}

impl std::fmt::Debug for IrqchipState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqchipState").finish_non_exhaustive()
    }
}

/// The VM's in-kernel irqchip.
pub struct Irqchip<'a>(pub &'a VmFd);

impl Irqchip<'_> {
    fn get(&self, chip_id: u32) -> Result<kvm_irqchip> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.0
            .get_irqchip(&mut chip)
            .map_err(|e| Error::kvm(format!("irqchip {chip_id}"), "KVM_GET_IRQCHIP", e))?;
        Ok(chip)
    }

    fn set(&self, chip: &kvm_irqchip, expected: u32) -> Result<()> {
        if chip.chip_id != expected {
            return Err(Error::component(
                "irqchip",
                0,
                format!("chip id {} where {expected} was expected", chip.chip_id),
            ));
        }
        self.0
            .set_irqchip(chip)
            .map_err(|e| Error::kvm(format!("irqchip {expected}"), "KVM_SET_IRQCHIP", e))
    }
}

impl Persist for Irqchip<'_> {
    const ID: &'static str = "irqchip";
    const VERSION: u32 = 1;
    type State = IrqchipState;

    fn save(&self) -> Result<IrqchipState> {
        Ok(IrqchipState {
            pic_master: self.get(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: self.get(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: self.get(KVM_IRQCHIP_IOAPIC)?,
        })
    }

    fn restore(&mut self, s: &IrqchipState) -> Result<()> {
        self.set(&s.pic_master, KVM_IRQCHIP_PIC_MASTER)?;
        self.set(&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE)?;
        self.set(&s.ioapic, KVM_IRQCHIP_IOAPIC)
    }
}

/// The VM's in-kernel PIT (PIT2).
pub struct Pit<'a>(pub &'a VmFd);

impl Persist for Pit<'_> {
    const ID: &'static str = "pit";
    const VERSION: u32 = 1;
    type State = kvm_pit_state2;

    fn save(&self) -> Result<kvm_pit_state2> {
        self.0
            .get_pit2()
            .map_err(|e| Error::kvm("pit", "KVM_GET_PIT2", e))
    }

    fn restore(&mut self, s: &kvm_pit_state2) -> Result<()> {
        self.0
            .set_pit2(s)
            .map_err(|e| Error::kvm("pit", "KVM_SET_PIT2", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_util::round_trip;
    use kvm_bindings::kvm_pit_config;
    use kvm_ioctls::Kvm;

    fn vm(kvm: &Kvm) -> VmFd {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config::default()).unwrap();
        vm
    }

    #[test]
    fn clock_round_trip_is_monotonic() {
        let kvm = Kvm::new().unwrap();
        let (a, b) = (vm(&kvm), vm(&kvm));
        let (first, second) = round_trip(&KvmClock(&a), &mut KvmClock(&b), |s| {
            s.clock = 0;
            s.realtime = 0;
            s.host_tsc = 0;
        });
        assert!(second.clock >= first.clock, "kvmclock went backwards");
    }

    #[test]
    fn irqchip_round_trip() {
        let kvm = Kvm::new().unwrap();
        let (a, b) = (vm(&kvm), vm(&kvm));
        // Give the IOAPIC a distinctive redirection entry.
        let mut chip = Irqchip(&a).get(KVM_IRQCHIP_IOAPIC).unwrap();
        // SAFETY: chip_id IOAPIC selects the `ioapic` member of the union.
        unsafe { chip.chip.ioapic.redirtbl[4].bits = 0x0001_0000_0000_0024 };
        a.set_irqchip(&chip).unwrap();
        let (_, second) = round_trip(&Irqchip(&a), &mut Irqchip(&b), |_| {});
        // SAFETY: chip_id IOAPIC selects the `ioapic` member of the union.
        let bits = unsafe { second.ioapic.chip.ioapic.redirtbl[4].bits };
        assert_eq!(bits, 0x0001_0000_0000_0024);
    }

    #[test]
    fn pit_round_trip() {
        let kvm = Kvm::new().unwrap();
        let (a, b) = (vm(&kvm), vm(&kvm));
        let mut pit = a.get_pit2().unwrap();
        pit.channels[2].count = 0x1234;
        pit.channels[2].mode = 2;
        a.set_pit2(&pit).unwrap();
        // The counters' load time is host time and moves with the restore.
        let (_, second) = round_trip(&Pit(&a), &mut Pit(&b), |s| {
            for c in &mut s.channels {
                c.count_load_time = 0;
            }
        });
        assert_eq!(second.channels[2].count, 0x1234);
    }
}
