//! The error-queue parsing and completion bookkeeping of `zero-copy-send`, and one real
//! socket pair on loopback (the kernel copies there: every completion says so).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

use super::*;

/// A `struct sock_extended_err` as the kernel writes it (native endianness).
fn ext_err(errno: u32, origin: u8, code: u8, info: u32, data: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&errno.to_ne_bytes());
    b.extend_from_slice(&[origin, 0, code, 0]);
    b.extend_from_slice(&info.to_ne_bytes());
    b.extend_from_slice(&data.to_ne_bytes());
    b
}

#[test]
fn a_zero_copy_completion_is_parsed_for_ipv4_and_ipv6() {
    let d = ext_err(0, SO_EE_ORIGIN_ZEROCOPY, 0, 3, 7);
    let want = Completion {
        lo: 3,
        hi: 7,
        copied: false,
    };
    assert_eq!(parse_notification(libc::SOL_IP, IP_RECVERR, &d), Ok(want));
    assert_eq!(
        parse_notification(libc::SOL_IPV6, IPV6_RECVERR, &d),
        Ok(want)
    );
    let d = ext_err(0, SO_EE_ORIGIN_ZEROCOPY, SO_EE_CODE_ZEROCOPY_COPIED, 9, 9);
    let c = parse_notification(libc::SOL_IP, IP_RECVERR, &d).unwrap();
    assert!(c.copied, "{c:?}");
    // An offender address may follow the struct: ignored.
    let mut d = ext_err(0, SO_EE_ORIGIN_ZEROCOPY, 0, 0, 0);
    d.extend_from_slice(&[0u8; 16]);
    assert!(parse_notification(libc::SOL_IP, IP_RECVERR, &d).is_ok());
    // The counter wraps: 0xffff_fffe..=1 is four sends.
    let d = ext_err(0, SO_EE_ORIGIN_ZEROCOPY, 0, u32::MAX - 1, 1);
    assert!(parse_notification(libc::SOL_IP, IP_RECVERR, &d).is_ok());
}

#[test]
fn anything_but_a_zero_copy_completion_is_an_error_naming_it() {
    let ok = ext_err(0, SO_EE_ORIGIN_ZEROCOPY, 0, 0, 0);
    for (level, kind, data, want) in [
        (libc::SOL_SOCKET, 1, ok.clone(), "level 1 type 1"),
        (libc::SOL_IP, IPV6_RECVERR, ok.clone(), "level 0 type 25"),
        (
            libc::SOL_IP,
            IP_RECVERR,
            ok[..12].to_vec(),
            "a 12-byte sock_extended_err",
        ),
        (
            libc::SOL_IP,
            IP_RECVERR,
            ext_err(libc::ECONNRESET as u32, SO_EE_ORIGIN_ZEROCOPY, 0, 0, 0),
            "socket error on the error queue",
        ),
        (
            libc::SOL_IP,
            IP_RECVERR,
            ext_err(0, 2, 0, 0, 0),
            "origin 2, not a zero-copy completion",
        ),
        (
            libc::SOL_IP,
            IP_RECVERR,
            ext_err(0, SO_EE_ORIGIN_ZEROCOPY, 0, 10, 2),
            "range 10..=2",
        ),
    ] {
        let e = parse_notification(level, kind, &data).unwrap_err();
        assert!(e.contains(want), "{e} (wanted {want})");
    }
}

#[test]
fn completions_in_any_order_count_once_and_join_up() {
    let c = |lo, hi| Completion {
        lo,
        hi,
        copied: false,
    };
    let mut d = Done::default();
    assert!(d.all_below(0));
    assert_eq!(d.add(c(2, 3)), 2);
    assert!(!d.all_below(1), "0 and 1 are still out");
    assert_eq!(d.add(c(0, 0)), 1);
    assert!(d.all_below(1) && !d.all_below(2));
    assert_eq!(d.add(c(1, 1)), 1);
    assert!(d.all_below(4) && !d.all_below(5));
    // Across the kernel's 32-bit wrap.
    let mut d = Done {
        below: u64::from(u32::MAX) - 1,
        ahead: BTreeMap::new(),
    };
    d.add(c(u32::MAX - 1, 1));
    assert!(d.all_below(u64::from(u32::MAX) + 3));
}

/// Real sockets on loopback: SO_ZEROCOPY is accepted, armed writes complete, the flush
/// returns once they did, and the kernel reports it copied (local delivery), which is a
/// "missed" zero copy; the bytes arrive intact.
#[test]
fn loopback_zero_copy_sends_complete_and_are_reported_copied() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut rx, _) = l.accept().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        rx.read_to_end(&mut all).unwrap();
        all
    });
    let mut z = ZeroCopySocket::new(tx, Some(Duration::from_secs(30))).unwrap();
    assert!(!z.flush_completions().unwrap(), "nothing sent: no miss");
    let mut pool = SlotPool::new(256 << 10);
    let mut want = Vec::new();
    for round in 0..(POOL_SLOTS * 3) {
        let mut s = pool.take(&mut z).unwrap();
        s.data.fill(round as u8);
        z.arm(true);
        z.write_all(&s.data).unwrap();
        z.arm(false);
        want.extend_from_slice(&s.data);
        pool.sent(s, &z);
    }
    z.write_all(b"plain").unwrap();
    want.extend_from_slice(b"plain");
    assert!(z.sent() >= (POOL_SLOTS * 3) as u64);
    let missed = z.flush_completions().unwrap();
    pool.release_all();
    assert_eq!(z.completed, z.sent(), "every send completed");
    assert!(
        missed,
        "loopback copies: {} of {} copied",
        z.copied, z.completed
    );
    assert_eq!(z.copied, z.completed);
    z.get_ref().shutdown(std::net::Shutdown::Write).unwrap();
    assert!(reader.join().unwrap() == want, "the bytes arrived intact");
}

#[test]
fn zero_copy_on_a_unix_socket_is_refused_naming_so_zerocopy() {
    // A TcpStream over a unix socket's fd is wrong on purpose: only the setsockopt is tried.
    use std::os::fd::{FromRawFd, IntoRawFd};
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    // SAFETY: the fd is owned and handed over once.
    let s = unsafe { TcpStream::from_raw_fd(a.into_raw_fd()) };
    let e = ZeroCopySocket::new(s, None).unwrap_err();
    assert!(e.to_string().contains("SO_ZEROCOPY"), "{e}");
}

/// Drops `CAP_IPC_LOCK` from the calling thread's effective set (capabilities are per thread).
fn drop_ipc_lock() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const CAP_IPC_LOCK: u32 = 14;
    let mut h = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: the header and two data structs are the v3 layout capget/capset expect; both
    // are live for the calls.
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()), 0);
        d[0].effective &= !(1 << CAP_IPC_LOCK);
        assert_eq!(libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()), 0);
    }
}

/// Linux charges pages pinned by MSG_ZEROCOPY to RLIMIT_MEMLOCK (unless CAP_IPC_LOCK): a
/// 1 MiB send under a 64 KiB limit fails with ENOBUFS and nothing outstanding, and the error
/// names the limit and its value. Runs in a child process (the limit is per process), on a
/// thread without CAP_IPC_LOCK.
#[test]
fn a_locked_memory_limit_too_small_for_a_batch_fails_naming_rlimit_memlock() {
    const CHILD: &str = "TERN_ZEROCOPY_MEMLOCK_CHILD";
    if std::env::var_os(CHILD).is_none() {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "source::multifd_zerocopy::tests::a_locked_memory_limit_too_small_for_a_batch_fails_naming_rlimit_memlock",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{text}");
        assert!(
            text.contains("memlock refusal:"),
            "child ran nothing:\n{text}"
        );
        return;
    }
    let lim = libc::rlimit {
        rlim_cur: 64 << 10,
        rlim_max: 64 << 10,
    };
    // SAFETY: `lim` is a live rlimit.
    let r = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
    assert_eq!(r, 0, "setrlimit");
    drop_ipc_lock();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (_rx, _) = l.accept().unwrap();
    let mut z = ZeroCopySocket::new(tx, Some(Duration::from_secs(30))).unwrap();
    let data = vec![7u8; 1 << 20];
    z.arm(true);
    let e = z.write(&data).unwrap_err();
    let text = e.to_string();
    eprintln!("memlock refusal: {text}");
    assert_eq!(e.kind(), io::ErrorKind::OutOfMemory, "{text}");
    assert!(
        text.contains("RLIMIT_MEMLOCK, now 64 KiB") && text.contains("CAP_IPC_LOCK"),
        "{text}"
    );
    assert_eq!(z.sent(), 0, "a refused send is not counted");
}
