//! TLS configuration from QEMU's `tls-creds-x509` credentials: a directory holding
//! `ca-cert.pem`, `server-cert.pem` + `server-key.pem` (destination), `client-cert.pem` +
//! `client-key.pem` (source). TLS 1.3 only, rustls with the `ring` provider (decision 40);
//! the destination requires a client certificate signed by the CA unless `verify-peer` is off.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore, ServerConfig};

/// Which end of a connection a credentials object serves (QEMU's `endpoint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsEndpoint {
    /// The destination (accepts).
    Server,
    /// The source (connects).
    Client,
}

impl TlsEndpoint {
    /// Parses QEMU's names (`server`, `client`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "server" => Some(Self::Server),
            "client" => Some(Self::Client),
            _ => None,
        }
    }
}

/// A `tls-creds-x509` object's properties.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct X509Creds {
    /// The directory with the PEM files.
    pub dir: PathBuf,
    /// Which end these credentials serve.
    pub endpoint: TlsEndpoint,
    /// Verify the peer's certificate (QEMU's default: on). Off is accepted only on a server:
    /// it then does not ask the client for a certificate.
    pub verify_peer: bool,
}

/// Errors of TLS configuration and of TLS sessions, each in words a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credentials file cannot be read or holds no usable PEM object.
    #[error("TLS credentials file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// rustls refused the configuration (e.g. a key that does not match its certificate).
    #[error("TLS credentials in {dir}: {reason}")]
    Config {
        /// The credentials directory.
        dir: PathBuf,
        /// rustls' reason.
        reason: String,
    },
    /// A client endpoint with `verify-peer=off` (it would accept any destination).
    #[error("tls-creds-x509 with endpoint=client requires verify-peer=on: a source must authenticate its destination")]
    ClientWithoutVerify,
    /// The handshake or the session failed.
    #[error("TLS: {0}")]
    Session(String),
}

/// The one crypto provider (ring, decision 40). rustls 0.23.48 deprecates ring's
/// `default_provider` because it lacks the post-quantum key exchange (aws-lc-rs has it, but
/// needs cmake and nasm to build); both peers are ours, so classical X25519 is what they agree.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_err = |reason: String| TlsError::File {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err("no CERTIFICATE in it".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

impl X509Creds {
    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let path = self.file("ca-cert.pem");
        let mut roots = RootCertStore::empty();
        for cert in read_certs(&path)? {
            roots.add(cert).map_err(|e| TlsError::File {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(roots)
    }

    fn config_err(&self, e: impl std::fmt::Display) -> TlsError {
        TlsError::Config {
            dir: self.dir.clone(),
            reason: e.to_string(),
        }
    }

    /// The destination's configuration: its certificate, and the CA its clients must chain to
    /// (unless `verify-peer` is off).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let chain = read_certs(&self.file("server-cert.pem"))?;
        let key = read_key(&self.file("server-key.pem"))?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.config_err(e))?;
        let builder = if self.verify_peer {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider())
                    .build()
                    .map_err(|e| self.config_err(e))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| self.config_err(e))?;
        Ok(Arc::new(config))
    }

    /// The source's configuration: the CA the destination must chain to, and the client
    /// certificate when the directory has one (a destination with `verify-peer` needs it).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        self.client_config_checking(true)
    }

    /// [`Self::client_config`]; with `check_hostname` false the destination's certificate must
    /// still chain to the CA, but its names are not compared with anything (QEMU: a `unix:`
    /// migration without `tls-hostname` has no host name to check; decision 45).
    pub fn client_config_checking(
        &self,
        check_hostname: bool,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        if !self.verify_peer {
            return Err(TlsError::ClientWithoutVerify);
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| self.config_err(e))?;
        let builder = if check_hostname {
            builder.with_root_certificates(self.roots()?)
        } else {
            let verifier = crate::verify::ChainOnlyVerifier::new(self.roots()?)
                .map_err(|e| self.config_err(e))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
        };
        let cert = self.file("client-cert.pem");
        let config = if cert.exists() {
            let chain = read_certs(&cert)?;
            let key = read_key(&self.file("client-key.pem"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| self.config_err(e))?
        } else {
            builder.with_no_client_auth()
        };
        Ok(Arc::new(config))
    }
}

/// A rustls error in words a person can act on (named in `error-desc`).
pub fn describe(err: &rustls::Error) -> String {
    use rustls::Error as E;
    match err {
        E::InvalidCertificate(c) => describe_cert(c, "the peer's"),
        E::NoCertificatesPresented => "the peer sent no certificate".into(),
        E::AlertReceived(a) => match a {
            AlertDescription::CertificateExpired => {
                "the peer refused our certificate: expired".into()
            }
            AlertDescription::UnknownCA => {
                "the peer refused our certificate: signed by a CA it does not trust".into()
            }
            AlertDescription::CertificateRequired => {
                "the peer requires a client certificate and none was configured".into()
            }
            AlertDescription::BadCertificate | AlertDescription::CertificateUnknown => {
                "the peer refused our certificate".into()
            }
            AlertDescription::AccessDenied => "the peer did not authorize our identity".into(),
            AlertDescription::DecryptError => {
                "the peer refused our certificate: its signature does not verify against the CA the peer trusts (another CA of the same name?)".into()
            }
            other => format!("the peer aborted the handshake ({other:?})"),
        },
        E::InvalidMessage(_)
        | E::InappropriateHandshakeMessage { .. }
        | E::InappropriateMessage { .. } => {
            format!("the peer does not speak TLS 1.3 ({err})")
        }
        other => other.to_string(),
    }
}

fn describe_cert(c: &CertificateError, whose: &str) -> String {
    use CertificateError as C;
    match c {
        C::Expired | C::ExpiredContext { .. } => format!("{whose} certificate has expired"),
        C::NotValidYet | C::NotValidYetContext { .. } => {
            format!("{whose} certificate is not yet valid")
        }
        C::UnknownIssuer => format!("{whose} certificate is signed by an unknown CA"),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            format!("{whose} certificate does not match the expected host name (tls-hostname)")
        }
        C::BadSignature => format!(
            "{whose} certificate has a bad signature (signed by another CA of the same name?)"
        ),
        C::Revoked => format!("{whose} certificate is revoked"),
        other => format!("{whose} certificate is invalid ({other:?})"),
    }
}

#[cfg(test)]
#[path = "x509_tests.rs"]
mod tests;
