//! The remote API over TLS (`tern+tls://`): two daemons in two network namespaces serving
//! `--listen-tls` with certificates made by `scripts/tls-certs.sh`, a remote client and a
//! peer-to-peer migration over it (the `pattern` check on the destination), and the clients
//! a daemon must refuse: no certificate, another CA's certificate, plain TCP on the TLS port,
//! TLS on the plain port. Each refusal is a clear error and the daemon serves on.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

const MEM: u64 = 128;
const TLS_PORT: u16 = 16524;

/// Restarts `d` serving TLS on `addr` with the certificates in `tls_dir`.
fn serve_tls(d: &mut Daemon, addr: &str, tls_dir: &Path) {
    d.args = vec![
        "--listen-tls".into(),
        format!("{addr}:{TLS_PORT}"),
        "--tls-dir".into(),
        tls_dir.display().to_string(),
    ];
    d.kill();
    d.restart();
}

/// Two hosts serving TLS, and the CA directory (`pki/HOST` per host).
fn tls_hosts(dir: &Path) -> Option<(Hosts, PathBuf)> {
    let mut h = Hosts::up(dir)?;
    let pki = certificates(&dir.join("pki"), &[&h.net.src_addr, &h.net.dst_addr])?;
    let (s, d) = (h.net.src_addr.clone(), h.net.dst_addr.clone());
    serve_tls(&mut h.src, &s, &pki.join(&s));
    serve_tls(&mut h.dst, &d, &pki.join(&d));
    Some((h, pki))
}

fn tls_uri(host: &str, pki: &Path) -> String {
    format!(
        "tern+tls://{host}:{TLS_PORT}/system?pkipath={}",
        pki.display()
    )
}

/// `ternctl` run on the source host (its network namespace), against `uri`.
fn remote_ctl(h: &Hosts, uri: &str, args: &[&str]) -> Output {
    Command::new("ip")
        .args(["netns", "exec", &h.net.src])
        .arg(sibling("ternctl"))
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .expect("running ternctl")
}

fn remote_fails(h: &Hosts, uri: &str) -> String {
    let o = remote_ctl(h, uri, &["list", "--all"]);
    assert!(
        !o.status.success(),
        "{uri}: accepted: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn migration_between_daemons_over_tls_with_mutual_authentication() {
    let dir = tmpdir();
    let Some((h, pki)) = tls_hosts(dir.path()) else {
        return;
    };
    let dst_uri = tls_uri(&h.net.dst_addr, &pki.join(&h.net.src_addr));
    // A remote client with its certificate.
    let o = remote_ctl(&h, &dst_uri, &["list", "--all"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A migration whose daemons talk over TLS.
    run_guest(&h.src, dir.path(), "s", MEM, "pattern", 32, 0);
    h.src.ok(&["migrate", "s", &dst_uri, "--live", "--p2p"]);
    assert_eq!(h.dst.state("s"), "running (migrated)");
    let o = remote_ctl(&h, &dst_uri, &["domstate", "s"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "running");
    assert_pattern_ok(&h.dst, "s", MEM, dir.path());
}

#[test]
fn the_tls_remote_api_refuses_clients_it_cannot_authenticate() {
    let dir = tmpdir();
    let Some((h, pki)) = tls_hosts(dir.path()) else {
        return;
    };
    let dst = h.net.dst_addr.clone();
    // No client certificate: only the CA.
    let ca_only = dir.path().join("ca-only");
    std::fs::create_dir_all(&ca_only).expect("mkdir");
    std::fs::copy(
        pki.join(&dst).join("ca-cert.pem"),
        ca_only.join("ca-cert.pem"),
    )
    .expect("copy ca");
    let e = remote_fails(&h, &tls_uri(&dst, &ca_only));
    assert!(
        e.contains("requires a client certificate"),
        "no client certificate: {e}"
    );
    // A client certificate from another CA.
    let other = certificates(&dir.path().join("other"), &[&h.net.src_addr]).expect("second CA");
    let mut mixed = dir.path().join("mixed");
    std::fs::create_dir_all(&mixed).expect("mkdir");
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(other.join(&h.net.src_addr).join(f), mixed.join(f)).expect("copy");
    }
    std::fs::copy(
        pki.join(&dst).join("ca-cert.pem"),
        mixed.join("ca-cert.pem"),
    )
    .expect("copy ca");
    let e = remote_fails(&h, &tls_uri(&dst, &mixed));
    assert!(e.contains("refused our certificate"), "other CA: {e}");
    // A server from another CA than the client trusts.
    mixed = dir.path().join("distrust");
    std::fs::create_dir_all(&mixed).expect("mkdir");
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(other.join(&h.net.src_addr).join(f), mixed.join(f)).expect("copy");
    }
    let e = remote_fails(&h, &tls_uri(&dst, &mixed));
    assert!(e.contains("unknown CA"), "server from an unknown CA: {e}");
    // Plain TCP on the TLS port, TLS on the plain port: refused, not hung.
    let e = remote_fails(&h, &format!("tern+tcp://{dst}:{TLS_PORT}/system"));
    assert!(e.contains("speaks TLS"), "plain on TLS: {e}");
    let e = remote_fails(
        &h,
        &format!(
            "tern+tls://{dst}:16509/system?pkipath={}",
            pki.join(&h.net.src_addr).display()
        ),
    );
    assert!(e.contains("TLS"), "TLS on plain: {e}");
    // The daemon serves on, over TLS too.
    let o = remote_ctl(&h, &tls_uri(&dst, &pki.join(&h.net.src_addr)), &["list"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn tls_allowed_dn_admits_only_the_listed_clients() {
    let dir = tmpdir();
    let Some((mut h, pki)) = tls_hosts(dir.path()) else {
        return;
    };
    let (src, dst) = (h.net.src_addr.clone(), h.net.dst_addr.clone());
    serve_tls(&mut h.dst, &dst, &pki.join(&dst));
    h.dst
        .args
        .extend(["--tls-allowed-dn".to_string(), format!("CN={src},O=Tern")]);
    h.dst.kill();
    h.dst.restart();
    let o = remote_ctl(&h, &tls_uri(&dst, &pki.join(&src)), &["list", "--all"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The destination host's own client certificate: same CA, another name.
    let e = remote_fails(&h, &tls_uri(&dst, &pki.join(&dst)));
    assert!(e.contains("access denied"), "{e}");
    assert!(e.contains(&format!("CN={dst},O=Tern")), "{e}");
}
