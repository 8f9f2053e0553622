//! Tunnelled migration, source side (`VIR_MIGRATE_TUNNELLED`): the source VMM migrates into
//! a unix socket this daemon listens on, and a pump thread carries the stream over a second
//! connection to the destination daemon (`Call::MigrateTunnel`), which feeds it into its
//! incoming VMM. One way only: a tunnel has no return path (libvirt's rule), so neither
//! `return-path` nor `switchover-ack` is negotiated on.
//!
//! Failure: the pump ends when either side closes. A destination that goes away makes the
//! pump's writes fail, the pump closes the VMM's socket, and the source VMM's migration fails
//! (it resumes by itself: before END the source decides). [`SourceTunnel::close`] tears the
//! tunnel down when Perform fails for any other reason.

use std::io::ErrorKind;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virt::{Connection, Error, Result, ShutdownHandle};

/// How long the source VMM may take to connect after `migrate`.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the pump looks for the VMM's connection while waiting.
const ACCEPT_POLL: Duration = Duration::from_millis(2);

/// An open tunnel: where the VMM sends its stream, and the pump behind it.
pub struct SourceTunnel {
    /// The `migrate` URI for the source VMM (`unix:PATH`).
    pub uri: String,
    path: PathBuf,
    peer: ShutdownHandle,
    stop: Arc<AtomicBool>,
    pump: Option<JoinHandle<()>>,
}

impl SourceTunnel {
    /// Listens on `dir/tunnel-out.sock`, opens the tunnel to `dest_uri`'s prepared incoming
    /// `domain`, and starts the pump (thread `tunnel-DOMAIN`).
    pub fn open(dir: &std::path::Path, dest_uri: &str, domain: &str) -> Result<SourceTunnel> {
        let path = dir.join("tunnel-out.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|e| {
            Error::OperationFailed(format!("tunnel: binding {}: {e}", path.display()))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::OperationFailed(format!("tunnel: {e}")))?;
        let peer = Connection::open(dest_uri)
            .map_err(|e| {
                Error::OperationFailed(format!("tunnel: cannot reach the destination daemon: {e}"))
            })?
            .into_tunnel(domain)
            .map_err(|e| {
                Error::OperationFailed(format!("tunnel: the destination refused it: {e}"))
            })?;
        let handle = peer
            .shutdown_handle()
            .map_err(|e| Error::OperationFailed(format!("tunnel: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let name = domain.to_string();
        let pump = std::thread::Builder::new()
            .name(format!("tunnel-{domain}"))
            .spawn(move || pump(listener, peer, &stop2, &name))
            .map_err(|e| Error::Internal(format!("spawning the tunnel pump: {e}")))?;
        Ok(SourceTunnel {
            uri: format!("unix:{}", path.display()),
            path,
            peer: handle,
            stop,
            pump: Some(pump),
        })
    }

    /// Tears the tunnel down (Perform failed or was aborted).
    pub fn close(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.peer.shutdown();
        self.join();
    }

    /// Waits for the pump to carry the rest of the stream (the VMM closed its end).
    pub fn finish(mut self) {
        self.join();
    }

    fn join(&mut self) {
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for SourceTunnel {
    fn drop(&mut self) {
        if self.pump.is_some() {
            self.stop.store(true, Ordering::Relaxed);
            self.peer.shutdown();
            self.join();
        }
    }
}

fn pump(listener: UnixListener, mut peer: virt::RawStream, stop: &AtomicBool, domain: &str) {
    let Some(mut vmm) = accept(&listener, stop) else {
        tracing::warn!("{domain}: tunnel: the source VMM never connected");
        peer.shutdown();
        return;
    };
    drop(listener);
    if let Err(e) = vmm.set_nonblocking(false) {
        tracing::warn!("{domain}: tunnel: {e}");
    }
    match std::io::copy(&mut vmm, &mut peer) {
        Ok(n) => tracing::info!("{domain}: tunnel carried {n} bytes"),
        Err(e) => tracing::warn!("{domain}: tunnel: {e}"),
    }
    // Closing both: the destination daemon sees the end of the stream, and a VMM still
    // writing (the destination went away) sees its socket closed.
    peer.shutdown();
    let _ = vmm.shutdown(std::net::Shutdown::Both);
}

fn accept(listener: &UnixListener, stop: &AtomicBool) -> Option<UnixStream> {
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match listener.accept() {
            Ok((s, _)) => return Some(s),
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                tracing::warn!("tunnel: accept: {e}");
                return None;
            }
        }
    }
    None
}
