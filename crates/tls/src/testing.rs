//! Certificates for tests (with `rcgen`): a CA and QEMU's `tls-creds-x509` files for a host.
//! For this crate's tests and, with the `testing` feature, other crates' tests. Panics on
//! failure (test code only).

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use crate::x509::{TlsEndpoint, X509Creds};

/// A CA and, in `dir`, the tls-creds-x509 files for a host named `host`.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

pub fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { params, key, pem }
}

pub fn write_creds(ca: &Ca, dir: &Path, host: &str, client_cert: bool) {
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    std::fs::write(dir.join("ca-cert.pem"), &ca.pem).unwrap();
    let mut roles = vec!["server"];
    if client_cert {
        roles.push("client");
    }
    for role in roles {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![host.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, host);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Tern");
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{role}-cert.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{role}-key.pem")), key.serialize_pem()).unwrap();
    }
}

/// Replaces the server certificate in `dir` by one for `host` that expired in 2001.
pub fn write_expired_server(ca: &Ca, dir: &Path, host: &str) {
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![host.to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(2001, 1, 1);
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("server-cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).unwrap();
}

pub fn creds(dir: &Path, endpoint: TlsEndpoint, verify_peer: bool) -> X509Creds {
    X509Creds {
        dir: dir.to_path_buf(),
        endpoint,
        verify_peer,
    }
}
