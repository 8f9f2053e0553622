//! `query-migrate` shapes and the statistics state machines.

use super::*;

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    k.sort();
    k
}

#[test]
fn guest_stall_is_the_larger_of_vcpu_stall_and_downtime() {
    let st = MigrationStats::new(Role::Source);
    let t0 = Instant::now();
    st.begin(t0);
    st.set_status(MigrationStatus::Active);
    assert!(st
        .to_query_migrate_json()
        .get("x-tern-max-guest-stall")
        .is_none());
    st.set_vcpu_stall(Duration::from_micros(7_400), t0 + Duration::from_millis(30));
    let v = st.to_query_migrate_json();
    assert_eq!(v["x-tern-max-guest-stall"], 7);
    assert_eq!(
        v["x-tern-max-guest-stall-detail"],
        json!({"at-ms": 30, "phase": "pre-copy", "vcpu-stall-us": 7400})
    );
    // A downtime longer than the vCPU stall is the largest stall, at the switchover.
    st.downtime_start(t0 + Duration::from_millis(100));
    st.downtime_end(t0 + Duration::from_millis(112));
    st.set_status(MigrationStatus::Completed);
    let v = st.to_query_migrate_json();
    assert_eq!(v["x-tern-max-guest-stall"], 12);
    assert_eq!(v["x-tern-max-guest-stall-detail"]["phase"], "switchover");
    assert_eq!(v["x-tern-max-guest-stall-detail"]["at-ms"], 100);
    // A longer vCPU stall wins over a short downtime.
    st.set_vcpu_stall(Duration::from_millis(20), t0 + Duration::from_millis(50));
    let v = st.to_query_migrate_json();
    assert_eq!(v["x-tern-max-guest-stall"], 20);
    assert_eq!(v["x-tern-max-guest-stall-detail"]["phase"], "pre-copy");
    assert!(v["x-tern-max-guest-stall"].as_u64() >= v["downtime"].as_u64());
}

#[test]
fn source_shapes_follow_qemu() {
    let st = MigrationStats::new(Role::Source);
    assert_eq!(st.to_query_migrate_json(), json!({}));
    let t0 = Instant::now();
    st.begin(t0);
    assert_eq!(st.to_query_migrate_json(), json!({"status": "setup"}));
    st.setup_done(t0 + Duration::from_millis(5));
    st.set_status(MigrationStatus::Active);
    st.update(|r, exp| {
        r.transferred = 100;
        r.remaining = 4096;
        r.page_size = 4096;
        r.dirty_pages_rate = 7;
        *exp = 42;
    });
    let v = st.to_query_migrate_json();
    assert_eq!(
        keys(&v),
        [
            "expected-downtime",
            "ram",
            "setup-time",
            "status",
            "total-time"
        ]
    );
    assert_eq!(v["status"], "active");
    assert_eq!(v["setup-time"], 5);
    assert_eq!(v["expected-downtime"], 42);
    assert_eq!(v["ram"]["remaining"], 4096);
    assert_eq!(v["ram"]["dirty-pages-rate"], 7);
    assert_eq!(v["ram"].as_object().map(|o| o.len()), Some(17));
    // auto-converge: top level, only while throttling (QEMU's `cpu-throttle-percentage`).
    st.set_cpu_throttle_percentage(30);
    let v = st.to_query_migrate_json();
    assert_eq!(v["cpu-throttle-percentage"], 30);
    assert!(v["ram"].get("cpu-throttle-percentage").is_none());
    st.set_cpu_throttle_percentage(0);
    assert!(st
        .to_query_migrate_json()
        .get("cpu-throttle-percentage")
        .is_none());
    st.downtime_start(t0);
    assert_eq!(
        st.downtime_end(t0 + Duration::from_millis(3)),
        Some(Duration::from_millis(3))
    );
    st.set_status(MigrationStatus::Completed);
    let v = st.to_query_migrate_json();
    assert_eq!(
        keys(&v),
        [
            "downtime",
            "ram",
            "setup-time",
            "status",
            "total-time",
            "x-tern-max-guest-stall",
            "x-tern-max-guest-stall-detail"
        ]
    );
    assert_eq!(v["downtime"], 3);
    assert_eq!(v["x-tern-max-guest-stall"], 3);
    assert_eq!(v["ram"]["remaining"], 0);
    assert_eq!(v["ram"]["dirty-pages-rate"], 0);
    // total-time is frozen once completed.
    let t1 = st.snapshot().total_time_ms;
    assert_eq!(st.snapshot().total_time_ms, t1);
}

#[test]
fn failed_shows_status_and_error_only() {
    let st = MigrationStats::new(Role::Source);
    st.begin(Instant::now());
    st.set_error("destination: bad thing");
    st.set_error("broken pipe");
    st.set_status(MigrationStatus::Failed);
    assert_eq!(
        st.to_query_migrate_json(),
        json!({"status": "failed", "error-desc": "destination: bad thing"})
    );
    // A new migration starts clean.
    st.begin(Instant::now());
    assert_eq!(st.to_query_migrate_json(), json!({"status": "setup"}));
}

#[test]
fn unconfirmed_shows_the_transfer_and_the_reason_but_no_downtime() {
    let st = MigrationStats::new(Role::Source);
    let t0 = Instant::now();
    st.begin(t0);
    st.update(|r, _| r.remaining = 4096);
    st.downtime_start(t0);
    st.set_switchover_timeline(SwitchoverTimeline::default());
    st.set_error("the destination did not confirm that it runs");
    st.set_status(MigrationStatus::Unconfirmed);
    let v = st.to_query_migrate_json();
    assert_eq!(
        keys(&v),
        [
            "error-desc",
            "ram",
            "setup-time",
            "status",
            "total-time",
            "x-tern-downtime-breakdown"
        ]
    );
    assert_eq!(v["status"], "x-tern-unconfirmed");
    assert_eq!(v["ram"]["remaining"], 0);
}

#[test]
fn destination_shape() {
    let st = MigrationStats::new(Role::Destination);
    st.set_socket_address(vec![
        json!({"type": "inet", "host": "127.0.0.1", "port": "5"}),
    ]);
    assert_eq!(keys(&st.to_query_migrate_json()), ["socket-address"]);
    st.begin(Instant::now());
    st.set_status(MigrationStatus::Active);
    let v = st.to_query_migrate_json();
    assert_eq!(keys(&v), ["socket-address", "status"]);
    st.set_status(MigrationStatus::Completed);
    // Nothing listens any more: QEMU drops socket-address when the migration ends.
    assert_eq!(st.to_query_migrate_json(), json!({"status": "completed"}));
}

/// `socket-address` entries as QEMU reports a listening address: `ipv4` / `ipv6` flags for
/// inet addresses (the listener's own address is always numeric).
#[test]
fn listening_addresses_carry_the_address_family() {
    use crate::transport::MigrationUri;
    let tcp = |host: &str| {
        MigrationUri::Tcp {
            host: host.into(),
            port: 4444,
        }
        .socket_address_json()
    };
    assert_eq!(
        tcp("127.0.0.1"),
        Some(json!({"type": "inet", "host": "127.0.0.1", "port": "4444", "ipv4": true}))
    );
    assert_eq!(
        tcp("::1"),
        Some(json!({"type": "inet", "host": "::1", "port": "4444", "ipv6": true}))
    );
    assert_eq!(
        tcp("localhost"),
        Some(json!({"type": "inet", "host": "localhost", "port": "4444"}))
    );
    let unix = MigrationUri::Unix {
        path: "/tmp/m.sock".into(),
    };
    assert_eq!(
        unix.socket_address_json(),
        Some(json!({"type": "unix", "path": "/tmp/m.sock"}))
    );
}

#[test]
fn downtime_state_machine() {
    let t0 = Instant::now();
    let mut d = Downtime::default();
    assert_eq!(d.finish(t0), None);
    d.start(t0);
    d.start(t0 + Duration::from_millis(5)); // keeps the first instant
    d.abort();
    assert_eq!(d, Downtime::NotStarted);
    d.start(t0);
    assert_eq!(
        d.finish(t0 + Duration::from_millis(9)),
        Some(Duration::from_millis(9))
    );
    assert_eq!(d.value(), Some(Duration::from_millis(9)));
    assert_eq!(d.finish(t0 + Duration::from_millis(20)), None);
}
