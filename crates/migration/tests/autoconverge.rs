//! `auto-converge` wiring with fakes: the policy runs at the pass boundaries, its throttle
//! reaches the vCPUs and `query-migrate`, and every end of the migration removes it. The fake
//! guest is slowed by the throttle (`fakes::Dirtier`). Synchronisation by polling with
//! deadlines; nothing asserts on timing.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tern_migration::dest::Incoming;
use tern_migration::events::{Event, EventSink, RecordingSink};
use tern_migration::fakes::FakeMachine;
use tern_migration::source::{self, SourceHandle, SourceOptions, Target, Tuning};
use tern_migration::stats::MigrationStats;
use tern_migration::status::MigrationStatus as S;
use tern_migration::throttle::ThrottleParams;

/// Generous: the fakes move a few MiB.
const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `pred` until it holds; panics with `what` at the deadline.
fn wait_until(what: &str, mut pred: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !pred() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A tight link: the fake guest dirtying as fast as it can outruns it unless throttled to
/// 99 % (asleep 99 ms per 1 ms slice of work).
fn tight(throttle: ThrottleParams) -> Tuning {
    Tuning {
        downtime_limit_ms: 20,
        max_bandwidth: 40_000_000,
        avail_switchover_bandwidth: 0,
        throttle,
        ..Tuning::default()
    }
}

fn fast_ramp(max: u8) -> ThrottleParams {
    ThrottleParams {
        initial: 50,
        increment: 20,
        max,
        ..ThrottleParams::default()
    }
}

fn auto_converge(tuning: Tuning) -> SourceOptions {
    SourceOptions {
        auto_converge: true,
        // Judge every sync (QEMU: periods of at least one second) to keep the test short.
        throttle_period: Duration::ZERO,
        ..src_opts(tuning, false)
    }
}

/// The throttle as `query-migrate` shows it (None when absent).
fn shown(s: &SourceHandle) -> Option<u64> {
    s.stats().to_query_migrate_json()["cpu-throttle-percentage"].as_u64()
}

/// What `query-migrate` showed at one `MIGRATION_PASS`: (pass, throttle, dirty-sync-count,
/// status).
type Sample = (u64, Option<u64>, Option<u64>, String);

/// An event sink that records like [`RecordingSink`] and also reads `query-migrate` at every
/// `MIGRATION_PASS`, on the migration thread itself: between two syncs the engine waits for
/// the sampler, so no state it publishes at a pass boundary can slip by unseen (a polling
/// test thread starved on a loaded machine misses a throttle raised shortly before the
/// end).
struct PassSampler {
    events: Arc<RecordingSink>,
    stats: MigrationStats,
    samples: Mutex<Vec<Sample>>,
}

impl EventSink for PassSampler {
    fn migration_status(&self, status: S) {
        self.events.migration_status(status);
    }
    fn migration_pass(&self, pass: u64) {
        let q = self.stats.to_query_migrate_json();
        self.samples.lock().unwrap().push((
            pass,
            q["cpu-throttle-percentage"].as_u64(),
            q["ram"]["dirty-sync-count"].as_u64(),
            q["status"].as_str().unwrap_or("?").to_owned(),
        ));
        self.events.migration_pass(pass);
    }
    fn vm_stopped(&self) {
        self.events.vm_stopped();
    }
    fn vm_resumed(&self) {
        self.events.vm_resumed();
    }
}

#[test]
fn throttle_is_raised_after_two_high_passes_and_removed_when_the_migration_completes() {
    let (src, sm, dst, guest, a, d) = dirty_pair(u64::MAX, false);
    let sampler = Arc::new(PassSampler {
        events: src.events.clone(),
        stats: src.stats.clone(),
        samples: Mutex::new(Vec::new()),
    });
    let s = source::migrate(
        sm,
        Target::Stream(a),
        auto_converge(tight(fast_ramp(99))),
        sampler.clone(),
        src.stats.clone(),
    )
    .expect("migrate starts");
    // The first throttle shows in query-migrate while active, and only after two judged
    // syncs (the pass counter is published before the policy runs). A throttle raised at a
    // sync is in force at the next one, which is an iteration's (the switchover decision is
    // taken at a sync, before the policy), so the samples taken at the passes see it.
    wait_event(&src.events, "the end of the migration", is_terminal);
    let so = s.join().unwrap();
    let samples = sampler.samples.lock().unwrap().clone();
    let (_, pct, syncs, status) = samples
        .iter()
        .find(|(_, p, _, _)| p.is_some())
        .cloned()
        .unwrap_or_else(|| panic!("throttled before the end: {samples:?}"));
    let pct = pct.unwrap_or(0);
    assert!(pct >= 50, "{pct}: {samples:?}");
    assert!(
        syncs.unwrap_or(0) >= 3,
        "raised after {syncs:?} syncs: {samples:?}"
    );
    assert_eq!(status, "active", "{samples:?}");
    let dout = d.join().unwrap();
    guest.stop();
    assert_eq!(so.status, S::Completed, "{:?}", so.error);
    assert_eq!(dout.status, S::Completed, "{:?}", dout.error);
    assert_ram_equal(&src, &dst);
    let log = src.vcpus.throttle_log();
    // QEMU's ramp: initial, then + increment, capped at 99; removed at the end.
    let (last, raises) = log.split_last().expect("throttle log");
    assert_eq!(*last, 0, "{log:?}");
    assert_eq!(raises.first(), Some(&50), "{log:?}");
    assert!(raises.windows(2).all(|w| w[1] > w[0]), "{log:?}");
    assert!(raises.iter().all(|&p| p <= 99), "{log:?}");
    assert_eq!(src.vcpus.throttle(), 0);
    let q = src.stats.to_query_migrate_json();
    assert_eq!(q["status"], "completed");
    assert!(q.get("cpu-throttle-percentage").is_none(), "{q}");
}

#[test]
fn throttle_stays_at_max_cpu_throttle_and_is_removed_on_cancel() {
    let (src, sm, _dst, guest, a, d) = dirty_pair(u64::MAX, false);
    // 1 ms downtime: no throttle makes it converge; the policy keeps wanting more.
    let tuning = Tuning {
        downtime_limit_ms: 1,
        max_bandwidth: 30_000_000,
        ..tight(fast_ramp(70))
    };
    let s = start_source(&src, sm, Target::Stream(a), auto_converge(tuning));
    wait_until("the cap", || shown(&s) == Some(70));
    // Several more triggering passes at the cap.
    let at_cap = src.events.events().len();
    wait_until("more passes", || {
        src.events
            .events()
            .iter()
            .skip(at_cap)
            .filter(|e| matches!(e, Event::Pass(_)))
            .count()
            >= 6
    });
    assert_eq!(s.status(), S::Active);
    assert_eq!(src.vcpus.throttle_log(), [50, 70], "capped, set once each");
    s.cancel();
    let so = s.join().unwrap();
    let _ = d.join();
    guest.stop();
    assert_eq!(so.status, S::Cancelled, "{:?}", so.error);
    assert_eq!(src.vcpus.throttle_log(), [50, 70, 0]);
    assert_source_restored(&src, true);
    assert!(src
        .stats
        .to_query_migrate_json()
        .get("cpu-throttle-percentage")
        .is_none());
}

#[test]
fn throttle_is_removed_when_the_migration_fails() {
    let (src, sm, _dst, guest, a, d) = dirty_pair(u64::MAX, false);
    let tuning = Tuning {
        downtime_limit_ms: 1,
        ..tight(fast_ramp(99))
    };
    let s = start_source(&src, sm, Target::Stream(a), auto_converge(tuning));
    wait_until("a throttle", || src.vcpus.throttle() > 0);
    // The destination gives up: the source fails and runs on, unthrottled.
    assert!(d.cancel());
    let so = s.join().unwrap();
    let _ = d.join();
    assert_eq!(so.status, S::Failed, "{:?}", so.error);
    assert_eq!(src.vcpus.throttle(), 0);
    assert_eq!(src.vcpus.throttle_log().last(), Some(&0));
    assert_source_restored(&src, true);
    // The guest runs at full speed again (it still writes).
    let before = guest.writes();
    wait_until("the guest to write again", || guest.writes() > before);
    guest.stop();
}

#[test]
fn a_machine_that_cannot_throttle_fails_at_setup_and_keeps_running() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    src.vcpus.refuse_throttle();
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (a, b) = socketpair();
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let s = start_source(
        &src,
        sm,
        Target::Stream(a),
        auto_converge(tight(fast_ramp(99))),
    );
    let so = s.join().unwrap();
    let _ = d.join();
    assert_eq!(so.status, S::Failed);
    let e = so.error.unwrap_or_default();
    assert!(e.contains("cannot throttle its vCPUs"), "{e}");
    assert!(src.vcpus.throttle_log().is_empty());
    assert_source_restored(&src, true);
}

#[test]
fn without_the_capability_nothing_is_throttled() {
    let (src, sm, _dst, guest, a, d) = dirty_pair(u64::MAX, false);
    // Hold the end: should the guest be starved of CPU on a loaded machine and the
    // migration converge anyway, it waits in pre-switchover instead of completing, and the
    // wait below sees that instead of waiting for a pass that never comes.
    let opts = SourceOptions {
        pause_before_switchover: true,
        ..src_opts(tight(fast_ramp(99)), false)
    };
    let s = start_source(&src, sm, Target::Stream(a), opts);
    let seen = wait_event(&src.events, "pass 6, pre-switchover or the end", |e| {
        matches!(e, Event::Pass(p) if *p >= 6)
            || *e == Event::Status(S::PreSwitchover)
            || is_terminal(e)
    });
    assert!(
        !is_terminal(&seen),
        "ended before pass 6: {:?}",
        src.events.events()
    );
    // At least five syncs of a guest dirtying as fast as it can (unless it converged, then
    // every one until the end) went by; none raised a throttle.
    assert_eq!(shown(&s), None);
    assert!(src.vcpus.throttle_log().is_empty());
    s.cancel();
    let so = s.join().unwrap();
    let _ = d.join();
    guest.stop();
    assert_eq!(so.status, S::Cancelled, "{:?}", so.error);
    assert!(src.vcpus.throttle_log().is_empty());
}

#[test]
fn long_passes_get_a_periodic_sync_that_feeds_the_policy() {
    let (src, sm, _dst, guest, a, d) = dirty_pair(u64::MAX, false);
    // 4 MB/s: a full pass over the 4 MiB takes about a second; 1 ms downtime: never converges.
    let tuning = Tuning {
        downtime_limit_ms: 1,
        max_bandwidth: 4_000_000,
        ..tight(fast_ramp(99))
    };
    let opts = SourceOptions {
        throttle_sync_every: Duration::from_millis(50),
        ..auto_converge(tuning)
    };
    let s = start_source(&src, sm, Target::Stream(a), opts);
    wait_pass(&src.events, 8);
    let q = s.stats().to_query_migrate_json();
    let (sent, total) = (
        q["ram"]["transferred"].as_u64().unwrap_or(0),
        q["ram"]["total"].as_u64().unwrap_or(0),
    );
    // Seven syncs after less than two passes' worth of bytes: they did not wait for the end of
    // each pass (which takes the whole dirty set, about `total`, each).
    assert!(total > 0 && sent < 2 * total, "{q}");
    wait_until("a throttle", || src.vcpus.throttle() > 0);
    s.cancel();
    let so = s.join().unwrap();
    let _ = d.join();
    guest.stop();
    assert_eq!(so.status, S::Cancelled, "{:?}", so.error);
    assert_eq!(src.vcpus.throttle_log().last(), Some(&0));
}
