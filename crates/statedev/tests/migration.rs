//! Whole in-process migrations with the engine's real source and destination state machines
//! over a unix socketpair: the engine's fake RAM, vCPUs and machine, plus a real state device
//! on each side. Synchronisation is by events and device statistics; nothing asserts timing.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use tern_migration::dest::{self, DestMachine, DestOptions, Incoming};
use tern_migration::events::RecordingSink;
use tern_migration::fakes::{Dirtier, FakeMachine, FakeRam, FakeVcpus};
use tern_migration::machine::{MachineDescription, MachineError, VcpuControl};
use tern_migration::source::{self, SourceMachine, SourceOptions, Target, Tuning};
use tern_migration::stats::{MigrationStats, Role, StatsSnapshot};
use tern_migration::status::MigrationStatus as S;
use tern_migration::transport::Stream;
use tern_statedev::{DevStats, StateDevConfig, StateDevice};

/// The glue's wiring: the device pauses and resumes with the vCPUs. `probe` runs right after
/// the pause (the instant the downtime starts) and records the destination device's stats.
struct LinkedVcpus {
    vcpus: FakeVcpus,
    dev: StateDevice,
    probe: Option<(StateDevice, Arc<Mutex<Option<DevStats>>>)>,
}

impl VcpuControl for LinkedVcpus {
    fn pause(&mut self) -> Result<(), MachineError> {
        self.vcpus.pause()?;
        self.dev.pause();
        if let Some((peer, slot)) = &self.probe {
            *slot.lock().unwrap() = Some(peer.stats());
        }
        Ok(())
    }
    fn resume(&mut self) -> Result<(), MachineError> {
        self.dev.resume();
        self.vcpus.resume()
    }
    fn is_running(&self) -> bool {
        self.vcpus.is_running()
    }
}

fn converge() -> Tuning {
    Tuning {
        downtime_limit_ms: 30_000,
        max_bandwidth: 1_000_000_000,
        avail_switchover_bandwidth: 0,
        ..Tuning::default()
    }
}

struct Run {
    src_dev: StateDevice,
    dst_dev: StateDevice,
    src_vcpus: FakeVcpus,
    src_stats: MigrationStats,
    dst_stats: MigrationStats,
    src_events: Arc<RecordingSink>,
    at_pause: Arc<Mutex<Option<DevStats>>>,
    guest: Dirtier,
    src: source::SourceHandle,
    dst: dest::DestHandle,
}

fn start(ack: bool, src_opts: &str, dst_opts: &str) -> Run {
    let uuid = MachineDescription::default().uuid;
    let src_dev = StateDevice::new(StateDevConfig::parse(src_opts).unwrap()).unwrap();
    let dst_dev = StateDevice::new_incoming(StateDevConfig::parse(dst_opts).unwrap()).unwrap();
    let ram = FakeRam::small();
    ram.fill_random(50, 7);
    let src_vcpus = FakeVcpus::new(true);
    src_dev.resume(); // the VM runs, so does its device
    let guest = Dirtier::spawn(ram.clone(), src_vcpus.clone(), 2_000, 3);
    let at_pause = Arc::new(Mutex::new(None));
    let sm = SourceMachine {
        ram: Box::new(ram),
        vcpus: Box::new(LinkedVcpus {
            vcpus: src_vcpus.clone(),
            dev: src_dev.clone(),
            probe: Some((dst_dev.clone(), at_pause.clone())),
        }),
        devices: vec![Box::new(src_dev.handler())],
        state: Box::new(FakeMachine::new(2, uuid)),
    };
    // The destination's device stays paused after the load (vCPUs not linked) so that its
    // digest can be compared with the source's after the migration.
    let dm = DestMachine {
        ram: Box::new(FakeRam::small()),
        vcpus: Box::new(FakeVcpus::new(false)),
        loaders: vec![Box::new(dst_dev.loader())],
        state: Box::new(FakeMachine::new(2, uuid)),
        postcopy: None,
    };
    let (a, b) = UnixStream::pair().unwrap();
    let src_events = Arc::new(RecordingSink::new());
    let (src_stats, dst_stats) = (
        MigrationStats::new(Role::Source),
        MigrationStats::new(Role::Destination),
    );
    let dopts = DestOptions {
        switchover_ack: ack,
        ..DestOptions::default()
    };
    let dst = dest::incoming(
        dm,
        Incoming::Stream(Stream::Unix(b)),
        dopts,
        Arc::new(RecordingSink::new()),
        dst_stats.clone(),
    )
    .unwrap();
    let sopts = SourceOptions {
        return_path: true,
        switchover_ack: ack,
        pause_before_switchover: false,
        tuning: converge(),
        ..SourceOptions::default()
    };
    let src = source::migrate(
        sm,
        Target::Stream(Stream::Unix(a)),
        sopts,
        src_events.clone(),
        src_stats.clone(),
    )
    .unwrap();
    Run {
        src_dev,
        dst_dev,
        src_vcpus,
        src_stats,
        dst_stats,
        src_events,
        at_pause,
        guest,
        src,
        dst,
    }
}

/// Runs to the end; returns the source's final stats.
fn finish(
    r: Run,
) -> (
    StatsSnapshot,
    StatsSnapshot,
    StateDevice,
    StateDevice,
    Option<DevStats>,
) {
    let so = r.src.join().unwrap();
    let dout = r.dst.join().unwrap();
    r.guest.stop();
    assert_eq!(so.status, S::Completed, "{:?}", so.error);
    assert_eq!(dout.status, S::Completed, "{:?}", dout.error);
    let at_pause = r.at_pause.lock().unwrap().clone();
    (
        r.src_stats.snapshot(),
        r.dst_stats.snapshot(),
        r.src_dev,
        r.dst_dev,
        at_pause,
    )
}

fn assert_same_state(src_dev: &StateDevice, dst_dev: &StateDevice) {
    let switch = src_dev.stats().switch_digest;
    assert!(switch.is_some());
    assert_eq!(
        dst_dev.digest(),
        switch,
        "destination = source at the switch"
    );
    assert_eq!(dst_dev.stats().loaded_digest, switch);
    assert_eq!(src_dev.digest(), switch, "the source device stayed frozen");
    assert!(!src_dev.is_running() && !dst_dev.is_running());
}

const DEV: &str = "size=4M,chunk=256K,dirty-rate=40,setup-ms=150";

#[test]
fn with_switchover_ack_the_source_waits_for_the_prepared_destination() {
    let r = start(true, DEV, DEV);
    let (s, d, src_dev, dst_dev, at_pause) = finish(r);
    assert!(s.switchover_ack.enabled && s.switchover_ack.acked);
    assert!(d.switchover_ack.acked);
    // Causality, not timing: when the source paused its vCPUs the destination had already
    // prepared the device and approved.
    let p = at_pause.expect("the source paused");
    assert!(
        p.prep_finished && p.approved && p.init_done_received,
        "{p:?}"
    );
    let dst = dst_dev.stats();
    assert_eq!(dst.prep_ready_at_switchover, Some(true));
    assert!(dst.approved);
    assert_same_state(&src_dev, &dst_dev);
    println!(
        "switchover-ack ON : downtime {:?} ms, source waited {:?} for the ACK, destination \
         preparation {:?} ms, of which in the downtime {:?} ms, final dirty bytes {}",
        s.downtime_ms,
        s.switchover_ack.waited,
        dst.prep_ms,
        dst.prep_wait_in_downtime_ms,
        src_dev.stats().final_dirty_bytes
    );
}

#[test]
fn without_switchover_ack_the_preparation_lands_in_the_downtime() {
    let r = start(false, DEV, DEV);
    let (s, _d, src_dev, dst_dev, at_pause) = finish(r);
    assert!(!s.switchover_ack.enabled);
    let dst = dst_dev.stats();
    assert!(!dst.approved, "no approval without the capability");
    assert!(dst.prep_finished);
    assert_same_state(&src_dev, &dst_dev);
    println!(
        "switchover-ack OFF: downtime {:?} ms, preparation finished before the pause: {:?}, \
         preparation {:?} ms, of which in the downtime {:?} ms",
        s.downtime_ms,
        at_pause.map(|p| p.prep_finished),
        dst.prep_ms,
        dst.prep_wait_in_downtime_ms
    );
}

#[test]
fn a_destination_that_never_prepares_is_never_switched_to_and_cancel_works() {
    let hang = format!("{DEV},hang=on");
    let r = start(true, DEV, &hang);
    // The whole initial data is loaded on the destination: nothing but the ACK is missing.
    r.dst_dev.wait_stats(|s| s.init_done_received);
    let pass = r.src_stats.snapshot().ram.dirty_sync_count;
    assert!(
        r.src_events
            .wait_pass(pass + 5, std::time::Duration::from_secs(60)),
        "pass {} within 60 s; events: {:?}",
        pass + 5,
        r.src_events.events()
    );
    assert_eq!(r.src.status(), S::Active, "still iterating");
    assert_eq!(r.src_vcpus.counts(), (0, 0), "never paused");
    assert!(r.at_pause.lock().unwrap().is_none());
    let snap = r.src.stats().snapshot();
    assert!(snap.switchover_ack.enabled && !snap.switchover_ack.acked);
    let d = r.dst_dev.stats();
    assert!(
        d.prep_thread_running && !d.prep_finished && !d.approved,
        "{d:?}"
    );
    assert!(r.src_dev.stats().init_done_sent);
    r.src.cancel();
    let so = r.src.join().unwrap();
    let dout = r.dst.join().unwrap();
    r.guest.stop();
    assert_eq!(so.status, S::Cancelled);
    assert_eq!(dout.status, S::Failed);
    // The destination cleaned up: the preparation thread is gone, no half-loaded state.
    let d = r.dst_dev.stats();
    assert!(!d.prep_thread_running, "{d:?}");
    assert!(!r.dst_dev.has_state());
    // The source runs on, its device too.
    assert!(r.src_vcpus.is_running());
    assert!(r.src_dev.is_running());
}

#[test]
fn a_destination_of_another_size_fails_the_migration_with_a_clear_error() {
    let r = start(true, DEV, "size=8M,setup-ms=0");
    let so = r.src.join().unwrap();
    let dout = r.dst.join().unwrap();
    r.guest.stop();
    assert_eq!(so.status, S::Failed);
    assert_eq!(dout.status, S::Failed);
    let e = dout.error.unwrap_or_default();
    assert!(e.contains("device size is 4194304 bytes"), "{e}");
    let e = so.error.unwrap_or_default();
    assert!(
        e.contains("device size"),
        "source sees the destination's reason: {e}"
    );
    assert!(r.src_vcpus.is_running() && r.src_dev.is_running());
}

/// The seed's scenario at full size (300 MB, 1400 ms of setup): run with
/// `cargo test -p tern-statedev --release -- --ignored --nocapture`.
#[test]
#[ignore = "large: 300 MiB per side and several seconds"]
fn seed_scenario_300m() {
    let dev = "size=300M,setup-ms=1400,dirty-rate=10";
    for ack in [false, true] {
        let r = start(ack, dev, dev);
        let (s, _d, src_dev, dst_dev, _) = finish(r);
        assert_same_state(&src_dev, &dst_dev);
        let dst = dst_dev.stats();
        println!(
            "300M setup-ms=1400 switchover-ack {}: downtime {:?} ms, total {} ms, preparation \
             {:?} ms, in the downtime {:?} ms, ACK wait {:?}",
            if ack { "ON " } else { "OFF" },
            s.downtime_ms,
            s.total_time_ms,
            dst.prep_ms,
            dst.prep_wait_in_downtime_ms,
            s.switchover_ack.waited
        );
    }
}
