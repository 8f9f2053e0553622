//! `zero-copy-send` on a multifd channel (`docs/migration-engine.md` §2.5, decisions 220–226):
//! `SO_ZEROCOPY` on the channel's TCP socket, batches written with `sendmsg(MSG_ZEROCOPY)`, the
//! kernel's completion notifications read from the socket's error queue (`MSG_ERRQUEUE`,
//! `SO_EE_ORIGIN_ZEROCOPY`), and the flush at every sync that waits until every zero-copy send
//! completed and says whether the kernel copied all of them anyway (QEMU's
//! `dirty-sync-missed-zero-copy`).
//!
//! What is handed to the kernel is never guest memory: the sender copies a batch's non-zero
//! pages once into one of its own [`SlotPool`] buffers (the batch CRC must cover exactly the
//! bytes sent, decision 163) and that buffer, with the batch's head and CRC, is what the
//! kernel pins. A buffer is reused only after the kernel reported its sends complete.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, IoSlice, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::transport::Stream;

/// `SO_ZEROCOPY` (asm-generic/socket.h).
const SO_ZEROCOPY: libc::c_int = 60;
/// `SO_EE_ORIGIN_ZEROCOPY` (linux/errqueue.h).
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `SO_EE_CODE_ZEROCOPY_COPIED`: the kernel copied the data after all.
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;
/// `IP_RECVERR` / `IPV6_RECVERR`: the control message types of an error-queue entry.
const IP_RECVERR: libc::c_int = 11;
const IPV6_RECVERR: libc::c_int = 25;
/// Size of `struct sock_extended_err`.
const EXTENDED_ERR_LEN: usize = 16;

/// One error-queue notification: the zero-copy sends `lo..=hi` (the kernel's per-socket send
/// counter) completed; `copied` when the kernel copied their data instead of sending the
/// pinned pages (loopback, a device without scatter-gather: QEMU's "missed" zero copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    pub lo: u32,
    pub hi: u32,
    pub copied: bool,
}

/// Parses one error-queue control message (`level`, `kind`, its data: a `struct
/// sock_extended_err`). Anything but a zero-copy completion is an error naming what it was: a
/// socket error (`ee_errno` ≠ 0), another origin, bounds the wrong way round.
pub(crate) fn parse_notification(
    level: libc::c_int,
    kind: libc::c_int,
    data: &[u8],
) -> Result<Completion, String> {
    let ip = (level == libc::SOL_IP && kind == IP_RECVERR)
        || (level == libc::SOL_IPV6 && kind == IPV6_RECVERR);
    if !ip {
        return Err(format!(
            "unexpected control message level {level} type {kind} on the error queue"
        ));
    }
    let Some(e) = data.get(..EXTENDED_ERR_LEN) else {
        return Err(format!(
            "a {}-byte sock_extended_err (expected {EXTENDED_ERR_LEN})",
            data.len()
        ));
    };
    let u32_at = |i: usize| u32::from_ne_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
    let (errno, origin, code) = (u32_at(0), e[4], e[6]);
    let (info, end) = (u32_at(8), u32_at(12));
    if errno != 0 {
        return Err(format!(
            "socket error on the error queue: {}",
            io::Error::from_raw_os_error(errno as i32)
        ));
    }
    if origin != SO_EE_ORIGIN_ZEROCOPY {
        return Err(format!(
            "an error-queue entry of origin {origin}, not a zero-copy completion"
        ));
    }
    if end.wrapping_sub(info) > i32::MAX as u32 {
        return Err(format!("zero-copy completion range {info}..={end}"));
    }
    Ok(Completion {
        lo: info,
        hi: end,
        copied: code == SO_EE_CODE_ZEROCOPY_COPIED,
    })
}

/// Which zero-copy sends completed. Sends are numbered from 0 in the order they were made
/// (the kernel's 32-bit counter, widened); completions may come in any order.
#[derive(Debug, Default)]
pub(crate) struct Done {
    /// Every send below this completed.
    below: u64,
    /// Completed ranges above `below` (start → end, exclusive), not yet joined to it.
    ahead: BTreeMap<u64, u64>,
}

impl Done {
    /// Records `c`; returns how many sends it completed.
    pub(crate) fn add(&mut self, c: Completion) -> u64 {
        // The kernel's counter is `below` modulo 2^32, ahead of it by less than 2^31.
        let lo = self.below + u64::from(c.lo.wrapping_sub(self.below as u32));
        let n = u64::from(c.hi.wrapping_sub(c.lo)) + 1;
        self.ahead.insert(lo, lo + n);
        while let Some((&s, &e)) = self.ahead.first_key_value() {
            if s > self.below {
                break;
            }
            self.below = self.below.max(e);
            self.ahead.remove(&s);
        }
        n
    }

    /// Whether every send below `end` completed.
    pub(crate) fn all_below(&self, end: u64) -> bool {
        self.below >= end
    }
}

/// A channel's TCP socket with `SO_ZEROCOPY` on. Writes go out with `MSG_ZEROCOPY` while
/// [`ZeroCopySocket::arm`]ed (the caller promises the bytes stay untouched until completed),
/// plainly otherwise (the channel's `SYNC`/`KEEPALIVE` markers from the stack).
#[derive(Debug)]
pub(crate) struct ZeroCopySocket {
    sock: TcpStream,
    armed: bool,
    /// Zero-copy sends made (the next send's number).
    sent: u64,
    done: Done,
    /// Since the last [`ZeroCopySocket::flush_completions`]: sends completed, and whether
    /// any of them was really zero-copy.
    since_flush: (u64, bool),
    /// Totals: sends completed, of which the kernel copied.
    pub completed: u64,
    pub copied: u64,
    /// How long a completion may take (the liveness limit; `None` = no limit).
    wait: Option<Duration>,
}

impl ZeroCopySocket {
    /// Turns `SO_ZEROCOPY` on. Fails with the kernel's reason (no `MSG_ZEROCOPY` on this kernel
    /// or this socket).
    pub(crate) fn new(sock: TcpStream, wait: Option<Duration>) -> io::Result<Self> {
        let one: libc::c_int = 1;
        // SAFETY: `one` is a live c_int for the call and the length is its size; the fd is the
        // open socket `sock` owns.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_ZEROCOPY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("SO_ZEROCOPY: {e} (this kernel or socket has no MSG_ZEROCOPY)"),
            ));
        }
        Ok(Self {
            sock,
            armed: false,
            sent: 0,
            done: Done::default(),
            since_flush: (0, false),
            completed: 0,
            copied: 0,
            wait,
        })
    }

    /// The socket (liveness options, shutdown).
    #[cfg(test)]
    pub(crate) fn get_ref(&self) -> &TcpStream {
        &self.sock
    }

    /// Whether the next writes carry `MSG_ZEROCOPY`.
    pub(crate) fn arm(&mut self, on: bool) {
        self.armed = on;
    }

    /// The number the next zero-copy send will get: the sends made so far.
    pub(crate) fn sent(&self) -> u64 {
        self.sent
    }

    fn sendmsg(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let flags = if self.armed { libc::MSG_ZEROCOPY } else { 0 };
        // SAFETY: an all-zero msghdr is valid (no name, no control).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        // `IoSlice` is ABI-compatible with `struct iovec` (std guarantees it on Unix); the
        // kernel only reads through the pointer.
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
        loop {
            // SAFETY: `msg` points at `bufs`, live for the call. With MSG_ZEROCOPY the kernel
            // keeps references to the pages of `bufs` after the call returns; the caller arms
            // only for bytes it keeps untouched until `wait_until` says the send completed
            // (the slot pool). Pinned pages stay valid for the kernel whatever this process
            // does with its mapping, so this is a data-integrity promise, not a memory-safety
            // one.
            let n = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &msg, flags) };
            if n >= 0 {
                if self.armed && n > 0 {
                    self.sent += 1;
                }
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOBUFS) if self.armed => {
                    // The notification memory (optmem) of earlier sends: read them, retry.
                    if self.sent > self.done.below {
                        self.wait_until(self.done.below + 1)?;
                        continue;
                    }
                    return Err(memlock_error(e));
                }
                _ => return Err(e),
            }
        }
    }

    /// Reads every notification waiting on the error queue (never blocks).
    fn drain(&mut self) -> io::Result<usize> {
        let mut n = 0;
        while let Some(c) = self.read_one()? {
            let k = self.done.add(c);
            self.completed += k;
            self.since_flush.0 += k;
            if c.copied {
                self.copied += k;
            } else {
                self.since_flush.1 = true;
            }
            n += 1;
        }
        Ok(n)
    }

    fn read_one(&mut self) -> io::Result<Option<Completion>> {
        // u64 elements: the control buffer must be aligned for `cmsghdr`.
        let mut control = [0u64; 16];
        // SAFETY: an all-zero msghdr is valid; then it points at `control`, live for the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let flags = libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT;
        // SAFETY: `msg` describes no data buffer and the live `control` buffer.
        let r = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, flags) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(None),
                Some(libc::EINTR) => self.read_one(),
                _ => Err(io::Error::new(
                    e.kind(),
                    format!("reading the zero-copy completions (MSG_ERRQUEUE): {e}"),
                )),
            };
        }
        // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR checks `msg_controllen`.
        let cm = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        if cm.is_null() {
            return Err(io::Error::other(
                "an error-queue entry without a control message",
            ));
        }
        // SAFETY: `cm` points into `control` (CMSG_FIRSTHDR returned it non-null); its data
        // runs from CMSG_DATA for `cmsg_len - CMSG_LEN(0)` bytes, clamped to the buffer.
        let (level, kind, data) = unsafe {
            let h = &*cm;
            let start = libc::CMSG_DATA(cm);
            let off = start.offset_from(control.as_ptr().cast::<u8>()) as usize;
            let max = std::mem::size_of_val(&control).saturating_sub(off);
            let len = (h.cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
            (
                h.cmsg_level,
                h.cmsg_type,
                std::slice::from_raw_parts(start, len.min(max)),
            )
        };
        parse_notification(level, kind, data)
            .map(Some)
            .map_err(io::Error::other)
    }

    /// Waits until every send numbered below `end` completed, at most the liveness limit
    /// between two notifications.
    pub(crate) fn wait_until(&mut self, end: u64) -> io::Result<()> {
        loop {
            self.drain()?;
            if self.done.all_below(end) {
                return Ok(());
            }
            let mut p = libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: 0,
                revents: 0,
            };
            let ms = self.wait.map_or(-1, |d| {
                d.as_millis().clamp(1, i32::MAX as u128) as libc::c_int
            });
            // SAFETY: one live pollfd.
            let r = unsafe { libc::poll(&mut p, 1, ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} zero-copy send(s) not completed within {} ms (the destination \
                         stopped reading?)",
                        end.saturating_sub(self.done.below),
                        ms
                    ),
                ));
            }
            if self.drain()? > 0 {
                continue;
            }
            // Woken with nothing on the error queue: a socket error (POLLERR without an
            // entry) or a hang-up would wake every poll at once; both end the wait.
            if let Some(e) = self.sock.take_error()? {
                return Err(io::Error::new(
                    e.kind(),
                    format!("the channel failed while zero-copy sends were outstanding: {e}"),
                ));
            }
            if p.revents & libc::POLLHUP != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the channel closed while zero-copy sends were outstanding",
                ));
            }
        }
    }

    /// QEMU's flush at a sync: waits until every zero-copy send so far completed. Returns
    /// true when there were sends and the kernel copied every one of them (a "missed" zero
    /// copy, counted in `dirty-sync-missed-zero-copy`).
    pub(crate) fn flush_completions(&mut self) -> io::Result<bool> {
        self.wait_until(self.sent)?;
        let (n, zero_copied) = std::mem::take(&mut self.since_flush);
        Ok(n > 0 && !zero_copied)
    }
}

/// `ENOBUFS` with no send outstanding: the kernel would not pin more pages for this user.
fn memlock_error(e: io::Error) -> io::Error {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a live rlimit for the call.
    let limit = if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0 {
        if lim.rlim_cur == libc::RLIM_INFINITY {
            "unlimited".to_owned()
        } else {
            format!("{} KiB", lim.rlim_cur / 1024)
        }
    } else {
        "unknown".to_owned()
    };
    io::Error::new(
        io::ErrorKind::OutOfMemory,
        format!(
            "MSG_ZEROCOPY: the kernel refused to pin the send buffer ({e}): pages pinned for \
             zero-copy count against the locked-memory limit (RLIMIT_MEMLOCK, now {limit}) \
             unless the process has CAP_IPC_LOCK; raise it (ulimit -l, systemd LimitMEMLOCK=) \
             to at least 8 MiB per channel, or turn zero-copy-send off"
        ),
    )
}

impl Write for ZeroCopySocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sendmsg(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.sendmsg(bufs)
    }

    /// Nothing is buffered here (completions are [`ZeroCopySocket::flush_completions`]).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A channel's socket: plain, or with `zero-copy-send` on (TCP only).
pub(super) enum ChannelSocket {
    Plain(Stream),
    ZeroCopy(ZeroCopySocket),
}

impl std::io::Write for ChannelSocket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.write(buf),
            Self::ZeroCopy(z) => z.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Self::Plain(s) => s.write_vectored(bufs),
            Self::ZeroCopy(z) => z.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(s) => s.flush(),
            Self::ZeroCopy(z) => z.flush(),
        }
    }
}

impl ChannelSocket {
    pub(super) fn zero_copy(&mut self) -> Option<&mut ZeroCopySocket> {
        match self {
            Self::Plain(_) => None,
            Self::ZeroCopy(z) => Some(z),
        }
    }
}

/// Slots of one sender: each holds a batch's head, page data and CRC while the kernel may
/// still read them.
pub(crate) const POOL_SLOTS: usize = 4;

/// One batch's bytes, owned until its sends completed. Each part is its own heap buffer, so
/// moving a `Slot` in the pool never moves bytes the kernel reads.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    pub head: Vec<u8>,
    pub data: Vec<u8>,
    pub trailer: Box<[u8; 4]>,
    /// Sends numbered below this carry this slot's bytes.
    end: u64,
}

/// A sender's slots: free ones, then those the kernel may still read, oldest first.
#[derive(Debug)]
pub(crate) struct SlotPool {
    free: Vec<Slot>,
    busy: VecDeque<Slot>,
}

impl SlotPool {
    pub(crate) fn new(data_bytes: usize) -> Self {
        let free = (0..POOL_SLOTS)
            .map(|_| Slot {
                data: vec![0u8; data_bytes],
                ..Slot::default()
            })
            .collect();
        Self {
            free,
            busy: VecDeque::new(),
        }
    }

    /// A slot whose bytes the kernel no longer reads: a free one, or the oldest busy one
    /// once its sends completed (waiting for that).
    pub(crate) fn take(&mut self, sock: &mut ZeroCopySocket) -> io::Result<Slot> {
        if let Some(s) = self.free.pop() {
            return Ok(s);
        }
        let Some(s) = self.busy.pop_front() else {
            return Err(io::Error::other("zero-copy slot pool is empty"));
        };
        if let Err(e) = sock.wait_until(s.end) {
            self.busy.push_front(s);
            return Err(e);
        }
        Ok(s)
    }

    /// `slot` was written: the kernel may read it until the sends made so far completed.
    pub(crate) fn sent(&mut self, mut slot: Slot, sock: &ZeroCopySocket) {
        slot.end = sock.sent();
        self.busy.push_back(slot);
    }

    /// After a flush every slot is free again.
    pub(crate) fn release_all(&mut self) {
        self.free.extend(self.busy.drain(..));
    }
}

#[cfg(test)]
#[path = "multifd_zerocopy_tests.rs"]
mod tests;
