//! The hypervisor-driver trait: what differs between VMMs. Drivers depend only on this crate,
//! `virt-util` and `virt-conf` (libvirt's rule; checked by `crates/ternd/tests/layering.rs`).
//! Everything QMP-shaped is shared (`virt-util`), since both VMMs speak QEMU's QMP.

use std::path::PathBuf;

use virt_conf::{DomainDef, DriverKind};

use crate::Result;

/// Where one VMM's runtime files live (under the daemon's run directory).
#[derive(Debug, Clone)]
pub struct VmmPaths {
    /// The domain's runtime directory.
    pub dir: PathBuf,
    /// The control QMP socket.
    pub qmp: PathBuf,
    /// The events QMP socket (may equal `qmp` when the VMM serves several clients on one).
    pub qmp_events: PathBuf,
    /// The VMM's stdout/stderr.
    pub log: PathBuf,
}

/// How a VMM is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchMode {
    /// Boot and run.
    Run,
    /// Boot with the vCPUs stopped (`-S`).
    Paused,
    /// Wait for an incoming migration (`-S --incoming defer`, then QMP `migrate-incoming`).
    Incoming,
}

/// A VMM command line.
#[derive(Debug, Clone)]
pub struct LaunchCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// One hypervisor driver.
pub trait HypervisorDriver: Send + Sync {
    /// Which definitions this driver runs.
    fn kind(&self) -> DriverKind;

    /// Whether this host can run `def` with this driver (emulator present, options supported).
    fn check(&self, def: &DomainDef) -> Result<()>;

    /// The VMM's command line for `def`.
    fn launch(&self, def: &DomainDef, paths: &VmmPaths, mode: LaunchMode) -> Result<LaunchCommand>;

    /// The VMM binary this driver uses for `def`.
    fn emulator(&self, def: &DomainDef) -> PathBuf;

    /// Whether the VMM accepts several QMP clients on one socket (Tern) or needs a second
    /// `-qmp` for the event connection (QEMU).
    fn shares_qmp_socket(&self) -> bool;

    /// Whether the VMM's own migration protocol makes the destination the decider after the
    /// stream when the return path is on (Tern: the destination runs and says RESUMED, the
    /// source refuses `cont` then and reports `x-tern-unconfirmed` without an answer), so
    /// that the destination may start by itself instead of waiting for Finish's `cont`.
    fn destination_decides(&self) -> bool;
}
