//! tern-vmm: the machine of Tern — a KVM VM with guest RAM, vCPU threads, pause/resume, a
//! 16550 UART, the guest-control port, dirty logging, and save/restore of every component.
//!
//! See `docs/machine.md` for the design, the pause protocol and measured numbers.

pub mod abi;
pub mod boot;
pub mod caps;
pub mod config;
pub mod cpuid;
pub mod devices;
pub mod error;
pub mod memory;
pub mod postcopy;
pub mod runctl;
pub mod stall;
pub mod state;
pub mod throttle;
pub mod vcpu;
pub mod vm;

pub use config::VmConfig;
pub use cpuid::{CpuIdentity, CpuidLeaf};
pub use devices::control::{GuestEvent, Heartbeat, HeartbeatSummary};
pub use devices::serial::{SerialLine, SerialTarget};
pub use devices::ExitStats;
pub use error::{Error, Result};
pub use memory::{RamBackend, RamRegionInfo, PAGE_SIZE};
pub use stall::MaxStall;
pub use state::{ComponentState, Persist};
pub use throttle::ThrottleStats;
pub use vcpu::VcpuFailure;
pub use vm::{GuestImage, Vm, VmStatus, VmTimings};
