//! The destination side: Prepare (start the VMM paused, waiting for the stream) and Finish
//! (resume it, or kill it).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use virt::conf::parse_domain;
use virt::{
    DomainState, Error, JobInfo, JobType, LaunchMode, MigrateOptions, MigrationCookie, Result,
};

use super::stats::from_query_migrate;
use super::tls;
use super::COOKIE_CAPABILITIES;
use crate::daemon::Daemon;
use crate::domain::{Domain, JobKind};
use crate::runtime;
use crate::vmm;

/// How long Finish waits for the destination VMM to report `completed` (it normally has
/// already: the source's status follows the destination's answer on the return path).
const COMPLETE_WAIT: Duration = Duration::from_secs(30);

pub(super) const OP: &str = "Incoming migration";

pub fn prepare(
    d: &Arc<Daemon>,
    xml: &str,
    cookie: &MigrationCookie,
    opts: &MigrateOptions,
    local_ip: Option<IpAddr>,
) -> Result<MigrationCookie> {
    opts.check_supported()?;
    if opts.tls {
        tls::check_dir(
            d.cfg.migrate_tls_dir.as_deref(),
            tls::Endpoint::Server,
            &d.hostname,
        )?;
    }
    let def = parse_domain(xml)?;
    let kind = def.driver();
    if cookie.driver != kind.name() {
        return Err(Error::Unsupported(format!(
            "migration across drivers is refused: the domain runs under the '{}' driver on the source, its definition selects '{}' here",
            cookie.driver,
            kind.name()
        )));
    }
    if let Ok(existing) = d.lookup(&def.name) {
        let g = existing.lock();
        if g.state.is_active() {
            return Err(Error::OperationInvalid(format!(
                "domain '{}' is already active on {}",
                def.name, d.hostname
            )));
        }
        if g.def.driver() != kind {
            return Err(Error::Unsupported(format!(
                "migration across drivers is refused: '{}' is defined here for the '{}' driver, the source runs it under '{}'",
                def.name,
                g.def.driver().name(),
                kind.name()
            )));
        }
    }
    d.driver(kind)?.check(&def)?;
    let dom = d.adopt(def, false)?;
    dom.begin_job(JobKind::MigrationIn)?;
    if let Some(j) = dom.lock().job.as_mut() {
        j.phase = "prepare";
        j.suspend = opts.suspend;
        j.persistent = opts.persistent;
        j.postcopy = opts.postcopy;
    }
    match prepare_vmm(d, &dom, cookie, opts, local_ip) {
        Ok(c) => {
            guard(d, &dom);
            Ok(c)
        }
        Err(e) => {
            if dom.lock().vmm.is_some() {
                let _ = d.destroy_domain(&dom, "failed");
            } else if !dom.lock().persistent {
                d.forget(&dom);
            }
            end(&dom, JobType::Failed, None, Some(e.to_string()));
            Err(e)
        }
    }
}

fn prepare_vmm(
    d: &Arc<Daemon>,
    dom: &Arc<Domain>,
    cookie: &MigrationCookie,
    opts: &MigrateOptions,
    local_ip: Option<IpAddr>,
) -> Result<MigrationCookie> {
    let vmm = vmm::launch(d, dom, LaunchMode::Incoming)?;
    crate::fault::point("prepare");
    dom.set_state(DomainState::Paused, "incoming migration");
    let caps = vmm
        .monitor
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .supported_capabilities(COOKIE_CAPABILITIES)
        .map_err(|e| Error::Monitor(e.to_string()))?
        .into_iter()
        .filter(|c| !d.cfg.hide_capabilities.contains(c))
        .collect::<Vec<_>>();
    let both = |c: &str| cookie.supports(c) && caps.iter().any(|x| x == c);
    // A tunnelled stream has no return path (libvirt's rule), hence no switchover-ack.
    let rp = !opts.tunnelled && both("return-path");
    let sack = rp && both("switchover-ack");
    let mut caps = caps;
    if opts.postcopy {
        let driver = dom.lock().def.driver();
        super::postcopy::check_destination(
            &vmm,
            driver.name(),
            cookie.supports("postcopy-ram"),
            rp,
        )?;
        caps.push("postcopy-ram".into());
    }
    vmm.monitor
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .set_capabilities(&[
            ("events", true),
            ("return-path", rp),
            ("switchover-ack", sack),
            ("postcopy-ram", opts.postcopy),
            ("multifd", opts.parallel),
        ])
        .map_err(|e| Error::Monitor(e.to_string()))?;
    if let Some(n) = opts.multifd_channels() {
        vmm.qmp("migrate-set-parameters", json!({ "multifd-channels": n }))?;
        // The source's method (Perform sets it there): both sides must name the same one.
        let method = opts.multifd_compression()?.map_or("none", |(m, _)| m);
        vmm.qmp(
            "migrate-set-parameters",
            json!({ "multifd-compression": method }),
        )?;
    }
    if opts.tls {
        let dir = tls::check_dir(
            d.cfg.migrate_tls_dir.as_deref(),
            tls::Endpoint::Server,
            &d.hostname,
        )?;
        tls::enable(&vmm, dir, tls::Endpoint::Server, None)?;
    }
    // With the return path, a VMM whose protocol makes the destination the decider runs the
    // guest as soon as it has it (`cont` during `inmigrate` = autostart, as QEMU): no Finish
    // round trip inside the guest's downtime. A guest that travels paused stays paused.
    let autostart = rp && !opts.suspend && d.driver(dom.lock().def.driver())?.destination_decides();
    if autostart {
        vmm.qmp("cont", json!({}))?;
    }
    if opts.tunnelled {
        let path = runtime::vmm_dir(&d.cfg.run_dir, &dom.name).join("tunnel.sock");
        let _ = std::fs::remove_file(&path);
        vmm.qmp(
            "migrate-incoming",
            json!({ "uri": format!("unix:{}", path.display()) }),
        )?;
        if let Some(j) = dom.lock().job.as_mut() {
            j.tunnel = Some(path);
        }
        dom.set_phase("prepared");
        return Ok(MigrationCookie {
            host: d.hostname.clone(),
            driver: dom.lock().def.driver().name().to_string(),
            capabilities: caps,
            uri: Some(virt::TUNNEL_URI.to_string()),
            autostart,
        });
    }
    let ip = local_ip.unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let host = match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let mut incoming = json!({ "uri": format!("tcp:{host}:0") });
    if opts.postcopy {
        // A failure after the switch must not end the process: it holds the guest's newest
        // state (QEMU 9.1+ and Tern take `exit-on-error`; libvirt passes false too).
        incoming["exit-on-error"] = json!(false);
    }
    vmm.qmp("migrate-incoming", incoming)?;
    let q = vmm.qmp("query-migrate", json!({}))?;
    let port = incoming_port(&q).ok_or_else(|| {
        Error::Monitor(format!("the incoming VMM reports no listening port: {q}"))
    })?;
    dom.set_phase("prepared");
    Ok(MigrationCookie {
        host: d.hostname.clone(),
        driver: dom.lock().def.driver().name().to_string(),
        capabilities: caps,
        uri: Some(format!("tcp:{host}:{port}")),
        autostart,
    })
}

/// `MigrateTunnel`: the prepared incoming VMM's stream socket, connected, for the peer
/// daemon's tunnel to feed. Only one tunnel per Prepare; only for a tunnelled Prepare.
pub fn open_tunnel(d: &Arc<Daemon>, name: &str) -> Result<std::os::unix::net::UnixStream> {
    let dom = d.lookup(name)?;
    let path = {
        let mut g = dom.lock();
        let job = g.job.as_mut().filter(|j| j.kind == JobKind::MigrationIn);
        match job {
            Some(j) if j.phase == "prepared" => j.tunnel.take().ok_or_else(|| {
                Error::OperationInvalid(format!(
                    "domain '{name}': the incoming migration is not tunnelled, or its tunnel is already open"
                ))
            })?,
            _ => {
                return Err(Error::OperationInvalid(format!(
                    "domain '{name}' has no prepared incoming migration"
                )))
            }
        }
    };
    std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        Error::OperationFailed(format!(
            "connecting the tunnel to the incoming VMM ({}): {e}",
            path.display()
        ))
    })
}

/// Gives up on a prepared incoming migration whose stream never starts (its source daemon
/// vanished after Prepare): after `prepare_timeout` with no `MIGRATION` status from the VMM
/// and the job still waiting, the VMM is killed. Once the stream runs, the VMM's own liveness
/// limits apply; once it completed, only a Finish decides (the source may have resumed, or
/// may be about to call Finish).
fn guard(d: &Arc<Daemon>, dom: &Arc<Domain>) {
    let name = dom.name.clone();
    let (d, dom) = (d.clone(), dom.clone());
    let timeout = d.cfg.prepare_timeout;
    let started = dom.lock().job.as_ref().map(|j| j.started);
    let r = std::thread::Builder::new()
        .name(format!("mig-in-guard-{}", dom.name))
        .spawn(move || {
            let same_job = |g: &crate::domain::DomainInner| {
                g.job.as_ref().map(|j| j.started) == started && started.is_some()
            };
            let moved = dom.wait_until(timeout, |g| {
                !same_job(g) || g.mig_status.as_deref().is_some_and(|s| s != "setup")
            });
            if moved {
                return;
            }
            let waiting = {
                let g = dom.lock();
                same_job(&g) && g.job.as_ref().is_some_and(|j| j.phase == "prepared")
            };
            if !waiting {
                return;
            }
            tracing::warn!(
                "{}: no migration stream within {timeout:?} of Prepare: killing the incoming VMM",
                dom.name
            );
            if dom.lock().vmm.is_some() {
                let _ = d.destroy_domain(&dom, "failed");
            }
            end(
                &dom,
                JobType::Failed,
                None,
                Some(format!("no migration stream within {timeout:?} of Prepare")),
            );
        });
    if let Err(e) = r {
        tracing::error!("{name}: spawning the Prepare guard: {e}");
    }
}

/// The port of the first socket address of a destination's `query-migrate`.
fn incoming_port(q: &Value) -> Option<u16> {
    let a = q.get("socket-address")?.as_array()?.first()?;
    match a.get("port")? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        _ => None,
    }
}

fn end(dom: &Domain, t: JobType, q: Option<&Value>, err: Option<String>) {
    let mut info = match q {
        Some(q) => from_query_migrate(q, t, OP),
        None => JobInfo {
            job_type: t,
            operation: Some(OP.into()),
            ..Default::default()
        },
    };
    if err.is_some() {
        info.errmsg = err;
    }
    dom.end_job(info);
}

/// A Finish that finds no incoming job: a repeated one of a domain that runs here succeeds;
/// a cancel, or a domain that does not run, has nothing to finish.
fn finish_without_job(dom: &Domain, cancelled: bool) -> Result<()> {
    if !cancelled && dom.lock().state.is_active() {
        Ok(())
    } else {
        Err(Error::OperationInvalid(format!(
            "domain '{}' has no incoming migration",
            dom.name
        )))
    }
}

/// Finish: `cancelled` → kill the VMM; otherwise check the incoming migration completed,
/// resume (unless `--suspend`), make persistent if asked. Any failure kills the VMM and is
/// reported (the source then resumes). Idempotent: a repeated Finish of a finished domain
/// succeeds.
pub fn finish(d: &Arc<Daemon>, name: &str, cancelled: bool) -> Result<()> {
    let dom = d.lookup(name)?;
    let resume = dom
        .lock()
        .job
        .as_ref()
        .is_some_and(|j| j.kind == JobKind::MigrationIn && j.resume && j.phase != "postcopy");
    if resume {
        // Finish of a post-copy resume (§5d): never kills the VMM.
        return super::resume_dest::finish(d, &dom, cancelled);
    }
    let (incoming, suspend, persistent, postcopy, phase) = {
        let g = dom.lock();
        match &g.job {
            Some(j) if j.kind == JobKind::MigrationIn => {
                (true, j.suspend, j.persistent, j.postcopy, j.phase)
            }
            _ => (false, false, false, false, ""),
        }
    };
    if incoming && postcopy && phase == "postcopy" && !cancelled {
        // A repeated Finish: the guest already runs here in post-copy.
        return Ok(());
    }
    if !incoming {
        return finish_without_job(&dom, cancelled);
    }
    // Test and set under one lock: the event thread may have claimed a post-copy job that
    // failed before this Finish (phase `postcopy`, decision 208) or its watcher ended it.
    let taken = {
        let mut g = dom.lock();
        match g.job.as_mut() {
            Some(j) if j.phase == "postcopy" => true,
            Some(j) => {
                j.phase = "finish";
                false
            }
            None => {
                drop(g);
                // Ended since the first look (its watcher): as a Finish without a job.
                return finish_without_job(&dom, cancelled);
            }
        }
    };
    if taken && !cancelled {
        // As a repeated Finish: the watcher ends the job.
        return Ok(());
    }
    if cancelled && dom.postcopy_switched() {
        // The VMM holds pages the source no longer sends: killing it would lose the guest.
        return Err(Error::OperationInvalid(format!(
            "the incoming migration of '{name}' switched to post-copy: its VMM holds part of \
             the only copy of the guest; refusing to kill it"
        )));
    }
    if !cancelled && postcopy {
        return match super::postcopy::finish_incoming(d, &dom, persistent) {
            Ok(()) => Ok(()),
            Err(e) if dom.postcopy_switched() || dom.lock().vmm.is_none() => {
                // Never killed after the switch: the watcher ends the job when the VMM does.
                tracing::error!("{name}: Finish in post-copy: {e}");
                match dom.vmm() {
                    Ok(v) => super::postcopy::watch_incoming(d, &dom, &v),
                    Err(_) => end(&dom, JobType::Failed, None, Some(e.to_string())),
                }
                Err(e)
            }
            Err(e) => {
                let _ = d.destroy_domain(&dom, "failed");
                end(&dom, JobType::Failed, None, Some(e.to_string()));
                Err(e)
            }
        };
    }
    if cancelled {
        if let Some(vmm) = dom.lock().vmm.clone() {
            if is_running(&vmm) {
                // Only the source's own failure before the end of the stream cancels; a VMM
                // that runs decided after the stream: never kill it on a cancel.
                return Err(Error::OperationInvalid(format!(
                    "'{name}' runs here (its VMM decided after the stream); refusing to kill it"
                )));
            }
        }
        if dom.lock().vmm.is_some() {
            d.destroy_domain(&dom, "failed")?;
        }
        end(
            &dom,
            JobType::Cancelled,
            None,
            Some("cancelled by the source".into()),
        );
        return Ok(());
    }
    match finish_vmm(d, &dom, suspend, persistent) {
        Ok(q) => {
            end(&dom, JobType::Completed, Some(&q), None);
            Ok(())
        }
        Err(e) => {
            let vmm = dom.lock().vmm.clone();
            match vmm {
                Some(v) if is_running(&v) => {
                    // The VMM decided by itself and runs the guest: it is the domain; the
                    // source must not run it again, so Finish succeeds.
                    tracing::error!("{name}: Finish: {e}; the domain runs here: kept");
                    vmm::mark(d, &dom, false, None);
                    end(&dom, JobType::Completed, None, Some(e.to_string()));
                    return Ok(());
                }
                Some(_) => {
                    let _ = d.destroy_domain(&dom, "failed");
                }
                None => {}
            }
            end(&dom, JobType::Failed, None, Some(e.to_string()));
            Err(e)
        }
    }
}

pub(super) fn is_running(vmm: &crate::domain::Vmm) -> bool {
    vmm.qmp("query-status", json!({}))
        .ok()
        .and_then(|s| s.get("running").and_then(Value::as_bool))
        == Some(true)
}

fn finish_vmm(
    d: &Arc<Daemon>,
    dom: &Arc<Domain>,
    suspend: bool,
    persistent: bool,
) -> Result<Value> {
    let vmm = dom
        .vmm()
        .map_err(|_| Error::OperationFailed("the destination VMM exited before Finish".into()))?;
    dom.wait_until(COMPLETE_WAIT, |g| {
        g.vmm.is_none() || g.mig_status.as_deref().is_some_and(super::is_terminal)
    });
    let q = vmm.qmp("query-migrate", json!({}))?;
    let status = q.get("status").and_then(Value::as_str).unwrap_or("none");
    if status != "completed" {
        return Err(Error::OperationFailed(format!(
            "the incoming migration on the destination is '{status}': {}",
            q.get("error-desc").and_then(Value::as_str).unwrap_or("-")
        )));
    }
    // From here a restarted daemon keeps the VMM (it is about to run).
    crate::fault::point("finish-before-cont");
    vmm::mark(d, dom, false, None);
    if !suspend {
        if !is_running(&vmm) {
            vmm.qmp("cont", json!({}))?;
        }
        dom.wait_until(COMPLETE_WAIT, |g| g.state == DomainState::Running);
    } else {
        dom.set_state(DomainState::Paused, "migration");
    }
    if persistent {
        let xml = virt::conf::format_domain(&dom.lock().def, None);
        if let Err(e) = d.define(&xml) {
            // The domain runs; only its persistence failed.
            tracing::error!("{}: --persistent: {e}", dom.name);
        }
    }
    Ok(q)
}
