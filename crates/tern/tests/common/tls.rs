//! TLS credentials made with rcgen for the tests that migrate over TLS (moved here from
//! `tls.rs` so `multifd_postcopy.rs` makes them the same way): a certificate authority,
//! certificates it signs, and `tls-creds-x509` directories for a destination (server) and a
//! source (client).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use serde_json::{json, Value};

/// A certificate authority.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

pub fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).expect("CA cert").pem();
    Ca { params, key, pem }
}

/// Writes `ROLE-cert.pem` + `ROLE-key.pem` for `cn` (subject `CN=cn,O=Tern`, the names `sans`),
/// signed by `signer`.
pub fn issue(signer: &Ca, dir: &Path, role: &str, cn: &str, sans: &[&str]) {
    let issuer = Issuer::from_params(&signer.params, &signer.key);
    let key = KeyPair::generate().expect("key");
    let names: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("params");
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Tern");
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params.signed_by(&key, &issuer).expect("signing");
    std::fs::write(dir.join(format!("{role}-cert.pem")), cert.pem()).expect("writing cert");
    std::fs::write(dir.join(format!("{role}-key.pem")), key.serialize_pem()).expect("key");
}

/// A `tls-creds-x509` directory trusting `trust`.
pub fn creds_dir(root: &Path, name: &str, trust: &Ca) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).expect("creds dir");
    std::fs::write(d.join("ca-cert.pem"), &trust.pem).expect("ca-cert.pem");
    d
}

/// The destination's credentials: server certificate for `sans`.
pub fn server_dir(root: &Path, name: &str, ca: &Ca, sans: &[&str]) -> PathBuf {
    let d = creds_dir(root, name, ca);
    issue(ca, &d, "server", "dest.example.com", sans);
    d
}

/// The source's credentials: trusting `ca`, with a client certificate for `cn` signed by
/// `signer` (`None`: no client certificate).
pub fn client_dir(root: &Path, name: &str, ca: &Ca, signer: Option<&Ca>, cn: &str) -> PathBuf {
    let d = creds_dir(root, name, ca);
    if let Some(s) = signer {
        issue(s, &d, "client", cn, &[cn]);
    }
    d
}

/// The `object-add` arguments of a `tls-creds-x509` object `id` reading `dir`.
pub fn x509(id: &str, dir: &Path, endpoint: &str) -> Value {
    json!({"qom-type": "tls-creds-x509", "id": id, "dir": dir.to_str().unwrap(),
           "endpoint": endpoint})
}
