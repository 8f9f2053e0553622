//! The daemon's listeners: the local unix socket (its file mode decides who may manage VMs),
//! TLS for peer daemons and remote clients (`--listen-tls`: mutual authentication, a client
//! certificate signed by the daemon's CA is required), and, off by default, plain TCP
//! (`--listen-tcp`, **insecure**: no authentication, no encryption).

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tern_tls::authz::Authz;
use tern_tls::peer_dn::subject_dn;
use tern_tls::x509::describe;
use virt::protocol::{read_frame, write_frame, Call, FrameError, Request, ServerMessage};

use crate::daemon::Daemon;
use crate::dispatch::dispatch;

static CONN: AtomicU64 = AtomicU64::new(0);

/// Binds the unix socket with `mode`.
pub fn listen_unix(path: &Path, mode: u32) -> Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {:o} {}", mode, path.display()))?;
    Ok(l)
}

pub fn serve_unix(d: Arc<Daemon>, l: UnixListener) -> Result<()> {
    std::thread::Builder::new()
        .name("accept-unix".into())
        .spawn(move || {
            for s in l.incoming() {
                match s {
                    Ok(s) => spawn_conn(d.clone(), s, None),
                    Err(e) => tracing::warn!("accept (unix): {e}"),
                }
            }
        })?;
    Ok(())
}

fn accept_remote(s: TcpStream) -> std::io::Result<TcpStream> {
    s.set_nodelay(true)?;
    Ok(s)
}

/// How long a TLS client may take to complete its handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the remote API over TLS: each accepted connection handshakes on its own thread
/// (a slow or hostile client never blocks the accept loop), and only an authenticated client
/// reaches the RPC dispatcher.
/// `allowed`: libvirt's `tls_allowed_dn_list` (`--tls-allowed-dn`): a client whose
/// certificate's subject DN no rule allows gets one `AccessDenied` reply and is closed.
pub fn serve_tls(
    d: Arc<Daemon>,
    l: TcpListener,
    config: Arc<rustls::ServerConfig>,
    allowed: Option<Authz>,
) -> Result<()> {
    let allowed = Arc::new(allowed);
    std::thread::Builder::new()
        .name("accept-tls".into())
        .spawn(move || {
            for s in l.incoming() {
                match s.and_then(accept_remote) {
                    Ok(s) => {
                        let n = CONN.fetch_add(1, Ordering::Relaxed);
                        let (d, config, allowed) = (d.clone(), config.clone(), allowed.clone());
                        let r = std::thread::Builder::new()
                            .name(format!("client-tls-{n}"))
                            .spawn(move || {
                                let peer = s
                                    .peer_addr()
                                    .map(|a| a.to_string())
                                    .unwrap_or_else(|_| "?".into());
                                let local = s.local_addr().ok().map(|a| a.ip());
                                match tls_handshake(s, config) {
                                    Ok(tls) => {
                                        let Some(tls) =
                                            admit(tls, allowed.as_ref().as_ref(), &peer)
                                        else {
                                            return;
                                        };
                                        if let Err(e) = handle(&d, tls, local) {
                                            tracing::debug!("client tls-{n}: {e}");
                                        }
                                    }
                                    Err(e) => tracing::warn!("TLS client {peer} refused: {e}"),
                                }
                            });
                        if let Err(e) = r {
                            tracing::error!("spawning a client thread: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("accept (tls): {e}"),
                }
            }
        })?;
    Ok(())
}

type TlsConn = rustls::StreamOwned<rustls::ServerConnection, TcpStream>;

/// Checks the client's certificate DN against `allowed`; a refused client gets its first
/// request answered with `AccessDenied` (naming its DN) and the connection closed.
fn admit(mut tls: TlsConn, allowed: Option<&Authz>, peer: &str) -> Option<TlsConn> {
    let Some(allowed) = allowed else {
        return Some(tls);
    };
    let dn = match tls.conn.peer_certificates().and_then(|c| c.first()) {
        Some(cert) => subject_dn(cert.as_ref()).map_err(|e| e.to_string()),
        None => Err("no client certificate".to_string()),
    };
    let why = match dn {
        Ok(dn) if allowed.allows(&dn) => {
            tracing::debug!("TLS client {peer}: {dn} allowed");
            return Some(tls);
        }
        Ok(dn) => format!(
            "the client certificate's DN '{dn}' is not in this daemon's --tls-allowed-dn list"
        ),
        Err(e) => format!("the client certificate's DN cannot be read: {e}"),
    };
    tracing::warn!("TLS client {peer} refused: {why}");
    // A refused client that never sends does not keep this thread.
    let _ = tls.sock.set_read_timeout(Some(TLS_HANDSHAKE_TIMEOUT));
    if let Ok(req) = read_frame::<Request>(&mut tls) {
        let result = Err(virt::Error::AccessDenied(why));
        let _ = write_frame(&mut tls, &ServerMessage::Reply { id: req.id, result });
    }
    tls.conn.send_close_notify();
    let _ = tls.flush();
    None
}

fn tls_handshake(mut s: TcpStream, config: Arc<rustls::ServerConfig>) -> Result<TlsConn, String> {
    let mut conn = rustls::ServerConnection::new(config).map_err(|e| describe(&e))?;
    let _ = s.set_read_timeout(Some(TLS_HANDSHAKE_TIMEOUT));
    let _ = s.set_write_timeout(Some(TLS_HANDSHAKE_TIMEOUT));
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut s) {
            return Err(
                match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    Some(r) => describe(r),
                    None => e.to_string(),
                },
            );
        }
    }
    let _ = s.set_read_timeout(None);
    let _ = s.set_write_timeout(None);
    Ok(rustls::StreamOwned::new(conn, s))
}

pub fn serve_tcp(d: Arc<Daemon>, l: TcpListener) -> Result<()> {
    std::thread::Builder::new()
        .name("accept-tcp".into())
        .spawn(move || {
            for s in l.incoming() {
                match s.and_then(accept_remote) {
                    Ok(s) => {
                        let local = s.local_addr().ok().map(|a| a.ip());
                        spawn_conn(d.clone(), s, local);
                    }
                    Err(e) => tracing::warn!("accept (tcp): {e}"),
                }
            }
        })?;
    Ok(())
}

trait Conn: Read + Write + Send + 'static {}
impl Conn for UnixStream {}
impl Conn for TcpStream {}
impl Conn for TlsConn {}

fn spawn_conn<S: Conn>(d: Arc<Daemon>, s: S, local_ip: Option<IpAddr>) {
    let n = CONN.fetch_add(1, Ordering::Relaxed);
    let r = std::thread::Builder::new()
        .name(format!("client-{n}"))
        .spawn(move || {
            if let Err(e) = handle(&d, s, local_ip) {
                tracing::debug!("client {n}: {e}");
            }
        });
    if let Err(e) = r {
        tracing::error!("spawning a client thread: {e}");
    }
}

fn handle<S: Conn>(d: &Arc<Daemon>, mut s: S, local_ip: Option<IpAddr>) -> Result<(), FrameError> {
    loop {
        let req: Request = match read_frame(&mut s) {
            Ok(r) => r,
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => return Err(e),
        };
        if let Call::EventRegister { domain } = &req.call {
            let rx = d.events.subscribe(domain.clone());
            write_frame(
                &mut s,
                &ServerMessage::Reply {
                    id: req.id,
                    result: Ok(virt::protocol::Reply::Unit),
                },
            )?;
            // The connection now carries only events, until the client goes away.
            while let Ok(ev) = rx.recv() {
                write_frame(&mut s, &ServerMessage::Event(ev))?;
            }
            return Ok(());
        }
        if let Call::MigrateTunnel { domain } = &req.call {
            return tunnel(d, s, req.id, domain);
        }
        let result = dispatch(d, req.call, local_ip);
        write_frame(&mut s, &ServerMessage::Reply { id: req.id, result })?;
    }
}

/// A tunnelled migration's stream (`Call::MigrateTunnel`): after the reply, every byte from
/// the peer goes to the prepared incoming VMM's socket until the peer closes (or the VMM
/// does: then the peer's writes fail and its source VMM's migration fails, and resumes).
fn tunnel<S: Conn>(d: &Arc<Daemon>, mut s: S, id: u64, domain: &str) -> Result<(), FrameError> {
    let mut vmm = match crate::migration::dest::open_tunnel(d, domain) {
        Ok(v) => v,
        Err(e) => {
            write_frame(&mut s, &ServerMessage::Reply { id, result: Err(e) })?;
            return Ok(());
        }
    };
    let result = Ok(virt::protocol::Reply::Unit);
    write_frame(&mut s, &ServerMessage::Reply { id, result })?;
    let r = std::io::copy(&mut s, &mut vmm);
    let _ = vmm.shutdown(std::net::Shutdown::Write);
    match r {
        Ok(n) => tracing::info!("{domain}: tunnel closed after {n} bytes"),
        Err(e) => tracing::warn!("{domain}: tunnel: {e}"),
    }
    Ok(())
}
