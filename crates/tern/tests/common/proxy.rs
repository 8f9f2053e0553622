//! A fault-injecting TCP proxy between a migration source and its destination. It forwards
//! both directions and follows the stream's record framing
//! ([`tern_migration::tap::EndTracker`]), so it can cut the source→destination stream after
//! N bytes or exactly K bytes before its end (the END record), silence or close the return
//! path the moment END has passed, or flip one byte in the middle of the N-th RAM record, or
//! cut or silence the return path (a post-copy recovery's handshake). The test waits on its progress (END seen, cut done)
//! through a condition variable: no polling, no sleeps.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tern_migration::tap::EndTracker;

/// What the proxy does to the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything, both ways.
    None,
    /// Forward the first `n` bytes of the stream, then cut both directions.
    CutAfter(u64),
    /// Forward all but the last `k` bytes of the stream (counted back from the end of END;
    /// bytes are held back only after `SWITCHOVER_START`, so a drain `PING` is never held),
    /// then cut both directions once the source has sent END.
    CutBeforeEnd(u64),
    /// Forward the whole stream; from END on drop what the destination says and close the
    /// source's connection (its return path closes without `RESUMED`).
    CloseReturnPathAtEnd,
    /// Forward the whole stream; from END on drop what the destination says, connections stay
    /// open (the source waits for `RESUMED` until its `x-tern-resume-timeout`).
    StallReturnPathAtEnd,
    /// Forward everything, but flip one bit of the byte in the middle of the body of the
    /// `n`-th RAM record (0 = the first): page data in a batch of normal pages.
    FlipInRamRecord(u64),
    /// Forward the stream; forward the first `n` bytes the destination sends on the return
    /// path, then cut both directions (e.g. in the middle of a recovery's received bitmaps).
    CutReturnPathAfter(u64),
    /// Forward the stream; drop everything the destination sends from its first byte on,
    /// connections stay open (a recovery's source waits for bitmaps that never come).
    MuteReturnPath,
}

/// What the proxy has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The source connected (and the proxy reached the destination).
    pub connected: bool,
    /// Stream bytes the destination was given.
    pub forwarded: u64,
    /// The stream's length, once END was read from the source.
    pub end: Option<u64>,
    /// Both directions were cut.
    pub cut: bool,
    /// [`Fault::FlipInRamRecord`]: the stream offsets of the corrupted record's frame and of
    /// the flipped byte, once it was forwarded.
    pub flipped: Option<(u64, u64)>,
    /// Stream bytes read from the source and held back ([`FaultProxy::hold`]).
    pub held: u64,
}

#[derive(Default)]
struct Shared {
    progress: Mutex<Progress>,
    cv: Condvar,
    /// Both connections, for [`FaultProxy::cut`].
    sockets: Mutex<Vec<TcpStream>>,
    /// [`FaultProxy::hold`]: read the stream on, forward nothing more.
    hold: AtomicBool,
    /// [`FaultProxy::hold_after_next_ping`]: armed (the stream offset forwarded when armed).
    hold_after_ping: Mutex<Option<u64>>,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock().unwrap_or_else(|p| p.into_inner()));
        self.cv.notify_all();
    }
}

/// A proxy for one migration connection.
pub struct FaultProxy {
    uri: String,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (any port); the first connection is forwarded to `to`
    /// (`tcp:HOST:PORT`, the destination's `migrate-incoming` URI) with `fault`.
    pub fn start(to: &str, fault: Fault) -> Self {
        let target = to
            .strip_prefix("tcp:")
            .unwrap_or_else(|| panic!("proxy target {to} is not tcp:"))
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || {
                let Ok((src, _)) = listener.accept() else {
                    return;
                };
                let dst = TcpStream::connect(&target).expect("proxy connects to the destination");
                let _ = src.set_nodelay(true);
                let _ = dst.set_nodelay(true);
                if let (Ok(a), Ok(b)) = (src.try_clone(), dst.try_clone()) {
                    sh.sockets
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend([a, b]);
                }
                sh.update(|p| p.connected = true);
                let mute = Arc::new(AtomicBool::new(fault == Fault::MuteReturnPath));
                let (s2, d2, m2, sh2) = (
                    src.try_clone().expect("clone"),
                    dst.try_clone().expect("clone"),
                    mute.clone(),
                    sh.clone(),
                );
                std::thread::Builder::new()
                    .name("proxy-rp".into())
                    .spawn(move || return_path(d2, s2, &m2, fault, &sh2))
                    .expect("spawn proxy-rp");
                forward(src, dst, fault, &sh, &mute);
            })
            .expect("spawn proxy-accept");
        Self {
            uri: format!("tcp:127.0.0.1:{port}"),
            shared,
        }
    }

    /// Cuts both directions now (a link that breaks: both ends see the connection fail).
    pub fn cut(&self) {
        for s in self
            .shared
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.shared.update(|p| p.cut = true);
    }

    /// From now on the source's stream is read but not forwarded (a link that stalls: what
    /// the source writes is lost if [`FaultProxy::cut`] follows).
    pub fn hold(&self) {
        self.shared.hold.store(true, Ordering::SeqCst);
    }

    /// Like [`FaultProxy::hold`], from just after the next `PING` the source writes: that
    /// `PING` reaches the destination (its `PONG` confirms everything before it), nothing
    /// after it does.
    pub fn hold_after_next_ping(&self) {
        let at = self.progress().forwarded;
        *self
            .shared
            .hold_after_ping
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(at);
    }

    /// The URI to give the source's `migrate`.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The progress so far.
    pub fn progress(&self) -> Progress {
        *self
            .shared
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `pred` holds (panics after `timeout`); returns the progress.
    pub fn wait(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Progress) -> bool,
    ) -> Progress {
        let deadline = Instant::now() + timeout;
        let mut g = self
            .shared
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while !pred(&g) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "proxy: no '{what}' within {timeout:?}: {:?}",
                *g
            );
            g = self
                .shared
                .cv
                .wait_timeout(g, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        *g
    }

    /// Waits until END was read from the source; returns the stream's length.
    pub fn wait_end(&self, timeout: Duration) -> u64 {
        let p = self.wait("END", timeout, |p| p.end.is_some());
        p.end.unwrap_or_default()
    }
}

fn cut(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// Source → destination, with the fault.
fn forward(mut src: TcpStream, mut dst: TcpStream, fault: Fault, sh: &Shared, mute: &AtomicBool) {
    let mut t = match fault {
        Fault::FlipInRamRecord(n) => EndTracker::watching_ram_record(n),
        _ => EndTracker::new(),
    };
    let mut flipped = None;
    let (mut sent, mut held) = (0u64, Vec::new());
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let before = t.position();
        let end = t.feed(&buf[..n]);
        held.extend_from_slice(&buf[..(t.position() - before) as usize]);
        let at_end_fault = matches!(
            fault,
            Fault::CutBeforeEnd(_) | Fault::CloseReturnPathAtEnd | Fault::StallReturnPathAtEnd
        );
        if end.is_some() && at_end_fault {
            // Silence the return path before the destination can answer END.
            mute.store(true, Ordering::SeqCst);
        }
        let allowed = match fault {
            Fault::CutAfter(c) => t.position().min(c),
            Fault::CutBeforeEnd(k) => match t.switchover() {
                Some(at) => t.position().saturating_sub(k).max(at),
                None => t.position(),
            },
            _ => t.position(),
        };
        let armed = *sh.hold_after_ping.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(at), Some(ping)) = (armed, t.last_ping()) {
            if ping > at && !sh.hold.load(Ordering::SeqCst) {
                // Forward up to the end of that PING, then hold.
                if ping > sent {
                    let n = (ping - sent) as usize;
                    if dst.write_all(&held[..n]).is_err() {
                        break;
                    }
                    held.drain(..n);
                    sent = ping;
                }
                sh.hold.store(true, Ordering::SeqCst);
            }
        }
        let allowed = if sh.hold.load(Ordering::SeqCst) {
            sent
        } else {
            allowed
        };
        let go = (allowed - sent) as usize;
        if let (None, Some((body, len))) = (flipped, t.watched_ram_record()) {
            let at = body + len / 2;
            if (sent..allowed).contains(&at) {
                held[(at - sent) as usize] ^= 0x08;
                flipped = Some((body - 5, at));
            }
        }
        if dst.write_all(&held[..go]).is_err() {
            break;
        }
        held.drain(..go);
        sent = allowed;
        sh.update(|p| {
            p.forwarded = sent;
            p.end = end;
            p.flipped = flipped;
            p.held = t.position() - sent;
        });
        let cut_now = match fault {
            Fault::CutAfter(c) => sent >= c,
            Fault::CutBeforeEnd(_) => end.is_some(),
            _ => false,
        };
        if cut_now {
            cut(&src, &dst);
            sh.update(|p| p.cut = true);
            return;
        }
        if end.is_some() {
            if fault == Fault::CloseReturnPathAtEnd {
                let _ = src.shutdown(Shutdown::Both);
            }
            // Nothing follows END; wait for the source to close.
            let _ = std::io::copy(&mut src, &mut std::io::sink());
            if fault == Fault::None {
                let _ = dst.shutdown(Shutdown::Write);
            }
            return;
        }
    }
    if mute.load(Ordering::SeqCst) {
        cut(&src, &dst);
        return;
    }
    // The source or the destination ended the stream (no fault of the proxy's): stop
    // forwarding, but leave the return direction to `return_path`, which relays what the
    // destination still says (its ERROR naming why) and then closes the source's end. Cutting
    // both here raced with that relay: the source said "Broken pipe" instead of the
    // destination's checksum error (seen once in CI).
    let _ = src.shutdown(Shutdown::Read);
    let _ = dst.shutdown(Shutdown::Write);
}

/// Destination → source (`PONG`, `SWITCHOVER_ACK`, `RESUMED`, `ERROR`, `SHUT`,
/// `RECV_BITMAP`, `RESUME_ACK`), dropped once `mute` is set; with
/// [`Fault::CutReturnPathAfter`] cut after that many bytes.
fn return_path(
    mut dst: TcpStream,
    mut src: TcpStream,
    mute: &AtomicBool,
    fault: Fault,
    sh: &Shared,
) {
    let mut buf = vec![0u8; 4096];
    let mut passed = 0u64;
    loop {
        let n = match dst.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if mute.load(Ordering::SeqCst) {
            continue;
        }
        let go = match fault {
            Fault::CutReturnPathAfter(c) => n.min(c.saturating_sub(passed) as usize),
            _ => n,
        };
        if src.write_all(&buf[..go]).is_err() {
            break;
        }
        passed += go as u64;
        if go < n || matches!(fault, Fault::CutReturnPathAfter(c) if passed >= c) {
            cut(&src, &dst);
            sh.update(|p| p.cut = true);
            return;
        }
    }
    if !mute.load(Ordering::SeqCst) {
        let _ = src.shutdown(Shutdown::Both);
    }
}
