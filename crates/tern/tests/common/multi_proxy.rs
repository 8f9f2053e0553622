//! A TCP forwarder for a destination's main stream and its multifd channels (moved here from
//! `multifd.rs` so the zero-copy tests cut a channel the same way).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A TCP forwarder for every connection to a destination (main stream first, then the
/// channels, in order of arrival); a connection can be cut (both directions) once it has
/// forwarded some bytes. Waiting is on a condition variable, never a sleep.
pub struct MultiProxy {
    pub uri: String,
    shared: Arc<ProxyShared>,
}

#[derive(Default)]
struct ProxyShared {
    /// Per connection: bytes forwarded source → destination, and the two sockets.
    conns: Mutex<Vec<(u64, Vec<TcpStream>)>>,
    cv: Condvar,
}

impl MultiProxy {
    pub fn start(to: &str) -> Self {
        let target = to.strip_prefix("tcp:").expect("tcp: target").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().expect("address").port();
        let shared = Arc::new(ProxyShared::default());
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("mproxy-accept".into())
            .spawn(move || {
                for src in listener.incoming() {
                    let Ok(src) = src else { return };
                    let Ok(dst) = TcpStream::connect(&target) else {
                        return;
                    };
                    let idx = {
                        let mut g = sh.conns.lock().unwrap_or_else(|p| p.into_inner());
                        let socks = [src.try_clone(), dst.try_clone()]
                            .into_iter()
                            .flatten()
                            .collect();
                        g.push((0, socks));
                        g.len() - 1
                    };
                    sh.cv.notify_all();
                    let (s2, d2) = (
                        src.try_clone().expect("clone"),
                        dst.try_clone().expect("clone"),
                    );
                    std::thread::Builder::new()
                        .name(format!("mproxy-back-{idx}"))
                        .spawn(move || pump(d2, s2, None))
                        .expect("spawn");
                    let sh2 = sh.clone();
                    std::thread::Builder::new()
                        .name(format!("mproxy-fwd-{idx}"))
                        .spawn(move || pump(src, dst, Some((sh2, idx))))
                        .expect("spawn");
                }
            })
            .expect("spawn proxy");
        Self {
            uri: format!("tcp:127.0.0.1:{port}"),
            shared,
        }
    }

    /// Waits until connection `idx` forwarded at least `bytes`, then cuts it.
    pub fn cut_after(&self, idx: usize, bytes: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut g = self.shared.conns.lock().unwrap_or_else(|p| p.into_inner());
        while g.get(idx).is_none_or(|c| c.0 < bytes) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "connection {idx} never forwarded {bytes} bytes"
            );
            g = self
                .shared
                .cv
                .wait_timeout(g, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        for s in &g[idx].1 {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, count: Option<(Arc<ProxyShared>, usize)>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some((sh, idx)) = &count {
            if let Some(c) = sh
                .conns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(*idx)
            {
                c.0 += n as u64;
            }
            sh.cv.notify_all();
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
