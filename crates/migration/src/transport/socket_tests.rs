//! Socket properties of the migration channel: close-on-exec, forced buffer sizes.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use socket2::SockRef;

use super::*;

/// Whether `fd` has `FD_CLOEXEC` (from `/proc/self/fdinfo`: `flags` is octal).
fn cloexec(fd: BorrowedFd<'_>) -> bool {
    let info =
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).expect("fdinfo");
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .expect("flags line")
        .trim();
    u32::from_str_radix(flags, 8).expect("octal flags") & libc::O_CLOEXEC as u32 != 0
}

/// Whether this process may force socket buffer sizes (CAP_NET_ADMIN, bit 12 of CapEff).
fn may_force_buffers() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

#[test]
fn sockets_are_close_on_exec_with_forced_buffers() {
    let dir = tempfile::tempdir().unwrap();
    for uri in [
        "tcp:127.0.0.1:0".parse::<MigrationUri>().unwrap(),
        MigrationUri::Unix {
            path: dir.path().join("s"),
        },
    ] {
        let l = Listener::bind(&uri).unwrap();
        let uri = l.local_uri();
        let t = std::thread::spawn(move || l.accept(&CancelToken::new()).unwrap());
        let src = connect(&uri, &CancelToken::new()).unwrap();
        let dst = t.join().unwrap();
        for (side, s) in [("source", &src), ("destination", &dst)] {
            assert!(cloexec(s.as_fd()), "{uri} {side}: not close-on-exec");
            if may_force_buffers() {
                let fd = s.as_fd();
                let sock = SockRef::from(&fd);
                // The kernel doubles the value set (bookkeeping overhead).
                assert!(
                    sock.send_buffer_size().unwrap() >= SOCKET_BUFFER_BYTES,
                    "{uri}"
                );
                assert!(
                    sock.recv_buffer_size().unwrap() >= SOCKET_BUFFER_BYTES,
                    "{uri}"
                );
            }
        }
    }
}

/// `TCP_NOTSENT_LOWAT` of a TCP socket (0 when unset: the kernel's default, no limit).
fn notsent_lowat(fd: BorrowedFd<'_>) -> libc::c_int {
    let mut v: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a live c_int with its exact size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt: {}", std::io::Error::last_os_error());
    v
}

/// The source's TCP socket holds at most `NOTSENT_LOWAT_BYTES` unsent (what waits there at the
/// stop goes out inside the downtime); the destination's side is left alone.
#[test]
fn the_source_tcp_socket_bounds_its_unsent_bytes() {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse::<MigrationUri>().unwrap()).unwrap();
    let uri = l.local_uri();
    let t = std::thread::spawn(move || l.accept(&CancelToken::new()).unwrap());
    let src = connect(&uri, &CancelToken::new()).unwrap();
    let dst = t.join().unwrap();
    assert_eq!(
        notsent_lowat(src.as_fd()),
        NOTSENT_LOWAT_BYTES as libc::c_int
    );
    // 0: unset (the kernel's `net.ipv4.tcp_notsent_lowat` applies).
    assert_eq!(notsent_lowat(dst.as_fd()), 0, "destination");
}
