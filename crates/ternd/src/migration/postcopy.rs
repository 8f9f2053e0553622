//! Post-copy through the daemons (`--postcopy`, `VIR_MIGRATE_POSTCOPY`; docs/management.md
//! §5c). Before the switch a post-copy job is a pre-copy job with `postcopy-ram` on both VMMs.
//! The switch is the source VMM's `postcopy-active`: from then on the destination holds the
//! only copy that may run, so
//!
//! * the source is never resumed (Confirm waits for its VMM to finish sending, then quits it;
//!   any failure leaves it `paused (post-copy failed)`),
//! * the destination's VMM is never killed by a daemon (Finish, a cancel, a restart),
//! * `domjobabort` is refused unless `--postcopy` (QMP `migrate-pause`).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use virt::{
    Connection, DomainState, Error, JobInfo, JobType, LifecycleEvent, MigrateOptions, Result,
};

use super::source::{finish, note, sample, Ctx, FinishOutcome, SAMPLE_PERIOD};
use super::stats::from_query_migrate;
use crate::daemon::Daemon;
use crate::domain::{Domain, JobKind, Vmm};
use crate::vmm;

/// The statuses that end a post-copy phase for the daemons: the VMMs' final ones, and
/// `postcopy-paused` (a lost peer or `migrate-pause`: the job ends as a failure, which
/// `--postcopy-resume` can resume, §5d).
pub fn over(status: &str) -> bool {
    super::is_terminal(status) || status == "postcopy-paused"
}

fn monitor_err(e: virt_util::UtilError) -> Error {
    Error::Monitor(e.to_string())
}

/// Begin: the source's VMM must accept `postcopy-ram`.
pub fn probe_source(vmm: &Vmm, driver: &str) -> Result<()> {
    let ok = vmm
        .monitor
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .supported_capabilities(&["postcopy-ram"])
        .map_err(monitor_err)?;
    if ok.is_empty() {
        return Err(Error::Unsupported(format!(
            "--postcopy: the source's VMM ({driver} driver) refuses the postcopy-ram capability"
        )));
    }
    Ok(())
}

/// Prepare: the destination's VMM must accept `postcopy-ram`, the source's cookie must offer
/// it, and the return path must be on (the page requests travel on it).
pub fn check_destination(
    vmm: &Vmm,
    driver: &str,
    source_offers: bool,
    return_path: bool,
) -> Result<()> {
    if !source_offers {
        return Err(Error::Unsupported(
            "--postcopy: the source's cookie does not offer postcopy-ram".into(),
        ));
    }
    if !return_path {
        return Err(Error::Unsupported(
            "--postcopy: post-copy needs the return path (page requests travel on it), which \
             is off for this migration"
                .into(),
        ));
    }
    probe_source(vmm, driver).map_err(|_| {
        Error::Unsupported(format!(
            "--postcopy: the destination's VMM ({driver} driver) refuses the postcopy-ram capability"
        ))
    })
}

fn capability_on(vmm: &Vmm, name: &str) -> Result<bool> {
    let list = vmm.qmp("query-migrate-capabilities", Value::Null)?;
    Ok(list.as_array().into_iter().flatten().any(|c| {
        c.get("capability").and_then(Value::as_str) == Some(name)
            && c.get("state").and_then(Value::as_bool) == Some(true)
    }))
}

/// Perform: `postcopy-ram` and `max-postcopy-bandwidth` for this migration only (a value an
/// earlier job left on the VMM is taken back, as libvirt restores parameters after a job).
pub fn configure_source(vmm: &Vmm, opts: &MigrateOptions) -> Result<()> {
    if opts.postcopy || capability_on(vmm, "postcopy-ram")? {
        vmm.monitor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_capabilities(&[("postcopy-ram", opts.postcopy)])
            .map_err(monitor_err)?;
    }
    let bytes = match opts.postcopy_bandwidth {
        Some(mib_s) => mib_s.checked_mul(1 << 20).ok_or_else(|| {
            Error::InvalidArg(format!("--postcopy-bandwidth {mib_s} MiB/s is too large"))
        })?,
        None => 0,
    };
    let p = vmm.qmp("query-migrate-parameters", json!({}))?;
    let now = p.get("max-postcopy-bandwidth").and_then(Value::as_u64);
    if now.is_some_and(|v| v != bytes) {
        vmm.qmp(
            "migrate-set-parameters",
            json!({ "max-postcopy-bandwidth": bytes }),
        )?;
    }
    Ok(())
}

/// `migrate-postcopy` (`virDomainMigrateStartPostCopy`).
pub fn start(d: &Daemon, key: &str) -> Result<()> {
    let dom = d.lookup(key)?;
    let vmm = {
        let g = dom.lock();
        let job = g.job.as_ref().filter(|j| j.kind == JobKind::MigrationOut);
        let Some(j) = job else {
            return Err(Error::OperationInvalid(
                "post-copy can only be started while outgoing migration is in progress".into(),
            ));
        };
        if !j.postcopy {
            return Err(Error::OperationInvalid(
                "switching to post-copy requires migration to be started with \
                 VIR_MIGRATE_POSTCOPY flag (ternctl migrate --postcopy)"
                    .into(),
            ));
        }
        if j.postcopy_switched {
            return Err(Error::OperationInvalid("post-copy already started".into()));
        }
        if j.phase != "perform" {
            return Err(Error::OperationInvalid(format!(
                "post-copy can only be started once the migration runs (phase perform; it is in phase {})",
                j.phase
            )));
        }
        g.vmm.clone()
    };
    let vmm = vmm.ok_or_else(|| Error::OperationInvalid("domain is not running".into()))?;
    vmm.qmp("migrate-start-postcopy", json!({})).map_err(|e| {
        Error::OperationFailed(format!(
            "the source VMM refused migrate-start-postcopy: {e}"
        ))
    })?;
    tracing::info!("{}: migrate-start-postcopy issued", dom.name);
    Ok(())
}

/// `domjobabort --postcopy` (`VIR_DOMAIN_ABORT_JOB_POSTCOPY`): QMP `migrate-pause` on the
/// source VMM of a migration in post-copy; the VMM's refusal is relayed.
pub fn pause(d: &Daemon, key: &str) -> Result<()> {
    let dom = d.lookup(key)?;
    let vmm = {
        let g = dom.lock();
        let switched = g
            .job
            .as_ref()
            .is_some_and(|j| j.kind == JobKind::MigrationOut && j.postcopy_switched);
        if !switched {
            return Err(Error::OperationInvalid(
                "current job is not outgoing migration in post-copy mode".into(),
            ));
        }
        g.vmm.clone()
    };
    let vmm = vmm.ok_or_else(|| Error::OperationInvalid("domain is not running".into()))?;
    vmm.qmp("migrate-pause", json!({})).map_err(|e| {
        Error::OperationFailed(format!(
            "domjobabort --postcopy: the source VMM refused migrate-pause: {e}"
        ))
    })?;
    Ok(())
}

/// The source after the switch: Finish on the destination (it runs the guest in post-copy),
/// then Confirm: wait for the source VMM to finish sending; `completed` → quit it; anything
/// else → it stays paused (`post-copy failed`), never resumed.
pub(super) fn finish_and_confirm(
    d: &Arc<Daemon>,
    dom: &Arc<Domain>,
    vmm: &Arc<Vmm>,
    dest_uri: &str,
    peer: &mut Connection,
    ctx: &mut Ctx,
) -> Result<()> {
    note(
        dom,
        ctx,
        "post-copy: switched (the source VMM reported postcopy-active); from here only the \
         destination may run the guest and the source is never resumed"
            .into(),
    );
    finish_and_confirm_phases(d, dom, vmm, dest_uri, peer, ctx, ("finish", "confirm"))
}

/// Finish and Confirm after the switch, or after a resume (`phases`: the names `domjobinfo`
/// shows, libvirt's `finish_resume` / `confirm_resume` for a resume).
pub(super) fn finish_and_confirm_phases(
    d: &Arc<Daemon>,
    dom: &Arc<Domain>,
    vmm: &Arc<Vmm>,
    dest_uri: &str,
    peer: &mut Connection,
    ctx: &mut Ctx,
    phases: (&'static str, &'static str),
) -> Result<()> {
    dom.set_phase(phases.0);
    crate::fault::point("postcopy-before-finish");
    let finish_err = match finish(dest_uri, peer, &dom.name) {
        FinishOutcome::Done => None,
        FinishOutcome::Refused(e) | FinishOutcome::NotDelivered(e) | FinishOutcome::Unknown(e) => {
            note(
                dom,
                ctx,
                format!(
                    "the destination daemon did not finish the job ({e}); its VMM carries on \
                     with post-copy"
                ),
            );
            Some(e)
        }
    };
    dom.set_phase(phases.1);
    let end = wait_end(dom, vmm, ctx);
    let q = ctx.last.clone().unwrap_or(Value::Null);
    match end.as_deref() {
        Ok("completed") => {
            if let Err(e) = d.quit_domain(dom, "migrated") {
                tracing::warn!("{}: quitting the source VMM: {e}", dom.name);
                let _ = d.destroy_domain(dom, "migrated");
            }
            match finish_err {
                None => Ok(()),
                Some(e) => Err(Error::OperationFailed(format!(
                    "post-copy completed (every page is on the destination), but the \
                     destination daemon did not finish the job ({e}): check `domstate {name}` \
                     there and `resume {name}` there if it is paused",
                    name = dom.name
                ))),
            }
        }
        Ok(status) => {
            let desc = q
                .get("error-desc")
                .and_then(Value::as_str)
                .unwrap_or("no error description");
            source_failed(d, dom);
            Err(Error::OperationFailed(format!(
                "post-copy failed after the switch (source VMM: {status}: {desc}): the guest \
                 may run on the destination with the pages it received; the source stays \
                 paused and is never resumed (its memory is stale). Check `domstate --reason \
                 {name}` on the destination; {}",
                resume_hint(status),
                name = dom.name
            )))
        }
        Err(e) => Err(Error::OperationFailed(format!(
            "post-copy failed after the switch: {e}; the pages the destination had not \
             received are lost. Check `domstate --reason {}` on the destination",
            dom.name
        ))),
    }
}

/// Waits (no limit: the VMMs' own liveness limits end a stuck post-copy) until the source
/// VMM's post-copy phase ends.
fn wait_end(dom: &Domain, vmm: &Vmm, ctx: &mut Ctx) -> Result<String> {
    loop {
        dom.wait_until(SAMPLE_PERIOD, |g| {
            g.vmm.is_none() || g.mig_status.as_deref().is_some_and(over)
        });
        if dom.lock().vmm.is_none() {
            return Err(Error::OperationFailed(
                "the source VMM exited during post-copy".into(),
            ));
        }
        let q = vmm.qmp("query-migrate", json!({}))?;
        let status = q
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string();
        ctx.samples.push(sample(&q, ctx.started));
        ctx.last = Some(q);
        if over(&status) {
            return Ok(status);
        }
    }
}

/// What the operator can do after a post-copy failure whose source VMM ended `status`.
pub(super) fn resume_hint(status: &str) -> &'static str {
    if status == "postcopy-paused" {
        "both VMMs are postcopy-paused: `migrate ... --postcopy --postcopy-resume` with the \
         same destination resumes it once the cause is fixed"
    } else {
        "the source VMM ended the migration (not postcopy-paused), so it cannot be resumed; if \
         the destination lost its source's pages the guest cannot be saved"
    }
}

/// libvirt's `qemuMigrationSrcPostcopyFailed`: the source stays paused, reason `post-copy
/// failed`, event `Suspended Post-copy Error` (once: a resume that fails again before the
/// VMM left the paused state changes nothing). Recorded for `--postcopy-resume` (§5d).
pub(super) fn source_failed(d: &Daemon, dom: &Domain) {
    let already = {
        let g = dom.lock();
        if g.vmm.is_none() {
            return;
        }
        g.state == DomainState::Paused && g.reason == "post-copy failed"
    };
    vmm::mark_postcopy_failed(d, dom, Some(JobKind::MigrationOut));
    if already {
        return;
    }
    dom.set_state(DomainState::Paused, "post-copy failed");
    d.events
        .lifecycle(&dom.name, LifecycleEvent::Suspended, "Post-copy Error");
}

/// libvirt's `qemuMigrationDstPostcopyFailed`: a running destination stays running with
/// reason `post-copy failed` (event `Resumed Post-copy Error`), a paused one paused.
/// Recorded for `--postcopy-resume` (§5d).
pub(super) fn destination_failed(d: &Daemon, dom: &Domain) {
    let (state, reason) = {
        let g = dom.lock();
        if g.vmm.is_none() {
            return;
        }
        (g.state, g.reason.clone())
    };
    vmm::mark_postcopy_failed(d, dom, Some(JobKind::MigrationIn));
    if reason == "post-copy failed" {
        return;
    }
    if state == DomainState::Running {
        dom.set_state(DomainState::Running, "post-copy failed");
        d.events
            .lifecycle(&dom.name, LifecycleEvent::Resumed, "Post-copy Error");
    } else {
        dom.set_state(DomainState::Paused, "post-copy failed");
        d.events
            .lifecycle(&dom.name, LifecycleEvent::Suspended, "Post-copy Error");
    }
}

/// How long Finish waits for the destination VMM to enter post-copy (or complete).
const SWITCH_WAIT: Duration = Duration::from_secs(30);

/// Finish on the destination of a post-copy job: once its VMM is in post-copy (or done), run
/// the guest (`cont` unless it runs already: autostart), make it persistent if asked, and
/// hand the rest to a watcher that ends the job when the VMM finishes. Never kills the VMM
/// once it switched: its memory is part of the only copy.
pub fn finish_incoming(d: &Arc<Daemon>, dom: &Arc<Domain>, persistent: bool) -> Result<()> {
    let vmm = dom
        .vmm()
        .map_err(|_| Error::OperationFailed("the destination VMM exited before Finish".into()))?;
    dom.wait_until(SWITCH_WAIT, |g| {
        g.vmm.is_none()
            || g.mig_status.as_deref().is_some_and(over)
            || g.job.as_ref().is_some_and(|j| j.postcopy_switched)
    });
    let q = vmm.qmp("query-migrate", json!({}))?;
    let status = q.get("status").and_then(Value::as_str).unwrap_or("none");
    let switched = dom.postcopy_switched();
    if !switched && status != "completed" {
        return Err(Error::OperationFailed(format!(
            "the incoming migration on the destination is '{status}', not in post-copy: {}",
            q.get("error-desc").and_then(Value::as_str).unwrap_or("-")
        )));
    }
    dom.set_phase("postcopy");
    if !super::dest::is_running(&vmm) {
        if let Err(e) = vmm.qmp("cont", json!({})) {
            // Kept whatever happens: the guest's memory is split between the hosts.
            tracing::error!("{}: cont in post-copy: {e}", dom.name);
        }
    }
    dom.wait_until(SWITCH_WAIT, |g| {
        g.state == DomainState::Running || g.vmm.is_none()
    });
    if persistent {
        let xml = virt::conf::format_domain(&dom.lock().def, None);
        if let Err(e) = d.define(&xml) {
            tracing::error!("{}: --persistent: {e}", dom.name);
        }
    }
    watch_incoming(d, dom, &vmm);
    Ok(())
}

/// Ends the destination's post-copy job when its VMM finishes: `completed` → `running
/// (migrated)` (`Resumed Migrated`); anything else → post-copy failed, the VMM kept.
pub fn watch_incoming(d: &Arc<Daemon>, dom: &Arc<Domain>, vmm: &Arc<Vmm>) {
    let (d, dom, vmm) = (d.clone(), dom.clone(), vmm.clone());
    let name = dom.name.clone();
    // The job this watcher ends, and no other: a watcher that wakes after its job ended (a
    // second one for the same job, decision 208) must not end a resume begun since.
    let watched = dom.lock().job.as_ref().map(|j| j.started);
    let r = std::thread::Builder::new()
        .name(format!("mig-in-pc-{name}"))
        .spawn(move || {
            let same = |g: &crate::domain::DomainInner| {
                watched.is_some() && g.job.as_ref().map(|j| j.started) == watched
            };
            // No limit: the VMMs' own liveness limits end a post-copy whose peer is gone.
            while !dom.wait_until(Duration::from_secs(3600), |g| {
                g.vmm.is_none() || !same(g) || g.mig_status.as_deref().is_some_and(over)
            }) {}
            if !same(&dom.lock()) {
                return;
            }
            let q = match vmm.qmp("query-migrate", json!({})) {
                Ok(q) if dom.lock().vmm.is_some() => q,
                _ => {
                    end(
                        &dom,
                        JobType::Failed,
                        None,
                        "the destination VMM exited during post-copy".into(),
                    );
                    return;
                }
            };
            let status = q.get("status").and_then(Value::as_str).unwrap_or("none");
            if status == "completed" {
                vmm::mark(&d, &dom, false, None);
                vmm::mark_postcopy_failed(&d, &dom, None);
                if dom.lock().state == DomainState::Running {
                    dom.set_state(DomainState::Running, "migrated");
                    d.events
                        .lifecycle(&dom.name, LifecycleEvent::Resumed, "Migrated");
                }
                tracing::info!("{}: post-copy completed", dom.name);
                let mut info = from_query_migrate(&q, JobType::Completed, super::dest::OP);
                info.errmsg = None;
                dom.end_job(info);
                return;
            }
            let desc = q
                .get("error-desc")
                .and_then(Value::as_str)
                .unwrap_or("no error description")
                .to_string();
            destination_failed(&d, &dom);
            vmm::mark(&d, &dom, false, None);
            tracing::error!("{}: post-copy failed here ({status}): {desc}", dom.name);
            end(
                &dom,
                JobType::Failed,
                Some(&q),
                format!(
                    "post-copy failed on the destination ({status}: {desc}): the VMM is kept \
                     (it holds the guest's newest state); vCPUs that touch pages it never \
                     received stay blocked. The source stays paused and is never resumed; {}",
                    if status == "postcopy-paused" {
                        "`migrate ... --postcopy --postcopy-resume` on the source resumes it"
                    } else {
                        "this VMM ended the migration, so it cannot be resumed"
                    }
                ),
            );
        });
    if let Err(e) = r {
        tracing::error!("{name}: spawning the post-copy watcher: {e}");
    }
}

fn end(dom: &Domain, t: JobType, q: Option<&Value>, err: String) {
    let mut info = match q {
        Some(q) => from_query_migrate(q, t, super::dest::OP),
        None => JobInfo {
            job_type: t,
            operation: Some(super::dest::OP.into()),
            ..Default::default()
        },
    };
    info.errmsg = Some(err);
    dom.end_job(info);
}

/// libvirt's `qemuProcessHandleMigrationStatus` on a destination: its VMM's post-copy ended
/// other than `completed` (`postcopy-paused`, `failed`) after the switch, before the source
/// daemon's Finish came. A link cut right after the switch stops Finish too, and a source
/// daemon may die before sending it: without this the job would stay open and the domain
/// `running (post-copy)` for ever, and `--postcopy-resume` would find a job running here. The
/// event thread claims the job (phase `postcopy`: a Finish that comes later is a repeated
/// one) and hands it to the watcher, which ends it as Finish's would have. Called from the
/// event thread, so the QMP round trips are left to the watcher's own thread.
pub fn incoming_failed_before_finish(d: &Arc<Daemon>, dom: &Arc<Domain>, vmm: &Arc<Vmm>) {
    let claimed = {
        let mut g = dom.lock();
        match g.job.as_mut() {
            Some(j)
                if j.kind == JobKind::MigrationIn
                    && !j.resume
                    && j.postcopy_switched
                    && j.phase == "prepared" =>
            {
                j.phase = "postcopy";
                true
            }
            _ => false,
        }
    };
    if claimed {
        tracing::warn!(
            "{}: post-copy ended here before the source daemon's Finish came",
            dom.name
        );
        watch_incoming(d, dom, vmm);
    }
}

/// A restarted destination daemon found its incoming VMM in post-copy: the job is taken up
/// again (Finish from the source then succeeds at once) and the watcher ends it.
pub fn resume_incoming_watch(d: &Arc<Daemon>, dom: &Arc<Domain>, vmm: &Arc<Vmm>, running: bool) {
    if dom.begin_job(JobKind::MigrationIn).is_err() {
        return;
    }
    if let Some(j) = dom.lock().job.as_mut() {
        j.postcopy = true;
        j.postcopy_switched = true;
        j.phase = "postcopy";
    }
    if running {
        dom.set_state(DomainState::Running, "post-copy");
    }
    vmm::mark_postcopy(d, dom);
    watch_incoming(d, dom, vmm);
}

/// A restarted source daemon found its outgoing migration switched to post-copy: never
/// resumed, never cancelled. Finish is called again on the destination (idempotent there),
/// then the VMM's own end decides as in [`finish_and_confirm`], on a thread.
pub fn recover_source(
    d: &Arc<Daemon>,
    dom: &Arc<Domain>,
    vmm: &Arc<Vmm>,
    dest_uri: Option<&str>,
    status: &str,
) -> bool {
    let name = dom.name.clone();
    if let Some(uri) = dest_uri {
        let r = Connection::open(uri).and_then(|mut c| {
            c.set_timeout(Some(super::source::PEER_CALL_TIMEOUT))?;
            super::source::call_finish(&mut c, &name, false)
        });
        if let Err(e) = r {
            tracing::warn!("{name}: Finish on the destination (post-copy): {e}");
        }
    }
    if dom.begin_job(JobKind::MigrationOut).is_err() {
        return false;
    }
    if let Some(j) = dom.lock().job.as_mut() {
        j.postcopy = true;
        j.postcopy_switched = true;
        j.phase = "confirm";
        j.notes.push(format!(
            "recovered after a daemon restart in post-copy ({status}): the source is never resumed"
        ));
    }
    dom.lock().mig_status = Some(status.to_string());
    if dom.lock().state == DomainState::Paused {
        dom.set_state(DomainState::Paused, "post-copy");
    }
    vmm::mark_postcopy(d, dom);
    let (d, dom, vmm) = (d.clone(), dom.clone(), vmm.clone());
    let r = std::thread::Builder::new()
        .name(format!("mig-out-pc-{name}"))
        .spawn(move || {
            let mut ctx = Ctx::new();
            let end = wait_end(&dom, &vmm, &mut ctx);
            let q = ctx.last.clone().unwrap_or(Value::Null);
            let mut info = from_query_migrate(&q, JobType::Failed, super::source::OP);
            info.notes = dom.lock().job.as_ref().map(|j| j.notes.clone()).unwrap_or_default();
            // The job is over: the status file no longer says "outgoing, in post-copy"
            // (a failed post-copy stays recorded by `source_failed` for a resume, §5d).
            vmm::mark(&d, &dom, false, None);
            match end.as_deref() {
                Ok("completed") => {
                    info.job_type = JobType::Completed;
                    dom.end_job(info);
                    if let Err(e) = d.quit_domain(&dom, "migrated") {
                        tracing::error!("{}: quitting the source: {e}", dom.name);
                    }
                }
                Ok(s) => {
                    source_failed(&d, &dom);
                    info.errmsg = Some(format!(
                        "post-copy failed after the switch ({s}); the source stays paused and is never resumed"
                    ));
                    dom.end_job(info);
                }
                Err(e) => {
                    info.errmsg = Some(e.to_string());
                    dom.end_job(info);
                }
            }
        });
    match r {
        Ok(_) => true,
        Err(e) => {
            tracing::error!("{name}: spawning the post-copy watcher: {e}");
            false
        }
    }
}
