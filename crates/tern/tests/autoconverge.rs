//! Issue 13 item 5, `auto-converge` with real `tern run` processes: a 2-vCPU `pattern` guest
//! that outruns a tight `max-bandwidth` does not converge without throttling, and with
//! `auto-converge` on it completes, `cpu-throttle-percentage` shows in `query-migrate` while it
//! runs (and not after), and the destination's memory passes the pattern check.
//! Synchronisation by events and polling with deadlines; nothing asserts on timing.

mod common;

use std::time::Instant;

use common::*;
use serde_json::{json, Value};

/// 32 MiB/s: a pass over the 32 MiB working set takes about a second; the guest dirties it
/// several times faster. 50 ms downtime: the final copy may hold ~1.6 MiB.
fn tight(vm: &mut Vm) {
    vm.params(json!({"max-bandwidth": 32u64 << 20, "downtime-limit": 50}));
}

#[test]
fn auto_converge_completes_a_migration_that_does_not_converge_without_it() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let caps = [("events", true), ("return-path", true)];
    src.caps(&caps);
    tight(&mut src);

    // Without auto-converge: pass after pass, still active, never throttled.
    let mut dst1 = dest(dir.path(), "dst1", &m);
    dst1.caps(&caps);
    let uri = dst1.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["active"], T);
    src.wait_pass(6, MIGRATION_TIMEOUT);
    let q = src.qm();
    assert_eq!(q["status"], "active", "converged without throttling: {q}");
    assert!(q.get("cpu-throttle-percentage").is_none(), "{q}");
    src.c("migrate_cancel", json!({}));
    src.wait_mig(&["cancelled"], T);
    assert_source_runs_on(&mut src);
    dst1.quit_ok();

    // With it: QEMU's parameters, a faster ramp than the defaults to keep the test short.
    src.drain_events();
    src.caps(&[("auto-converge", true)]);
    src.params(json!({
        "cpu-throttle-initial": 50,
        "cpu-throttle-increment": 20,
        "max-cpu-throttle": 99,
        "throttle-trigger-threshold": 50,
    }));
    let p = src.c("query-migrate-parameters", json!({}));
    assert_eq!(p["cpu-throttle-initial"], 50, "{p}");
    let mut dst = dest(dir.path(), "dst", &m);
    dst.caps(&caps);
    let uri = dst.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
    let (q, seen) = poll_until_done(&mut src);
    assert_eq!(q["status"], "completed", "{q}");
    let max = seen.iter().copied().max().unwrap_or(0);
    assert!(max > 0, "never throttled while active: {q}");
    assert!(max <= 99, "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[1] >= w[0]),
        "the throttle only rises during a migration: {seen:?}"
    );
    // Removed at the end, and not shown any more (QEMU shows it only while throttling).
    assert!(q.get("cpu-throttle-percentage").is_none(), "{q}");
    // The bounded switchover rule still decides the moment: QEMU's rule held, then at most
    // MAX_EXTRA_PASSES more (decisions 32 and 84).
    let dec = &q["x-tern-switchover-decision"];
    assert_eq!(dec["switch"], true, "{q}");
    let since = dec["passes-since-qemu-would-switch"]
        .as_u64()
        .unwrap_or_else(|| panic!("switched before QEMU's rule held: {q}"));
    assert!(
        since <= u64::from(tern_migration::convergence::rule::MAX_EXTRA_PASSES),
        "{q}"
    );
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    eprintln!(
        "auto-converge pattern 2 vCPU 32 MiB @ 32 MiB/s: passes {} total {} ms downtime {} ms \
         throttle seen {seen:?}",
        ram_num(&q, "dirty-sync-count"),
        q["total-time"],
        q["downtime"],
    );
    assert_handover(&mut src, &mut dst);
    assert_pattern_ok(&mut dst, &m, dir.path(), "dst");
    src.quit_ok();
    dst.quit_ok();
}

/// Polls the source's `query-migrate` until the migration ends; returns the last reply and
/// every distinct `cpu-throttle-percentage` seen while `active`, in order.
fn poll_until_done(src: &mut Vm) -> (Value, Vec<u64>) {
    let end = Instant::now() + MIGRATION_TIMEOUT;
    let mut seen: Vec<u64> = Vec::new();
    loop {
        let q = src.qm();
        let st = q["status"].as_str().unwrap_or("").to_owned();
        if st == "active" {
            if let Some(p) = q["cpu-throttle-percentage"].as_u64() {
                if seen.last() != Some(&p) {
                    seen.push(p);
                }
            }
        }
        if matches!(
            st.as_str(),
            "completed" | "failed" | "cancelled" | "x-tern-unconfirmed"
        ) {
            return (q, seen);
        }
        assert!(Instant::now() < end, "migration still {st}: {q}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
