//! The destination's life after a failed or misdirected migration (QEMU semantics): `migrate`
//! on a VM waiting for an incoming migration is refused; `exit-on-error` (default true) ends a
//! failed destination with its error on stderr, after the source read that error; with
//! `exit-on-error: false` it stays up, says why, and refuses `cont`; `migrate_cancel` on the
//! destination ends the incoming migration `failed`.

mod common;

use common::*;
use serde_json::json;
use tern::harness::incoming_port;

const WAITING: &str = "Guest is waiting for an incoming migration";

/// A small, cheap source: `dirty` at a moderate rate on one vCPU, with a return path.
fn small_source(dir: &std::path::Path) -> (Vm, Machine) {
    let m = Machine::dirty(1, 32, 32);
    let mut src = boot(dir, "src", &m);
    src.caps(&[("events", true), ("return-path", true)]);
    (src, m)
}

/// The source lives on after a migration that did not complete.
fn assert_source_runs_on(src: &mut Vm) {
    assert_eq!(src.run_status(), "running");
    src.assert_running_guest(10);
}

#[test]
fn migrate_on_a_vm_waiting_for_an_incoming_migration_is_refused() {
    let dir = tmpdir();
    let m = Machine::idle(0);
    // `--incoming defer`, before and after `migrate-incoming`.
    let mut d = dest(dir.path(), "defer", &m);
    let target = format!("file:{}", dir.path().join("never.tern").display());
    assert_eq!(d.err("migrate", json!({ "uri": target })), WAITING);
    d.listen_tcp();
    assert_eq!(d.err("migrate", json!({ "uri": target })), WAITING);
    assert_eq!(d.run_status(), "inmigrate");
    assert_eq!(d.mig_status(), "setup");
    assert!(!dir.path().join("never.tern").exists());
    d.quit_ok();
    // `--incoming URI` on the command line.
    let mut args = m.args();
    args.extend(["--incoming".into(), "tcp:127.0.0.1:0".into()]);
    let mut d = spawn(dir.path(), "cmdline", &args);
    assert_eq!(d.err("migrate", json!({ "uri": target })), WAITING);
    assert_eq!(d.run_status(), "inmigrate");
    d.quit_ok();
}

/// QEMU's default: a failed incoming migration ends the destination process with a non-zero
/// status and the error on stderr; the source got the reason on the return path first, and
/// runs on. Both ways of starting the destination (`migrate-incoming`, `--incoming URI`).
#[test]
fn exit_on_error_ends_a_failed_destination_after_the_source_heard_why() {
    let dir = tmpdir();
    let (mut src, m) = small_source(dir.path());
    for how in ["qmp", "cmdline"] {
        // Two vCPUs where the source has one: CONFIG is refused.
        let (mut d, uri) = if how == "qmp" {
            let mut d = dest_with(dir.path(), how, m.memory_mib, 2, &[]);
            let uri = d.listen_tcp_with(None);
            (d, uri)
        } else {
            let args: Vec<String> = [
                "--memory",
                &format!("{}M", m.memory_mib),
                "--vcpus",
                "2",
                "--incoming",
                "tcp:127.0.0.1:0",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut d = spawn(dir.path(), how, &args);
            let q = d.qm();
            let port = incoming_port(&q).unwrap_or_else(|| panic!("no port in {q}"));
            (d, format!("tcp:127.0.0.1:{port}"))
        };
        src.drain_events();
        src.c("migrate", json!({ "uri": uri }));
        let q = src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
        assert!(error_desc(&q).contains("vCPU count"), "{how}: source {q}");
        let (st, log) = d.wait_gone(T);
        assert!(!st.success(), "{how}: exit status {st}");
        assert!(
            log.contains("incoming migration failed") && log.contains("vCPU count"),
            "{how}: stderr:\n{log}"
        );
        assert_source_runs_on(&mut src);
    }
    src.quit_ok();
}

/// `exit-on-error: false`: the failed destination stays up in `inmigrate` with the error in
/// `query-migrate`, and refuses `cont` (nothing to run) and `migrate` (nothing to send).
#[test]
fn without_exit_on_error_a_failed_destination_stays_and_refuses_cont() {
    let dir = tmpdir();
    let (mut src, m) = small_source(dir.path());
    let mut d = dest_with(dir.path(), "dst", m.memory_mib, 2, &[]);
    d.caps(&[("events", true)]);
    let uri = d.listen_tcp_with(Some(false));
    src.c("migrate", json!({ "uri": uri }));
    let q = d.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    assert!(error_desc(&q).contains("vCPU count"), "{q}");
    src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    d.assert_alive();
    assert_eq!(d.run_status(), "inmigrate");
    let e = d.err("cont", json!({}));
    assert!(e.contains("incoming migration failed"), "{e}");
    let e = d.err("migrate", json!({"uri": "tcp:127.0.0.1:1"}));
    assert!(e.contains("ended failed"), "{e}");
    d.assert_no_hb_after(0, std::time::Duration::from_millis(100));
    assert_eq!(error_desc(&d.qm()), error_desc(&q), "the error stays");
    assert_source_runs_on(&mut src);
    d.quit_ok();
    src.quit_ok();
}

/// `migrate_cancel` on the destination ends the incoming migration `failed` with "incoming
/// migration cancelled": while it waits for a source (`exit-on-error: false`: it stays), and
/// while a source streams into it (default: it exits; the source runs on).
#[test]
fn migrate_cancel_on_the_destination() {
    let dir = tmpdir();
    let m = Machine::dirty(1, 32, 32);
    let mut d = dest(dir.path(), "waiting", &m);
    d.caps(&[("events", true)]);
    d.listen_tcp_with(Some(false));
    d.c("migrate_cancel", json!({}));
    let q = d.wait_mig(&["failed"], T);
    assert_eq!(error_desc(&q), "incoming migration cancelled", "{q}");
    d.assert_alive();
    assert!(d
        .err("cont", json!({}))
        .contains("incoming migration failed"));
    // Cancelling again is harmless.
    d.c("migrate_cancel", json!({}));
    assert_eq!(d.mig_status(), "failed");
    d.quit_ok();

    let (mut src, _) = small_source(dir.path());
    src.wait_workload_running(T);
    non_converge(&mut src);
    let mut d = dest(dir.path(), "streaming", &m);
    d.caps(&[("events", true)]);
    let uri = d.listen_tcp_with(None);
    src.c("migrate", json!({ "uri": uri }));
    d.wait_mig(&["active"], T);
    src.wait_mig(&["active"], T);
    d.c("migrate_cancel", json!({}));
    let (st, log) = d.wait_gone(T);
    assert!(!st.success(), "exit status {st}");
    assert!(
        log.contains("incoming migration cancelled"),
        "stderr:\n{log}"
    );
    let q = src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    assert!(!error_desc(&q).is_empty(), "{q}");
    assert_source_runs_on(&mut src);
    src.quit_ok();
}
