//! Issue 9 item 5, `postcopy-preempt` with real `tern run` processes (`docs/postcopy.md` §5,
//! stream format §13.8): the requested pages travel on a second connection. A 2-vCPU `pattern`
//! guest, one pre-copy pass, `migrate-start-postcopy`, the `pattern` check of every page on the
//! destination; a one-sided capability; a preempt channel that cannot be set up before the
//! switch; a preempt connection cut after the switch, then a recovery.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const CAPS: [(&str, bool); 4] = [
    ("events", true),
    ("postcopy-ram", true),
    ("postcopy-blocktime", true),
    ("postcopy-preempt", true),
];

/// One forwarded connection: both sockets (for a cut) and the bytes it carried from the source.
struct Conn {
    sockets: [TcpStream; 2],
    forwarded: Arc<Mutex<u64>>,
}

#[derive(Default)]
struct ProxyState {
    conns: Vec<Conn>,
}

/// A TCP proxy that forwards every connection (the main channel, the preempt channel, ...),
/// numbered in the order they arrive, each direction as it comes; [`ChannelProxy::cut`] shuts
/// one connection down. With `refuse_after`, connections past that many are closed at once
/// (the preempt channel cannot be set up). The test waits on the condition variable: no sleep.
struct ChannelProxy {
    uri: String,
    state: Arc<(Mutex<ProxyState>, Condvar)>,
}

fn pump(mut from: TcpStream, mut to: TcpStream, count: Option<Arc<Mutex<u64>>>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some(c) = &count {
            *c.lock().unwrap_or_else(|p| p.into_inner()) += n as u64;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

impl ChannelProxy {
    fn start(to: &str, refuse_after: Option<usize>) -> Self {
        let target = to.strip_prefix("tcp:").expect("tcp: target").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().expect("proxy address").port();
        let state: Arc<(Mutex<ProxyState>, Condvar)> = Arc::default();
        let st = state.clone();
        std::thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || {
                for (i, src) in listener.incoming().enumerate() {
                    let Ok(src) = src else { return };
                    if refuse_after.is_some_and(|n| i >= n) {
                        let _ = src.shutdown(Shutdown::Both);
                        continue;
                    }
                    let Ok(dst) = TcpStream::connect(&target) else {
                        return;
                    };
                    let _ = src.set_nodelay(true);
                    let _ = dst.set_nodelay(true);
                    let forwarded = Arc::new(Mutex::new(0u64));
                    let clones = (
                        src.try_clone().expect("clone"),
                        dst.try_clone().expect("clone"),
                        src.try_clone().expect("clone"),
                        dst.try_clone().expect("clone"),
                    );
                    let f = forwarded.clone();
                    let (a, b) = (src, dst);
                    let (ra, rb) = (clones.2, clones.3);
                    std::thread::Builder::new()
                        .name(format!("proxy-fwd-{i}"))
                        .spawn(move || pump(a, b, Some(f)))
                        .expect("spawn");
                    std::thread::Builder::new()
                        .name(format!("proxy-back-{i}"))
                        .spawn(move || pump(rb, ra, None))
                        .expect("spawn");
                    let (lock, cv) = &*st;
                    lock.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .conns
                        .push(Conn {
                            sockets: [clones.0, clones.1],
                            forwarded,
                        });
                    cv.notify_all();
                }
            })
            .expect("spawn proxy-accept");
        Self {
            uri: format!("tcp:127.0.0.1:{port}"),
            state,
        }
    }

    /// Waits until `n` connections were forwarded (panics after `timeout`).
    fn wait_connections(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.state;
        let mut g = lock.lock().unwrap_or_else(|p| p.into_inner());
        while g.conns.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "proxy: {} of {n} connections",
                g.conns.len()
            );
            g = cv
                .wait_timeout(g, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Connections forwarded so far, and the bytes each carried from the source.
    fn forwarded(&self) -> Vec<u64> {
        let g = self.state.0.lock().unwrap_or_else(|p| p.into_inner());
        g.conns
            .iter()
            .map(|c| *c.forwarded.lock().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }

    /// Cuts connection `i` (both directions, both ends): a link that breaks.
    fn cut(&self, i: usize) {
        let g = self.state.0.lock().unwrap_or_else(|p| p.into_inner());
        for s in &g.conns[i].sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Boots the pair with `caps` on each side and starts a migration to `uri` (the destination's
/// own, or a proxy's) that cannot converge.
fn start(
    dir: &std::path::Path,
    m: &Machine,
    src_caps: &[(&str, bool)],
    dst_caps: &[(&str, bool)],
    via: impl FnOnce(String) -> String,
    setup: impl FnOnce(&mut Vm, &mut Vm),
) -> (Vm, Vm) {
    start_on(
        dir,
        m,
        src_caps,
        dst_caps,
        |dst| via(dst.listen_tcp()),
        setup,
    )
}

/// [`start`] with the destination's listener chosen by `listen`.
fn start_on(
    dir: &std::path::Path,
    m: &Machine,
    src_caps: &[(&str, bool)],
    dst_caps: &[(&str, bool)],
    listen: impl FnOnce(&mut Vm) -> String,
    setup: impl FnOnce(&mut Vm, &mut Vm),
) -> (Vm, Vm) {
    let (mut src, mut dst) = boot_pair(dir, m, src_caps, dst_caps);
    setup(&mut src, &mut dst);
    src.params(json!({"max-bandwidth": 32_000_000, "downtime-limit": 1}));
    let uri = listen(&mut dst);
    src.c("migrate", json!({ "uri": uri }));
    (src, dst)
}

/// The switch, the completion, and every check on the destination.
fn finish(dir: &tempfile::TempDir, m: &Machine, mut src: Vm, mut dst: Vm) {
    src.wait_pass(2, MIGRATION_TIMEOUT);
    src.params(json!({"max-postcopy-bandwidth": 64_000_000}));
    src.c("migrate-start-postcopy", json!({}));
    src.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    let q = src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    let dq = dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    eprintln!("source after post-copy with preempt: {q}\ndestination: {dq}");
    assert!(ram_num(&q, "postcopy-requests") > 0, "{q}");
    assert!(ram_num(&q, "postcopy-bytes") > 0, "{q}");
    assert!(dq.get("postcopy-blocktime").is_some(), "{dq}");
    assert!(dq.get("postcopy-latency").is_some(), "{dq}");
    assert_handover(&mut src, &mut dst);
    assert_cont_refused(&mut src);
    let p0 = dst.pages_written();
    dst.wait_pages_advance(&p0, T);
    assert_pattern_ok(&mut dst, m, dir.path(), "dst");
    src.quit_ok();
    dst.quit_ok();
}

/// Post-copy with the preempt channel over TCP, through a proxy that counts the connections:
/// the source opened exactly two (main, preempt), and the requested pages went on the second.
#[test]
fn postcopy_preempt_tcp_pattern_2vcpu() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let mut proxy = None;
    let (src, dst) = start(
        dir.path(),
        &m,
        &CAPS,
        &CAPS,
        |uri| {
            let p = ChannelProxy::start(&uri, None);
            let u = p.uri.clone();
            proxy = Some(p);
            u
        },
        |_, _| {},
    );
    let proxy = proxy.expect("proxy");
    finish(&dir, &m, src, dst);
    let f = proxy.forwarded();
    eprintln!("bytes per connection: {f:?}");
    assert_eq!(f.len(), 2, "main and preempt channel: {f:?}");
    // Header + CONFIG + the handshake are < 4 KiB: more means pages went there.
    assert!(
        f[1] > 64 << 10,
        "requested pages on the preempt channel: {f:?}"
    );
}

/// Over a unix socket: the preempt channel connects to the same path.
#[test]
fn postcopy_preempt_unix_pattern_2vcpu() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let sock = dir.path().join("migration.sock");
    let (src, dst) = start_on(
        dir.path(),
        &m,
        &CAPS,
        &CAPS,
        |dst| dst.listen_unix(&sock),
        |_, _| {},
    );
    finish(&dir, &m, src, dst);
}

/// The same over TLS: the preempt channel runs its own TLS handshake and admission.
#[test]
fn postcopy_preempt_over_tls_tcp_pattern_2vcpu() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
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
    let (src, dst) = start(
        dir.path(),
        &m,
        &CAPS,
        &CAPS,
        |u| u,
        |src, dst| {
            for (vm, endpoint) in [(src, "client"), (dst, "server")] {
                vm.c(
                "object-add",
                json!({"qom-type": "tls-creds-x509", "id": "tls0", "dir": creds, "endpoint": endpoint}),
            );
                vm.params(json!({"tls-creds": "tls0"}));
            }
        },
    );
    finish(&dir, &m, src, dst);
}

/// `postcopy-preempt` on one side only fails at once (CAPABILITIES, before any RAM), naming
/// the capability and both sides' state; the source runs on.
#[test]
fn postcopy_preempt_on_one_side_only_is_refused_at_once_and_the_source_runs_on() {
    let without: Vec<(&str, bool)> = CAPS[..3].to_vec();
    for (src_caps, dst_caps, want) in [
        (
            &CAPS[..],
            &without[..],
            "is on at the source but off at the destination",
        ),
        (
            &without[..],
            &CAPS[..],
            "is off at the source but on at the destination",
        ),
    ] {
        let dir = tmpdir();
        let m = Machine::pattern(2, 32);
        let (mut src, mut dst) = start(dir.path(), &m, src_caps, dst_caps, |u| u, |_, _| {});
        let q = src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
        let e = error_desc(&q);
        assert!(e.contains("capability 'postcopy-preempt'"), "{e}");
        assert!(e.contains(want), "{e}");
        assert!(e.contains("it must be set on both sides"), "{e}");
        let dq = dst.wait_mig(&["failed"], MIGRATION_TIMEOUT);
        assert!(
            error_desc(&dq).contains("capability 'postcopy-preempt'"),
            "{dq}"
        );
        assert_source_runs_on(&mut src);
        src.quit_ok();
        dst.quit_ok();
    }
}

/// A preempt channel that cannot be set up (the proxy closes every connection after the
/// first) fails the migration before the switch, naming the preempt channel; the guest never
/// stopped and runs on.
#[test]
fn postcopy_preempt_channel_refused_before_the_switch_the_source_runs_on() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let mut proxy = None;
    let (mut src, mut dst) = start(
        dir.path(),
        &m,
        &CAPS,
        &CAPS,
        |uri| {
            let p = ChannelProxy::start(&uri, Some(1));
            let u = p.uri.clone();
            proxy = Some(p);
            u
        },
        |src, _| src.params(json!({"x-tern-liveness-timeout": 2000})),
    );
    src.wait_pass(2, MIGRATION_TIMEOUT);
    src.c("migrate-start-postcopy", json!({}));
    let q = src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    let e = error_desc(&q);
    assert!(e.contains("post-copy preempt channel"), "{e}");
    assert_source_runs_on(&mut src);
    dst.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    src.quit_ok();
    dst.quit_ok();
}

/// The preempt connection cut after the switch: both sides go `postcopy-paused` exactly as
/// when the main channel breaks; `migrate-recover` + `migrate resume` open a new main and a
/// new preempt channel, and the migration completes with every page intact.
#[test]
fn postcopy_preempt_cut_after_the_switch_pauses_both_and_recovery_completes() {
    let dir = tmpdir();
    let m = Machine::pattern(2, 32);
    let mut proxy = None;
    let (mut src, mut dst) = start(
        dir.path(),
        &m,
        &CAPS,
        &CAPS,
        |uri| {
            let p = ChannelProxy::start(&uri, None);
            let u = p.uri.clone();
            proxy = Some(p);
            u
        },
        |_, _| {},
    );
    let proxy = proxy.expect("proxy");
    src.wait_pass(2, MIGRATION_TIMEOUT);
    // A slow push: the guest runs on the destination long enough for the cut.
    src.params(json!({"max-postcopy-bandwidth": 1_000_000}));
    src.c("migrate-start-postcopy", json!({}));
    src.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.event("RESUME", MIGRATION_TIMEOUT);
    proxy.wait_connections(2, T);
    proxy.cut(1);
    let q = src.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    assert!(error_desc(&q).contains("post-copy paused"), "{q}");
    let dq = dst.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    let e = error_desc(&dq);
    assert!(e.contains("connection to the source was lost"), "{e}");
    assert!(e.contains("preempt channel"), "{e}");
    // Recovery, straight to the destination: a new main and a new preempt channel.
    dst.c("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
    let port = tern::harness::incoming_port(&dst.qm()).expect("recovery port");
    src.c(
        "migrate",
        json!({"uri": format!("tcp:127.0.0.1:{port}"), "resume": true}),
    );
    src.wait_mig(&["postcopy-active", "completed"], MIGRATION_TIMEOUT);
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
