/// Errors of the utilities, with the path or command at fault.
#[derive(Debug, thiserror::Error)]
pub enum UtilError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP {command}: {message}")]
    Qmp { command: String, message: String },
    #[error("the VMM's monitor connection is closed")]
    MonitorClosed,
    #[error("{0}")]
    Vmm(String),
}

impl UtilError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        UtilError::Io {
            what: what.into(),
            source,
        }
    }
}
