//! Migration statistics: the counters of QEMU's `query-migrate`, shared between the migration
//! thread (writer) and QMP queries (readers) through a cheap-to-clone [`MigrationStats`]
//! (`Arc<Mutex<…>>`; the writer updates it at most a few times per 100 ms window, never per page).
//!
//! [`MigrationStats::to_query_migrate_json`] reproduces QEMU's `MigrationInfo` shape
//! (`fill_source_migration_info` / `fill_destination_migration_info`): which members appear
//! depends on the role and the status, exactly as in QEMU.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::status::MigrationStatus;

#[path = "stats_recovery.rs"]
mod recovery;
pub use recovery::{Recovery, RecoveryStats, ReleaseRamStats, RECOVERIES_LISTED};

/// Which side of a migration the stats describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// The sender (`migrate`).
    #[default]
    Source,
    /// The receiver (`migrate-incoming`).
    Destination,
}

/// QEMU `MigrationStats` (the `ram` member).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RamStats {
    /// Bytes sent so far (whole stream: RAM, device state, framing).
    pub transferred: u64,
    /// Bytes of dirty RAM still to send.
    pub remaining: u64,
    /// Bytes of guest RAM.
    pub total: u64,
    /// Zero pages sent (QEMU `duplicate`).
    pub duplicate: u64,
    /// Pages sent with data.
    pub normal: u64,
    /// `normal × page-size`.
    pub normal_bytes: u64,
    /// Pages dirtied per second (measured at the dirty-log syncs).
    pub dirty_pages_rate: u64,
    /// Throughput in Mbit/s (last window; the average over the migration once completed).
    pub mbps: f64,
    /// Dirty-log syncs done (= passes).
    pub dirty_sync_count: u64,
    /// Pages sent per second (last window).
    pub pages_per_second: u64,
    /// Bytes sent while the VM was running.
    pub precopy_bytes: u64,
    /// Bytes sent while the VM was stopped (switchover).
    pub downtime_bytes: u64,
    /// Page size of the page counters.
    pub page_size: u64,
    /// Post-copy: page requests (`REQ_PAGES`) received (source) or sent (destination).
    pub postcopy_requests: u64,
    /// Post-copy: bytes sent after `POSTCOPY_RUN` (source) or pages placed (destination).
    pub postcopy_bytes: u64,
    /// Bytes written on the multifd channels (QEMU's `multifd-bytes`; part of `transferred`).
    pub multifd_bytes: u64,
    /// `zero-copy-send`: syncs (per channel) at which the kernel copied every zero-copy send
    /// of the channel (QEMU's `dirty-sync-missed-zero-copy`).
    pub dirty_sync_missed_zero_copy: u64,
}

/// Destination, with the `postcopy-blocktime` capability: QEMU's blocktime numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostcopyBlocktime {
    /// `postcopy-blocktime`: time during which every vCPU was blocked at once.
    pub all_vcpus: Duration,
    /// `postcopy-vcpu-blocktime`: per vCPU, time blocked on missing pages.
    pub per_vcpu: Vec<Duration>,
    /// Page-request latency (fault → page placed), when the machine measures it.
    pub latency: Option<PostcopyLatency>,
}

/// Destination, post-copy: how long a faulting thread waited for its page (first fault read
/// → page placed), over every page faulted on (QEMU 10.1's `postcopy-latency` is the average;
/// the quantiles are Tern's, from power-of-two µs buckets: an upper bound, at most 2× high).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PostcopyLatency {
    /// Pages some thread faulted on and waited for.
    pub pages: u64,
    /// Mean wait.
    pub average: Duration,
    /// Median wait (upper bound of its bucket).
    pub median: Duration,
    /// 99th percentile (upper bound of its bucket).
    pub p99: Duration,
    /// Longest wait.
    pub max: Duration,
}

/// Destination, post-copy: where the destination's part of the switch went
/// (`x-tern-postcopy-switch`), from `SWITCHOVER_START` read to `RESUMED` sent. The phases are
/// the destination's own work and its waits for the stream; they add up to `total`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PostcopySwitch {
    /// `SWITCHOVER_START` → the first `RAM_DISCARD` (or `POSTCOPY_LISTEN`) read: the source's
    /// final sync, and bytes queued ahead on the wire.
    pub wait_discard: Duration,
    /// Handling the `RAM_DISCARD` records (and reading them).
    pub discard: Duration,
    /// Pages marked missing by them.
    pub discard_pages: u64,
    /// `POSTCOPY_LISTEN`: starting demand paging (discarding the stale pages, registering
    /// userfaultfd) when not done before.
    pub listen: Duration,
    /// After `LISTEN` until `POSTCOPY_RUN` is read: the device package on the wire.
    pub package: Duration,
    /// `POSTCOPY_RUN`: device and component restore, vCPUs resumed, `RESUMED` sent.
    pub restore: Duration,
    /// The whole, `SWITCHOVER_START` → `RESUMED` sent.
    pub total: Duration,
    /// Before the switch, the guest still running on the source (stream version 7): pages the
    /// early RAM_DISCARD records dropped here (held until then), not part of `total`.
    pub early_discard_pages: u64,
    /// Handling the early RAM_DISCARD records (dropping those pages), not part of `total`.
    pub early_discard: Duration,
}

/// Switchover-ack progress (Tern extension, not in QEMU's `query-migrate`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwitchoverAckStats {
    /// The capability is on.
    pub enabled: bool,
    /// `SWITCHOVER_ACK` was received (source) / sent (destination).
    pub acked: bool,
    /// Time the source would have switched over but waited for the ACK.
    pub waited: Duration,
}

/// Where the source's downtime went, phase by phase (Tern extension, like Cloud Hypervisor's
/// downtime breakdown). The phases add up to the downtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwitchoverTimeline {
    /// Pausing the vCPUs.
    pub pause: Duration,
    /// Waiting in `pre-switchover` for `migrate-continue`.
    pub pre_switchover: Duration,
    /// Final dirty-log sync and the last pages.
    pub final_ram: Duration,
    /// Bytes of those last pages (stream bytes).
    pub final_ram_bytes: u64,
    /// Device final states and machine components, saved and written.
    pub device_state: Duration,
    /// END record and flush.
    pub end_flush: Duration,
    /// Waiting for the RAM digest (`x-tern-ram-digest`) after the device state: the part of
    /// the hashing that did not overlap with sending the final state.
    pub digest_wait: Duration,
    /// From the flush to `RESUMED`: destination load, restore, resume, and the network.
    pub destination: Duration,
}

/// The downtime clock as a typed state machine: it runs from the source pausing its vCPUs to
/// the destination reporting `RESUMED` (or the stream's end when there is no return path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Downtime {
    /// The VM has not been paused by the migration.
    #[default]
    NotStarted,
    /// Paused at this instant, waiting for the destination.
    Running(Instant),
    /// The guest ran again on the destination after this long.
    Finished(Duration),
}

impl Downtime {
    /// Starts the clock (vCPUs paused). Restarting a running clock keeps the first instant.
    pub fn start(&mut self, now: Instant) {
        if !matches!(self, Self::Running(_)) {
            *self = Self::Running(now);
        }
    }

    /// Stops the clock; returns the downtime, or `None` when it was not running.
    pub fn finish(&mut self, now: Instant) -> Option<Duration> {
        match *self {
            Self::Running(at) => {
                let d = now.saturating_duration_since(at);
                *self = Self::Finished(d);
                Some(d)
            }
            _ => None,
        }
    }

    /// The switchover failed and the source runs again: no downtime to report.
    pub fn abort(&mut self) {
        *self = Self::NotStarted;
    }

    /// The final downtime, when finished.
    pub fn value(&self) -> Option<Duration> {
        match self {
            Self::Finished(d) => Some(*d),
            _ => None,
        }
    }
}

/// A consistent copy of every statistic.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StatsSnapshot {
    /// Source or destination.
    pub role: Role,
    /// Current status.
    pub status: MigrationStatus,
    /// Milliseconds since the start (final value once completed).
    pub total_time_ms: u64,
    /// Milliseconds from the start to the first iteration.
    pub setup_time_ms: u64,
    /// Expected downtime in ms (while active).
    pub expected_downtime_ms: u64,
    /// Actual downtime in ms (once completed).
    pub downtime_ms: Option<u64>,
    /// RAM counters.
    pub ram: RamStats,
    /// Error text (failed / cancelled; also the destination's text relayed to the source).
    pub error_desc: Option<String>,
    /// Switchover-ack progress.
    pub switchover_ack: SwitchoverAckStats,
    /// Destination: the addresses it listens on (`socket-address`).
    pub socket_address: Vec<Value>,
    /// Source, once completed: where the downtime went.
    pub switchover: Option<SwitchoverTimeline>,
    /// Source: the switchover rule's latest decision and why.
    pub switchover_decision: Option<crate::convergence::RuleDecision>,
    /// Source: the largest vCPU stall before the switchover, as the machine measured it
    /// (the engine only carries it; see [`MigrationStats::set_vcpu_stall`]).
    pub vcpu_stall: Option<VcpuStall>,
    /// Source: when the downtime clock started, since the start of the migration.
    pub downtime_at: Option<Duration>,
    /// `x-tern-ram-digest`: what each side hashed and whether the destination's memory matched.
    pub ram_digest: Option<RamDigestStats>,
    /// Source, `auto-converge`: the vCPU throttle now in force, percent; 0 = not throttling
    /// (then `cpu-throttle-percentage` is absent, as in QEMU).
    pub cpu_throttle_percentage: u8,
    /// Destination, `postcopy-blocktime`: QEMU's blocktimes.
    pub postcopy_blocktime: Option<PostcopyBlocktime>,
    /// Destination, post-copy: the switch's phases on this side.
    pub postcopy_switch: Option<PostcopySwitch>,
    /// Source, `x-tern-postcopy-auto`: the automatic switch's latest decision.
    pub postcopy_auto: Option<crate::convergence::postcopy_auto::AutoDecision>,
    /// Destination, post-copy after RUN: pages the guest still lacks
    /// (`x-tern-postcopy-missing-pages`, decision 112).
    pub postcopy_missing_pages: Option<u64>,
    /// Source, post-copy: every recovery (`x-tern-postcopy-recovery`), once one was tried.
    pub postcopy_recovery: Option<RecoveryStats>,
    /// Source, `release-ram`: pages freed (`x-tern-release-ram`), from the switch on.
    pub release_ram: Option<ReleaseRamStats>,
}

/// `x-tern-ram-digest` in `query-migrate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RamDigestStats {
    /// Chunks hashed.
    pub chunks: u64,
    /// Chunk size in bytes.
    pub chunk_bytes: u64,
    /// Time spent hashing this side's memory (destination: reading back and hashing every
    /// page as it was loaded, mostly during pre-copy).
    pub hash: Duration,
    /// Destination: the check at END (combining page digests per chunk and comparing), the
    /// part of its hashing inside the downtime besides the final pages.
    pub verify: Duration,
    /// Destination: the digests matched (source: the destination said so, i.e. `completed`).
    pub verified: bool,
}

/// A stall of the guest's vCPUs measured by the machine outside the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VcpuStall {
    /// How long.
    pub len: Duration,
    /// When it began, since the start of the migration.
    pub at: Duration,
}

#[derive(Debug, Default)]
struct Inner {
    snap: StatsSnapshot,
    start: Option<Instant>,
    end: Option<Instant>,
    downtime: Downtime,
}

/// Shared statistics of one migration side. Clone it freely: clones share the data.
#[derive(Debug, Clone, Default)]
pub struct MigrationStats {
    inner: Arc<Mutex<Inner>>,
}

impl MigrationStats {
    /// Stats in status `none` for `role`.
    pub fn new(role: Role) -> Self {
        let s = Self::default();
        s.lock().snap.role = role;
        s
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resets everything for a new migration starting at `now` (status `setup`).
    pub fn begin(&self, now: Instant) {
        let mut g = self.lock();
        let role = g.snap.role;
        let addr = std::mem::take(&mut g.snap.socket_address);
        *g = Inner {
            snap: StatsSnapshot {
                role,
                status: MigrationStatus::Setup,
                socket_address: addr,
                ..Default::default()
            },
            start: Some(now),
            ..Default::default()
        };
    }

    /// Sets the status; a terminal status freezes `total-time` and, on the destination, drops
    /// `socket-address` (as QEMU does when the incoming migration ends: nothing listens any more).
    pub fn set_status(&self, status: MigrationStatus) {
        let mut g = self.lock();
        g.snap.status = status;
        if status.is_terminal() {
            if g.end.is_none() {
                g.end = Some(Instant::now());
            }
            if g.snap.role == Role::Destination {
                g.snap.socket_address.clear();
            }
        }
    }

    /// The current status.
    pub fn status(&self) -> MigrationStatus {
        self.lock().snap.status
    }

    /// Records the error text (the first one wins: it is the cause, later ones are effects).
    pub fn set_error(&self, desc: impl Into<String>) {
        let mut g = self.lock();
        if g.snap.error_desc.is_none() {
            g.snap.error_desc = Some(desc.into());
        }
    }

    /// Destination: the listening addresses (`socket-address`).
    pub fn set_socket_address(&self, addrs: Vec<Value>) {
        self.lock().snap.socket_address = addrs;
    }

    /// Records the end of the setup phase.
    pub fn setup_done(&self, now: Instant) {
        let mut g = self.lock();
        if let Some(start) = g.start {
            g.snap.setup_time_ms = now.saturating_duration_since(start).as_millis() as u64;
        }
    }

    /// Updates the counters under one lock.
    pub fn update(&self, f: impl FnOnce(&mut RamStats, &mut u64)) {
        let mut g = self.lock();
        let Inner { snap, .. } = &mut *g;
        f(&mut snap.ram, &mut snap.expected_downtime_ms);
    }

    /// Switchover-ack progress.
    pub fn set_switchover_ack(&self, s: SwitchoverAckStats) {
        self.lock().snap.switchover_ack = s;
    }

    /// `auto-converge`: the throttle now applied to the vCPUs (0 = none).
    pub fn set_cpu_throttle_percentage(&self, pct: u8) {
        self.lock().snap.cpu_throttle_percentage = pct;
    }

    /// Destination, post-copy: the pages still missing (`x-tern-postcopy-missing-pages`).
    pub fn set_postcopy_missing_pages(&self, pages: u64) {
        self.lock().snap.postcopy_missing_pages = Some(pages);
    }

    /// Replaces the error text (post-copy recovery: the cause of the latest pause, cleared
    /// with `None` once the migration is `postcopy-active` again).
    pub fn replace_error(&self, desc: Option<String>) {
        self.lock().snap.error_desc = desc;
    }

    /// Source, post-copy recovery: updates `x-tern-postcopy-recovery`.
    pub fn update_postcopy_recovery(&self, f: impl FnOnce(&mut RecoveryStats)) {
        f(self
            .lock()
            .snap
            .postcopy_recovery
            .get_or_insert_with(Default::default));
    }

    /// Source, `release-ram`: the pages freed so far.
    pub fn set_release_ram(&self, r: ReleaseRamStats) {
        self.lock().snap.release_ram = Some(r);
    }

    /// Destination, `postcopy-blocktime`: the blocktimes so far.
    pub fn set_postcopy_blocktime(&self, b: PostcopyBlocktime) {
        self.lock().snap.postcopy_blocktime = Some(b);
    }

    /// Destination, post-copy: the switch's phases on this side.
    pub fn set_postcopy_switch(&self, t: PostcopySwitch) {
        self.lock().snap.postcopy_switch = Some(t);
    }

    /// Records the switchover timeline.
    pub fn set_switchover_timeline(&self, t: SwitchoverTimeline) {
        self.lock().snap.switchover = Some(t);
    }

    /// Records the RAM digest's statistics.
    pub fn set_ram_digest(&self, d: RamDigestStats) {
        self.lock().snap.ram_digest = Some(d);
    }

    /// Source: the destination loaded everything, the digest check included.
    pub fn ram_digest_verified(&self) {
        if let Some(d) = self.lock().snap.ram_digest.as_mut() {
            d.verified = true;
        }
    }

    /// Records the switchover rule's latest decision.
    /// `x-tern-postcopy-auto` (source): the automatic switch's decision at the last sync.
    pub fn set_postcopy_auto(&self, d: crate::convergence::postcopy_auto::AutoDecision) {
        self.lock().snap.postcopy_auto = Some(d);
    }

    pub fn set_switchover_decision(&self, d: crate::convergence::RuleDecision) {
        self.lock().snap.switchover_decision = Some(d);
    }

    /// Starts the downtime clock.
    pub fn downtime_start(&self, now: Instant) {
        let mut g = self.lock();
        g.downtime.start(now);
        if let Some(start) = g.start {
            g.snap.downtime_at = Some(now.saturating_duration_since(start));
        }
    }

    /// Source: the machine's largest vCPU stall of this migration so far (`len`, begun at
    /// `began`); shown with the downtime as `x-tern-max-guest-stall`. The machine measures it
    /// (the engine knows no vCPU threads); a stall that began before the migration counts from
    /// its start.
    pub fn set_vcpu_stall(&self, len: Duration, began: Instant) {
        let mut g = self.lock();
        let at = g
            .start
            .map(|s| began.saturating_duration_since(s))
            .unwrap_or_default();
        g.snap.vcpu_stall = Some(VcpuStall { len, at });
    }

    /// Stops the downtime clock.
    pub fn downtime_end(&self, now: Instant) -> Option<Duration> {
        let mut g = self.lock();
        let d = g.downtime.finish(now);
        g.snap.downtime_ms = g.downtime.value().map(|d| d.as_millis() as u64);
        d
    }

    /// The switchover was undone (source resumed): forget the downtime.
    pub fn downtime_abort(&self) {
        let mut g = self.lock();
        g.downtime.abort();
        g.snap.downtime_ms = None;
        g.snap.downtime_at = None;
    }

    /// A consistent copy, with `total-time` computed now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = self.lock();
        let mut s = g.snap.clone();
        if let Some(start) = g.start {
            let end = g.end.unwrap_or_else(Instant::now);
            s.total_time_ms = end.saturating_duration_since(start).as_millis() as u64;
        }
        s
    }

    /// `query-migrate`'s return value, with QEMU's member names and presence rules.
    pub fn to_query_migrate_json(&self) -> Value {
        query_migrate_json(&self.snapshot())
    }
}

/// An error and its sources, joined with ": " (for `error-desc`: the whole chain, once).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        cur = s.source();
    }
    out
}

/// QEMU's `MigrationInfo` for a snapshot.
pub fn query_migrate_json(s: &StatsSnapshot) -> Value {
    use MigrationStatus as S;
    let mut m = Map::new();
    match s.role {
        Role::Source => match s.status {
            // No migration ever: an empty object.
            S::None => return Value::Object(m),
            S::Active
            | S::Cancelling
            | S::PostcopyActive
            | S::PreSwitchover
            | S::Device
            | S::PostcopyPaused
            | S::PostcopyRecoverSetup
            | S::PostcopyRecover
            | S::PostcopyDevice
            | S::Completed
            | S::Unconfirmed => {
                m.insert("status".into(), json!(s.status));
                time_info(&mut m, s);
                m.insert("ram".into(), ram_info(s));
                // QEMU's `populate_ram_info`: present only while the guest is throttled.
                if s.cpu_throttle_percentage > 0 {
                    m.insert(
                        "cpu-throttle-percentage".into(),
                        json!(s.cpu_throttle_percentage),
                    );
                }
                tern_info(&mut m, s);
                guest_stall_info(&mut m, s);
            }
            _ => {
                m.insert("status".into(), json!(s.status));
            }
        },
        Role::Destination => {
            if !s.socket_address.is_empty() {
                m.insert("socket-address".into(), json!(s.socket_address));
            }
            match s.status {
                S::None | S::PreSwitchover | S::Device | S::WaitUnplug | S::Failing => {
                    return Value::Object(m);
                }
                _ => {
                    m.insert("status".into(), json!(s.status));
                }
            }
            digest_info(&mut m, s);
            if let Some(n) = s.postcopy_missing_pages {
                m.insert("x-tern-postcopy-missing-pages".into(), json!(n));
            }
            if let Some(t) = &s.postcopy_switch {
                postcopy_switch_info(&mut m, t);
            }
            // QEMU `fill_destination_postcopy_migration_info` (ms, u32).
            if let Some(b) = &s.postcopy_blocktime {
                let ms = |d: &Duration| d.as_millis().min(u128::from(u32::MAX)) as u64;
                m.insert("postcopy-blocktime".into(), json!(ms(&b.all_vcpus)));
                m.insert(
                    "postcopy-vcpu-blocktime".into(),
                    json!(b.per_vcpu.iter().map(ms).collect::<Vec<_>>()),
                );
                if let Some(l) = &b.latency {
                    latency_info(&mut m, l);
                }
            }
        }
    }
    if let Some(e) = &s.error_desc {
        m.insert("error-desc".into(), json!(e));
    }
    Value::Object(m)
}

/// Tern's own members (QEMU tools ignore members they do not know): the switchover-ack state
/// (whether the ACK arrived and how long the source waited for it), the switchover rule's
/// latest decision and, once the switchover happened, where the downtime went.
fn tern_info(m: &mut Map<String, Value>, s: &StatsSnapshot) {
    digest_info(m, s);
    if let Some(d) = &s.switchover_decision {
        m.insert("x-tern-switchover-decision".into(), decision_json(d));
    }
    if let Some(d) = &s.postcopy_auto {
        m.insert("x-tern-postcopy-auto".into(), postcopy_auto_json(d));
    }
    recovery::source_info(m, s.postcopy_recovery.as_ref(), s.release_ram.as_ref());
    let a = &s.switchover_ack;
    if a.enabled {
        m.insert(
            "x-tern-switchover-ack".into(),
            json!({"acked": a.acked, "waited-ms": a.waited.as_millis() as u64}),
        );
    }
    if let Some(t) = &s.switchover {
        let us = |d: std::time::Duration| d.as_micros() as u64;
        m.insert(
            "x-tern-downtime-breakdown".into(),
            json!({
                "pause-us": us(t.pause),
                "pre-switchover-us": us(t.pre_switchover),
                "final-ram-us": us(t.final_ram),
                "final-ram-bytes": t.final_ram_bytes,
                "device-state-us": us(t.device_state),
                "end-flush-us": us(t.end_flush),
                "digest-wait-us": us(t.digest_wait),
                "destination-us": us(t.destination),
            }),
        );
    }
}

/// `x-tern-postcopy-switch` (destination).
fn postcopy_switch_info(m: &mut Map<String, Value>, t: &PostcopySwitch) {
    let us = |d: Duration| d.as_micros().min(u128::from(u64::MAX)) as u64;
    m.insert(
        "x-tern-postcopy-switch".into(),
        json!({
            "wait-discard-us": us(t.wait_discard),
            "discard-us": us(t.discard),
            "discard-pages": t.discard_pages,
            "listen-us": us(t.listen),
            "package-us": us(t.package),
            "restore-us": us(t.restore),
            "total-us": us(t.total),
            "early-discard-pages": t.early_discard_pages,
            "early-discard-us": us(t.early_discard),
        }),
    );
}

/// `x-tern-ram-digest` (both sides): chunks hashed, this side's hashing time, and whether the
/// destination found its memory equal to the source's (on the source: it said so).
fn digest_info(m: &mut Map<String, Value>, s: &StatsSnapshot) {
    if let Some(d) = &s.ram_digest {
        m.insert(
            "x-tern-ram-digest".into(),
            json!({
                "chunks": d.chunks,
                "chunk-bytes": d.chunk_bytes,
                "hash-us": d.hash.as_micros() as u64,
                "verify-us": d.verify.as_micros() as u64,
                "verified": d.verified,
            }),
        );
    }
}

/// QEMU 10.1's `postcopy-latency` (average, ns) and Tern's `x-tern-postcopy-latency`
/// (quantiles in µs; QEMU has only the average and a distribution).
fn latency_info(m: &mut Map<String, Value>, l: &PostcopyLatency) {
    let ns = |d: Duration| d.as_nanos().min(u128::from(u64::MAX)) as u64;
    let us = |d: Duration| d.as_micros().min(u128::from(u64::MAX)) as u64;
    m.insert("postcopy-latency".into(), json!(ns(l.average)));
    m.insert(
        "x-tern-postcopy-latency".into(),
        json!({
            "pages": l.pages,
            "median-us": us(l.median),
            "p99-us": us(l.p99),
            "max-us": us(l.max),
        }),
    );
}

/// `x-tern-postcopy-auto`.
fn postcopy_auto_json(d: &crate::convergence::postcopy_auto::AutoDecision) -> Value {
    let mut v = json!({
        "rule": d.rule.as_str(),
        "switch": d.switch,
        "reason": d.reason,
    });
    if let Some(n) = d.predicted_passes {
        v["predicted-passes"] = n.into();
    }
    if let Some(ms) = d.predicted_time_ms {
        v["predicted-time-ms"] = ms.into();
    }
    v
}

/// `x-tern-switchover-decision`.
fn decision_json(d: &crate::convergence::RuleDecision) -> Value {
    let mut v = json!({
        "rule": d.rule.as_str(),
        "switch": d.switch,
        "reason": d.reason,
    });
    if let Some(n) = d.passes_since_qemu_would_switch {
        v["passes-since-qemu-would-switch"] = n.into();
    }
    if let Some(ms) = d.expected_downtime_ms {
        v["expected-downtime-ms"] = ms.into();
    }
    v
}

/// `x-tern-max-guest-stall` (ms, like `downtime`): the longest the guest could not run during
/// this migration, the larger of the machine's largest vCPU stall before the switchover and the
/// downtime (once known); `x-tern-max-guest-stall-detail` says when (ms after the start), in
/// which phase, and the vCPU stall alone in µs.
fn guest_stall_info(m: &mut Map<String, Value>, s: &StatsSnapshot) {
    let vcpu = s.vcpu_stall.unwrap_or_default();
    let downtime = s.downtime_ms.map(Duration::from_millis);
    if s.vcpu_stall.is_none() && downtime.is_none() {
        return;
    }
    let (len, at, phase) = match downtime {
        Some(d) if d >= vcpu.len => (d, s.downtime_at.unwrap_or_default(), "switchover"),
        _ => (vcpu.len, vcpu.at, "pre-copy"),
    };
    m.insert(
        "x-tern-max-guest-stall".into(),
        json!(len.as_millis() as u64),
    );
    m.insert(
        "x-tern-max-guest-stall-detail".into(),
        json!({
            "at-ms": at.as_millis() as u64,
            "phase": phase,
            "vcpu-stall-us": vcpu.len.as_micros() as u64,
        }),
    );
}

/// QEMU `populate_time_info`.
fn time_info(m: &mut Map<String, Value>, s: &StatsSnapshot) {
    m.insert("setup-time".into(), json!(s.setup_time_ms));
    m.insert("total-time".into(), json!(s.total_time_ms));
    match s.status {
        MigrationStatus::Completed | MigrationStatus::PostcopyActive => {
            m.insert("downtime".into(), json!(s.downtime_ms.unwrap_or(0)));
        }
        // Nobody knows whether (or when) the guest ran again: no downtime to report.
        MigrationStatus::Unconfirmed => {}
        _ => {
            m.insert("expected-downtime".into(), json!(s.expected_downtime_ms));
        }
    }
}

/// QEMU `populate_ram_info`: every mandatory `MigrationStats` member, `remaining` and
/// `dirty-pages-rate` reading 0 once completed.
fn ram_info(s: &StatsSnapshot) -> Value {
    let r = &s.ram;
    // Everything was sent: nothing remains (also when the destination never confirmed).
    let done = matches!(
        s.status,
        MigrationStatus::Completed | MigrationStatus::Unconfirmed
    );
    json!({
        "transferred": r.transferred,
        "remaining": if done { 0 } else { r.remaining },
        "total": r.total,
        "duplicate": r.duplicate,
        "normal": r.normal,
        "normal-bytes": r.normal_bytes,
        "dirty-pages-rate": if done { 0 } else { r.dirty_pages_rate },
        "mbps": r.mbps,
        "dirty-sync-count": r.dirty_sync_count,
        "postcopy-requests": r.postcopy_requests,
        "page-size": r.page_size,
        "multifd-bytes": r.multifd_bytes,
        "pages-per-second": r.pages_per_second,
        "precopy-bytes": r.precopy_bytes,
        "downtime-bytes": r.downtime_bytes,
        "postcopy-bytes": r.postcopy_bytes,
        "dirty-sync-missed-zero-copy": r.dirty_sync_missed_zero_copy,
    })
}

#[cfg(test)]
#[path = "stats_tests.rs"]
mod tests;
