//! Resuming a failed post-copy migration, the destination side (docs/management.md §5d):
//! `prepare_resume` (libvirt's `qemuMigrationDstPrepareResume`: `migrate-recover` on the
//! `postcopy-paused` VMM, the listening URI in the reply) and `finish_resume` (the VMM is
//! `postcopy-active` again: the job is watched to its end as after a switch). The VMM is never
//! killed: a failed or abandoned attempt ends the resume job and leaves the domain `post-copy
//! failed`, ready for another attempt.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use virt::{Error, JobInfo, JobType, MigrateOptions, MigrationCookie, Result};

use super::dest::OP;
use super::stats::from_query_migrate;
use crate::daemon::Daemon;
use crate::domain::{Domain, JobKind, Vmm};
use crate::vmm;

/// How long Finish waits for the VMM to be recovered (the source saw `postcopy-active`, so
/// this side is, or is about to be).
const RECOVERED_WAIT: Duration = Duration::from_secs(30);

fn status_of(q: &Value) -> String {
    q.get("status")
        .and_then(Value::as_str)
        .unwrap_or("none")
        .to_string()
}

/// libvirt's `qemuMigrationAnyCanResume` for the destination: this domain is the destination
/// of a failed post-copy, no job runs, and its VMM is `postcopy-paused`.
fn check(dom: &Domain, vmm: &Vmm) -> Result<()> {
    let name = &dom.name;
    let (role, job, state, reason) = {
        let g = dom.lock();
        let job = g.job.as_ref().map(|j| (j.resume, j.phase));
        (g.postcopy_failed, job, g.state, g.reason.clone())
    };
    if let Some((resume, phase)) = job {
        return Err(Error::OperationInvalid(if resume {
            format!(
                "resuming failed post-copy migration of domain '{name}' already in progress \
                 on the destination (phase {phase})"
            )
        } else {
            format!(
                "post-copy migration of domain '{name}' has not failed on the destination \
                 (a job runs there, phase {phase})"
            )
        }));
    }
    if role != Some(JobKind::MigrationIn) {
        return Err(Error::OperationInvalid(format!(
            "domain '{name}' is not the destination of a failed post-copy migration here (it \
             is {} ({reason})): nothing to resume",
            state.as_str()
        )));
    }
    let q = vmm.qmp("query-migrate", json!({}))?;
    match status_of(&q).as_str() {
        "postcopy-paused" => Ok(()),
        "postcopy-recover" => Err(Error::OperationInvalid(format!(
            "resuming failed post-copy migration of domain '{name}' already in progress \
             (its VMM is postcopy-recover)"
        ))),
        s => Err(Error::OperationInvalid(format!(
            "the destination VMM of '{name}' is '{s}', not postcopy-paused: it cannot take a \
             recovery channel"
        ))),
    }
}

/// `MigratePrepareResume`: the VMM listens for the source's recovery channel.
pub fn prepare(
    d: &Arc<Daemon>,
    name: &str,
    cookie: &MigrationCookie,
    opts: &MigrateOptions,
    local_ip: Option<IpAddr>,
) -> Result<MigrationCookie> {
    opts.check_supported()?;
    let dom = d.lookup(name)?;
    let driver = dom.lock().def.driver();
    if cookie.driver != driver.name() {
        return Err(Error::Unsupported(format!(
            "migration across drivers is refused: the source runs '{name}' under the '{}' \
             driver, this host under '{}'",
            cookie.driver,
            driver.name()
        )));
    }
    let vmm = dom.vmm().map_err(|_| {
        Error::OperationInvalid(format!(
            "domain '{name}' is not running here: nothing to resume (its VMM, which held the \
             guest's newest pages, is gone)"
        ))
    })?;
    check(&dom, &vmm)?;
    dom.begin_job(JobKind::MigrationIn)?;
    if let Some(j) = dom.lock().job.as_mut() {
        j.postcopy = true;
        j.postcopy_switched = true;
        j.resume = true;
        j.persistent = opts.persistent;
        j.phase = "prepare_resume";
    }
    // A restarted daemon keeps the VMM (post-copy) and watches it or shows it failed.
    vmm::mark(d, &dom, true, None);
    vmm::mark_postcopy(d, &dom);
    match listen(&dom, &vmm, local_ip) {
        Ok(uri) => {
            tracing::info!("{name}: prepare_resume: the VMM listens at {uri}");
            guard(d, &dom);
            Ok(MigrationCookie {
                host: d.hostname.clone(),
                driver: driver.name().to_string(),
                capabilities: Vec::new(),
                uri: Some(uri),
                autostart: false,
            })
        }
        Err(e) => {
            give_up(d, &dom, e.to_string());
            Err(e)
        }
    }
}

/// `migrate-recover tcp:LOCAL_IP:PORT` at the address the source's connection arrived on,
/// with a port this daemon found free (libvirt's port allocator): after `migrate-recover` a
/// VMM's `socket-address` may still list the first channel's address beside the new one
/// (QEMU keeps a list), so the port is not read back from it.
fn listen(dom: &Domain, vmm: &Vmm, local_ip: Option<IpAddr>) -> Result<String> {
    let ip = local_ip.unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let port = std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| {
            Error::OperationFailed(format!(
                "no free port for the recovery channel on {ip}: {e}"
            ))
        })?;
    let host = match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let uri = format!("tcp:{host}:{port}");
    // From here a MIGRATION status is this attempt's: the old `postcopy-paused` is gone.
    dom.lock().mig_status = None;
    vmm.qmp("migrate-recover", json!({ "uri": uri }))
        .map_err(|e| {
            Error::OperationFailed(format!("the destination VMM refused migrate-recover: {e}"))
        })?;
    Ok(uri)
}

/// Ends the resume job as a failure; the domain stays (or is again) `post-copy failed` and
/// its VMM is kept, `postcopy-paused`, for another attempt.
fn give_up(d: &Daemon, dom: &Domain, why: String) {
    if dom.lock().vmm.is_some() {
        vmm::mark(d, dom, false, None);
        super::postcopy::destination_failed(d, dom);
    }
    let q = dom
        .lock()
        .vmm
        .clone()
        .and_then(|v| v.qmp("query-migrate", json!({})).ok());
    let mut info = match &q {
        Some(q) => from_query_migrate(q, JobType::Failed, OP),
        None => JobInfo {
            job_type: JobType::Failed,
            operation: Some(OP.into()),
            ..Default::default()
        },
    };
    info.errmsg = Some(format!(
        "post-copy resume failed: {why}; the VMM is kept (post-copy failed, resumable again)"
    ));
    dom.end_job(info);
    // Logged once the job ended: whoever reads this line finds the failure in `domjobinfo
    // --completed` (a test waits for it).
    tracing::warn!("{}: post-copy resume given up here: {why}", dom.name);
}

/// Moves a resume job from phase `from` to `to`; false when it is not there (another path
/// took it).
fn take_phase(dom: &Domain, from: &str, to: &'static str) -> bool {
    let mut g = dom.lock();
    match g.job.as_mut() {
        Some(j) if j.resume && j.phase == from => {
            j.phase = to;
            true
        }
        _ => false,
    }
}

/// The recovery is under way or done: the rest is a post-copy job's (phase `postcopy`,
/// watched by `mig-in-pc-NAME` to `running (migrated)` or `post-copy failed`).
fn hand_to_watcher(d: &Arc<Daemon>, dom: &Arc<Domain>, vmm: &Arc<Vmm>, persistent: bool) {
    if let Some(j) = dom.lock().job.as_mut() {
        j.phase = "postcopy";
    }
    if persistent {
        let xml = virt::conf::format_domain(&dom.lock().def, None);
        if let Err(e) = d.define(&xml) {
            tracing::error!("{}: --persistent: {e}", dom.name);
        }
    }
    super::postcopy::watch_incoming(d, dom, vmm);
}

/// Finish of a resume job (`MigrateFinish` while the job is a resume). `cancelled`: the
/// source's attempt failed: the job ends, the VMM is kept. Otherwise the VMM must be
/// recovered (`postcopy-active`, `completed`, or still `postcopy-recover`). Repeats succeed.
pub fn finish(d: &Arc<Daemon>, dom: &Arc<Domain>, cancelled: bool) -> Result<()> {
    if !take_phase(dom, "prepare_resume", "finish_resume") {
        return if cancelled {
            Err(Error::OperationInvalid(format!(
                "the post-copy resume of '{}' is past Prepare here: the VMM decides",
                dom.name
            )))
        } else {
            Ok(())
        };
    }
    if cancelled {
        give_up(d, dom, "the source's recovery attempt failed".into());
        return Ok(());
    }
    let persistent = dom.lock().job.as_ref().is_some_and(|j| j.persistent);
    let Some(vmm) = dom.lock().vmm.clone() else {
        give_up(d, dom, "the destination VMM exited".into());
        return Err(Error::OperationFailed(
            "the destination VMM exited during the post-copy resume".into(),
        ));
    };
    dom.wait_until(RECOVERED_WAIT, |g| {
        g.vmm.is_none()
            || g.mig_status.as_deref().is_some_and(|s| {
                matches!(s, "postcopy-active" | "completed") || super::postcopy::over(s)
            })
    });
    let q = vmm.qmp("query-migrate", json!({}))?;
    let status = status_of(&q);
    if matches!(
        status.as_str(),
        "postcopy-active" | "completed" | "postcopy-recover"
    ) {
        hand_to_watcher(d, dom, &vmm, persistent);
        return Ok(());
    }
    let why = format!(
        "the destination VMM is '{status}' ({})",
        q.get("error-desc")
            .and_then(Value::as_str)
            .unwrap_or("no error description")
    );
    give_up(d, dom, why.clone());
    Err(Error::OperationFailed(format!("post-copy resume: {why}")))
}

/// A prepared resume whose Finish never comes (the source daemon vanished): after the
/// Prepare timeout the job is handed to the watcher if the VMM recovered meanwhile, and
/// given up (the VMM kept, `post-copy failed`) if not.
fn guard(d: &Arc<Daemon>, dom: &Arc<Domain>) {
    let name = dom.name.clone();
    let (d, dom) = (d.clone(), dom.clone());
    let timeout = d.cfg.prepare_timeout;
    let started = dom.lock().job.as_ref().map(|j| j.started);
    let r = std::thread::Builder::new()
        .name(format!("mig-in-rsm-{name}"))
        .spawn(move || {
            let waiting = |g: &crate::domain::DomainInner| {
                g.job
                    .as_ref()
                    .is_some_and(|j| Some(j.started) == started && j.phase == "prepare_resume")
            };
            if !dom.wait_until(timeout, |g| !waiting(g)) {
                if !take_phase(&dom, "prepare_resume", "finish_resume") {
                    return;
                }
                let vmm = dom.lock().vmm.clone();
                let status = vmm
                    .as_ref()
                    .and_then(|v| v.qmp("query-migrate", json!({})).ok())
                    .map(|q| status_of(&q))
                    .unwrap_or_default();
                match vmm {
                    Some(v)
                        if matches!(
                            status.as_str(),
                            "postcopy-active" | "completed" | "postcopy-recover"
                        ) =>
                    {
                        tracing::warn!(
                            "{}: no Finish within {timeout:?} of the resume, but the VMM \
                             recovered ({status}): watched",
                            dom.name
                        );
                        let persistent = dom.lock().job.as_ref().is_some_and(|j| j.persistent);
                        hand_to_watcher(&d, &dom, &v, persistent);
                    }
                    _ => give_up(
                        &d,
                        &dom,
                        format!("no Finish from the source within {timeout:?} of Prepare"),
                    ),
                }
            }
        });
    if let Err(e) = r {
        tracing::error!("{name}: spawning the resume guard: {e}");
    }
}
