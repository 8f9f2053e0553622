//! Hostile input: truncation, bit flips, lying lengths, out-of-range indexes, garbage, and the
//! raw stream builders the other hostile tests share. The mutation fuzzers are in
//! `fuzz_tests.rs` and `fuzz_channel_tests.rs` (§11a of `docs/stream-format.md`).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::format::{cmd, FRAME_LEN, HEADER_LEN};
use super::tests::{sample_config, sample_stream, PS};
use super::*;

/// Reads a whole stream; returns the number of records before END. Also asserts that the
/// reader's buffer never grew beyond what the limits allow.
pub(super) fn drain(
    bytes: &[u8],
    limits: &Limits,
    expect: Expectations,
) -> Result<usize, WireError> {
    let bound = 2
        * (limits.max_section_size as usize)
            .max(limits.max_config_size as usize)
            .max(limits.max_ram_body(MAX_PS).unwrap_or(0) as usize)
        + 64;
    let mut r = StreamReader::new(bytes, limits.clone(), expect)?;
    let mut n = 0;
    loop {
        let res = r.next_record().map(|rec| matches!(rec, Record::End(_)));
        assert!(
            r.buffer_capacity() <= bound,
            "buffer grew to {} (> {bound})",
            r.buffer_capacity()
        );
        if res? {
            return Ok(n);
        }
        n += 1;
    }
}

const MAX_PS: u32 = 2 << 20;

pub(super) fn expect() -> Expectations {
    Expectations::from_config(&sample_config(), true)
}

/// Raw stream builder: header + valid CONFIG + arbitrary records + a correct END, so that the
/// checks behind the checksum are reached.
pub(super) fn raw(records: &[(u8, Vec<u8>)]) -> Vec<u8> {
    raw_v(CURRENT_VERSION, records)
}

/// [`raw`] with a given stream version in the header. From version 5 each RAM body given in
/// the version-1 layout is framed as a valid batch (header with the right generation and
/// sequence, CRC-32C trailer), so that the checks behind the batch framing are reached.
pub(super) fn raw_v(version: u32, records: &[(u8, Vec<u8>)]) -> Vec<u8> {
    if version < VERSION_BATCH_INTEGRITY {
        return raw_exact(version, records);
    }
    let (mut generation, mut seq) = (1u32, 0u64);
    let framed: Vec<(u8, Vec<u8>)> = records
        .iter()
        .map(|(k, body)| {
            if *k == RecordKind::Command as u8
                && (body.starts_with(&cmd::ITERATION_END.to_le_bytes())
                    || body == &cmd::SWITCHOVER_START.to_le_bytes())
            {
                generation += 1;
            }
            if *k != RecordKind::Ram as u8 {
                return (*k, body.clone());
            }
            seq += 1;
            (*k, batch_body(0, 0, generation, seq - 1, body))
        })
        .collect();
    raw_exact(version, &framed)
}

/// A version-5 RAM body: `header` fields, the version-1 layout `inner`, and a correct CRC-32C.
pub(super) fn batch_body(
    channel: u16,
    flags: u16,
    generation: u32,
    seq: u64,
    inner: &[u8],
) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&channel.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&generation.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(inner);
    fix_batch_crc(&mut b);
    b
}

/// Appends (or, with `b` already ending in one, replaces) the CRC-32C trailer of a version-5
/// RAM body, as the frame of its length will be.
pub(super) fn fix_batch_crc(b: &mut Vec<u8>) {
    let mut frame = vec![RecordKind::Ram as u8];
    frame.extend_from_slice(&((b.len() + 4) as u32).to_le_bytes());
    frame.extend_from_slice(b);
    let crc = crc_fast::crc32_iscsi(&frame);
    b.extend_from_slice(&crc.to_le_bytes());
}

/// Header + valid CONFIG + `records` exactly as given + a correct END (whose CRC leaves RAM
/// records out from version 5).
pub(super) fn raw_exact(version: u32, records: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    let cfg = sample_config().encode();
    let mut all = vec![(RecordKind::Config as u8, cfg)];
    all.extend_from_slice(records);
    let mut crc = crc32fast::Hasher::new();
    for (k, body) in &all {
        let mut rec = vec![*k];
        rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
        rec.extend_from_slice(body);
        if *k != RecordKind::Ram as u8 || version < VERSION_BATCH_INTEGRITY {
            crc.update(&rec);
        }
        out.extend_from_slice(&rec);
    }
    let n = out.len() as u64 - HEADER_LEN;
    out.push(RecordKind::End as u8);
    out.extend_from_slice(&12u32.to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out
}

/// The `SWITCHOVER_START` command as a raw record.
pub(super) fn switchover_start() -> (u8, Vec<u8>) {
    (
        RecordKind::Command as u8,
        cmd::SWITCHOVER_START.to_le_bytes().to_vec(),
    )
}

fn ram_body(entries: &[(u32, u16, u8, u8)], data_pages: usize) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (page, block, kind, res) in entries {
        b.extend_from_slice(&page.to_le_bytes());
        b.extend_from_slice(&block.to_le_bytes());
        b.push(*kind);
        b.push(*res);
    }
    b.extend(std::iter::repeat_n(7u8, data_pages * PS));
    b
}

pub(super) fn err_of(bytes: &[u8]) -> WireError {
    drain(bytes, &Limits::default(), expect()).expect_err("hostile stream accepted")
}

#[test]
fn raw_builder_is_valid() {
    let ok = raw(&[(
        RecordKind::Ram as u8,
        ram_body(&[(3, 1, 0, 0), (4, 0, 1, 0)], 1),
    )]);
    assert_eq!(drain(&ok, &Limits::default(), expect()).unwrap(), 1);
}

#[test]
fn truncated_at_every_offset() {
    let bytes = sample_stream();
    for n in 0..bytes.len() {
        let e = drain(&bytes[..n], &Limits::default(), expect()).expect_err("truncated accepted");
        assert!(matches!(e, WireError::Truncated { .. }), "cut at {n}: {e}");
        assert!(e.offset().is_some_and(|o| o <= n as u64), "cut at {n}: {e}");
    }
    assert!(drain(&bytes, &Limits::default(), expect()).is_ok());
}

#[test]
fn every_byte_flip_is_detected() {
    let bytes = sample_stream();
    let mut rng = StdRng::seed_from_u64(7);
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 1 << rng.random_range(0..8);
        assert!(
            drain(&b, &Limits::default(), Expectations::default()).is_err(),
            "flip at byte {i} not detected"
        );
    }
}

#[test]
fn bad_header() {
    let good = sample_stream();
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(err_of(&b), WireError::BadMagic { .. }));
    for v in [0u32, CURRENT_VERSION + 1, u32::MAX] {
        let mut b = good.clone();
        b[8..12].copy_from_slice(&v.to_le_bytes());
        let e = err_of(&b);
        assert!(
            matches!(e, WireError::UnsupportedVersion { found, .. } if found == v),
            "{e}"
        );
    }
    let mut b = good.clone();
    b[12] = 1;
    assert!(err_of(&b).to_string().contains("header flags"));
    assert!(matches!(
        err_of(b"QEVM\0\0\0\x03"),
        WireError::Truncated { .. }
    ));
}

#[test]
fn lying_lengths() {
    let good = sample_stream();
    // The CONFIG record length (right after the header) set to huge values.
    for len in [u32::MAX, 4 << 20 | 1] {
        let mut b = good.clone();
        b[17..21].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(err_of(&b), WireError::TooLarge { .. }), "{len}");
    }
    // A section that claims 4 GiB (after SWITCHOVER_START, where sections are allowed).
    let mut b = raw(&[switchover_start()]);
    let end = b.len() - 17;
    b.truncate(end);
    b.extend_from_slice(&[RecordKind::Section as u8, 0xff, 0xff, 0xff, 0xff]);
    b.extend_from_slice(&[1, b'x']);
    assert!(matches!(
        err_of(&b),
        WireError::TooLarge {
            len: 0xffff_ffff,
            ..
        }
    ));
    // A section that claims 60 MiB (below the limit) but carries 10 bytes: truncation, and the
    // buffer grows only with the data received (checked in `drain`).
    let mut b = raw(&[switchover_start()]);
    b.truncate(end);
    b.extend_from_slice(&[RecordKind::Section as u8]);
    b.extend_from_slice(&(60u32 << 20).to_le_bytes());
    b.extend_from_slice(&[0; 10]);
    assert!(matches!(err_of(&b), WireError::Truncated { .. }));
    // id length larger than the body.
    let e = err_of(&raw(&[
        switchover_start(),
        (RecordKind::Section as u8, vec![200, b'a', b'b']),
    ]));
    assert!(matches!(e, WireError::ShortBody { .. }), "{e}");
    // Empty id, invalid UTF-8.
    assert!(err_of(&raw(&[(3, vec![0, 0, 0, 0, 0, 0, 0, 0, 0])]))
        .to_string()
        .contains("empty"));
    let e = err_of(&raw(&[(3, vec![1, 0xff, 0, 0, 0, 0, 0, 0, 0, 0])]));
    assert!(e.to_string().contains("UTF-8"), "{e}");
    // RAM count over the limit / zero / larger than the body.
    let e = err_of(&raw(&[(4, ram_body(&[], 0))]));
    assert!(e.to_string().contains("page count"), "{e}");
    let mut body = ram_body(&[(0, 0, 1, 0)], 0);
    body[..4].copy_from_slice(&5000u32.to_le_bytes());
    assert!(err_of(&raw(&[(4, body)]))
        .to_string()
        .contains("page count"));
    let mut body = ram_body(&[(0, 0, 1, 0)], 0);
    body[..4].copy_from_slice(&2u32.to_le_bytes());
    assert!(matches!(
        err_of(&raw(&[(4, body)])),
        WireError::ShortBody { .. }
    ));
    // RAM body with data that does not match the table.
    let e = err_of(&raw(&[(4, ram_body(&[(0, 0, 0, 0)], 2))]));
    assert!(
        matches!(e, WireError::LengthMismatch { expected, .. } if expected == 20 + 4 + 8 + PS as u64),
        "{e}"
    );
    let e = err_of(&raw(&[(4, ram_body(&[(0, 0, 0, 0), (1, 0, 0, 0)], 1))]));
    assert!(matches!(e, WireError::LengthMismatch { .. }), "{e}");
    // Command with a trailing byte; END with a wrong length.
    let e = err_of(&raw(&[(5, vec![2, 0, 0])]));
    assert!(matches!(e, WireError::LengthMismatch { .. }), "{e}");
    let mut b = raw(&[]);
    let n = b.len();
    b[n - 16] = 13;
    assert!(matches!(err_of(&b), WireError::TooLarge { .. }));
}

#[test]
fn out_of_range_pages() {
    for (entry, needle) in [
        ((0u32, 2u16, 1u8, 0u8), "2 RAM blocks"),
        ((64, 0, 1, 0), "block has 64 pages"),
        ((16, 1, 1, 0), "block has 16 pages"),
        ((u32::MAX, 0, 1, 0), "block has 64 pages"),
        ((0, u16::MAX, 1, 0), "RAM blocks"),
        ((0, 0, 2, 0), "compressed"),
        ((0, 0, 9, 0), "unknown page kind 9"),
        ((0, 0, 1, 1), "reserved"),
    ] {
        let e = err_of(&raw(&[(4, ram_body(&[(1, 0, 1, 0), entry], 0))]));
        assert!(
            e.to_string().contains(needle),
            "{entry:?}: '{e}' lacks '{needle}'"
        );
        // The offset points at the bad entry (second entry of the first record after CONFIG).
        assert!(
            e.offset()
                .is_some_and(|o| o > HEADER_LEN + FRAME_LEN as u64),
            "{e}"
        );
    }
}

#[test]
fn unknown_and_misplaced_records() {
    let e = err_of(&raw(&[(0x09, vec![1, 2, 3])]));
    assert!(e.to_string().contains("unknown record kind 0x09"), "{e}");
    let e = err_of(&raw(&[(0x00, vec![])]));
    assert!(
        matches!(e, WireError::UnknownRecordKind { kind: 0, .. }),
        "{e}"
    );
    let e = err_of(&raw(&[(5, vec![0x99, 0])]));
    assert!(e.to_string().contains("unknown command 0x0099"), "{e}");
    let e = err_of(&raw(&[(5, vec![0x16, 0])]));
    assert!(
        matches!(e, WireError::UnsupportedCommand { cmd: 0x16, .. }),
        "{e}"
    );
    let e = err_of(&raw_v(5, &[(5, vec![0x15, 0])]));
    assert!(
        matches!(e, WireError::UnsupportedCommand { cmd: 0x15, .. }),
        "{e}"
    );
    let e = err_of(&raw(&[(1, sample_config().encode())]));
    assert!(matches!(e, WireError::DuplicateConfig { .. }), "{e}");
    // CONFIG not first.
    let mut b = raw(&[]);
    b[16] = RecordKind::Section as u8;
    assert!(matches!(err_of(&b), WireError::ConfigNotFirst { .. }));
    // A structurally bad config (page size 3000), with a correct checksum.
    let mut cfg = sample_config().encode();
    cfg[..4].copy_from_slice(&3000u32.to_le_bytes());
    let mut b = raw(&[]);
    b.splice(21..21 + cfg.len(), cfg);
    assert!(err_of(&b).to_string().contains("page_size"));
}

/// A SECTION or DEVICE_CHUNK body: `str8 id`, `u32 instance`, `u32 version`, `data`.
fn component_body(id: &str, instance: u32, data: &[u8]) -> Vec<u8> {
    let mut b = vec![id.len() as u8];
    b.extend_from_slice(id.as_bytes());
    b.extend_from_slice(&instance.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(data);
    b
}

fn section(id: &str, instance: u32, data: &[u8]) -> (u8, Vec<u8>) {
    (
        RecordKind::Section as u8,
        component_body(id, instance, data),
    )
}

fn chunk(id: &str, instance: u32, data: &[u8]) -> (u8, Vec<u8>) {
    (
        RecordKind::DeviceChunk as u8,
        component_body(id, instance, data),
    )
}

/// Stream offset of record `i` (0 = the first record after CONFIG) of a [`raw`] stream.
fn record_offset(records: &[(u8, Vec<u8>)], i: usize) -> u64 {
    let cfg = sample_config().encode().len();
    let before: usize = records[..i].iter().map(|(_, b)| FRAME_LEN + b.len()).sum();
    HEADER_LEN + (FRAME_LEN + cfg + before) as u64
}

#[test]
fn section_before_switchover_start_is_rejected_at_its_frame() {
    let recs = [chunk("state-dev", 0, b"pre-copy"), section("vcpu", 0, b"x")];
    let e = err_of(&raw(&recs));
    assert!(
        matches!(
            e,
            WireError::OutOfOrder {
                record: "section",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(e.offset(), Some(record_offset(&recs, 1)), "{e}");
    assert!(e.to_string().contains("before SWITCHOVER_START"), "{e}");
    // A SECTION that lies about its length is refused at the frame too: nothing is read.
    let mut b = raw(&[]);
    let end = b.len() - 17;
    b.truncate(end);
    b.extend_from_slice(&[RecordKind::Section as u8]);
    b.extend_from_slice(&(60u32 << 20).to_le_bytes());
    assert!(matches!(err_of(&b), WireError::OutOfOrder { .. }));
    // The same records in the right order are accepted.
    let ok = [switchover_start(), section("vcpu", 0, b"x")];
    assert_eq!(drain(&raw(&ok), &Limits::default(), expect()).unwrap(), 2);
}

#[test]
fn duplicate_section_is_rejected_on_arrival() {
    let recs = [
        switchover_start(),
        section("vcpu", 0, b"a"),
        section("vcpu", 1, b"b"),
        section("serial", 0, b""),
        section("vcpu", 1, b"again"),
        // Never reached: the duplicate fails first.
        section("vcpu", 2, b"c"),
    ];
    let e = err_of(&raw(&recs));
    assert!(
        matches!(&e, WireError::DuplicateSection { id, instance: 1, offset }
            if id == "vcpu" && *offset == record_offset(&recs, 4)),
        "{e}"
    );
    assert!(e.to_string().contains("'vcpu' instance 1"), "{e}");
}

#[test]
fn section_count_is_capped() {
    let mut recs = vec![switchover_start()];
    recs.extend((0..4).map(|i| section("vcpu", i, b"s")));
    let three = Limits {
        max_sections: 3,
        ..Limits::default()
    };
    let e = drain(&raw(&recs), &three, expect()).expect_err("4 sections over a cap of 3");
    assert!(
        matches!(e, WireError::TooLarge { what: "section count", len: 4, limit: 3, offset }
            if offset == record_offset(&recs, 4)),
        "{e}"
    );
    recs.pop();
    assert_eq!(drain(&raw(&recs), &three, expect()).unwrap(), 4);
}

#[test]
fn section_bytes_are_capped_before_the_body_is_read() {
    let small = Limits {
        max_section_bytes_total: 100,
        ..Limits::default()
    };
    // Two sections of 50-byte bodies fit exactly; a third byte does not.
    let body = |n: usize| vec![7u8; n - (1 + 4 + 8)];
    let fit = [
        switchover_start(),
        section("vcpu", 0, &body(50)),
        section("vcpu", 1, &body(50)),
    ];
    assert_eq!(drain(&raw(&fit), &small, expect()).unwrap(), 3);
    let over = [
        switchover_start(),
        section("vcpu", 0, &body(50)),
        section("vcpu", 1, &body(51)),
    ];
    let e = drain(&raw(&over), &small, expect()).expect_err("101 bytes over 100");
    assert!(
        matches!(
            e,
            WireError::TooLarge {
                what: "total section bytes",
                len: 101,
                limit: 100,
                ..
            }
        ),
        "{e}"
    );
    // A frame that claims more than the total allows fails before its (absent) body is read.
    let mut b = raw(&[switchover_start(), section("vcpu", 0, &body(50))]);
    let end = b.len() - 17;
    b.truncate(end);
    b.extend_from_slice(&[RecordKind::Section as u8]);
    b.extend_from_slice(&(1u32 << 20).to_le_bytes());
    let e = drain(&b, &small, expect()).expect_err("over the total");
    assert!(
        matches!(
            e,
            WireError::TooLarge {
                what: "total section bytes",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn switchover_start_only_once() {
    let recs = [switchover_start(), switchover_start()];
    let e = err_of(&raw(&recs));
    assert!(
        matches!(e, WireError::OutOfOrder { record: "command", offset, .. }
            if offset == record_offset(&recs, 1)),
        "{e}"
    );
}

#[test]
fn device_chunks_are_not_kept_and_not_after_their_section() {
    // Many chunks, before and after SWITCHOVER_START: accepted, and the reader's buffer stays
    // one record (`drain` asserts the bound after every record).
    let data = vec![0x5au8; 64 << 10];
    let mut recs: Vec<_> = (0..64).map(|_| chunk("state-dev", 0, &data)).collect();
    recs.push(switchover_start());
    recs.extend((0..8).map(|_| chunk("state-dev", 0, &data)));
    recs.push(section("state-dev", 0, b"final"));
    let limits = Limits {
        max_section_size: 128 << 10,
        ..Limits::default()
    };
    assert_eq!(drain(&raw(&recs), &limits, expect()).unwrap(), recs.len());
    // Pre-copy data after that device's final state is a protocol error.
    recs.push(chunk("state-dev", 0, b"late"));
    let e = drain(&raw(&recs), &limits, expect()).expect_err("chunk after its section");
    assert!(
        matches!(
            e,
            WireError::OutOfOrder {
                record: "device-chunk",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("after its final SECTION"), "{e}");
    // Another instance's chunk is still fine.
    recs.pop();
    recs.push(chunk("state-dev", 1, b"other instance"));
    assert!(drain(&raw(&recs), &limits, expect()).is_ok());
}

#[test]
fn capability_flags_beyond_the_known_bits_are_refused() {
    let caps = |flags: u32| {
        let mut b = cmd::CAPABILITIES.to_le_bytes().to_vec();
        b.extend_from_slice(&flags.to_le_bytes());
        (RecordKind::Command as u8, b)
    };
    for flags in [0, 1, 2, 3] {
        assert!(drain(&raw(&[caps(flags)]), &Limits::default(), expect()).is_ok());
    }
    let e = err_of(&raw(&[caps(4)]));
    assert!(e.to_string().contains("reserved bits set: 0x4"), "{e}");
}

#[test]
fn checksum_and_total_checked() {
    let mut b = raw(&[(5, vec![2, 0])]);
    let n = b.len();
    b[n - 12] ^= 0xff; // crc byte
    assert!(matches!(err_of(&b), WireError::ChecksumMismatch { .. }));
    let mut b = raw(&[(5, vec![2, 0])]);
    b[n - 8] ^= 1; // total_bytes
    assert!(matches!(err_of(&b), WireError::LengthMismatch { .. }));
}

#[test]
fn random_garbage() {
    let mut rng = StdRng::seed_from_u64(0x7e57);
    for i in 0..2000 {
        let len = rng.random_range(0..2048);
        let mut b: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if i % 2 == 0 && b.len() >= 16 {
            b[..8].copy_from_slice(&MAGIC);
            b[8..16].copy_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        }
        assert!(drain(&b, &Limits::default(), Expectations::default()).is_err());
        let _ = analyze(&b[..], &Limits::default());
    }
}

/// Rewrites a trailing END record's CRC and byte count (and, in a version-5 stream whose
/// frames still lead exactly to END, every RAM batch's CRC-32C) so that mutations reach the
/// semantic checks instead of stopping at a checksum.
pub(super) fn fix_end(b: &mut [u8]) {
    let n = b.len();
    if n < HEADER_LEN as usize + 17 || b[n - 17] != RecordKind::End as u8 {
        return;
    }
    let end_at = n - 17;
    let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    let mut crc = crc32fast::Hasher::new();
    let mut at = HEADER_LEN as usize;
    let framed = version >= VERSION_BATCH_INTEGRITY
        && loop {
            if at == end_at {
                break true;
            }
            if at + FRAME_LEN > end_at {
                break false;
            }
            let len = u32::from_le_bytes([b[at + 1], b[at + 2], b[at + 3], b[at + 4]]) as usize;
            let Some(next) = (at + FRAME_LEN).checked_add(len).filter(|e| *e <= end_at) else {
                break false;
            };
            if b[at] == RecordKind::Ram as u8 && len >= 4 {
                let c = crc_fast::crc32_iscsi(&b[at..next - 4]);
                b[next - 4..next].copy_from_slice(&c.to_le_bytes());
            } else {
                crc.update(&b[at..next]);
            }
            at = next;
        };
    let crc = if framed {
        crc.finalize()
    } else {
        crc32fast::hash(&b[HEADER_LEN as usize..end_at])
    };
    let total = (end_at - HEADER_LEN as usize) as u64;
    b[n - 12..n - 8].copy_from_slice(&crc.to_le_bytes());
    b[n - 8..].copy_from_slice(&total.to_le_bytes());
}
