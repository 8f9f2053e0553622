//! Connection URIs: `tern:///system`, `tern+unix:///system?socket=PATH`,
//! `tern+tcp://HOST[:PORT]/system` (insecure), `tern+tls://HOST[:PORT]/system[?pkipath=DIR]`
//! (mutual TLS; the client's certificates in DIR, default [`DEFAULT_PKI_DIR`], in QEMU's
//! `tls-creds-x509` layout: `ca-cert.pem`, `client-cert.pem`, `client-key.pem`).

use std::path::PathBuf;

use crate::protocol::{DEFAULT_TCP_PORT, DEFAULT_TLS_PORT};
use crate::{Error, Result};

/// The default local socket of `ternd` (`--run-dir` default + `ternd.sock`).
pub const DEFAULT_SOCKET: &str = "/run/tern/ternd.sock";

/// Where a `tern+tls` client finds its certificates without `?pkipath=` (libvirt's
/// `/etc/pki/libvirt`, in QEMU's file names).
pub const DEFAULT_PKI_DIR: &str = "/etc/pki/tern";

/// Where a URI points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    Tcp {
        host: String,
        port: u16,
    },
    /// TLS over TCP; `pki`: the client's certificate directory.
    Tls {
        host: String,
        port: u16,
        pki: PathBuf,
    },
}

/// Parses a connection URI.
pub fn parse(uri: &str) -> Result<Target> {
    let bad = |why: &str| Error::InvalidArg(format!("invalid connection URI '{uri}': {why}"));
    let (scheme, rest) = uri
        .split_once("://")
        .ok_or_else(|| bad("expected SCHEME://[HOST]/system"))?;
    let (authority, path_query) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (path, query) = match path_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_query, None),
    };
    if path != "/system" {
        return Err(bad("the path must be /system"));
    }
    let mut socket = None;
    let mut pki = None;
    if let Some(q) = query {
        for kv in q.split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("socket", v)) if !v.is_empty() => socket = Some(PathBuf::from(v)),
                Some(("pkipath", v)) if !v.is_empty() => pki = Some(PathBuf::from(v)),
                _ => return Err(bad(&format!("unsupported parameter '{kv}'"))),
            }
        }
    }
    if pki.is_some() && scheme != "tern+tls" {
        return Err(bad("'pkipath' is only for tern+tls URIs"));
    }
    match scheme {
        "tern" | "tern+unix" => {
            if !authority.is_empty() {
                return Err(bad(
                    "a local URI has no host (use tern+tcp://HOST/system for a remote daemon)",
                ));
            }
            Ok(Target::Unix(
                socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            ))
        }
        "tern+tcp" => {
            if socket.is_some() {
                return Err(bad("'socket' is only for local URIs"));
            }
            if authority.is_empty() {
                return Err(bad("tern+tcp needs a host"));
            }
            let (host, port) =
                split_host_port(authority, DEFAULT_TCP_PORT).ok_or_else(|| bad("bad port"))?;
            Ok(Target::Tcp { host, port })
        }
        "tern+tls" => {
            if socket.is_some() {
                return Err(bad("'socket' is only for local URIs"));
            }
            if authority.is_empty() {
                return Err(bad("tern+tls needs a host"));
            }
            let (host, port) =
                split_host_port(authority, DEFAULT_TLS_PORT).ok_or_else(|| bad("bad port"))?;
            Ok(Target::Tls {
                host,
                port,
                pki: pki.unwrap_or_else(|| PathBuf::from(DEFAULT_PKI_DIR)),
            })
        }
        other => Err(bad(&format!(
            "unknown scheme '{other}' (expected tern, tern+unix, tern+tcp or tern+tls)"
        ))),
    }
}

fn split_host_port(a: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((h.to_string(), port));
    }
    match a.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((a.to_string(), default_port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            parse("tern:///system").expect("local"),
            Target::Unix(DEFAULT_SOCKET.into())
        );
        assert_eq!(
            parse("tern+unix:///system?socket=/tmp/a.sock").expect("unix"),
            Target::Unix("/tmp/a.sock".into())
        );
        assert_eq!(
            parse("tern+tcp://10.0.0.2/system").expect("tcp"),
            Target::Tcp {
                host: "10.0.0.2".into(),
                port: DEFAULT_TCP_PORT
            }
        );
        assert_eq!(
            parse("tern+tcp://h:1234/system").expect("port"),
            Target::Tcp {
                host: "h".into(),
                port: 1234
            }
        );
        assert_eq!(
            parse("tern+tls://h/system").expect("tls"),
            Target::Tls {
                host: "h".into(),
                port: DEFAULT_TLS_PORT,
                pki: DEFAULT_PKI_DIR.into()
            }
        );
        assert_eq!(
            parse("tern+tls://h:7/system?pkipath=/p").expect("tls pkipath"),
            Target::Tls {
                host: "h".into(),
                port: 7,
                pki: "/p".into()
            }
        );
        assert!(parse("tern+tcp://h/system?pkipath=/p").is_err());
        for bad in [
            "qemu:///system",
            "tern://h/system",
            "tern:///session",
            "tern+tcp:///system",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
