//! A migration channel under TLS: the handshakes (source = client, destination = server), the
//! destination's admission of the source (authentication, then `tls-authz`), and
//! [`TlsStream`], the established session behind [`Stream::Tls`] so that the engine reads and
//! writes it as any socket.
//!
//! **Admission** (decision 44). In TLS 1.3 a client finishes its handshake before the server
//! has looked at the client's certificate, so a source refused by the destination would learn
//! it only from a later read. The destination therefore answers every handshake with one
//! message over the session, before any migration byte: `0x00` (admitted) or `0x01` + a 16-bit
//! little-endian length + that many bytes of UTF-8 (the reason, at most [`MAX_REASON`] bytes),
//! then close_notify. The source waits for it in [`client`]: a refusal of its certificate
//! (TLS alert) or of its identity (`tls-authz`) fails the migration in `setup`, with the
//! destination's reason, while the guest still runs.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use super::authz::Authz;
use super::peer_dn::subject_dn;
use super::tls::{handshake, split, TlsIoError, TlsReader, TlsWriter};
use super::tls_config::{describe, TlsError};
use super::Stream;

/// Longest refusal reason the destination sends and the source reads.
pub const MAX_REASON: usize = 1024;
/// The admission byte of an accepted source.
const ADMITTED: u8 = 0;
/// The admission byte of a refused source.
const REFUSED: u8 = 1;
/// The first byte of a TLS handshake record (a ClientHello starts with it).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// Host name presented (SNI) when none is checked (`unix:` without `tls-hostname`).
const UNCHECKED_NAME: &str = "tern-migration.invalid";

/// The source's TLS setup for one migration.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl ClientTls {
    /// `config` from [`super::tls_config::X509Creds::client_config_checking`] (with
    /// `check_hostname` = `hostname.is_some()`); `hostname` is `tls-hostname`, else the
    /// URI's host (none for `unix:`).
    pub fn new(config: Arc<ClientConfig>, hostname: Option<&str>) -> Result<Self, TlsError> {
        let name = hostname.unwrap_or(UNCHECKED_NAME);
        let name = ServerName::try_from(name.to_owned()).map_err(|e| {
            TlsError::Session(format!(
                "'{name}' is not a valid host name or address for tls-hostname: {e}"
            ))
        })?;
        Ok(Self { config, name })
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("name", &self.name)
            .finish()
    }
}

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.name == other.name
    }
}

impl Eq for ClientTls {}

/// The destination's TLS setup: its configuration, and the authorization of the source's
/// identity (`tls-authz`: the object's id and its rules).
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    creds_id: String,
    authz: Option<(String, Authz)>,
}

impl ServerTls {
    /// `config` from [`super::tls_config::X509Creds::server_config`] of object `creds_id`.
    pub fn new(config: Arc<ServerConfig>, creds_id: &str, authz: Option<(String, Authz)>) -> Self {
        Self {
            config,
            creds_id: creds_id.to_owned(),
            authz,
        }
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("creds_id", &self.creds_id)
            .field("authz", &self.authz)
            .finish()
    }
}

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config)
            && self.creds_id == other.creds_id
            && self.authz == other.authz
    }
}

impl Eq for ServerTls {}

/// An established TLS session over a socket: two handles share it, one for each direction
/// (the stream and its return path, decision 42); cloning gives another handle.
#[derive(Clone)]
pub struct TlsStream {
    reader: Arc<Mutex<TlsReader<Stream>>>,
    writer: Arc<Mutex<TlsWriter<Stream>>>,
    socket: Arc<Stream>,
    peer: Option<String>,
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("socket", &self.socket)
            .field("peer", &self.peer)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TlsStream {
    fn new(conn: Connection, socket: Stream, peer: Option<String>) -> io::Result<Self> {
        let (r, w) = (clone_socket(&socket)?, clone_socket(&socket)?);
        let (reader, writer) = split(conn, r, w);
        Ok(Self {
            reader: Arc::new(Mutex::new(reader)),
            writer: Arc::new(Mutex::new(writer)),
            socket: Arc::new(socket),
            peer,
        })
    }

    /// The socket under the session (for its options and its fd).
    pub fn socket(&self) -> &Stream {
        &self.socket
    }

    /// The peer's identity: the client certificate's DN on the destination (none without
    /// `verify-peer`), none on the source.
    pub fn peer(&self) -> Option<&str> {
        self.peer.as_deref()
    }

    /// Sends close_notify unless a write is in progress (best effort, before a half-close).
    pub(super) fn close_notify(&self) {
        if let Ok(mut w) = self.writer.try_lock() {
            let _ = w.close();
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        lock(&self.reader).read(buf)
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.writer).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        lock(&self.writer).flush()
    }
}

fn clone_socket(s: &Stream) -> io::Result<Stream> {
    s.try_clone_for_return_path()?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "TLS needs a socket (tcp: or unix:), not a file",
        )
    })
}

/// Sets (or clears) both socket timeouts, for the handshake.
fn set_timeouts(s: &Stream, t: Option<Duration>) -> io::Result<()> {
    match s {
        Stream::Tcp(x) => {
            x.set_read_timeout(t)?;
            x.set_write_timeout(t)
        }
        Stream::Unix(x) => {
            x.set_read_timeout(t)?;
            x.set_write_timeout(t)
        }
        Stream::File(_) | Stream::Tls(_) => Ok(()),
    }
}

/// The text of a failed handshake read/write: rustls' own errors come described already.
fn io_text(e: &io::Error) -> String {
    if let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<TlsIoError>()) {
        return t.0.clone();
    }
    if let Some(i) = crate::liveness::Inactivity::of_io(e) {
        return format!("the handshake stalled ({i})");
    }
    e.to_string()
}

fn host_text(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(d) => d.as_ref().to_owned(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// After a failed handshake: half-closes and reads what the peer still sends (at most 1 s,
/// 1 MiB), so that closing does not reset the connection before the peer read the alert that
/// says why.
fn drain_briefly(sock: &mut Stream) {
    let _ = set_timeouts(sock, Some(Duration::from_secs(1)));
    sock.shutdown_write();
    let mut buf = [0u8; 16 << 10];
    for _ in 0..64 {
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// A socket that remembers the first bytes it read (to tell a plain peer from a TLS one, and
/// to show what a plain destination said).
struct Spy<'a> {
    sock: &'a mut Stream,
    head: Vec<u8>,
}

/// How much of a plain answer [`Spy`] keeps.
const SPY_BYTES: usize = 512;

impl Read for Spy<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.read(buf)?;
        let keep = n.min(SPY_BYTES.saturating_sub(self.head.len()));
        self.head.extend_from_slice(&buf[..keep]);
        Ok(n)
    }
}

/// The text of a plain destination's return-path `ERROR` (type 4, u16 length, UTF-8; stream
/// format §8), when that is what `head` holds.
fn plain_error_text(head: &[u8]) -> Option<String> {
    let (ty, rest) = head.split_at_checked(2)?;
    let (len, text) = rest.split_at_checked(2)?;
    if ty != [4, 0] {
        return None;
    }
    let len = usize::from(u16::from_le_bytes([len[0], len[1]]));
    Some(String::from_utf8_lossy(&text[..len.min(text.len())]).into_owned())
}

impl Write for Spy<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

/// Source side: the handshake on a connected socket, then the destination's admission.
/// `timeout` bounds each socket call of it (the liveness limit; `None` = unbounded, a
/// cancel still interrupts it).
pub fn client(
    mut sock: Stream,
    tls: &ClientTls,
    timeout: Option<Duration>,
) -> Result<Stream, TlsError> {
    let fail = |what: String| TlsError::Session(what);
    set_timeouts(&sock, timeout).map_err(|e| fail(format!("socket options: {e}")))?;
    let conn = ClientConnection::new(tls.config.clone(), tls.name.clone())
        .map_err(|e| fail(describe(&e)))?;
    let mut conn = Connection::Client(conn);
    let mut spy = Spy {
        sock: &mut sock,
        head: Vec::new(),
    };
    if let Err(e) = handshake(&mut conn, &mut spy) {
        drain_briefly(spy.sock);
        let name_mismatch = e
            .get_ref()
            .and_then(|i| i.downcast_ref::<TlsIoError>())
            .is_some_and(|t| {
                matches!(
                    t.1,
                    rustls::Error::InvalidCertificate(
                        rustls::CertificateError::NotValidForName
                            | rustls::CertificateError::NotValidForNameContext { .. }
                    )
                )
            });
        if name_mismatch {
            return Err(fail(format!(
                "the destination's certificate is not valid for host name '{}' (the URI's \
                 host, or tls-hostname when set)",
                host_text(&tls.name)
            )));
        }
        return Err(fail(match spy.head.first() {
            Some(b) if !(0x14..=0x17).contains(b) => {
                let said = plain_error_text(&spy.head)
                    .map(|t| format!(" (it said: {t})"))
                    .unwrap_or_default();
                format!(
                    "the destination answered without TLS: it is not set up for TLS \
                     (set tls-creds on the destination too, or clear it here){said}"
                )
            }
            None if e.kind() == io::ErrorKind::UnexpectedEof => {
                "the destination closed the connection during the TLS handshake".to_owned()
            }
            _ => io_text(&e),
        }));
    }
    let stream = TlsStream::new(conn, sock, None).map_err(|e| fail(e.to_string()))?;
    let mut s = Stream::Tls(stream);
    read_admission(&mut s)?;
    set_timeouts(s.plain(), None).map_err(|e| fail(format!("socket options: {e}")))?;
    Ok(s)
}

fn read_admission(s: &mut Stream) -> Result<(), TlsError> {
    let fail = |what: String| TlsError::Session(what);
    let mut byte = [0u8; 1];
    match s.read(&mut byte) {
        Ok(1) => {}
        Ok(_) => {
            return Err(fail(
                "the destination closed the connection after the TLS handshake without \
                 admitting this source"
                    .into(),
            ))
        }
        Err(e) => return Err(fail(io_text(&e))),
    }
    match byte[0] {
        ADMITTED => Ok(()),
        REFUSED => {
            let mut len = [0u8; 2];
            s.read_exact(&mut len)
                .map_err(|e| fail(format!("the destination refused this source ({e})")))?;
            let len = usize::from(u16::from_le_bytes(len)).min(MAX_REASON);
            let mut reason = vec![0u8; len];
            s.read_exact(&mut reason)
                .map_err(|e| fail(format!("the destination refused this source ({e})")))?;
            Err(fail(format!(
                "the destination refused this source: {}",
                String::from_utf8_lossy(&reason)
            )))
        }
        other => Err(fail(format!(
            "the destination sent {other:#04x} instead of its TLS admission: not a Tern TLS \
             destination"
        ))),
    }
}

/// How the destination's handshake failed.
#[derive(Debug)]
pub struct AcceptFailure {
    /// What went wrong, for `error-desc`.
    pub error: TlsError,
    /// The socket, when the source spoke plain (no TLS): the engine tells it why on its
    /// return path, in plain, as it would any failure before `OPEN_RETURN_PATH`.
    pub plain_peer: Option<Stream>,
}

/// Destination side: the handshake on an accepted socket, the source's identity against
/// `tls-authz`, and the admission message. Nothing of the migration stream is read before this
/// returns `Ok`. `timeout` as in [`client`].
pub fn server(
    mut sock: Stream,
    tls: &ServerTls,
    timeout: Option<Duration>,
) -> Result<Stream, AcceptFailure> {
    let fail = |what: String| AcceptFailure {
        error: TlsError::Session(what),
        plain_peer: None,
    };
    set_timeouts(&sock, timeout).map_err(|e| fail(format!("socket options: {e}")))?;
    let mut first = [0u8; 1];
    let n = loop {
        match sock.read(&mut first) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(fail(io_text(&e))),
            Ok(n) => break n,
        }
    };
    if n == 0 {
        return Err(fail(
            "the source closed the connection before the TLS handshake".into(),
        ));
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        let _ = set_timeouts(&sock, None);
        return Err(AcceptFailure {
            error: TlsError::Session(format!(
                "the source did not start a TLS handshake (it sent a plain migration stream), \
                 but this destination requires TLS (tls-creds '{}')",
                tls.creds_id
            )),
            plain_peer: Some(sock),
        });
    }
    let conn = ServerConnection::new(tls.config.clone()).map_err(|e| fail(describe(&e)))?;
    let mut conn = Connection::Server(conn);
    // The byte already read goes to rustls first.
    conn.read_tls(&mut &first[..])
        .map_err(|e| fail(e.to_string()))?;
    handshake(&mut conn, &mut sock).map_err(|e| {
        drain_briefly(&mut sock);
        fail(match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                "the source closed the connection during the TLS handshake: it refused this \
                 destination's certificate (a CA it does not trust, or not valid for the host \
                 name it expects: see the source's error)"
                    .to_owned()
            }
            _ => io_text(&e),
        })
    })?;
    let peer = match conn.peer_certificates().and_then(|c| c.first()) {
        Some(cert) => Some(subject_dn(cert).map_err(|e| fail(e.to_string()))?),
        None => None,
    };
    let verdict = match (&tls.authz, &peer) {
        (None, _) => Ok(()),
        (Some((id, authz)), Some(dn)) => authz.check(id, dn).map_err(|e| e.to_string()),
        (Some((id, _)), None) => Err(format!(
            "the source presented no certificate, so tls-authz '{id}' cannot authorize it \
             (verify-peer is off on tls-creds '{}')",
            tls.creds_id
        )),
    };
    let stream = TlsStream::new(conn, sock, peer).map_err(|e| fail(e.to_string()))?;
    let mut s = Stream::Tls(stream);
    let sent = match &verdict {
        Ok(()) => s.write_all(&[ADMITTED]).and_then(|()| s.flush()),
        Err(reason) => {
            let mut bytes = reason.as_bytes();
            bytes = &bytes[..bytes.len().min(MAX_REASON)];
            let mut msg = vec![REFUSED];
            msg.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
            msg.extend_from_slice(bytes);
            let r = s.write_all(&msg).and_then(|()| s.flush());
            if let Stream::Tls(t) = &s {
                t.close_notify();
            }
            r
        }
    };
    verdict.map_err(fail)?;
    sent.map_err(|e| fail(format!("sending the TLS admission: {}", io_text(&e))))?;
    set_timeouts(s.plain(), None).map_err(|e| fail(format!("socket options: {e}")))?;
    Ok(s)
}

#[cfg(test)]
#[path = "tls_stream_tests.rs"]
mod tests;
