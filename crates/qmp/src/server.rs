//! The QMP server: accept thread, one thread per client, negotiation and dispatch.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::args::{no_args, parse_args};
use crate::error::{QmpError, ServerError};
use crate::events::{ClientShared, EventSink};
use crate::framer::{FrameEvent, Framer};
use crate::wire::{self, QemuVersion};

/// Implemented by the VMM: executes commands.
///
/// Called on the client's own thread (`qmp-client-N`); commands of one client run one at a
/// time, in order, while other clients are served by their own threads. A command should not
/// block for long: the client gets no events while its command runs, and
/// [`QmpServer::shutdown`] waits for running commands.
pub trait Dispatcher: Send + Sync {
    /// Names of the commands [`Dispatcher::dispatch`] accepts. The server answers
    /// `qmp_capabilities` and `query-commands` itself and replies `CommandNotFound` for any
    /// other name not listed here.
    fn commands(&self) -> Vec<&'static str>;

    /// Executes `command`. `args` is the request's `arguments` object (empty if absent); use
    /// [`crate::parse_args`] to get a typed struct with QEMU-like errors. The returned value is
    /// sent as `{"return": value}` (QEMU returns `{}` for commands without a result).
    fn dispatch(
        &self,
        ctx: &ClientCtx,
        command: &str,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError>;
}

/// An action to run once a command's reply has been written to its client.
pub type AfterReply = Box<dyn FnOnce() + Send>;

/// Per-command context handed to [`Dispatcher::dispatch`].
pub struct ClientCtx {
    id: u64,
    events: EventSink,
    after_reply: RefCell<Vec<AfterReply>>,
}

impl ClientCtx {
    /// The connection's number (the `N` in the thread name `qmp-client-N`).
    pub fn client_id(&self) -> u64 {
        self.id
    }

    /// The server's event sink.
    pub fn events(&self) -> &EventSink {
        &self.events
    }

    /// Registers `f` to run on this client's thread after the reply to the current command has
    /// been written to the socket, or has failed to be written because the client went away.
    /// This is how `quit` is built: reply `{}`, then (in `f`) tell the main thread to emit
    /// `SHUTDOWN`, call [`QmpServer::shutdown`] and exit.
    pub fn after_reply(&self, f: impl FnOnce() + Send + 'static) {
        self.after_reply.borrow_mut().push(Box::new(f));
    }
}

/// Resource limits of the server. The defaults suit a control socket.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest JSON message accepted, in bytes. A bigger one gets an error reply and the
    /// connection is closed.
    pub max_message_bytes: usize,
    /// Deepest nesting of arrays/objects accepted (at most 120: `serde_json`'s own limit is 128).
    pub max_depth: usize,
    /// Most output (replies + events) that may wait for one client. An event that does not fit
    /// disconnects the client.
    pub max_pending_output: usize,
    /// Output backlog at which a client's further requests wait, unread, until it drains below
    /// this again (at least 1 byte).
    pub pause_input_at: usize,
    /// Connections served at once; further ones are closed at once.
    pub max_clients: usize,
    /// How long [`QmpServer::shutdown`] (and closing after an oversized message) waits for a
    /// client to take its pending output.
    pub flush_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_message_bytes: 1 << 20,
            max_depth: 100,
            max_pending_output: 4 << 20,
            pause_input_at: 256 << 10,
            max_clients: 64,
            flush_timeout: Duration::from_secs(2),
        }
    }
}

/// What the server announces and how it behaves.
#[derive(Clone)]
pub struct ServerConfig {
    /// QEMU version announced in the greeting (tools check it for feature detection).
    pub version: QemuVersion,
    /// The greeting's `package` string.
    pub package: String,
    /// Where events come from; keep a clone to emit.
    pub events: EventSink,
    /// Resource limits.
    pub limits: Limits,
}

impl ServerConfig {
    /// A configuration with a fresh [`EventSink`] and default limits.
    pub fn new(version: QemuVersion, package: impl Into<String>) -> ServerConfig {
        ServerConfig {
            version,
            package: package.into(),
            events: EventSink::new(),
            limits: Limits::default(),
        }
    }
}

const READ_CHUNK: usize = 64 << 10;

struct Inner {
    dispatcher: Arc<dyn Dispatcher>,
    greeting: Vec<u8>,
    events: EventSink,
    limits: Limits,
    stopping: AtomicBool,
    clients: Mutex<Vec<ClientEntry>>,
    next_id: AtomicU64,
}

struct ClientEntry {
    shared: Arc<ClientShared>,
    thread: Option<JoinHandle<()>>,
}

impl Inner {
    fn clients(&self) -> MutexGuard<'_, Vec<ClientEntry>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A QMP server listening on a unix socket.
pub struct QmpServer {
    inner: Arc<Inner>,
    path: PathBuf,
    /// (dev, ino) of the socket file we created, so shutdown removes only our own.
    socket_id: Option<(u64, u64)>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

fn io_err(path: &Path, source: io::Error) -> ServerError {
    ServerError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl QmpServer {
    /// Binds `path` (a stale socket file left by a dead process is replaced; a live one is an
    /// error) and starts the `qmp-accept` thread.
    pub fn bind(
        path: impl AsRef<Path>,
        dispatcher: Arc<dyn Dispatcher>,
        config: ServerConfig,
    ) -> Result<QmpServer, ServerError> {
        let path = path.as_ref().to_path_buf();
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if meta.file_type().is_socket() {
                if UnixStream::connect(&path).is_ok() {
                    return Err(ServerError::AddrInUse(path.display().to_string()));
                }
                std::fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
            }
        }
        let listener = UnixListener::bind(&path).map_err(|e| io_err(&path, e))?;
        let socket_id = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        let mut limits = config.limits;
        limits.max_depth = limits.max_depth.clamp(1, 120);
        limits.pause_input_at = limits.pause_input_at.max(1);
        let inner = Arc::new(Inner {
            dispatcher,
            greeting: wire::greeting(config.version, &config.package),
            events: config.events,
            limits,
            stopping: AtomicBool::new(false),
            clients: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
        });
        let accept_inner = Arc::clone(&inner);
        let accept = thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || accept_loop(&accept_inner, listener))
            .map_err(|e| io_err(&path, e))?;
        tracing::info!("QMP server listening on {}", path.display());
        Ok(QmpServer {
            inner,
            path,
            socket_id,
            accept: Mutex::new(Some(accept)),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A clone of the server's event sink.
    pub fn events(&self) -> EventSink {
        self.inner.events.clone()
    }

    /// Number of connected clients.
    pub fn client_count(&self) -> usize {
        self.inner.clients().len()
    }

    /// Stops accepting, flushes pending replies and events to every client (waiting at most
    /// [`Limits::flush_timeout`] for a client that does not read), closes the connections, joins
    /// the server's threads and removes the socket file. Waits for commands that are running.
    /// Idempotent; may be called from any thread, including from an [`AfterReply`] action (the
    /// calling client thread is then not joined but exits right after).
    pub fn shutdown(&self) {
        if self.inner.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        let accept = self.accept.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = accept {
            // Wake the blocking accept() with a connection of our own.
            match UnixStream::connect(&self.path) {
                Ok(_) => {
                    if handle.join().is_err() {
                        tracing::error!("qmp-accept thread panicked");
                    }
                }
                Err(e) => tracing::warn!(
                    "cannot wake qmp-accept through {}: {e}; leaving it behind",
                    self.path.display()
                ),
            }
        }
        let entries: Vec<ClientEntry> = std::mem::take(&mut *self.inner.clients());
        for entry in &entries {
            entry.shared.set_closing();
        }
        let me = thread::current().id();
        for entry in entries {
            if let Some(handle) = entry.thread {
                if handle.thread().id() != me && handle.join().is_err() {
                    tracing::error!("QMP client thread {} panicked", entry.shared.id);
                }
            }
        }
        if let (Some(id), Ok(meta)) = (self.socket_id, std::fs::metadata(&self.path)) {
            if (meta.dev(), meta.ino()) == id {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!("cannot remove {}: {e}", self.path.display());
                }
            }
        }
        tracing::info!("QMP server on {} shut down", self.path.display());
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(inner: &Arc<Inner>, listener: UnixListener) {
    loop {
        let conn = listener.accept();
        if inner.stopping.load(Ordering::Acquire) {
            return;
        }
        match conn {
            Ok((stream, _)) => spawn_client(inner, stream),
            Err(e) => {
                tracing::warn!("QMP accept failed: {e}");
                // Out of descriptors and the like: do not spin.
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn spawn_client(inner: &Arc<Inner>, stream: UnixStream) {
    let mut clients = inner.clients();
    if clients.len() >= inner.limits.max_clients {
        tracing::warn!(
            "QMP: refusing a connection, {} clients already connected",
            clients.len()
        );
        return;
    }
    let (wake_tx, wake_rx) = match UnixStream::pair() {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!("QMP: cannot create a wake-up socket: {e}");
            return;
        }
    };
    for s in [&stream, &wake_tx, &wake_rx] {
        if let Err(e) = s.set_nonblocking(true) {
            tracing::warn!("QMP: cannot make a socket non-blocking: {e}");
            return;
        }
    }
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let shared = Arc::new(ClientShared::new(
        id,
        wake_tx,
        inner.limits.max_pending_output,
    ));
    let conn = Conn {
        inner: Arc::clone(inner),
        shared: Arc::clone(&shared),
        stream,
        wake_rx,
        framer: Framer::new(inner.limits.max_message_bytes, inner.limits.max_depth),
        input: Vec::with_capacity(READ_CHUNK),
        input_pos: 0,
        read_eof: false,
        close_after_flush: false,
        deadline: None,
        hooks: Vec::new(),
        negotiated: false,
    };
    // The list stays locked until the entry is in, so the thread's own removal comes after.
    match thread::Builder::new()
        .name(format!("qmp-client-{id}"))
        .spawn(move || conn.run())
    {
        Ok(handle) => {
            inner.events.register(Arc::clone(&shared));
            clients.push(ClientEntry {
                shared,
                thread: Some(handle),
            });
            tracing::debug!("QMP client {id} connected");
        }
        Err(e) => tracing::warn!("QMP: cannot spawn a client thread: {e}"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CapabilitiesArgs {
    #[serde(default)]
    enable: Vec<Capability>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Capability {
    Oob,
}

/// Result of one request: the reply and what to do after it.
struct Handled {
    result: Result<Value, QmpError>,
    id: Option<Value>,
    negotiated: bool,
    hooks: Vec<AfterReply>,
}

impl Handled {
    fn err(e: QmpError, id: Option<Value>) -> Handled {
        Handled {
            result: Err(e),
            id,
            negotiated: false,
            hooks: Vec::new(),
        }
    }
}

struct Conn {
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
    fn run(mut self) {
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
            FrameEvent::Message(bytes) => self.handle_message(&bytes),
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

    fn handle_message(&mut self, bytes: &[u8]) -> Handled {
        let value: Value = match serde_json::from_slice(bytes) {
            Ok(v) => v,
            Err(e) => {
                return Handled::err(QmpError::generic(format!("JSON parse error, {e}")), None)
            }
        };
        let Value::Object(mut request) = value else {
            return Handled::err(QmpError::generic("QMP input must be a JSON object"), None);
        };
        let id = request.remove("id");
        let mut command = None;
        let mut args = Map::new();
        for (key, member) in request {
            match (key.as_str(), member) {
                ("execute", Value::String(name)) => command = Some(name),
                ("execute", _) => {
                    return Handled::err(
                        QmpError::generic("QMP input member 'execute' must be a string"),
                        id,
                    )
                }
                ("arguments", Value::Object(map)) => args = map,
                ("arguments", _) => {
                    return Handled::err(
                        QmpError::generic("QMP input member 'arguments' must be an object"),
                        id,
                    )
                }
                (other, _) => {
                    return Handled::err(
                        QmpError::generic(format!("QMP input member '{other}' is unexpected")),
                        id,
                    )
                }
            }
        }
        let Some(command) = command else {
            return Handled::err(QmpError::generic("QMP input lacks member 'execute'"), id);
        };
        if !self.negotiated {
            if command != "qmp_capabilities" {
                return Handled::err(
                    QmpError::command_not_found(
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                    ),
                    id,
                );
            }
            let result = negotiate(args);
            return Handled {
                negotiated: result.is_ok(),
                result,
                id,
                hooks: Vec::new(),
            };
        }
        let result = match command.as_str() {
            "qmp_capabilities" => Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            )),
            "query-commands" => no_args(&args).map(|()| self.query_commands()),
            name => return self.dispatch(name, args, id),
        };
        Handled {
            result,
            id,
            negotiated: false,
            hooks: Vec::new(),
        }
    }

    fn query_commands(&self) -> Value {
        let mut names = vec!["qmp_capabilities", "query-commands"];
        for name in self.inner.dispatcher.commands() {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        Value::Array(
            names
                .into_iter()
                .map(|n| serde_json::json!({ "name": n }))
                .collect(),
        )
    }

    fn dispatch(&mut self, name: &str, args: Map<String, Value>, id: Option<Value>) -> Handled {
        let dispatcher = Arc::clone(&self.inner.dispatcher);
        if !dispatcher.commands().contains(&name) {
            return Handled::err(
                QmpError::command_not_found(format!("The command {name} has not been found")),
                id,
            );
        }
        let ctx = ClientCtx {
            id: self.shared.id,
            events: self.inner.events.clone(),
            after_reply: RefCell::new(Vec::new()),
        };
        let result = catch_unwind(AssertUnwindSafe(|| dispatcher.dispatch(&ctx, name, args)))
            .unwrap_or_else(|_| {
                tracing::error!("QMP command {name} panicked");
                Err(QmpError::generic(format!(
                    "internal error: command {name} failed"
                )))
            });
        Handled {
            result,
            id,
            negotiated: false,
            hooks: ctx.after_reply.into_inner(),
        }
    }
}

fn negotiate(args: Map<String, Value>) -> Result<Value, QmpError> {
    let caps: CapabilitiesArgs = parse_args(args)?;
    if let Some(Capability::Oob) = caps.enable.first() {
        return Err(QmpError::generic("Capability oob not available"));
    }
    Ok(Value::Object(Map::new()))
}
