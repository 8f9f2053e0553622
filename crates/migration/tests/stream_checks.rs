//! What the stream carries besides RAM and state, end to end with fakes: the source's
//! `validate-uuid` (checked by the destination), `zero-page-detection`, and the SECTION bound
//! the destination derives from its machine.

mod common;

use common::*;
use tern_migration::dest::Incoming;
use tern_migration::fakes::{FakeMachine, FakeRam};
use tern_migration::machine::VcpuControl;
use tern_migration::source::{SourceOptions, Target};
use tern_migration::status::MigrationStatus as S;

const OTHER_UUID: uuid::Uuid = uuid::Uuid::from_u128(9);

/// Source options with `validate-uuid` on.
fn validating(return_path: bool) -> SourceOptions {
    SourceOptions {
        validate_uuid: true,
        return_path,
        ..src_opts(converge(), false)
    }
}

#[test]
fn validate_uuid_on_the_source_only_is_checked_by_the_destination() {
    for return_path in [true, false] {
        let setup = Setup::default();
        let (src, sm) = source_side(&setup);
        let (dst, dm) = dest_side(&setup, FakeMachine::new(2, OTHER_UUID));
        let (a, b) = socketpair();
        // The destination's own validate-uuid is off (dst_opts).
        let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
        let s = start_source(&src, sm, Target::Stream(a), validating(return_path));
        let dout = d.join().unwrap();
        let so = s.join().unwrap();
        assert_eq!(dout.status, S::Failed, "return path {return_path}");
        let derr = dout.error.unwrap();
        assert!(
            derr.contains(&format!("VM UUID: source {UUID}, destination {OTHER_UUID}")),
            "{derr}"
        );
        assert!(derr.contains("validate-uuid is on at the source"), "{derr}");
        // Refused before any RAM was loaded, while the source still ran.
        assert_eq!(dst.ram.first_difference(&FakeRam::small()), None);
        assert_eq!(so.status, S::Failed);
        if return_path {
            assert!(so.error.unwrap().contains("VM UUID"));
        }
        assert_source_restored(&src, true);
        assert!(!dst.vcpus.is_running());
    }
}

#[test]
fn validate_uuid_on_the_source_with_the_same_uuid_completes() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup);
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (a, b) = socketpair();
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let s = start_source(&src, sm, Target::Stream(a), validating(true));
    let so = s.join().unwrap();
    let dout = d.join().unwrap();
    assert_eq!(so.status, S::Completed, "{:?}", so.error);
    assert_eq!(dout.status, S::Completed, "{:?}", dout.error);
    assert_ram_equal(&src, &dst);
}

#[test]
fn zero_page_detection_none_sends_every_page_with_its_data() {
    for detect in [false, true] {
        let setup = Setup::default(); // RAM half random, half zero
        let (src, sm) = source_side(&setup);
        let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
        let (a, b) = socketpair();
        let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
        let opts = SourceOptions {
            detect_zero_pages: detect,
            ..src_opts(converge(), false)
        };
        let s = start_source(&src, sm, Target::Stream(a), opts);
        let so = s.join().unwrap();
        let dout = d.join().unwrap();
        assert_eq!(so.status, S::Completed, "{:?}", so.error);
        assert_eq!(dout.status, S::Completed, "{:?}", dout.error);
        assert_ram_equal(&src, &dst);
        let q = src.stats.to_query_migrate_json();
        let ram = &q["ram"];
        let (zero, normal) = (
            ram["duplicate"].as_u64().unwrap(),
            ram["normal"].as_u64().unwrap(),
        );
        let total = src.ram.total_pages();
        if detect {
            assert!(zero > 0, "legacy detection found no zero page: {q}");
        } else {
            assert_eq!(zero, 0, "zero-page-detection none sent ZERO entries: {q}");
            assert!(normal >= total, "only {normal} of {total} pages sent: {q}");
            assert!(ram["transferred"].as_u64().unwrap() > total * 4096, "{q}");
        }
    }
}

#[test]
fn sections_beyond_what_the_destination_restores_are_refused() {
    let setup = Setup::default();
    let (src, sm) = source_side(&setup); // 2 vCPU components + serial0 = 3 SECTIONs
    let mut machine = FakeMachine::new(2, UUID);
    machine.desc.component_sections = Some(2);
    let (dst, dm) = dest_side(&setup, machine);
    let (a, b) = socketpair();
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let s = start_source(&src, sm, Target::Stream(a), src_opts(converge(), false));
    let dout = d.join().unwrap();
    let so = s.join().unwrap();
    assert_eq!(dout.status, S::Failed);
    let derr = dout.error.unwrap();
    assert!(
        derr.contains("section count of 3") && derr.contains("limit of 2"),
        "{derr}"
    );
    // Nothing was restored, the destination never ran, the source runs again.
    assert_eq!(*dst.machine.restored.lock().unwrap(), None);
    assert!(!dst.vcpus.is_running());
    assert_eq!(so.status, S::Failed);
    assert_source_restored(&src, true);
}

#[test]
/// A destination without `postcopy-ram` refuses a source that has it (one-sided setting).
fn postcopy_ram_from_the_source_is_refused_by_name_when_off_at_the_destination() {
    use tern_migration::wire::VERSION_POSTCOPY;

    let setup = Setup::default();
    let (dst, dm) = dest_side(&setup, FakeMachine::new(2, UUID));
    let (a, b) = socketpair();
    let d = start_dest(&dst, dm, Incoming::Stream(b), dst_opts(false));
    let (w, _) = common::postcopy::postcopy_writer(a, VERSION_POSTCOPY);
    let dout = d.join().unwrap();
    drop(w);
    assert_eq!(dout.status, S::Failed);
    let derr = dout.error.unwrap();
    assert!(
        derr.contains("'postcopy-ram' is on at the source but off at the destination"),
        "{derr}"
    );
    assert!(!dst.vcpus.is_running());
    assert_eq!(*dst.machine.restored.lock().unwrap(), None);
}
