//! Handshakes between the configurations built from rcgen certificates, over a socket pair.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection, StreamOwned};

use super::*;
use crate::testing::{ca, creds, write_creds};

/// Runs one handshake plus a ping/pong; returns (client result, server result).
fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    name: &str,
) -> (Result<(), String>, Result<(), String>) {
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let server_thread = std::thread::Builder::new()
        .name("tls-test-server".into())
        .spawn(move || {
            let conn = ServerConnection::new(server).unwrap();
            let mut s = StreamOwned::new(conn, b);
            let mut buf = [0u8; 4];
            // The server speaks first, as the destination does (its admission byte): the
            // client reads before it ever writes, so a refusal reaches it as the server's
            // alert, never as a write into a socket the server already closed (EPIPE).
            let r = s
                .write_all(b"ping")
                .and_then(|_| s.flush())
                .and_then(|_| s.read_exact(&mut buf))
                .and_then(|_| {
                    if &buf == b"pong" {
                        Ok(())
                    } else {
                        Err(std::io::Error::other("bad payload"))
                    }
                });
            r.map_err(|e| tls_error_text(&e))
        })
        .unwrap();
    let conn =
        ClientConnection::new(client, ServerName::try_from(name.to_string()).unwrap()).unwrap();
    let mut c = StreamOwned::new(conn, a);
    let mut buf = [0u8; 4];
    let client_result = c
        .read_exact(&mut buf)
        .map_err(|e| tls_error_text(&e))
        .and_then(|_| {
            if &buf == b"ping" {
                Ok(())
            } else {
                Err("bad payload".into())
            }
        })
        .and_then(|_| {
            c.write_all(b"pong")
                .and_then(|_| c.flush())
                .map_err(|e| tls_error_text(&e))
        });
    drop(c);
    (client_result, server_thread.join().unwrap())
}

fn tls_error_text(e: &std::io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => describe(tls),
        None => e.to_string(),
    }
}

#[test]
fn mutual_authentication_succeeds() {
    let ca = ca("test CA");
    let dir = tempfile::tempdir().unwrap();
    write_creds(&ca, dir.path(), "localhost", true);
    let server = creds(dir.path(), TlsEndpoint::Server, true)
        .server_config()
        .unwrap();
    let client = creds(dir.path(), TlsEndpoint::Client, true)
        .client_config()
        .unwrap();
    assert_eq!(handshake(client, server, "localhost"), (Ok(()), Ok(())));
}

#[test]
fn hostname_mismatch_is_named() {
    let ca = ca("test CA");
    let dir = tempfile::tempdir().unwrap();
    write_creds(&ca, dir.path(), "localhost", true);
    let server = creds(dir.path(), TlsEndpoint::Server, true)
        .server_config()
        .unwrap();
    let client = creds(dir.path(), TlsEndpoint::Client, true)
        .client_config()
        .unwrap();
    let (c, s) = handshake(client, server, "other.example.com");
    assert!(c
        .unwrap_err()
        .contains("does not match the expected host name"));
    assert!(s.is_err());
}

#[test]
fn unknown_ca_is_named_on_both_sides() {
    let (good, hostile) = (ca("good CA"), ca("hostile CA"));
    let (sd, cd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_creds(&good, sd.path(), "localhost", true);
    write_creds(&hostile, cd.path(), "localhost", true);
    // The hostile client trusts the server's CA but its own certificate is from another CA.
    std::fs::copy(sd.path().join("ca-cert.pem"), cd.path().join("ca-cert.pem")).unwrap();
    let server = creds(sd.path(), TlsEndpoint::Server, true)
        .server_config()
        .unwrap();
    let client = creds(cd.path(), TlsEndpoint::Client, true)
        .client_config()
        .unwrap();
    let (c, s) = handshake(client, server, "localhost");
    assert_eq!(
        s.unwrap_err(),
        "the peer's certificate is signed by an unknown CA"
    );
    let c = c.unwrap_err();
    assert!(c.contains("refused our certificate"), "client saw: {c}");
}

#[test]
fn client_without_certificate_refused_unless_verify_peer_off() {
    let ca = ca("test CA");
    let (sd, cd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_creds(&ca, sd.path(), "localhost", true);
    write_creds(&ca, cd.path(), "localhost", false);
    std::fs::remove_file(cd.path().join("server-cert.pem")).unwrap();
    let client = creds(cd.path(), TlsEndpoint::Client, true)
        .client_config()
        .unwrap();
    let strict = creds(sd.path(), TlsEndpoint::Server, true)
        .server_config()
        .unwrap();
    let (c, s) = handshake(client.clone(), strict, "localhost");
    assert_eq!(s.unwrap_err(), "the peer sent no certificate");
    assert!(c.is_err());
    let lax = creds(sd.path(), TlsEndpoint::Server, false)
        .server_config()
        .unwrap();
    assert_eq!(handshake(client, lax, "localhost"), (Ok(()), Ok(())));
}

#[test]
fn plain_bytes_against_tls_server_fail_fast() {
    let ca = ca("test CA");
    let dir = tempfile::tempdir().unwrap();
    write_creds(&ca, dir.path(), "localhost", true);
    let server = creds(dir.path(), TlsEndpoint::Server, true)
        .server_config()
        .unwrap();
    let (mut a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    a.write_all(b"TERNMIGR\x00\x00\x00\x01 not a client hello")
        .unwrap();
    let mut s = StreamOwned::new(ServerConnection::new(server).unwrap(), b);
    let err = s.read(&mut [0u8; 8]).unwrap_err();
    assert!(
        tls_error_text(&err).contains("does not speak TLS"),
        "{}",
        tls_error_text(&err)
    );
}

#[test]
fn missing_files_and_client_without_verify_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = creds(dir.path(), TlsEndpoint::Server, true)
        .server_config()
        .unwrap_err();
    assert!(err.to_string().contains("server-cert.pem"), "{err}");
    let err = creds(dir.path(), TlsEndpoint::Client, false)
        .client_config()
        .unwrap_err();
    assert!(matches!(err, TlsError::ClientWithoutVerify));
}
