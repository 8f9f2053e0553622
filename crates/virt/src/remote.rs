//! The client side of the RPC protocol (libvirt's remote driver): one blocking connection,
//! requests answered in order.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tern_tls::x509::{describe, TlsEndpoint, X509Creds};

use crate::protocol::{read_frame, write_frame, Call, FrameError, Reply, Request, ServerMessage};
use crate::uri::{self, Target};
use crate::{DomainEvent, Error, Result};

/// How long connecting to a TCP daemon may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

trait Transport: Read + Write + Send {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
    fn shutdown(&self);
    fn handle(&self) -> std::io::Result<Box<dyn Transport>>;
}

impl Transport for UnixStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn handle(&self) -> std::io::Result<Box<dyn Transport>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl Transport for TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn shutdown(&self) {
        let _ = TcpStream::shutdown(self, std::net::Shutdown::Both);
    }
    fn handle(&self) -> std::io::Result<Box<dyn Transport>> {
        Ok(Box::new(self.try_clone()?))
    }
}

fn connect_tcp(host: &str, port: u16) -> std::result::Result<TcpStream, String> {
    let addrs: Vec<_> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("resolving {host}: {e}"))?
        .collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(format!("{a}: {e}")),
        }
    }
    Err(last.unwrap_or_else(|| format!("{host}: no address")))
}

/// A `tern+tls` connection: rustls over the TCP stream (reads and writes on the owning
/// thread), the raw socket kept for timeouts and for closing from another thread.
struct TlsClient {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl TlsClient {
    /// The client configuration from the certificates in `pki`.
    fn config(pki: &Path) -> std::result::Result<Arc<rustls::ClientConfig>, String> {
        let creds = X509Creds {
            dir: pki.to_path_buf(),
            endpoint: TlsEndpoint::Client,
            verify_peer: true,
        };
        creds.client_config().map_err(|e| e.to_string())
    }

    /// Handshakes (at most [`CONNECT_TIMEOUT`]) and checks that the daemon's certificate
    /// names `host`.
    fn connect(
        tcp: TcpStream,
        host: &str,
        config: Arc<rustls::ClientConfig>,
    ) -> std::result::Result<Self, String> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| format!("'{host}' is not a valid TLS server name: {e}"))?;
        let mut conn = rustls::ClientConnection::new(config, name)
            .map_err(|e| format!("TLS: {}", describe(&e)))?;
        let mut tcp = tcp;
        let _ = tcp.set_read_timeout(Some(CONNECT_TIMEOUT));
        let _ = tcp.set_write_timeout(Some(CONNECT_TIMEOUT));
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)
                .map_err(|e| tls_io_error(&e, host))?;
        }
        let _ = tcp.set_read_timeout(None);
        let _ = tcp.set_write_timeout(None);
        Ok(TlsClient {
            tls: rustls::StreamOwned::new(conn, tcp),
        })
    }
}

/// A handshake failure in words: rustls' own error when it is one, else the socket's.
fn tls_io_error(e: &std::io::Error, host: &str) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(r) => format!("TLS handshake with {host}: {}", describe(r)),
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => format!(
            "TLS handshake with {host}: the daemon closed the connection (is it serving TLS on this port, and does it accept our certificate?)"
        ),
        None => format!("TLS handshake with {host}: {e}"),
    }
}

/// A TLS 1.3 server checks the client's certificate after the client's handshake is done: its
/// verdict arrives as an alert on the first read, worded here as [`describe`] words it.
fn tls_words(e: std::io::Error) -> std::io::Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(r) => std::io::Error::new(e.kind(), format!("TLS: {}", describe(r))),
        None => e,
    }
}

impl Read for TlsClient {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.tls.read(buf).map_err(tls_words)
    }
}

impl Write for TlsClient {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tls.write(buf).map_err(tls_words)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.tls.flush().map_err(tls_words)
    }
}

impl Transport for TlsClient {
    fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.tls.sock.set_read_timeout(t)
    }
    fn shutdown(&self) {
        let _ = self.tls.sock.shutdown(std::net::Shutdown::Both);
    }
    fn handle(&self) -> std::io::Result<Box<dyn Transport>> {
        // Only ever used to close the connection: the raw socket does that.
        Ok(Box::new(self.tls.sock.try_clone()?))
    }
}

/// A connection to a `ternd` (`virConnectPtr`).
pub struct Connection {
    uri: String,
    stream: Box<dyn Transport>,
    next_id: u64,
}

impl Connection {
    /// Opens `uri` (see [`crate::uri`]).
    pub fn open(uri: &str) -> Result<Connection> {
        let connect_err = |message: String| Error::Connect {
            uri: uri.to_string(),
            message,
        };
        let stream: Box<dyn Transport> = match uri::parse(uri)? {
            Target::Unix(path) => {
                let s = UnixStream::connect(&path).map_err(|e| {
                    let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                        " (permission denied: the socket's mode and group decide who may manage VMs)"
                    } else {
                        ""
                    };
                    connect_err(format!("{}: {e}{hint}", path.display()))
                })?;
                Box::new(s)
            }
            Target::Tcp { host, port } => Box::new(connect_tcp(&host, port).map_err(connect_err)?),
            Target::Tls { host, port, pki } => {
                // The certificates first: a local mistake is named before any network wait.
                let config = TlsClient::config(&pki).map_err(connect_err)?;
                let tcp = connect_tcp(&host, port).map_err(connect_err)?;
                Box::new(TlsClient::connect(tcp, &host, config).map_err(connect_err)?)
            }
        };
        Ok(Connection {
            uri: uri.to_string(),
            stream,
            next_id: 0,
        })
    }

    /// The URI this connection was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// How long a reply may take (`None`: for ever; the default).
    pub fn set_timeout(&mut self, t: Option<Duration>) -> Result<()> {
        self.stream.set_read_timeout(t).map_err(|e| Error::Rpc {
            message: format!("{}: {e}", self.uri),
            sent: false,
        })
    }

    /// Calls one procedure and waits for its reply.
    pub fn call(&mut self, call: Call) -> Result<Reply> {
        self.next_id += 1;
        let id = self.next_id;
        let uri = self.uri.clone();
        write_frame(&mut self.stream, &Request { id, call }).map_err(|e| Error::Rpc {
            message: format!("sending to {uri}: {e}"),
            sent: false,
        })?;
        loop {
            let msg: ServerMessage = read_frame(&mut self.stream).map_err(|e| Error::Rpc {
                message: match e {
                    FrameError::Closed => format!("{uri}: the daemon closed the connection"),
                    e => format!("reading from {uri}: {e}"),
                },
                sent: true,
            })?;
            match msg {
                ServerMessage::Reply { id: rid, result } if rid == id => return result,
                ServerMessage::Reply { .. } | ServerMessage::Event(_) => continue,
            }
        }
    }

    /// Turns this connection into an event stream.
    pub fn events(mut self, domain: Option<String>) -> Result<EventStream> {
        self.call(Call::EventRegister { domain })?;
        Ok(EventStream { conn: self })
    }

    /// Closes the connection now (a blocked call elsewhere returns).
    pub fn shutdown(&self) {
        self.stream.shutdown();
    }

    /// Turns this connection into a raw migration tunnel into `domain`'s prepared incoming
    /// VMM on the peer (`Call::MigrateTunnel`): after the reply, bytes written to the
    /// [`RawStream`] reach the VMM unchanged.
    pub fn into_tunnel(mut self, domain: &str) -> Result<RawStream> {
        self.call(Call::MigrateTunnel {
            domain: domain.to_string(),
        })?;
        self.stream.set_read_timeout(None).map_err(|e| Error::Rpc {
            message: format!("{}: {e}", self.uri),
            sent: true,
        })?;
        Ok(RawStream { t: self.stream })
    }

    /// A handle that closes this connection from another thread (aborting a blocked call).
    pub fn shutdown_handle(&self) -> Result<ShutdownHandle> {
        let t = self.stream.handle().map_err(|e| Error::Rpc {
            message: format!("{}: {e}", self.uri),
            sent: false,
        })?;
        Ok(ShutdownHandle { t })
    }
}

/// A connection that left the RPC protocol: a byte pipe (a tunnelled migration stream).
pub struct RawStream {
    t: Box<dyn Transport>,
}

impl RawStream {
    /// Closes the connection (both directions).
    pub fn shutdown(&self) {
        self.t.shutdown();
    }

    /// A handle that closes this stream from another thread.
    pub fn shutdown_handle(&self) -> std::io::Result<ShutdownHandle> {
        Ok(ShutdownHandle {
            t: self.t.handle()?,
        })
    }
}

impl Read for RawStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.t.read(buf)
    }
}

impl Write for RawStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.t.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.t.flush()
    }
}

/// Closes a [`Connection`] from another thread.
pub struct ShutdownHandle {
    t: Box<dyn Transport>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.t.shutdown();
    }
}

/// Events from a daemon (`virConnectDomainEventRegisterAny`).
pub struct EventStream {
    conn: Connection,
}

impl EventStream {
    /// The next event; `Ok(None)` when `timeout` passed first.
    pub fn next(&mut self, timeout: Option<Duration>) -> Result<Option<DomainEvent>> {
        self.conn.set_timeout(timeout)?;
        loop {
            match read_frame::<ServerMessage>(&mut self.conn.stream) {
                Ok(ServerMessage::Event(e)) => return Ok(Some(e)),
                Ok(ServerMessage::Reply { .. }) => continue,
                Err(FrameError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => {
                    return Err(Error::Rpc {
                        message: format!("{}: {e}", self.conn.uri),
                        sent: true,
                    })
                }
            }
        }
    }
}
