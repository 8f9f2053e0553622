//! URIs, listen/accept, cancel and file transports.

use super::*;

fn parse(s: &str) -> Result<MigrationUri, TransportError> {
    s.parse()
}

#[test]
fn uri_parsing() {
    assert_eq!(
        parse("tcp:127.0.0.1:4444").ok(),
        Some(MigrationUri::Tcp {
            host: "127.0.0.1".into(),
            port: 4444
        })
    );
    assert_eq!(
        parse("tcp:[::1]:0").ok(),
        Some(MigrationUri::Tcp {
            host: "::1".into(),
            port: 0
        })
    );
    assert_eq!(
        parse("unix:/tmp/m.sock").ok(),
        Some(MigrationUri::Unix {
            path: "/tmp/m.sock".into()
        })
    );
    assert_eq!(
        parse("file:/tmp/x,offset=0x1000").ok(),
        Some(MigrationUri::File {
            path: "/tmp/x".into(),
            offset: 4096
        })
    );
    for (bad, needle) in [
        ("tcp:host", "PORT"),
        ("tcp::80", "empty host"),
        ("tcp:h:99999", "0..=65535"),
        ("tcp:[::1:80", "']'"),
        ("unix:", "empty"),
        ("file:", "empty"),
        ("file:/x,foo=1", "unknown file option"),
        ("exec:cat", "not supported"),
        ("gopher:x", "unknown transport"),
        ("nocolon", "expected"),
    ] {
        let e = parse(bad).expect_err(bad).to_string();
        assert!(e.contains(needle), "{bad}: {e}");
        assert!(e.contains(bad), "{bad}: {e}");
    }
    for s in [
        "tcp:127.0.0.1:4444",
        "tcp:[::1]:5",
        "unix:/a/b",
        "file:/f",
        "file:/f,offset=7",
    ] {
        assert_eq!(parse(s).map(|u| u.to_string()).ok().as_deref(), Some(s));
    }
}

#[test]
fn tcp_port_zero_reports_real_port_and_return_path_works() {
    let l = Listener::bind(&parse("tcp:127.0.0.1:0").unwrap()).unwrap();
    let uri = l.local_uri();
    let MigrationUri::Tcp { port, .. } = uri else {
        panic!("{uri}")
    };
    assert_ne!(port, 0);
    assert_eq!(uri.socket_address_json().unwrap()["port"], port.to_string());
    let t = std::thread::spawn(move || l.accept(&CancelToken::new()).unwrap());
    let mut src = connect(&uri, &CancelToken::new()).unwrap();
    let mut dst = t.join().unwrap();
    src.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    dst.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    let mut rp_dst = dst.try_clone_for_return_path().unwrap().unwrap();
    let mut rp_src = src.try_clone_for_return_path().unwrap().unwrap();
    rp_dst.write_all(b"pong").unwrap();
    rp_src.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
}

#[test]
fn cancel_unblocks_accept_and_read() {
    let dir = tempfile::tempdir().unwrap();
    let uri = MigrationUri::Unix {
        path: dir.path().join("s"),
    };
    // accept
    let l = Listener::bind(&uri).unwrap();
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    let t = std::thread::spawn(move || l.accept(&c2));
    // Cancel may land before or after accept blocks: both must end in Cancelled.
    cancel.cancel();
    assert!(matches!(t.join().unwrap(), Err(TransportError::Cancelled)));
    // tcp accept
    let l = Listener::bind(&parse("tcp:127.0.0.1:0").unwrap()).unwrap();
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    let t = std::thread::spawn(move || l.accept(&c2));
    cancel.cancel();
    assert!(matches!(t.join().unwrap(), Err(TransportError::Cancelled)));
    // read on a connected socket
    let l = Listener::bind(&uri).unwrap();
    let t = std::thread::spawn(move || l.accept(&CancelToken::new()));
    let cancel = CancelToken::new();
    let mut s = connect(&uri, &cancel).unwrap();
    let _peer = t.join().unwrap().unwrap();
    let c2 = cancel.clone();
    let r = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        s.read(&mut b)
    });
    c2.cancel();
    // shutdown makes the blocked read return EOF (0) or an error, never hang.
    assert!(matches!(r.join().unwrap(), Ok(0) | Err(_)));
    // connect after cancel fails at once
    assert!(matches!(
        connect(&uri, &cancel),
        Err(TransportError::Cancelled)
    ));
}

#[test]
fn connect_refused_is_a_clear_error() {
    // Bind then drop to get a port nobody listens on.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let uri = parse(&format!("tcp:127.0.0.1:{port}")).unwrap();
    let e = connect(&uri, &CancelToken::new()).unwrap_err().to_string();
    assert!(e.contains("connect to tcp:127.0.0.1:"), "{e}");
}

#[test]
fn file_roundtrip_with_offset() {
    let dir = tempfile::tempdir().unwrap();
    let uri = MigrationUri::File {
        path: dir.path().join("f"),
        offset: 10,
    };
    let mut w = connect(&uri, &CancelToken::new()).unwrap();
    assert!(!w.has_return_path());
    assert!(w.try_clone_for_return_path().unwrap().is_none());
    w.write_all(b"stream").unwrap();
    drop(w);
    let mut r = Listener::bind(&uri)
        .unwrap()
        .accept(&CancelToken::new())
        .unwrap();
    let mut s = String::new();
    r.read_to_string(&mut s).unwrap();
    assert_eq!(s, "stream");
    let missing = MigrationUri::File {
        path: dir.path().join("nope"),
        offset: 0,
    };
    let e = Listener::bind(&missing).unwrap_err().to_string();
    assert!(e.contains("open file:"), "{e}");
}
