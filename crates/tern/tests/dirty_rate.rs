//! Issue 13 item 8, QEMU's `calc-dirty-rate` / `query-dirty-rate` on real `tern run` processes:
//! an idle guest measures about 0 MiB/s, a guest dirtying at a known rate measures the same
//! order of magnitude (both modes), the status goes `unstarted` → `measuring` → `measured`, bad
//! arguments get QEMU's errors, and a `dirty-bitmap` measurement and a migration never run
//! together. Polling is paced by guest heartbeats, with deadlines; nothing asserts on timing.

mod common;

use std::time::Instant;

use common::*;
use serde_json::{json, Value};

/// Polls `query-dirty-rate` (heartbeat by heartbeat) until `measured`; returns the reply.
fn wait_measured(vm: &mut Vm) -> Value {
    let deadline = Instant::now() + T;
    let mut seq = vm.last_seq();
    loop {
        let q = vm.c("query-dirty-rate", json!({}));
        if q["status"] == "measured" {
            return q;
        }
        assert_eq!(q["status"], "measuring", "{q}");
        assert!(
            q.get("dirty-rate").is_none(),
            "no rate before measured: {q}"
        );
        assert!(Instant::now() < deadline, "not measured within {T:?}: {q}");
        seq = vm.hb_after(seq + 5, T);
    }
}

/// Measures with `args` and returns the rate (MiB/s) after checking the reply's shape.
fn measure(vm: &mut Vm, args: Value) -> i64 {
    vm.c("calc-dirty-rate", args.clone());
    let q = wait_measured(vm);
    let mode = args["mode"].as_str().unwrap_or("page-sampling");
    assert_eq!(q["mode"], mode, "{q}");
    if mode == "dirty-bitmap" {
        assert_eq!(q["sample-pages"], 0, "{q}");
    }
    assert!(q["start-time"].as_i64().unwrap_or(0) > 0, "{q}");
    assert!(q.get("vcpu-dirty-rate").is_none(), "{q}");
    q["dirty-rate"]
        .as_i64()
        .unwrap_or_else(|| panic!("no dirty-rate: {q}"))
}

#[test]
fn idle_guest_measures_about_zero_and_states_advance() {
    let dir = tmpdir();
    let m = Machine::idle(16);
    let mut vm = boot(dir.path(), "idle", &m);
    vm.wait_workload_running(T);

    let q = vm.c("query-dirty-rate", json!({}));
    assert_eq!(q["status"], "unstarted", "{q}");
    assert!(q.get("dirty-rate").is_none(), "{q}");

    // A long window, so that the first query surely finds it measuring.
    vm.c(
        "calc-dirty-rate",
        json!({"calc-time": 3, "mode": "dirty-bitmap"}),
    );
    let q = vm.c("query-dirty-rate", json!({}));
    assert_eq!(q["status"], "measuring", "{q}");
    assert_eq!(q["calc-time"], 3, "{q}");
    assert_eq!(q["calc-time-unit"], "second", "{q}");
    assert_eq!(
        vm.err("calc-dirty-rate", json!({"calc-time": 1})),
        "the dirty rate is already being measured."
    );
    let q = wait_measured(&mut vm);
    let rate = q["dirty-rate"].as_i64().expect("dirty-rate");
    assert!((0..=2).contains(&rate), "idle guest: {q}");
    assert_eq!(q["sample-pages"], 0, "{q}");
    let ms = vm.c("query-dirty-rate", json!({"calc-time-unit": "millisecond"}));
    assert_eq!(ms["calc-time-unit"], "millisecond", "{ms}");
    assert!(ms["calc-time"].as_i64().unwrap_or(0) >= 3000, "{ms}");

    // QEMU's default mode, sampling.
    let rate = measure(
        &mut vm,
        json!({"calc-time": 500, "calc-time-unit": "millisecond"}),
    );
    // One sampled page of the 128 that changed would read 4 MiB/s here.
    assert!((0..=4).contains(&rate), "idle guest, page-sampling: {rate}");
    let q = vm.c("query-dirty-rate", json!({}));
    assert_eq!(q["sample-pages"], 512, "{q}");

    // The guest ran through both measurements.
    let seq = vm.last_seq();
    vm.hb_after(seq, T);
    assert_eq!(vm.run_status(), "running");
    vm.quit_ok();
}

#[test]
fn dirtying_guest_measures_its_rate_in_both_modes() {
    let dir = tmpdir();
    // 16 MiB/s over a 64 MiB working set in 256 MiB: no page is dirtied twice in a 1 s window.
    let m = Machine::dirty(1, 64, 16);
    let mut vm = boot(dir.path(), "dirty", &m);
    vm.wait_workload_running(T);
    let before = vm.pages_written();
    vm.wait_pages_advance(&before, T);

    let rate = measure(&mut vm, json!({"calc-time": 1, "mode": "dirty-bitmap"}));
    eprintln!("dirty-bitmap: {rate} MiB/s (guest paced at 16)");
    assert!(
        (4..=64).contains(&rate),
        "dirty-bitmap: {rate} MiB/s, guest at 16"
    );

    // 4096 samples per GiB: 1024 pages of the 256 MiB, a quarter of them in the working set.
    let rate = measure(
        &mut vm,
        json!({"calc-time": 1, "sample-pages": 4096, "mode": "page-sampling"}),
    );
    eprintln!("page-sampling: {rate} MiB/s (guest paced at 16)");
    assert!(
        (4..=64).contains(&rate),
        "page-sampling: {rate} MiB/s, guest at 16"
    );
    assert_eq!(vm.c("query-dirty-rate", json!({}))["sample-pages"], 4096);
    vm.quit_ok();
}

#[test]
fn bad_arguments_get_qemus_errors() {
    let dir = tmpdir();
    let m = Machine::idle(8);
    let mut vm = boot(dir.path(), "args", &m);
    let range = "Calculation time is out of range [50ms, 60000ms].";
    for args in [
        json!({"calc-time": 0}),
        json!({"calc-time": 61}),
        json!({"calc-time": 49, "calc-time-unit": "millisecond"}),
        json!({"calc-time": -1}),
    ] {
        assert_eq!(vm.err("calc-dirty-rate", args.clone()), range, "{args}");
    }
    assert_eq!(
        vm.err(
            "calc-dirty-rate",
            json!({"calc-time": 1, "sample-pages": 512, "mode": "dirty-bitmap"})
        ),
        "sample-pages is used only in page-sampling mode"
    );
    assert_eq!(
        vm.err(
            "calc-dirty-rate",
            json!({"calc-time": 1, "sample-pages": 127})
        ),
        "sample-pages is out of range[128, 4096]."
    );
    assert_eq!(
        vm.err(
            "calc-dirty-rate",
            json!({"calc-time": 1, "mode": "dirty-ring"})
        ),
        "mode dirty-ring is not enabled, use other method instead."
    );
    let e = vm.err("calc-dirty-rate", json!({"calc-time": 1, "mode": "bogus"}));
    assert!(e.contains("mode"), "{e}");
    let e = vm.err("calc-dirty-rate", json!({}));
    assert!(e.contains("calc-time"), "{e}");
    // Nothing started.
    assert_eq!(vm.c("query-dirty-rate", json!({}))["status"], "unstarted");
    vm.quit_ok();
}

#[test]
fn dirty_bitmap_measurement_and_migration_exclude_each_other() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 32);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);

    // A measurement owns the dirty log: no migration meanwhile (and no x-tern-dirty-log).
    src.c(
        "calc-dirty-rate",
        json!({"calc-time": 3, "mode": "dirty-bitmap"}),
    );
    let e = src.err("migrate", json!({"uri": "tcp:127.0.0.1:1"}));
    assert!(e.contains("calc-dirty-rate"), "{e}");
    let e = src.err("x-tern-dirty-log", json!({"enable": true}));
    assert!(e.contains("calc-dirty-rate"), "{e}");
    assert_eq!(src.mig_status(), "none");
    wait_measured(&mut src);

    // A migration owns it: no dirty-bitmap measurement meanwhile; page-sampling only reads.
    let mut dst = dest(dir.path(), "dst", &m);
    start_tcp_migration(&mut src, &mut dst, &[("events", true)], true);
    src.wait_mig(&["active"], T);
    assert_eq!(
        src.err(
            "calc-dirty-rate",
            json!({"calc-time": 1, "mode": "dirty-bitmap"})
        ),
        "There's a migration process in progress"
    );
    let rate = measure(
        &mut src,
        json!({"calc-time": 200, "calc-time-unit": "millisecond"}),
    );
    assert!(rate >= 0, "{rate}");
    assert_eq!(src.mig_status(), "active");
    converge(&mut src);
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], T);
    assert_pattern_ok(&mut dst, &m, dir.path(), "dst");
}
