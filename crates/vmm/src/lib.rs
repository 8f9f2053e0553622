//! tern-vmm
