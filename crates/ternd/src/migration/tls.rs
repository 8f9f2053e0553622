//! `--tls` (`VIR_MIGRATE_TLS`): the migration stream between the two VMMs runs over TLS with
//! QEMU's `tls-creds-x509` object, as libvirt does it (`docs/management.md` §5b). Each daemon
//! has one certificate directory (`ternd --migrate-tls-dir`, libvirt's
//! `migrate_tls_x509_cert_dir`) in QEMU's layout; the destination's VMM gets a server
//! endpoint object before `migrate-incoming`, the source's a client one before `migrate`.

use std::path::Path;

use serde_json::json;
use virt::{Error, Result};

use crate::domain::Vmm;

/// The id of the credentials object the daemon adds to a VMM for a migration.
pub const CREDS_ID: &str = "tern-migrate-tls0";

/// Which end of the TLS session a VMM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The destination: presents `server-cert.pem`, verifies the source's client certificate.
    Server,
    /// The source: presents `client-cert.pem`, verifies the destination's server certificate.
    Client,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Server => "server",
            Endpoint::Client => "client",
        }
    }

    fn files(self) -> [&'static str; 3] {
        match self {
            Endpoint::Server => ["ca-cert.pem", "server-cert.pem", "server-key.pem"],
            Endpoint::Client => ["ca-cert.pem", "client-cert.pem", "client-key.pem"],
        }
    }
}

/// The daemon's certificate directory for `endpoint`, refused with the missing piece named.
pub fn check_dir<'a>(dir: Option<&'a Path>, endpoint: Endpoint, host: &str) -> Result<&'a Path> {
    let dir = dir.ok_or_else(|| {
        Error::InvalidArg(format!(
            "--tls: the daemon on {host} has no migration certificates (start ternd with --migrate-tls-dir DIR holding {})",
            endpoint.files().join(", ")
        ))
    })?;
    for f in endpoint.files() {
        let p = dir.join(f);
        if !p.is_file() {
            return Err(Error::InvalidArg(format!(
                "--tls: {} (the {} certificate directory of the daemon on {host}) has no {f}",
                dir.display(),
                endpoint.name()
            )));
        }
    }
    Ok(dir)
}

/// Gives `vmm` the credentials object and makes its next migration use TLS. `hostname`
/// (source only): the name the destination's certificate must carry; `None` keeps QEMU's
/// default, the host of the migration URI.
pub fn enable(vmm: &Vmm, dir: &Path, endpoint: Endpoint, hostname: Option<&str>) -> Result<()> {
    // A failed earlier migration may have left the object behind.
    let _ = vmm.qmp("object-del", json!({ "id": CREDS_ID }));
    let refused = |what: &str, e: Error| {
        Error::Unsupported(format!(
            "--tls: the {} VMM refused {what}: {e}",
            match endpoint {
                Endpoint::Server => "destination's",
                Endpoint::Client => "source's",
            }
        ))
    };
    vmm.qmp(
        "object-add",
        json!({
            "qom-type": "tls-creds-x509",
            "id": CREDS_ID,
            "dir": dir.display().to_string(),
            "endpoint": endpoint.name(),
            "verify-peer": true,
        }),
    )
    .map_err(|e| refused("the tls-creds-x509 object", e))?;
    let mut params = json!({ "tls-creds": CREDS_ID });
    if let Some(h) = hostname {
        params["tls-hostname"] = json!(h);
    }
    vmm.qmp("migrate-set-parameters", params)
        .map_err(|e| refused("the tls-creds parameter", e))?;
    Ok(())
}

/// Takes TLS off `vmm` again after a failed migration (the VM stays here and a later
/// migration without `--tls` must not use it). Best effort: the VMM may be gone.
pub fn disable(vmm: &Vmm) {
    let _ = vmm.qmp(
        "migrate-set-parameters",
        json!({ "tls-creds": "", "tls-hostname": "" }),
    );
    let _ = vmm.qmp("object-del", json!({ "id": CREDS_ID }));
}
