//! Issue "pre-copy live migration", mirroring QEMU's migration-test (`precopy/unix/plain`,
//! `precopy/tcp/plain`, forced iterations with the non-converge / converge knobs, the `pattern`
//! memory check on the stopped destination) with real `tern run` processes.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// QEMU's `test_precopy_common`, live: force at least two dirty passes with tiny limits, open
/// them up, then check the handover and the destination's memory.
fn precopy_pattern(transport: &str, return_path: bool) {
    precopy_pattern_with(transport, return_path, true);
}

/// [`precopy_pattern`] with guest RAM on transparent huge pages (`tern run`'s default) or not,
/// on both ends.
fn precopy_pattern_with(transport: &str, return_path: bool, huge_pages: bool) {
    let dir = tmpdir();
    let hp = if huge_pages { "true" } else { "false" };
    let m = Machine::pattern(2, 32).arg("--huge-pages").arg(hp);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest_with(
        dir.path(),
        "dst",
        m.memory_mib,
        m.vcpus,
        &["--huge-pages", hp],
    );
    let caps = [("events", true), ("return-path", return_path)];
    src.caps(&caps);
    dst.caps(&caps);
    // migrate_ensure_non_converge (a little more bandwidth than QEMU's 3 MB/s so a pass over
    // the 32 MiB working set takes ~2 s rather than ~11 s; a 1 ms downtime limit alone
    // already makes it impossible to converge).
    src.params(json!({"max-bandwidth": 16_000_000, "downtime-limit": 1}));
    let uri = match transport {
        "tcp" => dst.listen_tcp(),
        _ => dst.listen_unix(&dir.path().join("migration.sock")),
    };
    assert_eq!(dst.run_status(), "inmigrate");
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["active"], T);
    let pass = src.wait_pass(3, MIGRATION_TIMEOUT);
    assert!(pass >= 3);
    // Still live: the source runs and the migration iterates.
    let q = src.qm();
    assert_eq!(q["status"], "active", "{q}");
    assert!(ram_num(&q, "dirty-sync-count") >= 3, "{q}");
    assert!(
        ram_num(&q, "transferred") > 32 << 20,
        "two passes moved less than the working set: {q}"
    );
    assert_eq!(src.run_status(), "running");
    src.assert_running_guest(20);
    assert_eq!(dst.run_status(), "inmigrate");
    let dq = dst.qm();
    assert_eq!(dq["status"], "active", "destination while iterating: {dq}");

    // migrate_ensure_converge.
    converge(&mut src);
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    src.event("STOP", T);
    dst.event("RESUME", T);
    assert!(ram_num(&q, "dirty-sync-count") >= 3, "{q}");
    assert!(
        q.get("downtime").is_some(),
        "completed query-migrate without downtime: {q}"
    );
    assert_guest_stall(&q);
    assert_handover(&mut src, &mut dst);
    if return_path {
        // The destination confirmed it runs: the source refuses a second copy. (Without a
        // return path it cannot know, and allows `cont` like QEMU.)
        assert_cont_refused(&mut src);
    }
    // The guest runs on the destination: its counters move on.
    let p0 = dst.pages_written();
    dst.wait_pages_advance(&p0, T);
    // migrate_end: stop the destination and check every page.
    assert_pattern_ok(&mut dst, &m, dir.path(), "dst");
    src.quit_ok();
    dst.quit_ok();
}

#[test]
fn precopy_unix_pattern_2vcpu_forced_passes() {
    precopy_pattern("unix", false);
}

#[test]
fn precopy_tcp_pattern_2vcpu_forced_passes_return_path() {
    precopy_pattern("tcp", true);
}

#[test]
fn precopy_tcp_pattern_2vcpu_without_huge_pages() {
    precopy_pattern_with("tcp", true, false);
}

/// `x-tern-max-guest-stall` after a completed migration: present, at least the downtime (it is
/// the larger of the downtime and the largest vCPU stall before the switchover), and its
/// detail names a phase and a time inside the migration.
fn assert_guest_stall(q: &serde_json::Value) {
    let stall = q["x-tern-max-guest-stall"]
        .as_u64()
        .unwrap_or_else(|| panic!("no x-tern-max-guest-stall: {q}"));
    let downtime = q["downtime"].as_u64().unwrap_or(0);
    assert!(
        stall >= downtime,
        "stall {stall} ms < downtime {downtime} ms: {q}"
    );
    let d = &q["x-tern-max-guest-stall-detail"];
    let phase = d["phase"].as_str().unwrap_or_default();
    assert!(
        phase == "pre-copy" || phase == "switchover",
        "phase {phase:?}: {q}"
    );
    assert!(
        d["at-ms"].as_u64().unwrap_or(u64::MAX) <= q["total-time"].as_u64().unwrap_or(0),
        "stall after the end of the migration: {q}"
    );
    // The vCPU part alone never exceeds the reported maximum (µs vs ms, rounded down).
    assert!(
        d["vcpu-stall-us"].as_u64().unwrap_or(u64::MAX) / 1000 <= stall,
        "{q}"
    );
}

#[test]
fn precopy_dirty_converges_with_default_limits() {
    let dir = tmpdir();
    let m = Machine::dirty(1, 64, 32);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest(dir.path(), "dst", &m);
    start_tcp_migration(&mut src, &mut dst, &[("events", true)], false);
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_guest_stall(&q);
    assert!(ram_num(&q, "transferred") > 0, "{q}");
    assert!(ram_num(&q, "total") >= m.memory_bytes(), "{q}");
    let final_pages = src.pages_written();
    assert_handover(&mut src, &mut dst);
    let now = dst.pages_written();
    for (n, s) in now.iter().zip(&final_pages) {
        assert!(
            n >= s,
            "destination counters behind the source's final ones: {final_pages:?} vs {now:?}"
        );
    }
    dst.wait_pages_advance(&final_pages, T);
    src.quit_ok();
    dst.quit_ok();
}

#[test]
fn precopy_dirty_nonconverging_iterates_until_limits_raised() {
    let dir = tmpdir();
    // Dirty 32 MiB as fast as the vCPU can: far beyond what 16 MB/s can copy.
    let m = Machine::dirty(1, 32, 0);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    // -S: the destination stays paused after the load, so both copies can be compared.
    let mut dst = dest_with(dir.path(), "dst", m.memory_mib, m.vcpus, &["-S"]);
    src.caps(&[("events", true)]);
    dst.caps(&[("events", true)]);
    src.params(json!({"max-bandwidth": 16_000_000, "downtime-limit": 1}));
    let uri = dst.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["active"], T);
    let mut seq = src.last_seq();
    for pass in 2..=4 {
        src.wait_pass(pass, MIGRATION_TIMEOUT);
        let q = src.qm();
        assert_eq!(q["status"], "active", "pass {pass}: {q}");
        assert_eq!(src.run_status(), "running", "pass {pass}");
        seq = src.hb_after(seq + 5, T);
    }
    let q = src.qm();
    assert!(ram_num(&q, "dirty-sync-count") >= 4, "{q}");
    assert_eq!(dst.mig_status(), "active");
    // While it runs, a second migration and capability changes are refused (QEMU's texts).
    let e = src.err("migrate", json!({"uri": "tcp:127.0.0.1:1"}));
    assert!(e.contains("in progress"), "{e}");
    let e = src.err(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": false}]}),
    );
    assert!(e.contains("in progress"), "{e}");
    assert_eq!(src.mig_status(), "active");

    // Open the limits: it must now complete.
    converge(&mut src);
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    let final_pages = src.pages_written();
    // The stopped source and the paused destination hold the same RAM, byte for byte: every
    // page dirtied during the passes and the switchover was sent.
    assert_eq!(dst.run_status(), "paused");
    assert_same_ram(&mut src, &mut dst, &m, dir.path());
    dst.c("cont", json!({}));
    dst.event("RESUME", T);
    assert_handover(&mut src, &mut dst);
    dst.wait_pages_advance(&final_pages, T);
    src.quit_ok();
    dst.quit_ok();
}

#[test]
fn precopy_pause_before_switchover_and_continue() {
    let dir = tmpdir();
    let m = Machine::dirty(1, 32, 16);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest(dir.path(), "dst", &m);
    src.caps(&[("events", true), ("pause-before-switchover", true)]);
    dst.caps(&[("events", true)]);
    let uri = dst.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["pre-switchover"], MIGRATION_TIMEOUT);
    // The source is stopped and waits for us.
    src.event("STOP", T);
    assert_eq!(src.mig_status(), "pre-switchover");
    let last = src.last_seq();
    src.assert_no_hb_after(last, Duration::from_millis(200));
    assert_eq!(src.mig_status(), "pre-switchover");
    let e = src.err("migrate-continue", json!({"state": "active"}));
    assert!(e.contains("pre-switchover"), "{e}");
    src.c("migrate-continue", json!({"state": "pre-switchover"}));
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    let l = assert_handover(&mut src, &mut dst);
    assert_eq!(l, last);
    src.quit_ok();
    dst.quit_ok();
}

/// QEMU's `precopy/tcp/plain` is not live: the source is stopped first and migrated at full
/// speed. The destination (`-S`) must then hold exactly the source's RAM.
#[test]
fn precopy_tcp_notlive_exact_memory() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    src.stop_vm();
    let mut dst = dest_with(dir.path(), "dst", m.memory_mib, m.vcpus, &["-S"]);
    start_tcp_migration(
        &mut src,
        &mut dst,
        &[("events", true), ("return-path", true)],
        false,
    );
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_eq!(src.run_status(), "postmigrate");
    assert_eq!(dst.run_status(), "paused");
    assert_same_ram(&mut src, &mut dst, &m, dir.path());
    dst.c("cont", json!({}));
    dst.event("RESUME", T);
    assert_handover(&mut src, &mut dst);
    assert_pattern_ok(&mut dst, &m, dir.path(), "dst");
    src.quit_ok();
    dst.quit_ok();
}

/// QEMU: `stop` during an incoming migration = stay paused when it completes; the paused
/// destination holds exactly the source's final RAM.
#[test]
fn precopy_unix_stop_during_inmigrate_keeps_destination_paused() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 32);
    let mut a = boot(dir.path(), "a", &m);
    a.wait_workload_running(T);
    let mut c = dest(dir.path(), "c", &m);
    c.caps(&[("events", true)]);
    c.c("stop", json!({}));
    assert_eq!(c.run_status(), "inmigrate");
    a.caps(&[("events", true)]);
    let uri = c.listen_unix(&dir.path().join("a-to-c.sock"));
    a.c("migrate", json!({ "uri": uri }));
    a.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    c.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_eq!(
        c.run_status(),
        "paused",
        "stop during inmigrate must keep the VM paused"
    );
    let last = a.last_seq();
    c.assert_no_hb_after(last, Duration::from_millis(200));
    assert_same_ram(&mut a, &mut c, &m, dir.path());
    assert_pattern_ok(&mut c, &m, dir.path(), "c");
    c.c("cont", json!({}));
    c.event("RESUME", T);
    assert_handover(&mut a, &mut c);
    let p1 = c.pages_written();
    c.wait_pages_advance(&p1, T);
    a.quit_ok();
    c.quit_ok();
}

/// A → B → C: a guest that arrived by migration migrates again (and can be snapshotted).
#[test]
fn precopy_chain_a_to_b_to_c() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 32);
    let mut a = boot(dir.path(), "a", &m);
    a.wait_workload_running(T);
    let mut b = migrate_fully(dir.path(), "b", &mut a, &m);
    let p0 = b.pages_written();
    b.wait_pages_advance(&p0, T);
    a.quit_ok();
    let mut c = migrate_fully(dir.path(), "c", &mut b, &m);
    let p1 = c.pages_written();
    c.wait_pages_advance(&p1, T);
    assert_pattern_ok(&mut c, &m, dir.path(), "c");
    c.c("cont", json!({}));
    c.event("RESUME", T);
    // And C, restored by migration, can be saved to a file (no return path to a file).
    c.caps(&[("return-path", false)]);
    let file = dir.path().join("c.tern");
    c.c(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    c.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_eq!(c.run_status(), "postmigrate");
    b.quit_ok();
    c.quit_ok();
}

/// QEMU keeps the source's run state (its global-state section): a guest that was paused before
/// a live migration is paused on the destination too, even without `-S`, until `cont`.
#[test]
fn precopy_paused_source_stays_paused_on_destination() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 32);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    src.stop_vm();
    let last = src.last_seq();
    let mut dst = dest(dir.path(), "dst", &m);
    start_tcp_migration(
        &mut src,
        &mut dst,
        &[("events", true), ("return-path", true)],
        false,
    );
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_eq!(
        dst.run_status(),
        "paused",
        "the paused guest must stay paused"
    );
    dst.assert_no_hb_after(last, Duration::from_millis(200));
    dst.c("cont", json!({}));
    dst.hb_after(last, T);
    src.quit_ok();
    dst.quit_ok();
}

/// Issue 13: once QEMU's rule holds, Tern switches within the bound (at most
/// `MAX_EXTRA_PASSES` extra passes), with every page right and the decision's reason in
/// `query-migrate`. The 2-vCPU `pattern` guest over 64 MiB at twice QEMU's default
/// `max-bandwidth` (256 MiB/s): QEMU's rule holds there run after run. At 128 MiB/s the same
/// guest (on huge pages, which make it dirty faster) sits at or beyond the edge: QEMU's rule
/// itself holds only by luck (7 s to over 180 s here), which is auto-converge's job, not the
/// switchover rule's (`bench/results`, the "pattern 64 MiB" rows).
/// `MIGRATION_TIMEOUT` is a failure guard, not a timing.
#[test]
fn precopy_pattern_2vcpu_64mib_switches_within_the_bound() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 64);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest(dir.path(), "dst", &m);
    let caps = [("events", true), ("return-path", true)];
    src.caps(&caps);
    dst.caps(&caps);
    src.params(json!({"max-bandwidth": 256u64 << 20, "downtime-limit": 300}));
    let uri = dst.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["active"], T);
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    let dec = &q["x-tern-switchover-decision"];
    assert_eq!(dec["switch"], true, "{q}");
    assert!(dec["reason"].as_str().is_some_and(|r| !r.is_empty()), "{q}");
    let since = dec["passes-since-qemu-would-switch"]
        .as_u64()
        .unwrap_or_else(|| panic!("switched before QEMU's rule held: {q}"));
    assert!(
        since <= u64::from(tern_migration::convergence::rule::MAX_EXTRA_PASSES),
        "{q}"
    );
    eprintln!(
        "pattern 2 vCPU 64 MiB @ 256 MiB/s: passes {} total {} ms downtime {} ms transferred {} decision {}",
        ram_num(&q, "dirty-sync-count"),
        q["total-time"],
        q["downtime"],
        ram_num(&q, "transferred"),
        dec
    );
    assert_handover(&mut src, &mut dst);
    assert_pattern_ok(&mut dst, &m, dir.path(), "dst");
    src.quit_ok();
    dst.quit_ok();
}
