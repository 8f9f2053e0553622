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
    assert!(!m.can_throttle());
    assert!(m.set_throttle(0).is_ok());
    let e = m.set_throttle(20).unwrap_err().to_string();
    assert_eq!(e, "auto-converge: this machine cannot throttle its vCPUs");
}

#[test]
fn periods_are_at_least_the_minimum_and_add_up_the_syncs_inside() {
    let ms = Duration::from_millis;
    let mut m = PeriodMeter::new(SYNC_PERIOD, ms(0), 1_000);
    // Two short syncs: only counted.
    assert_eq!(m.at_sync(ms(300), 10, 5_000), None);
    assert_eq!(m.at_sync(ms(700), 20, 9_000), None);
    // The third ends the period: dirtied bytes of all three, bytes sent since the start.
    assert_eq!(
        m.at_sync(ms(1_100), 30, 12_000),
        Some(SyncPeriod {
            bytes_dirty: 60,
            bytes_transferred: 11_000,
        })
    );
    // The next period starts from there.
    assert_eq!(m.at_sync(ms(1_500), 1, 13_000), None);
    assert_eq!(
        m.at_sync(ms(2_100), 2, 20_000),
        Some(SyncPeriod {
            bytes_dirty: 3,
            bytes_transferred: 8_000,
        })
    );
    // A zero minimum judges every sync.
    let mut m = PeriodMeter::new(Duration::ZERO, ms(0), 0);
    assert!(m.at_sync(ms(0), 1, 1).is_some());
    assert!(m.at_sync(ms(1), 1, 2).is_some());
}
