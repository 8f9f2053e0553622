//! Kernels Tern did not write, for the `--kernel` tests: the PVH test guest (built by
//! `crates/tern/build.rs`), Debian's Linux kernel (fetched by `scripts/install-deps.sh`), the
//! vmlinux inside its bzImage, and waiting for serial output in a file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The PVH test guest's ELF.
pub fn pvh_guest() -> PathBuf {
    PathBuf::from(env!("TERN_PVH_GUEST_ELF"))
}

/// Where `scripts/install-deps.sh` puts Debian's kernel (`TERN_LINUX_BZIMAGE` overrides).
pub const DEFAULT_LINUX_BZIMAGE: &str = "/var/cache/tern/linux/vmlinuz";

/// Debian's bzImage, or why it is missing (the test then skips with that message).
pub fn linux_bzimage() -> Result<PathBuf, String> {
    let p = std::env::var_os("TERN_LINUX_BZIMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LINUX_BZIMAGE));
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "no Linux kernel at {} (scripts/install-deps.sh fetches Debian's; TERN_LINUX_BZIMAGE overrides)",
            p.display()
        ))
    }
}

/// Extracts the vmlinux from a bzImage: the payload (`payload_offset`, `payload_length` in the
/// setup header, after the `(setup_sects + 1) * 512` bytes of real-mode code) is an xz stream
/// in Debian's kernels (`CONFIG_KERNEL_XZ`, with the x86 BCJ filter), decompressed with xz2
/// (liblzma, built from its bundled source).
pub fn extract_vmlinux(bzimage: &Path, out: &Path) -> PathBuf {
    let d = std::fs::read(bzimage).expect("reading the bzImage");
    let u32_at = |o: usize| u32::from_le_bytes(d[o..o + 4].try_into().unwrap()) as usize;
    assert_eq!(&d[0x202..0x206], b"HdrS", "not a bzImage");
    let setup = (usize::from(d[0x1f1]) + 1) * 512;
    let (off, len) = (setup + u32_at(0x248), u32_at(0x24c));
    let payload = &d[off..off + len];
    assert_eq!(
        &payload[..6],
        b"\xfd7zXZ\0",
        "the payload is not xz (this helper knows Debian's CONFIG_KERNEL_XZ)"
    );
    // The kernel build appends the uncompressed size (4 bytes) after the xz stream.
    let stream = &payload[..payload.len() - 4];
    let mut vmlinux = Vec::new();
    std::io::Read::read_to_end(&mut xz2::read::XzDecoder::new(stream), &mut vmlinux)
        .expect("decompressing the kernel payload");
    assert_eq!(&vmlinux[..4], b"\x7fELF");
    std::fs::write(out, &vmlinux).expect("writing the vmlinux");
    out.to_path_buf()
}

/// Waits until the text of `file` satisfies `done`; returns it. Panics after `timeout` with
/// what the file held.
pub fn wait_file(file: &Path, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(file).unwrap_or_default()).into_owned();
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} not as expected after {timeout:?}; it holds:\n{}",
            file.display(),
            text.chars()
                .rev()
                .take(3000)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `hb CPU PASS ok|BAD` lines of the PVH test guest: `(cpu, pass, ok)`.
pub fn heartbeat_lines(text: &str) -> Vec<(u32, u64, bool)> {
    // Complete lines only: the guest writes a line byte by byte, so a file read while it is
    // writing ends with a partial one ("hb 1 00000009 " before its "ok"), which would count
    // as a pass that failed its check (CI saw exactly that once).
    let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
    complete
        .lines()
        .filter_map(|l| {
            let mut w = l.split(' ');
            if w.next()? != "hb" {
                return None;
            }
            let cpu = w.next()?.parse().ok()?;
            let pass = u64::from_str_radix(w.next()?, 16).ok()?;
            Some((cpu, pass, w.next()? == "ok"))
        })
        .collect()
}
