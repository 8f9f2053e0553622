//! Issue 9, plain post-copy with real `tern run` processes, mirroring QEMU's migration-test
//! (`postcopy/unix/plain`, `postcopy/tcp/plain`, cancel before the switch) plus the killed
//! source: a 2-vCPU `pattern` guest, one pre-copy pass, `migrate-start-postcopy`, the guest
//! running on the destination on pages fetched on demand, the `pattern` check of every page.

mod common;

use common::*;
use serde_json::json;

/// Without `return-path`: post-copy opens the return path itself, as QEMU does.
const CAPS: [(&str, bool); 3] = [
    ("events", true),
    ("postcopy-ram", true),
    ("postcopy-blocktime", true),
];

/// Starts a post-copy-capable migration that cannot converge in pre-copy; returns after the
/// first pass ended.
fn start(dir: &std::path::Path, transport: &str, m: &Machine, exit_on_error: bool) -> (Vm, Vm) {
    start_with(dir, transport, m, exit_on_error, |_, _| {})
}

/// [`start`], with `setup` run on both VMs before the migration (e.g. TLS credentials).
fn start_with(
    dir: &std::path::Path,
    transport: &str,
    m: &Machine,
    exit_on_error: bool,
    setup: impl FnOnce(&mut Vm, &mut Vm),
) -> (Vm, Vm) {
    let mut src = boot(dir, "src", m);
    src.wait_workload_running(T);
    let mut dst = dest(dir, "dst", m);
    src.caps(&CAPS);
    dst.caps(&CAPS);
    setup(&mut src, &mut dst);
    src.params(json!({"max-bandwidth": 32_000_000, "downtime-limit": 1}));
    let uri = match (transport, exit_on_error) {
        ("tcp", true) => dst.listen_tcp_with(None),
        ("tcp", false) => dst.listen_tcp(),
        _ => dst.listen_unix(&dir.join("migration.sock")),
    };
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["active"], T);
    src.wait_pass(2, MIGRATION_TIMEOUT);
    (src, dst)
}

fn plain_postcopy(transport: &str) {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let (src, dst) = start(dir.path(), transport, &m, false);
    finish_postcopy(&dir, &m, src, dst);
}

/// Switches a started migration to post-copy and checks everything that follows.
fn finish_postcopy(dir: &tempfile::TempDir, m: &Machine, mut src: Vm, mut dst: Vm) {
    // The push is limited, the requested pages are not: the guest asks for what it touches.
    src.params(json!({"max-postcopy-bandwidth": 64_000_000}));
    src.c("migrate-start-postcopy", json!({}));
    src.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    let dq = dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert!(ram_num(&q, "postcopy-requests") > 0, "{q}");
    eprintln!("source after post-copy: {q}\ndestination: {dq}");
    assert!(ram_num(&q, "postcopy-bytes") > 0, "{q}");
    assert!(dq.get("postcopy-blocktime").is_some(), "{dq}");
    assert_eq!(
        dq["postcopy-vcpu-blocktime"].as_array().map(Vec::len),
        Some(2),
        "{dq}"
    );
    assert_handover(&mut src, &mut dst);
    assert_cont_refused(&mut src);
    let p0 = dst.pages_written();
    dst.wait_pages_advance(&p0, T);
    assert_pattern_ok(&mut dst, m, dir.path(), "dst");
    src.quit_ok();
    dst.quit_ok();
}

/// Post-copy over TLS (issue 10: every channel Tern has): the stream, the requested pages and
/// the return path's page requests all go through the TLS session. Certificates from
/// `scripts/tls-certs.sh` (skipped without `openssl`).
#[test]
fn postcopy_over_tls_tcp_pattern_2vcpu() {
    let dir = tmpdir();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/tls-certs.sh");
    let pki = dir.path().join("pki");
    match std::process::Command::new("bash")
        .arg(&script)
        .arg(&pki)
        .arg("127.0.0.1")
        .output()
    {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!("skipping: tls-certs.sh: {other:?}");
            return;
        }
    }
    let creds = pki.join("127.0.0.1").display().to_string();
    let m = Machine::pattern(2, 32);
    let (src, dst) = start_with(dir.path(), "tcp", &m, false, |src, dst| {
        for (vm, endpoint) in [(src, "client"), (dst, "server")] {
            vm.c(
                "object-add",
                json!({"qom-type": "tls-creds-x509", "id": "tls0", "dir": creds, "endpoint": endpoint}),
            );
            vm.params(json!({"tls-creds": "tls0"}));
        }
    });
    finish_postcopy(&dir, &m, src, dst);
}

#[test]
fn postcopy_unix_plain_pattern_2vcpu() {
    plain_postcopy("unix");
}

#[test]
fn postcopy_tcp_plain_pattern_2vcpu() {
    plain_postcopy("tcp");
}

#[test]
fn postcopy_cancel_before_the_switch_the_source_runs_on() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let (mut src, mut dst) = start(dir.path(), "tcp", &m, false);
    src.c("migrate_cancel", json!({}));
    src.wait_mig(&["cancelled"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    assert_source_runs_on(&mut src);
    src.quit_ok();
    dst.quit_ok();
}

#[test]
fn postcopy_killed_source_the_destination_reports_the_pages_it_lost() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let (mut src, mut dst) = start(dir.path(), "tcp", &m, false);
    // A slow push: pages are still missing when the source dies.
    src.params(json!({"max-postcopy-bandwidth": 1_000_000}));
    src.c("migrate-start-postcopy", json!({}));
    dst.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.event("RESUME", MIGRATION_TIMEOUT);
    src.signal(libc::SIGKILL);
    let dq = dst.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    let e = error_desc(&dq);
    assert!(e.contains("pages never received"), "{e}");
    // Never shown as a healthy running guest.
    assert_eq!(dst.run_status(), "internal-error");
    for cmd in ["cont", "stop", "system_reset"] {
        let e = dst.err(cmd, json!({}));
        assert!(e.contains("Post-copy lost its source"), "{cmd}: {e}");
    }
    // The teardown completes although vCPUs wait for pages that will never come.
    dst.quit_ok();
}

/// QEMU's default `exit-on-error`: the destination that lost its source in post-copy exits
/// non-zero and says which pages it lost (the teardown completes although vCPUs wait for them).
#[test]
fn postcopy_killed_source_exit_on_error_the_destination_exits_naming_the_loss() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let (mut src, mut dst) = start(dir.path(), "tcp", &m, true);
    src.params(json!({"max-postcopy-bandwidth": 1_000_000}));
    src.c("migrate-start-postcopy", json!({}));
    dst.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.event("RESUME", MIGRATION_TIMEOUT);
    src.signal(libc::SIGKILL);
    let (st, log) = dst.wait_gone(MIGRATION_TIMEOUT);
    assert!(!st.success(), "{st}; log:\n{log}");
    assert!(log.contains("pages never received"), "{log}");
}

/// The destination dies during post-copy: the source reports `failed` and stays paused for
/// good (the guest ran on the destination; decision 90), refusing `cont`.
#[test]
fn postcopy_killed_destination_the_source_stays_paused() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let (mut src, mut dst) = start(dir.path(), "tcp", &m, false);
    src.params(json!({"max-postcopy-bandwidth": 1_000_000}));
    src.c("migrate-start-postcopy", json!({}));
    dst.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.event("RESUME", MIGRATION_TIMEOUT);
    dst.signal(libc::SIGKILL);
    let q = src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    let e = error_desc(&q);
    assert!(e.contains("source stays paused"), "{e}");
    assert_eq!(src.run_status(), "postmigrate");
    let e = src.err("cont", json!({}));
    assert!(e.contains("runs there"), "{e}");
    let last = src.last_seq();
    src.assert_no_hb_after(last, std::time::Duration::from_millis(100));
    src.quit_ok();
}
