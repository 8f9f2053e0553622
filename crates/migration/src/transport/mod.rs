//! Transports: QEMU's URI syntax (`tcp:HOST:PORT`, `unix:PATH`, `file:PATH[,offset=N]`),
//! connect (source), listen/accept (destination), the return-path channel (the reverse direction
//! of the same socket), and [`CancelToken`], which unblocks a connect/accept/read/write stuck in
//! the kernel from any thread by `shutdown(2)` on a duplicate of the socket's fd.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};

use crate::liveness::{self, Direction};

// TLS lives in its own crate (shared with the management layer's remote API, decision 39);
// re-exported under the names the engine uses.
pub use tern_tls::{authz, peer_dn, session as tls, verify as tls_verify, x509 as tls_config};
pub mod tls_stream;

pub use tls_stream::TlsStream;

/// Unsent bytes a connecting (source) TCP socket may hold (`TCP_NOTSENT_LOWAT`): what the
/// source writes waits in its socket until the link takes it, and what waits there at the stop
/// goes out inside the downtime, ahead of the final copy. Without a bound the forced 8 MiB
/// buffer (16 MiB as the kernel counts it) held ~130 ms of pre-copy data at 1 Gbit/s: 404 and
/// 466 ms downtime against a 300 ms limit (decision 242). 1 MiB is 8 ms at 1 Gbit/s; bytes in
/// flight are not limited by it, so a long fat link keeps its window.
pub const NOTSENT_LOWAT_BYTES: usize = 1 << 20;

/// Socket buffer size requested for migration sockets (best effort: `SO_*BUFFORCE` needs
/// CAP_NET_ADMIN; without it the kernel's autotuning is kept, which beats a clamped fixed size).
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The URI does not parse.
    #[error("invalid migration URI '{uri}': {reason}")]
    BadUri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Host name resolution failed.
    #[error("cannot resolve '{host}:{port}'")]
    Resolve {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An OS call failed.
    #[error("{op} {target}")]
    Io {
        /// What was done ("connect to", "bind", "accept on", "open").
        op: &'static str,
        /// The address or path.
        target: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The operation was cancelled through the [`CancelToken`].
    #[error("cancelled")]
    Cancelled,
}

/// A migration address in QEMU's syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// `tcp:HOST:PORT` (`tcp:[::1]:PORT` for IPv6). Port 0 on the destination = any free port.
    Tcp {
        /// Host name or address (without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// `unix:PATH`.
    Unix {
        /// Socket path.
        path: PathBuf,
    },
    /// `file:PATH[,offset=N]`: a non-live migration to or from a file (no return path).
    File {
        /// File path.
        path: PathBuf,
        /// Byte offset where the stream starts (QEMU `offset=`; decimal or 0x hex).
        offset: u64,
    },
}

impl MigrationUri {
    /// Whether the transport has a reverse direction (sockets do, files do not).
    pub fn has_return_path(&self) -> bool {
        !matches!(self, Self::File { .. })
    }

    /// Whether this is a `file:` URI (non-live migration).
    pub fn is_file(&self) -> bool {
        matches!(self, Self::File { .. })
    }

    /// The QMP `socket-address` entry for this address, when it is a socket, as QEMU reports a
    /// listening address: `{"type":"inet","host":…,"port":"…","ipv4":true}` (`"ipv6":true` for
    /// an IPv6 address; neither for a host name) / `{"type":"unix","path":…}`.
    pub fn socket_address_json(&self) -> Option<serde_json::Value> {
        match self {
            Self::Tcp { host, port } => {
                let mut a = serde_json::json!({
                    "type": "inet", "host": host, "port": port.to_string()
                });
                match host.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V4(_)) => a["ipv4"] = true.into(),
                    Ok(std::net::IpAddr::V6(_)) => a["ipv6"] = true.into(),
                    Err(_) => {}
                }
                Some(a)
            }
            Self::Unix { path } => Some(serde_json::json!({
                "type": "unix", "path": path.to_string_lossy()
            })),
            Self::File { .. } => None,
        }
    }
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Self::Unix { path } => write!(f, "unix:{}", path.display()),
            Self::File { path, offset: 0 } => write!(f, "file:{}", path.display()),
            Self::File { path, offset } => write!(f, "file:{},offset={offset}", path.display()),
        }
    }
}

impl FromStr for MigrationUri {
    type Err = TransportError;

    fn from_str(uri: &str) -> Result<Self, TransportError> {
        let bad = |reason: &str| TransportError::BadUri {
            uri: uri.to_owned(),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = uri
            .split_once(':')
            .ok_or_else(|| bad("expected tcp:HOST:PORT, unix:PATH or file:PATH"))?;
        match scheme {
            "tcp" => {
                if rest.contains(',') {
                    return Err(bad("tcp options (',...') are not supported"));
                }
                let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
                    let (host, after) = v6
                        .split_once(']')
                        .ok_or_else(|| bad("missing ']' after an IPv6 address"))?;
                    let port = after
                        .strip_prefix(':')
                        .ok_or_else(|| bad("missing ':PORT' after the IPv6 address"))?;
                    (host, port)
                } else {
                    rest.rsplit_once(':')
                        .ok_or_else(|| bad("missing ':PORT' (tcp:HOST:PORT)"))?
                };
                if host.is_empty() {
                    return Err(bad("empty host"));
                }
                let port = port
                    .parse::<u16>()
                    .map_err(|_| bad(&format!("port '{port}' is not a number in 0..=65535")))?;
                Ok(Self::Tcp {
                    host: host.to_owned(),
                    port,
                })
            }
            "unix" => {
                if rest.is_empty() {
                    return Err(bad("empty socket path"));
                }
                Ok(Self::Unix { path: rest.into() })
            }
            "file" => {
                let (path, opts) = match rest.split_once(',') {
                    Some((p, o)) => (p, Some(o)),
                    None => (rest, None),
                };
                if path.is_empty() {
                    return Err(bad("empty file path"));
                }
                let mut offset = 0;
                if let Some(opts) = opts {
                    for opt in opts.split(',') {
                        let v = opt
                            .strip_prefix("offset=")
                            .ok_or_else(|| bad(&format!("unknown file option '{opt}'")))?;
                        offset = parse_u64(v)
                            .ok_or_else(|| bad(&format!("offset '{v}' is not a number")))?;
                    }
                }
                Ok(Self::File {
                    path: path.into(),
                    offset,
                })
            }
            "exec" | "fd" | "rdma" | "vsock" => Err(bad(&format!(
                "the '{scheme}' transport is not supported (tcp, unix, file)"
            ))),
            _ => Err(bad(&format!(
                "unknown transport '{scheme}' (tcp, unix, file)"
            ))),
        }
    }
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Unblocks transport calls from another thread. Every socket the engine opens is registered
/// here (as a duplicated fd); [`CancelToken::cancel`] shuts them all down, so a blocked
/// `connect`, `accept`, `read` or `write` returns with an error at once. Sockets registered
/// after the cancel are shut down on registration.
#[derive(Clone, Default)]
pub struct CancelToken {
    inner: Arc<CancelInner>,
}

#[derive(Default)]
struct CancelInner {
    cancelled: AtomicBool,
    fds: Mutex<Vec<OwnedFd>>,
}

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CancelToken")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl CancelToken {
    /// A fresh token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether [`CancelToken::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancelled.load(Ordering::SeqCst)
    }

    /// Shuts down every registered socket (idempotent).
    pub fn cancel(&self) {
        self.inner.cancelled.store(true, Ordering::SeqCst);
        let fds = self.inner.fds.lock().unwrap_or_else(|p| p.into_inner());
        for fd in fds.iter() {
            shutdown(fd.as_fd());
        }
    }

    /// Makes the token usable again for the next connection of the same migration (post-copy
    /// recovery): forgets the sockets registered so far (their duplicates are closed) and
    /// clears the cancelled state. The caller re-checks its own cancel flag afterwards, so a
    /// cancel that raced the reset is not lost.
    pub fn reset(&self) {
        let mut fds = self.inner.fds.lock().unwrap_or_else(|p| p.into_inner());
        fds.clear();
        self.inner.cancelled.store(false, Ordering::SeqCst);
    }

    /// Registers a socket (a duplicate of its fd is kept, so the original may be moved or
    /// closed freely). Files need no registration: their I/O does not block indefinitely.
    pub fn register(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let dup = fd.try_clone_to_owned()?;
        let mut fds = self.inner.fds.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_cancelled() {
            shutdown(dup.as_fd());
        }
        fds.push(dup);
        Ok(())
    }

    fn check(&self) -> Result<(), TransportError> {
        if self.is_cancelled() {
            Err(TransportError::Cancelled)
        } else {
            Ok(())
        }
    }
}

fn shutdown(fd: BorrowedFd<'_>) {
    // Errors (ENOTCONN on a socket that never connected) do not matter: whatever blocks on it
    // returns either way.
    let _ = SockRef::from(&fd).shutdown(std::net::Shutdown::Both);
}

/// One end of a migration channel.
#[derive(Debug)]
pub enum Stream {
    /// TCP socket.
    Tcp(TcpStream),
    /// Unix stream socket.
    Unix(UnixStream),
    /// A file (no return path).
    File(File),
    /// A TLS session over a `Tcp` or `Unix` socket ([`tls_stream::client`] /
    /// [`tls_stream::server`]).
    Tls(TlsStream),
}

impl Stream {
    /// Another handle on the same channel, for the return path (`None` for files).
    pub fn try_clone_for_return_path(&self) -> io::Result<Option<Stream>> {
        Ok(match self {
            Self::Tcp(s) => Some(Self::Tcp(s.try_clone()?)),
            Self::Unix(s) => Some(Self::Unix(s.try_clone()?)),
            Self::File(_) => None,
            Self::Tls(s) => Some(Self::Tls(s.clone())),
        })
    }

    /// The socket or file itself: under TLS, the socket the session runs on (for socket
    /// options); otherwise `self`.
    pub fn plain(&self) -> &Stream {
        match self {
            Self::Tls(t) => t.socket(),
            other => other,
        }
    }

    /// Whether the channel has a reverse direction.
    pub fn has_return_path(&self) -> bool {
        !matches!(self, Self::File(_))
    }

    /// Half-closes the sending direction (the peer reads EOF), best effort.
    pub fn shutdown_write(&self) {
        // Errors (not connected any more) do not matter: the peer sees EOF either way.
        let _ = match self {
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Self::File(_) => Ok(()),
            Self::Tls(t) => {
                t.close_notify();
                t.socket().shutdown_write();
                Ok(())
            }
        };
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Unix(s) => s.as_fd(),
            Self::File(s) => s.as_fd(),
            Self::Tls(t) => t.socket().as_fd(),
        }
    }
}

/// Reads and writes report a liveness timeout (`SO_RCVTIMEO`, `SO_SNDTIMEO`, `ETIMEDOUT`) as an
/// `io::Error` carrying a [`crate::liveness::Inactivity`].
impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
            Self::File(s) => s.read(buf),
            // The socket under the session classified its own errors already.
            Self::Tls(s) => return s.read(buf),
        };
        r.map_err(|e| liveness::classify(&*self, e, Direction::Receive))
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
            Self::File(s) => s.write(buf),
            Self::Tls(s) => return s.write(buf),
        };
        r.map_err(|e| liveness::classify(&*self, e, Direction::Send))
    }

    /// `writev` on a socket (multifd's sender writes a batch from several buffers at once).
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let r = match self {
            Self::Tcp(s) => s.write_vectored(bufs),
            Self::Unix(s) => s.write_vectored(bufs),
            Self::File(s) => s.write_vectored(bufs),
            Self::Tls(s) => return s.write_vectored(bufs),
        };
        r.map_err(|e| liveness::classify(&*self, e, Direction::Send))
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Unix(s) => s.flush(),
            Self::File(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

/// Source side: opens the channel to `uri` (a `file:` is created/truncated and positioned at its
/// offset). The socket is registered with `cancel` before connecting.
pub fn connect(uri: &MigrationUri, cancel: &CancelToken) -> Result<Stream, TransportError> {
    cancel.check()?;
    let target = uri.to_string();
    let io = |op, source| TransportError::Io {
        op,
        target: target.clone(),
        source,
    };
    let stream = match uri {
        MigrationUri::Tcp { host, port } => {
            let addrs: Vec<SocketAddr> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|source| TransportError::Resolve {
                    host: host.clone(),
                    port: *port,
                    source,
                })?
                .collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            let mut connected = None;
            for addr in addrs {
                cancel.check()?;
                match tcp_connect(&addr, cancel) {
                    Ok(s) => {
                        connected = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            cancel.check()?;
            let s = connected.ok_or_else(|| io("connect to", last))?;
            s.set_nodelay(true)
                .map_err(|e| io("set TCP_NODELAY on", e))?;
            set_notsent_lowat(s.as_fd());
            Stream::Tcp(s)
        }
        MigrationUri::Unix { path } => {
            let s = unix_connect(path, cancel).map_err(|e| io("connect to", e))?;
            cancel.check()?;
            Stream::Unix(s)
        }
        MigrationUri::File { path, offset } => {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(*offset == 0)
                .open(path)
                .map_err(|e| io("create", e))?;
            if *offset > 0 {
                f.set_len(*offset).map_err(|e| io("truncate", e))?;
                f.seek(SeekFrom::Start(*offset))
                    .map_err(|e| io("seek in", e))?;
            }
            Stream::File(f)
        }
    };
    cancel.check()?;
    set_buffers(&stream);
    Ok(stream)
}

/// How often a `unix:` connect to a listener with a full backlog is retried.
const UNIX_CONNECT_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

/// Connects to a unix socket so that `migrate_cancel` can interrupt it. A blocking `connect(2)`
/// to a listener whose backlog is full sleeps in the kernel, and unlike TCP a `shutdown(2)` does
/// not wake it; a non-blocking connect returns `EAGAIN` instead, so retry until it goes through
/// or the migration is cancelled.
fn unix_connect(path: &std::path::Path, cancel: &CancelToken) -> io::Result<UnixStream> {
    let addr = SockAddr::unix(path)?;
    loop {
        // socket2 creates every socket close-on-exec.
        let sock = Socket::new(Domain::UNIX, Type::STREAM.nonblocking(), None)?;
        match sock.connect(&addr) {
            Ok(()) => {
                sock.set_nonblocking(false)?;
                let s = UnixStream::from(sock);
                cancel.register(s.as_fd())?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if cancel.is_cancelled() {
                    return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
                }
                std::thread::sleep(UNIX_CONNECT_RETRY);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A TCP connect that `cancel` can interrupt: the socket exists (and is registered) before
/// `connect(2)` blocks, so the cancel's `shutdown(2)` makes it return.
fn tcp_connect(addr: &SocketAddr, cancel: &CancelToken) -> io::Result<TcpStream> {
    // socket2 creates every socket close-on-exec.
    let sock = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    cancel.register(sock.as_fd())?;
    set_buffer_opts(sock.as_fd());
    let to = SockAddr::from(*addr);
    loop {
        match sock.connect(&to) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if cancel.is_cancelled() {
        return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
    }
    Ok(TcpStream::from(sock))
}

fn set_buffers(stream: &Stream) {
    if matches!(stream, Stream::Tcp(_) | Stream::Unix(_)) {
        set_buffer_opts(stream.as_fd());
    }
}

/// `SO_SNDBUFFORCE` / `SO_RCVBUFFORCE` = [`SOCKET_BUFFER_BYTES`], best effort. socket2 has only
/// the plain `SO_*BUF` options, which are clamped to `net.core.[rw]mem_max` and switch the
/// kernel's autotuning off: worse than leaving the buffers alone.
fn set_buffer_opts(fd: BorrowedFd<'_>) {
    let size = SOCKET_BUFFER_BYTES as libc::c_int;
    for opt in [libc::SO_SNDBUFFORCE, libc::SO_RCVBUFFORCE] {
        // SAFETY: setsockopt with a pointer to a live c_int and its exact size. Failure (EPERM
        // without CAP_NET_ADMIN) leaves the kernel's autotuned buffers, which is fine.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// [`NOTSENT_LOWAT_BYTES`] on a source's TCP socket, best effort (a kernel without the option
/// keeps the whole buffer: slower to drain at the stop, nothing else).
fn set_notsent_lowat(fd: BorrowedFd<'_>) {
    let lowat = NOTSENT_LOWAT_BYTES as libc::c_int;
    // SAFETY: setsockopt with a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            &lowat as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(
            "TCP_NOTSENT_LOWAT: {}: the socket keeps its whole buffer",
            io::Error::last_os_error()
        );
    }
}

/// Destination side: a bound listener (or an opened file) waiting for the source.
#[derive(Debug)]
pub enum Listener {
    /// Listening TCP socket.
    Tcp(TcpListener),
    /// Listening unix socket (the path is removed when the listener is dropped).
    Unix(UnixListener, PathBuf),
    /// A stream file to read.
    File(File, PathBuf, u64),
}

impl Listener {
    /// Binds `uri` (QMP `migrate-incoming`). `tcp:HOST:0` picks a free port:
    /// [`Listener::local_uri`] reports it. A stale unix socket file is replaced; a `file:` must
    /// exist.
    pub fn bind(uri: &MigrationUri) -> Result<Self, TransportError> {
        let target = uri.to_string();
        let io = |op, source| TransportError::Io {
            op,
            target: target.clone(),
            source,
        };
        match uri {
            MigrationUri::Tcp { host, port } => {
                let l = TcpListener::bind((host.as_str(), *port)).map_err(|e| io("bind", e))?;
                Ok(Self::Tcp(l))
            }
            MigrationUri::Unix { path } => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if meta.file_type().is_socket() {
                        std::fs::remove_file(path).map_err(|e| io("remove stale socket", e))?;
                    }
                }
                let l = UnixListener::bind(path).map_err(|e| io("bind", e))?;
                Ok(Self::Unix(l, path.clone()))
            }
            MigrationUri::File { path, offset } => {
                let mut f = File::open(path).map_err(|e| io("open", e))?;
                f.seek(SeekFrom::Start(*offset))
                    .map_err(|e| io("seek in", e))?;
                Ok(Self::File(f, path.clone(), *offset))
            }
        }
    }

    /// The address actually bound (the real port for `tcp:…:0`).
    pub fn local_uri(&self) -> MigrationUri {
        match self {
            Self::Tcp(l) => match l.local_addr() {
                Ok(a) => MigrationUri::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                },
                Err(_) => MigrationUri::Tcp {
                    host: String::new(),
                    port: 0,
                },
            },
            Self::Unix(_, p) => MigrationUri::Unix { path: p.clone() },
            Self::File(_, p, offset) => MigrationUri::File {
                path: p.clone(),
                offset: *offset,
            },
        }
    }

    /// Waits for the source (one connection, like QEMU). `cancel` interrupts the wait.
    pub fn accept(self, cancel: &CancelToken) -> Result<Stream, TransportError> {
        self.accept_next(cancel)
    }

    /// Waits for the next connection and keeps listening (the post-copy preempt channel
    /// and every multifd channel connect to the same listener as the main channel). `cancel` interrupts the wait.
    pub fn accept_next(&self, cancel: &CancelToken) -> Result<Stream, TransportError> {
        cancel.check()?;
        let target = self.local_uri().to_string();
        let io = |op, source| TransportError::Io {
            op,
            target: target.clone(),
            source,
        };
        let stream = match self {
            Self::Tcp(l) => {
                cancel.register(l.as_fd()).map_err(|e| io("register", e))?;
                let (s, _) = l.accept().map_err(|e| {
                    if cancel.is_cancelled() {
                        TransportError::Cancelled
                    } else {
                        io("accept on", e)
                    }
                })?;
                s.set_nodelay(true)
                    .map_err(|e| io("set TCP_NODELAY on", e))?;
                Stream::Tcp(s)
            }
            Self::Unix(l, _) => {
                cancel.register(l.as_fd()).map_err(|e| io("register", e))?;
                let (s, _) = l.accept().map_err(|e| {
                    if cancel.is_cancelled() {
                        TransportError::Cancelled
                    } else {
                        io("accept on", e)
                    }
                })?;
                Stream::Unix(s)
            }
            Self::File(f, _, _) => {
                return f.try_clone().map(Stream::File).map_err(|e| io("reopen", e))
            }
        };
        cancel
            .register(stream.as_fd())
            .map_err(|e| io("register", e))?;
        cancel.check()?;
        set_buffers(&stream);
        Ok(stream)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, path) = self {
            // Best effort: the socket file is ours; a failure leaves a stale file that the next
            // bind replaces.
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod socket_tests;
