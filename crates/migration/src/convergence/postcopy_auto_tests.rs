use super::*;

const MIB: u64 = 1 << 20;

/// Bandwidth and dirty rate in MiB/s; threshold = bandwidth × 300 ms.
fn sample(pending_mib: f64, bw_mib: f64, dirty_mib: f64, syncs: u64) -> AutoSample {
    let per_ms = |mib_s: f64| mib_s * MIB as f64 / 1000.0;
    AutoSample {
        pending: (pending_mib * MIB as f64) as u64,
        threshold: (per_ms(bw_mib) * 300.0) as u64,
        bandwidth: Some(per_ms(bw_mib)),
        dirty_rate: per_ms(dirty_mib),
        syncs,
        rule_armed: false,
    }
}

#[test]
fn nothing_is_judged_before_the_first_pass_ends() {
    let mut p = AutoPostcopy::default();
    let d = p.at_sync(&sample(512.0, 100.0, 500.0, 1));
    assert!(!d.switch, "{d:?}");
    assert_eq!(d.rule, AutoRule::NotJudged);
}

#[test]
fn no_bandwidth_measured_is_not_judged() {
    let mut p = AutoPostcopy::default();
    let mut s = sample(512.0, 100.0, 500.0, 2);
    s.bandwidth = None;
    assert_eq!(p.at_sync(&s).rule, AutoRule::NotJudged);
    s.bandwidth = Some(f64::NAN);
    assert_eq!(p.at_sync(&s).rule, AutoRule::NotJudged);
}

#[test]
fn a_guest_dirtying_faster_than_the_link_switches_after_the_first_pass() {
    // 512 MiB at 1 Gbit/s, the whole working set dirtied during pass 1.
    let mut p = AutoPostcopy::default();
    let d = p.at_sync(&sample(512.0, 119.0, 119.5, 2));
    assert!(d.switch, "{d:?}");
    assert_eq!(d.rule, AutoRule::DirtyRateExceedsBandwidth);
    assert_eq!(d.predicted_passes, None);
    assert!(d.reason.contains("MiB/s"), "{}", d.reason);
}

#[test]
fn a_slowly_shrinking_series_switches_on_the_predicted_pass_count() {
    // r = 0.9: 512 MiB → threshold 30 MiB needs ceil(ln(30/512)/ln 0.9) = 27 passes.
    let mut p = AutoPostcopy::default();
    let d = p.at_sync(&sample(512.0, 100.0, 90.0, 2));
    assert!(d.switch, "{d:?}");
    assert_eq!(d.rule, AutoRule::TooManyPasses);
    assert_eq!(d.predicted_passes, Some(27));
    assert!(d.predicted_time_ms.unwrap() > 5000, "{d:?}");
}

#[test]
fn a_converging_series_never_switches() {
    // r = 0.5: 128 → 64 → 32 MiB (threshold 30 MiB): 3, 2, 1 passes predicted, then the rule arms.
    let mut p = AutoPostcopy::default();
    let mut want = [3, 2, 1].into_iter();
    for (i, pending) in [128.0, 64.0, 32.0].into_iter().enumerate() {
        let d = p.at_sync(&sample(pending, 100.0, 50.0, 2 + i as u64));
        assert!(!d.switch, "{d:?}");
        assert_eq!(d.rule, AutoRule::PrecopyConverges);
        assert_eq!(d.predicted_passes, want.next(), "{d:?}");
    }
    let mut s = sample(16.0, 100.0, 50.0, 5);
    s.rule_armed = true;
    let d = p.at_sync(&s);
    assert!(!d.switch, "{d:?}");
    assert_eq!(
        (d.rule, d.predicted_passes),
        (AutoRule::PrecopyConverges, Some(0))
    );
}

#[test]
fn exactly_the_pass_bound_does_not_switch_one_more_does() {
    // r = 0.5, threshold 30 MiB: 30 × 2^5 = 960 MiB needs 5 passes, 961 needs 6.
    let d = AutoPostcopy::default().at_sync(&sample(960.0, 100.0, 50.0, 2));
    assert_eq!(
        (d.switch, d.predicted_passes),
        (false, Some(AUTO_MAX_PASSES)),
        "{d:?}"
    );
    let d = AutoPostcopy::default().at_sync(&sample(961.0, 100.0, 50.0, 2));
    assert_eq!(
        (d.switch, d.rule, d.predicted_passes),
        (true, AutoRule::TooManyPasses, Some(AUTO_MAX_PASSES + 1)),
        "{d:?}"
    );
}

#[test]
fn a_prediction_that_does_not_come_true_switches_on_no_progress() {
    // The measured rate says 2 passes each time, but pending stays at ~130 MiB (excess ~100
    // MiB above the 30 MiB threshold).
    let mut p = AutoPostcopy::default();
    for (i, pending) in [130.0, 128.0, 131.0].into_iter().enumerate() {
        let d = p.at_sync(&sample(pending, 100.0, 40.0, 2 + i as u64));
        assert!(!d.switch, "sync {i}: {d:?}");
    }
    let d = p.at_sync(&sample(129.0, 100.0, 40.0, 5));
    assert!(d.switch, "{d:?}");
    assert_eq!(d.rule, AutoRule::NoProgress);
    assert!(d.reason.contains("104857600"), "{}", d.reason);
}

#[test]
fn a_quarter_cut_of_the_excess_within_the_window_is_progress() {
    // Excess above the 30 MiB threshold: 100, 98, 74, 99, 73 MiB.
    let mut p = AutoPostcopy::default();
    for (i, pending) in [130.0, 128.0, 104.0, 129.0, 103.0].into_iter().enumerate() {
        let d = p.at_sync(&sample(pending, 100.0, 40.0, 2 + i as u64));
        assert!(!d.switch, "sync {i}: {d:?}");
    }
}

#[test]
fn pending_closing_in_on_the_threshold_is_progress_although_it_shrinks_slowly() {
    // Syncs taken whenever the estimate fits (QEMU's moments): pending = threshold + an excess
    // that shrinks by r = 0.4 per sync. Pending itself shrinks by far less than a quarter.
    let mut p = AutoPostcopy::default();
    for (i, excess) in [0.8, 0.32, 0.128, 0.05].into_iter().enumerate() {
        let d = p.at_sync(&sample(30.0 + excess, 100.0, 40.0, 2 + i as u64));
        assert!(!d.switch, "sync {i}: {d:?}");
        assert_eq!(d.rule, AutoRule::PrecopyConverges);
    }
}

#[test]
fn once_switched_it_stays_switched() {
    let mut p = AutoPostcopy::default();
    let first = p.at_sync(&sample(512.0, 100.0, 200.0, 2));
    assert!(first.switch);
    let again = p.at_sync(&sample(1.0, 100.0, 0.0, 3));
    assert_eq!(again, first);
}

#[test]
fn an_idle_guest_is_predicted_one_pass() {
    let d = AutoPostcopy::default().at_sync(&sample(64.0, 100.0, 0.0, 2));
    assert_eq!(
        (d.switch, d.rule, d.predicted_passes),
        (false, AutoRule::PrecopyConverges, Some(1))
    );
    assert_eq!(d.predicted_time_ms, Some(640));
}

#[test]
fn names_are_distinct() {
    let mut names: Vec<_> = AutoRule::ALL.iter().map(|r| r.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), AutoRule::ALL.len());
}
