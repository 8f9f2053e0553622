use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;

use super::*;
use crate::transport::{connect, CancelToken, Listener};
use crate::wire::WireError;

fn ms(n: u64) -> LivenessTimeout {
    LivenessTimeout::from_millis(n)
}

#[test]
fn timeout_values_and_keepalive_period() {
    assert_eq!(LivenessTimeout::default().millis(), 10_000);
    assert_eq!(LivenessTimeout::from_millis(0), LivenessTimeout::OFF);
    assert_eq!(LivenessTimeout::OFF.limit(), None);
    assert_eq!(ms(1500).limit(), Some(Duration::from_millis(1500)));
    // A third of the limit, at most a second, also when off (for the peer's sake).
    assert_eq!(ms(1500).keepalive_period(), Duration::from_millis(500));
    assert_eq!(ms(10_000).keepalive_period(), MAX_KEEPALIVE_PERIOD);
    assert_eq!(
        LivenessTimeout::OFF.keepalive_period(),
        MAX_KEEPALIVE_PERIOD
    );
    assert_eq!(ms(1).keepalive_period(), Duration::from_millis(1));
}

#[test]
fn arm_sets_keepalive_user_timeout_and_socket_timeouts_on_tcp() {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let uri = l.local_uri();
    let t = std::thread::spawn(move || l.accept(&CancelToken::new()).unwrap());
    let s = connect(&uri, &CancelToken::new()).unwrap();
    let _peer = t.join().unwrap();
    arm(&s, ms(20_000), Some(Duration::from_millis(700))).unwrap();
    let Stream::Tcp(tcp) = &s else {
        panic!("not TCP: {s:?}")
    };
    let sock = SockRef::from(tcp);
    assert!(sock.keepalive().unwrap());
    assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(6));
    assert_eq!(
        sock.tcp_keepalive_interval().unwrap(),
        Duration::from_secs(2)
    );
    assert_eq!(sock.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
    assert_eq!(
        sock.tcp_user_timeout().unwrap(),
        Some(Duration::from_secs(20))
    );
    assert_eq!(tcp.write_timeout().unwrap(), Some(Duration::from_secs(20)));
    assert_eq!(
        tcp.read_timeout().unwrap(),
        Some(Duration::from_millis(700))
    );
    // Short limits: the keepalive options' unit is the second, never 0.
    arm(&s, ms(1500), None).unwrap();
    assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(1));
    assert_eq!(
        sock.tcp_keepalive_interval().unwrap(),
        Duration::from_secs(1)
    );
}

#[test]
fn off_leaves_the_socket_alone() {
    let (a, _b) = UnixStream::pair().unwrap();
    let s = Stream::Unix(a);
    arm(&s, LivenessTimeout::OFF, Some(Duration::from_millis(5))).unwrap();
    let Stream::Unix(u) = &s else { unreachable!() };
    assert_eq!(u.read_timeout().unwrap(), None);
    assert_eq!(u.write_timeout().unwrap(), None);
}

#[test]
fn silent_peer_is_a_receive_inactivity() {
    let (a, _peer) = UnixStream::pair().unwrap();
    let mut s = Stream::Unix(a);
    arm(&s, ms(100), None).unwrap();
    let mut b = [0u8; 1];
    let e = s.read(&mut b).expect_err("the peer sends nothing");
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    assert_eq!(Inactivity::of_io(&e), Some(Inactivity::Receive { ms: 100 }));
    // Through the wire layer's error, as the engine sees it.
    let wire = WireError::Io {
        offset: 7,
        what: "a record header",
        source: e,
    };
    assert_eq!(
        Inactivity::find(&wire),
        Some(Inactivity::Receive { ms: 100 })
    );
    assert_eq!(
        Inactivity::Receive { ms: 100 }.describe("source"),
        "no data from the source for 100 ms: the source or the link is gone"
    );
}

#[test]
fn peer_that_stops_reading_is_a_send_inactivity() {
    let (a, _peer) = UnixStream::pair().unwrap();
    let mut s = Stream::Unix(a);
    arm(&s, ms(100), None).unwrap();
    let chunk = vec![0u8; 64 << 10];
    // Fills the socket buffer (a few hundred KiB), then the write blocks and times out.
    let e = loop {
        if let Err(e) = s.write(&chunk) {
            break e;
        }
    };
    assert_eq!(
        Inactivity::of_io(&e),
        Some(Inactivity::Send { ms: 100 }),
        "{e}"
    );
    assert_eq!(
        Inactivity::Send { ms: 100 }.describe("destination"),
        "the destination stopped reading for 100 ms: the destination or the link is gone"
    );
}

#[test]
fn other_errors_are_not_inactivity() {
    let (a, peer) = UnixStream::pair().unwrap();
    let mut s = Stream::Unix(a);
    arm(&s, ms(100), None).unwrap();
    drop(peer);
    let e = s.write(b"x").expect_err("peer closed");
    assert_eq!(Inactivity::of_io(&e), None, "{e}");
    let plain = io::Error::from_raw_os_error(libc::ECONNRESET);
    assert_eq!(Inactivity::find(&plain), None);
    // ETIMEDOUT (TCP_USER_TIMEOUT or keepalive) is one.
    let e = classify(
        &s,
        io::Error::from_raw_os_error(libc::ETIMEDOUT),
        Direction::Send,
    );
    assert_eq!(Inactivity::of_io(&e), Some(Inactivity::Connection));
    assert_eq!(
        Inactivity::Connection.describe("destination"),
        "the connection to the destination timed out (TCP: unacknowledged data or keepalive \
         probes): the destination or the link is gone"
    );
}

#[test]
fn ticker_ticks_until_dropped() {
    let count = Arc::new(AtomicU32::new(0));
    let (tx, rx) = mpsc::channel();
    let c = count.clone();
    let t = Ticker::spawn("test-ticker", Duration::from_millis(5), move || {
        c.fetch_add(1, Ordering::SeqCst);
        let _ = tx.send(());
    })
    .unwrap();
    for _ in 0..3 {
        rx.recv_timeout(Duration::from_secs(30)).expect("a tick");
    }
    // Dropping stops and joins the thread (a ticker that did not stop would hang here).
    drop(t);
    let n = count.load(Ordering::SeqCst);
    assert!(n >= 3);
    // The sender was dropped with the thread: the channel is closed, nothing more comes.
    while rx.try_recv().is_ok() {}
    assert!(matches!(
        rx.try_recv(),
        Err(mpsc::TryRecvError::Disconnected)
    ));
}
