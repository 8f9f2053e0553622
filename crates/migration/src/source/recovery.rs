//! Post-copy recovery on the source (`docs/postcopy.md` §4, stream format §13.6; QEMU's
//! `postcopy_pause`, `postcopy_do_resume`, `qmp_migrate_pause`).
//!
//! ```text
//!  postcopy-active ──channel breaks / migrate-pause──> postcopy-paused ──migrate resume──>
//!  postcopy-recover-setup ──connected (TLS)──> postcopy-recover ──bitmaps, RESUME_ACK──>
//!  postcopy-active          (any failure before RESUME_ACK: postcopy-paused again)
//! ```
//!
//! While paused the source keeps everything it needs (its memory, the to-send set, the
//! stream configuration) and its guest stays paused: the guest runs on the destination.

use std::io::BufWriter;
use std::time::Instant;

use super::liveness::{Keepalive, Watched};
use super::*;
use crate::wire::{self, Command, StreamWriter};

/// QEMU's `qmp_migrate_pause` text (source and destination).
pub const PAUSE_NOT_POSTCOPY: &str =
    "migrate-pause is currently only supported during postcopy-active or postcopy-recover state";
/// QEMU's text for `migrate {"resume": true}` without a paused migration.
pub const RESUME_NOT_PAUSED: &str = "Cannot resume if there is no paused migration";

/// The destination's received bitmaps, assembled from `RECV_BITMAP` chunks (checked: in
/// order, contiguous from page 0, never past the block, spare bits clear).
#[derive(Debug)]
pub(super) struct BitmapAssembly {
    pages: Vec<u64>,
    bytes: Vec<Vec<u8>>,
}

impl BitmapAssembly {
    pub(super) fn new(pages: Vec<u64>) -> Self {
        let bytes = pages.iter().map(|_| Vec::new()).collect();
        Self { pages, bytes }
    }

    /// One chunk; the error text says what was wrong.
    pub(super) fn add(&mut self, block: u16, first_page: u32, bits: &[u8]) -> Result<(), String> {
        let b = usize::from(block);
        let (Some(&pages), Some(have)) = (self.pages.get(b), self.bytes.get_mut(b)) else {
            return Err(format!(
                "RECV_BITMAP for block {block}, which was not asked for"
            ));
        };
        let need = pages.div_ceil(8) as usize;
        if u64::from(first_page) != have.len() as u64 * 8 {
            return Err(format!(
                "RECV_BITMAP for block {block} from page {first_page}, expected page {}",
                have.len() * 8
            ));
        }
        if have.len() + bits.len() > need {
            return Err(format!(
                "RECV_BITMAP for block {block} past its {pages} pages"
            ));
        }
        if have.len() + bits.len() == need && pages % 8 != 0 {
            let spare = !((1u8 << (pages % 8)) - 1);
            if bits.last().is_some_and(|l| l & spare != 0) {
                return Err(format!(
                    "RECV_BITMAP for block {block} has bits set past its {pages} pages"
                ));
            }
        }
        have.extend_from_slice(bits);
        Ok(())
    }

    /// Every block is complete.
    pub(super) fn complete(&self) -> bool {
        self.pages
            .iter()
            .zip(&self.bytes)
            .all(|(p, b)| b.len() as u64 == p.div_ceil(8))
    }

    /// Whether the destination holds `page` of `block`.
    pub(super) fn received(&self, block: usize, page: u64) -> bool {
        self.bytes
            .get(block)
            .and_then(|b| b.get((page / 8) as usize))
            .is_some_and(|byte| byte & (1 << (page % 8)) != 0)
    }
}

impl SourceHandle {
    /// `migrate-pause` on the source: in `postcopy-active` or `postcopy-recover`, shut the
    /// channel down; the sender goes to `postcopy-paused`.
    pub fn pause(&self) -> Result<(), String> {
        let mut f = self.shared.lock();
        match f.status {
            MigrationStatus::PostcopyActive | MigrationStatus::PostcopyRecover => {
                f.pause_requested = true;
                drop(f);
                self.shared.io.cancel();
                self.shared.cv.notify_all();
                Ok(())
            }
            _ => Err(PAUSE_NOT_POSTCOPY.into()),
        }
    }

    /// `migrate {"uri", "resume": true}`: in `postcopy-paused`, connect a recovery channel to
    /// `uri` (TLS as the migration was started).
    pub fn resume(&self, uri: MigrationUri) -> Result<(), String> {
        let mut f = self.shared.lock();
        if f.status != MigrationStatus::PostcopyPaused || f.resume_target.is_some() {
            return Err(RESUME_NOT_PAUSED.into());
        }
        f.resume_target = Some(uri);
        drop(f);
        self.shared.cv.notify_all();
        Ok(())
    }
}

impl Sender {
    /// Whether `e`, ending the post-copy phase, pauses it instead of failing it: the channel
    /// broke or was cut (`migrate-pause`), not a cancel, not an explicit failure of the
    /// destination, not a machine error.
    pub(super) fn pauses_postcopy(&self, e: &SourceError) -> bool {
        let f = self.shared.lock();
        if f.cancel || !f.postcopy_run_sent {
            return false;
        }
        // A broken preempt channel pauses exactly as a broken main channel (decision 154).
        let mut e = e;
        while let SourceError::Preempt { source, .. } = e {
            e = source.as_ref();
        }
        match e {
            SourceError::Destination(_) => false,
            SourceError::Wire(_)
            | SourceError::Inactive(_)
            | SourceError::ReturnPath(_)
            | SourceError::Transport(_)
            | SourceError::Tls(_) => f.dest_error.is_none(),
            _ => false,
        }
    }

    /// `postcopy-paused` until a recovery channel is up (`Ok`: `postcopy-active` again) or
    /// the migration is cancelled.
    pub(super) fn postcopy_paused(&mut self, first: SourceError) -> Result<(), SourceError> {
        let mut cause = first;
        loop {
            self.enter_paused(&cause);
            let uri = self.wait_for_resume()?;
            self.recovery_started();
            self.set_status(MigrationStatus::PostcopyRecoverSetup);
            match self.recovery_channel(uri) {
                Ok(()) => {
                    self.recovery_completed();
                    self.stats.replace_error(None);
                    self.set_status(MigrationStatus::PostcopyActive);
                    tracing::info!("post-copy recovered");
                    return Ok(());
                }
                Err(_) if self.shared.lock().cancel => return Err(SourceError::Cancelled),
                // A page is lost on both sides: no recovery can bring it back. The failure,
                // not the pause before it, is what `error-desc` must say.
                Err(e @ SourceError::Release(_)) => {
                    self.stats.replace_error(None);
                    return Err(e);
                }
                Err(e) => {
                    let phase = self.shared.lock().status;
                    self.recovery_failed(phase);
                    let dest = self.shared.lock().dest_error.clone();
                    cause = match dest {
                        Some(d) => SourceError::Destination(d),
                        None => e,
                    };
                }
            }
        }
    }

    /// Drops the broken channel (sockets, writer, return-path thread) and keeps the rest.
    fn enter_paused(&mut self, cause: &SourceError) {
        self.shared.io.cancel();
        if let Some(w) = self.writer.take() {
            self.bytes_of_earlier_channels += w.bytes_written();
        }
        self.preempt.drop_channel();
        if let Some(t) = self.rp_thread.take() {
            let _ = t.join();
        }
        self.release_channel_lost();
        let phase = self.recovery_failure_phase();
        let by_user = {
            let mut f = self.shared.lock();
            f.rp_fault = None;
            f.rp_closed = false;
            f.shut_at = None;
            f.dest_error = None;
            f.requests.clear();
            f.recv_bitmaps = None;
            f.resume_sent = false;
            f.resume_acked = false;
            f.preempt_announced = false;
            f.preempt_acked = false;
            f.ping_pending_since = None;
            f.heard_at = None;
            std::mem::take(&mut f.pause_requested)
        };
        let pages = self.ram.as_ref().map_or(0, |r| r.remaining_pages());
        let why = if by_user {
            "migrate-pause cut the connection to the destination".to_owned()
        } else {
            format!(
                "the connection to the destination was lost{phase}: {}",
                error_chain(cause)
            )
        };
        let desc = format!(
            "post-copy paused: {why}; the guest runs on the destination, which still lacks \
             pages, so this source stays paused and keeps them ({pages} not sent yet) until \
             migrate-recover on the destination and migrate with resume here"
        );
        tracing::warn!(%desc, "outgoing post-copy paused");
        self.stats.replace_error(Some(desc));
        self.set_status(MigrationStatus::PostcopyPaused);
    }

    fn wait_for_resume(&mut self) -> Result<MigrationUri, SourceError> {
        let mut f = self.shared.lock();
        loop {
            if f.cancel {
                return Err(SourceError::Cancelled);
            }
            if let Some(uri) = f.resume_target.take() {
                return Ok(uri);
            }
            f = self.shared.cv.wait(f).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Connects the recovery channel and runs its handshake up to `RESUME_ACK`.
    fn recovery_channel(&mut self, uri: MigrationUri) -> Result<(), SourceError> {
        self.shared.io.reset();
        self.check_abort()?;
        self.preempt.uri = Some(uri.clone());
        let stream = transport::connect(&uri, &self.shared.io)?;
        self.check_abort()?;
        let liveness = self.opts.liveness;
        let stream = match &self.opts.tls {
            Some(tls) => transport::tls_stream::client(stream, tls, liveness.limit())?,
            None => stream,
        };
        crate::liveness::arm(&stream, liveness, Some(liveness.keepalive_period())).map_err(
            |source| TransportError::Io {
                op: "set the liveness options on",
                target: "the recovery channel".into(),
                source,
            },
        )?;
        let rp = stream
            .try_clone_for_return_path()
            .map_err(|e| SourceError::ReturnPath(format!("cannot clone the socket: {e}")))?
            .ok_or_else(|| {
                SourceError::ReturnPath("the recovery channel has no return path".into())
            })?;
        self.set_status(MigrationStatus::PostcopyRecover);
        self.recovery_connected();
        let config = self
            .config
            .clone()
            .ok_or(SourceError::Wire(WireError::Finished("not set up")))?;
        let pages: Vec<u64> = config
            .ram_blocks
            .iter()
            .map(|b| b.pages(config.page_size))
            .collect();
        let blocks = pages.len();
        self.shared.lock().recv_bitmaps = Some(BitmapAssembly::new(pages));
        let stream = Watched::new(stream, self.shared.clone(), liveness);
        let mut w = StreamWriter::with_version(
            BufWriter::with_capacity(WRITE_BUFFER, stream),
            &config,
            &wire::Limits::default(),
            // A recovery channel needs version 4 and, like every channel this engine writes,
            // carries self-checking RAM batches (version 5, decision 133).
            // (6 with the preempt channel, decision 150).
            wire::VERSION_RECOVERY.max(self.stream_version()),
        )?;
        w.write_command(Command::OpenReturnPath)?;
        for b in 0..blocks {
            let block = u16::try_from(b)
                .map_err(|_| SourceError::ReturnPath(format!("block {b} past u16")))?;
            w.write_command(Command::RecvBitmap { block })?;
        }
        w.flush()?;
        self.keepalive = Keepalive::new(liveness, Instant::now());
        self.writer = Some(w);
        self.spawn_return_path(rp, &config, liveness)?;
        self.wait_alive(None, |f| {
            f.recv_bitmaps
                .as_ref()
                .is_some_and(BitmapAssembly::complete)
        })?;
        self.check_abort()?;
        let bitmaps = self.shared.lock().recv_bitmaps.take();
        let bitmaps = bitmaps
            .ok_or_else(|| SourceError::ReturnPath("the received bitmaps vanished".into()))?;
        self.release_after_bitmaps(|b, p| bitmaps.received(b, p))?;
        let (pages, resent) = self
            .ram()?
            .requeue_unreceived(|b, p| bitmaps.received(b, p));
        self.recovery_bitmaps(pages, resent);
        tracing::info!(
            pages,
            resent,
            "post-copy recovery: pages the destination lacks"
        );
        if self.opts.postcopy_preempt {
            // A new preempt channel before POSTCOPY_RESUME (QEMU's order, decision 155).
            self.open_preempt()?;
        }
        self.shared.lock().resume_sent = true;
        self.writer()?.write_command(Command::PostcopyResume)?;
        self.writer()?.flush()?;
        self.wait_alive(None, |f| f.resume_acked)?;
        self.check_abort()
    }
}

#[cfg(test)]
mod tests {
    use super::BitmapAssembly;

    #[test]
    fn bitmap_chunks_must_be_contiguous_bounded_and_clean() {
        // Block 0: 20 pages (3 bytes, 4 spare bits); block 1: 8 pages.
        let mut a = BitmapAssembly::new(vec![20, 8]);
        assert!(!a.complete());
        assert!(a
            .add(0, 8, &[0xff])
            .unwrap_err()
            .contains("expected page 0"));
        a.add(0, 0, &[0b0000_0101]).unwrap();
        assert!(a
            .add(0, 8, &[0, 0, 0])
            .unwrap_err()
            .contains("past its 20 pages"));
        assert!(a
            .add(0, 8, &[0, 0x10])
            .unwrap_err()
            .contains("past its 20 pages"));
        let mut b = BitmapAssembly::new(vec![20, 8]);
        b.add(0, 0, &[0, 0]).unwrap();
        assert!(b.add(0, 16, &[0x0f]).is_ok());
        assert!(a.add(2, 0, &[1]).unwrap_err().contains("not asked for"));
        a.add(0, 8, &[0x80, 0x08]).unwrap();
        a.add(1, 0, &[0x01]).unwrap();
        assert!(a.complete());
        assert!(a.received(0, 0) && !a.received(0, 1) && a.received(0, 2));
        assert!(a.received(0, 15) && a.received(0, 19) && !a.received(0, 18));
        assert!(a.received(1, 0) && !a.received(1, 7) && !a.received(5, 0));
    }
}
