//! Table-driven tests of [`SwitchoverRule`]: sequences of syncs → decisions.

use super::*;
use crate::fakes::XorShift;

const MIB: u64 = 1 << 20;
/// 128 MiB/s (QEMU's default `max-bandwidth`) in bytes/ms.
const BW_128: f64 = 128.0 * MIB as f64 / 1000.0;
const LIMIT_MS: u64 = 300;

fn threshold(bw: f64) -> u64 {
    super::super::threshold_bytes(bw, LIMIT_MS)
}

/// One sync: (pending bytes, bandwidth bytes/ms, dirty rate bytes/ms, ms since the previous sync).
type Row = (u64, f64, f64, u64);
/// What a decision is checked on: (switch, rule, passes since QEMU's rule held).
type Want = (bool, RuleName, Option<u32>);

/// Runs the rows through one rule; the sender's side is modelled: bytes sent between syncs are
/// the pending bytes of the previous sync (a full pass), time advances by the row's interval.
fn run(rows: &[Row]) -> Vec<RuleDecision> {
    let mut rule = SwitchoverRule::default();
    let (mut at, mut transferred, mut prev_pending) = (Duration::ZERO, 0u64, 256 * MIB);
    let mut out = Vec::new();
    for &(pending, bw, rate, dt) in rows {
        at += Duration::from_millis(dt);
        transferred += prev_pending;
        prev_pending = pending;
        let d = rule.at_sync(&SyncSample {
            pending,
            threshold: threshold(bw),
            bandwidth: bw,
            dirty_rate: rate,
            gate_open: true,
            vm_running: true,
            transferred,
            at,
            downtime_limit_ms: LIMIT_MS,
        });
        let last = d.switch;
        out.push(d);
        if last {
            break;
        }
    }
    out
}

fn rules(ds: &[RuleDecision]) -> Vec<Want> {
    ds.iter()
        .map(|d| (d.switch, d.rule, d.passes_since_qemu_would_switch))
        .collect()
}

use RuleName::*;

#[test]
fn table_of_sequences() {
    let t = threshold(BW_128); // ≈ 38.4 MiB
    let slow = 1.0 * MIB as f64 / 1000.0; // 1 MiB/s dirtied
    let fast = 200.0 * MIB as f64 / 1000.0; // faster than the link
    let cases: Vec<(&str, Vec<Row>, Vec<Want>)> =
        vec![
        (
            "above, then fits with a slow writer: extra passes while they halve, then good enough",
            vec![
                (64 * MIB, BW_128, slow, 500),
                (30 * MIB, BW_128, slow, 500),
                (2 * MIB, BW_128, slow, 240),
                (64 * 1024, BW_128, slow, 20),
            ],
            vec![
                (false, AboveThreshold, None),
                (false, MinimizerExtraPass, Some(0)),
                (false, MinimizerExtraPass, Some(1)),
                (true, GoodEnough, Some(2)),
            ],
        ),
        (
            "edge of convergence (dirty rate above the link): switch at QEMU's moment",
            vec![
                (64 * MIB, BW_128, fast, 300),
                (64 * MIB, BW_128, fast, 300),
                (t, BW_128, fast, 200),
            ],
            vec![
                (false, AboveThreshold, None),
                (false, AboveThreshold, None),
                (true, QemuThreshold, Some(0)),
            ],
        ),
        (
            "a starved guest looked slow once: the fastest recent rate decides",
            vec![
                (64 * MIB, BW_128, fast, 300),
                (20 * MIB, BW_128, slow, 300),
            ],
            vec![(false, AboveThreshold, None), (true, QemuThreshold, Some(0))],
        ),
        (
            "the old runaway: fits, extra pass, the dirty set regrows above the threshold",
            vec![
                (30 * MIB, BW_128, slow, 500),
                (64 * MIB, BW_128, fast, 240),
                (20 * MIB, BW_128, slow, 500),
            ],
            vec![(false, MinimizerExtraPass, Some(0)), (true, Regrew, Some(1))],
        ),
        (
            "the link slowed: the pass, cut at its deadline below where it began, is above the \
             shrunken threshold; it goes on under the bounds (no `regrew`: nothing grew)",
            vec![
                (30 * MIB, BW_128, slow, 500),
                (12 * MIB, BW_128 / 4.0, slow, 600),
                (0, BW_128 / 4.0, slow, 300),
            ],
            vec![
                (false, MinimizerExtraPass, Some(0)),
                (false, MinimizerExtraPass, Some(1)),
                (true, GoodEnough, Some(2)),
            ],
        ),
        (
            "the link slowed and the pass barely cut the pending bytes: plateau",
            vec![
                (30 * MIB, BW_128, slow, 500),
                (25 * MIB, BW_128 / 4.0, slow, 600),
            ],
            vec![
                (false, MinimizerExtraPass, Some(0)),
                (true, MinimizerPlateau, Some(1)),
            ],
        ),
        (
            "plateau: a pass that does not halve ends the extra passes",
            vec![
                (30 * MIB, BW_128, slow, 500),
                (10 * MIB, BW_128, slow, 240),
                (8 * MIB, BW_128, slow, 80),
            ],
            vec![
                (false, MinimizerExtraPass, Some(0)),
                (false, MinimizerExtraPass, Some(1)),
                (true, MinimizerPlateau, Some(2)),
            ],
        ),
        (
            "count bound: passes that keep halving stop after MAX_EXTRA_PASSES",
            vec![
                (32 * MIB, BW_128, 0.0, 500),
                (16 * MIB, BW_128, 0.0, 250),
                (8 * MIB, BW_128, 0.0, 125),
                (4 * MIB, BW_128, 0.0, 60),
                (2 * MIB, BW_128, 0.0, 30),
                (MIB, BW_128, 0.0, 15),
                (MIB / 2, BW_128, 0.0, 8),
            ],
            vec![
                (false, MinimizerExtraPass, Some(0)),
                (false, MinimizerExtraPass, Some(1)),
                (false, MinimizerExtraPass, Some(2)),
                (false, MinimizerExtraPass, Some(3)),
                (false, MinimizerExtraPass, Some(4)),
                (true, BoundReached, Some(5)),
            ],
        ),
        (
            "time bound: a link that slows down makes the passes long",
            vec![
                (32 * MIB, BW_128, 0.0, 500),
                (8 * MIB, BW_128, 0.0, 1000),
                (2 * MIB, BW_128, 0.0, 200),
            ],
            vec![
                (false, MinimizerExtraPass, Some(0)),
                (true, BoundReached, Some(1)),
            ],
        ),
        (
            "unknown bandwidth: only an empty set fits, and it switches at once",
            vec![(4096, 0.0, 0.0, 100), (0, 0.0, 0.0, 100)],
            vec![(false, AboveThreshold, None), (true, GoodEnough, Some(0))],
        ),
    ];
    for (name, rows, want) in cases {
        let got = run(&rows);
        assert_eq!(rules(&got), want, "{name}: {got:#?}");
    }
}

#[test]
fn byte_bound_counts_what_the_extra_passes_sent() {
    let mut rule = SwitchoverRule::default();
    let s = |pending, transferred, at_ms| SyncSample {
        pending,
        threshold: threshold(BW_128),
        bandwidth: BW_128,
        dirty_rate: 0.0,
        gate_open: true,
        vm_running: true,
        transferred,
        at: Duration::from_millis(at_ms),
        downtime_limit_ms: LIMIT_MS,
    };
    assert!(!rule.at_sync(&s(10 * MIB, 100 * MIB, 1000)).switch);
    // The pass sent 17 MiB (device data, retransmits): another 4 MiB would exceed 2 × 10 MiB.
    let d = rule.at_sync(&s(4 * MIB, 117 * MIB, 1100));
    assert_eq!((d.switch, d.rule), (true, BoundReached), "{d:?}");
    assert!(
        d.reason.contains("bytes sent in extra passes"),
        "{}",
        d.reason
    );
}

#[test]
fn ack_gate_and_stopped_vm() {
    let mut rule = SwitchoverRule::default();
    let mut s = SyncSample {
        pending: MIB,
        threshold: threshold(BW_128),
        bandwidth: BW_128,
        dirty_rate: 0.0,
        gate_open: false,
        vm_running: true,
        transferred: 0,
        at: Duration::from_secs(1),
        downtime_limit_ms: LIMIT_MS,
    };
    // QEMU's rule needs the gate: not armed while it is closed.
    let d = rule.at_sync(&s);
    assert_eq!(
        (d.switch, d.rule, d.passes_since_qemu_would_switch),
        (false, AwaitAck, None)
    );
    assert!(!rule.armed());
    // A stopped VM: no extra pass.
    s.gate_open = true;
    s.vm_running = false;
    let d = rule.at_sync(&s);
    assert_eq!((d.switch, d.rule), (true, QemuThreshold));
    assert_eq!(d.expected_downtime_ms, Some(7));
}

#[test]
fn syncs_where_qemu_does_until_armed_then_at_pass_ends() {
    let mut rule = SwitchoverRule::default();
    let t = 1000;
    assert!(rule.should_sync(t, t, t, Duration::ZERO));
    assert!(!rule.should_sync(t + 1, t, t + 1, Duration::ZERO));
    let d = rule.at_sync(&SyncSample {
        pending: 30 * MIB,
        threshold: threshold(BW_128),
        bandwidth: BW_128,
        dirty_rate: 0.0,
        gate_open: true,
        vm_running: true,
        transferred: 0,
        at: Duration::from_secs(1),
        downtime_limit_ms: LIMIT_MS,
    });
    assert_eq!(d.rule, MinimizerExtraPass);
    // Mid-pass (estimate fits, RAM left): no sync until the pass ends or its deadline.
    let th = threshold(BW_128);
    assert!(!rule.should_sync(MIB, th, MIB, Duration::from_millis(1100)));
    assert!(rule.should_sync(0, th, 0, Duration::from_millis(1100)));
    // 30 MiB at 128 MiB/s ≈ 234 ms: the deadline is twice that.
    assert!(!rule.should_sync(MIB, th, MIB, Duration::from_millis(1400)));
    assert!(rule.should_sync(MIB, th, MIB, Duration::from_millis(1500)));
}

/// A model guest at the edge of convergence: its dirty rate jumps around the link rate at
/// random (a 2-vCPU guest sharing two cores with the migration), with saturation at the working
/// set. Whatever the sequence, once QEMU's rule held the rule switches within
/// `MAX_EXTRA_PASSES` further syncs, and its extra passes stay within the byte bound.
#[test]
fn edge_of_convergence_always_switches_within_the_bound() {
    let working_set = 64 * MIB;
    for seed in 1..500u64 {
        let mut rng = XorShift::new(seed);
        let mut rule = SwitchoverRule::default();
        let (mut at, mut transferred) = (Duration::ZERO, 0u64);
        let mut pending = working_set;
        let mut armed_at_pass = None;
        let mut armed_transferred = 0;
        for pass in 0..10_000u32 {
            // The pass sends what is pending at a rate-limited 128 MiB/s (±20 %).
            let bw = BW_128 * (0.8 + 0.4 * (rng.next_u64() % 1000) as f64 / 1000.0);
            let pass_ms = (pending as f64 / bw).max(1.0);
            at += Duration::from_secs_f64(pass_ms / 1000.0);
            transferred += pending;
            // The guest dirtied at 0..2× the link rate during the pass.
            let rate = BW_128 * 2.0 * (rng.next_u64() % 1000) as f64 / 1000.0;
            pending = ((rate * pass_ms) as u64).min(working_set);
            let d = rule.at_sync(&SyncSample {
                pending,
                threshold: threshold(bw),
                bandwidth: bw,
                dirty_rate: rate,
                gate_open: true,
                vm_running: true,
                transferred,
                at,
                downtime_limit_ms: LIMIT_MS,
            });
            if pending <= threshold(bw) && armed_at_pass.is_none() {
                armed_at_pass = Some(pass);
                armed_transferred = transferred;
            }
            if let Some(p) = armed_at_pass {
                assert_eq!(
                    d.passes_since_qemu_would_switch,
                    Some(pass - p),
                    "seed {seed}"
                );
                assert!(pass - p <= MAX_EXTRA_PASSES, "seed {seed}: {d:?}");
                assert!(
                    transferred - armed_transferred <= 2 * threshold(BW_128 * 1.2),
                    "seed {seed}: {d:?}"
                );
            } else {
                assert!(!d.switch, "seed {seed}: switched before QEMU's rule held");
            }
            if d.switch {
                break;
            }
        }
        assert!(rule.armed(), "seed {seed}: QEMU's rule never held");
    }
}

/// The drain before the stop waits only while waiting shrinks the final copy.
#[test]
fn the_drain_waits_only_while_the_guest_dirties_slower_than_the_link() {
    let bw = BW_128;
    let t = threshold(bw);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    // The 1 Gbit/s link's `pattern` row: 1.5 MB pending, the guest dirtying at twice the link:
    // no wait (the slack alone allowed ~140 ms, and the final copy overshot the limit).
    assert_eq!(
        drain_wait(1_500_000, t, 2.0 * bw, bw, LIMIT_MS),
        Duration::ZERO
    );
    assert_eq!(drain_wait(1_500_000, t, bw, bw, LIMIT_MS), Duration::ZERO);
    // A guest at half the link: as long as the dirtied bytes fit the slack.
    let w = ms(drain_wait(t / 4 * 3, t, bw / 2.0, bw, LIMIT_MS));
    assert!((w - 150.0).abs() < 1.0, "{w}");
    // An idle guest: the downtime limit; a slow one: the slack, capped by the limit.
    let near_limit = |d: Duration| (ms(d) - LIMIT_MS as f64).abs() < 0.01;
    assert!(near_limit(drain_wait(0, t, 0.0, bw, LIMIT_MS)));
    assert!(near_limit(drain_wait(0, t, bw / 100.0, bw, LIMIT_MS)));
    // An unknown bandwidth (0: no window closed yet): the slack alone, as before.
    assert!(near_limit(drain_wait(0, t, 0.0, 0.0, LIMIT_MS)));
    assert_eq!(drain_wait(0, 0, bw / 2.0, 0.0, LIMIT_MS), Duration::ZERO);
    // Nothing left of the slack, or no sane measurement: no wait.
    assert_eq!(drain_wait(t, t, bw / 2.0, bw, LIMIT_MS), Duration::ZERO);
    assert_eq!(drain_wait(t + 1, t, bw / 2.0, bw, LIMIT_MS), Duration::ZERO);
    assert_eq!(drain_wait(0, t, f64::NAN, bw, LIMIT_MS), Duration::ZERO);
    assert_eq!(
        drain_wait(0, t, bw / 2.0, f64::INFINITY, LIMIT_MS),
        Duration::ZERO
    );
}
