//! Mutation fuzzing of the multifd channels (`docs/stream-format.md` §5.2, §5.3, §11a): the
//! 32-byte handshake against an exact oracle, channel streams written by `ChannelWriter` with
//! compression none / zlib / zstd, and generated compressed batches whose lengths lie and
//! whose data are decompression bombs, short, truncated or followed by bytes. Engine in
//! `fuzz_support.rs`; reproduce with `TERN_FUZZ_SEED`, scale with `TERN_FUZZ_ITERS`.

use std::io::Write;

use rand::rngs::StdRng;
use rand::Rng;

use super::channel_test_support::noise;
use super::fuzz_support::{
    fix_channel, mutate_bytes, mutate_units, split_records, Fuzz, RECORD_LEN,
};
use super::tests::{page, sample_config, PS};
use super::*;

const ID: [u8; 16] = [7; 16];

/// Every byte of the handshake mutated; accepted exactly when every field is what the main
/// stream announced and the channel index is in range and not yet connected.
#[test]
fn fuzz_channel_handshake() {
    let mut fz = Fuzz::start("fuzz_channel_handshake", 50_000);
    for i in 0..fz.iters {
        let version = [
            VERSION_MULTIFD,
            VERSION_COMPRESSION,
            VERSION_MULTIFD_POSTCOPY,
        ][fz.rng.random_range(0..3)];
        let channels = [1u16, 2, 4, 255][fz.rng.random_range(0..4)];
        let expect = ChannelExpect {
            version,
            channels,
            id: ID,
        };
        let seen: Vec<bool> = (0..channels).map(|_| fz.rng.random_bool(0.3)).collect();
        let channel = fz.rng.random_range(1..=channels);
        let good = ChannelHandshake {
            version,
            channel,
            channels,
            id: ID,
        }
        .encode();
        let mut b = good.to_vec();
        if i % 8 != 0 {
            let donor = MAGIC;
            mutate_bytes(&mut fz.rng, &mut b, &donor);
        }
        let r = fz.case(i, &b, |b| {
            ChannelHandshake::read_checked(&mut &b[..], &expect, &seen)
        });
        let field = |at: usize, n: usize| b.get(at..at + n);
        let got_channel = field(12, 2).map(|x| u16::from_le_bytes([x[0], x[1]]));
        let valid = b.len() >= CHANNEL_HANDSHAKE_LEN
            && field(0, 8) == Some(&CHANNEL_MAGIC[..])
            && field(8, 4) == Some(&version.to_le_bytes()[..])
            && field(14, 2) == Some(&channels.to_le_bytes()[..])
            && field(16, 16) == Some(&ID[..])
            && got_channel
                .is_some_and(|c| (1..=channels).contains(&c) && !seen[usize::from(c) - 1]);
        match r {
            Ok(h) => {
                assert!(valid, "accepted {b:02x?} as {h:?} (seen {seen:?})");
                assert_eq!(Some(h.channel), got_channel);
                assert_eq!((h.version, h.channels, h.id), (version, channels, ID));
            }
            Err(e) => assert!(!valid, "refused a valid handshake {b:02x?}: {e}"),
        }
    }
    fz.report(&["ok", "Truncated", "Invalid"]);
}

/// Channel 1 with `method`: a compressible batch with a zero page, a noise batch (plain), a
/// keepalive, SYNC, a batch of the next generation, SYNC.
fn channel_seed(method: Compression) -> Vec<u8> {
    let cfg = sample_config();
    let mut w = ChannelWriter::new(Vec::new(), 1, &cfg).expect("writer");
    w.set_compression(method, 1).expect("compression");
    let (a, b, n) = (page(1), page(2), noise(PS, 0x9e37_79b9));
    w.write_batch(&[
        RamPage::normal(0, 3, &a),
        RamPage::zero(0, 4),
        RamPage::normal(1, 0, &b),
    ])
    .expect("batch");
    w.write_batch(&[RamPage::normal(0, 5, &n)]).expect("noise");
    w.write_keepalive().expect("keepalive");
    w.write_sync().expect("sync");
    w.write_batch(&[RamPage::normal(0, 63, &a), RamPage::normal(1, 15, &a)])
        .expect("batch");
    w.write_sync().expect("sync");
    w.get_ref().clone()
}

/// Reads a channel (after its handshake) to its last byte, checking every page handed out and
/// that neither the record buffer nor the decompression buffer outgrows the limits. Without
/// compression every record accepted is written again by a `ChannelWriter`: what was read
/// must be exactly what the writer writes for it. Returns the number of records.
fn drain_channel(bytes: &[u8], method: Compression, limits: &Limits) -> Result<usize, WireError> {
    let cfg = sample_config();
    let blocks: Vec<u64> = cfg
        .ram_blocks
        .iter()
        .map(|b| b.pages(cfg.page_size))
        .collect();
    let max_body = limits.max_ram_body(cfg.page_size).unwrap_or(0) as usize;
    let max_raw = limits.max_pages_per_batch as usize * PS;
    let mut r = ChannelReader::new(bytes, 1, &cfg, limits).with_decompression(method)?;
    let mut w = ChannelWriter::new(Vec::new(), 1, &cfg).expect("writer");
    let end = (bytes.len() + CHANNEL_HANDSHAKE_LEN) as u64;
    let mut n = 0;
    while r.position() < end {
        let res = r.next_record().map(|rec| {
            let written = match rec {
                ChannelRecord::Batch(b) => {
                    for p in b.pages() {
                        let pages = blocks.get(usize::from(p.block)).copied().unwrap_or(0);
                        assert!(u64::from(p.page) < pages, "page {p:?} outside the CONFIG");
                        if let PageData::Normal(d) = p.data {
                            assert_eq!(d.len(), PS, "a page's data");
                        }
                    }
                    let pages: Vec<RamPage<'_>> = b.pages().collect();
                    w.write_batch(&pages)
                }
                ChannelRecord::Sync { generation } => {
                    assert_eq!(generation, w.generation(), "SYNC of another generation");
                    w.write_sync()
                }
                ChannelRecord::Keepalive => w.write_keepalive(),
            };
            if let Err(e) = written {
                panic!("accepted record {n} cannot be written again: {e}");
            }
        });
        let (buf, unpacked) = r.buffer_capacities();
        assert!(
            buf <= 2 * max_body + 64,
            "record buffer {buf} (> 2 × {max_body})"
        );
        assert!(
            unpacked <= 2 * max_raw,
            "decompression buffer {unpacked} (> 2 × {max_raw})"
        );
        res?;
        n += 1;
        let read = (r.position() as usize) - CHANNEL_HANDSHAKE_LEN;
        if method == Compression::None && w.get_ref()[..] != bytes[..read] {
            panic!("record {n}: the channel's first {read} bytes are not what the writer writes");
        }
    }
    Ok(n)
}

fn mutate_channel(rng: &mut StdRng, seed: &[u8], donor: &[u8]) -> Vec<u8> {
    let mut b = if rng.random_bool(0.6) {
        let mut u = split_records(seed, 0);
        let d = split_records(donor, 0);
        for _ in 0..rng.random_range(1..=3) {
            mutate_units(rng, &mut u, &d, RECORD_LEN);
        }
        u.join()
    } else {
        let mut b = seed.to_vec();
        mutate_bytes(rng, &mut b, donor);
        b
    };
    if rng.random_bool(0.8) {
        let raw_len = rng.random_bool(0.5).then_some(PS);
        fix_channel(&mut b, rng.random_bool(0.5), raw_len);
    }
    b
}

/// Mutated channel streams of every compression method (structure-aware: records dropped,
/// repeated, swapped, bodies and lengths changed, then CRCs, sequence numbers, generations
/// and compressed lengths re-fixed): never a panic or an unbounded buffer; most refused; the
/// checks behind the CRC are reached, the decompressors included.
#[test]
fn fuzz_channel_streams() {
    let mut fz = Fuzz::start("fuzz_channel_streams", 40_000);
    let methods = [Compression::None, Compression::Zlib, Compression::Zstd];
    let seeds: Vec<Vec<u8>> = methods.iter().map(|m| channel_seed(*m)).collect();
    for (m, s) in methods.iter().zip(&seeds) {
        assert_eq!(drain_channel(s, *m, &Limits::default()).expect("seed"), 6);
        let mut fixed = s.clone();
        fix_channel(&mut fixed, true, Some(PS));
        assert_eq!(&fixed, s, "{m}: re-fixing a valid channel changes nothing");
    }
    let small = Limits {
        max_pages_per_batch: 2,
        ..Limits::default()
    };
    for i in 0..fz.iters {
        let k = i % methods.len();
        let donor = &seeds[fz.rng.random_range(0..seeds.len())];
        let b = mutate_channel(&mut fz.rng, &seeds[k], donor);
        // A reader that expects another method than the writer used, now and then.
        let method = if i % 7 == 0 {
            methods[fz.rng.random_range(0..3)]
        } else {
            methods[k]
        };
        let limits = if i % 4 == 3 {
            small.clone()
        } else {
            Limits::default()
        };
        let _ = fz.case(i, &b, |b| drain_channel(b, method, &limits));
    }
    fz.report(&[
        "ok",
        "Truncated",
        "TooLarge",
        "LengthMismatch",
        "Invalid",
        "PageOutOfRange",
        "BatchOutOfOrder",
        "BatchChecksumMismatch",
        "BadCompressedBatch",
        "UnknownRecordKind",
    ]);
    assert!(fz.rejected() > fz.iters / 2, "{:?}", fz.outcomes);
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(1));
    e.write_all(data).expect("zlib");
    e.finish().expect("zlib")
}

/// A compressed batch record on channel 1 (generation 1, sequence 0): `normal` NORMAL entries
/// (block 0, pages 0..), `zeros` ZERO entries (block 1), `raw_len`, `data`, a correct CRC.
fn compressed_record(normal: usize, zeros: usize, raw_len: u32, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&1u16.to_le_bytes());
    body.extend_from_slice(&4u16.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes());
    body.extend_from_slice(&0u64.to_le_bytes());
    body.extend_from_slice(&((normal + zeros) as u32).to_le_bytes());
    for p in 0..normal {
        body.extend_from_slice(&(p as u32).to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&[page_kind::NORMAL, 0]);
    }
    for p in 0..zeros {
        body.extend_from_slice(&(p as u32).to_le_bytes());
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(&[page_kind::ZERO, 0]);
    }
    body.extend_from_slice(&raw_len.to_le_bytes());
    body.extend_from_slice(data);
    let mut rec = vec![RecordKind::Ram as u8];
    rec.extend_from_slice(&((body.len() + 4) as u32).to_le_bytes());
    rec.extend_from_slice(&body);
    let crc = crc_fast::crc32_iscsi(&rec);
    rec.extend_from_slice(&crc.to_le_bytes());
    rec
}

/// Compressed batches built by a hostile writer, their CRC correct: an uncompressed length
/// that lies, decompression bombs (more pages compressed than the table has, up to 4 MiB,
/// zstd frames with and without a stated content size), short data, truncated data, bytes
/// after the stream, noise that does not shrink, flipped bits. Accepted exactly when the
/// batch is honest, and then its pages are the ones compressed; the decompression buffer
/// never grows past the table's length.
#[test]
fn fuzz_compressed_batches_lying_lengths_and_bombs() {
    let mut fz = Fuzz::start("fuzz_compressed_batches_lying_lengths_and_bombs", 6_000);
    let cfg = sample_config();
    for i in 0..fz.iters {
        let method = [Compression::Zlib, Compression::Zstd][i % 2];
        let rng = &mut fz.rng;
        let normal = rng.random_range(1..=4);
        let zeros = rng.random_range(0..=2);
        let want = normal * PS;
        let content: Vec<u8> = (0..normal).flat_map(|p| page(p as u8 + 1)).collect();
        let pack = |data: &[u8], rng: &mut StdRng| match method {
            Compression::Zstd if rng.random_bool(0.5) => {
                zstd::stream::encode_all(data, 1).expect("zstd stream")
            }
            Compression::Zstd => zstd::bulk::compress(data, 1).expect("zstd"),
            _ => zlib(data),
        };
        let mut raw_len = want as u32;
        // `Some(true)`: must be accepted; `Some(false)`: must be refused; `None`: either.
        let (data, honest) = match rng.random_range(0..9) {
            0 | 1 => (pack(&content, rng), Some(true)),
            2 => {
                let lie = [
                    0,
                    1,
                    PS - 1,
                    want - 1,
                    want + 1,
                    want + PS,
                    usize::MAX >> 32,
                ];
                raw_len = lie[rng.random_range(0..lie.len())] as u32;
                (pack(&content, rng), Some(false))
            }
            3 => {
                // A bomb: more than the table's pages, usually a few, sometimes 4 MiB.
                let extra = if rng.random_bool(0.1) {
                    1024 - normal
                } else {
                    rng.random_range(1..=8)
                };
                let mut more = content.clone();
                more.resize(want + extra * PS, 0);
                (pack(&more, rng), Some(false))
            }
            4 => (
                pack(&content[..want - rng.random_range(1..=PS)], rng),
                Some(false),
            ),
            5 => {
                let mut d = pack(&content, rng);
                let cut = rng.random_range(1..d.len());
                d.truncate(cut);
                (d, Some(false))
            }
            6 => {
                let mut d = pack(&content, rng);
                d.extend_from_slice(&[0, 1, 2][..rng.random_range(1..=3)]);
                (d, Some(false))
            }
            7 => {
                let n = noise(want, rng.random());
                let d = pack(&n, rng);
                let fits = d.len() <= want;
                (d, fits.then_some(true).or(Some(false)))
            }
            _ => {
                let mut d = pack(&content, rng);
                let at = rng.random_range(0..d.len());
                d[at] ^= 1 << rng.random_range(0..8);
                (d, None)
            }
        };
        let rec = compressed_record(normal, zeros, raw_len, &data);
        let r = fz.case(i, &rec, |rec| {
            let mut r =
                ChannelReader::new(rec, 1, &cfg, &Limits::default()).with_decompression(method)?;
            let pages = match r.next_record()? {
                ChannelRecord::Batch(b) => b
                    .pages()
                    .map(|p| match p.data {
                        PageData::Normal(d) => d.to_vec(),
                        PageData::Zero => Vec::new(),
                    })
                    .collect::<Vec<_>>(),
                other => panic!("not a batch: {other:?}"),
            };
            let (_, unpacked) = r.buffer_capacities();
            assert!(
                unpacked <= 2 * want,
                "decompression buffer {unpacked} for {want}"
            );
            Ok(pages)
        });
        match (r, honest) {
            (Ok(pages), Some(false)) => panic!(
                "iteration {i} ({method}, TERN_FUZZ_SEED={}): a hostile batch accepted \
                 ({normal} pages, raw_len {raw_len}, {} bytes of data, {} pages read)",
                fz.seed,
                data.len(),
                pages.len()
            ),
            (Err(e), Some(true)) => panic!(
                "iteration {i} ({method}, TERN_FUZZ_SEED={}): an honest batch refused: {e}",
                fz.seed
            ),
            (Ok(pages), Some(true)) => {
                let normal_data: Vec<u8> = pages.concat();
                assert_eq!(normal_data, content, "iteration {i}: pages differ");
            }
            (Err(e), _) => assert!(
                matches!(
                    e,
                    WireError::BadCompressedBatch {
                        channel: 1,
                        seq: 0,
                        ..
                    }
                ),
                "iteration {i}: {e:?}"
            ),
            (Ok(_), None) => {}
        }
    }
    fz.report(&["ok", "BadCompressedBatch"]);
}
