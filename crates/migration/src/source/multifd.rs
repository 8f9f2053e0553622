//! Multifd on the source (`docs/migration-engine.md` §2.5, `docs/stream-format.md` §5.2): the
//! extra connections, their sender threads `mig-mfd-send-K`, and the hooks `flow.rs` calls
//! (announce, connect, send a round of pages, a sync point, the final sync).
//!
//! `mig-src` keeps the dirty bitmap: it takes lists of dirty pages from the [`RamSender`] and
//! queues each list on the next channel (round robin, bounded queues). A sender thread copies
//! each page once into its batch buffer with a volatile read ([`RamView::copy_range`]: the
//! guest runs; the CRC must cover exactly the bytes sent, decision 163), checks the copy for
//! zero (a zero page's slot is reused) and writes the batch with one vectored write. With `zero-copy-send` the batch buffer is a slot
//! of `multifd_zerocopy.rs`'s pool and the write goes out with `MSG_ZEROCOPY`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::multifd_zerocopy::{ChannelSocket, SlotPool, ZeroCopySocket};
use super::ram::{RamSender, BATCH_PAGES};
use super::{Sender, Shared, SourceError};
use crate::digest::RamView;
use crate::liveness::{Inactivity, LivenessTimeout};
use crate::machine::MachineError;
use crate::transport::{self, tls_stream, MigrationUri, Stream};
use crate::wire::{
    is_zero_page, ChannelHandshake, ChannelWriter, Command, Compression, RamPage, StreamConfig,
    StreamWriter, WireError,
};

/// Page lists queued per channel before `mig-src` waits for that channel.
const QUEUE_DEPTH: usize = 2;
/// Wire bytes of a batch beyond its page data: frame, batch header, count, CRC.
const BATCH_FIXED: u64 = 5 + 16 + 4 + 4;
/// Wire bytes of one page entry.
const ENTRY: u64 = 8;

/// One page to send: block, page, known to be zero (the first pass's `mincore`).
type PageRef = (u16, u32, bool);

enum Job {
    Pages(Vec<PageRef>),
    Sync,
    /// The final `SYNC`, then the thread ends.
    Finish,
}

/// Counters and the first failure, shared with the sender threads.
#[derive(Default)]
struct Counters {
    bytes: AtomicU64,
    /// The estimates ([`estimate`]) of the page lists the senders wrote: with
    /// `multifd-compression`, `bytes` ÷ this is the ratio the wire achieves so far.
    estimated: AtomicU64,
    zero: AtomicU64,
    normal: AtomicU64,
    /// Syncs at which a channel's zero-copy sends were all copied by the kernel (QEMU's
    /// `dirty-sync-missed-zero-copy`, counted per channel per sync as QEMU does).
    missed_zero_copy: AtomicU64,
    error: Mutex<Option<String>>,
}

struct Channel {
    tx: Option<SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
}

/// The channels of one migration.
pub(super) struct Multifd {
    channels: Vec<Channel>,
    next: usize,
    counters: Arc<Counters>,
    /// Zero / normal page counts already folded into the [`RamSender`].
    folded: (u64, u64),
    /// Estimated wire bytes of every page list queued so far (rounds and the rate limit).
    queued: u64,
    page_size: u64,
    /// `multifd-compression` is on: queued lists are counted at the achieved ratio.
    compressed: bool,
    /// Every channel sent its final `SYNC` and ended (the switch to post-copy, §5.4): sync
    /// points have no channel part any more.
    ended: bool,
}

/// Wire bytes of a page list sent plain: frame, header, count, CRC, entries, page data.
fn estimate(list: &[PageRef], page_size: u64) -> u64 {
    BATCH_FIXED
        + list
            .iter()
            .map(|&(_, _, z)| ENTRY + if z { 0 } else { page_size })
            .sum::<u64>()
}

impl Multifd {
    fn fail_text(&self) -> Option<String> {
        self.counters
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn failure(&self, fallback: &str) -> SourceError {
        SourceError::Multifd(self.fail_text().unwrap_or_else(|| fallback.to_owned()))
    }

    /// Queues `job` on channel `k`; a channel whose thread ended reports its failure.
    fn queue(&mut self, k: usize, job: Job) -> Result<(), SourceError> {
        let sent = self
            .channels
            .get(k)
            .and_then(|c| c.tx.as_ref())
            .map(|tx| tx.send(job).is_ok());
        if sent == Some(true) {
            Ok(())
        } else {
            Err(self.failure(&format!("multifd channel {}: its sender ended", k + 1)))
        }
    }

    /// Takes up to `max_bytes` of dirty pages (at least one page when any is dirty) and queues
    /// them in lists of at most [`BATCH_PAGES`]. Returns the estimated wire bytes queued.
    fn send(&mut self, ram: &mut RamSender, max_bytes: u64) -> Result<u64, SourceError> {
        // At most one list per channel per call, so `mig-src` comes back to its loop (syncs,
        // the switchover rule, aborts) as often as with one channel.
        let max_bytes =
            max_bytes.min(self.channels.len() as u64 * BATCH_PAGES as u64 * self.page_size);
        let mut queued = 0u64;
        while ram.remaining_pages() > 0 && (queued == 0 || queued < max_bytes) {
            let left = max_bytes.saturating_sub(queued);
            let max = (left / self.page_size).clamp(1, BATCH_PAGES as u64) as usize;
            let list = ram.take_pages(max);
            if list.is_empty() {
                break;
            }
            let bytes = self.wire_estimate(estimate(&list, self.page_size));
            let k = self.next;
            self.next = (self.next + 1) % self.channels.len();
            self.queue(k, Job::Pages(list))?;
            queued += bytes;
        }
        self.queued += queued;
        self.fold(ram);
        Ok(queued)
    }

    /// With compression, `plain` scaled by the ratio the channels achieved so far (what they
    /// wrote ÷ the plain estimate of what they wrote; 1 before the first batch), so that
    /// `max-bandwidth` and the bandwidth estimate count wire bytes, as QEMU's multifd
    /// accounting does (decision 215).
    fn wire_estimate(&self, plain: u64) -> u64 {
        let done = self.counters.estimated.load(Ordering::Relaxed);
        if !self.compressed || done == 0 {
            return plain;
        }
        let wrote = self.counters.bytes.load(Ordering::Relaxed).min(done);
        ((u128::from(plain) * u128::from(wrote)) / u128::from(done)).max(1) as u64
    }

    /// Adds what the senders counted since the last call to the [`RamSender`]'s page counts.
    fn fold(&mut self, ram: &mut RamSender) {
        let z = self.counters.zero.load(Ordering::Relaxed);
        let n = self.counters.normal.load(Ordering::Relaxed);
        ram.zero_pages += z - self.folded.0;
        ram.normal_pages += n - self.folded.1;
        self.folded = (z, n);
    }

    /// Queues `SYNC` on every channel (before a sync point on the main stream).
    fn sync(&mut self) -> Result<(), SourceError> {
        if self.ended {
            return Ok(());
        }
        for k in 0..self.channels.len() {
            self.queue(k, Job::Sync)?;
        }
        Ok(())
    }

    /// The final `SYNC` on every channel; waits until every sender wrote and flushed it and
    /// ended.
    fn finish(&mut self, ram: &mut RamSender) -> Result<(), SourceError> {
        if self.ended {
            return Ok(());
        }
        self.ended = true;
        for k in 0..self.channels.len() {
            self.queue(k, Job::Finish)?;
        }
        for c in &mut self.channels {
            c.tx = None;
            if let Some(t) = c.thread.take() {
                let _ = t.join();
            }
        }
        self.fold(ram);
        match self.fail_text() {
            Some(e) => Err(SourceError::Multifd(e)),
            None => Ok(()),
        }
    }

    /// Bytes the senders wrote (`multifd-bytes`).
    pub(super) fn bytes(&self) -> u64 {
        self.counters.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Multifd {
    /// Ends the senders (their sockets were shut down by the cancel token on a failure; on
    /// success they ended at the final sync).
    fn drop(&mut self) {
        for c in &mut self.channels {
            c.tx = None;
        }
        for c in &mut self.channels {
            if let Some(t) = c.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Writes `MULTIFD_CHANNELS` right after `CAPABILITIES` when multifd is on; returns the id.
pub(super) fn announce<W: std::io::Write>(
    w: &mut StreamWriter<W>,
    channels: Option<u16>,
    compression: Compression,
) -> Result<Option<[u8; 16]>, SourceError> {
    let Some(channels) = channels else {
        return Ok(None);
    };
    let id = *uuid::Uuid::new_v4().as_bytes();
    w.write_command(Command::MultifdChannels {
        channels,
        compression,
        id,
    })?;
    Ok(Some(id))
}

/// What a sender thread needs.
struct SenderCtx {
    k: u16,
    view: Arc<dyn RamView>,
    page_size: usize,
    detect_zero: bool,
    keepalive: Duration,
    counters: Arc<Counters>,
    shared: Arc<Shared>,
}

impl Sender {
    /// Refuses what multifd cannot do (decision 166), before anything is connected. With
    /// `x-tern-ram-digest` it is built (decision 252).
    pub(super) fn check_multifd_setup(
        &self,
        uri: Option<&MigrationUri>,
    ) -> Result<(), SourceError> {
        if self.opts.multifd_channels.is_none() {
            return Ok(());
        }
        let refuse = |why: &str| Err(SourceError::Multifd(why.to_owned()));
        match uri {
            Some(u) if u.is_file() => refuse(
                "multifd to a file: URI (QEMU's mapped-ram) is not supported by Tern; use tcp: or unix:",
            ),
            Some(_) => Ok(()),
            None => refuse("multifd needs a tcp: or unix: URI to open its channels"),
        }
    }

    /// Opens every channel (connect, TLS and admission, handshake, liveness options) and
    /// starts its sender thread.
    pub(super) fn multifd_connect(
        &mut self,
        uri: Option<&MigrationUri>,
        id: Option<[u8; 16]>,
        config: &StreamConfig,
    ) -> Result<(), SourceError> {
        let (Some(n), Some(id), Some(uri)) = (self.opts.multifd_channels, id, uri) else {
            return Ok(());
        };
        let counters = Arc::new(Counters::default());
        let mut mf = Multifd {
            channels: Vec::with_capacity(usize::from(n)),
            next: 0,
            counters: counters.clone(),
            folded: (0, 0),
            queued: 0,
            page_size: u64::from(config.page_size),
            compressed: self.opts.multifd_compression.0 != Compression::None,
            ended: false,
        };
        for k in 1..=n {
            self.check_abort()?;
            let stream = self
                .open_channel(uri, k, n, id)
                .map_err(|e| SourceError::Multifd(format!("multifd channel {k}: {e}")))?;
            let pool = self
                .opts
                .zero_copy_send
                .then(|| SlotPool::new(BATCH_PAGES * config.page_size as usize));
            let mut writer = ChannelWriter::new(stream, k, config)?;
            // `multifd-compression` (§5.3): the channel's own compressor.
            let (method, level) = self.opts.multifd_compression;
            writer.set_compression(method, level)?;
            let ctx = SenderCtx {
                k,
                view: self.m.ram.view(),
                page_size: config.page_size as usize,
                detect_zero: self.opts.detect_zero_pages,
                keepalive: self.opts.liveness.keepalive_period(),
                counters: counters.clone(),
                shared: self.shared.clone(),
            };
            let (tx, rx) = mpsc::sync_channel(QUEUE_DEPTH);
            let name = format!("mig-mfd-send-{k}");
            let thread = std::thread::Builder::new()
                .name(name)
                .spawn(move || ctx.run(writer, rx, pool))
                .map_err(|source| SourceError::Spawn {
                    name: "mig-mfd-send",
                    source,
                })?;
            mf.channels.push(Channel {
                tx: Some(tx),
                thread: Some(thread),
            });
        }
        tracing::debug!(channels = n, "multifd channels open");
        self.multifd = Some(mf);
        Ok(())
    }

    fn open_channel(
        &self,
        uri: &MigrationUri,
        k: u16,
        n: u16,
        id: [u8; 16],
    ) -> Result<ChannelSocket, String> {
        let stream = transport::connect(uri, &self.shared.io).map_err(|e| error_text(&e))?;
        let liveness: LivenessTimeout = self.opts.liveness;
        let mut stream = match &self.opts.tls {
            Some(tls) => tls_stream::client(stream, tls, liveness.limit())
                .map_err(|e| format!("TLS: {}", error_text(&e)))?,
            None => stream,
        };
        crate::liveness::arm(&stream, liveness, Some(liveness.keepalive_period()))
            .map_err(|e| format!("setting the liveness options: {e}"))?;
        let hs = ChannelHandshake {
            // The main stream's version (7 with compression, §5.3; else 6).
            version: self.stream_version(),
            channel: k,
            channels: n,
            id,
        };
        std::io::Write::write_all(&mut stream, &hs.encode())
            .map_err(|e| format!("writing the handshake: {e}"))?;
        if !self.opts.zero_copy_send {
            return Ok(ChannelSocket::Plain(stream));
        }
        match stream {
            Stream::Tcp(t) => ZeroCopySocket::new(t, liveness.limit())
                .map(ChannelSocket::ZeroCopy)
                .map_err(|e| format!("zero-copy-send: {e}")),
            _ => Err("zero-copy-send needs a tcp: URI (MSG_ZEROCOPY is for TCP sockets)".into()),
        }
    }

    /// Queues up to `max_bytes` of dirty pages on the channels. Returns the estimated bytes.
    pub(super) fn multifd_send(&mut self, max_bytes: u64) -> Result<u64, SourceError> {
        match (self.multifd.as_mut(), self.ram.as_mut()) {
            (Some(mf), Some(ram)) => mf.send(ram, max_bytes),
            _ => Ok(0),
        }
    }

    /// Writes a sync point (`ITERATION_END`, `SWITCHOVER_START`) on the main stream: with
    /// multifd, `SYNC` is queued on every channel first and the main stream is flushed after
    /// it (the destination's channels wait for it, decision 162).
    pub(super) fn write_sync_point(&mut self, command: Command) -> Result<(), SourceError> {
        if let Some(mf) = self.multifd.as_mut() {
            mf.sync()?;
        }
        self.writer()?.write_command(command)?;
        if self.multifd.is_some() {
            self.writer()?.flush()?;
        }
        Ok(())
    }

    /// After the last pages: the final `SYNC` on every channel, and wait for the senders.
    pub(super) fn multifd_finish(&mut self) -> Result<(), SourceError> {
        match (self.multifd.as_mut(), self.ram.as_mut()) {
            (Some(mf), Some(ram)) => mf.finish(ram),
            _ => Ok(()),
        }
    }

    /// The switch to post-copy with multifd (`docs/stream-format.md` §5.4, decision 245): the
    /// final `SYNC` behind every channel's last pre-copy batch, the senders waited for and
    /// their sockets closed, then `MULTIFD_END` on the main stream (flushed). Called before the
    /// early discard: every page a channel carried is placed on the destination before it
    /// drops any page or registers userfaultfd. A channel that fails here fails the migration
    /// while the guest still runs. Nothing without multifd.
    pub(super) fn multifd_end_for_postcopy(&mut self) -> Result<(), SourceError> {
        if self.multifd.as_ref().is_none_or(|m| m.ended) {
            return Ok(());
        }
        self.multifd_finish()?;
        let w = self.writer()?;
        w.write_command(Command::MultifdEnd)?;
        w.flush()?;
        tracing::debug!("multifd: channels ended at the switch to post-copy");
        Ok(())
    }

    /// A failed channel ends the migration (checked with the other abort reasons).
    pub(super) fn multifd_check(&self) -> Result<(), SourceError> {
        match self.multifd.as_ref().and_then(Multifd::fail_text) {
            Some(e) => Err(SourceError::Multifd(e)),
            None => Ok(()),
        }
    }

    /// Bytes written on the main stream and queued on the channels (rounds, the rate limit).
    pub(super) fn sent_bytes(&self) -> Result<u64, SourceError> {
        let q = self.multifd.as_ref().map_or(0, |m| m.queued);
        let w = self
            .writer
            .as_ref()
            .ok_or(SourceError::Wire(WireError::Finished("not open")))?;
        Ok(w.bytes_written() + q)
    }

    /// Bytes the channels carried (`multifd-bytes`; part of `transferred`).
    pub(super) fn multifd_bytes(&self) -> u64 {
        self.multifd.as_ref().map_or(0, Multifd::bytes)
    }

    /// `dirty-sync-missed-zero-copy`.
    pub(super) fn multifd_missed_zero_copy(&self) -> u64 {
        self.multifd
            .as_ref()
            .map_or(0, |m| m.counters.missed_zero_copy.load(Ordering::Relaxed))
    }
}

fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    crate::stats::error_chain(e)
}

impl SenderCtx {
    fn run(
        self,
        mut w: ChannelWriter<ChannelSocket>,
        rx: mpsc::Receiver<Job>,
        mut pool: Option<SlotPool>,
    ) {
        // Without zero-copy, one batch buffer; with it, the pool's slots (decision 221).
        let mut buf = match pool {
            Some(_) => Vec::new(),
            None => vec![0u8; BATCH_PAGES * self.page_size],
        };
        // Every sender adds what it wrote since its last report (`multifd-bytes` is the sum).
        let mut reported = 0u64;
        let mut report = |w: &ChannelWriter<ChannelSocket>| {
            let now = w.bytes_written();
            self.counters
                .bytes
                .fetch_add(now - reported, Ordering::Relaxed);
            reported = now;
        };
        let result = loop {
            let r = match rx.recv_timeout(self.keepalive) {
                Ok(Job::Pages(list)) => match pool.as_mut() {
                    Some(pool) => self.zero_copy_batch(&mut w, &list, pool),
                    None => self.batch(&mut w, &list, &mut buf),
                },
                Ok(Job::Sync) => w.write_sync().and_then(|()| self.flush(&mut w, &mut pool)),
                Ok(Job::Finish) => {
                    break w.write_sync().and_then(|()| self.flush(&mut w, &mut pool))
                }
                Err(RecvTimeoutError::Timeout) => w.write_keepalive(),
                // `mig-src` dropped the queue: the migration ended (failed or cancelled).
                Err(RecvTimeoutError::Disconnected) => break Ok(()),
            };
            report(&w);
            if r.is_err() {
                break r;
            }
        };
        report(&w);
        if let Err(e) = result {
            let text = match Inactivity::find(&e) {
                Some(i) => format!("multifd channel {}: {}", self.k, i.describe("destination")),
                None => format!("multifd channel {}: {}", self.k, error_text(&e)),
            };
            tracing::warn!(error = %text, "multifd sender failed");
            {
                let mut g = self
                    .counters
                    .error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                g.get_or_insert(text);
            }
            // Wake `mig-src` if it waits (rate limit, idle): it checks the channels' state.
            self.shared.cv.notify_all();
        }
    }

    /// One batch: zero pages found in place, the others copied once into `buf`.
    fn batch(
        &self,
        w: &mut ChannelWriter<ChannelSocket>,
        list: &[PageRef],
        buf: &mut [u8],
    ) -> Result<(), WireError> {
        let zero = self.fill(list, buf)?;
        let pages = self.pages(list, &zero, buf);
        w.write_batch(&pages)?;
        self.count(list, &zero);
        Ok(())
    }

    /// One batch with `zero-copy-send`: as [`SenderCtx::batch`], into a slot of the pool
    /// that is written with `MSG_ZEROCOPY` and kept until the kernel completed it.
    fn zero_copy_batch(
        &self,
        w: &mut ChannelWriter<ChannelSocket>,
        list: &[PageRef],
        pool: &mut SlotPool,
    ) -> Result<(), WireError> {
        let io = |source| WireError::Io {
            offset: 0,
            what: "waiting for zero-copy completions",
            source,
        };
        let Some(sock) = w.get_mut().zero_copy() else {
            return Err(WireError::InvalidArgument(
                "a zero-copy batch on a plain channel".into(),
            ));
        };
        let mut slot = pool.take(sock).map_err(io)?;
        let zero = self.fill(list, &mut slot.data)?;
        let pages = self.pages(list, &zero, &slot.data);
        if let Some(s) = w.get_mut().zero_copy() {
            s.arm(true);
        }
        let r = w.write_batch_parts(&pages, &mut slot.head, &mut slot.trailer);
        drop(pages);
        if let Some(s) = w.get_mut().zero_copy() {
            s.arm(false);
            // Kept even after a failed write: the kernel may hold part of it.
            pool.sent(slot, s);
        }
        r?;
        self.count(list, &zero);
        Ok(())
    }

    /// QEMU's flush at a sync (zero-copy only): every zero-copy send of this channel so far
    /// completed; a sync whose sends the kernel all copied counts as missed.
    fn flush(
        &self,
        w: &mut ChannelWriter<ChannelSocket>,
        pool: &mut Option<SlotPool>,
    ) -> Result<(), WireError> {
        let (Some(pool), Some(sock)) = (pool.as_mut(), w.get_mut().zero_copy()) else {
            return Ok(());
        };
        let missed = sock.flush_completions().map_err(|source| WireError::Io {
            offset: 0,
            what: "waiting for zero-copy completions at a sync",
            source,
        })?;
        pool.release_all();
        if missed {
            self.counters
                .missed_zero_copy
                .fetch_add(1, Ordering::Relaxed);
        }
        tracing::trace!(
            channel = self.k,
            completed = sock.completed,
            copied = sock.copied,
            missed,
            "zero-copy flush"
        );
        Ok(())
    }

    fn count(&self, list: &[PageRef], zero: &[bool]) {
        let n = list.len();
        self.counters
            .estimated
            .fetch_add(estimate(list, self.page_size as u64), Ordering::Relaxed);
        let z = zero.iter().filter(|z| **z).count();
        self.counters
            .normal
            .fetch_add((n - z) as u64, Ordering::Relaxed);
        self.counters.zero.fetch_add(z as u64, Ordering::Relaxed);
    }

    /// The batch's page list: zero pages, and the others from `buf` in order.
    fn pages<'a>(&self, list: &[PageRef], zero: &[bool], buf: &'a [u8]) -> Vec<RamPage<'a>> {
        let ps = self.page_size;
        let mut pages = Vec::with_capacity(list.len());
        let mut s = 0usize;
        for (i, &(block, page, _)) in list.iter().enumerate() {
            if zero.get(i).copied().unwrap_or(true) {
                pages.push(RamPage::zero(block, page));
            } else {
                pages.push(RamPage::normal(block, page, &buf[s * ps..(s + 1) * ps]));
                s += 1;
            }
        }
        pages
    }

    /// Copies each page into its slot of `buf` (a volatile copy: the guest runs), then checks
    /// the copy for zero; a zero page gives its slot to the next page, so the others lie in
    /// order. Returns which pages are zero.
    fn fill(&self, list: &[PageRef], buf: &mut [u8]) -> Result<Vec<bool>, WireError> {
        let ps = self.page_size;
        let mut zero = vec![false; list.len()];
        let mut slot = 0usize;
        for (i, &(block, page, known)) in list.iter().enumerate() {
            if known {
                zero[i] = true;
                continue;
            }
            let dst = buf.get_mut(slot * ps..(slot + 1) * ps).ok_or_else(|| {
                WireError::InvalidArgument(format!("a page list of {} pages", list.len()))
            })?;
            self.view
                .copy_range(usize::from(block), u64::from(page) * ps as u64, dst)
                .map_err(|e: MachineError| {
                    WireError::InvalidArgument(format!(
                        "reading guest RAM block {block} page {page}: {}",
                        error_text(&e)
                    ))
                })?;
            if self.detect_zero && is_zero_page(dst) {
                zero[i] = true;
            } else {
                slot += 1;
            }
        }
        Ok(zero)
    }
}
