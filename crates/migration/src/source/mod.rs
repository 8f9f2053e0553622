//! The sender: an explicit state machine run by the `mig-src` thread.
//!
//! ```text
//!  setup ──> active ────────────────────────────> device ──END flushed──> wait for the verdict
//!    │         │ (iterate: RAM + devices, fairly) ^                        │ (≤ x-tern-resume-timeout)
//!    │         └─> [pre-switchover] ──(continue)──┘    RESUMED / SHUT{0} ──┼──> completed
//!    │                  │                              ERROR / SHUT{1} ────┼──> failed (resumed)
//!    └── error ─────────┴──────────> failed            closed, cut, cancel,└──> x-tern-unconfirmed
//!        cancel ──> cancelling ──> cancelled           timeout                  (stays paused)
//! ```
//!
//! * **setup**: connect, header + CONFIG, `OPEN_RETURN_PATH` + `PING` (return path), device
//!   `save_setup`, dirty log on, everything marked dirty (pass 1).
//! * **active**: rounds of one bounded chunk each for RAM and every iterative device (the
//!   round's first participant rotates, so a device's initial data flows even when RAM never
//!   converges); dirty-log sync when the cheap estimate fits the threshold (a new pass,
//!   `MIGRATION_PASS`); switch when [`crate::convergence::decide`] says so; `max-bandwidth`
//!   applies.
//! * **switchover**: pause the vCPUs (downtime starts), [pre-switchover: wait for
//!   `migrate-continue`], `device`: `SWITCHOVER_START`, final sync, last pages, device final
//!   states, component states, END.
//! * **the decision** (`confirm.rs`): once END is flushed the destination decides, and the
//!   source waits, at most `x-tern-resume-timeout`, for what it says. `RESUMED` (downtime
//!   ends): `completed`, and the glue refuses `cont` (the guest runs there). `SHUT{0}` without
//!   `RESUMED` (`-S` destination): `completed`, nobody runs, `cont` on one side decides.
//!   `ERROR`/`SHUT{1}`: the destination never runs, so `failed` and the source resumes. No
//!   answer (return path closed, broken, cancel, timeout): `x-tern-unconfirmed`, the source
//!   stays paused with its memory (the destination may run); the operator checks the
//!   destination, then `cont` here or `migrate` elsewhere ([`Handover`]). Without a return
//!   path: `completed` at the flush, like QEMU.
//! * **failure / cancel before END was sent**: the source VM runs again exactly as before (it is
//!   resumed only if the migration paused it), first, then the cleanup (dirty logging off,
//!   devices, sockets, return-path thread); `error-desc` holds the cause (the destination's
//!   own text when it sent one; "migration cancelled by the user" for a cancel).
//! * **`file:`**: non-live: pause, one pass, END; the VM stays paused (like QEMU).

mod autoconverge;
mod confirm;
mod devices;
mod liveness;
mod multifd;
mod multifd_zerocopy;
mod postcopy;
mod preempt;
mod ram;
pub mod recovery;
mod recovery_stats;
mod release;
mod rp;
mod teardown;

use std::io::BufWriter;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::convergence::{
    can_switchover, expected_downtime_ms, switchover_bandwidth, threshold_bytes,
    BandwidthEstimator, RateLimiter, RuleName, SwitchoverRule, SyncSample, BUFFER_DELAY,
};
use crate::events::EventSink;
use crate::liveness::{Inactivity, LivenessTimeout};
use crate::machine::{MachineError, MachineState, RamSource, StateHandler, VcpuControl};
use crate::params::{Capabilities, Capability, MultifdCompression, Parameters, ZeroPageDetection};
use crate::stats::{error_chain, MigrationStats, SwitchoverAckStats, SwitchoverTimeline};
use crate::status::MigrationStatus;
use crate::throttle::ThrottleParams;
use crate::transport::tls_config::TlsError;
use crate::transport::tls_stream::ClientTls;
use crate::transport::{self, CancelToken, MigrationUri, Stream, TransportError};
use crate::wire::{Command, Compression, StreamConfig, StreamWriter, WireError};
use liveness::{Keepalive, Watched};
use ram::{RamError, RamSender, BATCH_PAGES};
pub use release::ReleaseError;

/// Largest pre-copy chunk asked of a device per round.
const DEVICE_CHUNK: usize = 256 << 10;
/// Buffer between the sender and the socket.
const WRITE_BUFFER: usize = 256 << 10;

/// Parameters that may change while the migration runs (`migrate-set-parameters`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// `downtime-limit`, ms.
    pub downtime_limit_ms: u64,
    /// `max-bandwidth`, bytes/s, 0 = unlimited (pre-copy only).
    pub max_bandwidth: u64,
    /// `avail-switchover-bandwidth`, bytes/s, 0 = use the measured bandwidth.
    pub avail_switchover_bandwidth: u64,
    /// `x-tern-resume-timeout`, ms: the longest wait, after END was flushed, for the
    /// destination's `RESUMED` or `SHUT` (then `x-tern-unconfirmed`).
    pub resume_timeout_ms: u64,
    /// `auto-converge` parameters (`cpu-throttle-*`, `max-cpu-throttle`,
    /// `throttle-trigger-threshold`), read at each sync as QEMU does.
    pub throttle: ThrottleParams,
    /// `max-postcopy-bandwidth`, bytes/s, 0 = unlimited: limits the background push after the
    /// post-copy switch, never the pages the destination asked for.
    pub max_postcopy_bandwidth: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Self::from_params(&Parameters::default())
    }
}

impl Tuning {
    /// The tuning part of QEMU's parameters.
    pub fn from_params(p: &Parameters) -> Self {
        Self {
            downtime_limit_ms: p.downtime_limit,
            max_bandwidth: p.max_bandwidth,
            avail_switchover_bandwidth: p.avail_switchover_bandwidth,
            resume_timeout_ms: p.x_tern_resume_timeout,
            throttle: ThrottleParams::from_parameters(p),
            max_postcopy_bandwidth: p.max_postcopy_bandwidth,
        }
    }
}

/// How the sender behaves (fixed for one migration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceOptions {
    /// `return-path`: open the return path (sockets only; always useful: destination errors and
    /// `RESUMED` travel on it).
    pub return_path: bool,
    /// `switchover-ack`: do not switch over a running VM before `SWITCHOVER_ACK`.
    pub switchover_ack: bool,
    /// `pause-before-switchover`: stop in `pre-switchover` until `migrate-continue`.
    pub pause_before_switchover: bool,
    /// `validate-uuid`: ask the destination to check that its UUID is the source's
    /// (`CAPABILITIES` bit 1), whatever the destination's own setting (QEMU semantics).
    pub validate_uuid: bool,
    /// `zero-page-detection`: `false` (`none`) sends every page with its data, zero or not;
    /// `true` (`legacy`, and `multifd`, which without multifd is legacy in QEMU too) sends
    /// zero pages as ZERO entries.
    pub detect_zero_pages: bool,
    /// Initial tuning.
    pub tuning: Tuning,
    /// `x-tern-liveness-timeout`: give up on a destination that reads nothing and says nothing
    /// for this long; keepalive `PING`s while idle.
    pub liveness: LivenessTimeout,
    /// The vCPUs are stopped because an earlier migration stopped them and nobody has decided
    /// yet where the guest runs (it ended `x-tern-unconfirmed`, or completed without
    /// `RESUMED`): the guest counts as running, so the destination resumes it (`RUN_STATE` 1).
    /// This migration did not pause it, so a failure leaves it paused.
    pub stopped_by_earlier_migration: bool,
    /// `x-tern-ram-digest`: send a digest of guest memory taken with the vCPUs stopped
    /// (`RAM_DIGEST`, stream version 2), which the destination checks before it runs.
    pub ram_digest: bool,
    /// `release-ram` (needs `postcopy_ram`): after `POSTCOPY_RUN`, free each page of guest RAM
    /// once the destination confirmed it holds it (`release.rs`, decision 180).
    pub release_ram: bool,
    /// `auto-converge`: throttle the vCPUs when the guest dirties memory faster than it is
    /// sent (`crate::throttle`); the throttle is removed whenever the migration ends.
    pub auto_converge: bool,
    /// The shortest sync period the auto-converge policy judges
    /// ([`crate::throttle::SYNC_PERIOD`], QEMU's one second; tests shorten it).
    pub throttle_period: Duration,
    /// With `auto-converge`, the longest a pass goes without a dirty sync
    /// ([`crate::throttle::PERIODIC_SYNC`], QEMU's five seconds; tests shorten it).
    pub throttle_sync_every: Duration,
    /// `tls-creds`: the channel runs over TLS (source = client), established and admitted by
    /// the destination before the first byte of the stream.
    pub tls: Option<ClientTls>,
    /// `postcopy-ram`: announce post-copy (`CAPABILITIES` bit 4, `POSTCOPY_ADVISE`, stream
    /// version 3) so that `migrate-start-postcopy` can switch to it (`postcopy.rs`).
    pub postcopy_ram: bool,
    /// `x-tern-postcopy-auto`: switch to post-copy by itself when pre-copy is predicted not to
    /// meet `downtime-limit` (`convergence::postcopy_auto`; needs `postcopy_ram`).
    pub postcopy_auto: bool,
    /// `postcopy-preempt`: after the switch, requested pages go on a second connection to the
    /// same URI (`CAPABILITIES` bit 5, stream version 6, `preempt.rs`; needs `postcopy_ram`).
    pub postcopy_preempt: bool,
    /// `multifd` with `multifd-channels`: RAM goes over this many extra connections
    /// (`docs/migration-engine.md` §2.5); `None` = the main stream only.
    pub multifd_channels: Option<u16>,
    /// `zero-copy-send` (with `multifd`, TCP only): the channels write with `MSG_ZEROCOPY`
    /// and flush their completions at every sync (`multifd_zerocopy.rs`).
    pub zero_copy_send: bool,
    /// `multifd-compression` with its level (`multifd-zlib-level` / `multifd-zstd-level`):
    /// how each channel packs its page data (`docs/stream-format.md` §5.3); only with
    /// `multifd_channels`.
    pub multifd_compression: (Compression, u8),
    /// TEST ONLY (the end-to-end fault tests; `tern run` sets it from `TERN_X_TEST_HOLD`):
    /// once post-copy is decided, after the early discard and the drain's `PONG` (the
    /// destination has dropped those pages, decision 202), hold before stopping the guest
    /// until the migration fails (the destination vanished, the liveness limit) or is
    /// cancelled, sending keepalives meanwhile. Never set outside tests.
    pub x_test_hold_before_postcopy_stop: bool,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self::from_qemu(&Capabilities::default(), &Parameters::default())
    }
}

impl SourceOptions {
    /// Options from QEMU-style capabilities and parameters.
    pub fn from_qemu(caps: &Capabilities, params: &Parameters) -> Self {
        Self {
            // QEMU opens the return path for post-copy whatever `return-path` says
            // (`migration_rp_start` with `migrate_postcopy_ram()`): page requests travel on it.
            return_path: caps.get(Capability::ReturnPath) || caps.get(Capability::PostcopyRam),
            switchover_ack: caps.get(Capability::SwitchoverAck),
            pause_before_switchover: caps.get(Capability::PauseBeforeSwitchover),
            validate_uuid: caps.get(Capability::ValidateUuid),
            detect_zero_pages: params.zero_page_detection != ZeroPageDetection::None,
            tuning: Tuning::from_params(params),
            liveness: LivenessTimeout::from_millis(params.x_tern_liveness_timeout),
            stopped_by_earlier_migration: false,
            ram_digest: caps.get(Capability::XTernRamDigest),
            release_ram: caps.get(Capability::ReleaseRam) && caps.get(Capability::PostcopyRam),
            auto_converge: caps.get(Capability::AutoConverge),
            throttle_period: crate::throttle::SYNC_PERIOD,
            throttle_sync_every: crate::throttle::PERIODIC_SYNC,
            tls: None,
            postcopy_ram: caps.get(Capability::PostcopyRam),
            postcopy_auto: caps.get(Capability::XTernPostcopyAuto),
            postcopy_preempt: caps.get(Capability::PostcopyRam)
                && caps.get(Capability::PostcopyPreempt),
            multifd_channels: caps
                .get(Capability::Multifd)
                .then_some(u16::from(params.multifd_channels)),
            zero_copy_send: caps.get(Capability::Multifd) && caps.get(Capability::ZeroCopySend),
            multifd_compression: match params.multifd_compression {
                MultifdCompression::Zlib => (Compression::Zlib, params.multifd_zlib_level),
                MultifdCompression::Zstd => (Compression::Zstd, params.multifd_zstd_level),
                // `qpl`, `uadk`, `qatzip` are refused by the parameters (not in this build).
                _ => (Compression::None, 0),
            },
            x_test_hold_before_postcopy_stop: false,
        }
    }
}

/// The machine as the sender sees it. Handed back in [`SourceOutcome`].
pub struct SourceMachine {
    /// Guest RAM.
    pub ram: Box<dyn RamSource>,
    /// vCPU run control.
    pub vcpus: Box<dyn VcpuControl>,
    /// Devices with state beside RAM (iterative or not), saved in this order.
    pub devices: Vec<Box<dyn StateHandler>>,
    /// Every non-iterative component.
    pub state: Box<dyn MachineState>,
}

/// Where to send the stream.
#[derive(Debug)]
pub enum Target {
    /// Connect (or create the file) in the migration thread.
    Uri(MigrationUri),
    /// An already connected channel (QMP `fd:`, tests).
    Stream(Stream),
}

/// Why a migration did not complete.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// `migrate_cancel`.
    #[error("migration cancelled")]
    Cancelled,
    /// Opening the channel failed.
    #[error("cannot open the migration channel")]
    Transport(#[from] TransportError),
    /// The TLS handshake or the destination's admission failed (the text says why).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Writing the stream failed (network cut, destination gone).
    #[error("cannot write the migration stream")]
    Wire(#[source] WireError),
    /// The destination read nothing and said nothing for `x-tern-liveness-timeout` (or the
    /// kernel timed the connection out).
    #[error("{}", .0.describe("destination"))]
    Inactive(Inactivity),
    /// Reading guest RAM failed.
    #[error("cannot read guest RAM block {block} page {page}")]
    RamRead {
        /// Block index.
        block: usize,
        /// Page index.
        page: u64,
        /// Cause.
        #[source]
        source: MachineError,
    },
    /// A machine operation failed.
    #[error("{op}")]
    Machine {
        /// What the sender asked.
        op: &'static str,
        /// Cause.
        #[source]
        source: MachineError,
    },
    /// A device handler failed.
    #[error("device '{id}' instance {instance}: {op}")]
    Device {
        /// Device id.
        id: String,
        /// Instance.
        instance: u32,
        /// What the sender asked.
        op: &'static str,
        /// Cause.
        #[source]
        source: MachineError,
    },
    /// The destination reported a failure on the return path.
    #[error("destination failed: {0}")]
    Destination(String),
    /// The return path broke or carried something unexpected.
    #[error("{0}")]
    ReturnPath(String),
    /// The whole state was sent (END flushed), then neither `RESUMED` nor an explicit
    /// destination failure arrived: the destination may be running, so the source stays
    /// paused (`x-tern-unconfirmed`).
    #[error(
        "the destination did not confirm that it runs ({reason}) after the whole state was \
         sent; the source stays paused because the destination may be running: check the \
         destination; if it is not running, `cont` here resumes the guest, or `migrate` to \
         another destination"
    )]
    Unconfirmed {
        /// What happened instead of the confirmation.
        reason: String,
    },
    /// A thread could not be started.
    #[error("cannot start thread {name}")]
    Spawn {
        /// Thread name.
        name: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `migrate-continue` outside `pre-switchover` (QEMU's text).
    #[error("Migration not in expected state: {0}")]
    NotExpectedState(&'static str),
    /// `migrate-start-postcopy` without `postcopy-ram` (QEMU's text).
    #[error("Enable postcopy with migrate_set_capability before the start of migration")]
    PostcopyNotEnabled,
    /// `migrate-start-postcopy` when no migration runs (QEMU's text).
    #[error("Postcopy must be started after migration has been started")]
    PostcopyNotRunning,
    /// The migration failed after `POSTCOPY_RUN` was sent: the guest may run on the
    /// destination, so this source stays paused and must never run it again.
    #[error(
        "post-copy failed after the switch ({pages} pages not sent): the guest may be running \
         on the destination, so the source stays paused and must not run it again"
    )]
    AfterPostcopySwitch {
        /// Pages the source had not sent yet.
        pages: u64,
        /// What ended it.
        #[source]
        source: Box<SourceError>,
    },
    /// The post-copy preempt channel failed (`op`: what was being done).
    #[error("post-copy preempt channel: {op}")]
    Preempt {
        /// What was being done ("connect", "TLS", "handshake", "write", "END").
        op: &'static str,
        /// Cause.
        #[source]
        source: Box<SourceError>,
    },
    /// A multifd channel failed, or multifd cannot be used here (the text names the channel
    /// or the reason).
    #[error("{0}")]
    Multifd(String),
    /// The migration thread panicked.
    #[error("the migration thread panicked")]
    Panicked,
    /// `release-ram`: a recovery found the destination without a page this source released.
    #[error(transparent)]
    Release(#[from] ReleaseError),
}

impl From<WireError> for SourceError {
    fn from(e: WireError) -> Self {
        match Inactivity::find(&e) {
            Some(i) => Self::Inactive(i),
            None => Self::Wire(e),
        }
    }
}

impl From<RamError> for SourceError {
    fn from(e: RamError) -> Self {
        match e {
            RamError::Read {
                block,
                page,
                source,
            } => Self::RamRead {
                block,
                page,
                source,
            },
            RamError::Sync(source) => Self::Machine {
                op: "syncing the dirty log",
                source,
            },
            RamError::Wire(w) => Self::from(w),
        }
    }
}

/// Where the guest may run after a migration, as far as the source knows: the basis of the
/// switchover rule "`cont` on the source is refused only when the destination said it runs".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// Not (yet) handed over: running, or ended before END was flushed (`failed`,
    /// `cancelled`: the source was restored). The guest is the source's.
    NotHandedOver,
    /// `RESUMED`: the guest runs on the destination; the source must not run it too.
    DestinationRuns,
    /// `SHUT{0}` without `RESUMED`: the destination loaded the guest and stays paused (`-S`,
    /// or a paused guest). Nothing runs; `cont` on exactly one side decides.
    DestinationPaused,
    /// Completed at the END flush without a return path (QEMU's rule): the destination runs
    /// unless it failed, and the source cannot know which.
    NoReturnPath,
    /// `x-tern-unconfirmed`: END was flushed, no answer came. Check the destination, then
    /// `cont` here or `migrate` elsewhere.
    Unconfirmed,
}

/// The end of a migration.
pub struct SourceOutcome {
    /// `completed`, `failed`, `cancelled` or `x-tern-unconfirmed`.
    pub status: MigrationStatus,
    /// `error-desc`.
    pub error: Option<String>,
    /// The machine, handed back.
    pub machine: SourceMachine,
}

/// State shared by the handle, the sender and the return-path thread.
pub(crate) struct Shared {
    flags: Mutex<Flags>,
    cv: Condvar,
    /// Aborts every socket of this migration.
    io: CancelToken,
}

#[derive(Debug, Default)]
struct Flags {
    status: MigrationStatus,
    cancel: bool,
    cont: bool,
    acked: bool,
    acked_at: Option<Instant>,
    resumed_at: Option<Instant>,
    shut_at: Option<(Instant, bool)>,
    dest_error: Option<String>,
    rp_fault: Option<String>,
    rp_closed: bool,
    /// The return path was opened (the `mig-rp` thread runs).
    return_path: bool,
    pongs: u32,
    /// Sequence number of the last `PONG`.
    last_pong: u32,
    /// When the destination last said anything on the return path.
    heard_at: Option<Instant>,
    /// `postcopy-ram` is on: `REQ_PAGES` are expected after the switch.
    postcopy: bool,
    /// `migrate-start-postcopy` was issued.
    start_postcopy: bool,
    /// `POSTCOPY_RUN` was written: the destination may run the guest, the source never will.
    postcopy_run_sent: bool,
    /// `migrate-pause` cut the channel (post-copy): the sender pauses and says why.
    pause_requested: bool,
    /// `migrate {"resume": true}`: where the recovery channel goes.
    resume_target: Option<MigrationUri>,
    /// Post-copy recovery: the destination's received bitmaps as they arrive.
    recv_bitmaps: Option<recovery::BitmapAssembly>,
    /// `POSTCOPY_RESUME` was written on the recovery channel.
    resume_sent: bool,
    /// `RESUME_ACK` arrived.
    resume_acked: bool,
    /// `POSTCOPY_PREEMPT` was written on the current channel (§13.8).
    preempt_announced: bool,
    /// `PREEMPT_ACK` arrived for it.
    preempt_acked: bool,
    /// Page requests read from the return path, not yet served (post-copy).
    requests: std::collections::VecDeque<crate::machine::PageRange>,
    /// Sequence number of the last `PING` sent by the sender's waits.
    ping_sent: u32,
    /// Since when a `PING` is unanswered (cleared by the `PONG` of the last one).
    ping_pending_since: Option<Instant>,
    tuning: Tuning,
}

impl Flags {
    /// Something ends the migration early.
    fn aborting(&self) -> bool {
        self.cancel
            || self.dest_error.is_some()
            || self.rp_fault.is_some()
            || self.rp_closed
            || self.shut_at.is_some()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Flags> {
        self.flags.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Control of a running migration (QMP `migrate_cancel`, `migrate-continue`,
/// `migrate-set-parameters`, `query-migrate`).
pub struct SourceHandle {
    shared: Arc<Shared>,
    stats: MigrationStats,
    thread: JoinHandle<SourceOutcome>,
}

impl SourceHandle {
    /// `migrate_cancel`: safe in every state; a no-op once the migration ended.
    pub fn cancel(&self) {
        let mut f = self.shared.lock();
        if f.status.is_terminal() {
            return;
        }
        f.cancel = true;
        drop(f);
        self.shared.cv.notify_all();
        self.shared.io.cancel();
    }

    /// `migrate-continue` (from `pre-switchover`).
    pub fn continue_switchover(&self) -> Result<(), SourceError> {
        let mut f = self.shared.lock();
        if f.status != MigrationStatus::PreSwitchover {
            return Err(SourceError::NotExpectedState(f.status.as_str()));
        }
        f.cont = true;
        drop(f);
        self.shared.cv.notify_all();
        Ok(())
    }

    /// `migrate-start-postcopy`: the next round in which the non-postcopiable state fits
    /// switches to post-copy (QEMU's rule). Repeating it changes nothing.
    pub fn start_postcopy(&self) -> Result<(), SourceError> {
        let mut f = self.shared.lock();
        if !f.postcopy {
            return Err(SourceError::PostcopyNotEnabled);
        }
        if !matches!(
            f.status,
            MigrationStatus::Setup
                | MigrationStatus::Active
                | MigrationStatus::PreSwitchover
                | MigrationStatus::PostcopyActive
        ) {
            return Err(SourceError::PostcopyNotRunning);
        }
        f.start_postcopy = true;
        drop(f);
        self.shared.cv.notify_all();
        Ok(())
    }

    /// `migrate-set-parameters` during the migration (applied at the next round).
    pub fn set_tuning(&self, tuning: Tuning) {
        self.shared.lock().tuning = tuning;
        self.shared.cv.notify_all();
    }

    /// The live statistics (`query-migrate`).
    pub fn stats(&self) -> &MigrationStats {
        &self.stats
    }

    /// The current status.
    pub fn status(&self) -> MigrationStatus {
        self.shared.lock().status
    }

    /// What this migration says about where the guest may run (see [`Handover`]).
    pub fn handover(&self) -> Handover {
        let f = self.shared.lock();
        match f.status {
            MigrationStatus::Unconfirmed => Handover::Unconfirmed,
            // After post-copy the whole guest is only on the destination (decision 90), even
            // when its `RESUMED` was lost with a channel that broke (recovery, decision 113).
            MigrationStatus::Completed if f.resumed_at.is_some() || f.postcopy_run_sent => {
                Handover::DestinationRuns
            }
            MigrationStatus::Completed if f.return_path => Handover::DestinationPaused,
            MigrationStatus::Completed => Handover::NoReturnPath,
            // Failed after POSTCOPY_RUN: the destination may run the guest (decision 74).
            _ if f.postcopy_run_sent => Handover::DestinationRuns,
            _ => Handover::NotHandedOver,
        }
    }

    /// Whether the migration thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the end and takes the machine back.
    pub fn join(self) -> Result<SourceOutcome, SourceError> {
        self.thread.join().map_err(|_| SourceError::Panicked)
    }
}

/// Starts an outgoing migration (QMP `migrate`): status `setup` at once, the rest in the
/// `mig-src` thread. `stats` is reset and then updated live; `events` receives every status
/// change and pass (gate `MIGRATION`/`MIGRATION_PASS` on the `events` capability yourself).
pub fn migrate(
    machine: SourceMachine,
    target: Target,
    opts: SourceOptions,
    events: Arc<dyn EventSink>,
    stats: MigrationStats,
) -> Result<SourceHandle, SourceError> {
    let shared = Arc::new(Shared {
        flags: Mutex::new(Flags {
            status: MigrationStatus::Setup,
            tuning: opts.tuning,
            postcopy: opts.postcopy_ram,
            ..Flags::default()
        }),
        cv: Condvar::new(),
        io: CancelToken::new(),
    });
    stats.begin(Instant::now());
    stats.set_switchover_ack(SwitchoverAckStats {
        enabled: opts.switchover_ack,
        ..Default::default()
    });
    events.migration_status(MigrationStatus::Setup);
    let keepalive = Keepalive::new(opts.liveness, Instant::now());
    let sender = Sender {
        m: machine,
        opts,
        shared: shared.clone(),
        events,
        stats: stats.clone(),
        writer: None,
        config: None,
        rp_thread: None,
        ram: None,
        estimator: None,
        limiter: RateLimiter::new(0, Instant::now()),
        paused_by_us: false,
        dirty_log_on: false,
        round: 0,
        ack_wait_since: None,
        ack_waited: Duration::ZERO,
        bytes_at_stop: None,
        chunk: Vec::new(),
        rule: SwitchoverRule::default(),
        postcopy_auto: crate::convergence::postcopy_auto::AutoPostcopy::default(),
        started: Instant::now(),
        ping_seq: 1,
        keepalive,
        auto_converge: None,
        timeline: SwitchoverTimeline::default(),
        mark: Instant::now(),
        bytes_at_run: None,
        bytes_of_earlier_channels: 0,
        preempt: preempt::PreemptTx::default(),
        release: None,
        recovery_clock: recovery_stats::RecoveryClock::default(),
        multifd: None,
    };
    let thread = std::thread::Builder::new()
        .name("mig-src".into())
        .spawn(move || {
            crate::priority::background_thread();
            sender.run(target)
        })
        .map_err(|source| SourceError::Spawn {
            name: "mig-src",
            source,
        })?;
    Ok(SourceHandle {
        shared,
        stats,
        thread,
    })
}

type Writer = StreamWriter<BufWriter<Watched>>;

struct Sender {
    m: SourceMachine,
    opts: SourceOptions,
    shared: Arc<Shared>,
    events: Arc<dyn EventSink>,
    stats: MigrationStats,
    writer: Option<Writer>,
    config: Option<StreamConfig>,
    rp_thread: Option<JoinHandle<()>>,
    ram: Option<RamSender>,
    estimator: Option<BandwidthEstimator>,
    limiter: RateLimiter,
    paused_by_us: bool,
    dirty_log_on: bool,
    round: usize,
    ack_wait_since: Option<Instant>,
    ack_waited: Duration,
    bytes_at_stop: Option<u64>,
    chunk: Vec<u8>,
    timeline: SwitchoverTimeline,
    mark: Instant,
    /// The switchover rule (QEMU's, plus bounded extra passes).
    rule: SwitchoverRule,
    /// `x-tern-postcopy-auto`: the automatic switch's memory of the pending bytes.
    postcopy_auto: crate::convergence::postcopy_auto::AutoPostcopy,
    /// When the sender started (the rule's clock).
    started: Instant,
    /// Sequence number of the last `PING` sent.
    ping_seq: u32,
    /// When to send the next keepalive `PING` of an idle wait.
    keepalive: Keepalive,
    /// `auto-converge`: the policy's state (set up with the dirty log).
    auto_converge: Option<autoconverge::AutoConverge>,
    /// Post-copy: bytes written when `POSTCOPY_RUN` was (`postcopy-bytes` counts from there).
    bytes_at_run: Option<u64>,
    /// Post-copy recovery: bytes written on the channels before the current one.
    bytes_of_earlier_channels: u64,
    /// `postcopy-preempt`: the preempt channel (`preempt.rs`).
    preempt: preempt::PreemptTx,
    /// `release-ram`: the pages released and those waiting for the destination's
    /// confirmation (set up at the post-copy switch).
    release: Option<release::Release>,
    /// Post-copy recovery: the current attempt's clock and every recovery's numbers
    /// (`x-tern-postcopy-recovery`).
    recovery_clock: recovery_stats::RecoveryClock,
    /// `multifd`: the extra channels and their sender threads.
    multifd: Option<multifd::Multifd>,
}

impl Sender {
    /// The stream version of every channel this migration writes (§10): 8 with `multifd` and
    /// `postcopy-ram` together (§5.4, decision 246); 7 with `postcopy-ram`
    /// (the early discard, §13.3, decision 203; the preempt channel included) or with
    /// `multifd-compression` (§5.3), 6 with multifd (§5.2), else 5 (decision 133).
    fn stream_version(&self) -> u32 {
        if self.opts.postcopy_ram && self.opts.multifd_channels.is_some() {
            crate::wire::VERSION_MULTIFD_POSTCOPY
        } else if self.opts.postcopy_ram {
            crate::wire::VERSION_EARLY_DISCARD
        } else if self.opts.multifd_compression.0 != crate::wire::Compression::None {
            crate::wire::VERSION_COMPRESSION
        } else if self.opts.multifd_channels.is_some() {
            crate::wire::VERSION_MULTIFD
        } else {
            crate::wire::VERSION_BATCH_INTEGRITY
        }
    }
}

mod flow;
