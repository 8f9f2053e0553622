//! Test harness: a source and a destination machine made of fakes, connected in one process.

#![allow(dead_code)]

pub mod multifd;
pub mod postcopy;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use tern_migration::dest::{self, DestHandle, DestMachine, DestOptions, Incoming};
use tern_migration::events::RecordingSink;
use tern_migration::fakes::{
    DeviceLog, Dirtier, FakeDevice, FakeLoader, FakeMachine, FakeRam, FakeVcpus, Signal,
};
use tern_migration::machine::{StateHandler, StateLoader};
use tern_migration::source::{self, SourceHandle, SourceMachine, SourceOptions, Target, Tuning};
use tern_migration::stats::{MigrationStats, Role};
use tern_migration::transport::Stream;
use uuid::Uuid;

pub const UUID: Uuid = Uuid::from_u128(0x1234_5678_9abc_def0_1122_3344_5566_7788);

/// Settings that converge at once (QEMU's `migrate_ensure_converge`).
pub fn converge() -> Tuning {
    Tuning {
        downtime_limit_ms: 30_000,
        max_bandwidth: 1_000_000_000,
        avail_switchover_bandwidth: 0,
        ..Tuning::default()
    }
}

/// Settings that cannot converge with a busy guest (`migrate_ensure_non_converge`, scaled to
/// the small fake RAM).
pub fn non_converge() -> Tuning {
    Tuning {
        downtime_limit_ms: 1,
        max_bandwidth: 30_000_000,
        avail_switchover_bandwidth: 0,
        ..Tuning::default()
    }
}

/// The source device's expected initial data, final state, and log.
pub type DeviceProbe = (Vec<u8>, Vec<u8>, Arc<Mutex<DeviceLog>>);
/// The destination loader's received bytes, log, and approval signal.
pub type LoaderProbe = (Arc<Mutex<Vec<u8>>>, Arc<Mutex<DeviceLog>>, Signal);

/// One side's fakes, kept to inspect after the migration.
pub struct SrcSide {
    pub ram: FakeRam,
    pub vcpus: FakeVcpus,
    pub machine: FakeMachine,
    pub device: Option<DeviceProbe>,
    pub events: Arc<RecordingSink>,
    pub stats: MigrationStats,
}

pub struct DstSide {
    pub ram: FakeRam,
    pub vcpus: FakeVcpus,
    pub machine: FakeMachine,
    pub loader: Option<LoaderProbe>,
    pub events: Arc<RecordingSink>,
    pub stats: MigrationStats,
}

/// What the destination's device loader does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoaderKind {
    /// No device at all.
    None,
    /// Device with initial data; the loader approves once it has it all.
    ApprovesWhenLoaded,
    /// Device with initial data; the loader never approves ("never finishes loading").
    NeverApproves,
    /// Device with initial data; the loader does not take part in switchover-ack.
    NoAckNeeded,
}

pub struct Setup {
    pub loader: LoaderKind,
    pub initial_len: usize,
    pub fill_percent: u64,
    pub src_running: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            loader: LoaderKind::None,
            initial_len: 256 << 10,
            fill_percent: 50,
            src_running: true,
        }
    }
}

pub fn source_side(s: &Setup) -> (SrcSide, SourceMachine) {
    let ram = FakeRam::small();
    ram.fill_random(s.fill_percent, 7);
    let vcpus = FakeVcpus::new(s.src_running);
    let machine = FakeMachine::new(2, UUID);
    let mut devices: Vec<Box<dyn StateHandler>> = Vec::new();
    let mut device = None;
    if s.loader != LoaderKind::None {
        let (dev, log) = FakeDevice::new("state-dev", s.initial_len, 16 << 10);
        let (init, fin) = dev.expected();
        device = Some((init, fin, log));
        devices.push(Box::new(dev));
    }
    let side = SrcSide {
        ram: ram.clone(),
        vcpus: vcpus.clone(),
        machine: machine.clone(),
        device,
        events: Arc::new(RecordingSink::new()),
        stats: MigrationStats::new(Role::Source),
    };
    let m = SourceMachine {
        ram: Box::new(ram),
        vcpus: Box::new(vcpus),
        devices,
        state: Box::new(machine),
    };
    (side, m)
}

pub fn dest_side(s: &Setup, machine: FakeMachine) -> (DstSide, DestMachine) {
    let ram = FakeRam::small();
    let vcpus = FakeVcpus::new(false);
    let mut loaders: Vec<Box<dyn StateLoader>> = Vec::new();
    let mut loader = None;
    let kind = match s.loader {
        LoaderKind::None => None,
        LoaderKind::ApprovesWhenLoaded => Some((true, Some(s.initial_len))),
        LoaderKind::NeverApproves => Some((true, None)),
        LoaderKind::NoAckNeeded => Some((false, None)),
    };
    if let Some((ack, after)) = kind {
        let (l, log) = FakeLoader::new("state-dev", ack, after);
        loader = Some((l.received.clone(), log, l.approved.clone()));
        loaders.push(Box::new(l));
    }
    let side = DstSide {
        ram: ram.clone(),
        vcpus: vcpus.clone(),
        machine: machine.clone(),
        loader,
        events: Arc::new(RecordingSink::new()),
        stats: MigrationStats::new(Role::Destination),
    };
    let m = DestMachine {
        ram: Box::new(ram),
        vcpus: Box::new(vcpus),
        loaders,
        state: Box::new(machine),
        postcopy: None,
    };
    (side, m)
}

pub fn src_opts(tuning: Tuning, ack: bool) -> SourceOptions {
    SourceOptions {
        return_path: true,
        switchover_ack: ack,
        pause_before_switchover: false,
        tuning,
        ..SourceOptions::default()
    }
}

pub fn dst_opts(ack: bool) -> DestOptions {
    DestOptions {
        switchover_ack: ack,
        ..DestOptions::default()
    }
}

pub fn start_source(
    side: &SrcSide,
    m: SourceMachine,
    target: Target,
    opts: SourceOptions,
) -> SourceHandle {
    source::migrate(m, target, opts, side.events.clone(), side.stats.clone())
        .expect("migrate starts")
}

pub fn start_dest(side: &DstSide, m: DestMachine, from: Incoming, opts: DestOptions) -> DestHandle {
    dest::incoming(m, from, opts, side.events.clone(), side.stats.clone()).expect("incoming starts")
}

/// A connected unix socket pair: (source end, destination end).
pub fn socketpair() -> (Stream, Stream) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    (Stream::Unix(a), Stream::Unix(b))
}

/// The default [`Setup`]'s source, its guest dirtying `pages_per_sec`, and a 2-vCPU
/// destination already reading from its end of a [`socketpair`] (`dst_opts(ack)`): (source
/// side, source machine, destination side, guest, the source's end for `start_source`,
/// destination handle).
pub fn dirty_pair(
    pages_per_sec: u64,
    ack: bool,
) -> (SrcSide, SourceMachine, DstSide, Dirtier, Stream, DestHandle) {
    dirty_pair_with(&Setup::default(), pages_per_sec, ack)
}

/// [`dirty_pair`] with the fakes made by `setup`.
pub fn dirty_pair_with(
    setup: &Setup,
    pages_per_sec: u64,
    ack: bool,
) -> (SrcSide, SourceMachine, DstSide, Dirtier, Stream, DestHandle) {
    let (src, sm) = source_side(setup);
    let (dst, dm) = dest_side(setup, FakeMachine::new(2, UUID));
    let guest = dirty(&src, pages_per_sec);
    let (a, b) = socketpair();
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(ack));
    (src, sm, dst, guest, a, d)
}

/// A proxy between source and destination: copies both directions, and on the forward one
/// either cuts the connection after `cut_after` bytes or flips the byte at `flip_at`.
pub fn proxy(cut_after: Option<u64>, flip_at: Option<u64>) -> (Stream, Stream) {
    let (src_end, proxy_a) = UnixStream::pair().expect("socketpair");
    let (proxy_b, dst_end) = UnixStream::pair().expect("socketpair");
    let (mut a_r, mut b_w) = (
        proxy_a.try_clone().expect("clone"),
        proxy_b.try_clone().expect("clone"),
    );
    let (mut b_r, mut a_w) = (proxy_b, proxy_a);
    std::thread::Builder::new()
        .name("proxy-fwd".into())
        .spawn(move || {
            let mut pos = 0u64;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match a_r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut n = n;
                if let Some(cut) = cut_after {
                    if pos + n as u64 >= cut {
                        n = (cut - pos) as usize;
                    }
                }
                if let Some(f) = flip_at {
                    if f >= pos && f < pos + n as u64 {
                        buf[(f - pos) as usize] ^= 0x5a;
                    }
                }
                if b_w.write_all(&buf[..n]).is_err() {
                    break;
                }
                pos += n as u64;
                if cut_after.is_some_and(|c| pos >= c) {
                    break;
                }
            }
            if cut_after.is_some() {
                // A cut link: both directions die at once.
                let _ = a_r.shutdown(std::net::Shutdown::Both);
                let _ = b_w.shutdown(std::net::Shutdown::Both);
            } else {
                // The destination stopped reading (or the source finished): the source's writes
                // now fail, but what the destination already said on the return path still
                // reaches the source; `proxy-rp` closes that direction when it has copied it.
                let _ = a_r.shutdown(std::net::Shutdown::Read);
                let _ = b_w.shutdown(std::net::Shutdown::Write);
            }
        })
        .expect("spawn");
    std::thread::Builder::new()
        .name("proxy-rp".into())
        .spawn(move || {
            let _ = std::io::copy(&mut b_r, &mut a_w);
            let _ = a_w.shutdown(std::net::Shutdown::Both);
        })
        .expect("spawn");
    (Stream::Unix(src_end), Stream::Unix(dst_end))
}

/// Starts a guest dirtying pages on the source side.
pub fn dirty(side: &SrcSide, pages_per_sec: u64) -> Dirtier {
    Dirtier::spawn(side.ram.clone(), side.vcpus.clone(), pages_per_sec, 3)
}

/// A fake guest dirtying 20 000 pages/s, returned once it has written a whole RAM's worth of
/// pages (`timeout` for that): started before a post-copy migration, since a guest thread not
/// yet scheduled let pre-copy converge or left nothing to send at the switch (1 run in 3 on a
/// busy host).
pub fn dirtying(src: &SrcSide, timeout: std::time::Duration) -> Dirtier {
    let guest = dirty(src, 20_000);
    let deadline = std::time::Instant::now() + timeout;
    while guest.writes() < src.ram.total_pages() {
        assert!(
            std::time::Instant::now() < deadline,
            "the fake guest never ran"
        );
        std::thread::yield_now();
    }
    guest
}

/// The destination machine `dm` with a [`FakePager`] over the destination's RAM (post-copy).
pub fn with_pager(
    dst: &DstSide,
    mut dm: DestMachine,
) -> (tern_migration::fakes::FakePager, DestMachine) {
    let pager = tern_migration::fakes::FakePager::new(dst.ram.clone());
    dm.postcopy = Some(Box::new(pager.clone()));
    (pager, dm)
}

/// Waits (at most `timeout`) until `status` was entered at least `n` times.
pub fn wait_entered(
    events: &RecordingSink,
    status: tern_migration::status::MigrationStatus,
    n: usize,
    timeout: std::time::Duration,
) {
    let end = std::time::Instant::now() + timeout;
    while events.statuses().iter().filter(|s| **s == status).count() < n {
        assert!(
            std::time::Instant::now() < end,
            "{status} not entered {n} times: {:?}",
            events.statuses()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Asserts the source is exactly as before a failed/cancelled migration: running (when it
/// was), dirty logging off.
pub fn assert_source_restored(src: &SrcSide, was_running: bool) {
    use tern_migration::machine::VcpuControl;
    assert_eq!(src.vcpus.is_running(), was_running, "source run state");
    assert!(!src.ram.logging(), "dirty log still on");
    let (starts, stops, _) = src.ram.log_calls();
    assert_eq!(starts, stops, "dirty log start/stop calls");
}

/// Asserts the destination RAM equals the source's (both stopped by now).
/// Joins both sides of a migration whose guest dirties (`guest`), stops the guest, and checks
/// that both completed and the destination's RAM equals the source's.
pub fn assert_completes(
    s: SourceHandle,
    d: DestHandle,
    guest: Dirtier,
    src: &SrcSide,
    dst: &DstSide,
) {
    let so = s.join().expect("source joins");
    let dout = d.join().expect("destination joins");
    guest.stop();
    let done = tern_migration::status::MigrationStatus::Completed;
    assert_eq!(so.status, done, "{:?}", so.error);
    assert_eq!(dout.status, done, "{:?}", dout.error);
    assert_ram_equal(src, dst);
}

pub fn assert_ram_equal(src: &SrcSide, dst: &DstSide) {
    assert_eq!(
        src.ram.first_difference(&dst.ram),
        None,
        "first differing (block, page)"
    );
}

/// What [`end_proxy`] does once the source's END record has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterEnd {
    /// Forward all but the last `k` bytes of the stream (at most what follows
    /// `SWITCHOVER_START`), then cut both directions.
    CutLast(usize),
    /// Forward the whole stream; drop everything the destination says from then on and close
    /// the source's side (the source sees its return path close).
    CloseReturnPath,
    /// Forward the whole stream; drop everything the destination says from then on, keep the
    /// connection open (the source waits).
    StallReturnPath,
}

/// A proxy that knows where the stream ends ([`tern_migration::tap::EndTracker`]) and acts
/// there (see [`AfterEnd`]). Returns (source end, destination end, set once END was read from
/// the source).
pub fn end_proxy(after: AfterEnd) -> (Stream, Stream, Signal) {
    use std::net::Shutdown;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tern_migration::tap::EndTracker;

    let (src_end, proxy_a) = UnixStream::pair().expect("socketpair");
    let (proxy_b, dst_end) = UnixStream::pair().expect("socketpair");
    let (mut a_r, mut b_w) = (
        proxy_a.try_clone().expect("clone"),
        proxy_b.try_clone().expect("clone"),
    );
    let (mut b_r, mut a_w) = (proxy_b, proxy_a);
    let end_seen = Signal::new();
    let mute = Arc::new(AtomicBool::new(false));
    let (seen, mute_rp) = (end_seen.clone(), mute.clone());
    std::thread::Builder::new()
        .name("proxy-fwd".into())
        .spawn(move || {
            let hold = match after {
                AfterEnd::CutLast(k) => k as u64,
                _ => 0,
            };
            let mut t = EndTracker::new();
            let (mut sent, mut held) = (0u64, Vec::new());
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match a_r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let before = t.position();
                let end = t.feed(&buf[..n]);
                held.extend_from_slice(&buf[..(t.position() - before) as usize]);
                if end.is_some() {
                    // Silence the return path before the destination can answer END.
                    mute.store(true, Ordering::SeqCst);
                }
                // Hold back only from SWITCHOVER_START on: earlier, a held-back PING would
                // stall the source's drain step.
                let allowed = match t.switchover() {
                    Some(at) => t.position().saturating_sub(hold).max(at),
                    None => t.position(),
                };
                let go = (allowed - sent) as usize;
                if b_w.write_all(&held[..go]).is_err() {
                    break;
                }
                held.drain(..go);
                sent = allowed;
                if end.is_some() {
                    seen.set();
                    match after {
                        AfterEnd::CutLast(_) => {
                            let _ = b_w.shutdown(Shutdown::Both);
                            let _ = a_r.shutdown(Shutdown::Both);
                        }
                        AfterEnd::CloseReturnPath => {
                            let _ = a_r.shutdown(Shutdown::Both);
                        }
                        AfterEnd::StallReturnPath => {}
                    }
                    // Keep both sockets open until the test ends (stall), or until the
                    // destination goes away.
                    let _ = std::io::copy(&mut a_r, &mut std::io::sink());
                    return;
                }
            }
            let _ = a_r.shutdown(Shutdown::Both);
            let _ = b_w.shutdown(Shutdown::Both);
        })
        .expect("spawn");
    std::thread::Builder::new()
        .name("proxy-rp".into())
        .spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                let n = match b_r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if mute_rp.load(Ordering::SeqCst) {
                    continue;
                }
                if a_w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            if !mute_rp.load(Ordering::SeqCst) {
                let _ = a_w.shutdown(Shutdown::Both);
            }
        })
        .expect("spawn");
    (Stream::Unix(src_end), Stream::Unix(dst_end), end_seen)
}

/// How long any wait on the engine's events may take before the test fails. Generous: the
/// fakes move a few MiB, but CI machines are small and loaded.
pub const EVENT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether `e` is a status the migration never leaves by itself.
pub fn is_terminal(e: &tern_migration::events::Event) -> bool {
    matches!(e, tern_migration::events::Event::Status(s) if s.is_terminal())
}

/// Waits (bounded) for the first event matching `pred`; panics naming `what` and the events
/// seen so far at the deadline.
pub fn wait_event(
    events: &RecordingSink,
    what: &str,
    pred: impl Fn(&tern_migration::events::Event) -> bool,
) -> tern_migration::events::Event {
    events.wait_for(EVENT_DEADLINE, pred).unwrap_or_else(|| {
        panic!(
            "timed out after {EVENT_DEADLINE:?} waiting for {what}; events: {:?}",
            events.events()
        )
    })
}

/// Waits (bounded) until `status` was entered.
pub fn wait_status(events: &RecordingSink, status: tern_migration::status::MigrationStatus) {
    wait_event(events, &format!("status {status:?}"), |e| {
        *e == tern_migration::events::Event::Status(status)
    });
}

/// Waits (bounded) for `MIGRATION_PASS` `pass` or later. Fails at once, instead of waiting
/// forever, when the migration ends first.
pub fn wait_pass(events: &RecordingSink, pass: u64) {
    use tern_migration::events::Event;
    let e = wait_event(events, &format!("pass {pass} (or the end)"), |e| {
        matches!(e, Event::Pass(p) if *p >= pass) || is_terminal(e)
    });
    assert!(
        matches!(e, Event::Pass(_)),
        "the migration ended ({e:?}) before pass {pass}; events: {:?}",
        events.events()
    );
}
