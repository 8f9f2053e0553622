//! The client side of the RPC protocol (libvirt's remote driver): one blocking connection,
//! requests answered in order.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

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
            Target::Tcp { host, port } => {
                let addrs: Vec<_> = (host.as_str(), port)
                    .to_socket_addrs()
                    .map_err(|e| connect_err(format!("resolving {host}: {e}")))?
                    .collect();
                let mut last = None;
                let mut stream = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                        Ok(s) => {
                            stream = Some(s);
                            break;
                        }
                        Err(e) => last = Some(format!("{a}: {e}")),
                    }
                }
                let s = stream.ok_or_else(|| {
                    connect_err(last.unwrap_or_else(|| format!("{host}: no address")))
                })?;
                let _ = s.set_nodelay(true);
                Box::new(s)
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
