//! Connection URIs: `tern:///system`, `tern+unix:///system?socket=PATH`,
//! `tern+tcp://HOST[:PORT]/system`, `tern+tls://HOST[:PORT]/system` (refused until TLS lands).

use std::path::PathBuf;

use crate::protocol::DEFAULT_TCP_PORT;
use crate::{Error, Result};

/// The default local socket of `ternd` (`--run-dir` default + `ternd.sock`).
pub const DEFAULT_SOCKET: &str = "/run/tern/ternd.sock";

/// Where a URI points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
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
    if let Some(q) = query {
        for kv in q.split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("socket", v)) if !v.is_empty() => socket = Some(PathBuf::from(v)),
                _ => return Err(bad(&format!("unsupported parameter '{kv}'"))),
            }
        }
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
            let (host, port) = split_host_port(authority).ok_or_else(|| bad("bad port"))?;
            Ok(Target::Tcp { host, port })
        }
        "tern+tls" => Err(Error::Unsupported(format!(
            "{uri}: TLS between daemons (issue 10) is not available yet; use tern+tcp (insecure) on a trusted network"
        ))),
        other => Err(bad(&format!(
            "unknown scheme '{other}' (expected tern, tern+unix, tern+tcp or tern+tls)"
        ))),
    }
}

fn split_host_port(a: &str) -> Option<(String, u16)> {
    if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => DEFAULT_TCP_PORT,
            None => return None,
        };
        return Some((h.to_string(), port));
    }
    match a.rsplit_once(':') {
        Some((h, p)) => Some((h.to_string(), p.parse().ok()?)),
        None => Some((a.to_string(), DEFAULT_TCP_PORT)),
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
        assert!(matches!(
            parse("tern+tls://h/system"),
            Err(Error::Unsupported(_))
        ));
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
