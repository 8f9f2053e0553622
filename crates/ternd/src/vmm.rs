//! Starting VMM processes, watching their QMP events, noticing them exit, and finding them
//! again after a daemon restart.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use virt::{DomainEvent, DomainState, Error, LaunchMode, LifecycleEvent, Result, VmmPaths};
use virt_util::{process, Monitor, MonitorEvents};

use crate::daemon::Daemon;
use crate::domain::{Domain, JobKind, Vmm};
use crate::runtime::{self, PostcopySide, Status};

/// How long a new VMM may take to open its QMP socket.
const QMP_READY: Duration = Duration::from_secs(30);

fn paths(dir: &Path, shares: bool) -> VmmPaths {
    VmmPaths {
        dir: dir.to_path_buf(),
        qmp: dir.join("qmp.sock"),
        qmp_events: if shares {
            dir.join("qmp.sock")
        } else {
            dir.join("qmp-events.sock")
        },
        log: dir.join("vmm.log"),
    }
}

fn exe_name_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_default()
}

/// Starts the domain's VMM. `incoming`: an incoming migration (marked in the status file so
/// that a restarted daemon kills an unfinished one).
pub fn launch(d: &Arc<Daemon>, dom: &Arc<Domain>, mode: LaunchMode) -> Result<Arc<Vmm>> {
    let (def, persistent) = {
        let g = dom.lock();
        (g.def.clone(), g.persistent)
    };
    let driver = d.driver(def.driver())?;
    let dir = runtime::vmm_dir(&d.cfg.run_dir, &dom.name);
    virt_util::dirs::ensure_dir(&dir, 0o700).map_err(|e| Error::OperationFailed(e.to_string()))?;
    let p = paths(&dir, driver.shares_qmp_socket());
    for s in [&p.qmp, &p.qmp_events] {
        let _ = virt_util::dirs::remove_file(s);
    }
    let cmd = driver.launch(&def, &p, mode)?;
    tracing::info!(
        "{}: starting {} {}",
        dom.name,
        cmd.program.display(),
        cmd.args.join(" ")
    );
    let mut child = process::spawn_detached(&cmd.program, &cmd.args, &p.log, &dir.join("vmm.pid"))
        .map_err(|e| Error::OperationFailed(e.to_string()))?;
    let pid = child.id();
    let exe_name = exe_name_of(pid);
    let connected = (|| {
        let mut alive = || matches!(child.try_wait(), Ok(None));
        let m = Monitor::connect(&p.qmp, QMP_READY, &mut alive)?;
        let e = MonitorEvents::connect(&p.qmp_events, QMP_READY, &mut alive)?;
        Ok::<_, virt_util::UtilError>((m, e))
    })();
    let (monitor, events) = match connected {
        Ok(x) => x,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::OperationFailed(format!(
                "{}: {e}; its log ({}):\n{}",
                dom.name,
                p.log.display(),
                process::log_tail(&p.log, 2000)
            )));
        }
    };
    let vmm = Arc::new(Vmm {
        pid,
        monitor: Mutex::new(monitor),
    });
    let id = d.next_id();
    {
        let mut g = dom.lock();
        g.vmm = Some(vmm.clone());
        g.id = Some(id);
        g.stop_reason = None;
        g.mig_status = None;
    }
    let st = Status {
        id,
        pid,
        exe_name,
        xml: virt::conf::format_domain(&def, None),
        persistent,
        incoming: mode == LaunchMode::Incoming,
        outgoing: false,
        dest_uri: None,
        dest_decides: false,
        postcopy: false,
        postcopy_failed: None,
    };
    runtime::save(&d.cfg.run_dir, &dom.name, &st).map_err(Error::OperationFailed)?;
    watch(d, dom, &vmm, events, Some(child))?;
    Ok(vmm)
}

/// Updates the status file's migration flags (`outgoing`: the destination's URI).
pub fn mark(d: &Daemon, dom: &Domain, incoming: bool, outgoing: Option<&str>) {
    let path = runtime::status_path(&d.cfg.run_dir, &dom.name);
    match runtime::load(&path) {
        Ok(mut st) => {
            st.incoming = incoming;
            st.outgoing = outgoing.is_some();
            st.dest_uri = outgoing.map(str::to_string);
            st.dest_decides = false;
            st.postcopy = false;
            st.persistent = dom.lock().persistent;
            if let Err(e) = runtime::save(&d.cfg.run_dir, &dom.name, &st) {
                tracing::warn!("{}: status file: {e}", dom.name);
            }
        }
        Err(e) => tracing::warn!("{}: status file: {e}", dom.name),
    }
}

/// Records whether the outgoing migration's destination decides by itself.
pub fn mark_decides(d: &Daemon, dom: &Domain, decides: bool) {
    let path = runtime::status_path(&d.cfg.run_dir, &dom.name);
    if let Ok(mut st) = runtime::load(&path) {
        if st.outgoing && st.dest_decides != decides {
            st.dest_decides = decides;
            if let Err(e) = runtime::save(&d.cfg.run_dir, &dom.name, &st) {
                tracing::warn!("{}: status file: {e}", dom.name);
            }
        }
    }
}

/// Records in the status file that this side's migration switched to post-copy (written from
/// the VMM's `MIGRATION postcopy-active` event, before any daemon step depends on it).
pub fn mark_postcopy(d: &Daemon, dom: &Domain) {
    let path = runtime::status_path(&d.cfg.run_dir, &dom.name);
    match runtime::load(&path) {
        Ok(mut st) if !st.postcopy => {
            st.postcopy = true;
            if let Err(e) = runtime::save(&d.cfg.run_dir, &dom.name, &st) {
                tracing::warn!("{}: status file: {e}", dom.name);
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("{}: status file: {e}", dom.name),
    }
}

/// Records which side of a failed post-copy migration this domain is (`None`: none any
/// more), in the domain and its status file (§5d: a restarted daemon finds it again).
pub fn mark_postcopy_failed(d: &Daemon, dom: &Domain, side: Option<JobKind>) {
    dom.lock().postcopy_failed = side;
    let path = runtime::status_path(&d.cfg.run_dir, &dom.name);
    let side = side.map(|k| match k {
        JobKind::MigrationOut => PostcopySide::Source,
        JobKind::MigrationIn => PostcopySide::Destination,
    });
    match runtime::load(&path) {
        Ok(mut st) if st.postcopy_failed != side => {
            st.postcopy_failed = side;
            if let Err(e) = runtime::save(&d.cfg.run_dir, &dom.name, &st) {
                tracing::warn!("{}: status file: {e}", dom.name);
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("{}: status file: {e}", dom.name),
    }
}

/// Starts the thread that reads the VMM's events until it exits, then reaps it (`child`:
/// when this daemon started it) and marks the domain shut off.
fn watch(
    d: &Arc<Daemon>,
    dom: &Arc<Domain>,
    vmm: &Arc<Vmm>,
    mut events: MonitorEvents,
    child: Option<Child>,
) -> Result<()> {
    let (d, dom, vmm) = (d.clone(), dom.clone(), vmm.clone());
    std::thread::Builder::new()
        .name(format!("vmm-ev-{}", vmm.pid))
        .spawn(move || {
            let mut saw_shutdown = false;
            loop {
                match events.next(None) {
                    Ok(Some(ev)) => on_event(&d, &dom, &vmm, &ev, &mut saw_shutdown),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!("{}: monitor events ended: {e}", dom.name);
                        break;
                    }
                }
            }
            if let Some(mut c) = child {
                let _ = c.wait();
            }
            gone(&d, &dom, &vmm, saw_shutdown);
        })
        .map(|_| ())
        .map_err(|e| Error::Internal(format!("spawning the event thread: {e}")))
}

fn on_event(
    d: &Arc<Daemon>,
    dom: &Arc<Domain>,
    vmm: &Arc<Vmm>,
    ev: &Value,
    saw_shutdown: &mut bool,
) {
    let name = ev.get("event").and_then(Value::as_str).unwrap_or("");
    let data = ev.get("data").cloned().unwrap_or(Value::Null);
    match name {
        "STOP" => {
            let (job, switched) = job_and_switch(dom);
            let (reason, detail) = match job {
                // libvirt: the source paused for the switch is `paused (post-copy)`.
                Some(JobKind::MigrationOut) if switched => ("post-copy", "Post-copy"),
                Some(JobKind::MigrationOut) => ("migration", "Migrated"),
                Some(JobKind::MigrationIn) => ("incoming migration", "Paused"),
                None => ("user", "Paused"),
            };
            dom.set_state(DomainState::Paused, reason);
            d.events
                .lifecycle(&dom.name, LifecycleEvent::Suspended, detail);
        }
        "RESUME" => {
            let (job, switched) = job_and_switch(dom);
            let (reason, detail) = match job {
                Some(JobKind::MigrationOut) => ("migration canceled", "Unpaused"),
                // libvirt: the destination runs in post-copy until the pages are all here.
                Some(JobKind::MigrationIn) if switched => ("post-copy", "Post-copy"),
                Some(JobKind::MigrationIn) => ("migrated", "Migrated"),
                None => ("unpaused", "Unpaused"),
            };
            dom.set_state(DomainState::Running, reason);
            d.events
                .lifecycle(&dom.name, LifecycleEvent::Resumed, detail);
        }
        "MIGRATION" => {
            let status = data
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if status == "postcopy-active" {
                switched_to_postcopy(d, dom);
            }
            dom.lock().mig_status = Some(status.clone());
            if crate::migration::postcopy::over(&status) && status != "completed" {
                crate::migration::postcopy::incoming_failed_before_finish(d, dom, vmm);
            }
            if matches!(
                status.as_str(),
                "postcopy-recover-setup" | "postcopy-recover" | "postcopy-active"
            ) {
                crate::migration::resume::recovering(d, dom, vmm, &status);
            }
            dom.changed.notify_all();
        }
        "MIGRATION_PASS" => {
            let pass = data.get("pass").and_then(Value::as_u64).unwrap_or(0);
            d.events.emit(DomainEvent::MigrationIteration {
                domain: dom.name.clone(),
                iteration: pass,
            });
        }
        "SHUTDOWN" => *saw_shutdown = true,
        _ => {}
    }
}

fn job_and_switch(dom: &Domain) -> (Option<JobKind>, bool) {
    let g = dom.lock();
    (
        g.job.as_ref().map(|j| j.kind),
        g.job.as_ref().is_some_and(|j| j.postcopy_switched),
    )
}

/// This side's VMM entered `postcopy-active` (libvirt's `qemuProcessHandleMigrationStatus`):
/// the status file says so first (a restarted daemon then never resumes the source nor kills
/// the destination), then the job; a source already paused for the switch becomes `paused
/// (post-copy)` with the `Suspended Post-copy` event.
fn switched_to_postcopy(d: &Daemon, dom: &Domain) {
    let first = {
        let mut g = dom.lock();
        match g.job.as_mut() {
            Some(j) if !j.postcopy_switched => {
                j.postcopy_switched = true;
                Some(j.kind)
            }
            _ => None,
        }
    };
    let Some(kind) = first else {
        return;
    };
    mark_postcopy(d, dom);
    tracing::info!("{}: the migration switched to post-copy", dom.name);
    let paused_for_switch = {
        let g = dom.lock();
        g.state == DomainState::Paused && g.reason == "migration"
    };
    if kind == JobKind::MigrationOut && paused_for_switch {
        dom.set_state(DomainState::Paused, "post-copy");
        d.events
            .lifecycle(&dom.name, LifecycleEvent::Suspended, "Post-copy");
    }
}

/// The VMM exited: the domain is shut off (and forgotten if transient).
fn gone(d: &Daemon, dom: &Arc<Domain>, vmm: &Arc<Vmm>, saw_shutdown: bool) {
    let mut g = dom.lock();
    if !g.vmm.as_ref().is_some_and(|v| Arc::ptr_eq(v, vmm)) {
        return;
    }
    let reason = g
        .stop_reason
        .take()
        .unwrap_or(if saw_shutdown { "shutdown" } else { "crashed" });
    g.vmm = None;
    g.id = None;
    g.state = DomainState::Shutoff;
    g.reason = reason.to_string();
    g.mig_status = None;
    g.postcopy_failed = None;
    let transient = !g.persistent;
    let detail = match reason {
        "destroyed" => "Destroyed",
        "shutdown" => "Shutdown",
        "migrated" => "Migrated",
        "failed" => "Failed",
        _ => "Crashed",
    };
    tracing::info!("{}: VMM {} exited ({reason})", dom.name, vmm.pid);
    // Queued while the domain lock is held: whoever sees the VMM gone (`wait_gone` in destroy,
    // shutdown, a migration's Confirm) finds this event queued already, so what it emits next
    // (a migration's `job-completed`) comes after `Stopped`. The bus takes only its own lock.
    d.events
        .lifecycle(&dom.name, LifecycleEvent::Stopped, detail);
    drop(g);
    runtime::remove(&d.cfg.run_dir, &dom.name);
    if transient {
        d.forget(dom);
    }
    dom.changed.notify_all();
}

/// Finds the VMMs of a previous daemon again (status files in the run directory). An
/// unfinished incoming migration is killed (its source never heard it runs here); an
/// outgoing one still in progress is cancelled (the source resumes by itself before END).
pub fn recover(d: &Arc<Daemon>) -> Vec<PathBuf> {
    let dir = d.cfg.run_dir.join("domains");
    let mut done = Vec::new();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return done;
    };
    for entry in rd.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        match recover_one(d, &path) {
            Ok(name) => {
                tracing::info!("recovered running domain {name}");
                done.push(path);
            }
            Err(e) => tracing::warn!("not recovered: {e}"),
        }
    }
    done
}

fn recover_one(d: &Arc<Daemon>, path: &Path) -> Result<String> {
    let st = runtime::load(path).map_err(Error::Internal)?;
    let def = virt::conf::parse_domain(&st.xml)?;
    let name = def.name.clone();
    let alive = process::is_alive(st.pid, &st.exe_name);
    if !alive {
        runtime::remove(&d.cfg.run_dir, &name);
        return Err(Error::OperationFailed(format!(
            "{name}: VMM {} is gone",
            st.pid
        )));
    }
    let driver = d.driver(def.driver())?;
    let vdir = runtime::vmm_dir(&d.cfg.run_dir, &name);
    let p = paths(&vdir, driver.shares_qmp_socket());
    let (pid, exe) = (st.pid, st.exe_name.clone());
    let mut alive = move || process::is_alive(pid, &exe);
    let monitor = Monitor::connect(&p.qmp, Duration::from_secs(5), &mut alive)
        .map_err(|e| Error::OperationFailed(format!("{name}: {e}")))?;
    let events = MonitorEvents::connect(&p.qmp_events, Duration::from_secs(5), &mut alive)
        .map_err(|e| Error::OperationFailed(format!("{name}: {e}")))?;
    let vmm = Arc::new(Vmm {
        pid: st.pid,
        monitor: Mutex::new(monitor),
    });
    let status = vmm.qmp("query-status", json!({}))?;
    let running = status.get("running").and_then(Value::as_bool) == Some(true);
    let mig = vmm
        .qmp("query-migrate", json!({}))
        .ok()
        .and_then(|q| q.get("status").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default();
    // Post-copy started (the status file says so, or the VMM is in it): this VMM holds part
    // of the only copy of the guest, whatever side it is on (§5c).
    let in_postcopy = st.postcopy || mig.starts_with("postcopy");
    if st.incoming && !running && !in_postcopy {
        // An incoming migration that never finished and does not run: its source never heard
        // that it runs here and may run the domain itself.
        tracing::warn!(
            "{name}: killing VMM {} of an incoming migration that never finished",
            st.pid
        );
        let _ = process::signal(st.pid, libc::SIGKILL);
        runtime::remove(&d.cfg.run_dir, &name);
        return Err(Error::OperationFailed(format!(
            "{name}: VMM {} killed (unfinished incoming migration)",
            st.pid
        )));
    }
    // An incoming VMM that runs decided by itself after the stream (its driver's protocol,
    // the source refuses to run it then): it is the domain now.
    let dom = d.adopt(def, st.persistent)?;
    d.bump_id(st.id);
    {
        let mut g = dom.lock();
        g.vmm = Some(vmm.clone());
        g.id = Some(st.id);
        if running {
            g.state = DomainState::Running;
            g.reason = "unpaused".into();
        } else {
            g.state = DomainState::Paused;
            g.reason = status
                .get("status")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_string();
        }
    }
    watch(d, &dom, &vmm, events, None)?;
    if st.incoming && in_postcopy && !crate::migration::postcopy::over(&mig) {
        // Still in post-copy: never killed; the job ends when its VMM does.
        tracing::warn!("{name}: the incoming VMM is in post-copy ({mig}): kept, watched");
        crate::migration::postcopy::resume_incoming_watch(d, &dom, &vmm, running);
    } else if st.incoming {
        tracing::warn!("{name}: the incoming VMM runs by itself (or ran in post-copy): kept");
        let mut failed = false;
        if running && mig == "completed" {
            dom.set_state(DomainState::Running, "migrated");
        } else if in_postcopy && mig != "completed" {
            // Its post-copy failed while the daemon was down: kept, and said so.
            let state = if running {
                DomainState::Running
            } else {
                DomainState::Paused
            };
            dom.set_state(state, "post-copy failed");
            failed = true;
        }
        mark(d, &dom, false, None);
        if failed {
            mark_postcopy_failed(d, &dom, Some(JobKind::MigrationIn));
        }
    }
    if let Some(side) = st.postcopy_failed {
        if !st.incoming && !st.outgoing && mig != "completed" {
            // A failed post-copy that waits for a resume (§5d): shown as it was, never resumed
            // (source) nor killed (destination).
            let kind = match side {
                PostcopySide::Source => JobKind::MigrationOut,
                PostcopySide::Destination => JobKind::MigrationIn,
            };
            tracing::warn!("{name}: post-copy failed here before the restart ({mig}): kept");
            dom.lock().postcopy_failed = Some(kind);
            let state = if running {
                DomainState::Running
            } else {
                DomainState::Paused
            };
            dom.set_state(state, "post-copy failed");
        }
    }
    if st.outgoing {
        let watched = crate::migration::source_recovery::recover(
            d,
            &dom,
            &vmm,
            st.dest_uri.as_deref(),
            st.dest_decides,
            in_postcopy,
        );
        // A post-copy job still followed keeps its marks until it ends (a second restart
        // must find it outgoing and in post-copy again); its watcher clears them.
        if !watched {
            mark(d, &dom, false, None);
        }
    }
    Ok(name)
}
