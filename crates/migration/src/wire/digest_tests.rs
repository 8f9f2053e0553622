//! RAM_DIGEST (§7a): round trip, and every placement and shape rule on hostile input.

use super::format::cmd;
use super::hostile_tests::{drain, expect, raw_v, switchover_start};
use super::tests::sample_config;
use super::*;
use crate::digest::{chunk_count, RamDigest, DEFAULT_CHUNK_SHIFT};

/// A digest shaped for `sample_config` (64 + 16 pages) with `shift`.
fn digest(shift: u32) -> RamDigest {
    RamDigest {
        chunk_shift: shift,
        blocks: sample_config()
            .ram_blocks
            .iter()
            .map(|b| {
                (0..chunk_count(b.size, shift))
                    .map(|i| i * 31 + 7)
                    .collect()
            })
            .collect(),
    }
}

fn body(d: &RamDigest) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&d.chunk_shift.to_le_bytes());
    for x in d.blocks.iter().flatten() {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

fn rec(d: &RamDigest) -> (u8, Vec<u8>) {
    (RecordKind::RamDigest as u8, body(d))
}

fn err(bytes: &[u8]) -> String {
    drain(bytes, &Limits::default(), expect())
        .expect_err("must be refused")
        .to_string()
}

#[test]
fn written_and_read_back() {
    let cfg = sample_config();
    let d = digest(14);
    let mut w =
        StreamWriter::with_version(Vec::new(), &cfg, &Limits::default(), VERSION_RAM_DIGEST)
            .unwrap();
    w.write_command(Command::Capabilities {
        switchover_ack: false,
        validate_uuid: false,
        ram_digest: true,
        postcopy_ram: false,
        postcopy_preempt: false,
        multifd: false,
    })
    .unwrap();
    w.write_command(Command::SwitchoverStart).unwrap();
    w.write_ram_digest(&d).unwrap();
    let bytes = w.finish().unwrap();
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 2);
    let mut r = StreamReader::new(&bytes[..], Limits::default(), expect()).unwrap();
    let mut got = None;
    loop {
        match r.next_record().unwrap() {
            Record::Command(Command::Capabilities { ram_digest, .. }) => assert!(ram_digest),
            Record::RamDigest(x) => got = Some(x),
            Record::End(_) => break,
            _ => {}
        }
    }
    assert_eq!(got, Some(d));
}

#[test]
fn a_writer_writes_version_1_unless_asked_and_refuses_v2_records_in_it() {
    let cfg = sample_config();
    let mut w = StreamWriter::new(Vec::new(), &cfg).unwrap();
    let e = w
        .write_ram_digest(&digest(DEFAULT_CHUNK_SHIFT))
        .unwrap_err();
    assert!(e.to_string().contains("needs stream version 2"), "{e}");
    let e = w
        .write_command(Command::Capabilities {
            switchover_ack: false,
            validate_uuid: false,
            ram_digest: true,
            postcopy_ram: false,
            postcopy_preempt: false,
            multifd: false,
        })
        .unwrap_err();
    assert!(e.to_string().contains("needs stream version 2"), "{e}");
    let bytes = StreamWriter::new(Vec::new(), &cfg)
        .unwrap()
        .finish()
        .unwrap();
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1);
    // The wrong shape for the stream's blocks is the caller's bug, refused before writing.
    let mut w = StreamWriter::with_version(Vec::new(), &cfg, &Limits::default(), 2).unwrap();
    let mut bad = digest(13);
    bad.blocks[1].pop();
    assert!(w.write_ram_digest(&bad).is_err());
    assert!(
        StreamWriter::with_version(Vec::new(), &cfg, &Limits::default(), CURRENT_VERSION + 1)
            .is_err()
    );
}

#[test]
fn a_version_1_stream_knows_neither_the_record_nor_the_capability_bit() {
    let e = err(&raw_v(1, &[switchover_start(), rec(&digest(13))]));
    assert!(
        e.contains("unknown record kind") || e.contains("0x07") || e.contains("7"),
        "{e}"
    );
    let caps = (
        RecordKind::Command as u8,
        [
            &cmd::CAPABILITIES.to_le_bytes()[..],
            &cmd::CAP_RAM_DIGEST.to_le_bytes(),
        ]
        .concat(),
    );
    let e = err(&raw_v(1, std::slice::from_ref(&caps)));
    assert!(e.contains("reserved bits set: 0x8"), "{e}");
    assert_eq!(
        drain(&raw_v(2, &[caps]), &Limits::default(), expect()).unwrap(),
        1
    );
}

#[test]
fn placement_rules() {
    let d = rec(&digest(13));
    // Accepted: after SWITCHOVER_START, right before END.
    assert_eq!(
        drain(
            &raw_v(2, &[switchover_start(), d.clone()]),
            &Limits::default(),
            expect()
        )
        .unwrap(),
        2
    );
    let e = err(&raw_v(2, std::slice::from_ref(&d)));
    assert!(e.contains("before SWITCHOVER_START"), "{e}");
    let e = err(&raw_v(2, &[switchover_start(), d.clone(), d.clone()]));
    assert!(e.contains("after RAM_DIGEST"), "{e}");
    let ping = (
        RecordKind::Command as u8,
        [&cmd::PING.to_le_bytes()[..], &7u32.to_le_bytes()].concat(),
    );
    let e = err(&raw_v(2, &[switchover_start(), d, ping]));
    assert!(e.contains("after RAM_DIGEST"), "{e}");
}

#[test]
fn shape_rules() {
    let good = digest(13);
    // One digest short.
    let mut b = body(&good);
    b.truncate(b.len() - 8);
    let e = err(&raw_v(2, &[switchover_start(), (7, b)]));
    assert!(e.contains("ram-digest record"), "{e}");
    // Chunk smaller than a page, or larger than 1 GiB.
    for shift in [11u32, 31] {
        let mut b = body(&good);
        b[4..8].copy_from_slice(&shift.to_le_bytes());
        let e = err(&raw_v(2, &[switchover_start(), (7, b)]));
        assert!(e.contains("chunk shift"), "{shift}: {e}");
    }
    // Unknown algorithm, reserved field.
    let mut b = body(&good);
    b[0] = 2;
    assert!(err(&raw_v(2, &[switchover_start(), (7, b)])).contains("digest algorithm"));
    let mut b = body(&good);
    b[2] = 1;
    assert!(err(&raw_v(2, &[switchover_start(), (7, b)])).contains("reserved"));
    // Over the limit: refused from the frame.
    let small = Limits {
        max_digest_size: 16,
        ..Limits::default()
    };
    let e = drain(
        &raw_v(2, &[switchover_start(), rec(&good)]),
        &small,
        expect(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("ram-digest"), "{e}");
}
