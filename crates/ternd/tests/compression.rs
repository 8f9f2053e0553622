//! `ternctl migrate --parallel --comp-methods zstd|zlib [--comp-*-level N]` through two real
//! daemons and real Tern VMs (docs/management.md): both VMMs get `multifd-compression`, the
//! source its level, the `pattern` check passes on the destination. The QEMU driver's twin is
//! in `qemu_driver.rs`.

mod common;

use common::*;

const MEM: u64 = 128;

fn migrate_compressed(method: &str, level_opt: &str, level: u8, param: &str) {
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    let name = format!("c{method}");
    let xml = write_xml(dir.path(), &name, &domain_xml(&name, MEM, "pattern", 32, 0));
    h.src.ok(&["define", &xml]);
    h.src.ok(&["start", &name]);
    wait_workload_running(&h.src, &name);
    let level_s = level.to_string();
    h.src.ok(&[
        "migrate",
        &name,
        &h.dst.tcp_uri(),
        "--live",
        "--p2p",
        "--parallel",
        "--compressed",
        "--comp-methods",
        method,
        level_opt,
        &level_s,
    ]);
    let note = format!("compression: multifd {method} on both VMMs, {param} {level}");
    completed_job(&h.src, &name, &[&note]);
    assert_eq!(h.dst.state(&name), "running (migrated)");
    let p = h
        .dst
        .qmp(&name, "query-migrate-parameters", serde_json::json!({}));
    assert_eq!(p["multifd-compression"], method, "{p}");
    assert_pattern_ok(&h.dst, &name, MEM, dir.path());
}

#[test]
fn parallel_zstd_migration_of_a_tern_vm_compresses_on_both_vmms() {
    migrate_compressed("zstd", "--comp-zstd-level", 3, "multifd-zstd-level");
}

#[test]
fn parallel_zlib_migration_of_a_tern_vm_compresses_on_both_vmms() {
    migrate_compressed("zlib", "--comp-zlib-level", 2, "multifd-zlib-level");
}

#[test]
fn compression_the_engine_lacks_is_refused_before_anything_starts() {
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    let xml = write_xml(dir.path(), "cx", &domain_xml("cx", MEM, "pattern", 32, 0));
    h.src.ok(&["define", &xml]);
    h.src.ok(&["start", "cx"]);
    wait_workload_running(&h.src, "cx");
    let uri = h.dst.tcp_uri();
    for (args, text) in [
        (&["--compressed"][..], "means xbzrle"),
        (
            &["--compressed", "--comp-methods", "zstd"][..],
            "only supported with parallel",
        ),
        (&["--parallel", "--comp-methods", "xbzrle"][..], "xbzrle"),
        (
            &[
                "--parallel",
                "--comp-methods",
                "zstd",
                "--comp-zlib-level",
                "1",
            ][..],
            "turn zlib compression on",
        ),
    ] {
        let mut a = vec!["migrate", "cx", &uri, "--live", "--p2p"];
        a.extend_from_slice(args);
        let err = h.src.fails(&a);
        assert!(err.contains(text), "{args:?}: {err}");
    }
    // The guest never left.
    wait_workload_running(&h.src, "cx");
}
