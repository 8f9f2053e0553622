//! Liveness of a migration's peer (`x-tern-liveness-timeout`; `docs/migration-engine.md` §5.1).
//!
//! * [`arm`] sets the socket options: TCP keepalive and `TCP_USER_TIMEOUT` (the kernel ends a
//!   connection whose data or probes go unacknowledged: dead link, dead host), and
//!   `SO_RCVTIMEO` / `SO_SNDTIMEO` (a blocked `read`/`write` returns instead of waiting for ever).
//! * [`Inactivity`] is what those turn into: [`crate::transport::Stream`] maps the kernel's
//!   `EAGAIN` (a socket timeout) and `ETIMEDOUT` (the TCP user timeout or keepalive) to an
//!   `io::Error` carrying an `Inactivity`, which the engine finds in an error chain and reports
//!   with its own text ("no data from the source for 1500 ms: …"), distinct from every other
//!   I/O error.
//! * [`Ticker`] is the thread that sends keepalives while the thread owning the channel is
//!   busy (the destination's return path).

use std::error::Error;
use std::io;
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

use crate::params::DEFAULT_LIVENESS_TIMEOUT_MS;
use crate::transport::Stream;

/// Longest interval between two keepalives a side sends, whatever its own limit (also when its
/// limit is off): a peer with a limit of 3 s or more never sees a healthy side silent.
pub const MAX_KEEPALIVE_PERIOD: Duration = Duration::from_secs(1);
/// TCP keepalive probes (the kernel gives up at `TCP_USER_TIMEOUT` whatever the count).
const KEEPALIVE_PROBES: u32 = 3;

/// `x-tern-liveness-timeout` as the engine uses it: `None` = off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessTimeout(Option<Duration>);

impl Default for LivenessTimeout {
    fn default() -> Self {
        Self::from_millis(DEFAULT_LIVENESS_TIMEOUT_MS)
    }
}

impl LivenessTimeout {
    /// No inactivity limit, no keepalive socket options.
    pub const OFF: Self = Self(None);

    /// The parameter's value: milliseconds, 0 = off.
    pub fn from_millis(ms: u64) -> Self {
        if ms == 0 {
            Self::OFF
        } else {
            Self(Some(Duration::from_millis(ms)))
        }
    }

    /// The limit, when on.
    pub fn limit(self) -> Option<Duration> {
        self.0
    }

    /// The limit in milliseconds (0 = off).
    pub fn millis(self) -> u64 {
        self.0.map_or(0, |d| d.as_millis() as u64)
    }

    /// How often this side sends a keepalive while it has nothing else to send: a third of the
    /// limit, at most [`MAX_KEEPALIVE_PERIOD`] (also when the limit is off, for the peer's sake).
    pub fn keepalive_period(self) -> Duration {
        self.0
            .map_or(MAX_KEEPALIVE_PERIOD, |l| (l / 3).min(MAX_KEEPALIVE_PERIOD))
            .max(Duration::from_millis(1))
    }
}

/// What an inactivity limit caught (the text of the `io::Error` that carries it; the engine
/// words it for its peer with [`Inactivity::describe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Inactivity {
    /// `SO_RCVTIMEO`: nothing arrived for that long.
    #[error("nothing received for {ms} ms")]
    Receive {
        /// The limit, ms.
        ms: u64,
    },
    /// `SO_SNDTIMEO`: the peer's window stayed closed (it does not read) for that long.
    #[error("nothing could be sent for {ms} ms")]
    Send {
        /// The limit, ms.
        ms: u64,
    },
    /// `ETIMEDOUT`: the kernel ended the connection (data, window probes or keepalive probes
    /// unacknowledged for `TCP_USER_TIMEOUT`, or its own retransmission limit).
    #[error("the connection timed out (TCP: unacknowledged data or keepalive probes)")]
    Connection,
}

impl Inactivity {
    /// The error text for `error-desc`, naming the peer ("source" or "destination").
    pub fn describe(&self, peer: &str) -> String {
        match self {
            Self::Receive { ms } => {
                format!("no data from the {peer} for {ms} ms: the {peer} or the link is gone")
            }
            Self::Send { ms } => {
                format!("the {peer} stopped reading for {ms} ms: the {peer} or the link is gone")
            }
            Self::Connection => format!(
                "the connection to the {peer} timed out (TCP: unacknowledged data or keepalive \
                 probes): the {peer} or the link is gone"
            ),
        }
    }

    /// The `io::Error` (kind `TimedOut`) that carries this.
    pub fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::TimedOut, self)
    }

    /// The `Inactivity` an `io::Error` carries, if any.
    pub fn of_io(e: &io::Error) -> Option<Self> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<Self>())
            .copied()
    }

    /// The first `Inactivity` in an error chain (`io::Error`s are looked into).
    pub fn find(e: &(dyn Error + 'static)) -> Option<Self> {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if let Some(i) = err.downcast_ref::<Self>() {
                return Some(*i);
            }
            if let Some(i) = err.downcast_ref::<io::Error>().and_then(Self::of_io) {
                return Some(i);
            }
            cur = err.source();
        }
        None
    }
}

/// The direction of a failed socket call, for [`classify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Receive,
    Send,
}

/// Turns the error of a `read`/`write` on a socket into an [`Inactivity`] when a liveness
/// option caused it: `EAGAIN` on a blocking socket with `SO_RCVTIMEO`/`SO_SNDTIMEO` set, or
/// `ETIMEDOUT`. Other errors pass unchanged. Only called on the error path (the timeouts are
/// read back from the socket).
pub(crate) fn classify(fd: &impl AsFd, e: io::Error, dir: Direction) -> io::Error {
    let fd = fd.as_fd();
    let sock = SockRef::from(&fd);
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
    if e.kind() == io::ErrorKind::WouldBlock {
        let limit = match dir {
            Direction::Receive => sock.read_timeout().ok().flatten(),
            Direction::Send => sock.write_timeout().ok().flatten(),
        };
        return match (dir, ms(limit)) {
            (Direction::Receive, Some(ms)) => Inactivity::Receive { ms }.into_io(),
            (Direction::Send, Some(ms)) => Inactivity::Send { ms }.into_io(),
            (_, None) => e,
        };
    }
    if e.raw_os_error() == Some(libc::ETIMEDOUT) {
        return Inactivity::Connection.into_io();
    }
    e
}

/// Arms a migration socket (nothing for a file, nothing when `limit` is off):
/// * TCP: `SO_KEEPALIVE` with idle = limit/3 and interval = limit/9 (each at least 1 s, the
///   options' unit), 3 probes, and `TCP_USER_TIMEOUT` = limit;
/// * every socket: `SO_SNDTIMEO` = limit, `SO_RCVTIMEO` = `read_check`, or the limit when
///   `None` (the destination: the limit; the source: a check interval, its return-path reader
///   decides).
pub fn arm(
    stream: &Stream,
    limit: LivenessTimeout,
    read_check: Option<Duration>,
) -> io::Result<()> {
    let Some(l) = limit.limit() else {
        return Ok(());
    };
    let read_timeout = read_check.unwrap_or(l);
    match stream.plain() {
        Stream::File(_) | Stream::Tls(_) => return Ok(()),
        Stream::Tcp(s) => {
            let sock = SockRef::from(s);
            let secs = |div: u32| Duration::from_secs((l / div).as_secs().max(1));
            let ka = TcpKeepalive::new()
                .with_time(secs(3))
                .with_interval(secs(9))
                .with_retries(KEEPALIVE_PROBES);
            sock.set_tcp_keepalive(&ka)?;
            sock.set_tcp_user_timeout(Some(l))?;
            s.set_write_timeout(Some(l))?;
            s.set_read_timeout(Some(read_timeout))?;
        }
        Stream::Unix(s) => {
            s.set_write_timeout(Some(l))?;
            s.set_read_timeout(Some(read_timeout))?;
        }
    }
    Ok(())
}

/// A named thread calling `tick` every `period` until dropped (drop stops and joins it).
pub(crate) struct Ticker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    pub(crate) fn spawn(
        name: &str,
        period: Duration,
        mut tick: impl FnMut() + Send + 'static,
    ) -> io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    stopped = cv
                        .wait_timeout(stopped, period)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                    if *stopped {
                        return;
                    }
                    drop(stopped);
                    tick();
                    stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
#[path = "liveness_tests.rs"]
mod tests;
