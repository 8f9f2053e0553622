//! `tern analyze-stream FILE`: a JSON description of a stream, like QEMU's
//! `scripts/analyze-migration.py`.

use std::io::Read;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::config::Expectations;
use super::error::WireError;
use super::format::Limits;
use super::reader::StreamReader;
use super::record::{Command, Record};

/// Counters for a run of consecutive RAM records.
#[derive(Default)]
struct RamRun {
    offset: u64,
    batches: u64,
    normal: u64,
    zero: u64,
    bytes: u64,
    /// Version 5: (generation, sequence) of the run's first and last batch.
    first: Option<(u32, u64)>,
    last: Option<(u32, u64)>,
}

impl RamRun {
    fn to_json(&self) -> Value {
        let mut v = json!({
            "offset": self.offset,
            "type": "ram",
            "batches": self.batches,
            "normal_pages": self.normal,
            "zero_pages": self.zero,
            "size": self.bytes,
        });
        if let (Some((g, first)), Some((_, last)), Value::Object(m)) =
            (self.first, self.last, &mut v)
        {
            m.insert("generation".into(), json!(g));
            m.insert("seq".into(), json!([first, last]));
        }
        v
    }
}

fn error_json(e: &WireError) -> Value {
    json!({ "message": e.to_string(), "offset": e.offset() })
}

/// Reads a whole stream from `r` and describes it: header, config, every record (consecutive
/// RAM records are collapsed into one entry with page counts), RAM totals per block, the END
/// record and the checksum verdict, trailing bytes. Decoding stops at the first error, which is
/// reported in `"error"` (`"ok": false`) after everything parsed before it.
pub fn analyze<R: Read>(r: R, limits: &Limits) -> Value {
    let mut out = Map::new();
    let mut reader = match StreamReader::new(r, limits.clone(), Expectations::default()) {
        Ok(rd) => rd,
        Err(e) => {
            out.insert("ok".into(), Value::Bool(false));
            out.insert("error".into(), error_json(&e));
            return Value::Object(out);
        }
    };
    let h = *reader.header();
    out.insert(
        "header".into(),
        json!({ "magic": "TERNMIG", "version": h.version, "flags": h.flags }),
    );
    let cfg = reader.config().clone();
    out.insert(
        "config".into(),
        json!({
            "page_size": cfg.page_size,
            "vcpu_count": cfg.vcpu_count,
            "tsc_khz": cfg.tsc_khz,
            "vm_uuid": cfg.vm_uuid.to_string(),
            "ram_blocks": cfg.ram_blocks.iter().enumerate().map(|(i, b)| json!({
                "index": i, "id": b.id, "gpa": format!("{:#x}", b.gpa), "size": b.size,
                "pages": b.pages(cfg.page_size),
            })).collect::<Vec<_>>(),
            "cpuid": cfg.cpuid.iter().map(|c| json!({
                "function": format!("{:#x}", c.function), "index": format!("{:#x}", c.index),
                "eax": format!("{:#010x}", c.eax), "ebx": format!("{:#010x}", c.ebx),
                "ecx": format!("{:#010x}", c.ecx), "edx": format!("{:#010x}", c.edx),
            })).collect::<Vec<_>>(),
            "machine_blob_size": cfg.machine_blob.len(),
        }),
    );

    let mut records = Vec::new();
    let mut run: Option<RamRun> = None;
    let mut per_block = vec![(0u64, 0u64); cfg.ram_blocks.len()];
    let (mut total_normal, mut total_zero, mut batches) = (0u64, 0u64, 0u64);
    let mut sections = 0u64;
    let mut error = None;
    loop {
        let offset = reader.position();
        let rec = match reader.next_record() {
            Ok(r) => r,
            Err(e) => {
                error = Some(e);
                break;
            }
        };
        if let Record::Ram(b) = &rec {
            let r = run.get_or_insert_with(|| RamRun {
                offset,
                ..RamRun::default()
            });
            r.batches += 1;
            if let Some(h) = b.header() {
                r.first.get_or_insert((h.generation, h.seq));
                r.last = Some((h.generation, h.seq));
            }
            r.normal += b.normal_pages() as u64;
            r.zero += b.zero_pages() as u64;
            batches += 1;
            total_normal += b.normal_pages() as u64;
            total_zero += b.zero_pages() as u64;
            for p in b.pages() {
                if let Some(c) = per_block.get_mut(usize::from(p.block)) {
                    match p.data {
                        super::record::PageData::Zero => c.1 += 1,
                        super::record::PageData::Normal(_) => c.0 += 1,
                    }
                }
            }
            let bytes = b.wire_len();
            if let Some(r) = run.as_mut() {
                r.bytes += bytes;
            }
            continue;
        }
        if let Some(r) = run.take() {
            records.push(r.to_json());
        }
        let v = match rec {
            Record::Section(c) | Record::DeviceChunk(c) => {
                sections += 1;
                json!({
                    "offset": offset,
                    "type": rec.name(),
                    "id": c.id,
                    "instance": c.instance,
                    "version": c.version,
                    "data_size": c.data.len(),
                    "size": 5 + 1 + 8 + c.id.len() + c.data.len(),
                })
            }
            Record::Command(c) => {
                let mut v = json!({ "offset": offset, "type": "command", "command": c.name() });
                match c {
                    Command::IterationEnd { pass } => v["pass"] = json!(pass),
                    Command::Ping { seq } => v["seq"] = json!(seq),
                    Command::RunState { running } => v["running"] = json!(running),
                    Command::Capabilities {
                        switchover_ack,
                        validate_uuid,
                        ram_digest,
                        postcopy_ram,
                        postcopy_preempt,
                        multifd,
                    } => {
                        v["multifd"] = json!(multifd);
                        v["switchover-ack"] = json!(switchover_ack);
                        v["validate-uuid"] = json!(validate_uuid);
                        v["x-tern-ram-digest"] = json!(ram_digest);
                        v["postcopy-ram"] = json!(postcopy_ram);
                        v["postcopy-preempt"] = json!(postcopy_preempt);
                    }
                    Command::PostcopyPreempt { token } => {
                        v["token"] =
                            json!(token.iter().map(|b| format!("{b:02x}")).collect::<String>());
                    }
                    Command::PostcopyAdvise { page_size } => v["page_size"] = json!(page_size),
                    Command::PostcopyRun { crc32, total_bytes } => {
                        v["crc32"] = json!(format!("{crc32:#010x}"));
                        v["total_bytes"] = json!(total_bytes);
                    }
                    Command::RecvBitmap { block } => v["block"] = json!(block),
                    Command::MultifdChannels {
                        channels,
                        compression,
                        id,
                    } => {
                        v["channels"] = json!(channels);
                        v["compression"] = json!(compression.name());
                        v["migration-id"] = json!(uuid::Uuid::from_bytes(id).to_string());
                    }
                    Command::OpenReturnPath
                    | Command::PostcopyResume
                    | Command::SwitchoverStart
                    | Command::PostcopyListen
                    | Command::MultifdEnd => {}
                }
                v
            }
            Record::RamDigest(d) => json!({
                "offset": offset,
                "type": "ram-digest",
                "chunk_bytes": 1u64 << d.chunk_shift,
                "chunks": d.blocks.iter().map(Vec::len).sum::<usize>(),
            }),
            Record::RamDiscard(d) => json!({
                "offset": offset,
                "type": "ram-discard",
                "block": d.block,
                "ranges": d.ranges.len(),
                "pages": d.ranges.iter().map(|r| u64::from(r.1)).sum::<u64>(),
            }),
            Record::End(e) => {
                out.insert(
                    "end".into(),
                    json!({
                        "offset": offset,
                        "crc32": format!("{:#010x}", e.crc32),
                        "total_bytes": e.total_bytes,
                        "checksum": "ok",
                    }),
                );
                break;
            }
            Record::Ram(_) => continue,
        };
        records.push(v);
    }
    if let Some(r) = run.take() {
        records.push(r.to_json());
    }
    let total_bytes = reader.position();
    out.insert("records".into(), Value::Array(records));
    out.insert(
        "ram".into(),
        json!({
            "batches": batches,
            "normal_pages": total_normal,
            "zero_pages": total_zero,
            "normal_bytes": total_normal * u64::from(cfg.page_size),
            "per_block": cfg.ram_blocks.iter().zip(&per_block).map(|(b, c)| json!({
                "id": b.id, "normal_pages": c.0, "zero_pages": c.1,
            })).collect::<Vec<_>>(),
        }),
    );
    out.insert("sections".into(), json!(sections));
    out.insert("stream_bytes".into(), json!(total_bytes));
    match error {
        None => {
            let mut inner = reader.into_inner();
            let mut trailing = 0u64;
            let mut buf = [0u8; 4096];
            loop {
                match inner.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => trailing += n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            out.insert("trailing_bytes".into(), json!(trailing));
            out.insert("ok".into(), Value::Bool(trailing == 0));
            if trailing != 0 {
                out.insert(
                    "error".into(),
                    json!({ "message": format!("{trailing} bytes after the end record"),
                            "offset": total_bytes }),
                );
            }
        }
        Some(e) => {
            if let WireError::ChecksumMismatch {
                expected,
                actual,
                bytes,
                offset,
            } = &e
            {
                out.insert(
                    "end".into(),
                    json!({
                        "offset": offset,
                        "crc32": format!("{expected:#010x}"),
                        "computed_crc32": format!("{actual:#010x}"),
                        "total_bytes": bytes,
                        "checksum": "mismatch",
                    }),
                );
            }
            out.insert("ok".into(), Value::Bool(false));
            out.insert("error".into(), error_json(&e));
        }
    }
    Value::Object(out)
}

/// [`analyze`] on a file with default limits. Fails only when the file cannot be opened.
pub fn analyze_file(path: &Path) -> std::io::Result<Value> {
    let f = std::fs::File::open(path)?;
    let mut v = analyze(std::io::BufReader::new(f), &Limits::default());
    if let Value::Object(m) = &mut v {
        m.insert("file".into(), json!(path.display().to_string()));
    }
    Ok(v)
}
