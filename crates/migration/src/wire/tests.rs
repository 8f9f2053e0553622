//! Encode → decode round trips of every record, config checks, return path and `analyze`.

use uuid::Uuid;

use super::*;

pub(super) const PS: usize = 4096;

pub(super) fn sample_config() -> StreamConfig {
    StreamConfig {
        page_size: PS as u32,
        vcpu_count: 2,
        tsc_khz: 2_100_000,
        vm_uuid: Uuid::from_u128(0x1234_5678_9abc_def0_1122_3344_5566_7788),
        ram_blocks: vec![
            RamBlockInfo {
                id: "ram-low".into(),
                gpa: 0,
                size: 64 * PS as u64,
            },
            RamBlockInfo {
                id: "ram-high".into(),
                gpa: 1 << 32,
                size: 16 * PS as u64,
            },
        ],
        cpuid: vec![CpuidEntry {
            function: 1,
            index: 0,
            eax: 0x806f8,
            ebx: 0x800,
            ecx: 0xfeda_3203,
            edx: 0x178b_fbff,
        }],
        machine_blob: b"machine-config".to_vec(),
    }
}

pub(super) fn page(fill: u8) -> Vec<u8> {
    let mut p = vec![fill; PS];
    p[0] = fill.wrapping_add(1);
    p
}

/// A small stream with one record of every kind, in the version the engine writes (5).
pub(super) fn sample_stream() -> Vec<u8> {
    sample_stream_v(VERSION_BATCH_INTEGRITY)
}

/// [`sample_stream`] in stream `version` (1 = the RAM layout without batch framing).
pub(super) fn sample_stream_v(version: u32) -> Vec<u8> {
    let cfg = sample_config();
    let mut w = StreamWriter::with_version(Vec::new(), &cfg, &Limits::default(), version).unwrap();
    let (a, b) = (page(0xaa), page(0x55));
    w.write_command(Command::OpenReturnPath).unwrap();
    w.write_command(Command::Ping { seq: 1 }).unwrap();
    w.write_device_chunk("state-dev", 0, 3, b"initial-data")
        .unwrap();
    w.write_ram_batch(&[
        RamPage::normal(0, 0, &a),
        RamPage::zero(0, 1),
        RamPage::normal(1, 15, &b),
    ])
    .unwrap();
    w.write_command(Command::IterationEnd { pass: 1 }).unwrap();
    w.write_command(Command::SwitchoverStart).unwrap();
    w.write_section("vcpu", 1, 2, b"vcpu-state").unwrap();
    w.write_section("serial", 0, 1, &[]).unwrap();
    w.finish().unwrap()
}

fn open(bytes: &[u8]) -> StreamReader<&[u8]> {
    let cfg = sample_config();
    StreamReader::new(
        bytes,
        Limits::default(),
        Expectations::from_config(&cfg, true),
    )
    .unwrap()
}

#[test]
fn round_trip_every_record() {
    for version in [
        VERSION_1,
        VERSION_RAM_DIGEST,
        VERSION_POSTCOPY,
        VERSION_BATCH_INTEGRITY,
    ] {
        round_trip_every_record_in(version);
    }
}

fn round_trip_every_record_in(version: u32) {
    let bytes = sample_stream_v(version);
    let mut r = open(&bytes);
    assert_eq!(r.header().version, version);
    assert_eq!(r.config(), &sample_config());
    assert_eq!(
        r.next_record().unwrap(),
        Record::Command(Command::OpenReturnPath)
    );
    assert_eq!(
        r.next_record().unwrap(),
        Record::Command(Command::Ping { seq: 1 })
    );
    match r.next_record().unwrap() {
        Record::DeviceChunk(c) => {
            assert_eq!((c.id, c.instance, c.version), ("state-dev", 0, 3));
            assert_eq!(c.data, b"initial-data");
        }
        other => panic!("{other:?}"),
    }
    match r.next_record().unwrap() {
        Record::Ram(b) => {
            assert_eq!((b.len(), b.normal_pages(), b.zero_pages()), (3, 2, 1));
            let pages: Vec<_> = b.pages().collect();
            assert_eq!(pages[0], RamPage::normal(0, 0, &page(0xaa)));
            assert_eq!(pages[1], RamPage::zero(0, 1));
            assert_eq!(pages[2], RamPage::normal(1, 15, &page(0x55)));
            let framed = version >= VERSION_BATCH_INTEGRITY;
            let header = BatchHeader {
                channel: 0,
                generation: 1,
                seq: 0,
            };
            assert_eq!(b.header(), framed.then_some(header));
            let framing = if framed { 20 } else { 0 };
            assert_eq!(b.wire_len(), (5 + framing + 4 + 3 * 8 + 2 * PS) as u64);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        r.next_record().unwrap(),
        Record::Command(Command::IterationEnd { pass: 1 })
    );
    assert_eq!(
        r.next_record().unwrap(),
        Record::Command(Command::SwitchoverStart)
    );
    match r.next_record().unwrap() {
        Record::Section(c) => assert_eq!(
            (c.id, c.instance, c.version, c.data),
            ("vcpu", 1, 2, &b"vcpu-state"[..])
        ),
        other => panic!("{other:?}"),
    }
    match r.next_record().unwrap() {
        Record::Section(c) => assert_eq!((c.id, c.data.len()), ("serial", 0)),
        other => panic!("{other:?}"),
    }
    match r.next_record().unwrap() {
        Record::End(e) => assert_eq!(e.total_bytes + HEADER_LEN + 5 + 12, bytes.len() as u64),
        other => panic!("{other:?}"),
    }
    assert!(r.is_ended());
    assert_eq!(r.position(), bytes.len() as u64);
    assert!(matches!(r.next_record(), Err(WireError::Finished(_))));
}

#[test]
fn writer_counts_bytes_and_splits_batches() {
    let cfg = sample_config();
    let limits = Limits {
        max_pages_per_batch: 4,
        ..Limits::default()
    };
    let mut w = StreamWriter::with_limits(Vec::new(), &cfg, &limits).unwrap();
    let data = page(1);
    let pages: Vec<_> = (0..10).map(|i| RamPage::normal(0, i, &data)).collect();
    w.write_ram_batch(&pages).unwrap();
    let written = w.bytes_written();
    let bytes = w.finish().unwrap();
    assert_eq!(written + 5 + 12, bytes.len() as u64);
    let mut r = StreamReader::new(&bytes[..], limits, Expectations::default()).unwrap();
    let mut sizes = vec![];
    loop {
        match r.next_record().unwrap() {
            Record::Ram(b) => sizes.push(b.len()),
            Record::End(_) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(sizes, [4, 4, 2]);
}

#[test]
fn writer_rejects_bad_arguments() {
    let cfg = sample_config();
    let mut w = StreamWriter::new(Vec::new(), &cfg).unwrap();
    let p = page(0);
    for bad in [
        RamPage::normal(2, 0, &p),
        RamPage::normal(0, 64, &p),
        RamPage::zero(1, 16),
        RamPage::normal(0, 0, &p[..100]),
    ] {
        assert!(matches!(
            w.write_ram_batch(&[bad]),
            Err(WireError::InvalidArgument(_))
        ));
    }
    assert!(w.write_section("", 0, 1, b"").is_err());
    assert!(w.write_section(&"x".repeat(256), 0, 1, b"").is_err());
    // The stream is still usable after refused arguments.
    let bytes = w.finish().unwrap();
    let mut r = open(&bytes);
    assert!(matches!(r.next_record().unwrap(), Record::End(_)));

    let mut bad = sample_config();
    bad.page_size = 3000;
    assert!(StreamWriter::new(Vec::new(), &bad).is_err());
    let mut bad = sample_config();
    bad.ram_blocks[1].gpa = 0x1000;
    assert!(StreamWriter::new(Vec::new(), &bad).is_err(), "overlap");
}

#[test]
fn config_mismatch_is_named() {
    let bytes = sample_stream();
    let check = |f: &dyn Fn(&mut StreamConfig), needle: &str| {
        let mut dst = sample_config();
        f(&mut dst);
        let err = StreamReader::new(
            &bytes[..],
            Limits::default(),
            Expectations::from_config(&dst, true),
        )
        .unwrap_err();
        assert!(matches!(err, WireError::ConfigMismatch(_)), "{err}");
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
    };
    check(&|c| c.vcpu_count = 4, "vCPU count");
    check(&|c| c.page_size = 8192, "page size");
    check(&|c| c.tsc_khz = 1, "TSC");
    check(&|c| c.vm_uuid = Uuid::nil(), "UUID");
    check(&|c| c.ram_blocks[1].size *= 2, "RAM block 1");
    check(
        &|c| c.ram_blocks.pop().map(|_| ()).unwrap_or(()),
        "RAM block count",
    );
    check(&|c| c.cpuid[0].ecx ^= 1, "CPUID leaf 0x1.0x0 ecx");
    check(&|c| c.cpuid.clear(), "missing");
    // UUID not checked without validate-uuid.
    let mut dst = sample_config();
    dst.vm_uuid = Uuid::nil();
    assert!(StreamReader::new(
        &bytes[..],
        Limits::default(),
        Expectations::from_config(&dst, false)
    )
    .is_ok());
}

#[test]
fn tsc_frequency_tolerance_and_scaling() {
    let bytes = sample_stream(); // source: 2_100_000 kHz
    let open_with = |dst_khz: u32, tolerance: u32, scaling: bool| {
        let mut dst = sample_config();
        dst.tsc_khz = dst_khz;
        let mut e = Expectations::from_config(&dst, true);
        e.tsc_tolerance_khz = tolerance;
        e.tsc_scaling = scaling;
        StreamReader::new(&bytes[..], Limits::default(), e).map(|_| ())
    };
    assert!(open_with(2_100_000, 0, false).is_ok());
    assert!(
        open_with(2_100_900, 1000, false).is_ok(),
        "within tolerance"
    );
    let e = open_with(2_101_001, 1000, false).unwrap_err();
    assert!(
        e.to_string()
            .contains("TSC frequency: source 2100000 kHz, destination 2101001 kHz"),
        "{e}"
    );
    assert!(
        open_with(3_000_000, 1000, true).is_ok(),
        "scaling accepts any rate"
    );
    assert!(open_with(0, 0, false).is_ok(), "destination rate unknown");
    // A source that does not know its rate is not compared either.
    let mut src = sample_config();
    src.tsc_khz = 0;
    let mut w = StreamWriter::new(Vec::new(), &src).unwrap();
    w.write_command(Command::SwitchoverStart).unwrap();
    let unknown = w.finish().unwrap();
    let e = Expectations::from_config(&sample_config(), true);
    assert!(StreamReader::new(&unknown[..], Limits::default(), e).is_ok());
}

#[test]
fn capabilities_round_trip() {
    let cfg = sample_config();
    for (switchover_ack, validate_uuid) in
        [(false, false), (true, false), (false, true), (true, true)]
    {
        let c = Command::Capabilities {
            switchover_ack,
            validate_uuid,
            ram_digest: false,
            postcopy_ram: false,
            postcopy_preempt: false,
            multifd: false,
        };
        let mut w = StreamWriter::new(Vec::new(), &cfg).unwrap();
        w.write_command(c).unwrap();
        let bytes = w.finish().unwrap();
        let mut r = open(&bytes);
        assert_eq!(r.next_record().unwrap(), Record::Command(c));
        let a = analyze(&bytes[..], &Limits::default());
        assert_eq!(a["records"][0]["validate-uuid"], validate_uuid, "{a}");
        assert_eq!(a["records"][0]["switchover-ack"], switchover_ack, "{a}");
    }
}

#[test]
fn component_versions_are_checked() {
    let bytes = sample_stream();
    let cfg = sample_config();
    let comps = |vcpu_min: u32| {
        vec![
            ComponentVersion {
                id: "vcpu".into(),
                min_version: vcpu_min,
                max_version: 5,
            },
            ComponentVersion {
                id: "serial".into(),
                min_version: 1,
                max_version: 1,
            },
            ComponentVersion {
                id: "state-dev".into(),
                min_version: 1,
                max_version: 3,
            },
        ]
    };
    let run = |comps: Vec<ComponentVersion>| -> Result<(), WireError> {
        let mut e = Expectations::from_config(&cfg, true);
        e.components = Some(comps);
        let mut r = StreamReader::new(&bytes[..], Limits::default(), e)?;
        while !matches!(r.next_record()?, Record::End(_)) {}
        Ok(())
    };
    run(comps(1)).unwrap();
    let e = run(comps(3)).unwrap_err();
    assert!(
        matches!(
            e,
            WireError::UnsupportedComponentVersion {
                version: 2,
                min: 3,
                ..
            }
        ),
        "{e}"
    );
    let mut c = comps(1);
    c.retain(|c| c.id != "serial");
    let e = run(c).unwrap_err();
    assert!(e.to_string().contains("unknown component 'serial'"), "{e}");
}

#[test]
fn return_path_round_trip() {
    let msgs = [
        RpMessage::Shut { error: false },
        RpMessage::Shut { error: true },
        RpMessage::Pong { seq: 0xdead_beef },
        RpMessage::SwitchoverAck,
        RpMessage::Error {
            message: "load of 'vcpu' failed: bad MSR".into(),
        },
        RpMessage::Resumed,
        RpMessage::ReqPages {
            block: 1,
            first_page: 8,
            count: 8,
        },
    ];
    let mut bytes = Vec::new();
    for m in &msgs {
        m.write_to(&mut bytes).unwrap();
    }
    let cfg = sample_config();
    let mut r = ReturnPathReader::with_config(&bytes[..], &cfg, &Limits::default());
    for m in &msgs {
        assert_eq!(r.read_message().unwrap().as_ref(), Some(m));
    }
    assert_eq!(r.read_message().unwrap(), None);

    // Long error text is cut at a char boundary, not rejected.
    let long = RpMessage::Error {
        message: "é".repeat(3000),
    };
    let enc = long.encode();
    match ReturnPathReader::new(&enc[..]).read_message().unwrap() {
        Some(RpMessage::Error { message }) => assert_eq!(message.len(), 4096),
        other => panic!("{other:?}"),
    }
}

#[test]
fn return_path_hostile() {
    let cfg = sample_config();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![1, 0, 4, 0, 1, 0], "truncated"),
        (vec![1, 0], "truncated"),
        (vec![1, 0, 3, 0, 0, 0, 0], "length"),
        (vec![1, 0, 4, 0, 2, 0, 0, 0], "SHUT error flag"),
        (vec![10, 0, 0, 0], "unknown return-path message type 10"),
        (vec![4, 0, 0, 0], "error text length"),
        (vec![4, 0, 0xff, 0xff], "error text length"),
        (vec![4, 0, 2, 0, 0xff, 0xfe], "UTF-8"),
        (vec![3, 0, 1, 0, 0], "length"),
        (
            RpMessage::ReqPages {
                block: 5,
                first_page: 0,
                count: 1,
            }
            .encode(),
            "RAM blocks",
        ),
        (
            RpMessage::ReqPages {
                block: 1,
                first_page: 10,
                count: 7,
            }
            .encode(),
            "block has 16 pages",
        ),
        (
            RpMessage::ReqPages {
                block: 0,
                first_page: 0,
                count: 0,
            }
            .encode(),
            "count",
        ),
    ];
    for (bytes, needle) in cases {
        let err = ReturnPathReader::with_config(&bytes[..], &cfg, &Limits::default())
            .read_message()
            .unwrap_err();
        assert!(
            err.to_string().contains(needle),
            "{bytes:?}: '{err}' lacks '{needle}'"
        );
    }
}

#[test]
fn analyze_describes_stream() {
    let bytes = sample_stream();
    let v = analyze(&bytes[..], &Limits::default());
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(v["header"]["version"], VERSION_BATCH_INTEGRITY);
    assert_eq!(v["config"]["vcpu_count"], 2);
    assert_eq!(v["config"]["ram_blocks"][1]["id"], "ram-high");
    assert_eq!(v["config"]["ram_blocks"][1]["pages"], 16);
    assert_eq!(v["ram"]["normal_pages"], 2);
    assert_eq!(v["ram"]["zero_pages"], 1);
    assert_eq!(v["ram"]["per_block"][0]["zero_pages"], 1);
    assert_eq!(v["end"]["checksum"], "ok");
    assert_eq!(v["trailing_bytes"], 0);
    let recs = v["records"].as_array().unwrap();
    let types: Vec<_> = recs.iter().map(|r| r["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "command",
            "command",
            "device-chunk",
            "ram",
            "command",
            "command",
            "section",
            "section"
        ]
    );
    assert_eq!(recs[6]["id"], "vcpu");
    assert_eq!(recs[6]["version"], 2);
    assert_eq!(recs[3]["normal_pages"], 2);
    assert_eq!(recs[3]["size"], 5 + 20 + 4 + 3 * 8 + 2 * PS, "{v:#}");
    assert_eq!(recs[3]["generation"], 1);
    assert_eq!(recs[3]["seq"], serde_json::json!([0, 0]));

    // Corrupted payload byte → checksum verdict "mismatch".
    let mut bad = bytes.clone();
    let n = bad.len();
    bad[n - 30] ^= 0x40;
    let v = analyze(&bad[..], &Limits::default());
    assert_eq!(v["ok"], false);
    assert_eq!(v["end"]["checksum"], "mismatch", "{v:#}");

    // Trailing garbage is reported.
    let mut extra = bytes.clone();
    extra.extend_from_slice(b"junk");
    let v = analyze(&extra[..], &Limits::default());
    assert_eq!(
        (v["ok"].clone(), v["trailing_bytes"].clone()),
        (false.into(), 4.into())
    );

    // From a file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap.tern");
    std::fs::write(&path, &bytes).unwrap();
    let v = analyze_file(&path).unwrap();
    assert_eq!(v["ok"], true);
    let v = analyze(&b"QEVM\0\0\0\x03garbage!"[..], &Limits::default());
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("bad magic"));
}

#[test]
fn zero_page_detection() {
    assert!(is_zero_page(&[0u8; 4096]));
    let mut p = [0u8; 4096];
    p[4095] = 1;
    assert!(!is_zero_page(&p));
    p[4095] = 0;
    p[7] = 1;
    assert!(!is_zero_page(&p));
    assert!(is_zero_page(&[]));
}
