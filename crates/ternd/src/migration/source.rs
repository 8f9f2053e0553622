//! The source side: Begin, (Prepare on the peer), Perform, (Finish on the peer), Confirm.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use virt::protocol::{Call, Reply};
use virt::{
    Connection, DomainEvent, DomainState, Error, JobInfo, JobSample, JobType, MigrateOptions,
    MigrationCookie, Result,
};

use super::stats::from_query_migrate;
use super::tunnel::SourceTunnel;
use super::{is_terminal, tls, COOKIE_CAPABILITIES};
use crate::daemon::Daemon;
use crate::domain::{Domain, JobKind, Vmm};
use crate::vmm;

/// How long a call to the peer daemon may take (Prepare starts a VMM).
pub(super) const PEER_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often Perform checks the peer daemon is alive (libvirt's keepalive, 5 s x 5 there).
const KEEPALIVE: Duration = Duration::from_secs(1);
/// How long the peer may take to answer a keepalive.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) const OP: &str = "Outgoing migration";

/// How often Perform samples `query-migrate` for the report.
pub(super) const SAMPLE_PERIOD: Duration = Duration::from_millis(200);

/// What the job ends with.
pub(super) struct Ctx {
    pub(super) last: Option<Value>,
    pub(super) notes: Vec<String>,
    pub(super) samples: Vec<JobSample>,
    pub(super) started: Instant,
}

impl Ctx {
    /// A job's context, its clock started now.
    pub(super) fn new() -> Self {
        Ctx {
            last: None,
            notes: Vec::new(),
            samples: Vec::new(),
            started: Instant::now(),
        }
    }
}

/// `ternctl migrate`: the whole migration, driven by this (the source) daemon.
pub fn migrate(d: &Arc<Daemon>, key: &str, dest_uri: &str, opts: &MigrateOptions) -> Result<()> {
    if opts.postcopy_resume {
        return super::resume::migrate(d, key, dest_uri, opts);
    }
    opts.check_supported()?;
    let dom = d.lookup(key)?;
    super::resume::refuse_new_migration(&dom)?;
    if opts.offline {
        offline(&dom, dest_uri)?;
        if opts.undefine_source {
            d.undefine(&dom.name)?;
        }
        return Ok(());
    }
    let vmm = dom.vmm()?;
    dom.begin_job(JobKind::MigrationOut)?;
    vmm::mark(d, &dom, false, Some(dest_uri));
    let mut ctx = Ctx::new();
    let r = run(d, &dom, &vmm, dest_uri, opts, &mut ctx);
    if dom.lock().vmm.is_some() {
        vmm::mark(d, &dom, false, None);
        if opts.tls && r.is_err() {
            super::tls::disable(&vmm);
        }
    }
    let job_type = match &r {
        Ok(()) => JobType::Completed,
        Err(Error::Aborted(_)) => JobType::Cancelled,
        Err(_) => JobType::Failed,
    };
    let mut info = match &ctx.last {
        Some(q) => from_query_migrate(q, job_type, OP),
        None => JobInfo {
            job_type,
            operation: Some(OP.into()),
            ..Default::default()
        },
    };
    if let Err(e) = &r {
        info.errmsg = Some(e.to_string());
    }
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

fn aborted() -> Error {
    Error::Aborted("migration job: canceled by client".into())
}

pub(super) fn note(dom: &Domain, ctx: &mut Ctx, s: String) {
    tracing::info!("{}: {s}", dom.name);
    if let Some(j) = dom.lock().job.as_mut() {
        j.notes.push(s.clone());
    }
    ctx.notes.push(s);
}

fn run(
    d: &Arc<Daemon>,
    dom: &Arc<Domain>,
    vmm: &Arc<Vmm>,
    dest_uri: &str,
    opts: &MigrateOptions,
    ctx: &mut Ctx,
) -> Result<()> {
    // Begin: the definition and a cookie with what this VMM supports.
    dom.set_phase("begin");
    let caps = vmm
        .monitor
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .supported_capabilities(COOKIE_CAPABILITIES)
        .map_err(|e| Error::Monitor(e.to_string()))?
        .into_iter()
        .filter(|c| !d.cfg.hide_capabilities.contains(c))
        .collect::<Vec<_>>();
    let (xml, driver) = {
        let g = dom.lock();
        (virt::conf::format_domain(&g.def, None), g.def.driver())
    };
    let cookie = MigrationCookie {
        host: d.hostname.clone(),
        driver: driver.name().to_string(),
        capabilities: caps,
        uri: None,
        autostart: false,
    };
    let tls_dir = if opts.tls {
        Some(tls::check_dir(
            d.cfg.migrate_tls_dir.as_deref(),
            tls::Endpoint::Client,
            &d.hostname,
        )?)
    } else {
        None
    };
    // auto-converge is the source VMM's alone (QEMU's rule): refuse before the destination
    // is contacted when this VMM cannot throttle its vCPUs.
    if opts.auto_converge {
        let ok = vmm
            .monitor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .supported_capabilities(&["auto-converge"])
            .map_err(|e| Error::Monitor(e.to_string()))?;
        if ok.is_empty() {
            return Err(Error::Unsupported(format!(
                "--auto-converge: the source's VMM ({} driver) refuses the auto-converge capability",
                driver.name()
            )));
        }
    }
    let mut cookie = cookie;
    if opts.postcopy {
        // Post-copy needs `postcopy-ram` on both VMMs (QEMU's rule): the source's is probed
        // here, before the destination is contacted; Prepare checks the destination's.
        super::postcopy::probe_source(vmm, driver.name())?;
        cookie.capabilities.push("postcopy-ram".into());
    }
    if let Some(j) = dom.lock().job.as_mut() {
        j.postcopy = opts.postcopy;
    }
    crate::fault::hold("begin", || {
        dom.wait_until(Duration::from_secs(60), |g| {
            g.job.as_ref().is_some_and(|j| j.abort_requested)
        });
    });
    if dom.abort_requested() {
        return Err(aborted());
    }

    // Prepare, on the destination daemon.
    dom.set_phase("prepare");
    let mut peer = Connection::open(dest_uri)
        .map_err(|e| Error::OperationFailed(format!("cannot reach the destination daemon: {e}")))?;
    peer.set_timeout(Some(PEER_CALL_TIMEOUT))?;
    if let Some(j) = dom.lock().job.as_mut() {
        j.peer = peer.shutdown_handle().ok();
    }
    if dom.abort_requested() {
        return Err(aborted());
    }
    let dc = match peer.call(Call::MigratePrepare {
        xml,
        cookie: cookie.clone(),
        options: opts.clone(),
    }) {
        Ok(Reply::Cookie(c)) => c,
        Ok(other) => return Err(Error::Internal(format!("Prepare answered {other:?}"))),
        Err(_) if dom.abort_requested() => {
            // domjobabort closed the connection: the destination may have started its VMM.
            finish_cancelled(dest_uri, &dom.name);
            return Err(aborted());
        }
        Err(e) => {
            return Err(match e {
                Error::Rpc { message, .. } => Error::OperationFailed(format!(
                    "the destination daemon failed during Prepare: {message}"
                )),
                e => e,
            })
        }
    };
    crate::fault::point("prepare-done");
    let uri = dc
        .uri
        .clone()
        .ok_or_else(|| Error::Internal("the destination's cookie has no URI".into()))?;
    if dom.abort_requested() {
        finish_cancelled_on(dest_uri, &mut peer, &dom.name);
        return Err(aborted());
    }

    // Negotiation: switchover-ack and return-path when both ends support them and the
    // stream is not tunnelled (libvirt's rule).
    let lacks = |cap: &str| -> Option<String> {
        match (cookie.supports(cap), dc.supports(cap)) {
            (true, true) => None,
            (false, true) => Some(format!(
                "the source's VMM ({}) does not support it",
                cookie.host
            )),
            (true, false) => Some(format!(
                "the destination's VMM ({}) does not support it",
                dc.host
            )),
            (false, false) => Some("neither VMM supports it".into()),
        }
    };
    let rp = if opts.tunnelled {
        Some("the stream is tunnelled through the daemons' connection, one way".to_string())
    } else {
        lacks("return-path")
    };
    note(
        dom,
        ctx,
        match &rp {
            None => "return-path: on (both VMMs support it, not tunnelled)".into(),
            Some(why) => format!("return-path: off ({why})"),
        },
    );
    let sack = match (&rp, lacks("switchover-ack")) {
        (Some(_), _) => Some("it needs the return path, which is off".to_string()),
        (None, why) => why,
    };
    note(
        dom,
        ctx,
        match &sack {
            None => "switchover-ack: on (both VMMs support it, not tunnelled)".into(),
            Some(why) => format!("switchover-ack: off ({why})"),
        },
    );

    // Perform.
    dom.set_phase("perform");
    let was_running = dom.lock().state == DomainState::Running;
    // The destination runs a guest that travels running by itself (its VMM decides after the
    // stream), unless someone suspends it meanwhile (`Daemon::suspend` clears this again).
    let dest_decides = dc.autostart && was_running && opts.live;
    if dc.autostart {
        note(
            dom,
            ctx,
            "handover: the destination runs the guest by itself after the stream (return-path verdict); Finish confirms".into(),
        );
    }
    if opts.auto_converge {
        note(
            dom,
            ctx,
            "auto-converge: on (the source VMM throttles the vCPUs while pre-copy does not converge)".into(),
        );
    }
    vmm::mark_decides(d, dom, dest_decides);
    let perform = (|| -> Result<Option<SourceTunnel>> {
        if !opts.live && was_running {
            vmm.qmp("stop", json!({}))?;
        }
        let caps = [
            ("events", true),
            ("return-path", rp.is_none()),
            ("switchover-ack", sack.is_none()),
            ("auto-converge", opts.auto_converge),
            ("multifd", opts.parallel),
        ];
        vmm.monitor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_capabilities(&caps)
            .map_err(|e| Error::Monitor(e.to_string()))?;
        if let Some(n) = opts.multifd_channels() {
            // `--parallel [--parallel-connections N]` (virsh): multifd with N channels on
            // both VMMs (the destination's in Prepare); QEMU and Tern alike.
            vmm.qmp("migrate-set-parameters", json!({ "multifd-channels": n }))?;
            note(
                dom,
                ctx,
                format!("parallel: multifd with {n} channel(s) on both VMMs"),
            );
            // `--comp-methods zstd|zlib [--comp-*-level N]`: multifd compression on both
            // VMMs (the destination's in Prepare); the level is the sender's. `none` otherwise,
            // so an earlier migration's setting does not linger (libvirt resets it too).
            let comp = opts.multifd_compression()?;
            let method = comp.map_or("none", |(m, _)| m);
            vmm.qmp(
                "migrate-set-parameters",
                json!({ "multifd-compression": method }),
            )?;
            if let Some((_, Some((param, level)))) = comp {
                vmm.qmp("migrate-set-parameters", json!({ param: level }))?;
            }
            if let Some((m, level)) = comp {
                let level = level.map_or(String::new(), |(p, l)| format!(", {p} {l}"));
                note(
                    dom,
                    ctx,
                    format!("compression: multifd {m} on both VMMs{level}"),
                );
            }
        }
        super::postcopy::configure_source(vmm, opts)?;
        if opts.postcopy {
            note(
                dom,
                ctx,
                format!(
                    "post-copy: enabled (postcopy-ram on both VMMs; the switch comes with \
                     migrate-postcopy{}){}",
                    if opts.postcopy_after_precopy {
                        ", here after the first pass"
                    } else {
                        ""
                    },
                    opts.postcopy_bandwidth
                        .map(|b| format!("; max-postcopy-bandwidth {b} MiB/s"))
                        .unwrap_or_default()
                ),
            );
        }
        if let Some(dir) = tls_dir {
            // The destination's certificate must name the host the user gave for it (libvirt
            // sets tls-hostname the same way); a local destination keeps QEMU's default.
            let host = match virt::uri::parse(dest_uri) {
                Ok(virt::uri::Target::Tcp { host, .. } | virt::uri::Target::Tls { host, .. }) => {
                    Some(host)
                }
                _ => None,
            };
            tls::enable(vmm, dir, tls::Endpoint::Client, host.as_deref())?;
            note(
                dom,
                ctx,
                format!(
                    "tls: on (tls-creds-x509 from {}, the destination's certificate checked for {})",
                    dir.display(),
                    host.as_deref().unwrap_or("the migration URI's host")
                ),
            );
        }
        if let Some(bw) = opts.bandwidth_mib_s {
            vmm.qmp(
                "migrate-set-parameters",
                json!({"max-bandwidth": bw.saturating_mul(1 << 20)}),
            )?;
        }
        // libvirt's unit is MiB/s; the VMM's (QEMU 8.2+) bytes/s, 0 = the measured bandwidth.
        // Per migration, as libvirt (which restores the parameters after the job): a value left
        // on the VMM by an earlier migration is reset when this one does not ask for it.
        match opts.available_switchover_bandwidth {
            Some(mib_s) => {
                let bytes = mib_s.checked_mul(1 << 20).ok_or_else(|| {
                    Error::InvalidArg(format!(
                        "--available-switchover-bandwidth {mib_s} MiB/s is too large"
                    ))
                })?;
                vmm.qmp(
                    "migrate-set-parameters",
                    json!({ "avail-switchover-bandwidth": bytes }),
                )?;
                note(
                    dom,
                    ctx,
                    format!(
                        "avail-switchover-bandwidth: {mib_s} MiB/s (the expected downtime and \
                         the switchover decision assume it instead of the measured bandwidth)"
                    ),
                );
            }
            None => {
                let p = vmm.qmp("query-migrate-parameters", json!({}))?;
                let left = p.get("avail-switchover-bandwidth").and_then(|v| v.as_u64());
                if left.is_some_and(|v| v > 0) {
                    vmm.qmp(
                        "migrate-set-parameters",
                        json!({ "avail-switchover-bandwidth": 0 }),
                    )?;
                }
            }
        }
        if dom.abort_requested() {
            return Err(aborted());
        }
        if uri == virt::TUNNEL_URI {
            let dir = crate::runtime::vmm_dir(&d.cfg.run_dir, &dom.name);
            let t = SourceTunnel::open(&dir, dest_uri, &dom.name)?;
            vmm.qmp("migrate", json!({ "uri": t.uri }))?;
            return Ok(Some(t));
        }
        vmm.qmp("migrate", json!({ "uri": uri }))?;
        Ok(None)
    })();
    let tunnel = match perform {
        Ok(t) => t,
        Err(e) => {
            finish_cancelled_on(dest_uri, &mut peer, &dom.name);
            confirm_failed(dom, vmm, was_running);
            return Err(e);
        }
    };
    if opts.tunnelled {
        note(
            dom,
            ctx,
            "tunnelled: the stream goes through the daemons' connection".into(),
        );
    }
    let status = wait_perform(dom, vmm, &mut peer, ctx);
    if let Some(t) = tunnel {
        match status.as_deref() {
            // The VMM closed its end after END: the pump carries the rest.
            Ok("completed") => t.finish(),
            _ => t.close(),
        }
    }
    let status = status?;
    if status == "postcopy-active" {
        // The switch happened: the rules of docs/management.md §5c from here on.
        return super::postcopy::finish_and_confirm(d, dom, vmm, dest_uri, &mut peer, ctx);
    }
    let q = ctx.last.clone().unwrap_or(Value::Null);
    if status == "failed" || status == "cancelled" {
        finish_cancelled_on(dest_uri, &mut peer, &dom.name);
        confirm_failed(dom, vmm, was_running);
        if dom.abort_requested() {
            return Err(aborted());
        }
        let desc = q
            .get("error-desc")
            .and_then(Value::as_str)
            .unwrap_or("no error description");
        return Err(Error::OperationFailed(format!(
            "migration {status}: {desc}"
        )));
    }

    // Finish, on the destination: it resumes the domain (or reports it could not and
    // killed its VMM).
    crate::fault::point("perform-done");
    let decides = dest_decides && !dom.lock().job.as_ref().is_some_and(|j| j.user_suspended);
    dom.set_phase("finish");
    let outcome = finish(dest_uri, &mut peer, &dom.name);
    if decides && status == "completed" {
        // The destination confirmed on the return path that it runs the guest: the source is
        // done whatever its daemon answers.
        if let FinishOutcome::Refused(e)
        | FinishOutcome::NotDelivered(e)
        | FinishOutcome::Unknown(e) = &outcome
        {
            note(
                dom,
                ctx,
                format!("the destination runs the domain (its VMM confirmed); its daemon did not finish the job: {e}"),
            );
        }
        dom.set_phase("confirm");
        if let Err(e) = d.quit_domain(dom, "migrated") {
            tracing::warn!("{}: quitting the source VMM: {e}", dom.name);
            let _ = d.destroy_domain(dom, "migrated");
        }
        return Ok(());
    }
    let outcome = match outcome {
        // The destination may have run the guest by itself (x-tern-unconfirmed): a Finish
        // that did not arrive says nothing.
        FinishOutcome::NotDelivered(e) if decides => FinishOutcome::Unknown(e),
        o => o,
    };
    match outcome {
        FinishOutcome::Done => {
            dom.set_phase("confirm");
            if let Err(e) = d.quit_domain(dom, "migrated") {
                tracing::warn!("{}: quitting the source VMM: {e}", dom.name);
                let _ = d.destroy_domain(dom, "migrated");
            }
            Ok(())
        }
        FinishOutcome::Refused(e) | FinishOutcome::NotDelivered(e) => {
            dom.set_phase("confirm");
            confirm_failed(dom, vmm, was_running);
            Err(Error::OperationFailed(format!(
                "the destination could not finish the migration ({e}); the domain runs on the source again"
            )))
        }
        FinishOutcome::Unknown(e) => Err(Error::OperationFailed(format!(
            "lost the destination daemon during Finish ({e}): it may run the domain; the domain stays paused here. \
             Check `domstate {name}` on the destination: if it is not running there, `resume {name}` here",
            name = dom.name
        ))),
    }
}

/// Waits until the VMM's migration ends, checking the peer daemon every [`KEEPALIVE`]:
/// a destination daemon that is gone cancels the migration (libvirt's keepalive rule).
fn wait_perform(
    dom: &Arc<Domain>,
    vmm: &Arc<Vmm>,
    peer: &mut Connection,
    ctx: &mut Ctx,
) -> Result<String> {
    let mut cancelled = false;
    let mut last_ping = Instant::now();
    loop {
        dom.wait_until(SAMPLE_PERIOD, |g| {
            g.vmm.is_none()
                || g.mig_status.as_deref().is_some_and(is_terminal)
                || g.job.as_ref().is_some_and(|j| j.postcopy_switched)
        });
        if dom.lock().vmm.is_none() {
            return Err(Error::OperationFailed(
                "the source VMM exited during the migration".into(),
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
        if is_terminal(&status) {
            // A post-copy job: let the event thread catch up (it sees `postcopy-active`
            // before the final status) so that a failure after the switch is known as one.
            if dom.lock().job.as_ref().is_some_and(|j| j.postcopy) {
                dom.wait_until(Duration::from_secs(2), |g| {
                    g.vmm.is_none() || g.mig_status.as_deref().is_some_and(is_terminal)
                });
                if dom.postcopy_switched() {
                    return Ok("postcopy-active".into());
                }
            }
            return Ok(status);
        }
        // Perform ends at the switch (libvirt: "the source considers migration completed at
        // the moment it switched from active to postcopy-active").
        if status.starts_with("postcopy") || dom.postcopy_switched() {
            return Ok("postcopy-active".into());
        }
        if cancelled || last_ping.elapsed() < KEEPALIVE {
            continue;
        }
        last_ping = Instant::now();
        let t0 = Instant::now();
        let alive = peer
            .set_timeout(Some(PING_TIMEOUT))
            .and_then(|_| peer.call(Call::Ping));
        let _ = peer.set_timeout(Some(PEER_CALL_TIMEOUT));
        if let Err(e) = alive {
            note(
                dom,
                ctx,
                format!(
                    "the destination daemon stopped answering ({e}, after {} ms): migration cancelled",
                    t0.elapsed().as_millis()
                ),
            );
            vmm.qmp("migrate_cancel", json!({}))?;
            cancelled = true;
        }
    }
}

pub(super) fn sample(q: &Value, started: Instant) -> JobSample {
    let ram = &q["ram"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    JobSample {
        t_ms: started.elapsed().as_millis() as u64,
        transferred: n(&ram["transferred"]),
        remaining: n(&ram["remaining"]),
        bandwidth: ram["mbps"]
            .as_f64()
            .map_or(0, |m| (m * 1_000_000.0 / 8.0) as u64),
        dirty_rate: n(&ram["dirty-pages-rate"]),
        pass: n(&ram["dirty-sync-count"]),
    }
}

/// Confirm after a failure: the source runs again if it ran before.
pub(super) fn confirm_failed(dom: &Domain, vmm: &Vmm, was_running: bool) {
    if !was_running {
        return;
    }
    match vmm.qmp("query-status", json!({})) {
        Ok(s) if s.get("running").and_then(Value::as_bool) == Some(true) => {}
        Ok(_) => {
            if let Err(e) = vmm.qmp("cont", json!({})) {
                tracing::error!("{}: resuming the source failed: {e}", dom.name);
            }
        }
        Err(e) => tracing::error!("{}: query-status: {e}", dom.name),
    }
}

pub(super) enum FinishOutcome {
    Done,
    /// The destination answered that it failed (and killed its VMM).
    Refused(Error),
    /// The destination never got the call (not sent, twice).
    NotDelivered(Error),
    /// The call was sent and no answer came: the destination may run the domain.
    Unknown(Error),
}

pub(super) fn call_finish(peer: &mut Connection, name: &str, cancelled: bool) -> Result<()> {
    match peer.call(Call::MigrateFinish {
        domain: name.to_string(),
        cancelled,
    })? {
        Reply::Unit => Ok(()),
        other => Err(Error::Internal(format!("Finish answered {other:?}"))),
    }
}

/// Finish, retried once on a fresh connection (Finish is idempotent on the destination).
pub(super) fn finish(dest_uri: &str, peer: &mut Connection, name: &str) -> FinishOutcome {
    let first = call_finish(peer, name, false);
    let first_err = match first {
        Ok(()) => return FinishOutcome::Done,
        Err(e @ (Error::Rpc { .. } | Error::Connect { .. })) => e,
        Err(e) => return FinishOutcome::Refused(e),
    };
    let sent_once = matches!(first_err, Error::Rpc { sent: true, .. });
    let retry = Connection::open(dest_uri).and_then(|mut c| {
        c.set_timeout(Some(PEER_CALL_TIMEOUT))?;
        call_finish(&mut c, name, false)
    });
    match retry {
        Ok(()) => FinishOutcome::Done,
        Err(Error::Rpc { sent: true, .. }) => FinishOutcome::Unknown(first_err),
        Err(e @ (Error::Rpc { .. } | Error::Connect { .. })) if sent_once => {
            FinishOutcome::Unknown(Error::OperationFailed(format!("{first_err}; then {e}")))
        }
        Err(e @ (Error::Rpc { .. } | Error::Connect { .. })) => {
            // Never delivered: the destination's VMM stays paused and its daemon kills it
            // when it restarts (an unfinished incoming migration).
            FinishOutcome::NotDelivered(Error::OperationFailed(format!("{first_err}; then {e}")))
        }
        Err(e) => FinishOutcome::Refused(e),
    }
}

/// Finish with `cancelled`: the destination kills its VMM. Best effort: a destination daemon
/// that cannot be reached kills its unfinished incoming VMM when it restarts.
pub(super) fn finish_cancelled_on(dest_uri: &str, peer: &mut Connection, name: &str) {
    if call_finish(peer, name, true).is_ok() {
        return;
    }
    finish_cancelled(dest_uri, name);
}

/// Finish with `cancelled` on a new connection.
pub(super) fn finish_cancelled(dest_uri: &str, name: &str) {
    let r = Connection::open(dest_uri).and_then(|mut c| {
        c.set_timeout(Some(PEER_CALL_TIMEOUT))?;
        call_finish(&mut c, name, true)
    });
    if let Err(e) = r {
        tracing::warn!("{name}: cancelling on the destination: {e}");
    }
}

/// `--offline --persistent`: only the definition moves.
fn offline(dom: &Domain, dest_uri: &str) -> Result<()> {
    let (xml, active) = {
        let g = dom.lock();
        (virt::conf::format_domain(&g.def, None), g.state.is_active())
    };
    if active {
        return Err(Error::OperationInvalid(
            "--offline migrates an inactive domain's definition; the domain is running".into(),
        ));
    }
    let mut peer = Connection::open(dest_uri)?;
    peer.call(Call::DefineXml { xml })?;
    Ok(())
}
