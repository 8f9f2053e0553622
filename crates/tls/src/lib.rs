//! TLS for Tern's connections, shared by the migration engine (the migration stream, its
//! return path) and the management layer (the daemons' remote API, `tern+tls://`):
//!
//! * [`x509`]: rustls configurations from QEMU's `tls-creds-x509` directory layout
//!   (`ca-cert.pem`, `server-cert.pem`/`server-key.pem`, `client-cert.pem`/`client-key.pem`),
//!   TLS 1.3, mutual authentication by default, errors in words a person can act on;
//! * [`session`]: a rustls session split into a reader and a writer half that never hold the
//!   session lock across a socket call (both directions at once);
//! * [`authz`]: QEMU's `authz-simple` / `authz-list` identity rules.
//!
//! No dependency on the engine or on the management layer (decision 43).

pub mod authz;
pub mod session;
pub mod x509;
