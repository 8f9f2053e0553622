//! Capabilities/parameters: defaults, ranges, conflicts, JSON in and out.

use serde_json::json;

use super::*;

fn set_caps(c: &mut Capabilities, list: &[(&str, bool)]) -> Result<(), ParamError> {
    let arr: Vec<_> = list
        .iter()
        .map(|(n, s)| json!({"capability": n, "state": s}))
        .collect();
    c.apply_json(&json!({ "capabilities": arr }), &Parameters::default())
}

#[test]
fn capability_list_matches_qemu() {
    let caps = Capabilities::default();
    let q = caps.to_query_json();
    let names: Vec<_> = q
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["capability"].as_str().unwrap())
        .collect();
    // QEMU 10's 22, then Tern's own (`x-tern-`), which QEMU tools ignore.
    assert_eq!(names.len(), 24);
    assert_eq!(names[22..], ["x-tern-ram-digest", "x-tern-postcopy-auto"]);
    for n in [
        "xbzrle",
        "rdma-pin-all",
        "auto-converge",
        "zero-blocks",
        "events",
        "postcopy-ram",
        "x-colo",
        "release-ram",
        "return-path",
        "pause-before-switchover",
        "multifd",
        "dirty-bitmaps",
        "postcopy-blocktime",
        "late-block-activate",
        "x-ignore-shared",
        "validate-uuid",
        "background-snapshot",
        "zero-copy-send",
        "postcopy-preempt",
        "switchover-ack",
        "dirty-limit",
        "mapped-ram",
    ] {
        assert!(names.contains(&n), "{n}");
    }
    assert!(q.as_array().unwrap().iter().all(|c| c["state"] == false));
    let implemented: Vec<_> = Capability::ALL
        .iter()
        .filter(|c| c.implemented())
        .map(|c| c.name())
        .collect();
    assert_eq!(
        implemented,
        [
            "auto-converge",
            "events",
            "postcopy-ram",
            "release-ram",
            "return-path",
            "pause-before-switchover",
            "multifd",
            "postcopy-blocktime",
            "validate-uuid",
            "zero-copy-send",
            "postcopy-preempt",
            "switchover-ack",
            "x-tern-ram-digest",
            "x-tern-postcopy-auto"
        ]
    );
}

#[test]
fn capability_rules() {
    let mut c = Capabilities::default();
    let e = set_caps(&mut c, &[("switchover-ack", true)]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Capability 'switchover-ack' requires capability 'return-path'"
    );
    set_caps(
        &mut c,
        &[
            ("return-path", true),
            ("switchover-ack", true),
            ("events", true),
        ],
    )
    .unwrap();
    assert!(c.get(Capability::SwitchoverAck) && c.get(Capability::ReturnPath));
    // Turning return-path off while switchover-ack stays on is refused, atomically.
    assert!(set_caps(&mut c, &[("return-path", false)]).is_err());
    assert!(c.get(Capability::ReturnPath));

    // x-tern-postcopy-auto needs postcopy-ram, set in the same call or before; turning
    // postcopy-ram off under it is refused.
    let mut c = Capabilities::default();
    let e = set_caps(&mut c, &[("x-tern-postcopy-auto", true)]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("Capability 'x-tern-postcopy-auto' requires capability 'postcopy-ram'"),
        "{e}"
    );
    set_caps(
        &mut c,
        &[("x-tern-postcopy-auto", true), ("postcopy-ram", true)],
    )
    .unwrap();
    assert!(set_caps(&mut c, &[("postcopy-ram", false)]).is_err());
    assert!(c.get(Capability::XTernPostcopyAuto) && c.get(Capability::PostcopyRam));

    // release-ram likewise (QEMU accepts it alone and does nothing; Tern refuses what would
    // silently do nothing).
    let mut c = Capabilities::default();
    let e = set_caps(&mut c, &[("release-ram", true)]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("Capability 'release-ram' requires capability 'postcopy-ram'"),
        "{e}"
    );
    set_caps(&mut c, &[("release-ram", true), ("postcopy-ram", true)]).unwrap();
    assert!(set_caps(&mut c, &[("postcopy-ram", false)]).is_err());
    assert!(c.get(Capability::ReleaseRam) && c.get(Capability::PostcopyRam));

    let mut c = Capabilities::default();
    for (list, msg) in [
        (
            vec![("postcopy-preempt", true)],
            "Postcopy preempt requires postcopy-ram",
        ),
        (
            vec![("multifd", true), ("xbzrle", true)],
            "Multifd is not compatible with xbzrle",
        ),
        (
            vec![("dirty-limit", true), ("auto-converge", true)],
            "dirty-limit conflicts with auto-converge either of then available currently",
        ),
        (
            vec![("background-snapshot", true), ("return-path", true)],
            "Background-snapshot is not compatible with return-path",
        ),
        (
            vec![("postcopy-ram", true), ("x-ignore-shared", true)],
            "Postcopy is not compatible with ignore-shared",
        ),
        (
            vec![("zero-copy-send", true)],
            "Zero copy only available for non-compressed non-TLS multifd migration",
        ),
        (
            vec![("mapped-ram", true), ("xbzrle", true)],
            "Mapped-ram migration is incompatible with xbzrle",
        ),
    ] {
        assert_eq!(set_caps(&mut c, &list).unwrap_err().to_string(), msg);
        assert_eq!(
            c,
            Capabilities::default(),
            "failed set must not change anything"
        );
    }
    // Disabling an unimplemented capability is fine.
    set_caps(&mut c, &[("xbzrle", false)]).unwrap();
}

#[test]
fn multifd_goes_with_postcopy_and_preempt_and_with_the_ram_digest() {
    // QEMU 10.1 allows multifd with post-copy (decision 245); Tern's digest goes with multifd
    // (decision 252), in whichever order they are set.
    let mut c = Capabilities::default();
    set_caps(
        &mut c,
        &[
            ("multifd", true),
            ("postcopy-ram", true),
            ("postcopy-preempt", true),
        ],
    )
    .unwrap();
    assert!(c.get(Capability::Multifd) && c.get(Capability::PostcopyRam));
    let mut c = Capabilities::default();
    set_caps(&mut c, &[("multifd", true), ("x-tern-ram-digest", true)]).unwrap();
    assert!(c.get(Capability::Multifd) && c.get(Capability::XTernRamDigest));
    let mut c = Capabilities::default();
    set_caps(&mut c, &[("x-tern-ram-digest", true)]).unwrap();
    set_caps(&mut c, &[("multifd", true)]).unwrap();
    assert!(c.get(Capability::Multifd) && c.get(Capability::XTernRamDigest));
}

#[test]
fn auto_converge_is_accepted_and_dirty_limit_stays_refused() {
    let mut c = Capabilities::default();
    set_caps(&mut c, &[("auto-converge", true)]).unwrap();
    assert!(c.get(Capability::AutoConverge));
    // QEMU's conflict first, then Tern's refusal of dirty-limit on its own.
    assert_eq!(
        set_caps(&mut c, &[("dirty-limit", true)])
            .unwrap_err()
            .to_string(),
        "dirty-limit conflicts with auto-converge either of then available currently"
    );
    let mut c = Capabilities::default();
    assert_eq!(
        set_caps(&mut c, &[("dirty-limit", true)])
            .unwrap_err()
            .to_string(),
        "Capability 'dirty-limit' is not yet supported by Tern"
    );
    // The throttle parameters keep QEMU's checks.
    let mut p = Parameters::default();
    assert_eq!(
        p.apply_json(
            &json!({"max-cpu-throttle": 10, "cpu-throttle-initial": 20}),
            &Capabilities::default(),
        )
            .unwrap_err()
            .to_string(),
        "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99"
    );
}

#[test]
fn capability_json_errors() {
    let mut c = Capabilities::default();
    let p = Parameters::default();
    for (args, msg) in [
        (json!({}), "Parameter 'capabilities' is missing"),
        (
            json!({"capabilities": 1}),
            "Invalid parameter type for 'capabilities', expected: array",
        ),
        (
            json!({"capabilities": [], "x": 1}),
            "Parameter 'x' is unexpected",
        ),
        (
            json!({"capabilities": [{"capability": "bogus", "state": true}]}),
            "Parameter 'capabilities[0].capability' does not accept value 'bogus'",
        ),
        (
            json!({"capabilities": [{"capability": "events", "state": "yes"}]}),
            "Invalid parameter type for 'capabilities[0].state', expected: boolean",
        ),
        (
            json!({"capabilities": [{"capability": "events"}]}),
            "Parameter 'capabilities[0].state' is missing",
        ),
    ] {
        assert_eq!(c.apply_json(&args, &p).unwrap_err().to_string(), msg);
    }
}

#[test]
fn not_running_check() {
    assert_eq!(
        check_not_running(MigrationStatus::Active)
            .unwrap_err()
            .to_string(),
        "There's a migration process in progress"
    );
    assert!(check_not_running(MigrationStatus::Completed).is_ok());
    assert!(check_not_running(MigrationStatus::None).is_ok());
}

#[test]
fn parameter_defaults() {
    let q = Parameters::default().to_query_json();
    for (k, v) in [
        ("downtime-limit", json!(300)),
        ("max-bandwidth", json!(134_217_728u64)),
        ("avail-switchover-bandwidth", json!(0)),
        ("multifd-channels", json!(2)),
        ("multifd-compression", json!("none")),
        ("multifd-zstd-level", json!(1)),
        ("multifd-zlib-level", json!(1)),
        ("xbzrle-cache-size", json!(64u64 << 20)),
        ("cpu-throttle-initial", json!(20)),
        ("cpu-throttle-increment", json!(10)),
        ("cpu-throttle-tailslow", json!(false)),
        ("max-cpu-throttle", json!(99)),
        ("throttle-trigger-threshold", json!(50)),
        ("announce-initial", json!(50)),
        ("announce-max", json!(550)),
        ("announce-rounds", json!(5)),
        ("announce-step", json!(100)),
        ("max-postcopy-bandwidth", json!(0)),
        ("x-vcpu-dirty-limit-period", json!(1000)),
        ("vcpu-dirty-limit", json!(1)),
        ("tls-creds", json!("")),
        ("mode", json!("normal")),
        ("zero-page-detection", json!("multifd")),
        ("x-checkpoint-delay", json!(20000)),
        ("x-tern-liveness-timeout", json!(10_000)),
    ] {
        assert_eq!(q[k], v, "{k}");
    }
    // Exactly the names of the PARAMETERS table.
    let obj = q.as_object().unwrap();
    let mut names: Vec<&str> = PARAMETERS.iter().map(|(n, _)| *n).collect();
    names.sort_unstable();
    assert_eq!(obj.keys().map(String::as_str).collect::<Vec<_>>(), names);
}

#[test]
fn parameter_ranges_and_messages() {
    let caps = Capabilities::default();
    for (args, msg) in [
        (
            json!({"downtime-limit": 2_000_001}),
            "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 ms",
        ),
        (json!({"multifd-channels": 0}), "Parameter 'multifd_channels' expects a value between 1 and 255"),
        (json!({"multifd-channels": 256}), "Parameter 'multifd-channels' expects uint8"),
        (json!({"multifd-zstd-level": 21}), "Parameter 'multifd_zstd_level' expects a value between 0 and 20"),
        (json!({"multifd-zlib-level": 10}), "Parameter 'multifd_zlib_level' expects a value between 0 and 9"),
        (
            json!({"cpu-throttle-initial": 0}),
            "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99",
        ),
        (
            json!({"cpu-throttle-increment": 100}),
            "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99",
        ),
        (
            json!({"throttle-trigger-threshold": 101}),
            "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100",
        ),
        (
            json!({"max-cpu-throttle": 10}),
            "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99",
        ),
        (
            json!({"xbzrle-cache-size": 3 << 20}),
            "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size",
        ),
        (
            json!({"xbzrle-cache-size": 1024}),
            "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size",
        ),
        (json!({"announce-step": 0}), "Parameter 'announce_step' expects a value between 0 and 10000"),
        (json!({"announce-rounds": 1001}), "Parameter 'announce_rounds' expects a value between 0 and 1000"),
        (
            json!({"x-vcpu-dirty-limit-period": 0}),
            "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000",
        ),
        (json!({"vcpu-dirty-limit": 0}), "Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s"),
        (json!({"downtime-limit": "300"}), "Invalid parameter type for 'downtime-limit', expected: integer"),
        (json!({"max-bandwidth": -1}), "Parameter 'max-bandwidth' expects uint64"),
        (json!({"downtime-limit": 1.5}), "Parameter 'downtime-limit' expects uint64"),
        (json!({"cpu-throttle-tailslow": 1}), "Invalid parameter type for 'cpu-throttle-tailslow', expected: boolean"),
        (json!({"multifd-compression": "lz4"}), "Parameter 'multifd-compression' does not accept value 'lz4'"),
        (json!({"no-such": 1}), "Parameter 'no-such' is unexpected"),
        (json!({"mode": "cpr-reboot"}), "Migration mode 'cpr-reboot' is not yet supported by Tern"),
        (
            json!({"x-tern-liveness-timeout": 3_600_001}),
            "Parameter 'x-tern-liveness-timeout' expects a value between 0 and 3600000 (ms, 0 = off)",
        ),
        (json!({"x-tern-liveness-timeout": -1}), "Parameter 'x-tern-liveness-timeout' expects uint64"),
        (json!([1]), "Invalid parameter type for 'arguments', expected: object"),
    ] {
        let mut p = Parameters::default();
        let e = p.apply_json(&args, &caps).unwrap_err();
        assert_eq!(e.to_string(), msg, "{args}");
        assert_eq!(p, Parameters::default(), "failed set must not change anything");
    }
}

#[test]
fn parameter_set_applies_all_or_nothing() {
    let caps = Capabilities::default();
    let mut p = Parameters::default();
    p.apply_json(
        &json!({"downtime-limit": 2_000_000, "max-bandwidth": 0, "avail-switchover-bandwidth": 1_000_000_000u64,
                "multifd-compression": "zstd", "multifd-zstd-level": 20, "tls-creds": null,
                "tls-hostname": "host", "max-cpu-throttle": 20, "zero-page-detection": "legacy",
                "x-tern-liveness-timeout": 0}),
        &caps,
    )
    .unwrap();
    assert_eq!(p.downtime_limit, 2_000_000);
    assert_eq!(p.max_bandwidth, 0);
    assert_eq!(p.multifd_compression, MultifdCompression::Zstd);
    assert_eq!(p.zero_page_detection, ZeroPageDetection::Legacy);
    assert_eq!(p.tls_hostname, "host");
    assert_eq!(p.x_tern_liveness_timeout, 0);
    p.apply_json(&json!({"x-tern-liveness-timeout": 3_600_000}), &caps)
        .unwrap();
    assert_eq!(p.x_tern_liveness_timeout, 3_600_000);
    let before = p.clone();
    assert!(p
        .apply_json(&json!({"downtime-limit": 5, "multifd-channels": 0}), &caps)
        .is_err());
    assert_eq!(p, before);
    // Query output round-trips through set.
    let mut q = Parameters::default();
    q.apply_json(&p.to_query_json(), &caps).unwrap();
    assert_eq!(q, p);
}

/// Every PARAMETERS entry is accepted by `apply_json` with a value of its declared type (a
/// range or support check may still refuse the value, but never the name or the JSON type), and
/// refuses a value of another JSON type.
#[test]
fn parameters_table_matches_apply_json() {
    let caps = Capabilities::default();
    for (name, ty) in PARAMETERS {
        let (good, bad) = match ty {
            ParamType::Bool => (json!(true), json!(1)),
            ParamType::U8 | ParamType::U32 | ParamType::U64 => (json!(1), json!("1")),
            ParamType::StrOrNull => (json!(null), json!(1)),
            ParamType::MultifdCompression => (json!("zlib"), json!(1)),
            ParamType::MigMode => (json!("normal"), json!(1)),
            ParamType::ZeroPageDetection => (json!("legacy"), json!(1)),
        };
        let mut p = Parameters::default();
        if let Err(e) = p.apply_json(&json!({ *name: good }), &caps) {
            let e = e.to_string();
            assert!(
                !e.contains("unexpected") && !e.contains("Invalid parameter type"),
                "{name}: {e}"
            );
        }
        let e = p
            .apply_json(&json!({ *name: bad }), &caps)
            .expect_err("wrong JSON type");
        assert!(
            e.to_string().starts_with("Invalid parameter type"),
            "{name}: {e}"
        );
    }
}

#[test]
fn resume_timeout_parameter() {
    let caps = Capabilities::default();
    let mut p = Parameters::default();
    assert_eq!(p.to_query_json()["x-tern-resume-timeout"], json!(10_000));
    p.apply_json(&json!({"x-tern-resume-timeout": 250}), &caps)
        .unwrap();
    assert_eq!(p.x_tern_resume_timeout, 250);
    for bad in [0u64, MAX_RESUME_TIMEOUT_MS + 1] {
        let e = p
            .apply_json(&json!({"x-tern-resume-timeout": bad}), &caps)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Parameter 'x-tern-resume-timeout' expects a value between 1 and 3600000 ms"
        );
        assert_eq!(
            p.x_tern_resume_timeout, 250,
            "a refused value changes nothing"
        );
    }
    let e = p
        .apply_json(&json!({"x-tern-resume-timeout": "1s"}), &caps)
        .unwrap_err();
    assert!(e.to_string().contains("expected: integer"), "{e}");
}

#[test]
fn tls_parameters_are_accepted_and_shown_as_qemu_does() {
    let mut p = Parameters::default();
    let caps = Capabilities::default();
    let q = p.to_query_json();
    assert_eq!(
        (q["tls-creds"].as_str(), q["tls-hostname"].as_str()),
        (Some(""), Some(""))
    );
    assert_eq!(q["tls-authz"].as_str(), Some(""));
    p.apply_json(
        &json!({"tls-creds": "tls0", "tls-hostname": "hostb.example.com", "tls-authz": "auth0"}),
        &caps,
    )
    .unwrap();
    let q = p.to_query_json();
    assert_eq!(q["tls-creds"], "tls0");
    assert_eq!(q["tls-hostname"], "hostb.example.com");
    assert_eq!(q["tls-authz"], "auth0");
    // null (and "") turn TLS off again, as in QEMU.
    p.apply_json(&json!({"tls-creds": null, "tls-authz": ""}), &caps)
        .unwrap();
    assert_eq!(p.tls_creds, "");
    assert_eq!(p.tls_authz, "");
}

#[test]
fn multifd_is_honoured_with_zlib_and_zstd_and_the_hardware_methods_refused() {
    let mut c = Capabilities::default();
    let mut p = Parameters::default();
    set_caps(&mut c, &[("multifd", true)]).unwrap();
    assert!(c.get(Capability::Multifd));
    assert_eq!(p.multifd_channels, 2, "QEMU's default");
    p.apply_json(
        &json!({"multifd-channels": 4, "multifd-compression": "none"}),
        &c,
    )
    .unwrap();
    assert_eq!(p.multifd_channels, 4);
    for (method, level, value) in [
        ("zstd", "multifd-zstd-level", 20),
        ("zlib", "multifd-zlib-level", 9),
    ] {
        p.apply_json(&json!({"multifd-compression": method, level: value}), &c)
            .unwrap();
        assert_eq!(
            serde_json::to_value(p.multifd_compression).unwrap(),
            json!(method)
        );
    }
    assert_eq!((p.multifd_zstd_level, p.multifd_zlib_level), (20, 9));
    let before = p.clone();
    for hw in ["qpl", "uadk", "qatzip"] {
        let e = p
            .apply_json(&json!({"multifd-compression": hw}), &c)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "Parameter 'multifd-compression' value '{hw}' is not supported by this build \
                 (Tern has none, zlib and zstd)"
            )
        );
        assert_eq!(p, before, "all or nothing");
    }
    // Set while multifd is off (inert), then turning multifd on is refused.
    let off = Capabilities::default();
    let mut c = Capabilities::default();
    p.apply_json(&json!({"multifd-compression": "qpl"}), &off)
        .unwrap();
    let e = c.set(&[(Capability::Multifd, true)], &p).unwrap_err();
    assert!(e.to_string().contains("'qpl'"), "{e}");
    // zlib / zstd set while multifd is off: turning it on is accepted.
    p.apply_json(&json!({"multifd-compression": "zlib"}), &off)
        .unwrap();
    c.set(&[(Capability::Multifd, true)], &p).unwrap();
}

/// QEMU's refusals of `zero-copy-send` (decision 220): without `multifd`, with TLS, with a
/// compression, in either order of setting them; accepted with `multifd` and nothing else.
#[test]
fn zero_copy_send_needs_multifd_and_refuses_tls_and_compression() {
    const QEMU: &str = "Zero copy only available for non-compressed non-TLS multifd migration";
    let mut c = Capabilities::default();
    let e = set_caps(&mut c, &[("zero-copy-send", true)]).unwrap_err();
    assert_eq!(e.to_string(), QEMU);
    set_caps(&mut c, &[("multifd", true), ("zero-copy-send", true)]).unwrap();
    assert!(c.get(Capability::ZeroCopySend));
    // Turning multifd off under it is refused too (the set is checked as a whole).
    let e = c.set(&[(Capability::Multifd, false)], &Parameters::default());
    assert_eq!(e.unwrap_err().to_string(), QEMU);
    // TLS after the capability: refused by migrate-set-parameters, nothing changed.
    let mut p = Parameters::default();
    let e = p.apply_json(&json!({"tls-creds": "tls0"}), &c).unwrap_err();
    assert_eq!(e.to_string(), QEMU);
    assert_eq!(p.tls_creds, "", "all or nothing");
    // A compression after the capability: QEMU's text, not Tern's "not yet supported".
    let e = p
        .apply_json(&json!({"multifd-compression": "zstd"}), &c)
        .unwrap_err();
    assert_eq!(e.to_string(), QEMU);
    // The capability after TLS / a compression: refused by migrate-set-capabilities.
    let off = Capabilities::default();
    for args in [
        json!({"tls-creds": "tls0"}),
        json!({"multifd-compression": "zlib"}),
    ] {
        let mut p = Parameters::default();
        p.apply_json(&args, &off).unwrap();
        let mut c = Capabilities::default();
        let e = c
            .set(
                &[
                    (Capability::Multifd, true),
                    (Capability::ZeroCopySend, true),
                ],
                &p,
            )
            .unwrap_err();
        assert_eq!(e.to_string(), QEMU, "{args}");
        assert_eq!(c, Capabilities::default(), "{args}: all or nothing");
    }
}
