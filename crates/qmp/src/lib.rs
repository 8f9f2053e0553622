//! tern-qmp
