//! `ternctl` without a daemon: virsh's command names exist, options needing features not
//! built yet (or combinations libvirt refuses) are refused by name before anything is contacted, connection errors are clear.

use std::process::Command;

fn ternctl(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_ternctl"))
        .args(args)
        .output()
        .expect("running ternctl");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn virsh_command_names() {
    let (ok, help) = ternctl(&["--help"]);
    assert!(ok, "{help}");
    for c in [
        "list",
        "define",
        "undefine",
        "create",
        "start",
        "shutdown",
        "destroy",
        "suspend",
        "resume",
        "dominfo",
        "domstate",
        "dumpxml",
        "domjobinfo",
        "domjobabort",
        "migrate-setmaxdowntime",
        "migrate-getmaxdowntime",
        "migrate-setspeed",
        "migrate-getspeed",
        "migrate-postcopy",
        "migrate",
        "event",
        "qemu-monitor-command",
    ] {
        assert!(help.contains(&format!("  {c} ")), "{c} missing:\n{help}");
    }
}

#[test]
fn unbuilt_features_are_refused_by_name() {
    let sock = "tern+unix:///system?socket=/nonexistent.sock";
    for (opt, needle) in [
        ("--postcopy", "non-live or paused"),
        ("--postcopy-after", "only be used with --postcopy"),
        ("--postcopy-resume", "requires post-copy to be enabled"),
        ("--compressed", "xbzrle"),
        ("--direct", "--p2p"),
    ] {
        let (ok, out) = ternctl(&["-c", sock, "migrate", "vm", "tern+tcp://h/system", opt]);
        assert!(!ok && out.contains(needle), "{opt}: {out}");
    }
    let (ok, out) = ternctl(&[
        "-c",
        sock,
        "migrate",
        "vm",
        "tern+tcp://h/system",
        "--live",
        "--p2p",
        "--tunnelled",
        "--postcopy",
    ]);
    assert!(
        !ok && out.contains("not supported with tunnelled migration"),
        "{out}"
    );
    // `--parallel` is built (multifd); its misuses are refused before the daemon is asked.
    for (args, needle) in [
        (
            &["--parallel-connections", "4"][..],
            "only be used with --parallel",
        ),
        (
            &["--parallel", "--parallel-connections", "0"][..],
            "between 1 and 255",
        ),
    ] {
        let mut a = vec!["-c", sock, "migrate", "vm", "tern+tcp://h/system"];
        a.extend_from_slice(args);
        let (ok, out) = ternctl(&a);
        assert!(!ok && out.contains(needle), "{args:?}: {out}");
    }
    let (ok, out) = ternctl(&["-c", sock, "migrate-postcopy", "vm"]);
    assert!(!ok && out.contains("Failed to connect to"), "{out}");
    let (ok, out) = ternctl(&["-c", sock, "list"]);
    assert!(!ok && out.contains("Failed to connect to"), "{out}");
    let (ok, out) = ternctl(&["-c", "tern+tls://h/system?pkipath=/nonexistent", "list"]);
    assert!(
        !ok && out.contains("TLS credentials file /nonexistent/ca-cert.pem"),
        "{out}"
    );
}
