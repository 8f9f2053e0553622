//! Port-I/O devices and the port dispatch of the vCPU exits.

pub mod control;
pub mod i8042;
pub mod log_limit;
pub mod serial;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::abi;
use control::{ControlAction, GuestControl};
use i8042::{I8042Action, I8042};
use serial::SerialDevice;

/// Exit counters (for diagnostics and the `info` commands of the glue).
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub(crate) pio_unhandled_reads: AtomicU64,
    pub(crate) pio_unhandled_writes: AtomicU64,
    pub(crate) mmio: AtomicU64,
    pub(crate) io_exits: AtomicU64,
    pub(crate) kicks: AtomicU64,
}

/// A snapshot of the exit counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStats {
    /// Port reads nobody decodes (answered with all-ones).
    pub pio_unhandled_reads: u64,
    /// Port writes nobody decodes (ignored).
    pub pio_unhandled_writes: u64,
    /// MMIO exits (ignored; reads return all-ones).
    pub mmio: u64,
    /// All port-I/O exits.
    pub io_exits: u64,
    /// `KVM_RUN` calls interrupted by a kick.
    pub kicks: u64,
}

impl ExitCounters {
    /// A snapshot.
    pub fn snapshot(&self) -> ExitStats {
        ExitStats {
            pio_unhandled_reads: self.pio_unhandled_reads.load(Ordering::Relaxed),
            pio_unhandled_writes: self.pio_unhandled_writes.load(Ordering::Relaxed),
            mmio: self.mmio.load(Ordering::Relaxed),
            io_exits: self.io_exits.load(Ordering::Relaxed),
            kicks: self.kicks.load(Ordering::Relaxed),
        }
    }
}

/// The devices on the port bus.
#[derive(Debug)]
pub struct PioBus {
    /// COM1.
    pub serial: SerialDevice,
    /// The guest-control port.
    pub control: GuestControl,
    /// The i8042 (reset only).
    pub i8042: I8042,
    /// Exit counters.
    pub counters: ExitCounters,
}

impl PioBus {
    /// Handles an `in`: fills `data`.
    pub fn pio_in(&self, port: u16, data: &mut [u8]) {
        self.counters.io_exits.fetch_add(1, Ordering::Relaxed);
        if (serial::COM1..serial::COM1 + serial::SPAN).contains(&port) && data.len() == 1 {
            data[0] = self.serial.read((port - serial::COM1) as u8);
        } else if port == i8042::DATA_PORT || port == i8042::COMMAND_PORT {
            data.fill(0);
            data[0] = self.i8042.read(port);
        } else {
            self.counters
                .pio_unhandled_reads
                .fetch_add(1, Ordering::Relaxed);
            data.fill(0xff);
        }
    }

    /// Handles an `out` from vCPU `vcpu`.
    pub fn pio_out(&self, vcpu: u32, port: u16, data: &[u8]) -> ControlAction {
        self.counters.io_exits.fetch_add(1, Ordering::Relaxed);
        if (serial::COM1..serial::COM1 + serial::SPAN).contains(&port) {
            // `rep outsb` arrives as several bytes for the same port.
            for &b in data {
                self.serial.write((port - serial::COM1) as u8, b);
            }
            ControlAction::None
        } else if (abi::CONTROL_PORT..abi::CONTROL_PORT + control::SPAN).contains(&port) {
            self.control.write(vcpu, port - abi::CONTROL_PORT, data)
        } else if port == i8042::DATA_PORT || port == i8042::COMMAND_PORT {
            match data.first().map(|&b| self.i8042.write(port, b)) {
                Some(I8042Action::Reset) => ControlAction::Reset,
                _ => ControlAction::None,
            }
        } else {
            self.counters
                .pio_unhandled_writes
                .fetch_add(1, Ordering::Relaxed);
            ControlAction::None
        }
    }
}
