//! The receiver: an explicit state machine run by the `mig-dst` thread.
//!
//! ```text
//!  setup (listening) ──accept──> active ──CONFIG ok──> loading ──END ok──> finishing ──> completed
//!        │                         │                     │                   │
//!        └──────── cancel / any error (stream, config, machine, loader) ─────┴──> failed
//! ```
//!
//! * **active / CONFIG**: the source's configuration is checked against this machine (page
//!   size, vCPUs, TSC, RAM blocks, CPUID by the wire reader, UUID with `validate-uuid` on
//!   either side, the machine blob by the machine); a mismatch names the field.
//! * **loading**: RAM pages go to the [`RamSink`] (indexes checked by the reader and again
//!   against the sink), device chunks to their [`StateLoader`], final SECTIONs are kept aside
//!   (the reader bounds their count and bytes, and accepts them only after
//!   `SWITCHOVER_START`); `OPEN_RETURN_PATH` opens the return path, `PING` is answered.
//! * **finishing** (only after END and its checksum were verified): loaders' final states,
//!   `restore_components`, resume (unless `autostart` is off), `RESUMED`, `SHUT{0}`.
//! * **failed**: nothing runs; loaders clean up; the return path carries `ERROR{text}` and
//!   `SHUT{1}` so the source can show the reason, and (when the source opened it) the receiver
//!   waits, at most [`LINGER`], for the source to close before it reports `failed`: the glue
//!   may end the process then (`exit-on-error`). Cancel: `failed`, "incoming migration
//!   cancelled".
//!
//! Switchover-ack: with the capability on, the loaders whose `switchover_ack_needed()` is true
//! are counted after CONFIG; each approves through its [`SwitchoverApproval`]; when the count
//! is reached and the return path is open, `SWITCHOVER_ACK` is sent, at once when nobody needs it.

use std::io::BufReader;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::digest::DigestCheck;
use crate::events::EventSink;
use crate::liveness::{self, LivenessTimeout};
use crate::machine::{
    ComponentState, ComponentVersion, MachineState, RamSink, StateLoader, SwitchoverApproval,
    VcpuControl,
};
use crate::params::{Capabilities, Capability};
use crate::stats::{error_chain, MigrationStats, SwitchoverAckStats};
use crate::status::MigrationStatus;
use crate::transport::tls_stream::{self, ServerTls};
use crate::transport::{CancelToken, Listener, Stream, TransportError};
use crate::wire::{
    Command, Compression, Expectations, Limits, PageData, Record, RpMessage, StreamConfig,
    StreamReader, WireError,
};

#[path = "dest_error.rs"]
mod error;
#[path = "dest_multifd.rs"]
mod multifd;
#[path = "dest_populate.rs"]
mod populate;
#[path = "dest_postcopy.rs"]
mod postcopy;
#[path = "dest_preempt.rs"]
mod preempt;
#[path = "dest_recovery.rs"]
mod recovery;
#[path = "dest_restore.rs"]
mod restore;
pub use error::DestError;
pub use recovery::{PAUSE_NOT_POSTCOPY, RECOVER_NOT_PAUSED};
#[path = "dest_rp.rs"]
mod rp;

use rp::{send_rp, AckInner, AckState, RpWriter};

const READ_BUFFER: usize = 256 << 10;
/// Longest a failed destination waits for the source to close after `SHUT{1}`.
const LINGER: Duration = Duration::from_secs(2);

/// How the receiver behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestOptions {
    /// `validate-uuid` on this side: the source's UUID must equal this machine's (the source's
    /// own `validate-uuid`, carried in `CAPABILITIES`, asks for the same check).
    pub validate_uuid: bool,
    /// `switchover-ack`: send `SWITCHOVER_ACK` once every loader that needs it approved.
    pub switchover_ack: bool,
    /// Resume the vCPUs after the load (QEMU's autostart; false = stay paused, like `-S`).
    pub autostart: bool,
    /// Limits applied to the incoming stream.
    pub limits: Limits,
    /// `x-tern-liveness-timeout`: fail when nothing arrives from the source for this long.
    pub liveness: LivenessTimeout,
    /// `x-tern-ram-digest`: require the source's RAM digest (a stream without one fails at
    /// `CAPABILITIES`); a digest the source sends is checked whatever this setting.
    pub ram_digest: bool,
    /// `tls-creds` (+ `tls-authz`): the source must complete a TLS handshake (destination =
    /// server) and be admitted before one byte of the stream is read.
    pub tls: Option<ServerTls>,
    /// `postcopy-ram`: accept post-copy (the source's setting must match; the machine must
    /// have a [`crate::machine::PostcopySink`]).
    pub postcopy_ram: bool,
    /// `postcopy-blocktime`: publish QEMU's blocktimes in `query-migrate`.
    pub postcopy_blocktime: bool,
    /// `postcopy-preempt`: accept the source's preempt channel (the source's setting must
    /// match; `dest_preempt.rs`).
    pub postcopy_preempt: bool,
    /// `multifd` with `multifd-channels`: accept this many channels beside the main stream
    /// (the source's count must be the same); `None` = `multifd` off.
    pub multifd_channels: Option<u16>,
    /// `multifd-compression`: the method the source must name in `MULTIFD_CHANNELS` (the
    /// level is the sender's alone; `docs/stream-format.md` §5.3).
    pub multifd_compression: Compression,
}

impl Default for DestOptions {
    fn default() -> Self {
        Self {
            validate_uuid: false,
            switchover_ack: false,
            autostart: true,
            limits: Limits::default(),
            liveness: LivenessTimeout::default(),
            ram_digest: false,
            tls: None,
            postcopy_ram: false,
            postcopy_blocktime: false,
            postcopy_preempt: false,
            multifd_channels: None,
            multifd_compression: Compression::None,
        }
    }
}

impl DestOptions {
    /// Options from QEMU-style capabilities.
    pub fn from_qemu(caps: &Capabilities, autostart: bool) -> Self {
        Self {
            validate_uuid: caps.get(Capability::ValidateUuid),
            switchover_ack: caps.get(Capability::SwitchoverAck),
            autostart,
            limits: Limits::default(),
            liveness: LivenessTimeout::default(),
            ram_digest: caps.get(Capability::XTernRamDigest),
            tls: None,
            postcopy_ram: caps.get(Capability::PostcopyRam),
            postcopy_blocktime: caps.get(Capability::PostcopyBlocktime),
            postcopy_preempt: caps.get(Capability::PostcopyPreempt),
            // QEMU's default `multifd-channels`; the glue sets the parameter's value.
            multifd_channels: caps.get(Capability::Multifd).then_some(2),
            // The glue sets the parameter's value.
            multifd_compression: Compression::None,
        }
    }
}

/// The machine as the receiver sees it (created before the migration, vCPUs paused).
pub struct DestMachine {
    /// Guest RAM.
    pub ram: Box<dyn RamSink>,
    /// vCPU run control.
    pub vcpus: Box<dyn VcpuControl>,
    /// Loaders of the devices with state beside RAM.
    pub loaders: Vec<Box<dyn StateLoader>>,
    /// Every non-iterative component.
    pub state: Box<dyn MachineState>,
    /// Demand paging for post-copy; `None`: this machine refuses `postcopy-ram`.
    pub postcopy: Option<Box<dyn crate::machine::PostcopySink>>,
}

/// Where the stream comes from.
#[derive(Debug)]
pub enum Incoming {
    /// Wait for the source on this listener (or read this file).
    Listener(Listener),
    /// An already connected channel.
    Stream(Stream),
}

/// The end of an incoming migration.
pub struct DestOutcome {
    /// `completed` or `failed`.
    pub status: MigrationStatus,
    /// `error-desc`.
    pub error: Option<String>,
    /// The machine, handed back (running when completed with autostart).
    pub machine: DestMachine,
}

struct Shared {
    status: Mutex<MigrationStatus>,
    cancel: AtomicBool,
    io: CancelToken,
    /// QEMU's autostart as it is now: `stop` / `cont` during `inmigrate` change it until the
    /// guest is loaded ([`DestHandle::set_autostart`]).
    autostart: AtomicBool,
    /// The guest is loaded and about to resume (or stay paused): from here `migrate_cancel`
    /// can no longer undo the migration. Set and read under `status`'s lock.
    committed: AtomicBool,
    /// Post-copy recovery: the listener `migrate-recover` bound, taken by the receiver.
    recover: Mutex<RecoverSlot>,
    recover_cv: std::sync::Condvar,
    /// `migrate-pause` shut the channel down: the receiver pauses (and says why).
    pause_requested: AtomicBool,
}

/// Post-copy recovery's hand-over between `migrate-recover` and the receiver.
#[derive(Default)]
struct RecoverSlot {
    /// The listener `migrate-recover` bound, not taken yet.
    listener: Option<Listener>,
    /// The receiver waits in `accept` on a listener it took: a newer `migrate-recover`
    /// replaces it (QEMU releases the old transport), cancelling that wait.
    accepting: bool,
}

/// Control of an incoming migration.
pub struct DestHandle {
    shared: Arc<Shared>,
    stats: MigrationStats,
    thread: JoinHandle<DestOutcome>,
}

impl DestHandle {
    /// Cancels (the destination ends `failed`); a no-op once it ended. Returns false, and
    /// changes nothing, when it is too late: the whole stream was loaded and the guest is
    /// being resumed (or kept paused) here.
    pub fn cancel(&self) -> bool {
        {
            let st = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
            if st.is_terminal() {
                return true;
            }
            if self.shared.committed.load(Ordering::SeqCst) {
                return false;
            }
            self.shared.cancel.store(true, Ordering::SeqCst);
        }
        self.shared.io.cancel();
        true
    }

    /// QEMU's autostart changed during `inmigrate` (`stop`: stay paused when loaded; `cont`:
    /// run when loaded). Returns false when the guest was already loaded and the choice was
    /// made.
    pub fn set_autostart(&self, on: bool) -> bool {
        let _st = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
        if self.shared.committed.load(Ordering::SeqCst) {
            return false;
        }
        self.shared.autostart.store(on, Ordering::SeqCst);
        true
    }

    /// Live statistics (`query-migrate` on the destination).
    pub fn stats(&self) -> &MigrationStats {
        &self.stats
    }

    /// Current status.
    pub fn status(&self) -> MigrationStatus {
        *self.shared.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the receiver thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the end and takes the machine back.
    pub fn join(self) -> Result<DestOutcome, DestError> {
        self.thread.join().map_err(|_| DestError::Panicked)
    }
}

/// Starts receiving (QMP `migrate-incoming`, after the listener was bound so the caller could
/// report the real port). Status `setup` at once; the rest runs in the `mig-dst` thread.
pub fn incoming(
    machine: DestMachine,
    from: Incoming,
    opts: DestOptions,
    events: Arc<dyn EventSink>,
    stats: MigrationStats,
) -> Result<DestHandle, DestError> {
    let shared = Arc::new(Shared {
        status: Mutex::new(MigrationStatus::Setup),
        cancel: AtomicBool::new(false),
        io: CancelToken::new(),
        autostart: AtomicBool::new(opts.autostart),
        committed: AtomicBool::new(false),
        recover: Mutex::new(RecoverSlot::default()),
        recover_cv: std::sync::Condvar::new(),
        pause_requested: AtomicBool::new(false),
    });
    if let Incoming::Listener(l) = &from {
        stats.set_socket_address(l.local_uri().socket_address_json().into_iter().collect());
    }
    stats.begin(Instant::now());
    events.migration_status(MigrationStatus::Setup);
    let rx = Receiver {
        m: machine,
        opts,
        shared: shared.clone(),
        events,
        stats: stats.clone(),
        rp: Arc::new(Mutex::new(None)),
        rp_spare: None,
        ack: None,
        source_running: None,
        last_pong: Arc::new(AtomicU32::new(0)),
        rp_open: false,
        digest: DigestCheck::default(),
        pc: None,
        preempt: preempt::PreemptRx::default(),
        listener: None,
        mf: None,
    };
    let thread = std::thread::Builder::new()
        .name("mig-dst".into())
        .spawn(move || rx.run(from))
        .map_err(DestError::Spawn)?;
    Ok(DestHandle {
        shared,
        stats,
        thread,
    })
}

struct Receiver {
    m: DestMachine,
    opts: DestOptions,
    shared: Arc<Shared>,
    events: Arc<dyn EventSink>,
    stats: MigrationStats,
    rp: RpWriter,
    /// The reverse direction of the socket until `OPEN_RETURN_PATH` takes it.
    rp_spare: Option<Stream>,
    ack: Option<Arc<AckState>>,
    /// The source's run state at the switchover (`RUN_STATE`); `None` = not sent.
    source_running: Option<bool>,
    /// Sequence number of the latest `PONG` sent (0 = none yet), repeated as the keepalive.
    last_pong: Arc<AtomicU32>,
    /// `OPEN_RETURN_PATH` arrived: the source reads the return path.
    rp_open: bool,
    /// `x-tern-ram-digest`: announced, received, checked before the guest runs.
    digest: DigestCheck,
    /// Post-copy: negotiated, and where it stands.
    pc: Option<postcopy::PostcopyRx>,
    /// `postcopy-preempt`: the preempt channel (`dest_preempt.rs`).
    preempt: preempt::PreemptRx,
    /// Multifd: the main stream's listener, kept for the channels.
    listener: Option<Listener>,
    /// Multifd: the channels' receivers and their sync barrier.
    mf: Option<multifd::MultifdRx>,
}

/// The receiver's explicit state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RxState {
    Listening,
    Loading,
    Finishing,
}

impl Receiver {
    fn run(mut self, from: Incoming) -> DestOutcome {
        let mut state = RxState::Listening;
        // A preempt channel that failed ended the main reader: its error is the cause; so
        // does a multifd channel's.
        let received = self
            .receive(from, &mut state)
            .map_err(|e| self.preempt_failure().unwrap_or(e));
        let result = match received.map_err(|e| self.prefer_multifd_error(e)) {
            // The channel broke while the guest runs here: pause and wait for a recovery.
            Err(e) if self.pauses_postcopy(&e) => self.postcopy_recovery(e),
            r => r,
        };
        let result = result.map_err(|e| self.postcopy_failure(e));
        let (status, error) = match result {
            Ok(()) => (MigrationStatus::Completed, None),
            Err(e) => {
                let e = if self.shared.cancel.load(Ordering::SeqCst) {
                    self.postcopy_failure(DestError::Cancelled)
                } else {
                    e
                };
                let desc = error_chain(&e);
                tracing::warn!(error = %desc, ?state, "incoming migration failed");
                self.stats.set_error(desc.clone());
                // A failure before OPEN_RETURN_PATH (a CONFIG mismatch) is reported on the
                // socket's reverse direction anyway: a source with a return path reads it, one
                // without never looks.
                if let Some(s) = self.rp_spare.take() {
                    let mut g = self.rp.lock().unwrap_or_else(|p| p.into_inner());
                    g.get_or_insert(s);
                }
                // Best effort: the source may already be gone.
                let _ = send_rp(
                    &self.rp,
                    &RpMessage::Error {
                        message: desc.clone(),
                    },
                );
                let _ = send_rp(&self.rp, &RpMessage::Shut { error: true });
                self.linger();
                (MigrationStatus::Failed, Some(desc))
            }
        };
        for l in &mut self.m.loaders {
            l.load_cleanup();
        }
        self.shared.io.cancel();
        self.stop_preempt();
        self.set_status(status);
        DestOutcome {
            status,
            error,
            machine: self.m,
        }
    }

    pub(super) fn set_status(&self, status: MigrationStatus) {
        *self.shared.status.lock().unwrap_or_else(|p| p.into_inner()) = status;
        self.stats.set_status(status);
        self.events.migration_status(status);
        tracing::info!(status = status.as_str(), "incoming migration");
    }

    /// What this machine expects of CONFIG (page size, vCPUs, TSC, UUID with `validate-uuid`,
    /// RAM blocks, CPUID, known components) and the stream limits, with `max_sections` lowered
    /// to the SECTIONs this machine and its loaders take.
    fn expectations(&self) -> (StreamConfig, Expectations, Limits) {
        let d = self.m.state.describe();
        let local = d.stream_config(self.m.ram.page_size(), self.m.ram.blocks());
        let mut expect = Expectations::from_config(&local, self.opts.validate_uuid);
        expect.tsc_tolerance_khz = d.tsc_tolerance_khz;
        expect.tsc_scaling = d.tsc_scaling;
        let mut known = self.m.state.known_components();
        known.extend(self.m.loaders.iter().map(|l| ComponentVersion {
            id: l.id().to_owned(),
            min_version: l.min_version(),
            max_version: l.max_version(),
        }));
        expect.components = Some(known);
        let mut limits = self.opts.limits.clone();
        if let Some(n) = d.component_sections {
            let loaders = u32::try_from(self.m.loaders.len()).unwrap_or(u32::MAX);
            limits.max_sections = limits.max_sections.min(n.saturating_add(loaders));
        }
        (local, expect, limits)
    }

    /// `CAPABILITIES`: `switchover-ack` must match when the return path is open (a file has
    /// none); the source's `validate-uuid` makes this side compare the UUIDs (QEMU semantics).
    fn check_capabilities(
        &self,
        switchover_ack: bool,
        validate_uuid: bool,
        source_uuid: uuid::Uuid,
        local_uuid: uuid::Uuid,
    ) -> Result<(), DestError> {
        let rp_open = self.rp.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        if rp_open && switchover_ack != self.opts.switchover_ack {
            let side = |on: bool| if on { "on" } else { "off" };
            return Err(DestError::Protocol(format!(
                "capability 'switchover-ack' is {} at the source but {} at the destination: it must be set on both sides",
                side(switchover_ack),
                side(self.opts.switchover_ack)
            )));
        }
        if validate_uuid && source_uuid != local_uuid {
            return Err(DestError::Wire(WireError::ConfigMismatch(format!(
                "VM UUID: source {source_uuid}, destination {local_uuid} (validate-uuid is on at the source)"
            ))));
        }
        Ok(())
    }

    fn receive(&mut self, from: Incoming, state: &mut RxState) -> Result<(), DestError> {
        let stream = match from {
            // Multifd's channels connect to the main stream's listener (`dest_multifd.rs`), and
            // so does a preempt channel after them (`multifd_accept` hands the listener on).
            Incoming::Listener(l) if self.opts.multifd_channels.is_some() => {
                let s = l.accept_next(&self.shared.io)?;
                self.listener = Some(l);
                s
            }
            Incoming::Listener(l) => {
                let s = l.accept_next(&self.shared.io)?;
                // The preempt channel connects to the same listener (`dest_preempt.rs`).
                self.preempt.keep_listener(self.opts.postcopy_preempt, l);
                s
            }
            Incoming::Stream(s) => {
                if s.has_return_path() {
                    use std::os::fd::AsFd;
                    self.shared
                        .io
                        .register(s.as_fd())
                        .map_err(|e| DestError::Protocol(format!("register socket: {e}")))?;
                }
                s
            }
        };
        if self.shared.cancel.load(Ordering::SeqCst) {
            return Err(DestError::Cancelled);
        }
        let stream = match &self.opts.tls {
            Some(tls) => match tls_stream::server(stream, tls, self.opts.liveness.limit()) {
                Ok(s) => s,
                Err(f) => {
                    // A plain source is told why in plain on its return path, and drained
                    // so that closing does not reset the connection before it read that.
                    if let Some(plain) = f.plain_peer {
                        self.rp_spare = Some(plain);
                        self.rp_open = true;
                    }
                    return Err(f.error.into());
                }
            },
            None => stream,
        };
        liveness::arm(&stream, self.opts.liveness, None).map_err(|source| TransportError::Io {
            op: "set the liveness options on",
            target: "the migration socket".into(),
            source,
        })?;
        let _keepalive = self.start_keepalive(&stream);
        self.rp_spare = stream
            .try_clone_for_return_path()
            .map_err(|e| DestError::Protocol(format!("cannot clone the socket: {e}")))?;
        self.set_status(MigrationStatus::Active);
        *state = RxState::Loading;

        let (local, expect, limits) = self.expectations();
        let mut reader = StreamReader::new(
            BufReader::with_capacity(READ_BUFFER, stream),
            limits,
            expect,
        )?;
        let source_uuid = reader.config().vm_uuid;
        let (stream_version, stream_config) = (reader.header().version, reader.config().clone());
        self.m
            .state
            .check_machine_blob(&reader.config().machine_blob)
            .map_err(|source| DestError::Machine {
                op: "configuration mismatch".into(),
                source,
            })?;
        self.setup_loaders()?;
        let sink_pages: Vec<u64> = self
            .m
            .ram
            .blocks()
            .iter()
            .map(|b| b.pages(local.page_size))
            .collect();
        let mut finals: Vec<ComponentState> = Vec::new();
        loop {
            match reader.next_record()? {
                Record::Ram(batch) if self.postcopy_running() => self.place_batch(&batch)?,
                Record::Ram(batch) => {
                    let ram = &mut self.m.ram;
                    populate::normal_runs(&batch, |b, first, n| ram.prepare_pages(b, first, n));
                    for p in batch.pages() {
                        let (block, page) = (usize::from(p.block), u64::from(p.page));
                        if sink_pages.get(block).is_none_or(|n| page >= *n) {
                            return Err(DestError::Protocol(format!(
                                "RAM page {page} of block {block} is outside this machine's RAM"
                            )));
                        }
                        let r = match p.data {
                            PageData::Zero => self.m.ram.zero_page(block, page),
                            PageData::Normal(d) => self.m.ram.write_page(block, page, d),
                        };
                        r.map_err(|source| DestError::Machine {
                            op: format!("loading RAM block {block} page {page}"),
                            source,
                        })?;
                        self.digest.page_loaded(self.m.ram.as_mut(), block, page)?;
                        if let Some(pc) = &mut self.pc {
                            pc.received(block, page);
                        }
                    }
                }
                Record::DeviceChunk(c) => {
                    let l = self
                        .m
                        .loaders
                        .iter_mut()
                        .find(|l| l.id() == c.id && l.instance() == c.instance)
                        .ok_or_else(|| {
                            DestError::Protocol(format!(
                                "pre-copy data for device '{}' instance {}, which this machine does not have",
                                c.id, c.instance
                            ))
                        })?;
                    l.load_iterate(c.version, c.data)
                        .map_err(|source| DestError::Loader {
                            id: c.id.to_owned(),
                            instance: c.instance,
                            op: "load_iterate",
                            source,
                        })?;
                }
                Record::Section(c) => finals.push(ComponentState {
                    id: c.id.to_owned(),
                    instance: c.instance,
                    version: c.version,
                    data: c.data.to_vec(),
                }),
                Record::Command(Command::OpenReturnPath) => {
                    let s = self.rp_spare.take().ok_or_else(|| {
                        DestError::Protocol(
                            "OPEN_RETURN_PATH on a channel without a return path (or twice)".into(),
                        )
                    })?;
                    *self.rp.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                    self.rp_open = true;
                    if let Some(ack) = &self.ack {
                        ack.rp_opened().map_err(DestError::Protocol)?;
                    }
                }
                Record::Command(Command::RunState { running }) => {
                    self.source_running = Some(running);
                }
                Record::RamDigest(d) => self.digest.on_record(d)?,
                Record::Command(Command::Capabilities {
                    switchover_ack,
                    validate_uuid,
                    ram_digest,
                    postcopy_ram,
                    postcopy_preempt,
                    multifd,
                }) => {
                    self.multifd_capability(multifd)?;
                    self.postcopy_capability(postcopy_ram)?;
                    self.preempt_capability(postcopy_preempt)?;
                    self.digest.on_capabilities(
                        ram_digest,
                        self.opts.ram_digest,
                        multifd,
                        self.m.ram.as_ref(),
                    )?;
                    self.check_capabilities(
                        switchover_ack,
                        validate_uuid,
                        source_uuid,
                        local.vm_uuid,
                    )?;
                }
                Record::Command(Command::Ping { seq }) => {
                    // A source that went away closes both directions: the PONG then fails
                    // (EPIPE) before the reader sees the truncated stream, whose error says
                    // what happened. So a failed PONG closes the return path and reading goes
                    // on: the forward stream decides. (A source that still sends but cannot
                    // read fails by its own liveness rule: its PINGs go unanswered.)
                    if let Err(e) = send_rp(&self.rp, &RpMessage::Pong { seq }) {
                        tracing::warn!(error = %e, "return path broken while sending PONG; closing it");
                        *self.rp.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    } else {
                        self.last_pong.store(seq, Ordering::SeqCst);
                    }
                }
                Record::Command(Command::IterationEnd { pass }) => {
                    tracing::trace!(pass, "source pass ended");
                    self.multifd_sync_point()?;
                }
                Record::Command(Command::MultifdChannels {
                    channels,
                    compression,
                    id,
                }) => {
                    self.multifd_compression(compression)?;
                    self.multifd_accept(channels, id, stream_version, &stream_config)?;
                }
                Record::Command(Command::MultifdEnd) => self.multifd_end()?,
                Record::Command(Command::SwitchoverStart) => {
                    tracing::debug!("source stopped: final state follows");
                    self.multifd_sync_point()?;
                    self.switch_started();
                }
                Record::End(_) if self.postcopy_running() => {
                    *state = RxState::Finishing;
                    return self.postcopy_end();
                }
                Record::End(_) => {
                    self.multifd_end()?;
                    break;
                }
                Record::RamDiscard(d) => self.discard(&d)?,
                Record::Command(Command::PostcopyAdvise { .. }) => self.advise()?,
                // The reader admits these only on a recovery channel (dest_recovery.rs).
                Record::Command(Command::RecvBitmap { .. } | Command::PostcopyResume) => {
                    return Err(DestError::Protocol(
                        "post-copy recovery command on a first channel".into(),
                    ))
                }
                Record::Command(Command::PostcopyListen) => self.listen()?,
                Record::Command(Command::PostcopyPreempt { token }) => {
                    self.preempt_announced(token)?;
                }
                Record::Command(Command::PostcopyRun { .. }) => {
                    self.postcopy_run(std::mem::take(&mut finals))?;
                }
            }
        }
        *state = RxState::Finishing;
        self.finish(finals)
    }
}
