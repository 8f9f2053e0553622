//! Multifd channels (`docs/stream-format.md` §5.2) against hostile input: the handshake (wrong
//! magic, a second main stream, another migration's id, an index out of range or repeated, a
//! wrong count or version), the batches of a channel (a batch on the wrong connection, a
//! corrupted byte, a lost or replayed batch, a generation from before a sync, a sync with
//! pages, an unknown flag, a record that is not RAM), and the main stream's new order rules.

use super::channel_test_support::{
    channel_records, multifd_main_stream, read_main, rewrite_channel_record, write_multifd_channels,
};
use super::tests::{page, sample_config, PS};
use super::*;

const ID: [u8; 16] = [7; 16];

fn expect(channels: u16) -> ChannelExpect {
    ChannelExpect {
        version: VERSION_MULTIFD,
        channels,
        id: ID,
    }
}

fn hs(channel: u16, channels: u16, id: [u8; 16]) -> Vec<u8> {
    ChannelHandshake {
        version: VERSION_MULTIFD,
        channel,
        channels,
        id,
    }
    .encode()
    .to_vec()
}

fn read_hs(bytes: &[u8], seen: &[bool]) -> Result<ChannelHandshake, WireError> {
    ChannelHandshake::read_checked(&mut &bytes[..], &expect(2), seen)
}

fn invalid_field(e: &WireError) -> &'static str {
    match e {
        WireError::Invalid { field, .. } => field,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn a_good_handshake_round_trips() {
    let h = read_hs(&hs(2, 2, ID), &[true, false]).expect("valid");
    assert_eq!((h.channel, h.channels, h.id), (2, 2, ID));
}

#[test]
fn hostile_handshakes_are_refused_naming_the_field() {
    let mut wrong_magic = hs(1, 2, ID);
    wrong_magic[3] ^= 0xff;
    let e = read_hs(&wrong_magic, &[false, false]).unwrap_err();
    assert_eq!(invalid_field(&e), "channel magic");
    assert!(e.to_string().contains("not a multifd channel"), "{e}");

    let mut main = hs(1, 2, ID);
    main[..8].copy_from_slice(&MAGIC);
    let e = read_hs(&main, &[false, false]).unwrap_err();
    assert!(e.to_string().contains("a second main stream"), "{e}");

    let e = read_hs(&hs(1, 2, [9; 16]), &[false, false]).unwrap_err();
    assert_eq!(invalid_field(&e), "migration id");
    assert!(e.to_string().contains("another migration"), "{e}");

    let e = read_hs(&hs(3, 2, ID), &[false, false]).unwrap_err();
    assert!(
        e.to_string().contains("channel 3 out of range 1..=2"),
        "{e}"
    );
    let e = read_hs(&hs(0, 2, ID), &[false, false]).unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");

    let e = read_hs(&hs(1, 2, ID), &[true, false]).unwrap_err();
    assert!(e.to_string().contains("channel 1 connected twice"), "{e}");

    let e = read_hs(&hs(1, 4, ID), &[false, false]).unwrap_err();
    assert_eq!(invalid_field(&e), "channel count");

    let mut v5 = hs(1, 2, ID);
    v5[8..12].copy_from_slice(&5u32.to_le_bytes());
    let e = read_hs(&v5, &[false, false]).unwrap_err();
    assert_eq!(invalid_field(&e), "channel version");

    let e = read_hs(&hs(1, 2, ID)[..20], &[false, false]).unwrap_err();
    assert!(matches!(e, WireError::Truncated { .. }), "{e:?}");
}

/// Channel 1: gen 1 = two batches (one with a zero page), SYNC; gen 2 = one batch, KEEPALIVE,
/// SYNC. Returns the bytes after the handshake.
fn channel_stream(channel: u16) -> Vec<u8> {
    let cfg = sample_config();
    let mut w = ChannelWriter::new(Vec::new(), channel, &cfg).expect("writer");
    let (a, b) = (page(1), page(2));
    w.write_batch(&[RamPage::normal(0, 3, &a), RamPage::zero(0, 4)])
        .expect("batch");
    w.write_batch(&[RamPage::normal(1, 0, &b)]).expect("batch");
    w.write_sync().expect("sync");
    w.write_batch(&[RamPage::normal(0, 3, &b)]).expect("batch");
    w.write_keepalive().expect("keepalive");
    w.write_sync().expect("sync");
    assert_eq!(w.generation(), 3);
    let n = w.bytes_written();
    let v = w.get_ref().clone();
    assert_eq!(n, v.len() as u64);
    v
}

fn reader(bytes: &[u8], channel: u16) -> ChannelReader<&[u8]> {
    ChannelReader::new(bytes, channel, &sample_config(), &Limits::default())
}

/// Every record of a channel, as (kind, generation, pages) — or the error.
fn drain(bytes: &[u8], channel: u16) -> Result<Vec<(&'static str, u32, usize)>, WireError> {
    let mut r = reader(bytes, channel);
    let mut out = Vec::new();
    while r.position() < (bytes.len() + CHANNEL_HANDSHAKE_LEN) as u64 {
        let gen = r.generation();
        match r.next_record()? {
            ChannelRecord::Batch(b) => {
                assert_eq!(b.header().map(|h| h.channel), Some(channel));
                out.push(("batch", gen, b.len()));
            }
            ChannelRecord::Sync { generation } => out.push(("sync", generation, 0)),
            ChannelRecord::Keepalive => out.push(("keepalive", gen, 0)),
        }
    }
    Ok(out)
}

#[test]
fn a_channel_round_trips_with_syncs_and_keepalives() {
    let s = channel_stream(1);
    let recs = drain(&s, 1).expect("valid channel");
    assert_eq!(
        recs,
        vec![
            ("batch", 1, 2),
            ("batch", 1, 1),
            ("sync", 1, 0),
            ("batch", 2, 1),
            ("keepalive", 2, 0),
            ("sync", 2, 0),
        ]
    );
    // The pages come out as written.
    let mut r = reader(&s, 1);
    let ChannelRecord::Batch(b) = r.next_record().expect("first") else {
        panic!("not a batch");
    };
    let pages: Vec<RamPage<'_>> = b.pages().collect();
    assert_eq!(pages[0], RamPage::normal(0, 3, &page(1)));
    assert_eq!(pages[1], RamPage::zero(0, 4));
}

#[test]
fn a_batch_on_the_wrong_connection_is_refused() {
    // Written as channel 2, read on the connection that said it is channel 1.
    let e = drain(&channel_stream(2), 1).unwrap_err();
    assert_eq!(invalid_field(&e), "batch channel");
    assert!(e.to_string().contains("wrong connection"), "{e}");
}

#[test]
fn a_corrupted_lost_replayed_or_early_batch_is_refused_before_its_pages() {
    let s = channel_stream(1);
    let recs = channel_records(&s);
    // A flipped byte in the second batch's page data.
    let mut bad = s.clone();
    bad[recs[1].0 + 40] ^= 1;
    let e = drain(&bad, 1).unwrap_err();
    assert!(
        matches!(
            e,
            WireError::BatchChecksumMismatch {
                channel: 1,
                seq: 1,
                ..
            }
        ),
        "{e:?}"
    );
    // The first batch lost.
    let lost = s[recs[1].0..].to_vec();
    let e = drain(&lost, 1).unwrap_err();
    assert!(e.to_string().contains("1 batch(es) lost"), "{e}");
    // The first batch replayed.
    let mut replay = s[..recs[1].0].to_vec();
    replay.extend_from_slice(&s[..recs[1].0]);
    let e = drain(&replay, 1).unwrap_err();
    assert!(e.to_string().contains("duplicate or replayed"), "{e}");
    // The generation-2 batch before the sync (a batch from after a sync point).
    let mut early = s[..recs[1].0 + recs[1].1].to_vec();
    early.extend_from_slice(&s[recs[3].0..recs[3].0 + recs[3].1]);
    let e = drain(&early, 1).unwrap_err();
    assert!(matches!(e, WireError::BatchOutOfOrder { .. }), "{e:?}");
    assert!(e.to_string().contains("generation 2"), "{e}");
}

#[test]
fn hostile_flags_and_markers_are_refused() {
    let s = channel_stream(1);
    // Both flags.
    let e = drain(&rewrite_channel_record(&s, 2, |b| b[2] = 3), 1).unwrap_err();
    assert_eq!(invalid_field(&e), "batch flags");
    // An unknown flag on a batch with pages.
    let e = drain(&rewrite_channel_record(&s, 0, |b| b[2] = 4), 1).unwrap_err();
    assert_eq!(invalid_field(&e), "batch flags");
    // A SYNC that carries pages: the first batch with the SYNC flag.
    let e = drain(&rewrite_channel_record(&s, 0, |b| b[2] = 1), 1).unwrap_err();
    assert!(matches!(e, WireError::LengthMismatch { .. }), "{e:?}");
    // A batch without a flag and without pages.
    let e = drain(&rewrite_channel_record(&s, 2, |b| b[2] = 0), 1).unwrap_err();
    assert_eq!(invalid_field(&e), "page count");
    // A page outside the configuration.
    let e = drain(
        &rewrite_channel_record(&s, 0, |b| b[20..24].copy_from_slice(&9999u32.to_le_bytes())),
        1,
    )
    .unwrap_err();
    assert!(matches!(e, WireError::PageOutOfRange { .. }), "{e:?}");
    // A record that is not RAM (a COMMAND frame).
    let mut cmd = vec![RecordKind::Command as u8, 2, 0, 0, 0, 4, 0];
    cmd.extend_from_slice(&s);
    let e = drain(&cmd, 1).unwrap_err();
    assert!(
        matches!(e, WireError::UnknownRecordKind { kind: 5, .. }),
        "{e:?}"
    );
    // A frame above the batch limit is refused before anything is read.
    let huge = vec![RecordKind::Ram as u8, 0xff, 0xff, 0xff, 0x7f];
    let e = drain(&huge, 1).unwrap_err();
    assert!(matches!(e, WireError::TooLarge { .. }), "{e:?}");
}

#[test]
fn the_writer_refuses_what_a_reader_would() {
    let cfg = sample_config();
    assert!(ChannelWriter::new(Vec::new(), 0, &cfg).is_err());
    let mut w = ChannelWriter::new(Vec::new(), 1, &cfg).expect("writer");
    assert!(w.write_batch(&[]).is_err());
    let short = vec![0u8; PS - 1];
    assert!(w.write_batch(&[RamPage::normal(0, 0, &short)]).is_err());
    assert!(w.write_batch(&[RamPage::zero(7, 0)]).is_err());
    assert_eq!(w.bytes_written(), 0);
}

/// A main stream of version 6 with CAPABILITIES bit 6 and then `next`.
fn main_stream(next: impl FnOnce(&mut StreamWriter<Vec<u8>>)) -> Vec<u8> {
    multifd_main_stream(&sample_config(), VERSION_MULTIFD, next)
}

#[test]
fn the_main_stream_announces_the_channels_right_after_capabilities() {
    let ok = main_stream(|w| {
        write_multifd_channels(w, 2, Compression::None, ID);
        w.write_command(Command::SwitchoverStart).expect("switch");
    });
    assert_eq!(
        read_main(&ok).expect("valid"),
        ["capabilities", "multifd-channels", "switchover-start"]
    );
    // Something else right after bit 6.
    let missing = main_stream(|w| w.write_command(Command::Ping { seq: 1 }).expect("ping"));
    let e = read_main(&missing).unwrap_err();
    assert!(
        e.to_string().contains("MULTIFD_CHANNELS must follow"),
        "{e}"
    );
    // A RAM batch on the main stream of a multifd migration.
    let ram = main_stream(|w| {
        write_multifd_channels(w, 2, Compression::None, ID);
        w.write_ram_batch(&[RamPage::zero(0, 1)]).expect("ram");
    });
    let e = read_main(&ram).unwrap_err();
    assert!(
        e.to_string().contains("main stream of a multifd migration"),
        "{e}"
    );
    // Twice.
    let twice = main_stream(|w| {
        write_multifd_channels(w, 2, Compression::None, ID);
        write_multifd_channels(w, 2, Compression::None, ID);
    });
    let e = read_main(&twice).unwrap_err();
    assert!(e.to_string().contains("a second MULTIFD_CHANNELS"), "{e}");
    // Zero channels, or an all-zero id.
    for (channels, id) in [(0u16, ID), (256, ID), (2, [0u8; 16])] {
        let bad = main_stream(|w| {
            write_multifd_channels(w, channels, Compression::None, id);
        });
        assert!(
            matches!(read_main(&bad), Err(WireError::Invalid { .. })),
            "{channels} {id:?}"
        );
    }
}

#[test]
fn multifd_needs_version_6_and_goes_with_the_digest() {
    // A version-5 writer cannot announce it, and a version-5 reader refuses the bit.
    let mut w = StreamWriter::with_version(
        Vec::new(),
        &sample_config(),
        &Limits::default(),
        VERSION_BATCH_INTEGRITY,
    )
    .expect("writer");
    assert!(w
        .write_command(Command::MultifdChannels {
            channels: 1,
            compression: Compression::None,
            id: ID,
        })
        .is_err());
    // With the digest: legal in every version that has bit 6, no version bump (decision 252;
    // it was `Invalid` before, decision 166). (With post-copy: version 8, §5.4,
    // `multifd_postcopy_tests.rs`.)
    let cfg = sample_config();
    let digest = crate::digest::RamDigest {
        chunk_shift: crate::digest::DEFAULT_CHUNK_SHIFT,
        blocks: cfg
            .ram_blocks
            .iter()
            .map(|b| vec![7; crate::digest::chunk_count(b.size, 21) as usize])
            .collect(),
    };
    for version in [VERSION_MULTIFD, VERSION_COMPRESSION, CURRENT_VERSION] {
        let mut w = StreamWriter::with_version(Vec::new(), &cfg, &Limits::default(), version)
            .expect("writer");
        w.write_command(Command::Capabilities {
            switchover_ack: false,
            validate_uuid: false,
            ram_digest: true,
            postcopy_ram: false,
            postcopy_preempt: false,
            multifd: true,
        })
        .expect("caps");
        write_multifd_channels(&mut w, 2, Compression::None, ID);
        w.write_command(Command::SwitchoverStart).expect("switch");
        w.write_ram_digest(&digest).expect("digest");
        let b = w.finish().expect("end");
        let names = read_main(&b).unwrap_or_else(|e| panic!("version {version}: {e}"));
        assert_eq!(names.len(), 4, "version {version}: {names:?}");
    }
}
