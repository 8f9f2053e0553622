//! Migration failure handling, mirroring QEMU's cancel matrix (`cancel/src/after/<status>`),
//! `bad_dest`, `validate_uuid*` and the "destination stays alive" failure mode
//! (`MIG_TEST_FAIL`), with real `tern run` processes and real sockets.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;

/// A small, cheap source: `dirty` at a moderate rate on one vCPU.
fn small() -> Machine {
    Machine::dirty(1, 32, 32)
}

/// Cancels `src`'s migration and waits for `cancelled`, which says who cancelled.
fn cancel(src: &mut Vm) {
    src.c("migrate_cancel", json!({}));
    src.wait_mig(&["cancelled"], T);
    let q = src.qm();
    assert_eq!(q["status"], "cancelled");
    assert_eq!(
        error_desc(&q),
        "migration cancelled by the user (migrate_cancel)",
        "{q}"
    );
}

#[test]
fn cancel_while_active_then_migrate_again() {
    let dir = tmpdir();
    let m = small();
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest(dir.path(), "dst", &m);
    start_tcp_migration(&mut src, &mut dst, &[("events", true)], true);
    src.wait_mig(&["active"], T);
    dst.wait_mig(&["active"], T);
    cancel(&mut src);
    // The destination sees the stream end early: failed, alive, never ran.
    let q = dst.wait_mig(&["failed"], T);
    assert!(!error_desc(&q).is_empty(), "{q}");
    dst.assert_alive();
    assert_ne!(dst.run_status(), "running");
    assert_source_runs_on(&mut src);
    // Cancelling again is harmless.
    src.c("migrate_cancel", json!({}));
    assert_eq!(src.mig_status(), "cancelled");

    let mut dst2 = migrate_fully(dir.path(), "dst2", &mut src, &m);
    let p0 = dst2.pages_written();
    dst2.wait_pages_advance(&p0, T);
    dst2.quit_ok();
    dst.quit_ok();
    src.quit_ok();
}

#[test]
fn cancel_right_after_migrate_in_setup() {
    let dir = tmpdir();
    let m = small();
    let mut src = boot(dir.path(), "src", &m);
    let mut dst = dest(dir.path(), "dst", &m);
    start_tcp_migration(&mut src, &mut dst, &[("events", true)], true);
    src.c("migrate_cancel", json!({}));
    src.wait_mig(&["cancelled"], T);
    assert_source_runs_on(&mut src);
    // The destination either never saw a connection or failed; it lives on either way.
    dst.assert_alive();
    assert_ne!(dst.run_status(), "running");
    let dst2 = migrate_fully(dir.path(), "dst2", &mut src, &m);
    dst2.quit_ok();
    src.quit_ok();
}

/// A TCP listener on 127.0.0.1 whose accept queue is full: connecting to it blocks in SYN_SENT
/// (Linux drops SYNs to a listener with a full accept queue). Returns the listener, the
/// connections that fill it and the port.
fn full_tcp_listener() -> (OwnedFd, Vec<TcpStream>, u16) {
    // SAFETY: plain socket(2); the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `raw` is a fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_in is plain old data.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `sin` is a valid sockaddr_in of `len` bytes.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sin as *const _ as *const libc::sockaddr,
            len,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    // SAFETY: listen(2) on our socket.
    let r = unsafe { libc::listen(fd.as_raw_fd(), 0) };
    assert_eq!(r, 0, "listen: {}", std::io::Error::last_os_error());
    let mut got = len;
    // SAFETY: getsockname(2) writes at most `got` bytes into `sin`.
    let r = unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            &mut sin as *mut _ as *mut libc::sockaddr,
            &mut got,
        )
    };
    assert_eq!(r, 0);
    let port = u16::from_be(sin.sin_port);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => fillers.push(s),
            Err(_) => return (fd, fillers, port),
        }
    }
    panic!("could not fill the accept queue of a backlog-0 listener");
}

#[test]
fn cancel_in_setup_while_connect_blocks() {
    let dir = tmpdir();
    let m = small();
    let mut src = boot(dir.path(), "src", &m);
    src.caps(&[("events", true)]);
    let (_listener, _fillers, port) = full_tcp_listener();
    src.c("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    src.wait_mig(&["setup"], T);
    assert_eq!(src.mig_status(), "setup");
    // The guest keeps running while the source waits to connect.
    src.assert_running_guest(10);
    assert_eq!(
        src.mig_status(),
        "setup",
        "connect to a full listener returned"
    );
    cancel(&mut src);
    assert_runs_on_then_migrates(dir.path(), "dst", src, &m);
}

/// A unix listener with a full backlog: `connect(2)` blocks.
fn full_unix_listener(path: &Path) -> (OwnedFd, Vec<UnixStream>) {
    // SAFETY: plain socket(2); the result is checked.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(raw >= 0);
    // SAFETY: `raw` is a fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_un is plain old data.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let p = path.as_os_str().as_encoded_bytes();
    assert!(p.len() < sun.sun_path.len());
    for (d, s) in sun.sun_path.iter_mut().zip(p) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `sun` is a valid sockaddr_un of `len` bytes.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sun as *const _ as *const libc::sockaddr,
            len,
        )
    };
    assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
    // SAFETY: listen(2) on our socket.
    assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 0) }, 0);
    // With backlog 0 one connection fits; a second one would block.
    let c = UnixStream::connect(path).expect("first connection");
    (fd, vec![c])
}

#[test]

fn cancel_in_setup_while_unix_connect_blocks() {
    let dir = tmpdir();
    let m = small();
    let mut src = boot(dir.path(), "src", &m);
    src.caps(&[("events", true)]);
    let sock = dir.path().join("full.sock");
    let (_listener, _fillers) = full_unix_listener(&sock);
    src.c(
        "migrate",
        json!({"uri": format!("unix:{}", sock.display())}),
    );
    src.wait_mig(&["setup"], T);
    src.assert_running_guest(10);
    assert_eq!(src.mig_status(), "setup");
    cancel(&mut src);
    assert_runs_on_then_migrates(dir.path(), "dst", src, &m);
}

#[test]
fn cancel_in_pre_switchover_resumes_source() {
    let dir = tmpdir();
    let m = small();
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest(dir.path(), "dst", &m);
    src.caps(&[("events", true), ("pause-before-switchover", true)]);
    dst.caps(&[("events", true)]);
    let uri = dst.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["pre-switchover"], MIGRATION_TIMEOUT);
    src.event("STOP", T);
    let last = src.last_seq();
    cancel(&mut src);
    // It was running before the migration, so it runs again, from where it stopped.
    src.event("RESUME", T);
    assert_eq!(src.hb_after(last, T), last + 1);
    assert_source_runs_on(&mut src);
    let q = dst.wait_mig(&["failed"], T);
    assert!(!error_desc(&q).is_empty(), "{q}");
    dst.assert_alive();
    src.caps(&[("pause-before-switchover", false)]);
    let dst2 = migrate_fully(dir.path(), "dst2", &mut src, &m);
    dst2.quit_ok();
    dst.quit_ok();
    src.quit_ok();
}

#[test]
fn cancel_after_completed_is_a_noop() {
    let dir = tmpdir();
    let m = small();
    let mut src = boot(dir.path(), "src", &m);
    let mut dst = migrate_fully(dir.path(), "dst", &mut src, &m);
    src.c("migrate_cancel", json!({}));
    assert_eq!(src.mig_status(), "completed");
    assert_eq!(src.run_status(), "postmigrate");
    assert_eq!(dst.mig_status(), "completed");
    assert_eq!(dst.run_status(), "running");
    dst.assert_running_guest(10);
    dst.quit_ok();
    src.quit_ok();
}

#[test]
fn cancel_without_migration_is_harmless() {
    let dir = tmpdir();
    let m = small();
    let mut src = boot(dir.path(), "src", &m);
    src.c("migrate_cancel", json!({}));
    let q = src.qm();
    assert!(q.get("status").is_none() || q["status"] == "none", "{q}");
    assert_runs_on_then_migrates(dir.path(), "dst", src, &m);
}

#[test]
fn bad_destination_fails_cleanly_and_cancel_keeps_failed() {
    let dir = tmpdir();
    let m = small();
    let mut src = boot(dir.path(), "src", &m);
    src.caps(&[("events", true)]);
    // A TCP port nobody listens on.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    src.c("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
    let q = src.wait_mig(&["failed"], T);
    let d = error_desc(&q);
    assert!(d.contains("connect") || d.contains("refused"), "{q}");
    assert_source_runs_on(&mut src);
    // cancel after failed: stays failed.
    src.c("migrate_cancel", json!({}));
    assert_eq!(src.mig_status(), "failed");

    // A unix socket path that does not exist.
    src.drain_events();
    let nowhere = dir.path().join("nobody-here.sock");
    src.c(
        "migrate",
        json!({"uri": format!("unix:{}", nowhere.display())}),
    );
    let q = src.wait_mig(&["failed"], T);
    assert!(error_desc(&q).contains("nobody-here.sock"), "{q}");
    assert_source_runs_on(&mut src);

    // A bad URI is refused by the command itself.
    let e = src.err("migrate", json!({"uri": "carrier-pigeon:somewhere"}));
    assert!(e.contains("URI") || e.contains("uri"), "{e}");
    assert_runs_on_then_migrates(dir.path(), "dst", src, &m);
}

#[test]
fn destination_killed_mid_stream_source_runs_on() {
    let dir = tmpdir();
    let m = small();
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    let mut dst = dest(dir.path(), "dst", &m);
    start_tcp_migration(
        &mut src,
        &mut dst,
        &[("events", true), ("return-path", true)],
        true,
    );
    src.wait_mig(&["active"], T);
    dst.wait_mig(&["active"], T);
    dst.kill();
    let q = src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    assert!(!error_desc(&q).is_empty(), "failed without error-desc: {q}");
    assert_runs_on_then_migrates(dir.path(), "dst2", src, &m);
}

#[test]
fn source_killed_mid_stream_destination_fails_and_lives() {
    let dir = tmpdir();
    let m = small();
    let mut src = boot(dir.path(), "src", &m);
    let mut dst = dest(dir.path(), "dst", &m);
    start_tcp_migration(&mut src, &mut dst, &[("events", true)], true);
    dst.wait_mig(&["active"], T);
    src.kill();
    let q = dst.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    assert!(
        ["truncated", "reset", "i/o"]
            .iter()
            .any(|w| error_desc(&q).to_lowercase().contains(w)),
        "destination error-desc after the source died: {q}"
    );
    dst.assert_alive();
    assert_ne!(dst.run_status(), "running");
    dst.assert_no_hb_after(0, Duration::from_millis(100));
    dst.quit_ok();
}

/// A destination listening on TCP that receives `bytes` from a raw client; returns it with
/// its final `query-migrate`.
fn feed_tcp(
    dir: &Path,
    name: &str,
    m: &Machine,
    bytes: &[u8],
    want: &str,
) -> (Vm, serde_json::Value) {
    let mut d = dest(dir, name, m);
    d.caps(&[("events", true)]);
    let uri = d.listen_tcp();
    let addr = uri.trim_start_matches("tcp:").to_owned();
    let mut s = TcpStream::connect(&addr).expect("connecting to the destination");
    // The destination may stop reading (and close) at the first error.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let q = d.wait_mig(&[want], MIGRATION_TIMEOUT);
    drop(s);
    (d, q)
}

/// The offset of a byte of page data in the first RAM record (kind 4) with page data that
/// starts at or after `from` in a stream, else in the first one anywhere (how much of the
/// stream's second half carries page data depends on how many passes the running guest
/// caused) (docs/stream-format.md §2, §5: frame `u8 kind, u32 len`; RAM body `u32 count`,
/// `count` 8-byte entries, then the pages' data).
fn page_data_byte_after(stream: &[u8], from: usize) -> usize {
    page_data_byte_from(stream, from)
        .or_else(|| page_data_byte_from(stream, 0))
        .unwrap_or_else(|| panic!("no RAM record with page data in the stream"))
}

fn page_data_byte_from(stream: &[u8], from: usize) -> Option<usize> {
    let mut at = 16;
    while at + 5 <= stream.len() {
        let kind = stream[at];
        let len = u32::from_le_bytes(stream[at + 1..at + 5].try_into().unwrap()) as usize;
        let body = at + 5;
        if kind == 4 && at >= from {
            // From version 5 the body starts with a 16-byte batch header and ends with a CRC.
            let v5 = u32::from_le_bytes(stream[8..12].try_into().unwrap()) >= 5;
            let (head, tail) = if v5 { (16, 4) } else { (0, 0) };
            let count_at = body + head;
            let count =
                u32::from_le_bytes(stream[count_at..count_at + 4].try_into().unwrap()) as usize;
            let data = count_at + 4 + count * 8;
            let data_end = body + len - tail;
            if data < data_end {
                return Some(data + (data_end - data) / 2);
            }
        }
        at = body + len;
    }
    None
}

#[test]
fn corrupt_streams_into_tcp_destination() {
    let dir = tmpdir();
    let m = Machine::pattern(1, 16);
    let mut src = boot(dir.path(), "src", &m);
    src.wait_workload_running(T);
    src.caps(&[("events", true)]);
    let file = dir.path().join("stream.tern");
    src.c(
        "migrate",
        json!({"uri": format!("file:{}", file.display())}),
    );
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    let last = src.last_seq();
    let good = std::fs::read(&file).unwrap();
    let n = good.len();

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "http",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100),
            "magic",
        ),
        ("half", good[..n / 2].to_vec(), "truncated"),
        (
            "flip",
            {
                // A byte of page data (not of a frame or a page table, which the reader's
                // structural checks would name first): only the checksum can see it.
                let mut b = good.clone();
                let at = page_data_byte_after(&good, n / 2);
                b[at] ^= 0x40;
                b
            },
            "checksum",
        ),
        (
            "newer",
            {
                let mut b = good.clone();
                b[8] = 99;
                b
            },
            "version",
        ),
    ];
    for (name, bytes, word) in cases {
        let (mut d, q) = feed_tcp(dir.path(), name, &m, &bytes, "failed");
        let desc = error_desc(&q);
        assert!(
            desc.to_lowercase().contains(word),
            "{name}: error-desc {desc:?} does not name '{word}'"
        );
        d.assert_alive();
        assert_ne!(d.run_status(), "running");
        d.quit_ok();
    }
    // The same bytes unharmed: a file stream is a valid live stream (no return path).
    let (mut d, _) = feed_tcp(dir.path(), "good", &m, &good, "completed");
    assert_eq!(d.run_status(), "running");
    assert_eq!(d.hb_after(last, T), last + 1);
    assert_pattern_ok(&mut d, &m, dir.path(), "good");
    d.quit_ok();
    src.quit_ok();
}

fn uuid_case(src_uuid: &str, dst_uuid: &str) -> (Vm, Vm, tempfile::TempDir, Machine) {
    let dir = tmpdir();
    let m = small().arg("--uuid").arg(src_uuid);
    let mut src = boot(dir.path(), "src", &m);
    let mut dst = dest_with(
        dir.path(),
        "dst",
        m.memory_mib,
        m.vcpus,
        &["--uuid", dst_uuid],
    );
    let caps = [
        ("events", true),
        ("return-path", true),
        ("validate-uuid", true),
    ];
    start_tcp_migration(&mut src, &mut dst, &caps, false);
    (src, dst, dir, m)
}

#[test]
fn validate_uuid_same_completes() {
    let u = "6f1c1a52-8f4e-4d53-9e6b-2a5a3c1d0e01";
    let (mut src, mut dst, _dir, _m) = uuid_case(u, u);
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_handover(&mut src, &mut dst);
    assert_cont_refused(&mut src);
    assert_eq!(dst.c("query-uuid", json!({}))["UUID"], u);
    dst.quit_ok();
    src.quit_ok();
}

#[test]
fn validate_uuid_different_fails_source_runs_on() {
    let a = "6f1c1a52-8f4e-4d53-9e6b-2a5a3c1d0e01";
    let b = "0b7e3f4a-1c2d-4e5f-8a9b-c0d1e2f3a4b5";
    let (mut src, mut dst, dir, m) = uuid_case(a, b);
    let q = dst.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    assert!(error_desc(&q).contains("UUID"), "destination: {q}");
    let q = src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    assert!(error_desc(&q).contains("UUID"), "source: {q}");
    assert_source_runs_on(&mut src);
    dst.assert_alive();
    assert_ne!(dst.run_status(), "running");
    // With the check off on both sides, the same source migrates (the source's capability alone
    // makes the destination check, as in QEMU: tests/compat.rs).
    src.caps(&[("validate-uuid", false)]);
    let mut dst2 = dest_with(dir.path(), "dst2", m.memory_mib, m.vcpus, &["--uuid", b]);
    dst2.caps(&[("events", true)]);
    src.drain_events();
    let uri = dst2.listen_tcp();
    src.c("migrate", json!({ "uri": uri }));
    src.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    dst2.wait_mig(&["completed"], MIGRATION_TIMEOUT);
    assert_handover(&mut src, &mut dst2);
    assert_cont_refused(&mut src);
    dst2.quit_ok();
    dst.quit_ok();
    src.quit_ok();
}

#[test]
fn quit_during_migration_either_side() {
    let dir = tmpdir();
    let m = small();
    // The source quits mid-migration: it exits 0, the destination fails and lives.
    let mut src = boot(dir.path(), "src", &m);
    let mut dst = dest(dir.path(), "dst", &m);
    start_tcp_migration(&mut src, &mut dst, &[("events", true)], true);
    dst.wait_mig(&["active"], T);
    src.quit_ok();
    dst.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    dst.assert_alive();
    dst.quit_ok();

    // The destination quits mid-migration: it exits 0, the source fails and runs on.
    let mut src = boot(dir.path(), "src2", &m);
    let mut dst = dest(dir.path(), "dst2", &m);
    start_tcp_migration(
        &mut src,
        &mut dst,
        &[("events", true), ("return-path", true)],
        true,
    );
    dst.wait_mig(&["active"], T);
    dst.quit_ok();
    let q = src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
    assert!(!error_desc(&q).is_empty(), "{q}");
    assert_runs_on_then_migrates(dir.path(), "dst3", src, &m);
}

/// The migration did not pause the source (the user did): a cancel must leave it paused.
#[test]
fn cancel_after_user_stop_keeps_source_paused() {
    let dir = tmpdir();
    let m = small();
    let mut src = boot(dir.path(), "src", &m);
    let mut dst = dest(dir.path(), "dst", &m);
    start_tcp_migration(&mut src, &mut dst, &[("events", true)], true);
    src.wait_mig(&["active"], T);
    src.c("stop", json!({}));
    src.event("STOP", T);
    assert_eq!(src.run_status(), "paused");
    // A bad parameter is refused and the migration goes on.
    let e = src.err(
        "migrate-set-parameters",
        json!({"downtime-limit": 10_000_000}),
    );
    // QEMU's own text says 'downtime_limit'.
    assert!(e.contains("downtime"), "{e}");
    assert_eq!(src.mig_status(), "active");
    src.c("migrate_cancel", json!({}));
    src.wait_mig(&["cancelled"], T);
    dst.wait_mig(&["failed"], T);
    assert_eq!(
        src.run_status(),
        "paused",
        "cancel resumed a VM the user had paused"
    );
    let last = src.last_seq();
    src.assert_no_hb_after(last, Duration::from_millis(300));
    src.c("cont", json!({}));
    src.event("RESUME", T);
    assert_eq!(src.hb_after(last, T), last + 1);
    assert_source_runs_on(&mut src);
    dst.quit_ok();
    src.quit_ok();
}

/// A live migration into a destination of another shape fails on both sides with the reason
/// (the destination's text reaches the source over the return path); the source runs on.
#[test]
fn mismatched_destination_fails_live() {
    let dir = tmpdir();
    let m = small();
    let mut src = boot(dir.path(), "src", &m);
    for (name, mem, vcpus, word) in [("bigger", 512, 1, "RAM block"), ("smp2", 256, 2, "vCPU")] {
        let mut dst = dest_with(dir.path(), name, mem, vcpus, &[]);
        let caps = [("events", true), ("return-path", true)];
        src.drain_events();
        start_tcp_migration(&mut src, &mut dst, &caps, false);
        let q = dst.wait_mig(&["failed"], MIGRATION_TIMEOUT);
        assert!(error_desc(&q).contains(word), "{name}: destination {q}");
        let q = src.wait_mig(&["failed"], MIGRATION_TIMEOUT);
        assert!(error_desc(&q).contains(word), "{name}: source {q}");
        assert_source_runs_on(&mut src);
        dst.assert_alive();
        dst.quit_ok();
    }
    let dst = migrate_fully(dir.path(), "dst", &mut src, &m);
    dst.quit_ok();
    src.quit_ok();
}
