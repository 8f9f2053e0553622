//! Utilities shared by `ternd` and the hypervisor drivers (libvirt's `util/`): nothing here
//! knows about domains or drivers.

pub mod cpu;
pub mod dirs;
mod error;
pub mod monitor;
pub mod process;

pub use error::UtilError;
pub use monitor::{Monitor, MonitorEvents};
