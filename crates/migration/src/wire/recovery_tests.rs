//! Post-copy recovery (`docs/stream-format.md` §13.6, version 4): the recovery channel's
//! order rules in the reader, and the return-path `RECV_BITMAP` / `RESUME_ACK` decoder, with
//! hostile input.

use super::format::cmd;
use super::hostile_tests::{expect, raw, raw_v};
use super::tests::{page, sample_config};
use super::*;

fn command(n: u16, payload: &[u8]) -> (u8, Vec<u8>) {
    let mut b = n.to_le_bytes().to_vec();
    b.extend_from_slice(payload);
    (RecordKind::Command as u8, b)
}

fn open_rp() -> (u8, Vec<u8>) {
    command(cmd::OPEN_RETURN_PATH, &[])
}

fn recv_bitmap(block: u16) -> (u8, Vec<u8>) {
    let mut p = block.to_le_bytes().to_vec();
    p.extend_from_slice(&0u16.to_le_bytes());
    command(cmd::RECV_BITMAP, &p)
}

fn resume() -> (u8, Vec<u8>) {
    command(cmd::POSTCOPY_RESUME, &[])
}

/// Reads a recovery channel to its END; the number of records before it.
fn drain_recovery(bytes: &[u8]) -> Result<usize, WireError> {
    let mut r = StreamReader::recovery(bytes, Limits::default(), expect())?;
    let mut n = 0;
    loop {
        if matches!(r.next_record()?, Record::End(_)) {
            return Ok(n);
        }
        n += 1;
    }
}

fn recovery_err(bytes: &[u8]) -> WireError {
    drain_recovery(bytes).expect_err("hostile recovery channel accepted")
}

fn handshake() -> Vec<(u8, Vec<u8>)> {
    vec![open_rp(), recv_bitmap(0), recv_bitmap(1), resume()]
}

#[test]
fn a_written_recovery_channel_round_trips() {
    let cfg = sample_config();
    let mut w =
        StreamWriter::with_version(Vec::new(), &cfg, &Limits::default(), VERSION_RECOVERY).unwrap();
    w.write_command(Command::OpenReturnPath).unwrap();
    w.write_command(Command::Ping { seq: 7 }).unwrap();
    w.write_command(Command::RecvBitmap { block: 0 }).unwrap();
    w.write_command(Command::RecvBitmap { block: 1 }).unwrap();
    w.write_command(Command::PostcopyResume).unwrap();
    let p = page(3);
    w.write_ram_batch(&[RamPage::normal(0, 5, &p)]).unwrap();
    let bytes = w.finish().unwrap();
    let mut r = StreamReader::recovery(&bytes[..], Limits::default(), expect()).unwrap();
    let mut names = Vec::new();
    loop {
        match r.next_record().unwrap() {
            Record::Command(c) => names.push(c.name()),
            Record::Ram(_) => names.push("ram"),
            Record::End(_) => break,
            _ => panic!("unexpected record"),
        }
    }
    assert_eq!(
        names,
        [
            "open-return-path",
            "ping",
            "recv-bitmap",
            "recv-bitmap",
            "postcopy-resume",
            "ram"
        ]
    );
    // A version-3 writer cannot write them.
    let mut w3 =
        StreamWriter::with_version(Vec::new(), &cfg, &Limits::default(), VERSION_POSTCOPY).unwrap();
    assert!(w3.write_command(Command::PostcopyResume).is_err());
    assert!(w3.write_command(Command::RecvBitmap { block: 0 }).is_err());
}

#[test]
fn a_raw_recovery_channel_is_accepted_and_ram_follows_resume() {
    let mut recs = handshake();
    let mut ram = 1u32.to_le_bytes().to_vec();
    ram.extend_from_slice(&5u32.to_le_bytes());
    ram.extend_from_slice(&0u16.to_le_bytes());
    ram.extend_from_slice(&[format::page_kind::ZERO, 0]);
    recs.push((RecordKind::Ram as u8, ram));
    assert_eq!(drain_recovery(&raw(&recs)).unwrap(), 5);
}

#[test]
fn a_recovery_channel_needs_version_4() {
    let e = recovery_err(&raw_v(VERSION_POSTCOPY, &handshake()));
    assert!(e.to_string().contains("needs stream version 4"), "{e}");
    // And a version-3 reader's view: the commands do not exist there.
    let e = recovery_err(&raw_v(VERSION_POSTCOPY, &[]));
    assert!(matches!(e, WireError::Invalid { .. }), "{e}");
}

#[test]
fn nothing_but_the_handshake_before_resume() {
    // RAM, a SECTION-like record, or END before POSTCOPY_RESUME.
    let mut ram = 1u32.to_le_bytes().to_vec();
    ram.extend_from_slice(&5u32.to_le_bytes());
    ram.extend_from_slice(&0u16.to_le_bytes());
    ram.extend_from_slice(&[format::page_kind::ZERO, 0]);
    for recs in [
        vec![open_rp(), (RecordKind::Ram as u8, ram.clone())],
        vec![open_rp(), recv_bitmap(0), recv_bitmap(1)],
        vec![command(cmd::SWITCHOVER_START, &[])],
        vec![recv_bitmap(0)],
    ] {
        let e = recovery_err(&raw(&recs));
        assert!(matches!(e, WireError::OutOfOrder { .. }), "{e}");
    }
}

#[test]
fn bitmaps_in_block_order_each_once_then_resume() {
    for recs in [
        vec![open_rp(), recv_bitmap(1)],
        vec![open_rp(), recv_bitmap(0), recv_bitmap(0)],
        vec![open_rp(), recv_bitmap(0), resume()],
        vec![open_rp(), open_rp()],
        vec![
            open_rp(),
            recv_bitmap(0),
            recv_bitmap(1),
            resume(),
            resume(),
        ],
    ] {
        let e = recovery_err(&raw(&recs));
        assert!(matches!(e, WireError::OutOfOrder { .. }), "{recs:?}: {e}");
    }
    let e = recovery_err(&raw(&[open_rp(), recv_bitmap(2)]));
    assert!(e.to_string().contains("block 2, the CONFIG has 2"), "{e}");
    let mut bad = recv_bitmap(0);
    bad.1[4] = 1;
    let e = recovery_err(&raw(&[open_rp(), bad]));
    assert!(e.to_string().contains("recv-bitmap reserved"), "{e}");
    let short = command(cmd::RECV_BITMAP, &[0]);
    // A body too short for its command: refused, whatever the wording.
    recovery_err(&raw(&[open_rp(), short]));
}

#[test]
fn recovery_commands_are_refused_on_a_first_channel() {
    for rec in [recv_bitmap(0), resume()] {
        let e = super::hostile_tests::err_of(&raw(&[rec]));
        assert!(
            e.to_string()
                .contains("only for a post-copy recovery channel"),
            "{e}"
        );
    }
    // Before version 4 they are unknown post-copy commands.
    for rec in [recv_bitmap(0), resume()] {
        let e = super::hostile_tests::err_of(&raw_v(VERSION_POSTCOPY, &[rec]));
        assert!(matches!(e, WireError::UnsupportedCommand { .. }), "{e}");
    }
}

fn rp_reader(bytes: &[u8]) -> ReturnPathReader<&[u8]> {
    ReturnPathReader::with_config(bytes, &sample_config(), &Limits::default())
}

#[test]
fn return_path_recv_bitmap_and_resume_ack_round_trip() {
    let msgs = [
        RpMessage::RecvBitmap {
            block: 0,
            first_page: 0,
            bits: vec![0xff; 8],
        },
        RpMessage::RecvBitmap {
            block: 1,
            first_page: 8,
            bits: vec![0x01],
        },
        RpMessage::ResumeAck,
    ];
    let mut bytes = Vec::new();
    for m in &msgs {
        bytes.extend_from_slice(&m.encode());
    }
    let mut r = rp_reader(&bytes);
    for m in &msgs {
        assert_eq!(r.read_message().unwrap().as_ref(), Some(m));
    }
    assert_eq!(r.read_message().unwrap(), None);
}

fn rp_raw(ty: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = ty.to_le_bytes().to_vec();
    b.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    b.extend_from_slice(payload);
    b
}

fn bitmap_payload(block: u16, reserved: u16, first: u32, bits: &[u8]) -> Vec<u8> {
    let mut p = block.to_le_bytes().to_vec();
    p.extend_from_slice(&reserved.to_le_bytes());
    p.extend_from_slice(&first.to_le_bytes());
    p.extend_from_slice(bits);
    p
}

#[test]
fn hostile_recv_bitmaps_are_refused() {
    let cases: [(Vec<u8>, &str); 7] = [
        // No bitmap byte at all.
        (
            rp_raw(rp_type::RECV_BITMAP, &bitmap_payload(0, 0, 0, &[])),
            "RECV_BITMAP message",
        ),
        (
            rp_raw(rp_type::RECV_BITMAP, &bitmap_payload(0, 1, 0, &[1])),
            "reserved",
        ),
        (
            rp_raw(rp_type::RECV_BITMAP, &bitmap_payload(0, 0, 3, &[1])),
            "not a multiple of 8",
        ),
        // Block 1 has 16 pages: a third byte starts past it.
        (
            rp_raw(rp_type::RECV_BITMAP, &bitmap_payload(1, 0, 0, &[1, 1, 1])),
            "the block has 16 pages",
        ),
        (
            rp_raw(rp_type::RECV_BITMAP, &bitmap_payload(1, 0, 16, &[1])),
            "the block has 16 pages",
        ),
        (
            rp_raw(rp_type::RECV_BITMAP, &bitmap_payload(2, 0, 0, &[1])),
            "RAM blocks",
        ),
        (rp_raw(rp_type::RESUME_ACK, &[1]), "return-path message"),
    ];
    for (bytes, want) in cases {
        let e = rp_reader(&bytes).read_message().expect_err("accepted");
        assert!(e.to_string().contains(want), "{want}: {e}");
    }
    // The longest message is bounded like every other: a length above 4096 cannot be said.
    let mut huge = rp_raw(rp_type::RECV_BITMAP, &bitmap_payload(0, 0, 0, &[0; 8]));
    huge[2..4].copy_from_slice(&u16::MAX.to_le_bytes());
    assert!(rp_reader(&huge).read_message().is_err());
}

/// A RECV_BITMAP longer than any return-path payload (4096 bytes) is refused at its length
/// field, before its payload is read; it was once taken for an empty bitmap with its payload
/// left in the stream.
#[test]
fn a_recv_bitmap_longer_than_any_payload_is_refused_at_its_length() {
    let bits = vec![0u8; RP_MAX_LEN];
    let bytes = rp_raw(rp_type::RECV_BITMAP, &bitmap_payload(0, 0, 0, &bits));
    assert_eq!(
        u16::from_le_bytes([bytes[2], bytes[3]]) as usize,
        RP_MAX_LEN + 8
    );
    let e = rp_reader(&bytes).read_message().expect_err("accepted");
    assert!(
        matches!(e, WireError::TooLarge { len, limit, offset: 2, .. } if len == RP_MAX_LEN as u64 + 8 && limit == RP_MAX_LEN as u64),
        "{e}"
    );
    assert!(e.to_string().contains("RECV_BITMAP"), "{e}");
}
