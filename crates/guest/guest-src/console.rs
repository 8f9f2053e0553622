//! COM1 output: one `out` per byte (each one is a VM exit, so keep lines short).

use crate::arch::outb;
use crate::layout::COM1;

/// Writer to COM1.
pub struct Console;

impl Console {
    /// Writes raw bytes.
    pub fn bytes(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            outb(COM1, b);
        }
        self
    }

    /// Writes a string.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Writes printable ASCII from `s` (others as '?'), at most `max` bytes.
    pub fn sanitized(&mut self, s: &[u8], max: usize) -> &mut Self {
        for &b in s.iter().take(max) {
            outb(COM1, if (0x20..0x7f).contains(&b) { b } else { b'?' });
        }
        self
    }

    /// Writes an unsigned decimal number.
    pub fn dec(&mut self, mut v: u64) -> &mut Self {
        let mut buf = [0u8; 20];
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.bytes(&buf[i..])
    }
}

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.str(s);
        Ok(())
    }
}
