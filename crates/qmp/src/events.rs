//! Per-client output queues and the event fan-out.

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::Value;

use crate::wire;

/// Output state of one client, shared between its thread and event emitters.
pub(crate) struct Output {
    pub buf: VecDeque<u8>,
    /// Bytes ever queued / written: positions used to run after-reply hooks.
    pub queued_total: u64,
    pub written_total: u64,
    /// An event did not fit: the client is being dropped.
    pub overflowed: bool,
    /// The server is shutting down: flush and close.
    pub closing: bool,
}

pub(crate) struct ClientShared {
    pub id: u64,
    pub negotiated: AtomicBool,
    out: Mutex<Output>,
    /// Write end of the client thread's wake-up socket pair (non-blocking).
    wake: UnixStream,
    /// Most bytes an emitter may leave pending for this client.
    max_pending: usize,
}

impl ClientShared {
    pub(crate) fn new(id: u64, wake: UnixStream, max_pending: usize) -> ClientShared {
        ClientShared {
            id,
            negotiated: AtomicBool::new(false),
            out: Mutex::new(Output {
                buf: VecDeque::new(),
                queued_total: 0,
                written_total: 0,
                overflowed: false,
                closing: false,
            }),
            wake,
            max_pending,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Output> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the client thread; never blocks (a full wake pipe already means "wake up").
    pub(crate) fn wake(&self) {
        let _ = (&self.wake).write(&[1]);
    }

    /// Queues a reply from the client's own thread (not subject to the overflow limit: the
    /// client thread stops reading requests while its output is backed up).
    /// Returns the stream position after the reply.
    pub(crate) fn push_reply(&self, bytes: &[u8]) -> u64 {
        let mut out = self.lock();
        out.buf.extend(bytes);
        out.queued_total += bytes.len() as u64;
        out.queued_total
    }

    fn push_event(&self, bytes: &[u8]) {
        let mut out = self.lock();
        if out.overflowed || out.closing {
            return;
        }
        if out.buf.len() + bytes.len() > self.max_pending {
            out.overflowed = true;
            let pending = out.buf.len();
            drop(out);
            tracing::warn!(
                "dropping QMP client {}: it does not read its events ({pending} bytes pending)",
                self.id
            );
        } else {
            out.buf.extend(bytes);
            out.queued_total += bytes.len() as u64;
            drop(out);
        }
        self.wake();
    }

    pub(crate) fn set_closing(&self) {
        self.lock().closing = true;
        self.wake();
    }
}

/// Emits QMP events to every connected client that finished capabilities negotiation.
///
/// Cheap to clone; clones share the set of clients. Emitting never blocks on a client: each
/// client has a bounded output queue, and a client whose queue would overflow is disconnected
/// (with a warning in the log).
#[derive(Clone, Default)]
pub struct EventSink {
    clients: Arc<Mutex<Vec<Arc<ClientShared>>>>,
}

impl EventSink {
    /// A sink with no clients yet; hand it to [`crate::ServerConfig`].
    pub fn new() -> EventSink {
        EventSink::default()
    }

    fn list(&self) -> MutexGuard<'_, Vec<Arc<ClientShared>>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `{"timestamp": {...}, "event": name, "data": data}` to every negotiated client.
    /// The timestamp is `CLOCK_REALTIME` (seconds + microseconds), as QEMU does.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let line = wire::event(name, data.as_ref());
        tracing::debug!("QMP event {name}");
        for client in self.list().iter() {
            if client.negotiated.load(Ordering::Acquire) {
                client.push_event(&line);
            }
        }
    }

    /// Number of connected clients (negotiated or not).
    pub fn client_count(&self) -> usize {
        self.list().len()
    }

    pub(crate) fn register(&self, client: Arc<ClientShared>) {
        self.list().push(client);
    }

    pub(crate) fn unregister(&self, id: u64) {
        self.list().retain(|c| c.id != id);
    }
}
