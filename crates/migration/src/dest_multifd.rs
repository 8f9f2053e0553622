//! Multifd on the destination (`docs/migration-engine.md` §2.5, `docs/stream-format.md`
//! §5.2): the capability check, the accept of the channels on the main stream's listener
//! (TLS, admission, the hostile-input checks of the handshake), the receiver threads
//! `mig-mfd-recv-K`, and the sync barrier `mig-dst` waits on at every sync point and at END.

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{DestError, Receiver};
use crate::digest::PageHasher;
use crate::liveness::{self, Inactivity};
use crate::machine::{MachineError, PagePlacer};
use crate::stats::error_chain;
use crate::transport::{tls_stream, Listener, Stream};
use crate::wire::{
    ChannelExpect, ChannelHandshake, ChannelReader, ChannelRecord, Compression, PageData,
    StreamConfig,
};

/// The handshake timeout when `x-tern-liveness-timeout` is off.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a wait of `mig-dst` on the channels looks at a cancel.
const CANCEL_CHECK: Duration = Duration::from_millis(100);
/// Read buffer of a channel (a batch is read with one call into the reader's own buffer).
const READ_BUFFER: usize = 256 << 10;

/// What the receivers and `mig-dst` share.
#[derive(Debug, Default)]
struct BarrierState {
    /// Per channel, the last generation it delivered `SYNC` for.
    synced: Vec<u32>,
    /// The generation up to which the channels may go on (they wait after `SYNC` g until
    /// `released >= g`).
    released: u32,
    /// END verified every channel's final `SYNC`: the receivers end.
    finished: bool,
    /// The first failure (a channel's, or the main stream's: `aborted`).
    error: Option<String>,
    aborted: bool,
    /// The main stream's socket: a channel's failure shuts its reading side down, so that
    /// `mig-dst`, blocked reading the main stream, ends at once and reports the channel's
    /// error (its return path still carries `ERROR`).
    main: Option<Stream>,
}

#[derive(Debug, Default)]
struct Barrier {
    state: Mutex<BarrierState>,
    cv: Condvar,
}

impl Barrier {
    fn lock(&self) -> MutexGuard<'_, BarrierState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, text: String) {
        let mut g = self.lock();
        g.error.get_or_insert(text);
        if let Some(m) = g.main.take() {
            // Best effort: a socket already closed needs nothing.
            let _ = socket2::SockRef::from(&m.as_fd()).shutdown(std::net::Shutdown::Read);
        }
        drop(g);
        self.cv.notify_all();
    }

    /// A receiver read `SYNC` for `generation`: records it, then waits for the release. Ok(true)
    /// = go on, Ok(false) = the migration's RAM is complete, end.
    fn synced(&self, k: usize, generation: u32) -> Result<bool, ()> {
        let mut g = self.lock();
        if let Some(s) = g.synced.get_mut(k) {
            *s = generation;
        }
        self.cv.notify_all();
        loop {
            if g.error.is_some() || g.aborted {
                return Err(());
            }
            if g.finished {
                return Ok(false);
            }
            if g.released >= generation {
                return Ok(true);
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The channels of one incoming migration.
pub(super) struct MultifdRx {
    barrier: Arc<Barrier>,
    threads: Vec<JoinHandle<()>>,
    /// Handles on the channel sockets, to shut them down when the migration ends early.
    sockets: Vec<Stream>,
    /// The generation the main stream is in.
    generation: u32,
}

impl MultifdRx {
    fn shutdown(&mut self) {
        {
            let mut g = self.barrier.lock();
            g.aborted = true;
        }
        self.barrier.cv.notify_all();
        for s in &self.sockets {
            // Best effort: a socket already closed by its peer needs nothing.
            let _ = socket2::SockRef::from(&s.as_fd()).shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for MultifdRx {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One receiver thread's world.
struct RecvCtx {
    k: u16,
    placer: Arc<dyn PagePlacer>,
    barrier: Arc<Barrier>,
    sink_pages: Vec<u64>,
    /// With `postcopy-ram` (§5.4): the received set, so that post-copy neither requests nor
    /// expects a page a channel placed (before any discard: the channels end first).
    missing: Option<super::postcopy::SharedMissing>,
    /// With `x-tern-ram-digest` (decision 252): reads back every page this receiver loads and
    /// records its digest in the digests shared with `mig-dst`.
    digest: Option<PageHasher>,
}

impl RecvCtx {
    fn run(mut self, mut reader: ChannelReader<std::io::BufReader<Stream>>) {
        let idx = usize::from(self.k) - 1;
        let result = loop {
            match reader.next_record() {
                Ok(ChannelRecord::Batch(b)) => {
                    if let Err(e) = self.place(&b) {
                        break Err(e);
                    }
                }
                Ok(ChannelRecord::Sync { generation }) => {
                    if let Some(h) = &mut self.digest {
                        h.flush();
                    }
                    // Every page of `generation` this channel carried is placed and its digest
                    // recorded before the barrier hears of it (the digests' order, pages.rs).
                    match self.barrier.synced(idx, generation) {
                        Ok(true) => {}
                        Ok(false) => break Ok(()),
                        // The migration already failed elsewhere: nothing to add.
                        Err(()) => return,
                    }
                }
                Ok(ChannelRecord::Keepalive) => {}
                Err(e) => {
                    let text = match Inactivity::find(&e) {
                        Some(i) => i.describe("source"),
                        None => error_chain(&e),
                    };
                    break Err(text);
                }
            }
        };
        if let Err(text) = result {
            let aborted = self.barrier.lock().aborted;
            if !aborted {
                tracing::warn!(channel = self.k, error = %text, "multifd channel failed");
                self.barrier
                    .fail(format!("multifd channel {}: {text}", self.k));
            }
        }
    }

    fn place(&mut self, b: &crate::wire::RamBatch<'_>) -> Result<(), String> {
        super::populate::normal_runs(b, |block, first, n| {
            self.placer.prepare_pages(block, first, n);
        });
        // The reader checked the batch's generation against the channel's (§5.2; a channel's
        // batches always have a header).
        let generation = b.header().map(|h| h.generation);
        for p in b.pages() {
            let (block, page) = (usize::from(p.block), u64::from(p.page));
            if self.sink_pages.get(block).is_none_or(|n| page >= *n) {
                return Err(format!(
                    "RAM page {page} of block {block} is outside this machine's RAM"
                ));
            }
            let r: Result<(), MachineError> = match p.data {
                PageData::Zero => self.placer.zero_page(block, page),
                PageData::Normal(d) => self.placer.write_page(block, page, d),
            };
            r.map_err(|e| format!("loading RAM block {block} page {page}: {}", error_chain(&e)))?;
            if let Some(h) = &mut self.digest {
                let placer = &self.placer;
                h.loaded(block, page, generation, |buf| {
                    placer.read_page(block, page, buf)
                })
                .map_err(|e| error_chain(&e))?;
            }
        }
        if let Some(m) = &self.missing {
            let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
            for p in b.pages() {
                m.received(usize::from(p.block), u64::from(p.page));
            }
        }
        Ok(())
    }
}

/// Waits until `fd` is readable (a connection to accept), at most `timeout`.
fn readable(fd: std::os::fd::BorrowedFd<'_>, timeout: Duration) -> std::io::Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: `p` is one valid, initialised pollfd that lives across the call, and the
        // count passed is 1; the fd is borrowed for the call's duration.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Sets (or clears) the receive timeout of a socket (the handshake's bound when the liveness
/// timeout is off).
fn set_read_timeout(s: &Stream, t: Option<Duration>) -> std::io::Result<()> {
    match s.plain() {
        Stream::Tcp(t0) => t0.set_read_timeout(t),
        Stream::Unix(u) => u.set_read_timeout(t),
        _ => Ok(()),
    }
}

impl Receiver {
    /// `CAPABILITIES` bit 6 against this side's `multifd` (one-sided → fail, naming both).
    pub(super) fn multifd_capability(&self, source_on: bool) -> Result<(), DestError> {
        let here = self.opts.multifd_channels.is_some();
        if source_on != here {
            let side = |on: bool| if on { "on" } else { "off" };
            return Err(DestError::Protocol(format!(
                "capability 'multifd' is {} at the source but {} at the destination: it must be set on both sides",
                side(source_on),
                side(here)
            )));
        }
        Ok(())
    }

    /// `MULTIFD_CHANNELS`'s compression against this side's `multifd-compression` (a
    /// difference fails at once, naming both; `docs/stream-format.md` §5.3).
    pub(super) fn multifd_compression(&self, source: Compression) -> Result<(), DestError> {
        let here = self.opts.multifd_compression;
        if source != here {
            return Err(DestError::Protocol(format!(
                "multifd-compression: source {source}, destination {here}: it must be the same on both sides"
            )));
        }
        Ok(())
    }

    /// `MULTIFD_CHANNELS`: checks the count, accepts every channel (TLS, handshake) within the
    /// handshake timeout, and starts the receivers.
    pub(super) fn multifd_accept(
        &mut self,
        channels: u16,
        id: [u8; 16],
        version: u32,
        config: &StreamConfig,
    ) -> Result<(), DestError> {
        let here = self.opts.multifd_channels.unwrap_or(0);
        if channels != here {
            return Err(DestError::Protocol(format!(
                "multifd-channels: source {channels}, destination {here}: it must be the same on both sides"
            )));
        }
        let listener = self.listener.take().ok_or_else(|| {
            DestError::Protocol(
                "multifd needs a destination listening on a tcp: or unix: URI (migrate-incoming)"
                    .into(),
            )
        })?;
        let placer = self.m.ram.placer().map_err(|source| DestError::Machine {
            op: "multifd: a writer of guest memory for the channels".into(),
            source,
        })?;
        let sink_pages: Vec<u64> = self
            .m
            .ram
            .blocks()
            .iter()
            .map(|b| b.pages(config.page_size))
            .collect();
        let timeout = self.opts.liveness.limit().unwrap_or(HANDSHAKE_TIMEOUT);
        let expect = ChannelExpect {
            version,
            channels,
            id,
        };
        let barrier = Arc::new(Barrier::default());
        {
            let rp = self.rp.lock().unwrap_or_else(|p| p.into_inner());
            let main = rp.as_ref().or(self.rp_spare.as_ref());
            let mut g = barrier.lock();
            g.synced = vec![0; usize::from(channels)];
            g.main = main.and_then(|s| s.try_clone_for_return_path().ok().flatten());
        }
        let mut rx = MultifdRx {
            barrier: barrier.clone(),
            threads: Vec::new(),
            sockets: Vec::new(),
            generation: 1,
        };
        let mut seen = vec![false; usize::from(channels)];
        let mut readers: Vec<(u16, ChannelReader<std::io::BufReader<Stream>>)> = Vec::new();
        let deadline = Instant::now() + timeout;
        for arrival in 1..=channels {
            let left = deadline.saturating_duration_since(Instant::now());
            let fd = match &listener {
                Listener::Tcp(l) => l.as_fd(),
                Listener::Unix(l, _) => l.as_fd(),
                Listener::File(..) => {
                    return Err(DestError::Protocol(
                        "multifd from a file: URI is not supported by Tern".into(),
                    ))
                }
            };
            let ready = readable(fd, left).map_err(|e| {
                DestError::Protocol(format!("multifd: waiting for the channels: {e}"))
            })?;
            if self.shared.cancel.load(Ordering::SeqCst) {
                return Err(DestError::Cancelled);
            }
            if !ready {
                let missing: Vec<String> = seen
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| !**s)
                    .map(|(i, _)| (i + 1).to_string())
                    .collect();
                return Err(DestError::Protocol(format!(
                    "multifd channel(s) {} of 1..={channels} did not connect within {} ms",
                    missing.join(", "),
                    timeout.as_millis()
                )));
            }
            let stream = listener.accept_next(&self.shared.io)?;
            let (k, reader) = self
                .multifd_handshake(stream, &expect, &seen, timeout, config)
                .map_err(|e| {
                    DestError::Protocol(format!(
                        "multifd connection {arrival} (in order of arrival): {e}"
                    ))
                })?;
            if let Some(s) = seen.get_mut(usize::from(k) - 1) {
                *s = true;
            }
            if let Ok(Some(clone)) = reader.get_ref().get_ref().try_clone_for_return_path() {
                rx.sockets.push(clone);
            }
            readers.push((k, reader));
        }
        for (k, reader) in readers {
            let ctx = RecvCtx {
                k,
                placer: placer.clone(),
                barrier: barrier.clone(),
                sink_pages: sink_pages.clone(),
                missing: self.pc.as_ref().map(|pc| pc.shared_missing()),
                digest: self.digest.shared().map(PageHasher::new),
            };
            let t = std::thread::Builder::new()
                .name(format!("mig-mfd-recv-{k}"))
                .spawn(move || ctx.run(reader))
                .map_err(DestError::Spawn)?;
            rx.threads.push(t);
        }
        tracing::debug!(channels, "multifd channels accepted");
        self.mf = Some(rx);
        // Keep the listener (a unix socket file goes away when it drops) until the end; with
        // `postcopy-preempt` the preempt channel connects to it at the switch (§5.4).
        if self.opts.postcopy_preempt {
            self.preempt.keep_listener(true, listener);
        } else {
            self.listener = Some(listener);
        }
        Ok(())
    }

    /// One accepted connection: TLS (handshake and admission), liveness options, the 32-byte
    /// handshake checked. Returns its channel index and its reader.
    fn multifd_handshake(
        &self,
        stream: Stream,
        expect: &ChannelExpect,
        seen: &[bool],
        timeout: Duration,
        config: &StreamConfig,
    ) -> Result<(u16, ChannelReader<std::io::BufReader<Stream>>), String> {
        let mut stream = match &self.opts.tls {
            Some(tls) => tls_stream::server(stream, tls, Some(timeout))
                .map_err(|f| format!("TLS: {}", error_chain(&f.error)))?,
            None => stream,
        };
        set_read_timeout(&stream, Some(timeout)).map_err(|e| format!("socket options: {e}"))?;
        let h = ChannelHandshake::read_checked(&mut stream, expect, seen)
            .map_err(|e| error_chain(&e))?;
        set_read_timeout(&stream, None).map_err(|e| format!("socket options: {e}"))?;
        liveness::arm(&stream, self.opts.liveness, None)
            .map_err(|e| format!("setting the liveness options: {e}"))?;
        let reader = ChannelReader::new(
            std::io::BufReader::with_capacity(READ_BUFFER, stream),
            h.channel,
            config,
            &self.opts.limits,
        )
        .with_decompression(self.opts.multifd_compression)
        .map_err(|e| error_chain(&e))?;
        Ok((h.channel, reader))
    }

    /// The receive error to report: a channel's failure when there was one (it also ended the
    /// main stream's read, whose error says less).
    pub(super) fn prefer_multifd_error(&self, e: DestError) -> DestError {
        match self
            .mf
            .as_ref()
            .and_then(|m| m.barrier.lock().error.clone())
        {
            Some(text) if !matches!(e, DestError::Cancelled) => DestError::Protocol(text),
            _ => e,
        }
    }

    /// A sync point on the main stream: waits until every channel delivered `SYNC` for the
    /// generation it ends, then lets them into the next one.
    pub(super) fn multifd_sync_point(&mut self) -> Result<(), DestError> {
        self.multifd_wait(false)
    }

    /// END, or `MULTIFD_END` at the switch to post-copy (§5.4): waits for every channel's
    /// final `SYNC` (every page a channel carried is placed), ends the receivers and shuts the
    /// channel sockets down: nothing is read from a channel after this. Without channels (after
    /// `MULTIFD_END`), nothing to do.
    pub(super) fn multifd_end(&mut self) -> Result<(), DestError> {
        self.multifd_wait(true)?;
        if let Some(mut rx) = self.mf.take() {
            for t in rx.threads.drain(..) {
                let _ = t.join();
            }
        }
        Ok(())
    }

    fn multifd_wait(&mut self, end: bool) -> Result<(), DestError> {
        let Some(rx) = self.mf.as_mut() else {
            return Ok(());
        };
        let gen = rx.generation;
        let barrier = rx.barrier.clone();
        let mut g = barrier.lock();
        loop {
            if let Some(e) = &g.error {
                return Err(DestError::Protocol(e.clone()));
            }
            if self.shared.cancel.load(Ordering::SeqCst) {
                return Err(DestError::Cancelled);
            }
            if g.synced.iter().all(|&s| s >= gen) {
                break;
            }
            g = barrier
                .cv
                .wait_timeout(g, CANCEL_CHECK)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        if end {
            g.finished = true;
        } else {
            g.released = gen;
        }
        drop(g);
        barrier.cv.notify_all();
        rx.generation = gen.saturating_add(1);
        Ok(())
    }
}
