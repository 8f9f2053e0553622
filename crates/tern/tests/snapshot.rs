//! Issue "machine state / migrate to a file": `migrate file:` saves a stopped copy of the VM
//! (the source ends `postmigrate`), a new `tern run --incoming defer` + `migrate-incoming file:`
//! (or `tern restore`) brings it back exactly where it stopped, and damaged or mismatched files
//! fail cleanly on a destination that stays alive.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tern::harness::TernProcess;

/// Saves `src` (running or paused) to `file` with QMP `migrate file:`; checks the source ends
/// `postmigrate`, stopped, with no new heartbeat, and refuses `cont`. Returns the last seq.
fn save(src: &mut Vm, file: &Path) -> u64 {
    src.caps(&[("events", true)]);
    let was_running = src.run_status() == "running";
    src.c(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert!(ram_num(&q, "transferred") > 0, "{q}");
    if was_running {
        src.event("STOP", T);
    }
    assert_eq!(
        src.run_status(),
        "postmigrate",
        "source after migrate file:"
    );
    let last = src.last_seq();
    src.assert_no_hb_after(last, Duration::from_millis(300));
    let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    assert!(len > 16, "snapshot file {} is empty", file.display());
    last
}

/// `tern run --incoming defer` + `migrate-incoming file:FILE`, waits for `completed`.
fn restore(dir: &Path, name: &str, m: &Machine, file: &Path, extra: &[&str]) -> Vm {
    let mut d = dest_with(dir, name, m.memory_mib, m.vcpus, extra);
    assert_eq!(d.run_status(), "inmigrate");
    d.caps(&[("events", true)]);
    d.c(
        "migrate-incoming",
        json!({"uri": format!("file:{}", file.display())}),
    );
    d.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    d
}

/// The restored guest continues exactly after the saved heartbeat, and its counters move on
/// from the saved values.
fn assert_continues(d: &mut Vm, last: u64, saved_pages: &[u64]) {
    assert_eq!(d.run_status(), "running", "{}: after restore", d.name);
    // The guest-control state migrates with the last heartbeat record, so look after `last`.
    let first = d.hb_after(last, T);
    assert_eq!(
        first,
        last + 1,
        "{}: the restored guest's first heartbeat must follow the saved one",
        d.name
    );
    let recs = d.heartbeats_since(last).expect("x-tern-heartbeats");
    assert_eq!(recs.first().map(|r| r.0), Some(last + 1), "{recs:?}");
    for w in recs.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "heartbeat sequence has a hole: {w:?}");
    }
    let now = d.pages_written();
    assert_eq!(now.len(), saved_pages.len());
    for (n, s) in now.iter().zip(saved_pages) {
        assert!(
            n >= s,
            "pages-written went backwards after restore: saved {saved_pages:?}, now {now:?}"
        );
    }
    d.wait_pages_advance(saved_pages, T);
}

/// `tern analyze-stream FILE` as JSON.
fn analyze(file: &Path) -> Value {
    let o = tern(&["analyze-stream", &file.display().to_string()]);
    let text = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "analyze-stream {}: not JSON ({e}), exit {}, stdout {text}, stderr {}",
            file.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

#[test]
fn pattern_2vcpu_save_restore_twice() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 64);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let p0 = src.pages_written();
    src.wait_pages_advance(&p0, T);
    let file = dir.path().join("pattern.tern");
    let last = save(&mut src, &file);
    let saved = src.pages_written();
    // The saved copy itself is consistent.
    assert_pattern_ok(&mut src, &m, dir.path(), "src");

    let a = analyze(&file);
    assert_eq!(a["ok"], json!(true), "analyze-stream on a good file: {a}");

    for name in ["restore1", "restore2"] {
        let mut d = restore(dir.path(), name, &m, &file, &[]);
        assert_continues(&mut d, last, &saved);
        assert_pattern_ok(&mut d, &m, dir.path(), name);
        d.c("cont", json!({}));
        d.event("RESUME", T);
        d.assert_running_guest(5);
        d.quit_ok();
    }
    // After a snapshot to a file the source may go on (`cont` from postmigrate).
    src.c("cont", json!({}));
    src.event("RESUME", T);
    assert_eq!(src.run_status(), "running");
    let next = src.hb_after(last, T);
    assert_eq!(next, last + 1, "the source's heartbeats after cont");
    src.wait_pages_advance(&saved, T);
    src.quit_ok();
}

#[test]
fn dirty_2vcpu_save_restore_exact_memory() {
    let dir = tmpdir();
    let m = Machine::dirty(2, 64, 64);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let p0 = src.pages_written();
    src.wait_pages_advance(&p0, T);
    let file = dir.path().join("dirty.tern");
    let last = save(&mut src, &file);
    let saved = src.pages_written();

    // Restore paused (-S: QEMU's autostart off): the memory must be the saved memory, byte
    // for byte, over the whole RAM.
    let mut d = restore(dir.path(), "dst", &m, &file, &["-S"]);
    assert_eq!(d.run_status(), "paused", "-S destination after the load");
    d.assert_no_hb_after(last, Duration::from_millis(200));
    assert_same_ram(&mut src, &mut d, &m, dir.path());
    d.c("cont", json!({}));
    d.event("RESUME", T);
    assert_continues(&mut d, last, &saved);
    d.quit_ok();
    src.quit_ok();
}

/// A stand-in executable that turns the harness's `run --qmp Q ARGS` into
/// `tern restore --qmp Q ARGS`, so `tern restore` children get the harness too.
fn restore_wrapper(dir: &Path) -> PathBuf {
    let p = dir.join("tern-restore.sh");
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\n[ \"$1\" = run ] && shift\nexec '{}' restore \"$@\"\n",
            exe().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn paused_vm_snapshot_and_restore_cli() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 32);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let p0 = src.pages_written();
    src.wait_pages_advance(&p0, T);
    src.stop_vm();
    let last = src.last_seq();
    let saved = src.pages_written();

    // `tern snapshot --qmp SOCK FILE`.
    let file = dir.path().join("paused.tern");
    let o = tern(&[
        "snapshot",
        "--qmp",
        &src.qmp_path.display().to_string(),
        &file.display().to_string(),
    ]);
    assert!(
        o.status.success(),
        "tern snapshot failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(src.run_status(), "postmigrate");
    assert_eq!(
        src.last_seq(),
        last,
        "the paused source beat while being saved"
    );
    assert_eq!(
        src.pages_written(),
        saved,
        "the paused source ran while being saved"
    );

    // `tern restore FILE --qmp SOCK`: the machine shape comes from the file.
    let qmp = dir.path().join("restored.qmp");
    let p = TernProcess::spawn(
        "restored",
        &restore_wrapper(dir.path()),
        &qmp,
        &[file.display().to_string()],
        None,
    )
    .unwrap_or_else(|e| panic!("tern restore: {e:#}"));
    let mut d = Vm::wrap("restored", p);
    let q = d.qm();
    // The load may still be running when the harness connects.
    if status(&q) != "completed" {
        let deadline = std::time::Instant::now() + MIGRATION_TIMEOUT;
        let mut seq = 0;
        while d.mig_status() != "completed" {
            assert!(
                std::time::Instant::now() < deadline,
                "restore never completed: {}",
                d.qm()
            );
            assert_ne!(d.mig_status(), "failed", "{}", d.qm());
            // Wait for the guest to beat (it beats only once loaded), at most 200 ms.
            if let Ok((s, _)) = d.wait_heartbeat_after(seq, Duration::from_millis(200)) {
                seq = s;
            }
        }
    }
    let uuid_src = src.c("query-uuid", json!({}));
    let uuid_dst = d.c("query-uuid", json!({}));
    assert_eq!(uuid_src, uuid_dst, "tern restore keeps the VM's UUID");
    // The VM was paused when it was saved: like QEMU, it stays paused after the restore.
    assert_eq!(d.run_status(), "paused");
    d.assert_no_hb_after(last, Duration::from_millis(200));
    d.c("cont", json!({}));
    assert_continues(&mut d, last, &saved);
    assert_pattern_ok(&mut d, &m, dir.path(), "restored");
    d.quit_ok();
    src.quit_ok();
}

use tern::harness::status;

/// Fails an incoming migration from `file` on a fresh destination of shape `mem`/`vcpus`
/// (`exit-on-error: false`); checks `failed`, an `error-desc` naming one of `words`, that the
/// destination lives on (answers QMP, the guest never ran, `cont` is refused) and quits
/// cleanly.
fn expect_load_failure(
    dir: &Path,
    name: &str,
    file: &Path,
    mem: u64,
    vcpus: u32,
    words: &[&str],
) -> String {
    let mut d = dest_with(dir, name, mem, vcpus, &[]);
    d.caps(&[("events", true)]);
    d.c(
        "migrate-incoming",
        json!({"uri": format!("file:{}", file.display()), "exit-on-error": false}),
    );
    let q = d.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    let desc = error_desc(&q);
    let lower = desc.to_lowercase();
    assert!(
        words.iter().any(|w| lower.contains(&w.to_lowercase())),
        "{name}: error-desc {desc:?} names none of {words:?}"
    );
    d.assert_alive();
    let st = d.run_status();
    assert_ne!(st, "running", "{name}: the VM runs after a failed load");
    d.assert_no_hb_after(0, Duration::from_millis(100));
    let e = d.err("cont", json!({}));
    assert!(e.contains("incoming migration failed"), "{name}: cont: {e}");
    // A second migrate-incoming is refused (one per process, like QEMU), the process survives.
    let e = d.err("migrate-incoming", json!({"uri": "tcp:127.0.0.1:0"}));
    assert!(!e.is_empty());
    d.assert_alive();
    d.quit_ok();
    desc
}

fn analyze_error(file: &Path) -> String {
    let a = analyze(file);
    assert_eq!(
        a["ok"],
        json!(false),
        "analyze-stream accepted {}: {a}",
        file.display()
    );
    a.pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("analyze-stream: no error message: {a}"))
        .to_owned()
}

#[test]
fn bad_snapshot_files_fail_cleanly() {
    let dir = tmpdir();
    // A filled idle guest: its pages never hold a zero byte, so the file is ~16 MiB of page
    // data every run (a `pattern` guest's pages are all zero whenever its counter wraps).
    let m = Machine::idle(16);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let good = dir.path().join("good.tern");
    save(&mut src, &good);
    src.quit_ok();
    let bytes = std::fs::read(&good).unwrap();
    let n = bytes.len();
    assert!(n > 1 << 20, "a 16 MiB filled guest saved to only {n} bytes");

    let write = |name: &str, data: &[u8]| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        p
    };

    // Truncated: inside the header, inside CONFIG, in the RAM, just before END, inside END.
    for cut in [0usize, 10, 40, n / 2, n - 17, n - 1] {
        let f = write(&format!("cut-{cut}.tern"), &bytes[..cut]);
        let aw = analyze_error(&f);
        assert!(
            aw.to_lowercase().contains("truncated"),
            "analyze-stream on cut {cut}: {aw}"
        );
        expect_load_failure(
            dir.path(),
            &format!("cut{cut}"),
            &f,
            m.memory_mib,
            m.vcpus,
            &["truncated"],
        );
    }

    // One flipped byte in the middle (page data: only the checksum can catch it).
    let mut flipped = bytes.clone();
    flipped[n / 2] ^= 0x01;
    let f = write("flipped.tern", &flipped);
    let aw = analyze_error(&f);
    assert!(
        aw.contains("checksum") || aw.contains("invalid") || aw.contains("unknown"),
        "{aw}"
    );
    expect_load_failure(
        dir.path(),
        "flipped",
        &f,
        m.memory_mib,
        m.vcpus,
        &["checksum", "invalid", "unknown", "mismatch"],
    );

    // Wrong magic.
    let mut magic = bytes.clone();
    magic[..8].copy_from_slice(b"QEVM\0\0\0\x03");
    let f = write("magic.tern", &magic);
    assert!(analyze_error(&f).contains("magic"));
    expect_load_failure(dir.path(), "magic", &f, m.memory_mib, m.vcpus, &["magic"]);

    // Random bytes (xorshift, 1 MiB).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let f = write("random.tern", &random);
    assert!(analyze_error(&f).contains("magic"));
    expect_load_failure(dir.path(), "random", &f, m.memory_mib, m.vcpus, &["magic"]);

    // A good stream into a machine of another shape.
    let d = expect_load_failure(
        dir.path(),
        "bigger",
        &good,
        512,
        m.vcpus,
        &["RAM block", "memory"],
    );
    assert!(
        d.to_lowercase().contains("mismatch") || d.contains("source"),
        "{d}"
    );
    expect_load_failure(dir.path(), "smp2", &good, m.memory_mib, 2, &["vCPU"]);

    // The good file still restores (the failures above did not touch it).
    let mut ok = restore(dir.path(), "good", &m, &good, &[]);
    ok.assert_running_guest(5);
    ok.quit_ok();
}

/// A snapshot that cannot be written fails cleanly: `failed` with the cause, and the VM that
/// the save paused runs again from where it stopped.
#[test]
fn snapshot_write_failures_resume_the_vm() {
    let dir = tmpdir();
    let m = Machine::dirty(1, 16, 16);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    src.caps(&[("events", true)]);

    // A directory that does not exist: refused before the VM is touched.
    let o = tern(&[
        "snapshot",
        "--qmp",
        &src.qmp_path.display().to_string(),
        &dir.path().join("no/such/dir/x.tern").display().to_string(),
    ]);
    assert!(
        !o.status.success(),
        "tern snapshot into a missing directory succeeded"
    );
    let text = String::from_utf8_lossy(&o.stderr).to_string() + &String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("x.tern"),
        "tern snapshot's error does not name the file: {text}"
    );
    assert_eq!(src.mig_status(), "failed");
    assert_eq!(src.run_status(), "running");
    src.assert_running_guest(10);

    // A device that is always full: the write fails after the VM was paused for the save.
    src.drain_events();
    src.c("migrate", json!({"uri": "file:/dev/full"}));
    let q = src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    let d = error_desc(&q).to_lowercase();
    assert!(
        d.contains("space") || d.contains("write"),
        "error-desc: {q}"
    );
    assert_eq!(
        src.run_status(),
        "running",
        "the VM stays paused after a failed save"
    );
    let last = src.last_seq();
    src.hb_after(last, T);
    let p0 = src.pages_written();
    src.wait_pages_advance(&p0, T);

    // And a good save still works afterwards.
    let file = dir.path().join("after.tern");
    src.drain_events();
    save(&mut src, &file);
    src.quit_ok();
}
