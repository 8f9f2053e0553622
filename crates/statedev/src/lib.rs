//! `statedev`: a test device modelled on a VFIO device with migration support (PRE_COPY with
//! "initial bytes"), for exercising the `switchover-ack` capability (design: `docs/statedev.md`).
//!
//! * [`StateDevice`] owns `size` bytes of device state; a background thread (`statedev-mut`)
//!   rewrites a small part of it while the device runs. [`StateDevice::pause`] /
//!   [`StateDevice::resume`] follow the VM's run state.
//! * [`StateDevHandler`] (source, [`tern_migration::machine::StateHandler`]) sends the initial
//!   data (metadata + the whole state) in pre-copy, then the chunks the device dirtied, then at
//!   the switchover the last dirty chunks and the digest.
//! * [`StateDevLoader`] (destination, [`tern_migration::machine::StateLoader`]) starts the
//!   device preparation (allocation, population, verification and `setup-ms` of "hardware
//!   setup", in the `statedev-prep` thread) when the metadata arrives, and approves the
//!   switchover once the initial data is in and the preparation is done.

mod config;
mod dest;
mod device;
mod error;
mod format;
mod source;
#[cfg(test)]
mod tests;

pub use config::{StateDevConfig, MAX_CHUNK, MAX_SIZE, MIN_SIZE};
pub use dest::StateDevLoader;
pub use device::{digest_bytes, DevStats, StateDevice};
pub use error::StateDevError;
pub use format::{Record, RecordReader, FORMAT_VERSION, GRAIN};
pub use source::{StateDevHandler, FINAL_MAX};

/// Component id of the device in the migration stream.
pub const DEVICE_ID: &str = "statedev";
/// Version of the state layout (the engine's component version).
pub const STATE_VERSION: u32 = 1;
