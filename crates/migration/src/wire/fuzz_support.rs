//! The in-tree mutation fuzzer's engine (`docs/stream-format.md` §11a): a seeded RNG
//! (`TERN_FUZZ_SEED`, printed), the iteration count (`TERN_FUZZ_ITERS`), byte-level mutation
//! operators, structure-aware mutation of the three framings (main stream records, multifd
//! channel records, return-path messages) that re-fixes the lengths, CRCs and sequence
//! numbers the format checks so that mutations reach the deeper parsing, and a runner that
//! turns a panic or a slow input into a failure naming the seed, the iteration and a file
//! holding the input.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::format::{cmd, FRAME_LEN, HEADER_LEN};
use super::*;

/// One fuzz test's run: its RNG, seed and iteration count, and what the inputs gave.
pub(super) struct Fuzz {
    pub(super) rng: StdRng,
    pub(super) seed: u64,
    pub(super) iters: usize,
    name: &'static str,
    /// Outcome name (`ok` or the error variant) → count.
    pub(super) outcomes: BTreeMap<String, usize>,
    /// The slowest input.
    pub(super) slowest: Duration,
}

/// An input this slow is a hang (a loop that does not end, a bomb that is inflated), not a
/// slow machine: the slowest input of the 35-million-input run took 140 ms. Not a timing
/// assertion; the slowest input is printed for that.
const SLOW: Duration = Duration::from_secs(30);

impl Fuzz {
    /// Reads `TERN_FUZZ_SEED` (else the clock) and `TERN_FUZZ_ITERS` (else `default_iters`),
    /// prints both. Each test mixes its name into the seed so that tests differ.
    pub(super) fn start(name: &'static str, default_iters: usize) -> Self {
        let seed: u64 = std::env::var("TERN_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        let iters: usize = std::env::var("TERN_FUZZ_ITERS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default_iters);
        eprintln!("{name}: TERN_FUZZ_SEED={seed} TERN_FUZZ_ITERS={iters}");
        let mixed = name.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Self {
            rng: StdRng::seed_from_u64(mixed),
            seed,
            iters,
            name,
            outcomes: BTreeMap::new(),
            slowest: Duration::ZERO,
        }
    }

    /// Runs `f` on `input` (iteration `i`): a panic, or an input slower than [`SLOW`], fails
    /// the test naming the seed and iteration and saving the input to a file.
    pub(super) fn guard<T>(&mut self, i: usize, input: &[u8], f: impl FnOnce(&[u8]) -> T) -> T {
        let t = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| f(input)));
        let took = t.elapsed();
        self.slowest = self.slowest.max(took);
        let r = match r {
            Ok(r) => r,
            Err(p) => {
                let path = self.save(i, input);
                eprintln!(
                    "{}: PANIC at iteration {i} (TERN_FUZZ_SEED={}), input in {path}",
                    self.name, self.seed
                );
                std::panic::resume_unwind(p)
            }
        };
        if took > SLOW {
            let path = self.save(i, input);
            panic!(
                "{}: iteration {i} (TERN_FUZZ_SEED={}) took {took:?} (> {SLOW:?}), input in {path}",
                self.name, self.seed
            );
        }
        r
    }

    /// [`Fuzz::guard`] for a decoder; its outcome (`ok` or the error's variant) is counted.
    pub(super) fn case<T>(
        &mut self,
        i: usize,
        input: &[u8],
        decode: impl FnOnce(&[u8]) -> Result<T, WireError>,
    ) -> Result<T, WireError> {
        let r = self.guard(i, input, decode);
        let key = match &r {
            Ok(_) => "ok".to_owned(),
            Err(e) => variant(e),
        };
        *self.outcomes.entry(key).or_default() += 1;
        r
    }

    fn save(&self, i: usize, input: &[u8]) -> String {
        let path =
            std::env::temp_dir().join(format!("tern-fuzz-{}-{}-{i}.bin", self.name, self.seed));
        let _ = std::fs::write(&path, input);
        path.display().to_string()
    }

    /// How many inputs gave `outcome` (`ok` or an error variant's name).
    pub(super) fn count(&self, outcome: &str) -> usize {
        self.outcomes.get(outcome).copied().unwrap_or(0)
    }

    /// Inputs refused.
    pub(super) fn rejected(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|(k, _)| k.as_str() != "ok")
            .map(|(_, n)| n)
            .sum()
    }

    /// Prints the outcomes (and the slowest input) and asserts that every variant in `must`
    /// was reached: the structure-aware mutations got past the integrity checks.
    pub(super) fn report(&self, must: &[&str]) {
        eprintln!(
            "{}: {} inputs, slowest {:?}, outcomes {:?}",
            self.name, self.iters, self.slowest, self.outcomes
        );
        for m in must {
            assert!(
                self.count(m) > 0,
                "{}: no input reached {m} (TERN_FUZZ_SEED={}): {:?}",
                self.name,
                self.seed,
                self.outcomes
            );
        }
    }
}

/// The name of an error's variant (`BatchOutOfOrder`, `Truncated`, …).
pub(super) fn variant(e: &WireError) -> String {
    let s = format!("{e:?}");
    let end = s.find([' ', '(', '{']).unwrap_or(s.len());
    s[..end].to_owned()
}

/// Values that sit on the edges of the format's fields and limits.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    9,
    0x7f,
    0x80,
    0xff,
    0x100,
    1023,
    1024,
    1025,
    4087,
    4088,
    4089,
    4095,
    4096,
    4097,
    4104,
    4105,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x1_0001,
    0x8_0008,
    0x8_0009,
    1 << 20,
    (1 << 20) + 1,
    4 << 20,
    (4 << 20) + 1,
    (4 << 20) + 8216,
    64 << 20,
    (64 << 20) + 1,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    u64::MAX,
];

/// Writes `v` little-endian, `width` bytes, at `at` (clipped at the end of `b`).
fn put(b: &mut [u8], at: usize, width: usize, v: u64) {
    let end = (at + width).min(b.len());
    if at < end {
        b[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
    }
}

/// Reads `width` bytes little-endian at `at` (missing bytes are 0).
fn get(b: &[u8], at: usize, width: usize) -> u64 {
    let mut v = [0u8; 8];
    for (k, x) in b.iter().skip(at).take(width).enumerate() {
        v[k] = *x;
    }
    u64::from_le_bytes(v)
}

/// An interesting value for a field of `width` bytes whose current value is `cur`: an edge
/// of a limit, or the current value ± 1 (a length one off), ± 8, ± a page.
fn interesting(rng: &mut StdRng, cur: u64) -> u64 {
    match rng.random_range(0..4) {
        0 => cur.wrapping_add([1, 8, 4096][rng.random_range(0..3)]),
        1 => cur.wrapping_sub([1, 8, 4096][rng.random_range(0..3)]),
        _ => INTERESTING[rng.random_range(0..INTERESTING.len())],
    }
}

/// Sets the field of a random width (1, 2, 4, 8) at `at` to an interesting value.
fn set_interesting(rng: &mut StdRng, b: &mut [u8], at: usize) {
    let width = [1, 2, 4, 8][rng.random_range(0..4)];
    let v = interesting(rng, get(b, at, width));
    put(b, at, width, v);
}

/// 1 ..= 4 byte-level mutations: bit flips, random bytes, interesting values of every width,
/// truncation, deletion, insertion of random bytes, duplication of a range, and a splice of a
/// range of `donor` (another valid input).
pub(super) fn mutate_bytes(rng: &mut StdRng, b: &mut Vec<u8>, donor: &[u8]) {
    for _ in 0..rng.random_range(1..=4) {
        if b.is_empty() {
            b.extend_from_slice(&donor[..donor.len().min(64)]);
            continue;
        }
        let at = rng.random_range(0..b.len());
        match rng.random_range(0..10) {
            0 | 1 => b[at] ^= 1 << rng.random_range(0..8),
            2 => b[at] = rng.random(),
            3 | 4 => set_interesting(rng, b, at),
            5 => b.truncate(at),
            6 => {
                let n = rng.random_range(1..=64).min(b.len() - at);
                b.drain(at..at + n);
            }
            7 => {
                let junk: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
                b.splice(at..at, junk);
            }
            8 => {
                let n = rng.random_range(1..=256).min(b.len() - at);
                let dup = b[at..at + n].to_vec();
                let to = rng.random_range(0..=b.len());
                b.splice(to..to, dup);
            }
            _ if !donor.is_empty() => {
                let from = rng.random_range(0..donor.len());
                let n = rng.random_range(1..=512).min(donor.len() - from);
                let end = (at + n).min(b.len());
                b.splice(at..end, donor[from..from + n].iter().copied());
            }
            _ => b[at] = !b[at],
        }
    }
}

/// A framing's units: `prefix` (header and CONFIG, or a channel's handshake), then records
/// (frame + body) or messages, each as its own bytes.
pub(super) struct Units {
    pub(super) prefix: Vec<u8>,
    pub(super) units: Vec<Vec<u8>>,
    /// Whatever followed the last complete unit.
    pub(super) tail: Vec<u8>,
}

/// Splits records of `FRAME_LEN`-byte frames (`kind`, `u32 len`) starting at `at`.
pub(super) fn split_records(b: &[u8], at: usize) -> Units {
    split(b, at, |rest| {
        (rest.len() >= FRAME_LEN)
            .then(|| FRAME_LEN + get(rest, 1, 4) as usize)
            .filter(|n| *n <= rest.len())
    })
}

/// Splits return-path messages (`u16 type`, `u16 len`).
pub(super) fn split_messages(b: &[u8]) -> Units {
    split(b, 0, |rest| {
        (rest.len() >= 4)
            .then(|| 4 + get(rest, 2, 2) as usize)
            .filter(|n| *n <= rest.len())
    })
}

fn split(b: &[u8], at: usize, next: impl Fn(&[u8]) -> Option<usize>) -> Units {
    let at = at.min(b.len());
    let mut u = Units {
        prefix: b[..at].to_vec(),
        units: Vec::new(),
        tail: Vec::new(),
    };
    let mut pos = at;
    while let Some(n) = next(&b[pos..]) {
        u.units.push(b[pos..pos + n].to_vec());
        pos += n;
        if pos == b.len() {
            break;
        }
    }
    u.tail = b[pos..].to_vec();
    u
}

impl Units {
    pub(super) fn join(&self) -> Vec<u8> {
        let mut out = self.prefix.clone();
        for u in &self.units {
            out.extend_from_slice(u);
        }
        out.extend_from_slice(&self.tail);
        out
    }
}

/// Where a unit's length field is and how wide: records `(1, 4)`, messages `(2, 2)`.
#[derive(Clone, Copy)]
pub(super) struct LenField {
    pub(super) at: usize,
    pub(super) width: usize,
}

/// The length field of a record frame.
pub(super) const RECORD_LEN: LenField = LenField { at: 1, width: 4 };
/// The length field of a return-path message.
pub(super) const MESSAGE_LEN: LenField = LenField { at: 2, width: 2 };

/// One structure-aware mutation of a list of units: drop, duplicate, swap, take one from the
/// donor, mutate a body's bytes keeping its length, resize a body with its length field made
/// to agree, set a field of a body to an interesting value, or set the length field to an
/// interesting value (a lie; sometimes with a body of that length behind it).
pub(super) fn mutate_units(rng: &mut StdRng, u: &mut Units, donor: &Units, len: LenField) {
    let head = len.at + len.width;
    if u.units.is_empty() {
        if let Some(d) = donor.units.first() {
            u.units.push(d.clone());
        }
        return;
    }
    let i = rng.random_range(0..u.units.len());
    match rng.random_range(0..9) {
        0 => {
            u.units.remove(i);
        }
        1 => {
            let d = u.units[i].clone();
            let to = rng.random_range(0..=u.units.len());
            u.units.insert(to, d);
        }
        2 => {
            let j = rng.random_range(0..u.units.len());
            u.units.swap(i, j);
        }
        3 if !donor.units.is_empty() => {
            let d = donor.units[rng.random_range(0..donor.units.len())].clone();
            u.units.insert(i, d);
        }
        4 | 5 => {
            // Bytes of the body change, the length stays.
            let unit = &mut u.units[i];
            if unit.len() > head {
                let mut body = unit.split_off(head);
                let donor_body = donor.units.first().map(|d| d.as_slice()).unwrap_or(&[]);
                let before = body.len();
                mutate_bytes(rng, &mut body, donor_body);
                if rng.random_bool(0.5) || body.len() == before {
                    put(unit, len.at, len.width, body.len() as u64);
                }
                unit.extend_from_slice(&body);
            }
        }
        6 => {
            // A field of the body set to an edge value (lengths, counts, indexes inside it).
            let unit = &mut u.units[i];
            if unit.len() > head {
                let at = rng.random_range(head..unit.len());
                set_interesting(rng, unit, at);
            }
        }
        7 => {
            // The body grows or shrinks and the length field says so.
            let unit = &mut u.units[i];
            let body_len = unit.len() - head;
            let new_len = match rng.random_range(0..3) {
                0 => body_len.saturating_sub(rng.random_range(1..=16)),
                1 => body_len + rng.random_range(1..=16),
                _ => interesting(rng, body_len as u64).min(70_000) as usize,
            };
            unit.resize(head + new_len, 0);
            put(unit, len.at, len.width, new_len as u64);
        }
        _ => {
            // The length field lies; half the time a body of the claimed length follows
            // (up to 70 000 bytes), so a decoder that trusts it reads on into it.
            let unit = &mut u.units[i];
            let cur = get(unit, len.at, len.width);
            let v = interesting(rng, cur);
            put(unit, len.at, len.width, v);
            let claimed = get(unit, len.at, len.width) as usize;
            if rng.random_bool(0.5) && claimed <= 70_000 {
                let fill: u8 = rng.random();
                unit.resize(head + claimed, fill);
            }
        }
    }
}

/// Re-fixes a main stream (header, CONFIG, records) the way a hostile writer would: every
/// complete version-5 RAM batch's CRC-32C, `POSTCOPY_RUN`'s and END's CRC-32 and byte count.
/// With `renumber`, batches also get the generation and sequence the reader expects (the
/// generation counted from 1 by `ITERATION_END` / `SWITCHOVER_START`, the sequence from 0).
pub(super) fn fix_main(b: &mut [u8], renumber: bool) {
    if b.len() < HEADER_LEN as usize {
        return;
    }
    let version = get(b, 8, 4) as u32;
    let batched = version >= VERSION_BATCH_INTEGRITY;
    let mut crc = crc32fast::Hasher::new();
    let (mut generation, mut seq) = (1u32, 0u64);
    let mut at = HEADER_LEN as usize;
    while at + FRAME_LEN <= b.len() {
        let len = get(b, at + 1, 4) as usize;
        let Some(next) = (at + FRAME_LEN).checked_add(len).filter(|e| *e <= b.len()) else {
            return;
        };
        let kind = b[at];
        let total = (at - HEADER_LEN as usize) as u64;
        if kind == RecordKind::Ram as u8 && batched {
            if renumber && len >= 24 {
                put(b, at + FRAME_LEN + 4, 4, u64::from(generation));
                put(b, at + FRAME_LEN + 8, 8, seq);
            }
            seq += 1;
            if len >= 4 {
                let c = crc_fast::crc32_iscsi(&b[at..next - 4]);
                b[next - 4..next].copy_from_slice(&c.to_le_bytes());
            }
            at = next;
            continue;
        }
        if kind == RecordKind::End as u8 && len == 12 {
            let c = crc.clone().finalize();
            put(b, at + FRAME_LEN, 4, u64::from(c));
            put(b, at + FRAME_LEN + 4, 8, total);
        }
        if kind == RecordKind::Command as u8 && len >= 2 {
            let c = get(b, at + FRAME_LEN, 2) as u16;
            if c == cmd::POSTCOPY_RUN && len == 14 {
                let sum = crc.clone().finalize();
                put(b, at + FRAME_LEN + 2, 4, u64::from(sum));
                put(b, at + FRAME_LEN + 6, 8, total);
            }
            if c == cmd::ITERATION_END || c == cmd::SWITCHOVER_START {
                generation = generation.wrapping_add(1);
            }
        }
        crc.update(&b[at..next]);
        at = next;
    }
}

/// Re-fixes the records of a multifd channel (after its handshake): every complete record's
/// CRC-32C; with `renumber`, the sequence (from 0) and the generation (from 1, + 1 after each
/// `SYNC`); with `fix_raw_len`, a compressed batch's `raw_len` is set to what its table says.
pub(super) fn fix_channel(b: &mut [u8], renumber: bool, fix_raw_len: Option<usize>) {
    let (mut generation, mut seq) = (1u64, 0u64);
    let mut at = 0;
    while at + FRAME_LEN <= b.len() {
        let len = get(b, at + 1, 4) as usize;
        let Some(next) = (at + FRAME_LEN).checked_add(len).filter(|e| *e <= b.len()) else {
            return;
        };
        let body = at + FRAME_LEN;
        let flags = get(b, body + 2, 2);
        if renumber && len >= 24 {
            put(b, body + 4, 4, generation);
            put(b, body + 8, 8, seq);
        }
        if let Some(page_size) = fix_raw_len.filter(|_| flags == 4 && len >= 24) {
            let count = get(b, body + 16, 4) as usize;
            let table = body + 20;
            if count <= 1024 && table + 8 * count + 4 <= next - 4 {
                let normal = (0..count)
                    .filter(|k| b[table + 8 * k + 6] == page_kind::NORMAL)
                    .count();
                put(b, table + 8 * count, 4, (normal * page_size) as u64);
            }
        }
        if flags == 1 {
            generation += 1;
        }
        seq += 1;
        if len >= 4 {
            let c = crc_fast::crc32_iscsi(&b[at..next - 4]);
            b[next - 4..next].copy_from_slice(&c.to_le_bytes());
        }
        at = next;
    }
}
