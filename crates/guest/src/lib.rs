//! tern-guest
