//! Post-copy helpers shared by the recovery and `release-ram` tests: a migration through a
//! [`FaultProxy`] that is switched to post-copy, recovery attempts (optionally through a
//! proxy of their own), and the resident size of a process's guest RAM from `/proc`.

use serde_json::{json, Value};

use super::proxy::{Fault, FaultProxy};
use super::*;

/// Post-copy without `return-path` (post-copy opens it itself, as QEMU does).
pub const PC_CAPS: [(&str, bool); 3] = [
    ("events", true),
    ("postcopy-ram", true),
    ("postcopy-blocktime", true),
];

/// Boots a source running `m` and a destination, sets `caps` (plus [`PC_CAPS`]) on both,
/// migrates through a [`FaultProxy`] that forwards everything, and returns once the first
/// pre-copy pass ended (pre-copy cannot converge: downtime-limit 1 ms).
pub fn start_through_proxy(dir: &Path, m: &Machine, caps: &[(&str, bool)]) -> (Vm, Vm, FaultProxy) {
    let mut src = boot(dir, "src", m);
    src.wait_workload_running(T);
    let mut dst = dest(dir, "dst", m);
    for vm in [&mut src, &mut dst] {
        vm.caps(&PC_CAPS);
        vm.caps(caps);
    }
    src.params(json!({"max-bandwidth": 32_000_000, "downtime-limit": 1}));
    let uri = dst.listen_tcp();
    let proxy = FaultProxy::start(&uri, Fault::None);
    src.c("migrate", json!({ "uri": proxy.uri() }));
    src.wait_mig(&["active"], T);
    src.wait_pass(2, MIGRATION_TIMEOUT);
    (src, dst, proxy)
}

/// Switches to post-copy with a slow push (pages are still missing for a while), then waits
/// for the guest to run on the destination.
pub fn postcopy_running(src: &mut Vm, dst: &mut Vm) {
    src.params(json!({"max-postcopy-bandwidth": 1_000_000}));
    src.c("migrate-start-postcopy", json!({}));
    src.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.wait_mig(&["postcopy-active"], MIGRATION_TIMEOUT);
    dst.event("RESUME", MIGRATION_TIMEOUT);
}

/// Both sides paused: `migrate-recover` on the destination (any port), then `migrate` with
/// `resume` on the source, straight to it or through a proxy with `fault` (returned, to be
/// kept alive while the attempt runs).
pub fn start_recovery(src: &mut Vm, dst: &mut Vm, fault: Option<Fault>) -> Option<FaultProxy> {
    dst.c("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"}));
    let q = dst.qm();
    let port = tern::harness::incoming_port(&q).unwrap_or_else(|| panic!("no port in {q}"));
    let direct = format!("tcp:127.0.0.1:{port}");
    let proxy = fault.map(|f| FaultProxy::start(&direct, f));
    let uri = proxy.as_ref().map_or(direct, |p| p.uri().to_owned());
    src.c("migrate", json!({"uri": uri, "resume": true}));
    proxy
}

/// The destination's view of a lost source in post-copy (decision 111): paused, naming the
/// lost connection and the pages it lacks, refusing what would stop or reset the guest.
/// Returns the pages it lacks.
pub fn assert_destination_paused_missing_pages(dst: &mut Vm) -> u64 {
    let dq = dst.wait_mig(&["postcopy-paused"], MIGRATION_TIMEOUT);
    let e = error_desc(&dq);
    assert!(e.contains("connection to the source was lost"), "{e}");
    assert!(e.contains("pages have not been received"), "{e}");
    let missing = dq["x-tern-postcopy-missing-pages"].as_u64().unwrap_or(0);
    assert!(missing > 0, "{dq}");
    for cmd in ["cont", "stop", "system_reset"] {
        let e = dst.err(cmd, json!({}));
        assert!(e.contains("Post-copy is missing guest pages"), "{cmd}: {e}");
    }
    missing
}

/// Checks `q` (a `query-migrate` reply of `vm`) against `vm`'s own `query-qmp-schema`
/// (strictly: no member the schema does not declare).
pub fn assert_query_migrate_matches_schema(vm: &mut Vm, q: &Value) {
    let reply = vm.c("query-qmp-schema", json!({}));
    let s = tern_qmp::QmpSchema::new(&reply).unwrap_or_else(|e| panic!("malformed schema: {e}"));
    if let Err(e) = s.check_return("query-migrate", q) {
        panic!("query-migrate does not match the schema: {e}");
    }
}

/// Resident KiB of the guest RAM mapping of process `pid` (`/proc/PID/smaps`: the mapping of
/// exactly `memory_mib` MiB; the largest resident one if several match).
pub fn guest_ram_rss_kib(pid: u32, memory_mib: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/smaps: {e}"));
    let want = memory_mib * 1024;
    let kib = |l: &str| -> u64 {
        l.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (mut size, mut best): (u64, Option<u64>) = (0, None);
    for l in smaps.lines() {
        if l.starts_with("Size:") {
            size = kib(l);
        } else if l.starts_with("Rss:") && size == want {
            best = Some(best.unwrap_or(0).max(kib(l)));
        }
    }
    best.unwrap_or_else(|| panic!("no {memory_mib} MiB mapping in /proc/{pid}/smaps"))
}
