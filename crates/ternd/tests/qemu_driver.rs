//! The qemu driver end to end: real `qemu-system-x86_64` processes with Tern's test guest,
//! driven by `ternd` over QMP, migrated between two daemons in two network namespaces, the
//! `pattern` check on the destination; a migration across drivers is refused. Skipped (with
//! a message) where QEMU is not installed; CI installs it (`scripts/install-deps.sh`).

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use common::*;

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const MEM: u64 = 128;

fn qemu_xml(name: &str, serial: &Path) -> String {
    format!(
        "<domain type='kvm' xmlns:tern='http://tern.dev/schemas/domain/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{MEM}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <emulator>{QEMU}</emulator>
    <serial type='unix'><source mode='bind' path='{}'/></serial>
  </devices>
  <tern:workload type='pattern' mem='32'/>
</domain>
",
        serial.display()
    )
}

/// Reads the guest's serial console until `needle` appears (at most [`T`]).
fn wait_serial(path: &Path, needle: &str) {
    let mut s = UnixStream::connect(path).expect("connecting to the serial console");
    s.set_read_timeout(Some(T)).expect("timeout");
    let deadline = Instant::now() + T;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no '{needle}' on the serial console"
        );
        match s.read(&mut buf) {
            Ok(0) => panic!("serial console closed: {}", String::from_utf8_lossy(&seen)),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            // A read with SO_RCVTIMEO returns EINTR after the process was stopped and
            // continued (signal(7)); seen on the shared test machine: read again.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("serial console: {e}: {}", String::from_utf8_lossy(&seen)),
        }
    }
}

/// Defines and starts a QEMU test guest `name` (the `pattern` workload over 32 MiB) on the
/// source host and waits until it runs (its serial console says `#running`).
fn run_qemu_guest(h: &Hosts, dir: &Path, name: &str) {
    let ser = dir.join(format!("{name}.ser"));
    let xml = write_xml(dir, name, &qemu_xml(name, &ser));
    h.src.ok(&["define", &xml]);
    h.src.ok(&["start", name]);
    wait_serial(&ser, "#running");
}

fn have_qemu() -> bool {
    if Path::new(QEMU).is_file() {
        return true;
    }
    eprintln!("skipping: {QEMU} is not installed (scripts/install-deps.sh installs it)");
    false
}

#[test]
fn migrate_qemu_vm_between_hosts_with_one_command() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    let ser = dir.path().join("q.ser");
    let xml = write_xml(dir.path(), "q", &qemu_xml("q", &ser));
    h.src.ok(&["define", &xml]);
    h.src.ok(&["start", "q"]);
    let info = h.src.ok(&["dominfo", "q"]);
    assert!(info.contains("Driver:         qemu"), "{info}");
    wait_serial(&ser, "#running");
    h.src.ok(&[
        "migrate",
        "q",
        &h.dst.tcp_uri(),
        "--live",
        "--p2p",
        "--persistent",
        "--undefinesource",
    ]);
    // --undefinesource: the source forgot it; --persistent: the destination keeps it.
    assert!(!h.src.ok(&["list", "--all"]).contains(" q "));
    assert_eq!(h.dst.state("q"), "running (migrated)");
    assert!(h.dst.ok(&["dominfo", "q"]).contains("Persistent:     yes"));
    let job = h.dst.ok(&["domjobinfo", "q", "--completed"]);
    assert!(
        job.contains("Operation:        Incoming migration"),
        "{job}"
    );
    assert!(job.contains("Job type:         Completed"), "{job}");
    // The destination's QEMU runs the guest (its console cannot be read here: both "hosts"
    // share this filesystem, and the source QEMU unlinked the shared socket path on exit).
    let st = h.dst.qmp("q", "query-status", serde_json::json!({}));
    assert_eq!(st["running"], true, "{st}");
    assert_pattern_ok(&h.dst, "q", MEM, dir.path());
}

#[test]
fn parallel_migration_of_a_qemu_vm_uses_multifd_on_both_qemus() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    run_qemu_guest(&h, dir.path(), "qp");
    h.src.ok(&[
        "migrate",
        "qp",
        &h.dst.tcp_uri(),
        "--live",
        "--p2p",
        "--parallel",
        "--parallel-connections",
        "4",
    ]);
    completed_job(&h.src, "qp", &["parallel: multifd with 4 channel(s)"]);
    assert_eq!(h.dst.state("qp"), "running (migrated)");
    // QEMU itself says it had multifd with 4 channels.
    let caps = h
        .dst
        .qmp("qp", "query-migrate-capabilities", serde_json::json!({}));
    let on = caps.as_array().is_some_and(|a| {
        a.iter()
            .any(|c| c["capability"] == "multifd" && c["state"] == true)
    });
    assert!(on, "{caps}");
    let p = h
        .dst
        .qmp("qp", "query-migrate-parameters", serde_json::json!({}));
    assert_eq!(p["multifd-channels"], 4, "{p}");
    assert_pattern_ok(&h.dst, "qp", MEM, dir.path());
}

#[test]
fn tunnelled_migration_of_a_qemu_vm() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    run_qemu_guest(&h, dir.path(), "qt");
    h.src.ok(&[
        "migrate",
        "qt",
        &h.dst.tcp_uri(),
        "--live",
        "--p2p",
        "--tunnelled",
    ]);
    completed_job(&h.src, "qt", &["return-path: off (the stream is tunnelled"]);
    assert_eq!(h.dst.state("qt"), "running (migrated)");
    assert_pattern_ok(&h.dst, "qt", MEM, dir.path());
}

#[test]
fn auto_converge_migration_of_a_qemu_vm() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    run_qemu_guest(&h, dir.path(), "qa");
    h.src.ok(&[
        "migrate",
        "qa",
        &h.dst.tcp_uri(),
        "--live",
        "--p2p",
        "--auto-converge",
    ]);
    completed_job(&h.src, "qa", &["auto-converge: on"]);
    assert_eq!(h.dst.state("qa"), "running (migrated)");
    assert_pattern_ok(&h.dst, "qa", MEM, dir.path());
}

#[test]
fn migration_across_drivers_is_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    // The destination has "vm" defined for the qemu driver; the source runs a Tern "vm".
    let ser = dir.path().join("x.ser");
    let q = write_xml(dir.path(), "vmq", &qemu_xml("vm", &ser));
    h.dst.ok(&["define", &q]);
    let t = write_xml(dir.path(), "vmt", &domain_xml("vm", MEM, "idle", 0, 0));
    h.src.ok(&["define", &t]);
    h.src.ok(&["start", "vm"]);
    let err = h
        .src
        .fails(&["migrate", "vm", &h.dst.tcp_uri(), "--live", "--p2p"]);
    assert!(err.contains("migration across drivers is refused"), "{err}");
    assert_eq!(h.src.state("vm"), "running (booted)");
    assert_guest_runs(&h.src, "vm");
    assert_eq!(h.dst.state("vm"), "shut off (unknown)");
}

#[test]
fn domjobabort_in_perform_keeps_the_qemu_vm_on_the_source_only() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    let ser = dir.path().join("b.ser");
    let xml = qemu_xml("b", &ser).replace(
        "<tern:workload type='pattern' mem='32'/>",
        "<tern:workload type='dirty' mem='64'/>",
    );
    let x = write_xml(dir.path(), "b", &xml);
    h.src.ok(&["define", &x]);
    h.src.ok(&["start", "b"]);
    wait_serial(&ser, "#running");
    h.src.ok(&["migrate-setmaxdowntime", "b", "1"]);
    h.src.ok(&["migrate-setspeed", "b", "16"]);
    let bg = Bg::spawn(
        &h.src.uri(),
        &["migrate", "b", &h.dst.tcp_uri(), "--live", "--p2p"],
    );
    wait_migration_iteration(&h.src, "b");
    h.src.ok(&["domjobabort", "b"]);
    let (ok, _, err) = bg.wait();
    assert!(!ok && err.contains("operation aborted"), "{err}");
    let st = h.src.qmp("b", "query-status", serde_json::json!({}));
    assert_eq!(st["running"], true, "{st}");
    assert!(h.src.state("b").starts_with("running"));
    assert!(!h.dst.ok(&["list", "--all"]).contains(" b "));
}

#[test]
fn destination_daemon_killed_in_perform_leaves_the_qemu_vm_on_the_source_only() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let Some(mut h) = Hosts::up(dir.path()) else {
        return;
    };
    let ser = dir.path().join("k.ser");
    let xml = qemu_xml("k", &ser).replace(
        "<tern:workload type='pattern' mem='32'/>",
        "<tern:workload type='dirty' mem='64'/>",
    );
    let x = write_xml(dir.path(), "k", &xml);
    h.src.ok(&["define", &x]);
    h.src.ok(&["start", "k"]);
    wait_serial(&ser, "#running");
    h.src.ok(&["migrate-setmaxdowntime", "k", "1"]);
    h.src.ok(&["migrate-setspeed", "k", "16"]);
    let bg = Bg::spawn(
        &h.src.uri(),
        &["migrate", "k", &h.dst.tcp_uri(), "--live", "--p2p"],
    );
    wait_migration_iteration(&h.src, "k");
    let dst_vmms = h.dst.vmm_pids();
    assert_eq!(dst_vmms.len(), 1, "one incoming QEMU on the destination");
    h.dst.kill();
    let (ok, _, err) = bg.wait();
    assert!(
        !ok,
        "the migration succeeded without its destination daemon"
    );
    assert!(err.contains("migration"), "{err}");
    let st = h.src.qmp("k", "query-status", serde_json::json!({}));
    assert_eq!(st["running"], true, "{st}");
    assert!(h.src.state("k").starts_with("running"));
    // The restarted destination daemon does not keep the unfinished incoming QEMU.
    h.dst.restart();
    let list = h.dst.ok(&["list", "--all"]);
    assert!(!list.contains(" k "), "{list}");
    for p in dst_vmms {
        wait_pid_exit(p);
    }
}

#[test]
fn tls_migration_of_a_qemu_vm() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let Some(h) = migrate_tls_hosts(dir.path(), None) else {
        return;
    };
    run_qemu_guest(&h, dir.path(), "qs");
    h.src.ok(&[
        "migrate",
        "qs",
        &h.dst.tcp_uri(),
        "--live",
        "--p2p",
        "--tls",
    ]);
    completed_job(&h.src, "qs", &["tls: on"]);
    assert_eq!(h.dst.state("qs"), "running (migrated)");
    assert_pattern_ok(&h.dst, "qs", MEM, dir.path());
}

#[test]
fn tls_migration_to_a_host_whose_certificate_names_another_fails_and_the_vm_stays() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let Some(h) = migrate_tls_hosts(dir.path(), Some("impostor.example")) else {
        return;
    };
    run_qemu_guest(&h, dir.path(), "qw");
    let err = h.src.fails(&[
        "migrate",
        "qw",
        &h.dst.tcp_uri(),
        "--live",
        "--p2p",
        "--tls",
    ]);
    // QEMU's own words for the mismatch, relayed by the daemon.
    assert!(
        err.contains("does not match") || err.contains("hostname"),
        "{err}"
    );
    assert_eq!(h.src.state("qw"), "running (booted)");
    assert_pattern_ok(&h.src, "qw", MEM, dir.path());
    // The destination killed its VMM and forgot the transient domain.
    let gone = h.dst.fails(&["domstate", "qw"]);
    assert!(gone.contains("Domain not found"), "{gone}");
    // TLS is off again on the source: a plain migration to the same host works.
    h.src
        .ok(&["migrate", "qw", &h.dst.tcp_uri(), "--live", "--p2p"]);
    assert_eq!(h.dst.state("qw"), "running (migrated)");
    assert_pattern_ok(&h.dst, "qw", MEM, dir.path());
}

#[test]
fn tls_migration_to_a_daemon_without_certificates_is_refused_in_prepare() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let Some(mut h) = Hosts::up(dir.path()) else {
        return;
    };
    let Some(pki) = certificates(&dir.path().join("pki"), &[&h.net.src_addr]) else {
        return;
    };
    with_migrate_tls_dir(&mut h.src, &pki.join(&h.net.src_addr));
    run_qemu_guest(&h, dir.path(), "qn");
    let err = h.src.fails(&[
        "migrate",
        "qn",
        &h.dst.tcp_uri(),
        "--live",
        "--p2p",
        "--tls",
    ]);
    assert!(err.contains("has no migration certificates"), "{err}");
    assert!(err.contains("--migrate-tls-dir"), "{err}");
    assert_eq!(h.src.state("qn"), "running (booted)");
    assert_pattern_ok(&h.src, "qn", MEM, dir.path());
}

/// Polls `domstate --reason` until it is `want` (at most [`T`]).
fn wait_state(d: &Daemon, dom: &str, want: &str) {
    let deadline = Instant::now() + T;
    loop {
        let o = d.ctl(&["domstate", "--reason", dom]);
        let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if s == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: '{dom}' never became '{want}' (last: '{s}')\n--- log:\n{}",
            d.name,
            d.log()
        );
        std::thread::yield_now();
    }
}

#[test]
fn postcopy_migration_of_a_qemu_vm_switched_from_a_second_client() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    run_qemu_guest(&h, dir.path(), "pq");
    // Pre-copy cannot converge (1 ms, 16 MiB/s against a guest writing as fast as it can).
    h.src.ok(&["migrate-setmaxdowntime", "pq", "1"]);
    h.src.ok(&["migrate-setspeed", "pq", "16"]);
    let bg = Bg::spawn(
        &h.src.uri(),
        &[
            "migrate",
            "pq",
            &h.dst.tcp_uri(),
            "--live",
            "--p2p",
            "--postcopy",
        ],
    );
    wait_migration_iteration(&h.src, "pq");
    let job = h.src.ok(&["domjobinfo", "pq"]);
    assert!(job.contains("Phase:            perform"), "{job}");
    // migrate-setspeed --postcopy on the running job: QEMU's max-postcopy-bandwidth.
    h.src.ok(&["migrate-setspeed", "pq", "512", "--postcopy"]);
    assert_eq!(
        h.src.ok(&["migrate-getspeed", "pq", "--postcopy"]).trim(),
        "512"
    );
    // The switch, from a second client while the job runs (virsh migrate-postcopy).
    h.src.ok(&["migrate-postcopy", "pq"]);
    let (ok, _, err) = bg.wait();
    assert!(
        ok,
        "migrate failed: {err}\n--- src:\n{}\n--- dst:\n{}",
        h.src.log(),
        h.dst.log()
    );
    assert_eq!(h.src.state("pq"), "shut off (migrated)");
    wait_state(&h.dst, "pq", "running (migrated)");
    completed_job(&h.src, "pq", &["post-copy: switched", "Postcopy requests:"]);
    let st = h.dst.qmp("pq", "query-status", serde_json::json!({}));
    assert_eq!(st["running"], true, "{st}");
    assert_pattern_ok(&h.dst, "pq", MEM, dir.path());
}

#[test]
fn domjobabort_postcopy_pauses_a_qemu_postcopy_and_postcopy_resume_completes_it() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    let ser = dir.path().join("pp.ser");
    // 64 MiB filled once and never touched again (`idle`), mostly unsent at the switch
    // (pre-copy capped at 2 MiB/s): post-copy pushes it at 1 MiB/s, about a minute.
    let xml = qemu_xml("pp", &ser).replace(
        "<tern:workload type='pattern' mem='32'/>",
        "<tern:workload type='idle' mem='64'/>",
    );
    let x = write_xml(dir.path(), "pp", &xml);
    h.src.ok(&["define", &x]);
    h.src.ok(&["start", "pp"]);
    wait_serial(&ser, "#running");
    h.src.ok(&["migrate-setmaxdowntime", "pp", "1"]);
    let bg = Bg::spawn(
        &h.src.uri(),
        &[
            "migrate",
            "pp",
            &h.dst.tcp_uri(),
            "--live",
            "--p2p",
            "--postcopy",
            "--bandwidth",
            "2",
            "--postcopy-bandwidth",
            "1",
        ],
    );
    wait_migration_iteration(&h.src, "pp");
    h.src.ok(&["migrate-postcopy", "pp"]);
    wait_state(&h.src, "pp", "paused (post-copy)");
    wait_state(&h.dst, "pp", "running (post-copy)");
    let e = h.src.fails(&["domjobabort", "pp"]);
    assert!(
        e.contains("cannot abort migration in post-copy mode"),
        "{e}"
    );
    // QEMU's migrate-pause: both VMMs go postcopy-paused; the job ends failed, the source
    // paused (never resumed), the destination kept, until --postcopy-resume (§5d).
    h.src.ok(&["domjobabort", "pp", "--postcopy"]);
    let (ok, _, err) = bg.wait();
    assert!(!ok, "the paused post-copy reported success");
    assert!(err.contains("postcopy-paused"), "{err}");
    assert_eq!(h.src.state("pp"), "paused (post-copy failed)");
    let st = h.src.qmp("pp", "query-status", serde_json::json!({}));
    assert_eq!(st["running"], false, "{st}");
    let e = h.src.fails(&["resume", "pp"]);
    assert!(e.contains("never resumed"), "{e}");
    wait_state(&h.dst, "pp", "running (post-copy failed)");
    let job = h.dst.ok(&["domjobinfo", "pp", "--completed"]);
    assert!(job.contains("post-copy failed on the destination"), "{job}");
    assert!(h.dst.vmm_pids().iter().all(|p| pid_alive(*p)));
    // The resume: QEMU's migrate-recover on the destination, migrate resume on the source.
    let (ok, _, err) = Bg::spawn(
        &h.src.uri(),
        &[
            "migrate",
            "pp",
            &h.dst.tcp_uri(),
            "--live",
            "--p2p",
            "--postcopy",
            "--postcopy-resume",
            "--postcopy-bandwidth",
            "64",
        ],
    )
    .wait();
    assert!(
        ok,
        "resume failed: {err}\n--- src:\n{}\n--- dst:\n{}",
        h.src.log(),
        h.dst.log()
    );
    assert_eq!(h.src.state("pp"), "shut off (migrated)");
    wait_state(&h.dst, "pp", "running (migrated)");
    let st = h.dst.qmp("pp", "query-status", serde_json::json!({}));
    assert_eq!(st["running"], true, "{st}");
    completed_job(&h.src, "pp", &[]);
}

/// `--parallel --comp-methods zstd --comp-zstd-level 2` for a QEMU VM: the same parameters on
/// both QEMUs (`multifd-compression`, the source's level), the migration completes.
#[test]
fn parallel_zstd_migration_of_a_qemu_vm_sets_multifd_compression_on_both_qemus() {
    if !have_qemu() {
        return;
    }
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    let ser = dir.path().join("qz.ser");
    let xml = write_xml(dir.path(), "qz", &qemu_xml("qz", &ser));
    h.src.ok(&["define", &xml]);
    h.src.ok(&["start", "qz"]);
    wait_serial(&ser, "#running");
    h.src.ok(&[
        "migrate",
        "qz",
        &h.dst.tcp_uri(),
        "--live",
        "--p2p",
        "--parallel",
        "--comp-methods",
        "zstd",
        "--comp-zstd-level",
        "2",
    ]);
    completed_job(
        &h.src,
        "qz",
        &["compression: multifd zstd on both VMMs, multifd-zstd-level 2"],
    );
    let p = h
        .dst
        .qmp("qz", "query-migrate-parameters", serde_json::json!({}));
    assert_eq!(p["multifd-compression"], "zstd", "{p}");
    assert_pattern_ok(&h.dst, "qz", MEM, dir.path());
}
