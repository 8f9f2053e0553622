//! TLS for Tern's connections, shared by the migration engine (the migration stream, its
//! return path) and the management layer (the daemons' remote API, `tern+tls://`):
//!
//! * [`x509`]: rustls configurations from QEMU's `tls-creds-x509` directory layout
//!   (`ca-cert.pem`, `server-cert.pem`/`server-key.pem`, `client-cert.pem`/`client-key.pem`),
//!   TLS 1.3, mutual authentication by default, errors in words a person can act on;
//! * [`session`]: a rustls session split into a reader and a writer half that never hold the
//!   session lock across a socket call (both directions at once);
//! * [`authz`]: QEMU's `authz-simple` / `authz-list` identity rules;
//! * [`peer_dn`]: a certificate's subject DN in GnuTLS's text form (what `authz` matches);
//! * [`verify`]: chain-only server verification (QEMU's `unix:` without `tls-hostname`).
//!
//! No dependency on the engine or on the management layer (decision 43).

pub mod authz;
pub mod peer_dn;
pub mod session;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod verify;
pub mod x509;
