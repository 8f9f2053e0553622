//! Issue "guests Tern did not write", item 4: every migration can prove itself. With the
//! `x-tern-ram-digest` capability the source hashes its memory with the vCPUs stopped and the
//! destination compares its own memory before it runs (docs/stream-format.md §7a). Real `tern
//! run` processes over TCP; a destination that writes one byte wrong (the hidden
//! `--x-test-only-corrupt-ram`, a fault the stream checksum cannot see) is caught, on the main
//! stream and on a multifd channel (2 channels, decision 252).

mod common;

use common::*;
use serde_json::json;

/// A page the `pattern` workload writes (the first page of the workload area, 16 MiB), at its
/// first byte: the byte the pattern check reads.
const CORRUPT_GPA: &str = "0x1000000";

fn machine() -> Machine {
    Machine::pattern(2, 64).memory(512)
}

fn migrate(src: &mut Vm, dst: &mut Vm, src_digest: bool, dst_digest: bool) {
    let caps = [("events", true), ("return-path", true)];
    src.caps(&caps);
    dst.caps(&caps);
    src.caps(&[("x-tern-ram-digest", src_digest)]);
    dst.caps(&[("x-tern-ram-digest", dst_digest)]);
    converge(src);
    let uri = dst.listen_tcp_with(Some(false));
    src.c("migrate", json!({ "uri": uri }));
}

/// As [`migrate`], with `multifd` and 2 channels on both sides (decision 252).
fn migrate_2_channels(src: &mut Vm, dst: &mut Vm, src_digest: bool, dst_digest: bool) {
    for vm in [&mut *src, &mut *dst] {
        vm.caps(&[("multifd", true)]);
        vm.params(json!({ "multifd-channels": 2 }));
    }
    migrate(src, dst, src_digest, dst_digest);
}

#[test]
fn digest_is_checked_and_the_guest_arrives_whole() {
    let dir = tmpdir();
    let m = machine();
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest(dir.path(), "dst", &m);
    migrate(&mut src, &mut dst, true, false);
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    let dq = dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    // 512 MiB in 2 MiB chunks, hashed on both sides; the destination says it matched.
    let d = &dq["x-tern-ram-digest"];
    assert_eq!(d["verified"], true, "destination: {dq}");
    assert_eq!(d["chunks"], 256, "destination: {dq}");
    assert_eq!(d["chunk-bytes"], 2 << 20, "destination: {dq}");
    assert_eq!(q["x-tern-ram-digest"]["chunks"], 256, "source: {q}");
    assert_eq!(q["x-tern-ram-digest"]["verified"], true, "source: {q}");
    assert!(
        q["x-tern-downtime-breakdown"]
            .get("digest-wait-us")
            .is_some(),
        "source: {q}"
    );
    assert_handover(&mut src, &mut dst);
    assert_pattern_ok(&mut dst, &m, dir.path(), "digest");
}

#[test]
fn a_page_written_wrong_fails_the_migration_and_the_source_runs_on() {
    // The source sends the digest; the destination checks it without requiring it.
    a_page_written_wrong_is_caught(|s, d| migrate(s, d, true, false));
}

/// A destination that writes one byte of [`CORRUPT_GPA`]'s page wrong, migrated to by `start`
/// (main stream or multifd channels): the digest names the chunk on both sides, the destination
/// never runs the damaged guest and the source resumes its own.
fn a_page_written_wrong_is_caught(start: impl FnOnce(&mut Vm, &mut Vm)) {
    let dir = tmpdir();
    let m = machine();
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest_with(
        dir.path(),
        "dst",
        m.memory_mib,
        m.vcpus,
        &["--x-test-only-corrupt-ram", CORRUPT_GPA],
    );
    start(&mut src, &mut dst);
    let q = src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    let e = error_desc(&q);
    assert!(
        e.contains("RAM digest mismatch") && e.contains("1 of 256 chunk(s)"),
        "source error-desc: {e}"
    );
    assert!(e.contains("0x1000000..0x1200000"), "names the chunk: {e}");
    let dq = dst.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    assert!(
        error_desc(&dq).contains("RAM digest mismatch"),
        "destination: {dq}"
    );
    // The destination never ran the damaged guest; the source resumed its own.
    assert_eq!(dst.run_status(), "inmigrate");
    assert_eq!(src.run_status(), "running");
    src.assert_running_guest(20);
    src.quit_ok();
}

/// The control for the test above: the same fault without the digest is invisible to the
/// stream's checksum; the migration "completes" and only the workload's own check sees it.
#[test]
fn without_the_digest_the_same_fault_goes_unnoticed() {
    let dir = tmpdir();
    let m = machine();
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest_with(
        dir.path(),
        "dst",
        m.memory_mib,
        m.vcpus,
        &["--x-test-only-corrupt-ram", CORRUPT_GPA],
    );
    migrate(&mut src, &mut dst, false, false);
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.stop_vm();
    let dump = dir.path().join("dump.bin");
    dst.pmemsave(&dump, m.dump_bytes());
    let (ok, report) = check_pattern(&dump);
    assert!(!ok, "the flipped byte must break the pattern: {report}");
}

/// Multifd with 2 channels and the digest on both sides: every page arrives over the channels,
/// each receiver reads back what it wrote, and the destination's memory is proven the
/// source's before it runs.
#[test]
fn digest_over_2_multifd_channels_is_checked_and_the_guest_arrives_whole() {
    let dir = tmpdir();
    let m = machine();
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest(dir.path(), "dst", &m);
    migrate_2_channels(&mut src, &mut dst, true, true);
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    let dq = dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    let (multifd, passes) = (
        ram_num(&q, "multifd-bytes"),
        ram_num(&q, "dirty-sync-count"),
    );
    let d = &dq["x-tern-ram-digest"];
    eprintln!(
        "multifd 2 channels + digest: multifd-bytes {multifd}, transferred {}, passes {passes}, \
         destination hash-us {} verify-us {}, source hash-us {}, digest-wait-us {}",
        ram_num(&q, "transferred"),
        d["hash-us"],
        d["verify-us"],
        q["x-tern-ram-digest"]["hash-us"],
        q["x-tern-downtime-breakdown"]["digest-wait-us"],
    );
    // The pages went over the channels, in more than one pass (the guest kept writing).
    assert!(multifd > 8 << 20, "source: {q}");
    assert!(passes >= 2, "source: {q}");
    assert_eq!(d["verified"], true, "destination: {dq}");
    assert_eq!(d["chunks"], 256, "destination: {dq}");
    assert_eq!(d["chunk-bytes"], 2 << 20, "destination: {dq}");
    // The channels' reading back and hashing is counted (CPU time of every receiver).
    assert!(d["hash-us"].as_u64().unwrap_or(0) > 0, "destination: {dq}");
    assert!(d["verify-us"].as_u64().is_some(), "destination: {dq}");
    assert_eq!(q["x-tern-ram-digest"]["chunks"], 256, "source: {q}");
    assert_eq!(q["x-tern-ram-digest"]["verified"], true, "source: {q}");
    assert_handover(&mut src, &mut dst);
    assert_pattern_ok(&mut dst, &m, dir.path(), "digest-multifd");
}

/// The fault of the test above on a multifd channel: the destination's receiver writes the
/// page with a byte flipped. (Every page goes over the channels: the destination refuses RAM
/// on the main stream of a multifd migration, §2.5.)
#[test]
fn a_page_a_multifd_channel_wrote_wrong_fails_the_migration_and_the_source_runs_on() {
    a_page_written_wrong_is_caught(|s, d| migrate_2_channels(s, d, true, true));
}

#[test]
fn a_destination_that_requires_the_digest_refuses_a_source_without_it() {
    let dir = tmpdir();
    let m = machine();
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest(dir.path(), "dst", &m);
    migrate(&mut src, &mut dst, false, true);
    let q = src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    let e = error_desc(&q);
    assert!(
        e.contains("'x-tern-ram-digest' is on at the destination but off at the source"),
        "source error-desc: {e}"
    );
    assert_eq!(src.run_status(), "running");
    src.assert_running_guest(5);
}

/// A snapshot file carries the digest too: `migrate file:` with the capability, then a restore
/// checks it (the destination's own capability is off: the file's announcement decides).
#[test]
fn a_snapshot_file_carries_the_digest_and_the_restore_checks_it() {
    let dir = tmpdir();
    let m = machine();
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    src.caps(&[("events", true), ("x-tern-ram-digest", true)]);
    let file = dir.path().join("snap.tern");
    src.c(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    let mut d = dest(dir.path(), "restored", &m);
    d.caps(&[("events", true)]);
    d.c(
        "migrate-incoming",
        json!({"uri": format!("file:{}", file.display())}),
    );
    let dq = d.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_eq!(dq["x-tern-ram-digest"]["verified"], true, "{dq}");
    let out = tern(&["analyze-stream", &file.display().to_string()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ram-digest"), "analyze-stream: {text}");
}
