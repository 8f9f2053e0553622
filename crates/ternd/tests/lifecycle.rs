//! Domain lifecycle through `ternd` + `ternctl`: define/start/suspend/resume/destroy/undefine,
//! clear errors (bad XML, unknown domain, duplicate name or UUID), and a daemon restart that
//! finds its running VMs again.

mod common;

use common::*;

#[test]
fn lifecycle_with_virsh_output() {
    let dir = tmpdir();
    let d = Daemon::start(dir.path(), "host", None, None);
    let xml = write_xml(dir.path(), "vm", &domain_xml("vm", 128, "idle", 0, 0));
    assert_eq!(
        d.ok(&["define", &xml]).trim(),
        format!("Domain 'vm' defined from {xml}")
    );
    let list = d.ok(&["list", "--all"]);
    assert!(list.starts_with(" Id   Name   State\n"), "{list}");
    assert!(list.contains(" -    vm     shut off"), "{list}");
    assert_eq!(d.state("vm"), "shut off (unknown)");
    d.ok(&["start", "vm"]);
    assert!(d.ok(&["list"]).contains(" 1    vm     running"));
    d.ok(&["suspend", "vm"]);
    assert_eq!(d.state("vm"), "paused (user)");
    d.ok(&["resume", "vm"]);
    assert_eq!(d.state("vm"), "running (unpaused)");
    assert_guest_runs(&d, "vm");
    let x = d.ok(&["dumpxml", "vm"]);
    assert!(x.contains("<domain type='kvm' id='1'"), "{x}");
    let err = d.fails(&["start", "vm"]);
    assert!(err.contains("domain is already running"), "{err}");
    d.ok(&["destroy", "vm"]);
    assert_eq!(d.state("vm"), "shut off (destroyed)");
    d.ok(&["start", "vm"]);
    d.ok(&["shutdown", "vm"]);
    assert_eq!(d.state("vm"), "shut off (shutdown)");
    d.ok(&["undefine", "vm"]);
    let err = d.fails(&["dominfo", "vm"]);
    assert!(err.contains("Domain not found"), "{err}");

    // A transient domain disappears when it stops.
    let t = write_xml(dir.path(), "tr", &domain_xml("tr", 128, "idle", 0, 0));
    d.ok(&["create", &t]);
    assert!(d.ok(&["dominfo", "tr"]).contains("Persistent:     no"));
    d.ok(&["destroy", "tr"]);
    assert!(!d.ok(&["list", "--all"]).contains("tr"));
}

#[test]
fn clear_errors_and_nothing_lost() {
    let dir = tmpdir();
    let d = Daemon::start(dir.path(), "host", None, None);
    let bad = write_xml(
        dir.path(),
        "bad",
        &domain_xml("bad", 128, "idle", 0, 0).replace("<vcpu>1</vcpu>", "<vcpu>1</vcpu><cputune/>"),
    );
    let err = d.fails(&["define", &bad]);
    assert!(err.contains("unsupported element <cputune>"), "{err}");
    let err = d.fails(&["start", "nosuch"]);
    assert!(
        err.contains("Domain not found: no domain with matching name or uuid 'nosuch'"),
        "{err}"
    );
    let err = d.fails(&["define", "/nonexistent.xml"]);
    assert!(err.contains("Failed to open file"), "{err}");

    let a = domain_xml("a", 128, "idle", 0, 0).replace(
        "<name>a</name>",
        "<name>a</name><uuid>11111111-2222-3333-4444-555555555555</uuid>",
    );
    let pa = write_xml(dir.path(), "a", &a);
    d.ok(&["define", &pa]);
    d.ok(&["start", "a"]);
    // The same UUID under another name.
    let pb = write_xml(
        dir.path(),
        "b",
        &a.replace("<name>a</name>", "<name>b</name>"),
    );
    let err = d.fails(&["define", &pb]);
    assert!(
        err.contains("domain 'a' is already defined with uuid 1111"),
        "{err}"
    );
    // The same name with another UUID.
    let pc = write_xml(
        dir.path(),
        "c",
        &a.replace("11111111-2222", "99999999-2222"),
    );
    let err = d.fails(&["define", &pc]);
    assert!(
        err.contains("domain 'a' already exists with uuid 1111"),
        "{err}"
    );
    let err = d.fails(&["create", &pc]);
    assert!(err.contains("already exists"), "{err}");
    // Nothing lost: the first domain still runs, by name and by UUID.
    assert_eq!(d.state("a"), "running (booted)");
    assert_eq!(
        d.state("11111111-2222-3333-4444-555555555555"),
        "running (booted)"
    );
    assert_guest_runs(&d, "a");
    let err = d.fails(&["domjobabort", "a"]);
    assert!(err.contains("no job is active"), "{err}");
    let err = ctl(
        "tern+unix:///system?socket=/nonexistent/ternd.sock",
        &["list"],
    );
    assert!(String::from_utf8_lossy(&err.stderr).contains("Failed to connect"));
}

#[test]
fn daemon_restart_finds_running_vms_again() {
    let dir = tmpdir();
    let mut d = Daemon::start(dir.path(), "host", None, None);
    let x = write_xml(dir.path(), "p", &domain_xml("p", 128, "pattern", 32, 0));
    d.ok(&["define", &x]);
    d.ok(&["start", "p"]);
    let t = write_xml(dir.path(), "t", &domain_xml("t", 128, "idle", 0, 0));
    d.ok(&["create", &t]);
    d.ok(&["suspend", "t"]);
    wait_workload_running(&d, "p");
    let pids = d.vmm_pids();
    assert_eq!(pids.len(), 2);

    d.kill();
    assert!(
        pids.iter().all(|p| pid_alive(*p)),
        "VMMs outlive the daemon"
    );
    d.restart();
    let list = d.ok(&["list", "--all"]);
    assert!(list.contains(" 1    p      running"), "{list}");
    assert!(list.contains(" 2    t      paused"), "{list}");
    assert!(d.ok(&["dominfo", "t"]).contains("Persistent:     no"));
    assert_guest_runs(&d, "p");
    d.ok(&["resume", "t"]);
    assert_guest_runs(&d, "t");
    // New domains get new ids.
    let n = write_xml(dir.path(), "n", &domain_xml("n", 128, "idle", 0, 0));
    d.ok(&["create", &n]);
    assert!(
        d.ok(&["list"]).contains(" 3    n"),
        "ids continue after a restart"
    );
    assert_pattern_ok(&d, "p", 128, dir.path());
    d.ok(&["destroy", "p"]);
    assert_eq!(d.state("p"), "shut off (destroyed)");
}

/// `ctl` as another user (uid/gid 65534).
fn ctl_as_nobody(uri: &str, args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(sibling("ternctl"))
        .arg("-c")
        .arg(uri)
        .args(args)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("running ternctl as nobody")
}

#[test]
fn the_socket_mode_decides_who_may_manage_vms() {
    // SAFETY: getuid(2) has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipping: needs root to run a client as another user");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    // Another user must be able to reach the client binary (a checkout under a 0700
    // directory, e.g. `mktemp -d`, is not).
    let exe = sibling("ternctl");
    if let Some(a) = exe
        .ancestors()
        .skip(1)
        .find(|a| std::fs::metadata(a).is_ok_and(|m| m.permissions().mode() & 0o001 == 0))
    {
        eprintln!(
            "skipping: {} is not searchable by other users, so {} cannot run as nobody",
            a.display(),
            exe.display()
        );
        return;
    }
    let dir = tmpdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let mut d = Daemon::start(dir.path(), "host", None, None);
    let o = ctl_as_nobody(&d.uri(), &["list"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "an unprivileged client got in");
    assert!(err.contains("permission denied"), "{err}");
    // 0666: anyone may.
    d.kill();
    d.args = vec!["--socket-mode".into(), "666".into()];
    d.restart();
    let o = ctl_as_nobody(&d.uri(), &["list", "--all"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn offline_migration_moves_the_definition_only() {
    let dir = tmpdir();
    let a = Daemon::start(dir.path(), "a", None, None);
    let b = Daemon::start(dir.path(), "b", None, None);
    let x = write_xml(dir.path(), "off", &domain_xml("off", 128, "idle", 0, 0));
    a.ok(&["define", &x]);
    let uuid = a
        .ok(&["dominfo", "off"])
        .lines()
        .find_map(|l| l.strip_prefix("UUID:").map(|u| u.trim().to_string()))
        .expect("uuid");
    // --offline needs --persistent, and a running domain is refused.
    let err = a.fails(&["migrate", "off", &b.uri(), "--offline"]);
    assert!(err.contains("--offline needs --persistent"), "{err}");
    a.ok(&[
        "migrate",
        "off",
        &b.uri(),
        "--offline",
        "--persistent",
        "--undefinesource",
    ]);
    assert!(!a.ok(&["list", "--all"]).contains("off"));
    let info = b.ok(&["dominfo", "off"]);
    assert!(info.contains("State:          shut off"), "{info}");
    assert!(info.contains(&uuid), "the UUID travels: {info}");
    b.ok(&["start", "off"]);
    assert_guest_runs(&b, "off");
}
