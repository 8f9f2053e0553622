//! What the destination checks before it accepts a source (CPUID, TSC frequency, the source's
//! `validate-uuid`) and `zero-page-detection`, with real `tern run` processes and real sockets.
//! The CPU mismatches are provoked on one host with the destination's hidden test-only options
//! `--x-test-only-cpuid-xor` and `--x-test-only-tsc-khz`.

mod common;

use common::*;
use serde_json::{json, Value};

/// A small, cheap source: `dirty` at a moderate rate on one vCPU.
fn small() -> Machine {
    Machine::dirty(1, 32, 32)
}

/// The source ran on through a refused migration: it never stopped its guest (no `STOP` event
/// since the migration started), runs now, and its guest makes progress.
fn assert_refused_before_downtime(src: &mut Vm) {
    let events = src.qmp.take_events();
    assert!(
        !events.iter().any(|e| e["event"] == "STOP"),
        "the source stopped its guest: {events:?}"
    );
    assert_eq!(src.run_status(), "running");
    src.assert_running_guest(20);
    let p0 = src.pages_written();
    src.wait_pages_advance(&p0, T);
}

/// Starts a migration from `src` to a fresh destination started with `extra` and waits for the
/// end; returns the destination and both `query-migrate`s.
fn migrate_to(
    dir: &std::path::Path,
    name: &str,
    src: &mut Vm,
    m: &Machine,
    extra: &[&str],
    want: &str,
) -> (Vm, Value, Value) {
    let mut dst = dest_with(dir, name, m.memory_mib, m.vcpus, extra);
    src.drain_events();
    let caps = [("events", true), ("return-path", true)];
    start_tcp_migration(src, &mut dst, &caps, false);
    let d = dst.wait_mig(&[want], MIGRATION_TIMEOUT);
    let s = src.wait_mig(&[want], MIGRATION_TIMEOUT);
    (dst, s, d)
}

#[test]
fn cpuid_mismatch_is_refused_before_the_source_stops() {
    let dir = tmpdir();
    let m = small();
    let mut src = boot(dir.path(), "src", &m);
    // The destination pretends its CPU lacks x87 (leaf 1 EDX bit 0), a compared feature bit.
    let (mut dst, s, d) = migrate_to(
        dir.path(),
        "dst",
        &mut src,
        &m,
        &["--x-test-only-cpuid-xor", "0x1:0:edx:0x1"],
        "failed",
    );
    for (side, q) in [("destination", &d), ("source", &s)] {
        let e = error_desc(q);
        assert!(
            e.contains("CPUID leaf 0x1.0x0 edx: source"),
            "{side} error-desc does not name the leaf and register: {q}"
        );
    }
    assert_refused_before_downtime(&mut src);
    dst.assert_alive();
    assert_ne!(dst.run_status(), "running");
    dst.quit_ok();
    // Same host, real CPUID and TSC rate in CONFIG on both sides: accepted.
    let (mut dst2, _, _) = migrate_to(dir.path(), "dst2", &mut src, &m, &[], "completed");
    assert_handover(&mut src, &mut dst2);
    dst2.quit_ok();
    src.quit_ok();
}

#[test]
fn tsc_frequency_mismatch_is_refused_naming_both_rates() {
    let dir = tmpdir();
    let m = small();
    let mut src = boot(dir.path(), "src", &m);
    let (dst, s, d) = migrate_to(
        dir.path(),
        "dst",
        &mut src,
        &m,
        &["--x-test-only-tsc-khz", "1000"],
        "failed",
    );
    for (side, q) in [("destination", &d), ("source", &s)] {
        let e = error_desc(q);
        assert!(
            e.contains("TSC frequency: source ") && e.contains(" kHz, destination 1000 kHz"),
            "{side} error-desc does not name both TSC rates: {q}"
        );
    }
    assert_refused_before_downtime(&mut src);
    dst.quit_ok();
    src.quit_ok();
}

#[test]
fn validate_uuid_on_the_source_only_is_checked_like_qemu() {
    let a = "6f1c1a52-8f4e-4d53-9e6b-2a5a3c1d0e01";
    let b = "0b7e3f4a-1c2d-4e5f-8a9b-c0d1e2f3a4b5";
    let dir = tmpdir();
    let m = small().arg("--uuid").arg(a);
    let mut src = boot(dir.path(), "src", &m);
    // Only the source has the capability; the destination has another UUID.
    src.caps(&[("validate-uuid", true)]);
    let (dst, s, d) = migrate_to(dir.path(), "dst", &mut src, &m, &["--uuid", b], "failed");
    let want = format!("VM UUID: source {a}, destination {b}");
    for (side, q) in [("destination", &d), ("source", &s)] {
        assert!(error_desc(q).contains(&want), "{side}: {q}");
    }
    assert_refused_before_downtime(&mut src);
    dst.quit_ok();
    // The same UUID passes the source-requested check.
    let (mut dst2, _, _) = migrate_to(
        dir.path(),
        "dst2",
        &mut src,
        &m,
        &["--uuid", a],
        "completed",
    );
    assert_handover(&mut src, &mut dst2);
    dst2.quit_ok();
    src.quit_ok();
}

#[test]
fn zero_page_detection_none_sends_zero_pages_as_normal_pages() {
    let dir = tmpdir();
    // Mostly zero RAM: an idle guest without a working set.
    let m = Machine::idle(0).memory(64);
    let mut src = boot(dir.path(), "src", &m);
    src.params(json!({"zero-page-detection": "none"}));
    assert_eq!(
        src.c("query-migrate-parameters", json!({}))["zero-page-detection"],
        "none"
    );
    let (mut dst, s, _) = migrate_to(dir.path(), "dst", &mut src, &m, &[], "completed");
    let pages = m.memory_bytes() / 4096;
    assert_eq!(ram_num(&s, "duplicate"), 0, "ZERO entries sent: {s}");
    assert!(ram_num(&s, "normal") >= pages, "{s}");
    assert!(ram_num(&s, "transferred") > m.memory_bytes(), "{s}");
    assert_handover(&mut src, &mut dst);
    dst.quit_ok();

    // `legacy` (and the default `multifd`, which without multifd is legacy, as in QEMU) send
    // the zero pages as ZERO entries.
    let mut src2 = boot(dir.path(), "src2", &m);
    src2.params(json!({"zero-page-detection": "legacy"}));
    let (mut dst2, s, _) = migrate_to(dir.path(), "dst2", &mut src2, &m, &[], "completed");
    assert!(ram_num(&s, "duplicate") > pages / 2, "{s}");
    assert!(ram_num(&s, "transferred") < m.memory_bytes() / 2, "{s}");
    assert_handover(&mut src2, &mut dst2);
    dst2.quit_ok();
    src2.quit_ok();
    src.quit_ok();
}
