//! Why an incoming migration failed ([`DestError`]); split out of `dest.rs`.

use crate::digest::DigestError;
use crate::liveness::Inactivity;
use crate::machine::MachineError;
use crate::transport::tls_config::TlsError;
use crate::transport::TransportError;
use crate::wire::WireError;

/// Why an incoming migration failed.
#[derive(Debug, thiserror::Error)]
pub enum DestError {
    /// `migrate_cancel` on the destination.
    #[error("incoming migration cancelled")]
    Cancelled,
    /// Accepting the connection failed.
    #[error("cannot accept the migration channel")]
    Transport(#[from] TransportError),
    /// The TLS handshake or the admission of the source failed (the text says why).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The stream is invalid, truncated, or does not match this machine.
    #[error("invalid migration stream")]
    Wire(#[source] WireError),
    /// Nothing arrived from the source for `x-tern-liveness-timeout` (or the kernel timed the
    /// connection out).
    #[error("{}", .0.describe("source"))]
    Inactive(Inactivity),
    /// A machine operation failed.
    #[error("{op}")]
    Machine {
        /// What the receiver asked.
        op: String,
        /// Cause.
        #[source]
        source: MachineError,
    },
    /// A device loader failed.
    #[error("device '{id}' instance {instance}: {op}")]
    Loader {
        /// Device id.
        id: String,
        /// Instance.
        instance: u32,
        /// What the receiver asked.
        op: &'static str,
        /// Cause.
        #[source]
        source: MachineError,
    },
    /// The stream is well-formed but breaks the protocol (a chunk for an unknown device, …).
    #[error("{0}")]
    Protocol(String),
    /// `x-tern-ram-digest`: the digest was refused, missing, or the memories differ.
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// Post-copy failed after `POSTCOPY_RUN`: the guest was started here and some of its
    /// pages never came; the vCPUs that touch them stay blocked (decision 74).
    #[error(
        "post-copy failed after the guest started on this destination: {pages} pages never \
         received (the vCPUs that touch them stay blocked; the guest cannot run on)"
    )]
    PostcopyLost {
        /// Pages never received.
        pages: u64,
        /// What ended it (the source lost, a bad page, ...).
        #[source]
        source: Box<DestError>,
    },
    /// The post-copy preempt channel failed (stream format §13.8).
    #[error("post-copy preempt channel")]
    Preempt(#[source] Box<DestError>),
    /// A post-copy recovery channel failed before `POSTCOPY_RESUME` (broken, refused): this
    /// side stays `postcopy-paused` and can recover again.
    #[error("the recovery channel failed during its handshake (before POSTCOPY_RESUME)")]
    RecoveryHandshake(#[source] Box<DestError>),
    /// The `mig-dst` thread could not be started.
    #[error("cannot start thread mig-dst")]
    Spawn(#[source] std::io::Error),
    /// The receiver thread panicked.
    #[error("the incoming migration thread panicked")]
    Panicked,
}

impl From<WireError> for DestError {
    fn from(e: WireError) -> Self {
        match (Inactivity::find(&e), &e) {
            (Some(i), _) => Self::Inactive(i),
            // A TLS record header (handshake, TLS 1.x) where the magic should be.
            (None, WireError::BadMagic { found }) if found[..2] == [0x16, 0x03] => {
                Self::Tls(TlsError::Session(
                    "the source started a TLS handshake, but this destination has no \
                     tls-creds: set TLS on both sides or on neither"
                        .into(),
                ))
            }
            (None, _) => Self::Wire(e),
        }
    }
}
