//! `domjobinfo`, `domjobabort`, and the migration parameters virsh sets outside a migration
//! (`migrate-setmaxdowntime`, `migrate-setspeed`): applied to the VMM directly, as libvirt
//! does.

use serde_json::{json, Value};
use virt::{Error, JobInfo, JobType, Result};

use crate::daemon::Daemon;

use super::stats::from_query_migrate;

pub fn job_info(d: &Daemon, key: &str, completed: bool) -> Result<JobInfo> {
    let dom = d.lookup(key)?;
    if completed {
        return Ok(dom.lock().last_job.clone().unwrap_or_default());
    }
    let (kind, phase, notes, vmm, started) = {
        let g = dom.lock();
        match &g.job {
            None => return Ok(JobInfo::default()),
            Some(j) => (j.kind, j.phase, j.notes.clone(), g.vmm.clone(), j.started),
        }
    };
    let mut info = match vmm.map(|v| v.qmp("query-migrate", json!({}))) {
        Some(Ok(q)) if q.get("status").is_some() => {
            from_query_migrate(&q, JobType::Unbounded, kind.operation())
        }
        _ => JobInfo {
            job_type: JobType::Unbounded,
            operation: Some(kind.operation().into()),
            ..Default::default()
        },
    };
    info.time_elapsed_ms = Some(started.elapsed().as_millis() as u64);
    info.phase = Some(phase.to_string());
    info.notes = notes;
    Ok(info)
}

/// `domjobabort [--postcopy]`.
pub fn abort(d: &Daemon, key: &str, postcopy: bool) -> Result<()> {
    if postcopy {
        return super::postcopy::pause(d, key);
    }
    let dom = d.lookup(key)?;
    let vmm = {
        let mut g = dom.lock();
        let Some(j) = g.job.as_mut() else {
            return Err(Error::OperationInvalid(
                "no job is active on the domain".into(),
            ));
        };
        if j.kind != super::super::domain::JobKind::MigrationOut {
            return Err(Error::OperationInvalid(
                "an incoming migration is aborted from its source".into(),
            ));
        }
        if j.postcopy_switched {
            // libvirt's words: neither host has the whole guest any more.
            return Err(Error::OperationInvalid(
                "cannot abort migration in post-copy mode (neither host has the whole guest; \
                 domjobabort --postcopy pauses it)"
                    .into(),
            ));
        }
        if j.phase == "finish" || j.phase == "confirm" {
            return Err(Error::OperationInvalid(format!(
                "the migration is in phase {}: the destination may already run the domain; it can no longer be aborted",
                j.phase
            )));
        }
        j.abort_requested = true;
        let phase = j.phase;
        if phase == "prepare" {
            // The call to the destination may hang: close it.
            if let Some(p) = &j.peer {
                p.shutdown();
            }
        }
        let vmm = g.vmm.clone();
        drop(g);
        dom.changed.notify_all();
        (phase == "perform").then_some(vmm).flatten()
    };
    if let Some(v) = vmm {
        v.qmp("migrate_cancel", json!({}))?;
    }
    Ok(())
}

fn param(d: &Daemon, key: &str, name: &str) -> Result<u64> {
    let vmm = d.lookup(key)?.vmm()?;
    let p = vmm.qmp("query-migrate-parameters", json!({}))?;
    p.get(name)
        .and_then(Value::as_u64)
        .ok_or_else(|| Error::Monitor(format!("query-migrate-parameters has no {name}: {p}")))
}

fn set_param(d: &Daemon, key: &str, name: &str, v: u64) -> Result<()> {
    let vmm = d.lookup(key)?.vmm()?;
    vmm.qmp("migrate-set-parameters", json!({ name: v }))?;
    Ok(())
}

pub fn set_max_downtime(d: &Daemon, key: &str, ms: u64) -> Result<()> {
    if ms == 0 {
        return Err(Error::InvalidArg(
            "migrate-setmaxdowntime: downtime must be at least 1 ms".into(),
        ));
    }
    set_param(d, key, "downtime-limit", ms)
}

pub fn get_max_downtime(d: &Daemon, key: &str) -> Result<u64> {
    param(d, key, "downtime-limit")
}

/// The parameter `migrate-setspeed`/`getspeed` work on: `--postcopy` → the post-copy push's.
fn speed_param(postcopy: bool) -> &'static str {
    if postcopy {
        "max-postcopy-bandwidth"
    } else {
        "max-bandwidth"
    }
}

pub fn set_max_speed(d: &Daemon, key: &str, mib_s: u64, postcopy: bool) -> Result<()> {
    let bytes = mib_s
        .checked_mul(1 << 20)
        .ok_or_else(|| Error::InvalidArg(format!("bandwidth {mib_s} MiB/s is too large")))?;
    set_param(d, key, speed_param(postcopy), bytes)
}

pub fn get_max_speed(d: &Daemon, key: &str, postcopy: bool) -> Result<u64> {
    Ok(param(d, key, speed_param(postcopy))? >> 20)
}
