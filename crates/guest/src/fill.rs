//! The `idle` workload's fill data: text-like, non-zero, compressible, a pure function of the
//! page's GPA (so a host can regenerate and verify it after a migration).
//!
//! This file is shared verbatim with the guest program, so it must only use `core` and must
//! not contain `unsafe` code.

const WORDS: [&[u8]; 32] = [
    b"migration",
    b"page",
    b"dirty",
    b"vcpu",
    b"guest",
    b"memory",
    b"the",
    b"of",
    b"and",
    b"to",
    b"kernel",
    b"bitmap",
    b"stream",
    b"socket",
    b"device",
    b"state",
    b"converge",
    b"bandwidth",
    b"downtime",
    b"iteration",
    b"tern",
    b"qemu",
    b"ram",
    b"block",
    b"zero",
    b"copy",
    b"post",
    b"pre",
    b"sync",
    b"clock",
    b"queue",
    b"buffer",
];

const HEX: &[u8; 16] = b"0123456789abcdef";

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes the fill content of the page at `gpa` into `out` (normally one 4 KiB page; any
/// length works). Every byte written is printable ASCII (never zero).
pub fn fill_page(gpa: u64, out: &mut [u8]) {
    let len = out.len();
    // Header line: "@<16 hex digits of the GPA>\n".
    let mut pos = 0;
    let header_len = 18;
    if len >= header_len {
        out[0] = b'@';
        let mut i = 0;
        while i < 16 {
            out[1 + i] = HEX[((gpa >> (60 - 4 * i)) & 0xf) as usize];
            i += 1;
        }
        out[17] = b'\n';
        pos = header_len;
    }
    let mut x = mix(gpa) | 1;
    let mut col = 0;
    while pos < len {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let word = WORDS[(x >> 59) as usize];
        let n = word.len().min(len - pos);
        out[pos..pos + n].copy_from_slice(&word[..n]);
        pos += n;
        col += n + 1;
        if pos < len {
            out[pos] = if col > 64 {
                col = 0;
                b'\n'
            } else {
                b' '
            };
            pos += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_printable_distinct() {
        let mut a = [0u8; 4096];
        let mut b = [0u8; 4096];
        fill_page(0x100_0000, &mut a);
        fill_page(0x100_0000, &mut b);
        assert_eq!(a, b);
        assert!(a.iter().all(|&c| c == b'\n' || (0x20..0x7f).contains(&c)));
        assert!(a.starts_with(b"@0000000001000000\n"));
        fill_page(0x100_1000, &mut b);
        assert_ne!(a[18..], b[18..]);
        let mut short = [0u8; 5];
        fill_page(0, &mut short);
        assert!(short.iter().all(|&c| c != 0));
    }
}
