//! Migration over TLS (issue 10), QEMU's TLS list with real `tern run` processes, real sockets
//! and certificates made with rcgen (`common/tls.rs`): x509 default host, override host (`tls-hostname`),
//! mismatched host, friendly client, hostile client (unknown CA), client without certificate
//! (refused, accepted with `verify-peer=off`), `tls-authz` allowed / denied, a plain source
//! against a TLS destination and the reverse. Every completed migration ends with the `pattern`
//! check on the destination; every failure leaves the source running.

mod common;

use std::path::Path;

use common::tls::*;
use common::*;
use serde_json::{json, Value};

fn small() -> Machine {
    Machine::pattern(1, 16).memory(128)
}

const CAPS: [(&str, bool); 2] = [("events", true), ("return-path", true)];

/// A destination with `tls0` (server credentials from `dir`, `verify-peer` as given) and the
/// given `tls-*` parameters, listening on `unix` (a path) or TCP; returns it and the URI.
fn tls_dest(
    root: &Path,
    name: &str,
    m: &Machine,
    dir: Option<(&Path, bool)>,
    params: Value,
    unix: Option<&Path>,
) -> (Vm, String) {
    let mut dst = dest(root, name, m);
    dst.caps(&CAPS);
    if let Some((dir, verify)) = dir {
        let mut o = x509("tls0", dir, "server");
        o["verify-peer"] = json!(verify);
        dst.c("object-add", o);
        dst.params(json!({"tls-creds": "tls0"}));
    }
    if params.as_object().is_some_and(|p| !p.is_empty()) {
        dst.params(params);
    }
    let uri = match unix {
        Some(p) => dst.listen_unix(p),
        None => dst.listen_tcp(),
    };
    (dst, uri)
}

/// `src` migrates to `uri` with `src_params`; both sides must complete; pattern check on the
/// destination.
fn migrate_ok(root: &Path, src: &mut Vm, dst: &mut Vm, m: &Machine, uri: &str, tag: &str) {
    src.drain_events();
    converge(src);
    src.c("migrate", json!({ "uri": uri }));
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_eq!(q["status"], "completed", "{q}");
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_handover(src, dst);
    assert_pattern_ok(dst, m, root, tag);
}

/// `src` migrates to `uri`, which must fail on both sides: each side's `error-desc` contains
/// every word of its list; the source runs on, the destination lives and never ran.
fn migrate_fails(src: &mut Vm, dst: &mut Vm, uri: &str, src_words: &[&str], dst_words: &[&str]) {
    src.drain_events();
    src.c("migrate", json!({ "uri": uri }));
    let q = src.wait_mig(&["failed"], T);
    let desc = error_desc(&q);
    for w in src_words {
        assert!(desc.contains(w), "source error-desc {desc:?} lacks {w:?}");
    }
    let q = dst.wait_mig(&["failed"], T);
    let desc = error_desc(&q);
    for w in dst_words {
        assert!(
            desc.contains(w),
            "destination error-desc {desc:?} lacks {w:?}"
        );
    }
    dst.assert_alive();
    assert_ne!(dst.run_status(), "running");
    assert_source_runs_on(src);
}

#[test]
fn x509_default_host_friendly_client_authz_allowed_over_tcp() {
    let dir = tmpdir();
    let root = dir.path();
    let ca = new_ca("Tern test CA");
    let sdir = server_dir(root, "dst", &ca, &["127.0.0.1", "localhost"]);
    let cdir = client_dir(root, "src", &ca, Some(&ca), "hosta.example.com");
    let m = small();
    // The source's credentials come from the command line, as QEMU's -object.
    let obj = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        cdir.display()
    );
    let mut src = boot(root, "src", &m.clone().arg("--object").arg(obj));
    src.wait_workload_running(T);
    src.caps(&CAPS);
    src.params(json!({"tls-creds": "tls0"}));
    let p = src.c("query-migrate-parameters", json!({}));
    assert_eq!(
        (&p["tls-creds"], &p["tls-hostname"], &p["tls-authz"]),
        (&json!("tls0"), &json!(""), &json!("")),
        "{p}"
    );

    let mut dst = dest(root, "dst", &m);
    dst.caps(&CAPS);
    dst.c("object-add", x509("tls0", &sdir, "server"));
    dst.c(
        "object-add",
        json!({"qom-type": "authz-list", "id": "auth0", "policy": "deny",
               "rules": [{"match": "CN=*.example.com,O=Tern", "policy": "allow",
                          "format": "glob"}]}),
    );
    dst.params(json!({"tls-creds": "tls0", "tls-authz": "auth0"}));
    let uri = dst.listen_tcp();
    // In use by the listening migration: not deletable.
    let e = dst.err("object-del", json!({"id": "auth0"}));
    assert!(e.contains("in use"), "{e}");
    migrate_ok(root, &mut src, &mut dst, &m, &uri, "default-host");
    // Done: deletable now.
    dst.c("object-del", json!({"id": "auth0"}));
    dst.quit_ok();
    src.quit_ok();
}

#[test]
fn x509_override_host_over_unix_and_verify_peer_off_accepts_no_certificate() {
    let dir = tmpdir();
    let root = dir.path();
    let ca = new_ca("Tern test CA");
    let sdir = server_dir(root, "dst", &ca, &["dest.example.com"]);
    let cdir = client_dir(root, "src", &ca, Some(&ca), "hosta.example.com");
    let bare = client_dir(root, "src-bare", &ca, None, "");
    let m = small();
    let mut src = boot(root, "src", &m);
    src.wait_workload_running(T);
    src.caps(&CAPS);
    src.c("object-add", x509("tls0", &cdir, "client"));
    src.c("object-add", x509("bare", &bare, "client"));

    // Override host: the certificate names dest.example.com only.
    src.params(json!({"tls-creds": "tls0", "tls-hostname": "dest.example.com"}));
    let sock = root.join("mig.sock");
    let (mut dst, uri) = tls_dest(root, "dst", &m, Some((&sdir, true)), json!({}), Some(&sock));
    migrate_ok(root, &mut src, &mut dst, &m, &uri, "override-host");
    src.quit_ok();

    // A client without a certificate, against verify-peer=off; unix: without tls-hostname, so
    // the name is not checked (QEMU), only the chain.
    // The destination becomes the source (the pattern check stopped it: run it again).
    let mut src = dst;
    src.c("cont", json!({}));
    let seq = src.last_seq();
    src.hb_after(seq, T);
    src.caps(&CAPS);
    src.c("object-add", x509("bare", &bare, "client"));
    src.params(json!({"tls-creds": "bare"}));
    let sock2 = root.join("mig2.sock");
    let (mut dst2, uri) = tls_dest(
        root,
        "dst2",
        &m,
        Some((&sdir, false)),
        json!({}),
        Some(&sock2),
    );
    migrate_ok(root, &mut src, &mut dst2, &m, &uri, "no-verify");
    dst2.quit_ok();
    src.quit_ok();
}

#[test]
fn tls_refusals_fail_fast_on_both_sides_and_the_source_runs_on() {
    let dir = tmpdir();
    let root = dir.path();
    let ca = new_ca("Tern test CA");
    let rogue = new_ca("Rogue CA");
    let sdir = server_dir(root, "dst", &ca, &["127.0.0.1"]);
    let friendly = client_dir(root, "friendly", &ca, Some(&ca), "hosta.example.com");
    let hostile = client_dir(root, "hostile", &ca, Some(&rogue), "hosta.example.com");
    let bare = client_dir(root, "bare", &ca, None, "");
    let m = small();
    let mut src = boot(root, "src", &m);
    src.wait_workload_running(T);
    src.caps(&CAPS);
    for (id, d) in [
        ("friendly", &friendly),
        ("hostile", &hostile),
        ("bare", &bare),
    ] {
        src.c("object-add", x509(id, d, "client"));
    }
    let tls = Some((sdir.as_path(), true));

    // Mismatched host.
    src.params(json!({"tls-creds": "friendly", "tls-hostname": "wrong.example.com"}));
    let (mut d, uri) = tls_dest(root, "d-host", &m, tls, json!({}), None);
    migrate_fails(
        &mut src,
        &mut d,
        &uri,
        &["not valid for host name 'wrong.example.com'"],
        // Its alert, or its close when the alert was lost: both say "refused".
        &["TLS", "refused"],
    );
    d.quit_ok();
    src.params(json!({"tls-hostname": ""}));

    // Hostile client: its certificate comes from a CA the destination does not trust.
    src.params(json!({"tls-creds": "hostile"}));
    let (mut d, uri) = tls_dest(root, "d-hostile", &m, tls, json!({}), None);
    migrate_fails(
        &mut src,
        &mut d,
        &uri,
        &["refused our certificate", "CA"],
        &["unknown CA"],
    );
    d.quit_ok();

    // A client without a certificate, against verify-peer=on.
    src.params(json!({"tls-creds": "bare"}));
    let (mut d, uri) = tls_dest(root, "d-nocert", &m, tls, json!({}), None);
    migrate_fails(
        &mut src,
        &mut d,
        &uri,
        &["client certificate"],
        &["no certificate"],
    );
    d.quit_ok();

    // Authorization denied, the refused name on both sides.
    src.params(json!({"tls-creds": "friendly"}));
    let mut d = dest(root, "d-authz", &m);
    d.caps(&CAPS);
    d.c("object-add", x509("tls0", &sdir, "server"));
    d.c(
        "object-add",
        json!({"qom-type": "authz-simple", "id": "auth0",
               "identity": "CN=hostb.example.com,O=Tern"}),
    );
    d.params(json!({"tls-creds": "tls0", "tls-authz": "auth0"}));
    let uri = d.listen_tcp();
    let who = "'CN=hosta.example.com,O=Tern' is not authorized by 'auth0'";
    migrate_fails(
        &mut src,
        &mut d,
        &uri,
        &["refused this source", who],
        &[who],
    );
    d.quit_ok();

    // A plain source against a TLS destination.
    src.params(json!({"tls-creds": ""}));
    let (mut d, uri) = tls_dest(root, "d-plain-src", &m, tls, json!({}), None);
    migrate_fails(
        &mut src,
        &mut d,
        &uri,
        &["did not start a TLS handshake"],
        &["did not start a TLS handshake", "requires TLS"],
    );
    d.quit_ok();

    // A TLS source against a plain destination.
    src.params(json!({"tls-creds": "friendly"}));
    let (mut d, uri) = tls_dest(root, "d-plain-dst", &m, None, json!({}), None);
    migrate_fails(
        &mut src,
        &mut d,
        &uri,
        &["answered without TLS"],
        &["started a TLS handshake", "no tls-creds"],
    );
    d.quit_ok();

    // After all that, a good migration.
    let (mut d, uri) = tls_dest(root, "d-good", &m, tls, json!({}), None);
    migrate_ok(root, &mut src, &mut d, &m, &uri, "after-refusals");
    d.quit_ok();
    src.quit_ok();
}

#[test]
fn object_add_errors_are_qemu_like() {
    let dir = tmpdir();
    let root = dir.path();
    let ca = new_ca("Tern test CA");
    let cdir = client_dir(root, "src", &ca, Some(&ca), "hosta.example.com");
    let m = small();
    let mut vm = boot(root, "vm", &m);
    vm.c("object-add", x509("tls0", &cdir, "client"));
    let e = vm.err("object-add", x509("tls0", &cdir, "client"));
    assert!(e.contains("duplicate property 'tls0'"), "{e}");
    let e = vm.err(
        "object-add",
        json!({"qom-type": "memory-backend-ram", "id": "x"}),
    );
    assert!(e.contains("qom-type"), "{e}");
    // The server files are not there: the missing one is named.
    let e = vm.err("object-add", x509("srv", &cdir, "server"));
    assert!(e.contains("server-cert.pem"), "{e}");
    let e = vm.err(
        "object-add",
        json!({"qom-type": "tls-creds-x509", "id": "nodir", "endpoint": "client"}),
    );
    assert!(e.contains("'dir'"), "{e}");
    let e = vm.err(
        "object-add",
        json!({"qom-type": "tls-creds-psk", "id": "psk0", "dir": root.to_str().unwrap(),
               "username": "u"}),
    );
    assert!(e.contains("rustls") && e.contains("tls-creds-x509"), "{e}");
    let e = vm.err(
        "object-add",
        json!({"qom-type": "authz-simple", "id": "a", "identity": "x", "policy": "allow"}),
    );
    assert!(e.contains("Parameter 'policy' is unexpected"), "{e}");
    // tls-creds must name client credentials when the migration starts.
    vm.c(
        "object-add",
        json!({"qom-type": "authz-simple", "id": "auth0", "identity": "CN=a"}),
    );
    for (id, word) in [
        ("nope", "No TLS credentials with id 'nope'"),
        ("auth0", "not TLS credentials"),
    ] {
        vm.params(json!({"tls-creds": id}));
        let e = vm.err("migrate", json!({"uri": "tcp:127.0.0.1:1"}));
        assert!(e.contains(word), "{e}");
    }
    vm.params(json!({"tls-creds": "tls0"}));
    let file = root.join("snap");
    let e = vm.err(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    assert!(e.contains("file:"), "{e}");
    vm.c("object-del", json!({"id": "tls0"}));
    let e = vm.err("object-del", json!({"id": "tls0"}));
    assert!(e.contains("not found"), "{e}");
    assert_eq!(vm.run_status(), "running");
    vm.quit_ok();
}

#[test]
fn hostile_but_authenticated_client_sending_garbage_cannot_harm_the_destination() {
    use tern_migration::transport::tls_config::{TlsEndpoint, X509Creds};
    use tern_migration::transport::tls_stream::{self, ClientTls};
    use tern_migration::transport::Stream;

    let dir = tmpdir();
    let root = dir.path();
    let ca = new_ca("Tern test CA");
    let sdir = server_dir(root, "dst", &ca, &["127.0.0.1"]);
    let cdir = client_dir(root, "src", &ca, Some(&ca), "hosta.example.com");
    let m = small();
    let (mut dst, uri) = tls_dest(root, "dst", &m, Some((&sdir, true)), json!({}), None);
    let addr = uri.strip_prefix("tcp:").expect("tcp URI");
    let sock = std::net::TcpStream::connect(addr).expect("connect");
    let creds = X509Creds {
        dir: cdir,
        endpoint: TlsEndpoint::Client,
        verify_peer: true,
    };
    let tls = ClientTls::new(creds.client_config().expect("config"), Some("127.0.0.1"))
        .expect("client tls");
    let mut s = tls_stream::client(Stream::Tcp(sock), &tls, Some(T)).expect("admitted");
    // Authenticated and admitted, then garbage instead of a stream.
    let garbage: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    use std::io::Write;
    let _ = s.write_all(&garbage).and_then(|()| s.flush());
    let q = dst.wait_mig(&["failed"], T);
    assert!(error_desc(&q).contains("magic"), "{q}");
    dst.assert_alive();
    assert_ne!(dst.run_status(), "running");
    dst.quit_ok();
}

/// Multifd over TLS (`docs/tls.md`): the main stream and both channels are TLS sessions with
/// the same credentials, hostname check and admission; a dirtying guest; the pattern checks.
#[test]
fn multifd_over_tls_2_channels() {
    let dir = tmpdir();
    let root = dir.path();
    let ca = new_ca("Tern test CA");
    let sdir = server_dir(root, "dst", &ca, &["127.0.0.1", "localhost"]);
    let cdir = client_dir(root, "src", &ca, Some(&ca), "hosta.example.com");
    let m = Machine::pattern(2, 32).memory(128);
    let mut src = boot(root, "src", &m);
    src.wait_workload_running(T);
    src.caps(&CAPS);
    src.caps(&[("multifd", true)]);
    src.c("object-add", x509("tls0", &cdir, "client"));
    src.params(json!({"tls-creds": "tls0", "multifd-channels": 2}));
    let mut dst = dest(root, "dst", &m);
    dst.caps(&CAPS);
    dst.caps(&[("multifd", true)]);
    dst.c("object-add", x509("tls0", &sdir, "server"));
    dst.params(json!({"tls-creds": "tls0", "multifd-channels": 2}));
    let uri = dst.listen_tcp();
    migrate_ok(root, &mut src, &mut dst, &m, &uri, "multifd-tls");
    let q = src.qm();
    assert!(ram_num(&q, "multifd-bytes") > 4 << 20, "{q}");
    dst.quit_ok();
    src.quit_ok();
}
