//! The split session: both directions at once with full socket buffers, and clean ends.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, Connection, ServerConnection};

use super::*;
use crate::testing::{ca, creds, write_creds};
use crate::x509::TlsEndpoint;

const N: usize = 64 << 20; // far beyond both socket buffers, each way

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn writer(w: &mut dyn Write) -> u64 {
    let block: Vec<u8> = (0..1 << 20).map(pattern).collect();
    for _ in 0..N >> 20 {
        w.write_all(&block).unwrap();
    }
    0
}

fn reader(r: &mut dyn Read) -> u64 {
    let mut buf = vec![0u8; 100_003];
    let (mut total, mut bad) = (0usize, 0u64);
    while total < N {
        let n = r.read(&mut buf).unwrap();
        assert!(n > 0, "early end");
        for (k, b) in buf[..n].iter().enumerate() {
            bad += (*b != pattern((total + k) % (1 << 20))) as u64;
        }
        total += n;
    }
    bad
}

fn pair() -> (TcpStream, TcpStream, tempfile::TempDir) {
    let ca = ca("test CA");
    let dir = tempfile::tempdir().unwrap();
    write_creds(&ca, dir.path(), "localhost", true);
    let server_cfg = creds(dir.path(), TlsEndpoint::Server, true)
        .server_config()
        .unwrap();
    let client_cfg = creds(dir.path(), TlsEndpoint::Client, true)
        .client_config()
        .unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let c = TcpStream::connect(addr).unwrap();
    let (s, _) = l.accept().unwrap();
    for x in [&c, &s] {
        x.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        x.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    // Keep the configs' certificates alive through the dir only; handshake in the callers.
    let _ = (server_cfg, client_cfg);
    (c, s, dir)
}

fn sessions(dir: &std::path::Path) -> (Connection, Connection) {
    let server_cfg = creds(dir, TlsEndpoint::Server, true)
        .server_config()
        .unwrap();
    let client_cfg = creds(dir, TlsEndpoint::Client, true)
        .client_config()
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    (
        Connection::Client(ClientConnection::new(client_cfg, name).unwrap()),
        Connection::Server(ServerConnection::new(server_cfg).unwrap()),
    )
}

#[test]
fn both_directions_at_once_do_not_deadlock() {
    let (mut c, mut s, dir) = pair();
    let (mut cc, mut sc) = sessions(dir.path());
    let server = std::thread::Builder::new()
        .name("tls-test-hs".into())
        .spawn(move || {
            handshake(&mut sc, &mut s).unwrap();
            (sc, s)
        })
        .unwrap();
    handshake(&mut cc, &mut c).unwrap();
    let (sc, s) = server.join().unwrap();
    let mk = |conn: Connection, sock: TcpStream| {
        let r = sock.try_clone().unwrap();
        split(conn, r, sock)
    };
    let (mut cr, mut cw) = mk(cc, c);
    let (mut sr, mut sw) = mk(sc, s);
    let spawn = |name: &str, f: Box<dyn FnOnce() -> u64 + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .unwrap()
    };
    let t1 = spawn("tls-c-w", Box::new(move || writer(&mut cw)));
    let t2 = spawn("tls-s-w", Box::new(move || writer(&mut sw)));
    let t3 = spawn("tls-c-r", Box::new(move || reader(&mut cr)));
    let t4 = spawn("tls-s-r", Box::new(move || reader(&mut sr)));
    for t in [t1, t2] {
        t.join().unwrap();
    }
    assert_eq!(t3.join().unwrap(), 0, "client read corrupted bytes");
    assert_eq!(t4.join().unwrap(), 0, "server read corrupted bytes");
}

#[test]
fn close_notify_is_end_of_stream_and_garbage_is_an_error() {
    let (mut c, mut s, dir) = pair();
    let (mut cc, mut sc) = sessions(dir.path());
    let server = std::thread::Builder::new()
        .name("tls-test-hs".into())
        .spawn(move || {
            handshake(&mut sc, &mut s).unwrap();
            (sc, s)
        })
        .unwrap();
    handshake(&mut cc, &mut c).unwrap();
    let (sc, s) = server.join().unwrap();
    let mut raw = c.try_clone().unwrap();
    let (_cr, mut cw) = split(cc, c.try_clone().unwrap(), c);
    let (mut sr, _sw) = split(sc, s.try_clone().unwrap(), s);
    cw.write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    sr.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");
    // Garbage after the handshake: an error naming TLS, no panic.
    raw.write_all(&[0x17, 0x03, 0x03, 0x00, 0x10]).unwrap();
    raw.write_all(&[0xAA; 16]).unwrap();
    let err = sr.read(&mut buf).unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
}
