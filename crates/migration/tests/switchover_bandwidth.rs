//! `avail-switchover-bandwidth` (QEMU 8.2+): when set, the switchover decision and
//! `expected-downtime` use it instead of the measured bandwidth. A guest that cannot converge
//! at the measured (rate-limited) bandwidth switches once the parameter says the link is
//! faster, and `x-tern-switchover-decision` / `expected-downtime` show the assumed bandwidth.
//! Synchronisation by events only; nothing asserts on timing.

mod common;

use common::*;
use tern_migration::convergence::RuleName;
use tern_migration::source::{Target, Tuning};
use tern_migration::status::MigrationStatus as S;

#[test]
fn avail_switchover_bandwidth_lets_a_non_converging_migration_switch() {
    let (src, sm, dst, guest, a, d) = dirty_pair(u64::MAX, false);
    let mut opts = src_opts(non_converge(), false);
    // Stop at the decision, so that what it assumed can be read before anything else runs.
    opts.pause_before_switchover = true;
    let s = start_source(&src, sm, Target::Stream(a), opts);

    // At the measured bandwidth (capped at 30 MB/s, 1 ms downtime: 30 KB may be left for the
    // final copy) the busy guest never fits.
    wait_pass(&src.events, 4);
    assert_eq!(s.status(), S::Active);
    let dec = s
        .stats()
        .snapshot()
        .switchover_decision
        .expect("a decision");
    assert!(!dec.switch, "{dec:?}");
    assert_eq!(dec.rule, RuleName::AboveThreshold, "{dec:?}");

    // The link can do 1 TB/s at the switchover (the cap is for pre-copy only): the whole 4 MiB
    // fits the 1 ms downtime. Nothing else changes: max-bandwidth stays at 30 MB/s.
    let avail = 1_000_000_000_000u64;
    s.set_tuning(Tuning {
        avail_switchover_bandwidth: avail,
        ..non_converge()
    });
    wait_status(&src.events, S::PreSwitchover);
    let snap = s.stats().snapshot();
    let dec = snap.switchover_decision.clone().expect("a decision");
    assert!(dec.switch, "{dec:?}");
    assert!(
        dec.passes_since_qemu_would_switch.is_some(),
        "QEMU's rule held: {dec:?}"
    );
    // pending / (1e12 B/s) is below 1 ms for anything the fake RAM can hold.
    assert_eq!(dec.expected_downtime_ms, Some(0), "{dec:?}");
    assert!(snap.expected_downtime_ms <= 1, "{snap:?}");
    let q = s.stats().to_query_migrate_json();
    assert_eq!(q["status"], "pre-switchover", "{q}");
    assert!(
        q["expected-downtime"].as_u64().is_some_and(|ms| ms <= 1),
        "{q}"
    );
    assert_eq!(q["x-tern-switchover-decision"]["switch"], true, "{q}");
    assert_eq!(
        q["x-tern-switchover-decision"]["expected-downtime-ms"], 0,
        "{q}"
    );
    // The measured bandwidth could not have done it: capped at 30 MB/s, the pending bytes
    // would need more than the 1 ms limit.
    let mbps = q["ram"]["mbps"].as_f64().unwrap_or(0.0);
    assert!(mbps < 1000.0, "measured {mbps} Mbit/s: the cap held");

    s.continue_switchover().unwrap();
    let so = s.join().unwrap();
    assert_eq!(so.status, S::Completed, "{:?}", so.error);
    assert_eq!(d.join().unwrap().status, S::Completed);
    guest.stop();
    assert_ram_equal(&src, &dst);
}
