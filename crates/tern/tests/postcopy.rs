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
    let m = Machine::pattern(2, 32);
    let Some((src, dst)) = start_tls(dir.path(), &m) else {
        return;
    };
    finish_postcopy(&dir, &m, src, dst);
}

/// [`start`] over TLS (certificates from `scripts/tls-certs.sh`); `None` (the test skips,
/// saying why) without `openssl`.
fn start_tls(dir: &std::path::Path, m: &Machine) -> Option<(Vm, Vm)> {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/tls-certs.sh");
    let pki = dir.join("pki");
    match std::process::Command::new("bash")
        .arg(&script)
        .arg(&pki)
        .arg("127.0.0.1")
        .output()
    {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!("skipping: tls-certs.sh: {other:?}");
            return None;
        }
    }
    let creds = pki.join("127.0.0.1").display().to_string();
    Some(start_with(dir, "tcp", m, false, |src, dst| {
        for (vm, endpoint) in [(src, "client"), (dst, "server")] {
            vm.c(
                "object-add",
                json!({"qom-type": "tls-creds-x509", "id": "tls0", "dir": creds, "endpoint": endpoint}),
            );
            vm.params(json!({"tls-creds": "tls0"}));
        }
    }))
}

/// Recovery over TLS: `migrate-pause` on the source cuts the session; the recovery channel
/// runs a new TLS handshake (and admission) with the credentials the migration started with.
#[test]
fn postcopy_migrate_pause_and_recovery_over_tls() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let Some((mut src, mut dst)) = start_tls(dir.path(), &m) else {
        return;
    };
    postcopy_running(&mut src, &mut dst);
    src.c("migrate-pause", json!({}));
    let q = src.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    assert!(
        error_desc(&q).contains("migrate-pause cut the connection"),
        "{q}"
    );
    dst.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    resume(&mut src, &mut dst);
    src.params(json!({"max-postcopy-bandwidth": 0}));
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_handover(&mut src, &mut dst);
    let p0 = dst.pages_written();
    dst.wait_pages_advance(&p0, T);
    assert_pattern_ok(&mut dst, &m, dir.path(), "dst");
    src.quit_ok();
    dst.quit_ok();
}

/// `migrate-pause` and `migrate-recover` outside post-copy are refused with QEMU's texts.
#[test]
fn migrate_pause_and_recover_are_refused_outside_postcopy() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let (mut src, mut dst) = start(dir.path(), "tcp", &m, false);
    let e = src.err("migrate-pause", json!({}));
    assert!(
        e.contains("only supported during postcopy-active or postcopy-recover"),
        "{e}"
    );
    let e = dst.err("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
    assert!(e.contains("only be run when postcopy is paused"), "{e}");
    let e = src.err("migrate", json!({"uri": "tcp:127.0.0.1:1", "resume": true}));
    assert!(
        e.contains("Cannot resume if there is no paused migration"),
        "{e}"
    );
    src.c("migrate_cancel", json!({}));
    src.wait_mig(&["cancelled"], MIGRATION_TIMEOUT);
    src.quit_ok();
    dst.quit_ok();
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

/// The destination's view of a lost source in post-copy (decision 111): it cannot tell a dead
/// source from a cut link, so it pauses (QEMU's `postcopy-paused`), names the lost connection
/// and the pages it lacks, never runs a page it did not receive, and refuses what would stop
/// or reset the guest; `quit` tears it down.
fn assert_destination_paused_missing_pages(dst: &mut Vm) {
    let dq = dst.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    let e = error_desc(&dq);
    assert!(e.contains("connection to the source was lost"), "{e}");
    assert!(e.contains("pages have not been received"), "{e}");
    let missing = dq["x-tern-postcopy-missing-pages"].as_u64().unwrap_or(0);
    assert!(missing > 0, "{dq}");
    for cmd in ["cont", "stop", "system_reset"] {
        let e = dst.err(cmd, json!({}));
        assert!(e.contains("Post-copy is missing guest pages"), "{cmd}: {e}");
    }
}

#[test]
fn postcopy_killed_source_the_destination_pauses_naming_the_pages_it_lacks() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let (mut src, mut dst) = start(dir.path(), "tcp", &m, false);
    // A slow push: pages are still missing when the source dies.
    src.params(json!({"max-postcopy-bandwidth": 1_000_000}));
    src.c("migrate-start-postcopy", json!({}));
    dst.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.event("RESUME", MIGRATION_TIMEOUT);
    src.signal(libc::SIGKILL);
    assert_destination_paused_missing_pages(&mut dst);
    // The teardown completes although vCPUs wait for pages that will never come.
    dst.quit_ok();
}

/// QEMU's default `exit-on-error`: a paused post-copy is not a failure (the source may come
/// back), so the destination does not exit; it waits, paused, for a recovery or `quit`.
#[test]
fn postcopy_killed_source_exit_on_error_the_destination_stays_paused() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let (mut src, mut dst) = start(dir.path(), "tcp", &m, true);
    src.params(json!({"max-postcopy-bandwidth": 1_000_000}));
    src.c("migrate-start-postcopy", json!({}));
    dst.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.event("RESUME", MIGRATION_TIMEOUT);
    src.signal(libc::SIGKILL);
    assert_destination_paused_missing_pages(&mut dst);
    dst.assert_alive();
    dst.quit_ok();
}

/// The destination dies during post-copy: the source pauses (QEMU's `postcopy-paused`),
/// stays paused for good (the guest ran on the destination; decision 90) and refuses `cont`;
/// `migrate_cancel` ends it `failed`, still paused.
#[test]
fn postcopy_killed_destination_the_source_pauses_and_stays_paused() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let (mut src, mut dst) = start(dir.path(), "tcp", &m, false);
    src.params(json!({"max-postcopy-bandwidth": 1_000_000}));
    src.c("migrate-start-postcopy", json!({}));
    dst.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.event("RESUME", MIGRATION_TIMEOUT);
    dst.signal(libc::SIGKILL);
    let q = src.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    let e = error_desc(&q);
    assert!(e.contains("connection to the destination was lost"), "{e}");
    let e = src.err("cont", json!({}));
    assert!(e.contains("postcopy-paused"), "{e}");
    let last = src.last_seq();
    src.assert_no_hb_after(last, std::time::Duration::from_millis(100));
    src.c("migrate_cancel", json!({}));
    let q = src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    assert!(error_desc(&q).contains("source stays paused"), "{q}");
    assert_eq!(src.run_status(), "postmigrate");
    let e = src.err("cont", json!({}));
    assert!(e.contains("runs there"), "{e}");
    src.quit_ok();
}

/// Switches to post-copy over `proxy` with a slow push, then waits for the guest to run on
/// the destination.
fn postcopy_running(src: &mut Vm, dst: &mut Vm) {
    src.params(json!({"max-postcopy-bandwidth": 1_000_000}));
    src.c("migrate-start-postcopy", json!({}));
    src.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.event("RESUME", MIGRATION_TIMEOUT);
}

/// Both sides paused: `migrate-recover` on the destination (any port), `migrate` with
/// `resume` on the source; both back in `postcopy-active`.
fn resume(src: &mut Vm, dst: &mut Vm) {
    let e = src.err("migrate-pause", json!({}));
    assert!(e.contains("only supported during postcopy-active"), "{e}");
    dst.c("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
    let q = dst.qm();
    let port = tern::harness::incoming_port(&q).unwrap_or_else(|| panic!("no port in {q}"));
    src.c(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{port}"), "resume": true}),
    );
    src.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    let q = dst.qm();
    assert!(q.get("error-desc").is_none(), "{q}");
}

#[test]
fn postcopy_recovery_after_a_cut_link_completes_with_the_guest_intact() {
    use common::proxy::{Fault, FaultProxy};
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest(dir.path(), "dst", &m);
    src.caps(&CAPS);
    dst.caps(&CAPS);
    src.params(json!({"max-bandwidth": 32_000_000, "downtime-limit": 1}));
    let uri = dst.listen_tcp();
    let proxy = FaultProxy::start(&uri, Fault::None);
    src.c("migrate", json!({ "uri": proxy.uri() }));
    src.wait_mig(&["active"], T);
    src.wait_pass(2, MIGRATION_TIMEOUT);
    postcopy_running(&mut src, &mut dst);
    proxy.cut();
    let q = src.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    assert!(error_desc(&q).contains("post-copy paused"), "{q}");
    assert_destination_paused_missing_pages(&mut dst);
    resume(&mut src, &mut dst);
    // Double failure: the destination pauses this time (migrate-pause), and a second
    // recovery completes the migration.
    dst.c("migrate-pause", json!({}));
    src.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    resume(&mut src, &mut dst);
    src.params(json!({"max-postcopy-bandwidth": 0}));
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert!(ram_num(&q, "postcopy-requests") > 0, "{q}");
    assert_handover(&mut src, &mut dst);
    assert_cont_refused(&mut src);
    let p0 = dst.pages_written();
    dst.wait_pages_advance(&p0, T);
    assert_pattern_ok(&mut dst, &m, dir.path(), "dst");
    src.quit_ok();
    dst.quit_ok();
}
