use super::*;
use crate::params::Parameters;

fn high() -> SyncPeriod {
    SyncPeriod {
        bytes_dirty: 600,
        bytes_transferred: 1000,
    }
}

fn low() -> SyncPeriod {
    SyncPeriod {
        bytes_dirty: 500,
        bytes_transferred: 1000,
    }
}

#[test]
fn second_high_period_starts_at_initial_then_raises_by_increment() {
    let mut p = ThrottlePolicy::new(ThrottleParams::default());
    assert_eq!(p.after_sync(high()), ThrottleDecision::Keep);
    assert!(!p.active());
    assert_eq!(p.after_sync(high()), ThrottleDecision::Set(20));
    assert_eq!(p.after_sync(high()), ThrottleDecision::Keep);
    assert_eq!(p.after_sync(high()), ThrottleDecision::Set(30));
    assert_eq!(p.percentage(), 30);
}

#[test]
fn dirty_equal_to_threshold_is_not_high_and_count_is_not_reset_by_low_periods() {
    let mut p = ThrottlePolicy::new(ThrottleParams::default());
    assert_eq!(p.after_sync(low()), ThrottleDecision::Keep);
    assert_eq!(p.after_sync(high()), ThrottleDecision::Keep);
    assert_eq!(p.after_sync(low()), ThrottleDecision::Keep);
    // QEMU's dirty_rate_high_cnt only resets on a raise.
    assert_eq!(p.after_sync(high()), ThrottleDecision::Set(20));
}

#[test]
fn capped_at_max_and_then_kept() {
    let params = ThrottleParams {
        initial: 30,
        increment: 50,
        max: 60,
        ..ThrottleParams::default()
    };
    let mut p = ThrottlePolicy::new(params);
    p.after_sync(high());
    assert_eq!(p.after_sync(high()), ThrottleDecision::Set(30));
    p.after_sync(high());
    assert_eq!(p.after_sync(high()), ThrottleDecision::Set(60));
    p.after_sync(high());
    assert_eq!(p.after_sync(high()), ThrottleDecision::Keep);
    assert_eq!(p.percentage(), 60);
}

#[test]
fn tailslow_raises_only_what_the_dirty_rate_needs() {
    let params = ThrottleParams {
        tailslow: true,
        ..ThrottleParams::default()
    };
    let mut p = ThrottlePolicy::new(params);
    p.after_sync(high());
    assert_eq!(p.after_sync(high()), ThrottleDecision::Set(20));
    // dirty 600 vs threshold 500: cpu_now 80, ideal 66 -> +10 (capped by increment).
    p.after_sync(high());
    assert_eq!(p.after_sync(high()), ThrottleDecision::Set(30));
    // dirty 520 vs threshold 500: cpu_now 70, ideal 67 -> +3.
    let slight = SyncPeriod {
        bytes_dirty: 520,
        bytes_transferred: 1000,
    };
    p.after_sync(slight);
    assert_eq!(p.after_sync(slight), ThrottleDecision::Set(33));
}

#[test]
fn reset_removes_the_throttle_and_the_count() {
    let mut p = ThrottlePolicy::new(ThrottleParams::default());
    p.after_sync(high());
    p.after_sync(high());
    p.after_sync(high());
    p.reset();
    assert_eq!(p.percentage(), 0);
    assert_eq!(p.after_sync(high()), ThrottleDecision::Keep);
    assert_eq!(p.after_sync(high()), ThrottleDecision::Set(20));
}

#[test]
fn params_come_from_the_migration_parameters_with_qemus_defaults() {
    let p = ThrottleParams::from_parameters(&Parameters::default());
    assert_eq!(p, ThrottleParams::default());
}

#[test]
fn sleep_per_timeslice_is_qemus_formula() {
    assert_eq!(sleep_per_timeslice(0), Duration::ZERO);
    // 50 %: sleep as long as the 10 ms slice.
    assert_eq!(sleep_per_timeslice(50), Duration::from_millis(10));
    // 99 %: 990 ms asleep per 10 ms run.
    let s = sleep_per_timeslice(99).as_secs_f64();
    assert!((s - 0.99).abs() < 1e-6, "{s}");
}

#[test]
fn a_machine_without_throttling_refuses_it_but_accepts_its_removal() {
    struct Plain;
    impl crate::machine::VcpuControl for Plain {
        fn pause(&mut self) -> Result<(), crate::machine::MachineError> {
            Ok(())
        }
        fn resume(&mut self) -> Result<(), crate::machine::MachineError> {
            Ok(())
        }
        fn is_running(&self) -> bool {
            true
        }
    }
    use crate::machine::VcpuControl;
    let mut m = Plain;
    assert!(m.set_throttle(0).is_ok());
    let e = m.set_throttle(20).unwrap_err().to_string();
    assert_eq!(e, "auto-converge: this machine cannot throttle its vCPUs");
}
