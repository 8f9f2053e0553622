//! The post-copy preempt channel on the source (`postcopy-preempt`, `docs/postcopy.md` §5,
//! stream format §13.8; QEMU's `postcopy_preempt_establish_channel` and its urgent-page path).
//!
//! ```text
//!  main: POSTCOPY_PREEMPT{token} ─> connect the same URI [TLS] ─> header + CONFIG +
//!  POSTCOPY_PREEMPT{token} ─> wait for PREEMPT_ACK (main return path) ─> the switch
//!  after POSTCOPY_RUN: requested pages on the preempt channel, the push on the main one
//!  every page sent: END on the preempt channel, then END on the main one
//! ```
//!
//! Opened before the guest is stopped (a failure there fails the migration and the guest runs
//! on), and again by every recovery before `POSTCOPY_RESUME`.

use std::io::BufWriter;
use std::time::{Duration, Instant};

use super::liveness::Watched;
use super::*;
use crate::wire::{self, Command};

/// The preempt channel's state on the source.
#[derive(Default)]
pub(super) struct PreemptTx {
    /// Where the preempt channel connects: the URI of the channel that announces it.
    pub(super) uri: Option<MigrationUri>,
    /// The open channel's writer.
    writer: Option<Writer>,
    /// Bytes written on preempt channels already closed (a recovery opens a new one).
    bytes_done: u64,
}

impl PreemptTx {
    /// Every byte written on preempt channels (for `ram.transferred`).
    pub(super) fn bytes(&self) -> u64 {
        self.bytes_done + self.writer.as_ref().map_or(0, |w| w.bytes_written())
    }

    /// Whether a preempt channel is open (requested pages go there).
    pub(super) fn is_open(&self) -> bool {
        self.writer.is_some()
    }

    /// Drops the channel (it broke, or the migration paused); its bytes stay counted.
    pub(super) fn drop_channel(&mut self) {
        if let Some(w) = self.writer.take() {
            self.bytes_done += w.bytes_written();
        }
    }
}

fn preempt_err(op: &'static str, e: impl Into<SourceError>) -> SourceError {
    SourceError::Preempt {
        op,
        source: Box::new(e.into()),
    }
}

impl Sender {
    /// `postcopy-preempt` needs a URI to connect to again (not an already connected `fd:`).
    pub(super) fn check_preempt_setup(&self) -> Result<(), SourceError> {
        if self.opts.postcopy_preempt && self.preempt.uri.is_none() {
            return Err(SourceError::Machine {
                op: "postcopy-preempt",
                source: MachineError::rejected(
                    "postcopy-preempt",
                    "the preempt channel is a second connection to the destination's URI; a \
                     migration over an already connected channel has none",
                ),
            });
        }
        Ok(())
    }

    /// Announces a preempt channel on the current channel, connects it, runs its handshake
    /// and waits (at most the liveness limit) for the destination's `PREEMPT_ACK`.
    pub(super) fn open_preempt(&mut self) -> Result<(), SourceError> {
        let t0 = Instant::now();
        self.preempt.drop_channel();
        let uri = self
            .preempt
            .uri
            .clone()
            .ok_or_else(|| preempt_err("no URI", SourceError::Cancelled))?;
        let config = self
            .config
            .clone()
            .ok_or(SourceError::Wire(WireError::Finished("not set up")))?;
        let token = uuid::Uuid::new_v4().into_bytes();
        {
            let mut f = self.shared.lock();
            f.preempt_announced = true;
            f.preempt_acked = false;
        }
        self.writer()?
            .write_command(Command::PostcopyPreempt { token })?;
        self.writer()?.flush()?;
        let stream =
            transport::connect(&uri, &self.shared.io).map_err(|e| preempt_err("connect", e))?;
        self.check_abort()?;
        let liveness = self.opts.liveness;
        let stream = match &self.opts.tls {
            Some(tls) => transport::tls_stream::client(stream, tls, liveness.limit())
                .map_err(|e| preempt_err("TLS", e))?,
            None => stream,
        };
        crate::liveness::arm(&stream, liveness, None).map_err(|source| {
            preempt_err(
                "liveness options",
                TransportError::Io {
                    op: "set the liveness options on",
                    target: "the preempt channel".into(),
                    source,
                },
            )
        })?;
        let stream = Watched::new(stream, self.shared.clone(), liveness);
        let mut w = StreamWriter::with_version(
            BufWriter::with_capacity(WRITE_BUFFER, stream),
            &config,
            &wire::Limits::default(),
            self.stream_version(),
        )
        .map_err(|e| preempt_err("header", e))?;
        w.write_command(Command::PostcopyPreempt { token })
            .map_err(|e| preempt_err("handshake", e))?;
        w.flush().map_err(|e| preempt_err("handshake", e))?;
        self.preempt.writer = Some(w);
        // PREEMPT_ACK, an ERROR naming what the destination refused, or the limit.
        let limit = liveness.limit().unwrap_or(Duration::from_secs(10));
        self.wait_alive(Some(limit), |f| f.preempt_acked)?;
        self.check_abort()?;
        if !self.shared.lock().preempt_acked {
            self.preempt.drop_channel();
            return Err(preempt_err(
                "handshake",
                SourceError::ReturnPath(format!(
                    "the destination did not accept the preempt channel within {} ms",
                    limit.as_millis()
                )),
            ));
        }
        tracing::info!(
            us = t0.elapsed().as_micros() as u64,
            %uri,
            "post-copy preempt channel open"
        );
        Ok(())
    }

    /// Requested pages: on the preempt channel when it is open (flushed at once), else on
    /// the main channel with the push.
    pub(super) fn send_requested(&mut self, pages: &[(usize, u64)]) -> Result<(), SourceError> {
        if !self.preempt.is_open() {
            if let (Some(ram), Some(w)) = (self.ram.as_mut(), self.writer.as_mut()) {
                ram.send_pages(self.m.ram.as_mut(), w, pages)?;
            }
            return Ok(());
        }
        let (Some(ram), Some(w)) = (self.ram.as_mut(), self.preempt.writer.as_mut()) else {
            return Ok(());
        };
        ram.send_pages(self.m.ram.as_mut(), w, pages)
            .map_err(|e| preempt_err("write", e))?;
        w.flush().map_err(|e| preempt_err("write", e))?;
        Ok(())
    }

    /// Every page sent: END on the preempt channel (before the main channel's END, so the
    /// destination has every page once it reads that one).
    pub(super) fn finish_preempt(&mut self) -> Result<(), SourceError> {
        let Some(w) = self.preempt.writer.take() else {
            return Ok(());
        };
        self.preempt.bytes_done += w.bytes_written() + 17;
        w.finish().map_err(|e| preempt_err("END", e))?;
        Ok(())
    }
}
