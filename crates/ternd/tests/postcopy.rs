//! Post-copy through the management layer with Tern VMMs (docs/management.md §5c): two
//! `ternd` in two network namespaces, `ternctl migrate --postcopy`, the switch by
//! `--postcopy-after-precopy` or `migrate-postcopy`, the `pattern` check on the destination;
//! after the switch `domjobabort` is refused, a killed destination leaves the source paused
//! (never resumed), a killed source leaves the destination running with `post-copy failed`,
//! restarted daemons neither resume the source nor kill the destination.

mod common;

use std::time::Instant;

use common::*;
use serde_json::json;

const MEM: u64 = 128;

/// Polls `domstate --reason` on `d` until it is `want` (at most [`T`]).
fn wait_state(d: &Daemon, dom: &str, want: &str) {
    let deadline = Instant::now() + T;
    loop {
        let o = d.ctl(&["domstate", "--reason", dom]);
        let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if s == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{}: '{dom}' never became '{want}' (last: '{s}')\n--- log:\n{}",
            d.name,
            d.log()
        );
        std::thread::yield_now();
    }
}

/// The one VMM `d` started.
fn vmm_pid(d: &Daemon) -> u32 {
    let pids = d.vmm_pids();
    assert_eq!(pids.len(), 1, "{}: one VMM expected: {pids:?}", d.name);
    pids[0]
}

/// A guest whose 64 MiB of filled memory (`idle` fills its share once, then only beats) is
/// mostly still unsent when the switch comes (pre-copy capped at 2 MiB/s, the switch at the
/// first iteration) and is never touched again: post-copy lasts as long as the push takes at
/// `postcopy_mib_s` (1 MiB/s: about a minute, long enough to act in it). Returns the migration.
fn start_slow_postcopy(h: &Hosts, dir: &std::path::Path, name: &str, postcopy_mib_s: &str) -> Bg {
    run_guest(&h.src, dir, name, MEM, "idle", 64, 0);
    h.src.ok(&["migrate-setmaxdowntime", name, "1"]);
    let dst = h.dst.tcp_uri();
    let bg = Bg::spawn(
        &h.src.uri(),
        &[
            "migrate",
            name,
            &dst,
            "--live",
            "--p2p",
            "--postcopy",
            "--bandwidth",
            "2",
            "--postcopy-bandwidth",
            postcopy_mib_s,
        ],
    );
    wait_migration_iteration(&h.src, name);
    h.src.ok(&["migrate-postcopy", name]);
    wait_state(&h.src, name, "paused (post-copy)");
    bg
}

#[test]
fn postcopy_after_precopy_moves_a_pattern_tern_vm() {
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    run_guest(&h.src, dir.path(), "pc", MEM, "pattern", 64, 0);
    // Pre-copy cannot converge (1 ms): only the switch after the first pass ends it.
    h.src.ok(&["migrate-setmaxdowntime", "pc", "1"]);
    let mut src_events = Bg::events(&h.src, "pc");
    let mut dst_events = Bg::events(&h.dst, "pc");
    let (ok, _out, err) = Bg::spawn(
        &h.src.uri(),
        &[
            "migrate",
            "pc",
            &h.dst.tcp_uri(),
            "--live",
            "--p2p",
            "--postcopy",
            "--postcopy-after-precopy",
            // Pre-copy over 2 multifd channels, ended at the switch (decision 245).
            "--parallel",
            "--bandwidth",
            "32",
        ],
    )
    .wait();
    assert!(
        ok,
        "migrate failed: {err}\n--- src:\n{}\n--- dst:\n{}",
        h.src.log(),
        h.dst.log()
    );
    assert!(err.contains("switched 'pc' to post-copy"), "{err}");
    assert_eq!(h.src.state("pc"), "shut off (migrated)");
    wait_state(&h.dst, "pc", "running (migrated)");
    let job = h.src.ok(&["domjobinfo", "pc", "--completed"]);
    assert!(job.contains("Job type:         Completed"), "{job}");
    assert!(job.contains("post-copy: enabled"), "{job}");
    assert!(job.contains("post-copy: switched"), "{job}");
    assert!(job.contains("parallel: multifd with 2 channel(s)"), "{job}");
    assert!(job.contains("Postcopy requests:"), "{job}");
    let raw = h.src.ok(&["domjobinfo", "pc", "--completed", "--rawstats"]);
    assert!(raw.contains("memory_postcopy_requests: "), "{raw}");
    let djob = h.dst.ok(&["domjobinfo", "pc", "--completed"]);
    assert!(djob.contains("Job type:         Completed"), "{djob}");
    assert_guest_runs(&h.dst, "pc");
    assert_pattern_ok(&h.dst, "pc", MEM, dir.path());
    h.dst.ok(&["destroy", "pc"]);
    let out = dst_events.wait_for_line("Stopped Destroyed");
    let pc = out
        .find("Resumed Post-copy")
        .unwrap_or_else(|| panic!("no Resumed Post-copy: {out}"));
    let migrated = out
        .find("Resumed Migrated")
        .unwrap_or_else(|| panic!("no Resumed Migrated: {out}"));
    assert!(pc < migrated, "post-copy, then migrated: {out}");
    let out = src_events.wait_for_line("Stopped Migrated");
    assert!(out.contains("Suspended Post-copy"), "{out}");
}

#[test]
fn postcopy_refusals_name_what_is_missing() {
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    let xml = write_xml(dir.path(), "r", &domain_xml("r", MEM, "idle", 0, 0));
    h.src.ok(&["define", &xml]);
    h.src.ok(&["start", "r"]);
    let dst = h.dst.tcp_uri();
    let e = h.src.fails(&[
        "migrate",
        "r",
        &dst,
        "--live",
        "--p2p",
        "--tunnelled",
        "--postcopy",
    ]);
    assert!(
        e.contains("post-copy is not supported with tunnelled migration"),
        "{e}"
    );
    let e = h.src.fails(&["migrate", "r", &dst, "--p2p", "--postcopy"]);
    assert!(e.contains("non-live or paused"), "{e}");
    let e = h
        .src
        .fails(&["migrate", "r", &dst, "--live", "--postcopy-after-precopy"]);
    assert!(e.contains("only be used with --postcopy"), "{e}");
    // --postcopy-resume (§5d): needs --postcopy and a failed post-copy; pre-copy's options
    // have nothing to act on.
    let e = h
        .src
        .fails(&["migrate", "r", &dst, "--live", "--p2p", "--postcopy-resume"]);
    assert!(e.contains("requires post-copy to be enabled"), "{e}");
    let resume: [&str; 7] = [
        "migrate",
        "r",
        &dst,
        "--live",
        "--p2p",
        "--postcopy",
        "--postcopy-resume",
    ];
    let e = h.src.fails(&resume);
    assert!(e.contains("is not in post-copy phase"), "{e}");
    assert!(e.contains("running (booted)"), "{e}");
    let e = h
        .src
        .fails(&[&resume[..], &["--postcopy-after-precopy"][..]].concat());
    assert!(e.contains("--postcopy-resume cannot be used with"), "{e}");
    let e = h.src.fails(&["migrate-postcopy", "r"]);
    assert!(e.contains("while outgoing migration is in progress"), "{e}");
    let e = h.src.fails(&["domjobabort", "r", "--postcopy"]);
    assert!(
        e.contains("not outgoing migration in post-copy mode"),
        "{e}"
    );
    // migrate-setspeed --postcopy sets the post-copy push's limit (MiB/s).
    h.src.ok(&["migrate-setspeed", "r", "7", "--postcopy"]);
    assert_eq!(
        h.src.ok(&["migrate-getspeed", "r", "--postcopy"]).trim(),
        "7"
    );
    let p = h.src.qmp("r", "query-migrate-parameters", json!({}));
    assert_eq!(p["max-postcopy-bandwidth"], 7u64 << 20, "{p}");
    // Nothing moved: the domain runs here only.
    assert_eq!(h.src.state("r"), "running (booted)");
    assert!(!h.dst.ok(&["list", "--all"]).contains(" r "));
}

#[test]
fn after_the_switch_abort_is_refused_and_a_killed_destination_leaves_the_source_paused() {
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    let bg = start_slow_postcopy(&h, dir.path(), "k", "1");
    let e = h.src.fails(&["domjobabort", "k"]);
    assert!(
        e.contains("cannot abort migration in post-copy mode"),
        "{e}"
    );
    let e = h.src.fails(&["migrate-postcopy", "k"]);
    assert!(e.contains("post-copy already started"), "{e}");
    let e = h.src.fails(&[
        "migrate",
        "k",
        &h.dst.tcp_uri(),
        "--live",
        "--p2p",
        "--postcopy",
        "--postcopy-resume",
    ]);
    assert!(e.contains("has not failed"), "{e}");
    // domjobabort --postcopy is QMP migrate-pause: relayed as the VMM answers it.
    let o = h.src.ctl(&["domjobabort", "k", "--postcopy"]);
    if !o.status.success() {
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("migrate-pause"), "{e}");
    }
    let dst_vmm = vmm_pid(&h.dst);
    // SAFETY: kill(2) on the destination VMM this test's daemon started.
    unsafe { libc::kill(dst_vmm as i32, libc::SIGKILL) };
    let (ok, _, err) = bg.wait();
    assert!(!ok, "the migration succeeded without its destination");
    assert!(err.contains("post-copy failed after the switch"), "{err}");
    assert!(err.contains("never resumed"), "{err}");
    // The source stays paused for good: its memory is stale.
    assert_eq!(h.src.state("k"), "paused (post-copy failed)");
    let st = h.src.qmp("k", "query-status", json!({}));
    assert_eq!(st["running"], false, "{st}");
    let job = h.src.ok(&["domjobinfo", "k", "--completed"]);
    assert!(job.contains("Job type:         Failed"), "{job}");
    assert!(pid_alive(vmm_pid(&h.src)), "the source VMM is kept");
    let e = h.src.fails(&["resume", "k"]);
    assert!(e.contains("never resumed"), "{e}");
    assert_eq!(h.src.state("k"), "paused (post-copy failed)");
}

#[test]
fn a_killed_source_after_the_switch_leaves_the_destination_running_post_copy_failed() {
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    let bg = start_slow_postcopy(&h, dir.path(), "s", "1");
    wait_state(&h.dst, "s", "running (post-copy)");
    let dst_vmm = vmm_pid(&h.dst);
    let src_vmm = vmm_pid(&h.src);
    // SAFETY: kill(2) on the source VMM this test's daemon started.
    unsafe { libc::kill(src_vmm as i32, libc::SIGKILL) };
    let (ok, _, err) = bg.wait();
    assert!(!ok, "the migration succeeded without its source");
    assert!(err.contains("post-copy"), "{err}");
    // The destination keeps the guest's newest state: never killed by the daemons.
    wait_state(&h.dst, "s", "running (post-copy failed)");
    assert!(pid_alive(dst_vmm), "the destination VMM was killed");
    let job = h.dst.ok(&["domjobinfo", "s", "--completed"]);
    assert!(job.contains("Job type:         Failed"), "{job}");
    assert!(job.contains("post-copy failed on the destination"), "{job}");
    assert!(pid_alive(dst_vmm), "the destination VMM was killed");
}

#[test]
fn daemons_restarted_during_postcopy_never_resume_the_source_nor_kill_the_destination() {
    let dir = tmpdir();
    let Some(mut h) = Hosts::up(dir.path()) else {
        return;
    };
    let bg = start_slow_postcopy(&h, dir.path(), "r", "16");
    wait_state(&h.dst, "r", "running (post-copy)");
    let (src_vmm, dst_vmm) = (vmm_pid(&h.src), vmm_pid(&h.dst));
    // Both daemons die while the VMMs are in post-copy (the VMMs carry on without them).
    h.dst.kill();
    h.src.kill();
    let (ok, _, _) = bg.wait();
    assert!(!ok, "the client lost its daemon");
    h.dst.restart();
    h.src.restart();
    // A second restart finds the job again: the first restarted daemon keeps the status
    // file's "outgoing, in post-copy" until the job it follows ends (it once cleared them at
    // once, and the source then stayed paused for ever, never quit).
    h.src.kill();
    h.src.restart();
    // The restarted source never runs its stale copy: paused until its VMM finished
    // sending, then quit; the destination's VMM is kept and ends `running (migrated)`.
    let deadline = Instant::now() + T;
    loop {
        let s = h.src.state("r");
        assert!(!s.starts_with("running"), "the source was resumed: {s}");
        if s == "shut off (migrated)" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the source never finished: {s}\n--- src:\n{}",
            h.src.log()
        );
        std::thread::yield_now();
    }
    wait_pid_exit(src_vmm);
    wait_state(&h.dst, "r", "running (migrated)");
    assert!(pid_alive(dst_vmm), "the destination VMM was killed");
    assert_guest_runs(&h.dst, "r");
}

#[test]
fn timeout_postcopy_switches_a_migration_that_runs_too_long() {
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    run_guest(&h.src, dir.path(), "t", MEM, "pattern", 64, 0);
    h.src.ok(&["migrate-setmaxdowntime", "t", "1"]);
    // 64 MiB of pattern pages at 4 MiB/s: the first pass alone takes far longer than the
    // 1 s timeout, and pre-copy could never converge anyway.
    let (ok, _, err) = Bg::spawn(
        &h.src.uri(),
        &[
            "migrate",
            "t",
            &h.dst.tcp_uri(),
            "--live",
            "--p2p",
            "--postcopy",
            "--bandwidth",
            "4",
            "--timeout",
            "1",
            "--timeout-postcopy",
        ],
    )
    .wait();
    assert!(ok, "migrate failed: {err}\n--- src:\n{}", h.src.log());
    assert!(err.contains("timeout: switched 't' to post-copy"), "{err}");
    let job = h.src.ok(&["domjobinfo", "t", "--completed"]);
    assert!(job.contains("post-copy: switched"), "{job}");
    wait_state(&h.dst, "t", "running (migrated)");
    assert_pattern_ok(&h.dst, "t", MEM, dir.path());
}

/// Lines of an `event --loop` output whose lifecycle detail is exactly `detail` (so that
/// `Post-copy` does not match `Post-copy Error`).
fn event_at(out: &str, detail: &str) -> Option<usize> {
    out.lines()
        .position(|l| l.ends_with(&format!(": {detail}")))
}

/// The resume command of §5d, with the flags of the migration it resumes.
fn resume_args<'a>(name: &'a str, dst: &'a str) -> [&'a str; 7] {
    [
        "migrate",
        name,
        dst,
        "--live",
        "--p2p",
        "--postcopy",
        "--postcopy-resume",
    ]
}

/// Memory of the resume tests' guest.
const BIG: u64 = 512;

/// A `pattern` guest migrated with `--postcopy`, switched, then paused by `domjobabort
/// --postcopy` (QMP `migrate-pause`): both sides `post-copy failed`, both VMMs
/// `postcopy-paused`. 480 MiB written in order, page after page, by one vCPU: after the
/// switch the destination fetches them one fault at a time, which leaves post-copy running
/// while the pause is sent.
fn paused_pattern_postcopy(h: &Hosts, dir: &std::path::Path, name: &str) {
    let bg = start_pattern_postcopy(h, dir, name);
    h.src.ok(&["domjobabort", name, "--postcopy"]);
    failed_both_sides(h, name, bg);
}

/// The migration of [`paused_pattern_postcopy`], up to the switch.
fn start_pattern_postcopy(h: &Hosts, dir: &std::path::Path, name: &str) -> Bg {
    run_guest(&h.src, dir, name, BIG, "pattern", 480, 0);
    h.src.ok(&["migrate-setmaxdowntime", name, "1"]);
    let dst = h.dst.tcp_uri();
    let bg = Bg::spawn(
        &h.src.uri(),
        &[
            "migrate",
            name,
            &dst,
            "--live",
            "--p2p",
            "--postcopy",
            "--bandwidth",
            "2",
            "--postcopy-bandwidth",
            "1",
        ],
    );
    wait_migration_iteration(&h.src, name);
    h.src.ok(&["migrate-postcopy", name]);
    wait_state(&h.src, name, "paused (post-copy)");
    bg
}

/// The post-copy of `bg` broke after the switch: both sides `post-copy failed`, both VMMs
/// `postcopy-paused`.
fn failed_both_sides(h: &Hosts, name: &str, bg: Bg) {
    let (ok, _, err) = bg.wait();
    assert!(!ok, "the paused migration reported success");
    assert!(err.contains("post-copy failed after the switch"), "{err}");
    assert!(err.contains("--postcopy-resume"), "{err}");
    wait_state(&h.src, name, "paused (post-copy failed)");
    wait_state(&h.dst, name, "running (post-copy failed)");
    let q = h.src.qmp(name, "query-migrate", json!({}));
    assert_eq!(q["status"], "postcopy-paused", "{q}");
    let q = h.dst.qmp(name, "query-migrate", json!({}));
    assert_eq!(q["status"], "postcopy-paused", "{q}");
}

/// §5d end to end: a `pattern` guest in post-copy, paused by `domjobabort --postcopy` (QMP
/// `migrate-pause`): both sides `post-copy failed`. A resume while the destination daemon is
/// down fails clearly and changes nothing; both daemons restarted find the failed state
/// again from their status files; a new migration and `resume` are refused; the resume then
/// completes: the source is shut off, the destination runs with every page (pattern check),
/// with libvirt's events for a resumed job.
#[test]
fn a_paused_postcopy_resumes_after_a_failed_attempt_and_completes_with_the_guest_intact() {
    let dir = tmpdir();
    let Some(mut h) = Hosts::up(dir.path()) else {
        return;
    };
    let name = "pr";
    paused_pattern_postcopy(&h, dir.path(), name);
    let (src_vmm, dst_vmm) = (vmm_pid(&h.src), vmm_pid(&h.dst));
    let dst = h.dst.tcp_uri();

    // Neither a new migration nor `resume` may run the stale source; the destination side
    // cannot start the resume.
    let e = h.src.fails(&["migrate", name, &dst, "--live", "--p2p"]);
    assert!(e.contains("failed after the switch"), "{e}");
    let e = h.src.fails(&["resume", name]);
    assert!(e.contains("never resumed"), "{e}");
    let e = h.dst.fails(&resume_args(name, &h.src.tcp_uri()));
    assert!(
        e.contains("is the destination of the failed post-copy"),
        "{e}"
    );

    // The destination daemon is down: the resume fails before anything changes.
    h.dst.kill();
    let e = h.src.fails(&resume_args(name, &dst));
    assert!(e.contains("cannot reach the destination daemon"), "{e}");
    assert!(e.contains("nothing changed"), "{e}");
    assert_eq!(h.src.state(name), "paused (post-copy failed)");
    let job = h.src.ok(&["domjobinfo", name, "--completed"]);
    assert!(job.contains("Job type:         Failed"), "{job}");

    // Both daemons restarted: the status files bring the failed state back.
    h.src.kill();
    h.src.restart();
    h.dst.restart();
    wait_state(&h.src, name, "paused (post-copy failed)");
    wait_state(&h.dst, name, "running (post-copy failed)");
    assert!(pid_alive(src_vmm) && pid_alive(dst_vmm), "a VMM was lost");
    let e = h.src.fails(&["resume", name]);
    assert!(e.contains("never resumed"), "{e}");

    let mut src_events = Bg::events(&h.src, name);
    let mut dst_events = Bg::events(&h.dst, name);
    // Both listen once they print an event of their own: `define` emits `Defined Added`
    // (the live XML, with the domain's UUID; the destination's copy becomes persistent,
    // which changes nothing below).
    let live = write_xml(dir.path(), "pr-live", &h.src.ok(&["dumpxml", name]));
    h.src.ok(&["define", &live]);
    src_events.wait_line("Defined");
    h.dst.ok(&["define", &live]);
    dst_events.wait_line("Defined");
    resume_succeeds(&h, name, &dst);
    wait_pid_exit(src_vmm);
    wait_state(&h.dst, name, "running (migrated)");
    assert!(pid_alive(dst_vmm), "the destination VMM was replaced");
    let job = h.src.ok(&["domjobinfo", name, "--completed"]);
    assert!(job.contains("Job type:         Completed"), "{job}");
    assert!(job.contains("post-copy resumed"), "{job}");
    let djob = h.dst.ok(&["domjobinfo", name, "--completed"]);
    assert!(djob.contains("Job type:         Completed"), "{djob}");
    assert_guest_runs(&h.dst, name);
    assert_pattern_ok(&h.dst, name, BIG, dir.path());
    // The resumed job's end comes after the source's VMM is gone.
    let out = src_events.wait_for_line("job-completed");
    let pc = event_at(&out, "Suspended Post-copy")
        .unwrap_or_else(|| panic!("no Suspended Post-copy: {out}"));
    let gone =
        event_at(&out, "Stopped Migrated").unwrap_or_else(|| panic!("no Stopped Migrated: {out}"));
    assert!(pc < gone, "{out}");
    assert!(
        event_at(&out, "Suspended Post-copy Error").is_none(),
        "{out}"
    );
    h.dst.ok(&["destroy", name]);
    let out = dst_events.wait_for_line("Stopped Destroyed");
    let pc = event_at(&out, "Resumed Post-copy")
        .unwrap_or_else(|| panic!("no Resumed Post-copy: {out}"));
    let migrated =
        event_at(&out, "Resumed Migrated").unwrap_or_else(|| panic!("no Resumed Migrated: {out}"));
    assert!(pc < migrated, "recovered, then migrated: {out}");
}

/// §5d, the source daemon lost in the middle of a resume: it dies after `prepare_resume`
/// (the destination's VMM listens, the source's never connects). The destination gives its
/// resume job up after its Prepare timeout and keeps the VMM; the restarted source daemon
/// shows the source `post-copy failed` again; a second resume (a second `migrate-recover`,
/// which replaces the listener nobody connected to, decision 175) completes.
#[test]
fn a_resume_whose_source_daemon_died_after_prepare_is_given_up_and_retried() {
    let dir = tmpdir();
    let Some(mut h) = Hosts::up_full(dir.path(), &[], &["--migration-prepare-timeout", "2"]) else {
        return;
    };
    let name = "pd";
    paused_pattern_postcopy(&h, dir.path(), name);
    let (src_vmm, dst_vmm) = (vmm_pid(&h.src), vmm_pid(&h.dst));
    let dst = h.dst.tcp_uri();
    // The source daemon stops for ever once the destination listens.
    h.src.env = vec![(
        "TERND_X_TEST_STALL".to_string(),
        "prepare-resume-done".to_string(),
    )];
    h.src.kill();
    h.src.restart();
    wait_state(&h.src, name, "paused (post-copy failed)");
    let bg = Bg::spawn(&h.src.uri(), &resume_args(name, &dst));
    h.src.wait_log("stalling at prepare-resume-done");
    h.src.kill();
    let (ok, _, _) = bg.wait();
    assert!(!ok, "the client lost its daemon");
    // No Finish within the Prepare timeout: the job is given up, the VMM kept.
    h.dst.wait_log("post-copy resume given up here");
    assert_eq!(h.dst.state(name), "running (post-copy failed)");
    assert!(pid_alive(dst_vmm) && pid_alive(src_vmm), "a VMM was lost");
    let job = h.dst.ok(&["domjobinfo", name, "--completed"]);
    assert!(job.contains("post-copy resume failed"), "{job}");
    h.src.env.clear();
    h.src.restart();
    wait_state(&h.src, name, "paused (post-copy failed)");
    resume_succeeds(&h, name, &dst);
    wait_pid_exit(src_vmm);
    wait_state(&h.dst, name, "running (migrated)");
    assert!(pid_alive(dst_vmm), "the destination VMM was replaced");
    assert_pattern_ok(&h.dst, name, BIG, dir.path());
}

/// §5d, both daemons lost in the middle of a resume, and the VMMs recovered by hand: the
/// source daemon dies after `prepare_resume`, the destination daemon is killed too; both
/// restarted show `post-copy failed` again. An operator then sends `migrate {uri, resume:
/// true}` to the source VMM itself (`qemu-monitor-command`, the URI the destination daemon
/// logged): each daemon takes the recovery it did not drive up (no resume job) and follows it
/// to the end: source `shut off (migrated)`, destination `running (migrated)`, pattern intact.
#[test]
fn a_recovery_no_daemon_drives_is_taken_up_and_followed_to_the_end() {
    let dir = tmpdir();
    let Some(mut h) = Hosts::up(dir.path()) else {
        return;
    };
    let name = "ph";
    paused_pattern_postcopy(&h, dir.path(), name);
    let (src_vmm, dst_vmm) = (vmm_pid(&h.src), vmm_pid(&h.dst));
    let dst = h.dst.tcp_uri();
    h.src.env = vec![(
        "TERND_X_TEST_STALL".to_string(),
        "prepare-resume-done".to_string(),
    )];
    h.src.kill();
    h.src.restart();
    wait_state(&h.src, name, "paused (post-copy failed)");
    let bg = Bg::spawn(&h.src.uri(), &resume_args(name, &dst));
    h.src.wait_log("stalling at prepare-resume-done");
    h.dst.wait_log("prepare_resume: the VMM listens at ");
    let log = h.dst.log();
    let uri = log
        .lines()
        .find_map(|l| l.split("prepare_resume: the VMM listens at ").nth(1))
        .map(str::trim)
        .expect("the recovery URI in the destination's log")
        .to_string();
    h.src.kill();
    let (ok, _, _) = bg.wait();
    assert!(!ok, "the client lost its daemon");
    h.dst.kill();
    h.dst.restart();
    h.src.env.clear();
    h.src.restart();
    wait_state(&h.src, name, "paused (post-copy failed)");
    wait_state(&h.dst, name, "running (post-copy failed)");
    // By hand, on the source VMM: the destination VMM still listens where it was told (the
    // push at 64 MiB/s from here, as --postcopy-bandwidth 64 would set it).
    h.src.qmp(
        name,
        "migrate-set-parameters",
        json!({"max-postcopy-bandwidth": 64u64 << 20}),
    );
    h.src
        .qmp(name, "migrate", json!({"uri": uri, "resume": true}));
    let deadline = Instant::now() + T;
    loop {
        let s = h.src.state(name);
        assert!(!s.starts_with("running"), "the source was resumed: {s}");
        if s == "shut off (migrated)" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the source never finished: {s}\n--- src:\n{}\n--- dst:\n{}",
            h.src.log(),
            h.dst.log()
        );
        std::thread::yield_now();
    }
    wait_pid_exit(src_vmm);
    wait_state(&h.dst, name, "running (migrated)");
    assert!(pid_alive(dst_vmm), "the destination VMM was replaced");
    assert_pattern_ok(&h.dst, name, BIG, dir.path());
}

/// Sets the veth end in the source's namespace down or up (down: the route to the
/// destination's host is gone, every connection between the hosts stalls).
fn link(h: &Hosts, up: bool) {
    let o = std::process::Command::new("ip")
        .args(["-n", &h.net.src, "-o", "link", "show", "type", "veth"])
        .output()
        .expect("ip link show");
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let dev = text
        .split(": ")
        .nth(1)
        .and_then(|n| n.split('@').next())
        .unwrap_or_else(|| panic!("no veth in {}: {text}", h.net.src))
        .to_string();
    let state = if up { "up" } else { "down" };
    let o = std::process::Command::new("ip")
        .args(["-n", &h.net.src, "link", "set", &dev, state])
        .output()
        .expect("ip link set");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `--postcopy-resume` of `name`'s failed post-copy to `dst`, the push at 64 MiB/s
/// (`--postcopy-bandwidth` applies to the resumed job), succeeds and shuts the source off.
fn resume_succeeds(h: &Hosts, name: &str, dst: &str) {
    let args = [
        &resume_args(name, dst)[..],
        &["--postcopy-bandwidth", "64"][..],
    ]
    .concat();
    let (ok, _, err) = Bg::spawn(&h.src.uri(), &args).wait();
    assert!(
        ok,
        "resume failed: {err}\n--- src:\n{}\n--- dst:\n{}",
        h.src.log(),
        h.dst.log()
    );
    assert_eq!(h.src.state(name), "shut off (migrated)");
}

/// [`resume_succeeds`], and the destination then runs with every page (pattern check).
fn resume_completes(h: &Hosts, name: &str, dst: &str, dir: &std::path::Path) {
    resume_succeeds(h, name, dst);
    wait_state(&h.dst, name, "running (migrated)");
    assert_pattern_ok(&h.dst, name, BIG, dir);
}

/// §5d after a cut link: the link between the hosts goes down in post-copy; both VMMs pause
/// by themselves (their liveness limit), the daemons show `post-copy failed`; a resume while
/// the link is down fails at once ("cannot reach the destination daemon ... nothing
/// changed"); once it is back the resume completes with the guest intact.
#[test]
fn a_cut_link_pauses_postcopy_and_the_resume_after_it_is_back_completes() {
    let dir = tmpdir();
    let Some(h) = Hosts::up(dir.path()) else {
        return;
    };
    let name = "pl";
    let bg = start_pattern_postcopy(&h, dir.path(), name);
    link(&h, false);
    failed_both_sides(&h, name, bg);
    let dst = h.dst.tcp_uri();
    let e = h.src.fails(&resume_args(name, &dst));
    assert!(e.contains("cannot reach the destination daemon"), "{e}");
    assert!(e.contains("nothing changed"), "{e}");
    assert_eq!(h.src.state(name), "paused (post-copy failed)");
    assert_eq!(h.dst.state(name), "running (post-copy failed)");
    link(&h, true);
    resume_completes(&h, name, &dst, dir.path());
}

/// §5c, the destination without Finish: the source daemon stops right after the switch, before
/// its Finish (`postcopy-before-finish`), and the link between the hosts goes down. The
/// destination's VMM pauses by its liveness limit and its daemon ends the job by itself:
/// `running (post-copy failed)`, no job left, resumable (the race a cut right after the switch
/// used to lose, with the destination `running (post-copy)` for ever). With the link back and
/// the source daemon restarted, the resume completes with the guest intact.
#[test]
fn a_cut_before_finish_fails_the_destination_job_by_itself_and_the_resume_completes() {
    let dir = tmpdir();
    let Some(mut h) = Hosts::up(dir.path()) else {
        return;
    };
    h.src.env = vec![("TERND_X_TEST_STALL".into(), "postcopy-before-finish".into())];
    h.src.kill();
    h.src.restart();
    let name = "pf";
    let bg = start_pattern_postcopy(&h, dir.path(), name);
    h.src.wait_log("x-test: stalling at postcopy-before-finish");
    wait_state(&h.dst, name, "running (post-copy)");
    link(&h, false);
    wait_state(&h.dst, name, "running (post-copy failed)");
    let q = h.dst.qmp(name, "query-migrate", json!({}));
    assert_eq!(q["status"], "postcopy-paused", "{q}");
    let info = h.dst.ok(&["domjobinfo", name, "--completed"]);
    assert!(info.contains("Job type:         Failed"), "{info}");
    assert!(
        info.contains("post-copy failed on the destination"),
        "{info}"
    );

    link(&h, true);
    h.src.kill();
    let (ok, _, _) = bg.wait();
    assert!(!ok, "the migration reported success from a killed daemon");
    h.src.env.clear();
    h.src.restart();
    wait_state(&h.src, name, "paused (post-copy failed)");
    let dst = h.dst.tcp_uri();
    resume_completes(&h, name, &dst, dir.path());
}
