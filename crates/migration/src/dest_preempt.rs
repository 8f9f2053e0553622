//! The post-copy preempt channel on the destination (`postcopy-preempt`, `docs/postcopy.md`
//! §5, stream format §13.8; QEMU's `postcopy_preempt_new_channel` and its preempt thread).
//!
//! ```text
//!  CAPABILITIES bit 5 (must match this side) ─> POSTCOPY_PREEMPT{token} on the main (or a
//!  recovery) channel ─> thread `mig-dst-preempt`: accept on the same listener, [TLS],
//!  header + CONFIG, POSTCOPY_PREEMPT{token} checked ─> PREEMPT_ACK on the main return path
//!  ─> (after POSTCOPY_LISTEN) RAM placed through the one received set ─> END
//! ```
//!
//! A preempt channel that fails wakes the main reader (its socket's read side is shut down),
//! which fails or pauses with the preempt channel's error: a hostile record fails the
//! migration (`ERROR` to the source), a broken channel after `POSTCOPY_RUN` pauses it like a
//! broken main channel.

use std::io::BufReader;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::postcopy::{place_pages, SharedMissing};
use super::rp::{send_rp, RpWriter};
use super::{DestError, Receiver, READ_BUFFER};
use crate::liveness::{self, LivenessTimeout};
use crate::machine::{DirtyBitmap, MachineError, PageRequester, PostcopyPagingStats, PostcopySink};
use crate::stats::error_chain;
use crate::transport::tls_stream::{self, ServerTls};
use crate::transport::{CancelToken, Listener, Stream, TransportError};
use crate::wire::{Command, Expectations, Limits, Record, RpMessage, StreamReader, WireError};

type Sink = Arc<Mutex<Box<dyn PostcopySink>>>;

fn lock_sink(s: &Mutex<Box<dyn PostcopySink>>) -> MutexGuard<'_, Box<dyn PostcopySink>> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// The machine's [`PostcopySink`] shared by the main reader and the preempt reader: each call
/// takes the lock (always after the received set's, `place_pages`), so placements from both
/// channels are serialised page by page.
struct SharedSink(Sink);

impl PostcopySink for SharedSink {
    fn probe(&mut self) -> Result<(), MachineError> {
        lock_sink(&self.0).probe()
    }

    fn drop_pages(&mut self, block: usize, runs: &[(u64, u64)]) -> Result<(), MachineError> {
        lock_sink(&self.0).drop_pages(block, runs)
    }

    fn start(
        &mut self,
        missing: &[DirtyBitmap],
        dropped: &[DirtyBitmap],
        requester: Arc<dyn PageRequester>,
    ) -> Result<(), MachineError> {
        lock_sink(&self.0).start(missing, dropped, requester)
    }

    fn place(&mut self, block: usize, page: u64, data: &[u8]) -> Result<bool, MachineError> {
        lock_sink(&self.0).place(block, page, data)
    }

    fn place_zero(&mut self, block: usize, page: u64) -> Result<bool, MachineError> {
        lock_sink(&self.0).place_zero(block, page)
    }

    fn stats(&self) -> PostcopyPagingStats {
        lock_sink(&self.0).stats()
    }

    fn finish(&mut self) -> Result<(), MachineError> {
        lock_sink(&self.0).finish()
    }
}

/// Where the preempt reader places pages (published at `POSTCOPY_LISTEN`).
#[derive(Clone)]
struct Placer {
    missing: SharedMissing,
    sink: Sink,
}

/// What one preempt channel's thread shares with the main reader.
#[derive(Default)]
struct ChannelState {
    /// Set at `POSTCOPY_LISTEN` (or at once, for a recovery's channel).
    placer: Mutex<Option<Placer>>,
    /// The handshake passed (`PREEMPT_ACK` sent).
    accepted: AtomicBool,
    /// Pages placed from this channel.
    pages: AtomicU64,
    /// The channel failed and woke the main reader with this error.
    failure: Mutex<Option<DestError>>,
    /// The thread ended (`done_cv` is signalled).
    done: Mutex<bool>,
    done_cv: Condvar,
    /// Another handle on the accepted socket, to end a channel whose END never comes.
    socket: Mutex<Option<Stream>>,
}

impl ChannelState {
    /// Waits at most `limit` for the thread to end; whether it did.
    fn wait_done(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut g = self.done.lock().unwrap_or_else(|p| p.into_inner());
        while !*g {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .done_cv
                .wait_timeout(g, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }

    /// Shuts the accepted socket down (the reader fails at once).
    fn shut(&self) {
        let g = self.socket.lock().unwrap_or_else(|p| p.into_inner());
        let _ = match g.as_ref().map(Stream::plain) {
            Some(Stream::Tcp(s)) => s.shutdown(std::net::Shutdown::Both),
            Some(Stream::Unix(s)) => s.shutdown(std::net::Shutdown::Both),
            _ => Ok(()),
        };
    }
}

/// One preempt channel: its thread and shared state.
struct Channel {
    thread: JoinHandle<()>,
    state: Arc<ChannelState>,
}

/// The destination's preempt-channel state.
#[derive(Default)]
pub(super) struct PreemptRx {
    /// Both sides have `postcopy-preempt` (`CAPABILITIES` bit 5).
    negotiated: bool,
    /// The listener the preempt channel connects to (the `migrate-incoming` one, kept while
    /// the capability is on, or a recovery's).
    listener: Option<Arc<Listener>>,
    /// Set at `POSTCOPY_LISTEN`.
    placer: Option<Placer>,
    channel: Option<Channel>,
}

impl PreemptRx {
    /// Keeps `listener` for the preempt channel when the capability is on here.
    pub(super) fn keep_listener(&mut self, on: bool, listener: Listener) {
        if on {
            self.listener = Some(Arc::new(listener));
        }
    }

    /// A recovery's listener (its preempt channel connects there).
    pub(super) fn set_listener(&mut self, listener: Arc<Listener>) {
        self.listener = Some(listener);
    }
}

/// What the preempt thread needs.
struct Args {
    listener: Arc<Listener>,
    io: CancelToken,
    tls: Option<ServerTls>,
    liveness: LivenessTimeout,
    limits: Limits,
    expect: Expectations,
    token: [u8; 16],
    rp: RpWriter,
    state: Arc<ChannelState>,
}

fn hex(t: &[u8; 16]) -> String {
    t.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `e` is a broken channel (it pauses post-copy after RUN) rather than a refusal.
fn is_break(e: &DestError) -> bool {
    matches!(
        e,
        DestError::Inactive(_)
            | DestError::Transport(_)
            | DestError::Tls(_)
            | DestError::Wire(WireError::Io { .. } | WireError::Truncated { .. })
    )
}

/// Shuts the read side of the main channel down (its reader then sees the end of its stream
/// and takes the preempt channel's error); without a return path, cancels every socket.
fn wake_main(rp: &RpWriter, io: &CancelToken) {
    let g = rp.lock().unwrap_or_else(|p| p.into_inner());
    let done = match g.as_ref().map(Stream::plain) {
        Some(Stream::Tcp(s)) => s.shutdown(std::net::Shutdown::Read).is_ok(),
        Some(Stream::Unix(s)) => s.shutdown(std::net::Shutdown::Read).is_ok(),
        _ => false,
    };
    drop(g);
    if !done {
        io.cancel();
    }
}

fn run(a: Args) {
    let r = channel(&a);
    if let Err(e) = r {
        failed(&a, e);
    }
    *a.state.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
    a.state.done_cv.notify_all();
}

fn failed(a: &Args, e: DestError) {
    if a.io.is_cancelled() {
        // Stopped by this side (a pause, the end of the migration): nothing to report.
        tracing::debug!(error = %error_chain(&e), "preempt channel stopped");
        return;
    }
    let e = DestError::Preempt(Box::new(e));
    tracing::warn!(error = %error_chain(&e), "post-copy preempt channel failed");
    if !is_break(preempt_cause(&e)) {
        // A refusal: the source shows why (a break is seen by the source itself).
        let _ = send_rp(
            &a.rp,
            &RpMessage::Error {
                message: error_chain(&e),
            },
        );
    }
    *a.state.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    wake_main(&a.rp, &a.io);
}

/// The error inside [`DestError::Preempt`] wrappers.
fn preempt_cause(e: &DestError) -> &DestError {
    let mut e = e;
    while let DestError::Preempt(inner) = e {
        e = inner.as_ref();
    }
    e
}

fn channel(a: &Args) -> Result<(), DestError> {
    let stream = a.listener.accept_next(&a.io)?;
    let stream = match &a.tls {
        Some(tls) => tls_stream::server(stream, tls, a.liveness.limit()).map_err(|f| f.error)?,
        None => stream,
    };
    *a.state.socket.lock().unwrap_or_else(|p| p.into_inner()) =
        stream.try_clone_for_return_path().ok().flatten();
    // Keepalive and the user timeout, but no read timeout: the preempt channel is idle
    // whenever the guest faults on nothing (decision 157).
    liveness::arm(&stream, a.liveness, None)
        .and_then(|()| match stream.plain() {
            Stream::Tcp(s) => s.set_read_timeout(None),
            Stream::Unix(s) => s.set_read_timeout(None),
            _ => Ok(()),
        })
        .map_err(|source| TransportError::Io {
            op: "set the liveness options on",
            target: "the preempt channel".into(),
            source,
        })?;
    let mut reader = StreamReader::preempt(
        BufReader::with_capacity(READ_BUFFER, stream),
        a.limits.clone(),
        a.expect.clone(),
    )?;
    match reader.next_record()? {
        Record::Command(Command::PostcopyPreempt { token }) if token == a.token => {}
        Record::Command(Command::PostcopyPreempt { token }) => {
            return Err(DestError::Protocol(format!(
                "a preempt channel for an unknown migration (token {}, this migration announced {})",
                hex(&token),
                hex(&a.token)
            )))
        }
        other => {
            return Err(DestError::Protocol(format!(
                "a preempt channel starting with {}",
                other.name()
            )))
        }
    }
    a.state.accepted.store(true, Ordering::SeqCst);
    send_rp(&a.rp, &RpMessage::PreemptAck)
        .map_err(|e| DestError::Protocol(format!("cannot send PREEMPT_ACK: {e}")))?;
    tracing::info!("post-copy preempt channel accepted");
    loop {
        match reader.next_record()? {
            Record::Ram(batch) => {
                let placer = a
                    .state
                    .placer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .ok_or_else(|| {
                        DestError::Protocol(
                            "RAM on the preempt channel before POSTCOPY_LISTEN".into(),
                        )
                    })?;
                let mut sink = SharedSink(placer.sink.clone());
                place_pages(&placer.missing, &mut sink, &batch)?;
                a.state
                    .pages
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Record::End(_) => {
                tracing::info!(
                    pages = a.state.pages.load(Ordering::Relaxed),
                    "post-copy preempt channel ended"
                );
                return Ok(());
            }
            other => {
                // The preempt reader admits nothing else (§13.8).
                return Err(DestError::Protocol(format!(
                    "{} on the preempt channel",
                    other.name()
                )));
            }
        }
    }
}

impl Receiver {
    /// `CAPABILITIES` bit 5: `postcopy-preempt` must be set on both sides.
    pub(super) fn preempt_capability(&mut self, source_on: bool) -> Result<(), DestError> {
        if source_on != self.opts.postcopy_preempt {
            let side = |on: bool| if on { "on" } else { "off" };
            return Err(DestError::Protocol(format!(
                "capability 'postcopy-preempt' is {} at the source but {} at the destination: it must be set on both sides",
                side(source_on),
                side(self.opts.postcopy_preempt)
            )));
        }
        self.preempt.negotiated = source_on;
        Ok(())
    }

    /// `POSTCOPY_PREEMPT{token}` on the main or a recovery channel: the preempt channel is
    /// accepted and read on its own thread.
    pub(super) fn preempt_announced(&mut self, token: [u8; 16]) -> Result<(), DestError> {
        if !self.preempt.negotiated {
            return Err(DestError::Protocol(
                "a preempt channel, but postcopy-preempt was not negotiated".into(),
            ));
        }
        let listener = self.preempt.listener.clone().ok_or_else(|| {
            DestError::Protocol(
                "a preempt channel, but this destination has no listener to accept it on".into(),
            )
        })?;
        if let Some(old) = self.preempt.channel.take() {
            // A recovery's new channel: the old one ended with the channel it belonged to.
            let _ = old.thread.join();
        }
        let (_, expect, limits) = self.expectations();
        let state = Arc::new(ChannelState::default());
        *state.placer.lock().unwrap_or_else(|p| p.into_inner()) = self.preempt.placer.clone();
        let args = Args {
            listener,
            io: self.shared.io.clone(),
            tls: self.opts.tls.clone(),
            liveness: self.opts.liveness,
            limits,
            expect,
            token,
            rp: self.rp.clone(),
            state: state.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("mig-dst-preempt".into())
            .spawn(move || run(args))
            .map_err(DestError::Spawn)?;
        self.preempt.channel = Some(Channel { thread, state });
        Ok(())
    }

    /// Whether the preempt channel passed its handshake (always true without the capability).
    fn preempt_ready(&self, what: &str) -> Result<(), DestError> {
        if !self.preempt.negotiated {
            return Ok(());
        }
        match &self.preempt.channel {
            Some(c) if c.state.accepted.load(Ordering::SeqCst) => Ok(()),
            _ => Err(DestError::Protocol(format!(
                "{what} without its preempt channel (postcopy-preempt is on)"
            ))),
        }
    }

    /// `POSTCOPY_LISTEN`: the preempt channel must be up; the sink is shared with it and the
    /// preempt reader may place pages from now on.
    pub(super) fn preempt_listen(&mut self, missing: SharedMissing) -> Result<(), DestError> {
        if !self.preempt.negotiated {
            return Ok(());
        }
        self.preempt_ready("the post-copy switch")?;
        let sink = self
            .m
            .postcopy
            .take()
            .ok_or_else(|| DestError::Protocol("no post-copy sink".into()))?;
        let sink: Sink = Arc::new(Mutex::new(sink));
        self.m.postcopy = Some(Box::new(SharedSink(sink.clone())));
        let placer = Placer { missing, sink };
        if let Some(c) = &self.preempt.channel {
            *c.state.placer.lock().unwrap_or_else(|p| p.into_inner()) = Some(placer.clone());
        }
        self.preempt.placer = Some(placer);
        Ok(())
    }

    /// `POSTCOPY_RESUME`: the recovery's preempt channel must be up.
    pub(super) fn preempt_resume(&self) -> Result<(), DestError> {
        self.preempt_ready("POSTCOPY_RESUME")
    }

    /// At the main channel's END: waits for the preempt reader to read its own END (every
    /// page it carried is then placed); its failure fails the migration.
    pub(super) fn join_preempt(&mut self) -> Result<(), DestError> {
        let Some(c) = self.preempt.channel.take() else {
            return Ok(());
        };
        // The source wrote the preempt channel's END before this one: a channel whose END
        // does not follow within the liveness limit is ended here (a hostile or stuck peer).
        let limit = self
            .opts
            .liveness
            .limit()
            .unwrap_or(Duration::from_secs(10));
        if !c.state.wait_done(limit) {
            c.state.shut();
            let _ = c.thread.join();
            return Err(DestError::Preempt(Box::new(DestError::Protocol(format!(
                "its END did not follow the main channel's within {} ms",
                limit.as_millis()
            )))));
        }
        let _ = c.thread.join();
        let failure = c
            .state
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The preempt channel's failure, when it is what ended the main reader.
    pub(super) fn preempt_failure(&self) -> Option<DestError> {
        let c = self.preempt.channel.as_ref()?;
        let mut g = c.state.failure.lock().unwrap_or_else(|p| p.into_inner());
        g.take()
    }

    /// Stops the preempt reader (the caller cancelled every socket) and waits for it.
    pub(super) fn stop_preempt(&mut self) {
        if let Some(c) = self.preempt.channel.take() {
            let _ = c.thread.join();
        }
    }
}
