//! The daemon's listeners: the local unix socket (its file mode decides who may manage VMs)
//! and, off by default, plain TCP for peer daemons and remote clients (**insecure**: no
//! authentication, no encryption; TLS comes with issue 10 through [`accept_remote`]).

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
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

/// The seam for TLS (issue 10): today every accepted TCP connection is used as it is.
fn accept_remote(s: TcpStream) -> std::io::Result<TcpStream> {
    s.set_nodelay(true)?;
    Ok(s)
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
