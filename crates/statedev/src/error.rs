//! The crate's error type.

use tern_migration::machine::MachineError;

/// Everything that can go wrong with a state device.
#[derive(Debug, thiserror::Error)]
pub enum StateDevError {
    /// A `--device statedev,...` option is invalid.
    #[error("statedev option '{key}': {reason}")]
    Config {
        /// The option ("size", "setup-ms", …).
        key: String,
        /// Why it is rejected.
        reason: String,
    },
    /// The incoming stream is malformed or breaks the chunk protocol.
    #[error("statedev stream: {0}")]
    Stream(String),
    /// The incoming stream describes a different device.
    #[error("statedev stream: {field} is {stream} in the stream but {local} on this device")]
    Mismatch {
        /// Field name ("size").
        field: &'static str,
        /// The stream's value.
        stream: String,
        /// This device's value.
        local: String,
    },
    /// The state loaded on the destination is not the source's state at the switchover.
    #[error(
        "statedev digest mismatch: the source's state at the switchover has digest {source_digest:#018x}, \
         the loaded state {loaded:#018x}"
    )]
    DigestMismatch {
        /// The digest the source sent.
        source_digest: u64,
        /// The digest of what was loaded.
        loaded: u64,
    },
    /// The device preparation on the destination failed or cannot finish.
    #[error("statedev preparation: {0}")]
    Preparation(String),
    /// The device has no state (an incoming device that was never loaded).
    #[error("statedev has no state (incoming device not loaded)")]
    NoState,
    /// A thread could not be started.
    #[error("cannot start thread {name}")]
    Spawn {
        /// Thread name.
        name: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl From<StateDevError> for MachineError {
    fn from(e: StateDevError) -> Self {
        match e {
            StateDevError::Spawn { name, source } => MachineError::Io {
                op: format!("spawning {name}"),
                source,
            },
            e @ (StateDevError::Stream(_)
            | StateDevError::Mismatch { .. }
            | StateDevError::DigestMismatch { .. }) => {
                MachineError::rejected(crate::DEVICE_ID, e.to_string())
            }
            e => MachineError::Failed(e.to_string()),
        }
    }
}
