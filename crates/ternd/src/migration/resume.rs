//! Resuming a post-copy migration that failed after the switch (`--postcopy-resume`,
//! libvirt's `VIR_MIGRATE_POSTCOPY_RESUME`; docs/management.md §5d): the source side, and the
//! state changes both sides share.
//!
//! Phases (libvirt's names): `begin_resume` (this daemon: the domain must be the source of a
//! failed post-copy whose VMM is `postcopy-paused`), `prepare_resume` (the destination daemon:
//! `migrate-recover` on its VMM, a new listening URI), `perform_resume` (`migrate {uri,
//! resume: true}` here, watched until the VMM is `postcopy-active` again or paused again),
//! `finish_resume` / `confirm_resume` (as after a switch: the destination's job is watched to
//! its end, this VMM is quit on `completed`). No step ever resumes this source or kills the
//! destination: a failed attempt leaves both sides `post-copy failed`, ready for another.

use std::sync::Arc;

use serde_json::{json, Value};
use virt::protocol::{Call, Reply};
use virt::{
    Connection, DomainEvent, DomainState, Error, JobInfo, JobType, LifecycleEvent, MigrateOptions,
    MigrationCookie, Result,
};

use super::source::{finish_cancelled_on, note, sample, Ctx, OP, PEER_CALL_TIMEOUT, SAMPLE_PERIOD};
use super::stats::from_query_migrate;
use crate::daemon::Daemon;
use crate::domain::{Domain, JobKind, Vmm};
use crate::vmm;

/// The source VMM's statuses that end one recovery attempt: recovered (`postcopy-active`,
/// `completed`) or not (paused again, or ended for good).
fn attempt_over(status: &str) -> bool {
    matches!(
        status,
        "postcopy-active" | "completed" | "failed" | "cancelled" | "postcopy-paused"
    )
}

/// A VMM reported a recovery status (`postcopy-recover-setup`, `postcopy-recover`,
/// `postcopy-active`). In a resume job: libvirt's `qemuProcessHandleMigrationStatus` turns
/// `post-copy failed` back into `post-copy`: the source `paused (post-copy)` with `Suspended
/// Post-copy`, a running destination `running (post-copy)` with `Resumed Post-copy`. Without
/// a job, on a side of a failed post-copy: see [`take_up`].
pub fn recovering(d: &Arc<Daemon>, dom: &Arc<Domain>, vmm: &Arc<Vmm>, status: &str) {
    let (job, role, state, reason) = {
        let g = dom.lock();
        (
            g.job.as_ref().map(|j| j.resume),
            g.postcopy_failed,
            g.state,
            g.reason.clone(),
        )
    };
    match job {
        None => return take_up(d, dom, vmm, role, state, status),
        Some(true) if reason == "post-copy failed" => {}
        Some(_) => return,
    }
    if state == DomainState::Running {
        dom.set_state(DomainState::Running, "post-copy");
        d.events
            .lifecycle(&dom.name, LifecycleEvent::Resumed, "Post-copy");
    } else {
        dom.set_state(DomainState::Paused, "post-copy");
        d.events
            .lifecycle(&dom.name, LifecycleEvent::Suspended, "Post-copy");
    }
    tracing::info!("{}: post-copy recovery under way", dom.name);
}

/// A side of a failed post-copy recovers while no job of this daemon drives it (the daemon
/// restarted in the middle of a resume, its resume job was given up, or an operator resumed
/// the VMMs by hand): the recovery is taken up as after a daemon restart in post-copy (§5c):
/// the destination's job watched to its end, the source's Confirm (quit on `completed`,
/// never resumed).
fn take_up(
    d: &Arc<Daemon>,
    dom: &Arc<Domain>,
    vmm: &Arc<Vmm>,
    role: Option<JobKind>,
    state: DomainState,
    status: &str,
) {
    match role {
        Some(JobKind::MigrationIn) => {
            tracing::warn!(
                "{}: the failed post-copy recovers ({status}) without a resume job here: \
                 taken up and watched",
                dom.name
            );
            let running = state == DomainState::Running;
            super::postcopy::resume_incoming_watch(d, dom, vmm, running);
            if running {
                d.events
                    .lifecycle(&dom.name, LifecycleEvent::Resumed, "Post-copy");
            }
        }
        Some(JobKind::MigrationOut) => {
            tracing::warn!(
                "{}: the failed post-copy recovers ({status}) without a resume job here: \
                 taken up (Confirm: quit on completed, never resumed)",
                dom.name
            );
            super::postcopy::recover_source(d, dom, vmm, None, status);
            if let Some(j) = dom.lock().job.as_mut() {
                j.notes = vec![format!(
                    "post-copy recovery ({status}) taken up without a resume job here (daemon \
                     restarted mid-resume, or resumed by hand): the source is never resumed"
                )];
            }
            if state == DomainState::Paused {
                d.events
                    .lifecycle(&dom.name, LifecycleEvent::Suspended, "Post-copy");
            }
        }
        None => {}
    }
}

/// A new migration of a domain whose post-copy failed would ship a stale guest (the source)
/// or an incomplete one (the destination): refused, naming the resume.
pub fn refuse_new_migration(dom: &Domain) -> Result<()> {
    let name = &dom.name;
    match dom.lock().postcopy_failed {
        Some(JobKind::MigrationOut) => Err(Error::OperationInvalid(format!(
            "domain '{name}' is the source of a post-copy migration that failed after the \
             switch: its memory is stale. Resume that migration (`migrate {name} DESTURI --live \
             --p2p --postcopy --postcopy-resume`) instead of starting a new one"
        ))),
        Some(JobKind::MigrationIn) => Err(Error::OperationInvalid(format!(
            "domain '{name}' is the destination of a post-copy migration that failed after the \
             switch and still lacks pages: resume it from its source (--postcopy-resume) \
             before migrating it again"
        ))),
        None => Ok(()),
    }
}

fn status_of(q: &Value) -> String {
    q.get("status")
        .and_then(Value::as_str)
        .unwrap_or("none")
        .to_string()
}

fn desc_of(q: &Value) -> String {
    q.get("error-desc")
        .and_then(Value::as_str)
        .unwrap_or("no error description")
        .to_string()
}

/// libvirt's `qemuMigrationAnyCanResume` for the source: the domain is the source of a
/// post-copy migration that failed, no job runs, and its VMM is `postcopy-paused`.
fn check_source(dom: &Domain, vmm: &Vmm) -> Result<()> {
    let name = &dom.name;
    let (role, job, state, reason) = {
        let g = dom.lock();
        let job = g
            .job
            .as_ref()
            .map(|j| (j.kind, j.postcopy_switched, j.resume, j.phase));
        (g.postcopy_failed, job, g.state, g.reason.clone())
    };
    if let Some((kind, switched, resume, phase)) = job {
        return Err(Error::OperationInvalid(if resume {
            format!(
                "resuming failed post-copy migration of domain '{name}' already in progress \
                 (phase {phase})"
            )
        } else if kind == JobKind::MigrationOut && switched {
            format!(
                "post-copy migration of domain '{name}' has not failed (phase {phase}): \
                 --postcopy-resume resumes a post-copy migration whose VMMs are postcopy-paused"
            )
        } else {
            format!("another migration job is already running for domain '{name}' (phase {phase})")
        }));
    }
    match role {
        Some(JobKind::MigrationOut) => {}
        Some(JobKind::MigrationIn) => {
            return Err(Error::OperationInvalid(format!(
                "domain '{name}' is the destination of the failed post-copy migration: run \
                 `migrate --postcopy --postcopy-resume` on its source's daemon"
            )))
        }
        None => {
            return Err(Error::OperationInvalid(format!(
                "migration of domain '{name}' is not in post-copy phase (it is {} ({reason})): \
                 --postcopy-resume only resumes a post-copy migration that failed after the switch",
                state.as_str()
            )))
        }
    }
    let q = vmm.qmp("query-migrate", json!({}))?;
    match status_of(&q).as_str() {
        "postcopy-paused" => Ok(()),
        "postcopy-recover-setup" | "postcopy-recover" => Err(Error::OperationInvalid(format!(
            "resuming failed post-copy migration of domain '{name}' already in progress"
        ))),
        "postcopy-active" => Err(Error::OperationInvalid(format!(
            "post-copy migration of domain '{name}' has not failed (its VMM is postcopy-active)"
        ))),
        s => Err(Error::OperationInvalid(format!(
            "the source VMM ended the post-copy migration of '{name}' '{s}' ({}): only a paused \
             one (postcopy-paused) can be resumed; the source stays paused and is never resumed",
            desc_of(&q)
        ))),
    }
}

/// `ternctl migrate ... --postcopy --postcopy-resume` on the source daemon.
pub fn migrate(d: &Arc<Daemon>, key: &str, dest_uri: &str, opts: &MigrateOptions) -> Result<()> {
    opts.check_supported()?;
    let dom = d.lookup(key)?;
    let vmm = dom.vmm()?;
    // Everything is checked before anything changes: a refusal leaves the domain as it was.
    check_source(&dom, &vmm)?;
    dom.begin_job(JobKind::MigrationOut)?;
    if let Some(j) = dom.lock().job.as_mut() {
        j.postcopy = true;
        j.postcopy_switched = true;
        j.resume = true;
        j.phase = "begin_resume";
    }
    // A restarted daemon takes a resume up as an outgoing post-copy: never cancelled, never
    // resumed (§5c), its destination asked to Finish again.
    vmm::mark(d, &dom, false, Some(dest_uri));
    vmm::mark_postcopy(d, &dom);
    let mut ctx = Ctx::new();
    let r = run(d, &dom, &vmm, dest_uri, opts, &mut ctx);
    if dom.lock().vmm.is_some() {
        vmm::mark(d, &dom, false, None);
        if r.is_err() {
            // Back to where it was: paused (post-copy failed), resumable again.
            super::postcopy::source_failed(d, &dom);
        }
    }
    let job_type = if r.is_ok() {
        JobType::Completed
    } else {
        JobType::Failed
    };
    let mut info = match &ctx.last {
        Some(q) => from_query_migrate(q, job_type, OP),
        None => JobInfo {
            job_type,
            operation: Some(OP.into()),
            ..Default::default()
        },
    };
    info.errmsg = r.as_ref().err().map(|e| e.to_string());
    info.notes = ctx.notes;
    info.samples = ctx.samples;
    dom.end_job(info.clone());
    d.events.emit(DomainEvent::JobCompleted {
        domain: dom.name.clone(),
        info: Box::new(info),
    });
    if opts.undefine_source && r.is_ok() && dom.lock().persistent {
        d.undefine(&dom.name)?;
    }
    r
}

fn run(
    d: &Arc<Daemon>,
    dom: &Arc<Domain>,
    vmm: &Arc<Vmm>,
    dest_uri: &str,
    opts: &MigrateOptions,
    ctx: &mut Ctx,
) -> Result<()> {
    note(
        dom,
        ctx,
        "post-copy resume: the source VMM is postcopy-paused; the destination's VMM is asked \
         for a recovery listener (migrate-recover), then this one reconnects (migrate resume)"
            .into(),
    );
    if opts.bandwidth_mib_s.is_some() {
        note(
            dom,
            ctx,
            "--bandwidth: not applied (pre-copy is over; --postcopy-bandwidth sets the push)"
                .into(),
        );
    }
    let cookie = MigrationCookie {
        host: d.hostname.clone(),
        driver: dom.lock().def.driver().name().to_string(),
        capabilities: Vec::new(),
        uri: None,
        autostart: false,
    };
    dom.set_phase("prepare_resume");
    let unchanged = "nothing changed: the source stays paused (post-copy failed) and the \
                     destination keeps the guest; retry the resume once the cause is fixed";
    let mut peer = Connection::open(dest_uri).map_err(|e| {
        Error::OperationFailed(format!(
            "cannot reach the destination daemon: {e}; {unchanged}"
        ))
    })?;
    peer.set_timeout(Some(PEER_CALL_TIMEOUT))?;
    let dc = match peer.call(Call::MigratePrepareResume {
        domain: dom.name.clone(),
        cookie,
        options: opts.clone(),
    }) {
        Ok(Reply::Cookie(c)) => c,
        Ok(other) => return Err(Error::Internal(format!("Prepare answered {other:?}"))),
        Err(Error::Rpc { message, .. }) => {
            return Err(Error::OperationFailed(format!(
                "the destination daemon failed during Prepare (resume): {message}; {unchanged}"
            )))
        }
        Err(e) => {
            return Err(Error::OperationFailed(format!(
                "the destination refused the resume: {e}; {unchanged}"
            )))
        }
    };
    let uri = dc
        .uri
        .ok_or_else(|| Error::Internal("the destination's resume cookie has no URI".into()))?;
    note(
        dom,
        ctx,
        format!("prepare_resume: the destination's VMM listens at {uri} (migrate-recover)"),
    );
    crate::fault::point("prepare-resume-done");
    dom.set_phase("perform_resume");
    let perform = (|| -> Result<()> {
        if let Some(mib_s) = opts.postcopy_bandwidth {
            let bytes = mib_s.saturating_mul(1 << 20);
            vmm.qmp(
                "migrate-set-parameters",
                json!({ "max-postcopy-bandwidth": bytes }),
            )?;
        }
        // From here a MIGRATION status is this attempt's: the old `postcopy-paused` is gone.
        dom.lock().mig_status = None;
        vmm.qmp("migrate", json!({ "uri": uri, "resume": true }))
            .map_err(|e| {
                Error::OperationFailed(format!(
                    "the source VMM refused migrate resume: {e}; {unchanged}"
                ))
            })?;
        Ok(())
    })();
    if let Err(e) = perform {
        finish_cancelled_on(dest_uri, &mut peer, &dom.name);
        return Err(e);
    }
    let status = match wait_recovered(dom, vmm, ctx) {
        Ok(s) => s,
        Err(e) => {
            finish_cancelled_on(dest_uri, &mut peer, &dom.name);
            return Err(e);
        }
    };
    if status == "postcopy-active" || status == "completed" {
        note(
            dom,
            ctx,
            format!(
                "post-copy resumed (the source VMM reported {status}): the destination runs the \
                 guest and receives the pages it lacks"
            ),
        );
        return super::postcopy::finish_and_confirm_phases(
            d,
            dom,
            vmm,
            dest_uri,
            &mut peer,
            ctx,
            ("finish_resume", "confirm_resume"),
        );
    }
    // The attempt failed: the destination's resume job ends (its VMM is never killed).
    finish_cancelled_on(dest_uri, &mut peer, &dom.name);
    let desc = ctx.last.as_ref().map(desc_of).unwrap_or_default();
    Err(Error::OperationFailed(format!(
        "post-copy resume failed: the source VMM is '{status}' again ({desc}); the source stays \
         paused (post-copy failed) and the destination keeps the guest with the pages it has; {}",
        super::postcopy::resume_hint(&status)
    )))
}

/// Waits (no limit: the VMMs' own connect and liveness limits end an attempt) until the
/// source VMM's recovery attempt is over. Decided on the `MIGRATION` events that came after
/// the `migrate resume` command; `query-migrate` may still say the old `postcopy-paused` for a
/// moment after it, so that status alone decides nothing.
fn wait_recovered(dom: &Domain, vmm: &Vmm, ctx: &mut Ctx) -> Result<String> {
    loop {
        let seen = dom.wait_until(SAMPLE_PERIOD, |g| {
            g.vmm.is_none() || g.mig_status.as_deref().is_some_and(attempt_over)
        });
        if dom.lock().vmm.is_none() {
            return Err(Error::OperationFailed(
                "the source VMM exited during the post-copy resume".into(),
            ));
        }
        let q = vmm.qmp("query-migrate", json!({}))?;
        let status = status_of(&q);
        ctx.samples.push(sample(&q, ctx.started));
        ctx.last = Some(q);
        if seen {
            let ev = dom.lock().mig_status.clone().unwrap_or_default();
            return Ok(if attempt_over(&status) { status } else { ev });
        }
        if attempt_over(&status) && status != "postcopy-paused" {
            return Ok(status);
        }
    }
}
