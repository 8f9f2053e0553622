//! Micro-benchmark of the stream encoder/decoder: 256 MiB of guest pages (1/8 zero pages)
//! encoded into memory, then decoded, with and without copying the pages into a destination
//! buffer. Run: `cargo run --release -p tern-migration --example wire_bench [MiB] [version]`
//! (version 1 = RAM records without batch framing, checked by END's CRC-32 only; 5, the
//! default = self-checking batches with a CRC-32C each, END without them).

use std::time::Instant;

use tern_migration::wire::{
    is_zero_page, Expectations, Limits, PageData, RamBlockInfo, RamPage, Record, StreamConfig,
    StreamReader, StreamWriter,
};

const PS: usize = 4096;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let version: u32 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(tern_migration::wire::CURRENT_VERSION);
    let size = mib << 20;
    let pages = size / PS;
    let mut src = vec![0u8; size];
    for (i, p) in src.chunks_exact_mut(PS).enumerate() {
        if i % 8 != 7 {
            for (j, b) in p.iter_mut().enumerate().step_by(64) {
                *b = (i ^ j) as u8 | 1;
            }
        }
    }
    let cfg = StreamConfig {
        page_size: PS as u32,
        vcpu_count: 1,
        tsc_khz: 1_000_000,
        vm_uuid: uuid::Uuid::nil(),
        ram_blocks: vec![RamBlockInfo {
            id: "ram0".into(),
            gpa: 0,
            size: size as u64,
        }],
        cpuid: vec![],
        machine_blob: vec![],
    };
    let gib = size as f64 / (1u64 << 30) as f64;

    // Encode (zero detection included, as the engine does it).
    // Pre-fault the output so page faults of a fresh buffer are not measured.
    let mut out = vec![1u8; size + size / 256 + 4096];
    out.clear();
    let t = Instant::now();
    let mut w = StreamWriter::with_version(&mut out, &cfg, &Limits::default(), version)?;
    let mut batch = Vec::with_capacity(1024);
    for (i, p) in src.chunks_exact(PS).enumerate() {
        let page = i as u32;
        batch.push(if is_zero_page(p) {
            RamPage::zero(0, page)
        } else {
            RamPage::normal(0, page, p)
        });
        if batch.len() == 1024 {
            w.write_ram_batch(&batch)?;
            batch.clear();
        }
    }
    w.write_ram_batch(&batch)?;
    w.finish()?;
    let enc = t.elapsed().as_secs_f64();
    println!("stream version {version}");
    println!(
        "encode: {pages} pages ({mib} MiB) -> {} bytes in {:.3} s = {:.2} GiB/s",
        out.len(),
        enc,
        gib / enc
    );

    // Decode only (CRC + validation; pages handed out as slices).
    let t = Instant::now();
    let mut r = StreamReader::new(
        &out[..],
        Limits::default(),
        Expectations::from_config(&cfg, false),
    )?;
    let (mut normal, mut zero) = (0usize, 0usize);
    loop {
        match r.next_record()? {
            Record::Ram(b) => {
                normal += b.normal_pages();
                zero += b.zero_pages();
            }
            Record::End(_) => break,
            _ => {}
        }
    }
    let dec = t.elapsed().as_secs_f64();
    println!(
        "decode: {normal} normal + {zero} zero pages in {:.3} s = {:.2} GiB/s",
        dec,
        gib / dec
    );

    // Decode and store into guest memory.
    let mut dst = vec![1u8; size];
    let t = Instant::now();
    let mut r = StreamReader::new(
        &out[..],
        Limits::default(),
        Expectations::from_config(&cfg, false),
    )?;
    loop {
        match r.next_record()? {
            Record::Ram(b) => {
                for p in b.pages() {
                    let off = p.page as usize * PS;
                    if let Some(d) = dst.get_mut(off..off + PS) {
                        match p.data {
                            PageData::Normal(s) => d.copy_from_slice(s),
                            PageData::Zero => d.fill(0),
                        }
                    }
                }
            }
            Record::End(_) => break,
            _ => {}
        }
    }
    let dec2 = t.elapsed().as_secs_f64();
    println!(
        "decode+store: {:.3} s = {:.2} GiB/s (identical: {})",
        dec2,
        gib / dec2,
        dst == src
    );
    Ok(())
}
