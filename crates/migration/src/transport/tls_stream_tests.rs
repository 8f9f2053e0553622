//! Handshakes and admission over a socket pair: what each side reports, in words.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;

use super::*;
use crate::transport::tls_config::TlsEndpoint;
use tern_tls::testing::{ca, creds, write_creds, write_expired_server};

const T: Option<Duration> = Some(Duration::from_secs(20));

fn server_tls(dir: &Path, verify: bool, authz: Option<Authz>) -> ServerTls {
    let cfg = creds(dir, TlsEndpoint::Server, verify)
        .server_config()
        .unwrap();
    ServerTls::new(cfg, "tls0", authz.map(|a| ("auth0".to_owned(), a)))
}

fn client_tls(dir: &Path, host: Option<&str>) -> ClientTls {
    let cfg = creds(dir, TlsEndpoint::Client, true)
        .client_config_checking(host.is_some())
        .unwrap();
    ClientTls::new(cfg, host).unwrap()
}

/// Runs the destination side on a thread: handshake, then reads "ping", answers "pong".
fn serve(sock: UnixStream, tls: ServerTls) -> JoinHandle<Result<Option<String>, String>> {
    std::thread::Builder::new()
        .name("tls-test-dst".into())
        .spawn(move || {
            let mut s = server(Stream::Unix(sock), &tls, T).map_err(|f| f.error.to_string())?;
            let peer = match &s {
                Stream::Tls(t) => t.peer().map(str::to_owned),
                _ => None,
            };
            let mut buf = [0u8; 4];
            s.read_exact(&mut buf).map_err(|e| e.to_string())?;
            s.write_all(b"pong").map_err(|e| e.to_string())?;
            Ok(peer)
        })
        .unwrap()
}

fn ping(s: &mut Stream) {
    s.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
}

#[test]
fn admitted_source_talks_both_ways_and_its_dn_is_known() {
    let dir = tempfile::tempdir().unwrap();
    write_creds(&ca("CA"), dir.path(), "localhost", true);
    let (a, b) = UnixStream::pair().unwrap();
    let t = serve(b, server_tls(dir.path(), true, None));
    let mut s = client(
        Stream::Unix(a),
        &client_tls(dir.path(), Some("localhost")),
        T,
    )
    .unwrap();
    ping(&mut s);
    let peer = t.join().unwrap().unwrap().unwrap();
    assert!(
        peer.contains("CN=localhost") && peer.contains("O=Tern"),
        "{peer}"
    );
}

#[test]
fn authz_refusal_names_the_dn_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    write_creds(&ca("CA"), dir.path(), "localhost", true);
    let (a, b) = UnixStream::pair().unwrap();
    let authz = Authz::Simple {
        identity: "CN=someone-else".into(),
    };
    let t = serve(b, server_tls(dir.path(), true, Some(authz)));
    let e = client(
        Stream::Unix(a),
        &client_tls(dir.path(), Some("localhost")),
        T,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("the destination refused this source"), "{e}");
    assert!(e.contains("CN=localhost") && e.contains("'auth0'"), "{e}");
    let d = t.join().unwrap().unwrap_err();
    assert!(d.contains("is not authorized by 'auth0'"), "{d}");
}

#[test]
fn authz_without_a_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_creds(&ca("CA"), dir.path(), "localhost", false);
    let (a, b) = UnixStream::pair().unwrap();
    let authz = Authz::List {
        policy: crate::transport::authz::AuthzPolicy::Allow,
        rules: vec![],
    };
    let t = serve(b, server_tls(dir.path(), false, Some(authz)));
    let e = client(
        Stream::Unix(a),
        &client_tls(dir.path(), Some("localhost")),
        T,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("presented no certificate"), "{e}");
    assert!(t
        .join()
        .unwrap()
        .unwrap_err()
        .contains("verify-peer is off"));
}

#[test]
fn plain_source_is_recognised_and_handed_back() {
    let dir = tempfile::tempdir().unwrap();
    write_creds(&ca("CA"), dir.path(), "localhost", true);
    let (mut a, b) = UnixStream::pair().unwrap();
    a.write_all(b"TERNMIG\0 and the rest of a plain stream")
        .unwrap();
    let f = server(Stream::Unix(b), &server_tls(dir.path(), true, None), T).unwrap_err();
    assert!(f.plain_peer.is_some());
    let e = f.error.to_string();
    assert!(
        e.contains("did not start a TLS handshake") && e.contains("'tls0'"),
        "{e}"
    );
}

#[test]
fn plain_destination_is_recognised_and_quoted() {
    let dir = tempfile::tempdir().unwrap();
    write_creds(&ca("CA"), dir.path(), "localhost", true);
    let (a, mut b) = UnixStream::pair().unwrap();
    let t = std::thread::Builder::new()
        .name("tls-test-plain".into())
        .spawn(move || {
            let mut buf = [0u8; 16];
            b.read_exact(&mut buf).unwrap();
            // A return-path ERROR (type 4) with its text, as a plain destination sends it.
            let text = b"bad magic";
            let mut msg = vec![4, 0, text.len() as u8, 0];
            msg.extend_from_slice(text);
            b.write_all(&msg).unwrap();
        })
        .unwrap();
    let e = client(
        Stream::Unix(a),
        &client_tls(dir.path(), Some("localhost")),
        T,
    )
    .unwrap_err()
    .to_string();
    t.join().unwrap();
    assert!(e.contains("answered without TLS"), "{e}");
    assert!(e.contains("it said: bad magic"), "{e}");
}

#[test]
fn without_a_host_name_the_chain_is_still_checked() {
    let (good, rogue) = (ca("good CA"), ca("rogue CA"));
    let (sd, cd) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_creds(&good, sd.path(), "elsewhere.example.com", true);
    // No name to check: a certificate for another name passes.
    let (a, b) = UnixStream::pair().unwrap();
    let t = serve(b, server_tls(sd.path(), true, None));
    let mut s = client(Stream::Unix(a), &client_tls(sd.path(), None), T).unwrap();
    ping(&mut s);
    t.join().unwrap().unwrap();
    // With the name given, it does not.
    let (a, b) = UnixStream::pair().unwrap();
    let _t = serve(b, server_tls(sd.path(), true, None));
    let e = client(
        Stream::Unix(a),
        &client_tls(sd.path(), Some("localhost")),
        T,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not valid for host name 'localhost'"), "{e}");
    // A source trusting another CA refuses the destination, name or no name.
    write_creds(&rogue, cd.path(), "localhost", true);
    let (a, b) = UnixStream::pair().unwrap();
    let _t = serve(b, server_tls(sd.path(), true, None));
    let e = client(Stream::Unix(a), &client_tls(cd.path(), None), T)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown CA"), "{e}");
}

#[test]
fn expired_destination_certificate_is_named() {
    let ca = ca("CA");
    let dir = tempfile::tempdir().unwrap();
    write_creds(&ca, dir.path(), "localhost", true);
    write_expired_server(&ca, dir.path(), "localhost");
    let (a, b) = UnixStream::pair().unwrap();
    let _t = serve(b, server_tls(dir.path(), true, None));
    let e = client(
        Stream::Unix(a),
        &client_tls(dir.path(), Some("localhost")),
        T,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("expired"), "{e}");
}

#[test]
fn host_name_mismatch_is_a_refusal_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    write_creds(&ca("CA"), dir.path(), "localhost", true);
    let (a, b) = UnixStream::pair().unwrap();
    let t = serve(b, server_tls(dir.path(), true, None));
    let e = client(
        Stream::Unix(a),
        &client_tls(dir.path(), Some("other.example.com")),
        T,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("not valid for host name 'other.example.com'"),
        "{e}"
    );
    // The source's alert, or (when it is lost) its close: both say it refused the certificate.
    let d = t.join().unwrap().unwrap_err();
    assert!(d.contains("refused"), "{d}");
}
