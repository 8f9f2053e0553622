//! Tern's management API, modelled on libvirt's public API: domains, their states and
//! reasons, job statistics, events, migration options, the hypervisor-driver trait that the
//! `virt-driver-*` crates implement, and the RPC protocol (length-prefixed JSON) with its client
//! (libvirt's remote driver). See `docs/management.md`.

mod driver;
mod error;
mod job;
pub mod migrate;
pub mod protocol;
mod remote;
mod types;
pub mod uri;

pub use driver::{HypervisorDriver, LaunchCommand, LaunchMode, VmmPaths};
pub use error::{Error, Result};
pub use job::{pretty_bytes, JobInfo, JobSample, JobType};
pub use migrate::{MigrateOptions, MigrationCookie, TUNNEL_URI};
pub use remote::{Connection, EventStream, RawStream, ShutdownHandle};
pub use types::{DomainEvent, DomainInfo, DomainState, DomainSummary, LifecycleEvent};
pub use virt_conf as conf;
