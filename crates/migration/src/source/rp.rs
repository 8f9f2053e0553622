//! The source's return-path reader thread (`mig-rp`): turns destination messages into flags in
//! [`Shared`] and wakes the sender. A destination failure (ERROR, SHUT{1}, an unexpected close)
//! also aborts the forward channel, so a sender blocked in `write` returns at once.

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use super::liveness::Watched;
use super::{Sender, Shared, SourceError};
use crate::liveness::{Inactivity, LivenessTimeout};
use crate::transport::Stream;
use crate::wire::{Limits, ReturnPathReader, RpMessage, StreamConfig};

impl Sender {
    /// Starts the `mig-rp` reader thread on `stream` (a clone of the channel's socket), under
    /// the liveness limit; for the first channel and for every recovery channel alike.
    pub(super) fn spawn_return_path(
        &mut self,
        stream: Stream,
        config: &StreamConfig,
        liveness: LivenessTimeout,
    ) -> Result<(), SourceError> {
        let (cfg, shared) = (config.clone(), self.shared.clone());
        let rp = Watched::new(stream, shared.clone(), liveness);
        let t = std::thread::Builder::new()
            .name("mig-rp".into())
            .spawn(move || run(rp, &cfg, shared))
            .map_err(|source| SourceError::Spawn {
                name: "mig-rp",
                source,
            })?;
        self.rp_thread = Some(t);
        Ok(())
    }
}

pub(super) fn run<R: Read>(stream: R, config: &StreamConfig, shared: Arc<Shared>) {
    let mut reader = ReturnPathReader::with_config(stream, config, &Limits::default());
    loop {
        let msg = reader.read_message();
        let mut f = shared.lock();
        if let Ok(Some(_)) = msg {
            f.heard_at = Some(Instant::now());
        }
        match msg {
            Ok(Some(RpMessage::SwitchoverAck)) => {
                tracing::debug!("return path: SWITCHOVER_ACK");
                if !f.acked {
                    f.acked = true;
                    f.acked_at = Some(Instant::now());
                }
            }
            Ok(Some(RpMessage::Pong { seq })) => {
                tracing::debug!(seq, "return path: PONG");
                f.pongs += 1;
                f.last_pong = f.last_pong.max(seq);
                if seq >= f.ping_sent {
                    f.ping_pending_since = None;
                }
            }
            Ok(Some(RpMessage::Resumed)) => {
                tracing::debug!("return path: RESUMED");
                f.resumed_at.get_or_insert_with(Instant::now);
            }
            Ok(Some(RpMessage::Error { message })) => {
                tracing::warn!(%message, "destination reported an error");
                f.dest_error.get_or_insert(message);
            }
            Ok(Some(RpMessage::Shut { error })) => {
                f.shut_at.get_or_insert((Instant::now(), error));
                if error {
                    f.dest_error
                        .get_or_insert_with(|| "the destination failed (no reason given)".into());
                }
                drop(f);
                shared.cv.notify_all();
                if error {
                    shared.io.cancel();
                }
                return;
            }
            Ok(Some(RpMessage::ReqPages {
                block,
                first_page,
                count,
            })) if f.postcopy => {
                // Checked against the CONFIG by the reader (block, range, count); served by
                // the sender after the switch (pages already sent are skipped there).
                tracing::trace!(block, first_page, count, "return path: REQ_PAGES");
                f.requests.push_back(crate::machine::PageRange {
                    block,
                    first: first_page,
                    count,
                });
            }
            Ok(Some(RpMessage::RecvBitmap {
                block,
                first_page,
                bits,
            })) => {
                let added = match f.recv_bitmaps.as_mut() {
                    Some(a) => a.add(block, first_page, &bits),
                    None => Err("RECV_BITMAP without a recovery in progress".into()),
                };
                if let Err(e) = added {
                    f.rp_fault.get_or_insert(e);
                    drop(f);
                    shared.cv.notify_all();
                    shared.io.cancel();
                    return;
                }
            }
            Ok(Some(RpMessage::PreemptAck)) => {
                if !f.preempt_announced || f.preempt_acked {
                    f.rp_fault.get_or_insert_with(|| {
                        "PREEMPT_ACK without a preempt channel announced (or twice)".into()
                    });
                    drop(f);
                    shared.cv.notify_all();
                    shared.io.cancel();
                    return;
                }
                tracing::debug!("return path: PREEMPT_ACK");
                f.preempt_acked = true;
            }
            Ok(Some(RpMessage::ResumeAck)) => {
                if !f.resume_sent {
                    f.rp_fault
                        .get_or_insert_with(|| "RESUME_ACK before POSTCOPY_RESUME".into());
                    drop(f);
                    shared.cv.notify_all();
                    shared.io.cancel();
                    return;
                }
                f.resume_acked = true;
            }
            Ok(Some(RpMessage::ReqPages { .. })) => {
                f.rp_fault
                    .get_or_insert_with(|| "unexpected REQ_PAGES (post-copy is not on)".into());
                drop(f);
                shared.cv.notify_all();
                shared.io.cancel();
                return;
            }
            Ok(None) => {
                f.rp_closed = true;
                let finished = f.resumed_at.is_some();
                drop(f);
                shared.cv.notify_all();
                if !finished {
                    shared.io.cancel();
                }
                return;
            }
            Err(e) => {
                if !shared.io.is_cancelled() {
                    f.rp_fault
                        .get_or_insert_with(|| match Inactivity::find(&e) {
                            Some(i) => i.describe("destination"),
                            None => format!("return path: {}", crate::stats::error_chain(&e)),
                        });
                }
                f.rp_closed = true;
                drop(f);
                shared.cv.notify_all();
                shared.io.cancel();
                return;
            }
        }
        drop(f);
        shared.cv.notify_all();
    }
}
