//! The QMP server: the [`Dispatcher`] a VMM implements, limits and configuration, the accept
//! thread and one thread per client (`crate::conn`).

use std::cell::RefCell;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::builtins::BUILTIN_COMMANDS;
use crate::conn::Conn;
use crate::error::{QmpError, ServerError};
use crate::events::{ClientShared, EventSink};
use crate::introspect;
use crate::schema::{type_name_clashes, Command, Event};
use crate::wire::{self, QemuVersion};

/// Implemented by the VMM: executes commands.
///
/// Called on the client's own thread (`qmp-client-N`); commands of one client run one at a
/// time, in order, while other clients are served by their own threads. A command should not
/// block for long: the client gets no events while its command runs, and
/// [`QmpServer::shutdown`] waits for running commands.
pub trait Dispatcher: Send + Sync {
    /// The commands [`Dispatcher::dispatch`] accepts, with their arguments and reply types
    /// (read once, when the server starts). The server answers `qmp_capabilities`,
    /// `query-commands` and `query-qmp-schema` itself, replies `CommandNotFound` for any other
    /// name not listed here, and checks `arguments` against [`Command::args`] before dispatching
    /// (QEMU's texts: missing, unexpected, wrongly typed members, bad enum values). Both
    /// `query-commands` and `query-qmp-schema` are generated from this list.
    fn commands(&self) -> Vec<&'static Command>;

    /// The events the VMM emits, as `query-qmp-schema` lists them.
    fn events(&self) -> Vec<&'static Event> {
        Vec::new()
    }

    /// Executes `command`. `args` is the request's `arguments` object (empty if absent), already
    /// checked against the command's [`Command::args`]; use [`crate::parse_args`] to get a typed
    /// struct. The returned value is sent as `{"return": value}` (QEMU returns `{}` for commands
    /// without a result).
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
    pub(crate) id: u64,
    pub(crate) events: EventSink,
    pub(crate) after_reply: RefCell<Vec<AfterReply>>,
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

/// State shared by the accept thread and the client threads.
pub(crate) struct Inner {
    pub dispatcher: Arc<dyn Dispatcher>,
    /// The server's own commands, then the dispatcher's (a name listed twice counts once).
    pub commands: Vec<&'static Command>,
    event_specs: Vec<&'static Event>,
    schema: OnceLock<Value>,
    pub greeting: Vec<u8>,
    pub events: EventSink,
    pub limits: Limits,
    stopping: AtomicBool,
    clients: Mutex<Vec<ClientEntry>>,
    next_id: AtomicU64,
}

pub(crate) struct ClientEntry {
    pub shared: Arc<ClientShared>,
    thread: Option<JoinHandle<()>>,
}

impl Inner {
    pub(crate) fn clients(&self) -> MutexGuard<'_, Vec<ClientEntry>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `query-qmp-schema` reply (generated on first use; the tables are static).
    pub(crate) fn schema(&self) -> &Value {
        self.schema
            .get_or_init(|| introspect::schema_info(&self.commands, &self.event_specs))
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
    /// error) and starts the `qmp-accept` thread. Fails without binding if the dispatcher's
    /// tables give one type name to two different types.
    pub fn bind(
        path: impl AsRef<Path>,
        dispatcher: Arc<dyn Dispatcher>,
        config: ServerConfig,
    ) -> Result<QmpServer, ServerError> {
        let mut commands: Vec<&'static Command> = BUILTIN_COMMANDS.to_vec();
        for c in dispatcher.commands() {
            if !commands.iter().any(|known| known.name == c.name) {
                commands.push(c);
            }
        }
        let event_specs = dispatcher.events();
        let clashes = type_name_clashes(&commands, &event_specs);
        if !clashes.is_empty() {
            return Err(ServerError::SchemaClash(clashes));
        }
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
            commands,
            event_specs,
            schema: OnceLock::new(),
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
    let conn = Conn::new(Arc::clone(inner), Arc::clone(&shared), stream, wake_rx);
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
