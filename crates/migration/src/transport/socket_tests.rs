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
