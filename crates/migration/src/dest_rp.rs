//! The destination's return path: its writer (shared with switchover-ack approvals and the
//! post-copy fault thread), switchover-ack bookkeeping, the keepalive, and the linger after a
//! failure. Split out of `dest.rs`.

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::{Receiver, LINGER};
use crate::liveness::Ticker;
use crate::stats::{MigrationStats, SwitchoverAckStats};
use crate::transport::Stream;
use crate::wire::RpMessage;

/// The return-path writer, shared with approval callbacks on other threads.
pub(super) type RpWriter = Arc<Mutex<Option<Stream>>>;

pub(super) fn send_rp(rp: &RpWriter, msg: &RpMessage) -> Result<(), std::io::Error> {
    let mut g = rp.lock().unwrap_or_else(|p| p.into_inner());
    match g.as_mut() {
        Some(s) => {
            s.write_all(&msg.encode())?;
            s.flush()?;
            // Nothing follows SHUT (stream format §8): later sends, e.g. keepalives, are no-ops.
            if matches!(msg, RpMessage::Shut { .. }) {
                *g = None;
            }
            Ok(())
        }
        None => Ok(()),
    }
}

/// Switchover-ack bookkeeping (QEMU `switchover_ack_pending_num`).
pub(super) struct AckState {
    pub(super) inner: Mutex<AckInner>,
    pub(super) rp: RpWriter,
    pub(super) stats: MigrationStats,
}

pub(super) struct AckInner {
    pub(super) enabled: bool,
    pub(super) needed: usize,
    pub(super) approved: usize,
    pub(super) rp_open: bool,
    pub(super) sent: bool,
}

impl AckState {
    fn lock(&self) -> MutexGuard<'_, AckInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn approve(&self) -> Result<(), String> {
        let mut g = self.lock();
        if g.approved >= g.needed {
            return Err(format!(
                "switchover approved more often than the {} loader(s) that asked for it",
                g.needed
            ));
        }
        g.approved += 1;
        self.maybe_send(&mut g)
    }

    pub(super) fn rp_opened(&self) -> Result<(), String> {
        let mut g = self.lock();
        g.rp_open = true;
        self.maybe_send(&mut g)
    }

    fn maybe_send(&self, g: &mut AckInner) -> Result<(), String> {
        if g.enabled && g.rp_open && !g.sent && g.approved >= g.needed {
            g.sent = true;
            tracing::debug!("sending SWITCHOVER_ACK");
            self.stats.set_switchover_ack(SwitchoverAckStats {
                enabled: true,
                acked: true,
                waited: Default::default(),
            });
            send_rp(&self.rp, &RpMessage::SwitchoverAck)
                .map_err(|e| format!("sending SWITCHOVER_ACK: {e}"))?;
        }
        Ok(())
    }
}

impl Receiver {
    /// The `mig-dst-ka` thread (stopped when dropped): repeats the latest `PONG` on the return
    /// path every keepalive period, so that the source sees this side alive while the receiver
    /// is busy (a device loading for a long time) and its own `PING` waits in the stream. A
    /// repeated `PONG` tells the source nothing new about what was loaded. Without the thread
    /// (it could not start) the migration goes on; only that patience is lost.
    pub(super) fn start_keepalive(&self, stream: &Stream) -> Option<Ticker> {
        if !stream.has_return_path() {
            return None;
        }
        let (rp, last) = (self.rp.clone(), self.last_pong.clone());
        let tick = move || {
            let seq = last.load(Ordering::SeqCst);
            if seq != 0 {
                // Best effort: a return path that broke fails the migration elsewhere.
                let _ = send_rp(&rp, &RpMessage::Pong { seq });
            }
        };
        match Ticker::spawn("mig-dst-ka", self.opts.liveness.keepalive_period(), tick) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the return-path keepalive thread");
                None
            }
        }
    }

    /// After `ERROR` + `SHUT{1}`: half-closes the return path and reads (and drops) the
    /// source's stream until the source closes its end, at most [`LINGER`]. Closing a socket
    /// with unread data sends a reset, which can destroy the `ERROR` before the source read it
    /// (and the glue may exit the process right after this, `exit-on-error`). Only when the
    /// source opened the return path: it closes as soon as it reads `SHUT{1}`; a source without
    /// one would go on sending instead of noticing the failure.
    pub(super) fn linger(&mut self) {
        if !self.rp_open || self.shared.io.is_cancelled() {
            return;
        }
        let Some(mut s) = self.rp.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        s.shutdown_write();
        let deadline = Instant::now() + LINGER;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::debug!("the source did not close within {LINGER:?}");
                return;
            }
            let timeout = match s.plain() {
                Stream::Tcp(t) => t.set_read_timeout(Some(left)),
                Stream::Unix(u) => u.set_read_timeout(Some(left)),
                Stream::File(_) | Stream::Tls(_) => return,
            };
            if timeout.is_err() {
                return;
            }
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}
