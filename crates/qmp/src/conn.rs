//! One client connection on its own thread (`qmp-client-N`): reads requests, runs them one at a
//! time in order, writes replies and events, and runs after-reply actions.
//!
//! The loop polls the socket and a wake-up socket pair. Requests are read and started only while
//! the client's output backlog is below [`crate::Limits::pause_input_at`]; requests already read
//! are processed as soon as the backlog drains below it again, whether or not new input arrives.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::error::QmpError;
use crate::events::ClientShared;
use crate::framer::{FrameEvent, Framer};
use crate::request::{self, Handled};
use crate::server::{AfterReply, Inner};
use crate::wire;

const READ_CHUNK: usize = 64 << 10;

pub(crate) struct Conn {
    inner: Arc<Inner>,
    shared: Arc<ClientShared>,
    stream: UnixStream,
    wake_rx: UnixStream,
    framer: Framer,
    input: Vec<u8>,
    input_pos: usize,
    read_eof: bool,
    /// An oversized message was seen: flush the error reply, then close.
    close_after_flush: bool,
    deadline: Option<Instant>,
    hooks: Vec<(u64, AfterReply)>,
    negotiated: bool,
}

enum Poll {
    Readable,
    Other,
}

impl Conn {
    pub(crate) fn new(
        inner: Arc<Inner>,
        shared: Arc<ClientShared>,
        stream: UnixStream,
        wake_rx: UnixStream,
    ) -> Conn {
        let framer = Framer::new(inner.limits.max_message_bytes, inner.limits.max_depth);
        Conn {
            inner,
            shared,
            stream,
            wake_rx,
            framer,
            input: Vec::with_capacity(READ_CHUNK),
            input_pos: 0,
            read_eof: false,
            close_after_flush: false,
            deadline: None,
            hooks: Vec::new(),
            negotiated: false,
        }
    }

    pub(crate) fn run(mut self) {
        self.shared.push_reply(&self.inner.greeting);
        let reason = self.serve();
        tracing::debug!("QMP client {} closed: {reason}", self.shared.id);
        self.run_hooks(true);
        let id = self.shared.id;
        self.inner.events.unregister(id);
        self.inner.clients().retain(|c| c.shared.id != id);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn serve(&mut self) -> String {
        loop {
            self.drain_wake();
            self.process_input();
            let flushed = self.flush();
            self.run_hooks(false);
            if let Err(e) = flushed {
                return format!("write failed: {e}");
            }
            let (pending, overflowed, closing) = {
                let out = self.shared.lock();
                (out.buf.len(), out.overflowed, out.closing)
            };
            if overflowed {
                return "event queue overflow".into();
            }
            let finishing = closing || self.close_after_flush;
            if finishing || self.read_eof {
                if pending == 0 {
                    return if closing {
                        "server shutdown".into()
                    } else if self.close_after_flush {
                        "oversized message".into()
                    } else {
                        "end of input".into()
                    };
                }
                if finishing {
                    let deadline = *self
                        .deadline
                        .get_or_insert_with(|| Instant::now() + self.inner.limits.flush_timeout);
                    if Instant::now() >= deadline {
                        return "flush timeout".into();
                    }
                }
            }
            let input_left = self.input_pos < self.input.len();
            let below_mark = pending < self.inner.limits.pause_input_at;
            // Requests already read wait for nothing but the backlog: once it is below the mark
            // they are processed at once. No byte may arrive on the socket to wake us for them.
            if input_left && below_mark && !finishing {
                continue;
            }
            let want_read = !self.read_eof && !finishing && !input_left && below_mark;
            let want_write = pending > 0;
            // Both false would mean sleeping until the peer hangs up. It cannot happen: with
            // nothing pending we are below the mark, and we returned above when finishing or at
            // end of input, or continued above with input left.
            debug_assert!(
                want_read || want_write,
                "QMP connection would wait for nothing"
            );
            match self.poll(want_read, want_write) {
                Ok(Poll::Readable) if want_read => {
                    if let Err(e) = self.read_some() {
                        return format!("read failed: {e}");
                    }
                }
                Ok(_) => {}
                Err(e) => return format!("poll failed: {e}"),
            }
        }
    }

    fn poll(&self, want_read: bool, want_write: bool) -> io::Result<Poll> {
        let mut events = 0;
        if want_read {
            events |= libc::POLLIN;
        }
        if want_write {
            events |= libc::POLLOUT;
        }
        let mut fds = [
            libc::pollfd {
                fd: self.stream.as_raw_fd(),
                events,
                revents: 0,
            },
            libc::pollfd {
                fd: self.wake_rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout = match self.deadline {
            Some(d) => {
                let ms = d.saturating_duration_since(Instant::now()).as_millis();
                i32::try_from(ms).unwrap_or(i32::MAX).max(1)
            }
            None => -1,
        };
        // SAFETY: `fds` is a live, exclusively borrowed array of initialised `pollfd`s whose
        // length is passed with it; both descriptors are owned by `self` and stay open for the
        // duration of the call. poll() writes only the `revents` fields.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(Poll::Other)
            } else {
                Err(e)
            };
        }
        let ready = libc::POLLIN | libc::POLLHUP | libc::POLLERR;
        if fds[0].revents & ready != 0 {
            Ok(Poll::Readable)
        } else {
            Ok(Poll::Other)
        }
    }

    fn drain_wake(&mut self) {
        let mut buf = [0u8; 64];
        while let Ok(n) = self.wake_rx.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    }

    fn read_some(&mut self) -> io::Result<()> {
        self.input.resize(READ_CHUNK, 0);
        let r = self.stream.read(&mut self.input);
        let n = match r {
            Ok(n) => n,
            Err(e) => {
                self.input.clear();
                return match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
                    io::ErrorKind::ConnectionReset => {
                        self.read_eof = true;
                        Ok(())
                    }
                    _ => Err(e),
                };
            }
        };
        self.input.truncate(n);
        self.input_pos = 0;
        if n == 0 {
            self.read_eof = true;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut out = self.shared.lock();
        while !out.buf.is_empty() {
            let (front, _) = out.buf.as_slices();
            match (&self.stream).write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    out.buf.drain(..n);
                    out.written_total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Runs the after-reply actions whose reply is written (all of them when `all`).
    fn run_hooks(&mut self, all: bool) {
        if self.hooks.is_empty() {
            return;
        }
        let written = self.shared.lock().written_total;
        let mut i = 0;
        while i < self.hooks.len() {
            if all || self.hooks[i].0 <= written {
                let (_, hook) = self.hooks.remove(i);
                if catch_unwind(AssertUnwindSafe(hook)).is_err() {
                    tracing::error!("QMP after-reply action panicked");
                }
            } else {
                i += 1;
            }
        }
    }

    fn process_input(&mut self) {
        {
            let out = self.shared.lock();
            if out.closing || self.close_after_flush {
                self.input_pos = self.input.len();
                return;
            }
            // A request is started only while the backlog is below the mark.
            if out.buf.len() >= self.inner.limits.pause_input_at {
                return;
            }
        }
        while self.input_pos < self.input.len() {
            let step = self.framer.step(self.input[self.input_pos]);
            if step.consumed {
                self.input_pos += 1;
            }
            let Some(event) = step.event else { continue };
            self.handle_event(event);
            let out = self.shared.lock();
            if out.closing || self.close_after_flush {
                self.input_pos = self.input.len();
                return;
            }
            if out.buf.len() >= self.inner.limits.pause_input_at {
                return;
            }
        }
    }

    fn reply(&mut self, handled: Handled) {
        let bytes = wire::reply(&handled.result, handled.id.as_ref());
        let pos = self.shared.push_reply(&bytes);
        if handled.negotiated {
            self.negotiated = true;
            self.shared.negotiated.store(true, Ordering::Release);
        }
        self.hooks
            .extend(handled.hooks.into_iter().map(|hook| (pos, hook)));
    }

    fn handle_event(&mut self, event: FrameEvent) {
        let handled = match event {
            FrameEvent::Message(bytes) => {
                request::handle(&self.inner, self.shared.id, self.negotiated, &bytes)
            }
            FrameEvent::Error(desc) => Handled::err(QmpError::generic(desc), None),
            FrameEvent::TooDeep => {
                Handled::err(QmpError::generic("JSON nesting depth limit exceeded"), None)
            }
            FrameEvent::TooLarge => {
                let limit = self.inner.limits.max_message_bytes;
                tracing::warn!(
                    "QMP client {}: message larger than {limit} bytes, closing the connection",
                    self.shared.id
                );
                self.close_after_flush = true;
                Handled::err(
                    QmpError::generic(format!(
                        "JSON message size limit exceeded ({limit} bytes), closing the connection"
                    )),
                    None,
                )
            }
        };
        self.reply(handled);
    }
}
