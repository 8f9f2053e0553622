//! Compressed multifd batches (`docs/stream-format.md` §5.3) against hostile input: a corrupt
//! compressed payload (caught by the CRC before decompressing), a hostile writer's wrong
//! uncompressed length, an oversized compressed length, a decompression bomb, garbage, trailing
//! bytes, the flag on a channel without compression, and `MULTIFD_CHANNELS`' method byte.

use super::channel_test_support::{
    channel_records, multifd_main_stream, noise, rewrite_channel_record, write_multifd_channels,
};
use super::format::FRAME_LEN;
use super::tests::{page, sample_config, PS};
use super::*;

/// Channel 1 with `method`: a batch of two normal pages and a zero page, a batch of noise
/// (sent plain: it does not shrink), SYNC.
fn stream(method: Compression) -> Vec<u8> {
    let cfg = sample_config();
    let mut w = ChannelWriter::new(Vec::new(), 1, &cfg).expect("writer");
    w.set_compression(method, 1).expect("compression");
    let (a, b) = (page(1), page(2));
    w.write_batch(&[
        RamPage::normal(0, 3, &a),
        RamPage::zero(0, 4),
        RamPage::normal(1, 0, &b),
    ])
    .expect("batch");
    let noise = noise_page();
    w.write_batch(&[RamPage::normal(0, 5, &noise)])
        .expect("noise");
    w.write_sync().expect("sync");
    let (raw, packed) = w.compression_counts();
    assert_eq!(raw, 2 * PS as u64, "only the compressed batch is counted");
    assert!(packed > 0 && packed < raw / 10, "{packed} of {raw}");
    w.get_ref().clone()
}

fn noise_page() -> Vec<u8> {
    noise(PS, 0x9e37_79b9_7f4a_7c15)
}

fn reader(bytes: &[u8], method: Compression) -> ChannelReader<&[u8]> {
    ChannelReader::new(bytes, 1, &sample_config(), &Limits::default())
        .with_decompression(method)
        .expect("decompressor")
}

/// A page as read back: block, page, data (`None` = a zero page).
type Page = (u16, u32, Option<Vec<u8>>);

/// Every batch's pages (owned), or the first error.
fn drain(bytes: &[u8], method: Compression) -> Result<Vec<Vec<Page>>, WireError> {
    let mut r = reader(bytes, method);
    let mut out = Vec::new();
    while r.position() < (bytes.len() + CHANNEL_HANDSHAKE_LEN) as u64 {
        if let ChannelRecord::Batch(b) = r.next_record()? {
            out.push(
                b.pages()
                    .map(|p| match p.data {
                        PageData::Normal(d) => (p.block, p.page, Some(d.to_vec())),
                        PageData::Zero => (p.block, p.page, None),
                    })
                    .collect(),
            );
        }
    }
    Ok(out)
}

/// Body offset of the compressed batch's `raw_len` (header, count, 3 entries).
const RAW_AT: usize = 16 + 4 + 3 * 8;

fn bad_reason(e: &WireError) -> &str {
    match e {
        WireError::BadCompressedBatch {
            channel: 1,
            seq: 0,
            reason,
            ..
        } => reason,
        other => panic!("expected BadCompressedBatch on channel 1, batch 0, got {other:?}"),
    }
}

#[test]
fn compressed_batches_round_trip_with_zero_pages_and_a_plain_batch() {
    for m in [Compression::Zlib, Compression::Zstd] {
        let s = stream(m);
        let recs = channel_records(&s);
        // The first batch is flagged COMPRESSED and much smaller than its two pages.
        assert_eq!(u16::from_le_bytes([s[FRAME_LEN + 2], s[FRAME_LEN + 3]]), 4);
        assert!(recs[0].1 < PS / 4, "{m}: {}", recs[0].1);
        // The noise batch went plain: flags 0, a full page of data.
        let (at, len) = recs[1];
        assert_eq!(s[at + FRAME_LEN + 2], 0, "{m}");
        assert_eq!(len, FRAME_LEN + 24 + 8 + PS);
        let got = drain(&s, m).expect("valid");
        assert_eq!(
            got,
            vec![
                vec![(0, 3, Some(page(1))), (0, 4, None), (1, 0, Some(page(2)))],
                vec![(0, 5, Some(noise_page()))],
            ],
            "{m}"
        );
    }
}

#[test]
fn a_corrupt_compressed_payload_is_caught_by_the_checksum_before_decompressing() {
    for m in [Compression::Zlib, Compression::Zstd] {
        let mut s = stream(m);
        s[FRAME_LEN + RAW_AT + 4 + 3] ^= 0x20;
        let e = drain(&s, m).unwrap_err();
        assert!(
            matches!(
                e,
                WireError::BatchChecksumMismatch {
                    channel: 1,
                    seq: 0,
                    ..
                }
            ),
            "{m}: {e:?}"
        );
    }
}

#[test]
fn a_hostile_writers_wrong_lengths_garbage_and_bombs_are_refused_naming_the_batch() {
    for m in [Compression::Zlib, Compression::Zstd] {
        let s = stream(m);
        // raw_len that is not 2 pages.
        let e = drain(
            &rewrite_channel_record(&s, 0, |b| {
                b[RAW_AT..RAW_AT + 4].copy_from_slice(&(3 * PS as u32).to_le_bytes())
            }),
            m,
        )
        .unwrap_err();
        assert!(
            bad_reason(&e).contains("uncompressed length 12288"),
            "{m}: {e}"
        );
        assert!(e.to_string().contains("RAM batch 0 on channel 1"), "{e}");
        // The table says one normal page (the second one made ZERO): the data decompresses to
        // more than that (a bomb for the table's length), with raw_len matching the table.
        let e = drain(
            &rewrite_channel_record(&s, 0, |b| {
                b[16 + 4 + 2 * 8 + 6] = page_kind::ZERO;
                b[RAW_AT..RAW_AT + 4].copy_from_slice(&(PS as u32).to_le_bytes());
            }),
            m,
        )
        .unwrap_err();
        assert!(
            bad_reason(&e).contains("more than") || bad_reason(&e).contains("says"),
            "{m}: {e}"
        );
        // Compressed data larger than the pages (a sender sends such a batch plain).
        let e = drain(
            &rewrite_channel_record(&s, 0, |b| b.extend(std::iter::repeat_n(0u8, 2 * PS))),
            m,
        )
        .unwrap_err();
        assert!(bad_reason(&e).contains("must be 1..=8192"), "{m}: {e}");
        // No compressed bytes at all.
        let e = drain(
            &rewrite_channel_record(&s, 0, |b| b.truncate(RAW_AT + 4)),
            m,
        )
        .unwrap_err();
        assert!(bad_reason(&e).contains("0 compressed byte"), "{m}: {e}");
        // Garbage instead of a stream.
        let e = drain(
            &rewrite_channel_record(&s, 0, |b| {
                for x in &mut b[RAW_AT + 4..] {
                    *x = 0x5a;
                }
            }),
            m,
        )
        .unwrap_err();
        assert!(bad_reason(&e).contains("not a valid"), "{m}: {e}");
        // Bytes after the end of the stream.
        let e = drain(
            &rewrite_channel_record(&s, 0, |b| b.extend_from_slice(&[1, 2, 3])),
            m,
        )
        .unwrap_err();
        let r = bad_reason(&e);
        assert!(
            r.contains("after the end") || r.contains("not a valid"),
            "{m}: {e}"
        );
        // Every normal page made ZERO: nothing to decompress.
        let e = drain(
            &rewrite_channel_record(&s, 0, |b| {
                b[16 + 4 + 6] = page_kind::ZERO;
                b[16 + 4 + 2 * 8 + 6] = page_kind::ZERO;
            }),
            m,
        )
        .unwrap_err();
        assert!(bad_reason(&e).contains("nothing to decompress"), "{m}: {e}");
    }
}

#[test]
fn a_decompression_bomb_is_refused_without_growing_the_buffer() {
    // One normal page in the table, its data a stream of 1 MiB of zeros.
    let bomb_input = vec![0u8; 1 << 20];
    for m in [Compression::Zlib, Compression::Zstd] {
        let mut c = BatchCompressor::new(m, 9).expect("c").expect("some");
        let mut z = Vec::new();
        assert!(c.compress([&bomb_input[..]], &mut z).expect("compress"));
        let s = stream(m);
        let e = drain(
            &rewrite_channel_record(&s, 0, |b| {
                b[16 + 4 + 2 * 8 + 6] = page_kind::ZERO;
                b[RAW_AT..RAW_AT + 4].copy_from_slice(&(PS as u32).to_le_bytes());
                b.truncate(RAW_AT + 4);
                // The bomb is smaller than one page, as the reader's length rule asks.
                assert!(z.len() <= PS, "{m}: {}", z.len());
                b.extend_from_slice(&z);
            }),
            m,
        )
        .unwrap_err();
        assert!(bad_reason(&e).contains("decompression bomb"), "{m}: {e}");
    }
}

#[test]
fn the_compressed_flag_without_negotiated_compression_is_refused() {
    let s = stream(Compression::Zstd);
    let r = ChannelReader::new(&s[..], 1, &sample_config(), &Limits::default());
    let mut r = r;
    let e = r.next_record().unwrap_err();
    assert!(
        matches!(
            e,
            WireError::Invalid {
                field: "batch flags",
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("without multifd-compression"), "{e}");
    // COMPRESSED together with SYNC.
    let e = drain(
        &rewrite_channel_record(&s, 2, |b| b[2] = 5),
        Compression::Zstd,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            WireError::Invalid {
                field: "batch flags",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn multifd_channels_carries_the_method_and_refuses_an_unknown_one() {
    let cfg = sample_config();
    for m in [Compression::None, Compression::Zlib, Compression::Zstd] {
        let bytes = channels_stream(&cfg, m, VERSION_COMPRESSION);
        if m != Compression::None {
            // A compression method in a version-6 stream: refused, naming the version.
            let old = channels_stream(&cfg, m, VERSION_MULTIFD);
            let mut r = StreamReader::new(
                &old[..],
                Limits::default(),
                Expectations::from_config(&cfg, false),
            )
            .expect("reader");
            let e = loop {
                match r.next_record() {
                    Err(e) => break e,
                    Ok(Record::End(_)) => panic!("accepted compression in a version-6 stream"),
                    Ok(_) => {}
                }
            };
            assert!(e.to_string().contains("need stream version 7"), "{e}");
        }
        check_method_and_unknown_byte(&cfg, m, bytes);
    }
}

/// CAPABILITIES (multifd) + MULTIFD_CHANNELS with `m`, in a stream of `version`.
fn channels_stream(cfg: &StreamConfig, m: Compression, version: u32) -> Vec<u8> {
    multifd_main_stream(cfg, version, |w| write_multifd_channels(w, 2, m, [7; 16]))
}

/// The reader sees `m` in `bytes`, and refuses the method byte 3.
fn check_method_and_unknown_byte(cfg: &StreamConfig, m: Compression, bytes: Vec<u8>) {
    {
        let mut r = StreamReader::new(
            &bytes[..],
            Limits::default(),
            Expectations::from_config(cfg, false),
        )
        .expect("reader");
        let mut seen = None;
        loop {
            match r.next_record().expect("valid") {
                Record::Command(Command::MultifdChannels { compression, .. }) => {
                    seen = Some(compression)
                }
                Record::End(_) => break,
                _ => {}
            }
        }
        assert_eq!(seen, Some(m));
        // The method byte 3 (unknown).
        let at = bytes
            .windows(4)
            .position(|w| w == [0x20, 0, 2, 0])
            .expect("MULTIFD_CHANNELS body");
        let mut bad = bytes.clone();
        bad[at + 4] = 3;
        let mut r = StreamReader::new(
            &bad[..],
            Limits::default(),
            Expectations::from_config(cfg, false),
        )
        .expect("reader");
        let e = loop {
            match r.next_record() {
                Err(e) => break e,
                Ok(Record::End(_)) => panic!("accepted an unknown method"),
                Ok(_) => {}
            }
        };
        assert!(
            e.to_string().contains("unknown multifd compression 3"),
            "{e}"
        );
    }
}
