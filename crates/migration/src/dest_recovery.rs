//! Post-copy recovery on the destination (`docs/postcopy.md` §4, stream format §13.6; QEMU's
//! `postcopy_pause_incoming`, `qmp_migrate_recover`, `loadvm_postcopy_handle_resume`).
//!
//! ```text
//!  postcopy-active ──channel breaks / migrate-pause──> postcopy-paused ──migrate-recover──>
//!  (listening) ──source connects──> postcopy-recover ──POSTCOPY_RESUME──> postcopy-active
//!        ^                                   │ (any failure)
//!        └───────────────────────────────────┘
//! ```
//!
//! While paused the pager keeps running: vCPUs block only on pages that are missing, their
//! requests are noted (`requested`) and sent again once the source is back. Nothing here ever
//! lets the guest run on a page it did not receive (decision 74): a source that never comes
//! back leaves the destination paused until `quit`.

use std::io::BufReader;
use std::sync::atomic::Ordering;

use super::rp::send_rp;
use super::{DestError, DestHandle, Receiver, READ_BUFFER};
use crate::liveness;
use crate::stats::error_chain;
use crate::status::MigrationStatus;
use crate::transport::{tls_stream, Listener, TransportError};
use crate::wire::{Command, Record, RpMessage, StreamReader, WireError, RP_MAX_BITMAP_BYTES};

/// QEMU's `qmp_migrate_recover` text.
pub const RECOVER_NOT_PAUSED: &str = "Migrate recover can only be run when postcopy is paused.";
/// QEMU's `qmp_migrate_pause` text.
pub const PAUSE_NOT_POSTCOPY: &str =
    "migrate-pause is currently only supported during postcopy-active or postcopy-recover state";

impl DestHandle {
    /// `migrate-recover`: in `postcopy-paused`, wait for the source's recovery channel on
    /// `listener` (bound by the caller, so that a bad address fails the command).
    pub fn recover(&self, listener: Listener) -> Result<(), String> {
        let st = self.status();
        if st != MigrationStatus::PostcopyPaused {
            return Err(RECOVER_NOT_PAUSED.into());
        }
        let mut g = self
            .shared
            .recover
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if g.listener.is_some() {
            return Err("Migrate recovery is triggered already".into());
        }
        if let Listener::Tcp(_) = &listener {
            let addrs = listener.local_uri().socket_address_json();
            self.stats.set_socket_address(addrs.into_iter().collect());
        }
        g.listener = Some(listener);
        if g.accepting {
            // QEMU's `qmp_migrate_recover` releases the transport an earlier call left
            // waiting: nobody connected there, so the receiver gives that wait up (it
            // re-checks `cancelled` before accepting, and resets the token only under this
            // lock) and takes this listener.
            self.shared.io.cancel();
        }
        drop(g);
        self.shared.recover_cv.notify_all();
        Ok(())
    }

    /// `migrate-pause` on the destination: in `postcopy-active` or `postcopy-recover`, shut
    /// the channel down; the receiver goes to `postcopy-paused`.
    pub fn pause(&self) -> Result<(), String> {
        match self.status() {
            MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover => {
                self.shared.pause_requested.store(true, Ordering::SeqCst);
                self.shared.io.cancel();
                Ok(())
            }
            _ => Err(PAUSE_NOT_POSTCOPY.into()),
        }
    }

    /// Ends the incoming migration whatever its state (teardown, `quit`): unlike
    /// [`DestHandle::cancel`], also a post-copy migration that is running or paused (the
    /// guest's missing pages are then lost; the caller tears the pager down).
    pub fn abandon(&self) {
        self.shared.cancel.store(true, Ordering::SeqCst);
        self.shared.io.cancel();
        let _g = self
            .shared
            .recover
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.shared.recover_cv.notify_all();
    }
}

impl Receiver {
    /// Whether `e`, ending a channel after `POSTCOPY_RUN`, pauses post-copy instead of
    /// failing it: the channel broke (EOF, reset, I/O error, liveness timeout, TLS session
    /// error) or `migrate-pause` cut it. A hostile or wrong record still fails.
    pub(super) fn pauses_postcopy(&self, e: &DestError) -> bool {
        if !self.postcopy_running() || self.shared.cancel.load(Ordering::SeqCst) {
            return false;
        }
        // A broken preempt channel pauses as a broken main channel does (decision 154).
        let mut e = e;
        while let DestError::Preempt(inner) = e {
            e = inner.as_ref();
        }
        matches!(
            e,
            DestError::Inactive(_)
                | DestError::Transport(_)
                | DestError::Tls(_)
                | DestError::Wire(WireError::Io { .. } | WireError::Truncated { .. })
        )
    }

    /// `postcopy-paused` until a recovery completes the migration (`Ok`), or the migration is
    /// abandoned (`Err(Cancelled)`), or a recovered channel fails for good.
    pub(super) fn postcopy_recovery(&mut self, first: DestError) -> Result<(), DestError> {
        self.enter_paused(&first);
        loop {
            let listener = self.wait_for_recover()?;
            match self.recover_once(listener) {
                Ok(()) => return Ok(()),
                Err((_, true)) if self.listener_replaced() => {
                    // Still paused, as it was: a newer migrate-recover took over before anyone
                    // connected to the old listener.
                    tracing::info!(
                        "post-copy recovery: a newer migrate-recover replaced the listener"
                    );
                }
                Err((e, true)) => {
                    tracing::warn!(error = %error_chain(&e), "post-copy recovery failed; paused again");
                    self.enter_paused(&e);
                }
                Err((e, false)) => return Err(e),
            }
        }
    }

    /// Whether a newer `migrate-recover`'s listener waits while this side is still paused
    /// (the attempt that just ended never got past `accept`).
    fn listener_replaced(&self) -> bool {
        let g = self
            .shared
            .recover
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        g.listener.is_some()
            && *self.shared.status.lock().unwrap_or_else(|p| p.into_inner())
                == MigrationStatus::PostcopyPaused
    }

    fn enter_paused(&mut self, cause: &DestError) {
        // Nothing is placed from here until POSTCOPY_RESUME: the bitmap sent then is final.
        self.shared.io.cancel();
        self.stop_preempt();
        // REQ_PAGES now wait in the requested set (RpRequester).
        *self.rp.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.rp_open = false;
        self.rp_spare = None;
        let paused_by_user = self.shared.pause_requested.swap(false, Ordering::SeqCst);
        let missing = self.pc.as_ref().map_or(0, |pc| pc.missing_count());
        let why = if paused_by_user {
            "migrate-pause cut the connection to the source".to_owned()
        } else {
            format!(
                "the connection to the source was lost: {}",
                error_chain(cause)
            )
        };
        let desc = format!(
            "post-copy paused: {why}; {missing} pages have not been received (the vCPUs that \
             touch them stay blocked until a recovery, migrate-recover here and migrate with \
             resume on the source, brings them)"
        );
        tracing::warn!(%desc, "incoming post-copy paused");
        self.stats.replace_error(Some(desc));
        self.stats.set_postcopy_missing_pages(missing);
        self.set_status(MigrationStatus::PostcopyPaused);
    }

    fn wait_for_recover(&self) -> Result<Listener, DestError> {
        let mut g = self
            .shared
            .recover
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        loop {
            if self.shared.cancel.load(Ordering::SeqCst) {
                return Err(DestError::Cancelled);
            }
            if let Some(l) = g.listener.take() {
                // Reset here, under the lock: a `migrate-recover` that cancels this accept
                // later cannot be undone by the reset.
                self.shared.io.reset();
                g.accepting = true;
                return Ok(l);
            }
            g = self
                .shared
                .recover_cv
                .wait(g)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// One recovery channel: accept, handshake, then pages until END. The error's flag says
    /// whether the migration pauses again (true) or fails (false).
    fn recover_once(&mut self, listener: Listener) -> Result<(), (DestError, bool)> {
        let listener = std::sync::Arc::new(listener);
        let accepted = if self.shared.cancel.load(Ordering::SeqCst) {
            Err(TransportError::Cancelled)
        } else {
            listener.accept_next(&self.shared.io)
        };
        self.shared
            .recover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .accepting = false;
        if self.shared.cancel.load(Ordering::SeqCst) {
            return Err((DestError::Cancelled, false));
        }
        let again = |e: DestError| (e, true);
        let stream = accepted.map_err(|e| again(e.into()))?;
        // The recovery's preempt channel connects to the same listener.
        self.preempt.set_listener(listener);
        self.set_status(MigrationStatus::PostcopyRecover);
        let stream = match &self.opts.tls {
            Some(tls) => tls_stream::server(stream, tls, self.opts.liveness.limit())
                .map_err(|f| again(f.error.into()))?,
            None => stream,
        };
        liveness::arm(&stream, self.opts.liveness, None).map_err(|source| {
            again(
                TransportError::Io {
                    op: "set the liveness options on",
                    target: "the recovery channel".into(),
                    source,
                }
                .into(),
            )
        })?;
        let _keepalive = self.start_keepalive(&stream);
        self.rp_spare = stream
            .try_clone_for_return_path()
            .map_err(|e| again(DestError::Protocol(format!("cannot clone the socket: {e}"))))?;
        let mut resumed = false;
        let r = self
            .recovery_records(stream, &mut resumed)
            .map_err(|e| self.preempt_failure().unwrap_or(e));
        match r {
            Ok(()) => Ok(()),
            Err(e) if !resumed && !self.shared.cancel.load(Ordering::SeqCst) => {
                // Tell the source why (best effort); this side stays paused.
                let _ = send_rp(
                    &self.rp,
                    &RpMessage::Error {
                        message: error_chain(&e),
                    },
                );
                Err((DestError::RecoveryHandshake(Box::new(e)), true))
            }
            Err(e) => {
                let pause = self.pauses_postcopy(&e);
                Err((e, pause))
            }
        }
    }

    fn recovery_records(
        &mut self,
        stream: crate::transport::Stream,
        resumed: &mut bool,
    ) -> Result<(), DestError> {
        let (_, expect, limits) = self.expectations();
        let mut reader = StreamReader::recovery(
            BufReader::with_capacity(READ_BUFFER, stream),
            limits,
            expect,
        )?;
        self.m
            .state
            .check_machine_blob(&reader.config().machine_blob)
            .map_err(|source| DestError::Machine {
                op: "configuration mismatch".into(),
                source,
            })?;
        let page_size = reader.config().page_size;
        loop {
            match reader.next_record()? {
                Record::Command(Command::OpenReturnPath) => {
                    let s = self.rp_spare.take().ok_or_else(|| {
                        DestError::Protocol("OPEN_RETURN_PATH on a channel without one".into())
                    })?;
                    *self.rp.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                    self.rp_open = true;
                }
                Record::Command(Command::RecvBitmap { block }) => {
                    self.send_recv_bitmap(usize::from(block), page_size)?;
                }
                Record::Command(Command::PostcopyPreempt { token }) => {
                    self.preempt_announced(token)?;
                }
                Record::Command(Command::PostcopyResume) => {
                    self.preempt_resume()?;
                    send_rp(&self.rp, &RpMessage::ResumeAck)
                        .map_err(|e| DestError::Protocol(format!("cannot send RESUME_ACK: {e}")))?;
                    *resumed = true;
                    self.resend_pending()?;
                    self.stats.replace_error(None);
                    self.set_status(MigrationStatus::PostcopyActive);
                    tracing::info!("post-copy recovered: pages follow again");
                }
                Record::Command(Command::Ping { seq }) => {
                    if send_rp(&self.rp, &RpMessage::Pong { seq }).is_ok() {
                        self.last_pong.store(seq, Ordering::SeqCst);
                    }
                }
                Record::Ram(batch) => self.place_batch(&batch)?,
                Record::End(_) => return self.postcopy_end(),
                _ => {
                    // The recovery reader's order rules admit nothing else (§13.6).
                    return Err(DestError::Protocol(
                        "a record other than RAM, PING and END after POSTCOPY_RESUME".into(),
                    ));
                }
            }
        }
    }

    /// The received bitmap of `block`, in `RECV_BITMAP` chunks.
    fn send_recv_bitmap(&mut self, block: usize, page_size: u32) -> Result<(), DestError> {
        let pages = self
            .m
            .ram
            .blocks()
            .get(block)
            .map(|b| b.pages(page_size))
            .ok_or_else(|| DestError::Protocol(format!("RECV_BITMAP for unknown block {block}")))?;
        let bytes = self
            .pc
            .as_ref()
            .map(|pc| pc.received_bytes(block, pages))
            .unwrap_or_default();
        let block16 = u16::try_from(block)
            .map_err(|_| DestError::Protocol(format!("block {block} past u16")))?;
        for (i, chunk) in bytes.chunks(RP_MAX_BITMAP_BYTES).enumerate() {
            let first_page = u32::try_from(i * RP_MAX_BITMAP_BYTES * 8)
                .map_err(|_| DestError::Protocol(format!("block {block} too large")))?;
            send_rp(
                &self.rp,
                &RpMessage::RecvBitmap {
                    block: block16,
                    first_page,
                    bits: chunk.to_vec(),
                },
            )
            .map_err(|e| DestError::Protocol(format!("cannot send RECV_BITMAP: {e}")))?;
        }
        Ok(())
    }

    /// After `RESUME_ACK`: every page requested and still missing is asked for again.
    fn resend_pending(&mut self) -> Result<(), DestError> {
        let pending = self
            .pc
            .as_ref()
            .map(|pc| pc.pending_requests())
            .unwrap_or_default();
        tracing::info!(
            ranges = pending.len(),
            "post-copy recovery: requests sent again"
        );
        for r in pending {
            send_rp(
                &self.rp,
                &RpMessage::ReqPages {
                    block: r.block,
                    first_page: r.first,
                    count: r.count,
                },
            )
            .map_err(|e| DestError::Protocol(format!("cannot send REQ_PAGES: {e}")))?;
        }
        Ok(())
    }
}
