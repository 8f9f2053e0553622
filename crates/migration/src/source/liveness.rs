//! The source's side of `x-tern-liveness-timeout` (`docs/migration-engine.md` §5.1):
//!
//! * [`Watched`]: the migration socket under the stream writer and under the return-path
//!   reader, with the source's rules on top of the socket timeouts;
//! * [`Keepalive`] and [`Sender::wait_alive`]: the sender's idle waits send a `PING` whenever
//!   nothing was written for the keepalive period, so the destination's own limit never fires
//!   on a healthy source.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Flags, Sender, Shared, SourceError};
use crate::liveness::{Inactivity, LivenessTimeout};
use crate::transport::Stream;
use crate::wire::{Command, WireError};

/// The migration socket with the source's liveness rules (nothing changes when the limit is
/// off: the socket then has no timeouts):
/// * **write** (`SO_SNDTIMEO` = the limit expired: the destination's window stayed closed):
///   fail, unless the destination was heard from on the return path within the limit; then it
///   is alive and only busy (a device loading for long), so keep waiting;
/// * **read** (the return path; `SO_RCVTIMEO` = a check interval expired): fail when a `PING`
///   is unanswered and nothing at all arrived for the limit; otherwise read on;
/// * **TCP_USER_TIMEOUT**: the limit, extended whenever the destination is heard (see
///   [`Watched::heard`]).
pub(super) struct Watched {
    stream: Stream,
    shared: Arc<Shared>,
    limit: Option<Duration>,
    /// When the channel was set up (no closed window can be older).
    since: Instant,
    /// A write failed: every later write fails at once without touching the socket. The
    /// stream writer's `BufWriter` retries its buffer when it is dropped, and after a write
    /// timed out on a live socket (the destination stopped reading for the limit) such a
    /// retry could still deliver the rest of the stream, END included, while the sender
    /// treats the migration as failed before END and resumes the source: two running copies.
    write_failed: bool,
}

impl Watched {
    pub(super) fn new(stream: Stream, shared: Arc<Shared>, liveness: LivenessTimeout) -> Self {
        Self {
            stream,
            shared,
            limit: liveness.limit(),
            since: Instant::now(),
            write_failed: false,
        }
    }

    /// The destination sent something: it and the link are alive. Linux (since 5.11) counts a
    /// receive window that stays closed against `TCP_USER_TIMEOUT` even while the peer answers
    /// the window probes, so a destination busy for longer than the limit (a device loading,
    /// not reading meanwhile) would have its connection cut by the kernel. Raise the timeout
    /// past any window closed so far, by the limit: the kernel still ends the connection once
    /// the destination is silent, and the rules above end the migration sooner.
    fn heard(&self) {
        let (Some(limit), Stream::Tcp(tcp)) = (self.limit, self.stream.plain()) else {
            return;
        };
        let timeout = self.since.elapsed() + limit;
        if let Err(e) = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(timeout)) {
            tracing::debug!(error = %e, "cannot raise TCP_USER_TIMEOUT");
        }
    }

    /// The destination spoke on the return path within the limit (and nothing aborts).
    fn destination_alive(&self) -> bool {
        let Some(limit) = self.limit else {
            return false;
        };
        let f = self.shared.lock();
        !f.aborting() && f.heard_at.is_some_and(|t| t.elapsed() < limit)
    }

    /// The limit, when a `PING` went unanswered while the destination said nothing for it.
    fn ping_overdue(&self) -> Option<Duration> {
        let limit = self.limit?;
        let f = self.shared.lock();
        let since = f.ping_pending_since?;
        let quiet_since = f.heard_at.map_or(since, |h| h.max(since));
        (quiet_since.elapsed() >= limit).then_some(limit)
    }
}

impl Write for Watched {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.watched_write(|s| s.write(buf))
    }

    /// The stream writer sends each RAM batch with one vectored write (the default would
    /// write only the first slice per call).
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.watched_write(|s| s.write_vectored(bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

impl Watched {
    /// One write on the stream under the rules above.
    fn watched_write(
        &mut self,
        mut write: impl FnMut(&mut Stream) -> io::Result<usize>,
    ) -> io::Result<usize> {
        if self.write_failed {
            return Err(io::Error::other(
                "an earlier write on the migration stream failed: nothing more is sent",
            ));
        }
        loop {
            match write(&mut self.stream) {
                Err(e)
                    if matches!(Inactivity::of_io(&e), Some(Inactivity::Send { .. }))
                        && self.destination_alive() =>
                {
                    tracing::debug!(
                        "the destination reads nothing but answers on the return path: waiting on"
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
                Err(e) => {
                    self.write_failed = true;
                    return Err(e);
                }
                r => return r,
            }
        }
    }
}

impl Read for Watched {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Ok(n) if n > 0 => {
                    self.heard();
                    return Ok(n);
                }
                Err(e) if matches!(Inactivity::of_io(&e), Some(Inactivity::Receive { .. })) => {
                    if let Some(limit) = self.ping_overdue() {
                        let ms = limit.as_millis() as u64;
                        return Err(Inactivity::Receive { ms }.into_io());
                    }
                }
                r => return r,
            }
        }
    }
}

/// When the sender last wrote, to send a keepalive `PING` after a period of silence.
#[derive(Debug)]
pub(super) struct Keepalive {
    /// `None`: no keepalives (a `file:` stream has nobody to keep alive).
    period: Option<Duration>,
    bytes: u64,
    at: Instant,
}

impl Keepalive {
    pub(super) fn new(liveness: LivenessTimeout, now: Instant) -> Self {
        Self {
            period: Some(liveness.keepalive_period()),
            bytes: 0,
            at: now,
        }
    }

    /// No keepalives on this stream.
    pub(super) fn disable(&mut self) {
        self.period = None;
    }

    /// Notes the stream position; true when nothing was written for a whole period.
    fn due(&mut self, written: u64, now: Instant) -> bool {
        if written != self.bytes {
            self.bytes = written;
            self.at = now;
            return false;
        }
        self.period
            .is_some_and(|p| now.saturating_duration_since(self.at) >= p)
    }

    /// Notes a write that just happened.
    fn wrote(&mut self, written: u64, now: Instant) {
        self.bytes = written;
        self.at = now;
    }

    /// When the next keepalive is due if nothing is written until then.
    fn next(&self) -> Option<Instant> {
        self.period.map(|p| self.at + p)
    }
}

impl Sender {
    /// Sends a `PING` (flushed) and notes it as unanswered; returns its sequence number.
    pub(super) fn send_ping(&mut self) -> Result<u32, SourceError> {
        self.ping_seq = self.ping_seq.wrapping_add(1).max(2);
        let seq = self.ping_seq;
        let w = self
            .writer
            .as_mut()
            .ok_or(SourceError::Wire(WireError::Finished("not open")))?;
        w.write_command(Command::Ping { seq })?;
        w.flush()?;
        let written = w.bytes_written();
        self.keepalive.wrote(written, Instant::now());
        self.release_seal(seq);
        let mut f = self.shared.lock();
        f.ping_sent = seq;
        f.ping_pending_since.get_or_insert_with(Instant::now);
        Ok(seq)
    }

    /// Waits until `pred`, an abort, or `timeout` (None = no timeout), and meanwhile sends a keepalive `PING` whenever nothing was
    /// written for the keepalive period (while the stream is open: not after END).
    pub(super) fn wait_alive(
        &mut self,
        timeout: Option<Duration>,
        pred: impl Fn(&Flags) -> bool,
    ) -> Result<(), SourceError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let shared = self.shared.clone();
        loop {
            let now = Instant::now();
            let mut keepalive_at = None;
            if let Some(w) = self.writer.as_ref() {
                if self.keepalive.due(w.bytes_written(), now) {
                    self.send_ping()?;
                }
                keepalive_at = self.keepalive.next();
            }
            let f = shared.lock();
            if pred(&f) || f.aborting() || deadline.is_some_and(|d| now >= d) {
                return Ok(());
            }
            let wake = match (deadline, keepalive_at) {
                (Some(d), Some(k)) => Some(d.min(k)),
                (d, k) => d.or(k),
            };
            let f = match wake {
                None => shared.cv.wait(f).unwrap_or_else(|p| p.into_inner()),
                Some(w) => {
                    shared
                        .cv
                        .wait_timeout(f, w.saturating_duration_since(Instant::now()))
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
            if pred(&f) || f.aborting() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::sync::{Condvar, Mutex};

    use super::*;
    use crate::source::Flags;
    use crate::transport::CancelToken;

    /// After a write timed out (the destination stopped reading for the limit), nothing more
    /// reaches the socket, not even once the destination reads again: the stream writer's
    /// buffer, flushed again when it is dropped, must not deliver the rest of the stream (END
    /// included) after the sender decided the migration failed before END.
    #[test]
    fn a_failed_write_is_final() {
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        let stream = Stream::Unix(a);
        let limit = LivenessTimeout::from_millis(200);
        crate::liveness::arm(&stream, limit, None).expect("arm");
        let shared = Arc::new(Shared {
            flags: Mutex::new(Flags::default()),
            cv: Condvar::new(),
            io: CancelToken::new(),
        });
        let mut w = Watched::new(stream, shared, limit);
        let chunk = vec![0x5a; 64 << 10];
        let mut sent = 0usize;
        let err = loop {
            match w.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) => break e,
            }
            assert!(
                sent < 256 << 20,
                "the peer never read, yet every write succeeded"
            );
        };
        assert!(
            matches!(Inactivity::of_io(&err), Some(Inactivity::Send { .. })),
            "first failure is the send timeout: {err}"
        );
        // The destination reads everything that was sent: the socket is writable again.
        let mut got = vec![0u8; sent];
        b.read_exact(&mut got).expect("drain");
        let again = w.write(b"END").expect_err("a write after a failed one");
        assert!(again.to_string().contains("earlier write"), "{again}");
        b.set_nonblocking(true).expect("nonblocking");
        let mut one = [0u8; 1];
        assert!(
            matches!(b.read(&mut one), Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "nothing may follow the failed write"
        );
    }
}
