//! Version 5's self-checking RAM batches (`docs/stream-format.md` §5.1) against hostile input:
//! a flipped byte in each field, wrong fields behind a valid checksum (a hostile writer),
//! truncated, oversized, duplicated, lost and reordered batches, and a batch moved across a
//! sync point. Every refusal must come at the batch itself, before any of its pages is handed
//! out, and name it.

use super::format::{FRAME_LEN, HEADER_LEN};
use super::hostile_tests::{batch_body, drain, expect, fix_end, raw, raw_exact, raw_v};
use super::tests::{page, sample_config, PS};
use super::*;

/// A record for the raw stream builders: kind and body.
type RawRecord = (u8, Vec<u8>);

/// One record of a stream: frame offset, kind, body length.
#[derive(Clone, Copy, Debug)]
struct At {
    offset: usize,
    kind: u8,
    len: usize,
}

impl At {
    fn end(&self) -> usize {
        self.offset + FRAME_LEN + self.len
    }
}

/// The records of a well-formed stream, END included.
fn records(b: &[u8]) -> Vec<At> {
    let mut out = Vec::new();
    let mut at = HEADER_LEN as usize;
    while at < b.len() {
        let len = u32::from_le_bytes([b[at + 1], b[at + 2], b[at + 3], b[at + 4]]) as usize;
        out.push(At {
            offset: at,
            kind: b[at],
            len,
        });
        at += FRAME_LEN + len;
    }
    out
}

fn ram_records(b: &[u8]) -> Vec<At> {
    records(b)
        .into_iter()
        .filter(|r| r.kind == RecordKind::Ram as u8)
        .collect()
}

/// Pass 1 in three batches (2, 2 and 1 pages: one zero), `ITERATION_END`, a batch of pass 2,
/// `SWITCHOVER_START`, a final batch, a SECTION, END: written by the real writer, version 5.
fn stream() -> Vec<u8> {
    let limits = Limits {
        max_pages_per_batch: 2,
        ..Limits::default()
    };
    let mut w = StreamWriter::with_version(
        Vec::new(),
        &sample_config(),
        &limits,
        VERSION_BATCH_INTEGRITY,
    )
    .unwrap();
    let (a, b, c) = (page(1), page(2), page(3));
    w.write_ram_batch(&[
        RamPage::normal(0, 0, &a),
        RamPage::normal(0, 1, &b),
        RamPage::zero(0, 2),
        RamPage::normal(0, 3, &c),
        RamPage::normal(1, 4, &a),
    ])
    .unwrap();
    w.write_command(Command::IterationEnd { pass: 1 }).unwrap();
    w.write_ram_batch(&[RamPage::normal(0, 1, &c)]).unwrap();
    w.write_command(Command::SwitchoverStart).unwrap();
    w.write_ram_batch(&[RamPage::normal(0, 0, &b)]).unwrap();
    w.write_section("vcpu", 0, 1, b"regs").unwrap();
    w.finish().unwrap()
}

/// Reads `b`; returns the error and how many pages were handed out before it.
fn read_until_error(b: &[u8]) -> (WireError, usize) {
    let mut r = StreamReader::new(b, Limits::default(), expect()).unwrap();
    let mut pages = 0;
    loop {
        match r.next_record() {
            Ok(Record::End(_)) => panic!("corrupt stream accepted"),
            Ok(Record::Ram(batch)) => pages += batch.pages().count(),
            Ok(_) => {}
            Err(e) => return (e, pages),
        }
    }
}

#[test]
fn the_writer_numbers_batches_by_generation_and_sequence() {
    let b = stream();
    let mut r = StreamReader::new(&b[..], Limits::default(), expect()).unwrap();
    assert_eq!(r.header().version, VERSION_BATCH_INTEGRITY);
    let mut seen = Vec::new();
    loop {
        match r.next_record().unwrap() {
            Record::Ram(batch) => seen.push(batch.header().unwrap()),
            Record::End(_) => break,
            _ => {}
        }
    }
    let gs: Vec<(u16, u32, u64)> = seen
        .iter()
        .map(|h| (h.channel, h.generation, h.seq))
        .collect();
    assert_eq!(gs, [(0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 3), (0, 3, 4)]);
}

/// A flipped bit anywhere in a batch's body (header fields, count, table, page data, the
/// checksum itself) is refused at that batch by its checksum, naming the batch's sequence and
/// frame offset, and none of its pages is handed out.
#[test]
fn a_flipped_byte_in_any_field_of_a_batch_is_refused_at_that_batch() {
    let good = stream();
    let rams = ram_records(&good);
    let target = rams[1];
    let body = target.offset + FRAME_LEN;
    // Pages handed out before the target batch: the first batch's 2.
    for i in body..target.end() {
        for bit in [0, 7] {
            let mut b = good.clone();
            b[i] ^= 1 << bit;
            let (e, pages) = read_until_error(&b);
            match e {
                WireError::BatchChecksumMismatch {
                    channel: 0,
                    seq: 1,
                    offset,
                    ..
                } => assert_eq!(offset, target.offset as u64, "byte {i}"),
                other => panic!("flip at byte {i} (bit {bit}): {other}"),
            }
            assert_eq!(
                pages, 2,
                "byte {i}: pages of the corrupt batch were handed out"
            );
        }
    }
    let mut b = good.clone();
    b[body + 40] ^= 0x10;
    let msg = read_until_error(&b).0.to_string();
    assert!(
        msg.contains("RAM batch 1 on channel 0")
            && msg.contains(&format!("at byte {}", target.offset))
            && msg.contains("checksum mismatch"),
        "{msg}"
    );
}

/// A flip in the frame itself (kind or length) is refused at that record too: by its
/// checksum, which covers the frame, or by the frame checks, never later.
#[test]
fn a_flipped_frame_byte_is_refused_at_that_record() {
    let good = stream();
    let target = ram_records(&good)[1];
    for i in target.offset..target.offset + FRAME_LEN {
        for bit in 0..8 {
            let mut b = good.clone();
            b[i] ^= 1 << bit;
            let (e, pages) = read_until_error(&b);
            let at = e.offset().unwrap_or(0);
            // A longer length may also run the body off the end of this short stream.
            let truncated = matches!(e, WireError::Truncated { .. });
            assert!(
                truncated || (target.offset as u64..=target.end() as u64).contains(&at),
                "flip at byte {i} bit {bit}: {e} (record at {})",
                target.offset
            );
            assert_eq!(pages, 2, "flip at byte {i} bit {bit}: {e}");
        }
    }
}

/// A hostile writer that recomputes the checksum: every field is still checked.
#[test]
fn wrong_fields_behind_a_valid_checksum_are_refused() {
    let inner = |page: u32| {
        let mut v = 1u32.to_le_bytes().to_vec();
        v.extend_from_slice(&page.to_le_bytes());
        v.extend_from_slice(&[0, 0, 1, 0]); // block 0, ZERO
        v
    };
    let ram = |channel, flags, generation, seq| {
        (
            RecordKind::Ram as u8,
            batch_body(channel, flags, generation, seq, &inner(5)),
        )
    };
    let iteration_end = (
        RecordKind::Command as u8,
        [&cmd::ITERATION_END.to_le_bytes()[..], &1u64.to_le_bytes()].concat(),
    );
    let cases: Vec<(Vec<RawRecord>, &str)> = vec![
        (vec![ram(1, 0, 1, 0)], "batch channel"),
        (vec![ram(0, 4, 1, 0)], "batch flags"),
        (
            vec![ram(0, 0, 2, 0)],
            "generation 2, the stream is at generation 1",
        ),
        (
            vec![ram(0, 0, 0, 0)],
            "generation 0, the stream is at generation 1",
        ),
        (
            vec![ram(0, 0, 1, 0), iteration_end.clone(), ram(0, 0, 1, 1)],
            "a batch from before a sync point",
        ),
        (
            vec![ram(0, 0, 1, 0), ram(0, 0, 2, 1)],
            "a batch from after a sync point",
        ),
        (
            vec![ram(0, 0, 1, 1)],
            "sequence 1, expected 0: 1 batch(es) lost",
        ),
        (
            vec![ram(0, 0, 1, 0), ram(0, 0, 1, 0)],
            "sequence 0, expected 1: a duplicate",
        ),
        (
            vec![ram(0, 0, 1, 0), iteration_end, ram(0, 0, 2, 5)],
            "sequence 5, expected 1: 4 batch(es) lost",
        ),
    ];
    for (recs, needle) in cases {
        let e = drain(
            &raw_exact(VERSION_BATCH_INTEGRITY, &recs),
            &Limits::default(),
            expect(),
        )
        .expect_err(needle);
        assert!(e.to_string().contains(needle), "'{e}' lacks '{needle}'");
        // Named at the last record's frame (or a field inside it).
        let last = raw_exact(VERSION_BATCH_INTEGRITY, &recs[..recs.len() - 1]).len() - 17;
        assert!(
            e.offset().is_some_and(|o| o >= last as u64),
            "{e}: not at the last record (byte {last})"
        );
    }
    // The version-1 layout checks run behind the framing: count over the limit, zero, a table
    // longer than the body, data that does not match the table.
    let mut over = inner(5);
    over[..4].copy_from_slice(&5000u32.to_le_bytes());
    let mut zero = inner(5);
    zero[..4].copy_from_slice(&0u32.to_le_bytes());
    let mut long = inner(5);
    long[..4].copy_from_slice(&2u32.to_le_bytes());
    let mut data = inner(5);
    data[10] = 0; // NORMAL, but no data follows
    for (body, needle) in [
        (over, "page count"),
        (zero, "page count"),
        (long, "missing page table"),
        (data, "length 32 but its contents need 4128"),
    ] {
        let e = drain(
            &raw_exact(
                VERSION_BATCH_INTEGRITY,
                &[(RecordKind::Ram as u8, batch_body(0, 0, 1, 0, &body))],
            ),
            &Limits::default(),
            expect(),
        )
        .expect_err(needle);
        assert!(e.to_string().contains(needle), "'{e}' lacks '{needle}'");
    }
}

/// Whole batches duplicated, lost, swapped or moved across a sync point, with every checksum
/// (the batches' and END's) correct: the sequence and the generation catch them.
#[test]
fn duplicated_lost_and_reordered_batches_are_refused() {
    let good = stream();
    let rams = ram_records(&good);
    let bytes = |r: At| good[r.offset..r.end()].to_vec();
    let rebuild = |order: &[Vec<u8>]| {
        let mut b = good[..rams[0].offset].to_vec();
        for r in order {
            b.extend_from_slice(r);
        }
        b
    };
    // The stream from the first batch up to END, as records.
    let tail: Vec<At> = records(&good)
        .into_iter()
        .filter(|r| r.offset >= rams[0].offset)
        .collect();
    let recs: Vec<Vec<u8>> = tail.iter().map(|r| bytes(*r)).collect();
    // recs: [ram0, ram1, ram2, ITERATION_END, ram3, SWITCHOVER_START, ram4, SECTION, END]
    let case = |order: Vec<Vec<u8>>, needle: &str| {
        let mut b = rebuild(&order);
        fix_end(&mut b);
        let (e, _) = read_until_error(&b);
        assert!(e.to_string().contains(needle), "'{e}' lacks '{needle}'");
        e
    };
    let r = &recs;
    let e = case(
        vec![
            r[0].clone(),
            r[1].clone(),
            r[1].clone(),
            r[2].clone(),
            r[3].clone(),
            r[4].clone(),
            r[5].clone(),
            r[6].clone(),
            r[7].clone(),
            r[8].clone(),
        ],
        "sequence 1, expected 2: a duplicate or replayed batch",
    );
    assert_eq!(e.offset(), Some(rams[2].offset as u64), "at the copy");
    case(
        vec![
            r[0].clone(),
            r[2].clone(),
            r[1].clone(),
            r[3].clone(),
            r[4].clone(),
            r[5].clone(),
            r[6].clone(),
            r[7].clone(),
            r[8].clone(),
        ],
        "sequence 2, expected 1: 1 batch(es) lost",
    );
    case(
        vec![
            r[0].clone(),
            r[2].clone(),
            r[3].clone(),
            r[4].clone(),
            r[5].clone(),
            r[6].clone(),
            r[7].clone(),
            r[8].clone(),
        ],
        "1 batch(es) lost",
    );
    // A pass-1 batch held back past the sync point (what a slow channel would do).
    case(
        vec![
            r[0].clone(),
            r[1].clone(),
            r[3].clone(),
            r[2].clone(),
            r[4].clone(),
            r[5].clone(),
            r[6].clone(),
            r[7].clone(),
            r[8].clone(),
        ],
        "generation 1, the stream is at generation 2: a batch from before a sync point",
    );
    // The last batch lost: no batch follows to notice, END's byte count does.
    let mut b = rebuild(&[
        r[0].clone(),
        r[1].clone(),
        r[2].clone(),
        r[3].clone(),
        r[4].clone(),
        r[5].clone(),
        r[7].clone(),
        r[8].clone(),
    ]);
    b.truncate(b.len() - 17);
    let mut with_old_end = b.clone();
    with_old_end.extend_from_slice(&good[good.len() - 17..]);
    let (e, _) = read_until_error(&with_old_end);
    assert!(
        matches!(e, WireError::LengthMismatch { what, .. } if what.contains("total_bytes")),
        "{e}"
    );
}

#[test]
fn truncated_and_oversized_batches() {
    let good = stream();
    let target = ram_records(&good)[1];
    for cut in [
        target.offset + 3,
        target.offset + FRAME_LEN + 10,
        target.end() - 1,
    ] {
        let (e, _) = read_until_error(&good[..cut]);
        assert!(
            matches!(e, WireError::Truncated { .. }),
            "cut at {cut}: {e}"
        );
    }
    // A frame claiming more than the largest batch is refused before its body is read.
    let max = Limits::default().max_ram_body(PS as u32).unwrap();
    let mut b = good[..target.offset].to_vec();
    b.push(RecordKind::Ram as u8);
    b.extend_from_slice(&(max as u32 + 1).to_le_bytes());
    let (e, _) = read_until_error(&b);
    assert!(
        matches!(e, WireError::TooLarge { len, .. } if len == max + 1),
        "{e}"
    );
    // One too short to hold the header, a count and the checksum: refused at the frame.
    let mut b = good[..target.offset].to_vec();
    b.push(RecordKind::Ram as u8);
    b.extend_from_slice(&23u32.to_le_bytes());
    b.extend_from_slice(&[0; 23]);
    let (e, _) = read_until_error(&b);
    assert!(
        matches!(e, WireError::LengthMismatch { offset, .. } if offset == target.offset as u64 + 1),
        "{e}"
    );
}

/// END leaves RAM batches out of its CRC from version 5 (they carry their own); its byte count
/// still covers them. Older versions keep the old layout and rule.
#[test]
fn end_covers_what_is_not_in_a_batch() {
    let good = stream();
    let target = ram_records(&good)[0];
    // A page byte changed and the batch's own CRC recomputed: END does not look at it.
    let mut b = good.clone();
    b[target.end() - 8] ^= 0xff;
    let c = crc_fast::crc32_iscsi(&b[target.offset..target.end() - 4]);
    b[target.end() - 4..target.end()].copy_from_slice(&c.to_le_bytes());
    assert!(drain(&b, &Limits::default(), expect()).is_ok());
    // A byte of a SECTION is END's to catch.
    let section = records(&good)
        .into_iter()
        .find(|r| r.kind == RecordKind::Section as u8)
        .unwrap();
    let mut b = good.clone();
    b[section.end() - 1] ^= 1;
    let (e, _) = read_until_error(&b);
    assert!(matches!(e, WireError::ChecksumMismatch { .. }), "{e}");
    // Versions 1..=4 are read with the version-1 RAM layout.
    let v1_ram = {
        let mut v = 1u32.to_le_bytes().to_vec();
        v.extend_from_slice(&[5, 0, 0, 0, 0, 0, 1, 0]);
        v
    };
    for version in 1..VERSION_BATCH_INTEGRITY {
        let b = raw_v(version, &[(RecordKind::Ram as u8, v1_ram.clone())]);
        assert_eq!(
            drain(&b, &Limits::default(), expect()).unwrap(),
            1,
            "v{version}"
        );
    }
    // And a version-5 reader refuses that layout in a version-5 stream, at the batch.
    let e = drain(
        &raw_exact(VERSION_BATCH_INTEGRITY, &[(RecordKind::Ram as u8, v1_ram)]),
        &Limits::default(),
        expect(),
    )
    .unwrap_err();
    assert!(matches!(e, WireError::LengthMismatch { .. }), "{e}");
    assert!(drain(&raw(&[]), &Limits::default(), expect()).is_ok());
}

/// The bytes are those of the spec (§5.1): offsets of every field, and the checksum is
/// CRC-32C (the catalogue's check value) over the frame and the body before the trailer.
#[test]
fn the_layout_is_the_specified_one() {
    let mut crc = super::ram_batch::BatchCrc::new();
    crc.update(b"1234");
    crc.update(b"56789");
    assert_eq!(crc.value(), 0xe306_9283, "CRC-32C check value");
    let good = stream();
    let r = ram_records(&good)[3]; // generation 2, seq 3: one normal page
    let b = &good[r.offset..r.end()];
    let body = &b[FRAME_LEN..];
    assert_eq!(r.len, 16 + 4 + 8 + PS + 4);
    assert_eq!(&body[0..2], &0u16.to_le_bytes(), "channel");
    assert_eq!(&body[2..4], &0u16.to_le_bytes(), "flags");
    assert_eq!(&body[4..8], &2u32.to_le_bytes(), "generation");
    assert_eq!(&body[8..16], &3u64.to_le_bytes(), "seq");
    assert_eq!(&body[16..20], &1u32.to_le_bytes(), "count");
    assert_eq!(&body[20..24], &1u32.to_le_bytes(), "page 1");
    assert_eq!(&body[24..28], &[0, 0, 0, 0], "block 0, NORMAL, reserved");
    assert_eq!(&body[28..28 + PS], &page(3)[..], "page data");
    let crc = crc_fast::crc32_iscsi(&b[..b.len() - 4]);
    assert_eq!(&b[b.len() - 4..], &crc.to_le_bytes(), "trailer");
}
