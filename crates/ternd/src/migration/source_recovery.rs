//! A restarted source daemon takes up the outgoing migration its predecessor was driving
//! (status file `outgoing`; docs/management.md §5 and §5c).

use std::sync::Arc;

use serde_json::{json, Value};
use virt::{Connection, Error, JobType};

use super::source::{call_finish, confirm_failed, finish_cancelled, OP, PEER_CALL_TIMEOUT};
use super::stats::from_query_migrate;
use crate::daemon::Daemon;
use crate::domain::{Domain, Vmm};

/// A restarted daemon found a source VMM whose outgoing migration its predecessor was driving
/// (status file `outgoing`). Still running → cancel it (the VMM resumes by itself before END)
/// and cancel on the destination. Ended `completed`/`x-tern-unconfirmed` → call Finish on the
/// destination again (idempotent there): done → quit the source; answered failure → resume the
/// source; no answer → leave it paused (the predecessor may have delivered a Finish: only the
/// destination knows). Ended `failed`/`cancelled` → cancel on the destination.
/// In post-copy and not over, a watcher follows the job: true (it clears the status file's
/// migration marks when the job ends; the caller must not clear them before).
pub fn recover(
    d: &Arc<Daemon>,
    dom: &Arc<Domain>,
    vmm: &Arc<Vmm>,
    dest_uri: Option<&str>,
    dest_decides: bool,
    postcopy: bool,
) -> bool {
    let name = dom.name.clone();
    let q = match vmm.qmp("query-migrate", json!({})) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!("{name}: recovering the outgoing migration: {e}");
            return false;
        }
    };
    let status = q
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("none")
        .to_string();
    // Post-copy started (status file, the VMM's status, or pages sent after the switch):
    // never cancelled, never resumed (§5c).
    let pc_bytes = q["ram"]["postcopy-bytes"].as_u64().unwrap_or(0) > 0;
    if postcopy || status.starts_with("postcopy") || pc_bytes {
        tracing::warn!(
            "{name}: the outgoing migration left by the previous daemon is in post-copy ({status})"
        );
        if !super::postcopy::over(&status) {
            return super::postcopy::recover_source(d, dom, vmm, dest_uri, &status);
        }
        let mut info = from_query_migrate(&q, JobType::Failed, OP);
        if status == "completed" {
            if let Some(uri) = dest_uri {
                let r = Connection::open(uri).and_then(|mut c| {
                    c.set_timeout(Some(PEER_CALL_TIMEOUT))?;
                    call_finish(&mut c, &name, false)
                });
                if let Err(e) = r {
                    tracing::warn!("{name}: Finish on the destination: {e}");
                }
            }
            info.job_type = JobType::Completed;
            if let Err(e) = d.quit_domain(dom, "migrated") {
                tracing::error!("{name}: quitting the source: {e}");
            }
        } else {
            super::postcopy::source_failed(d, dom);
            info.errmsg = Some(format!(
                "post-copy ended '{status}' while the daemon was down; the source stays paused \
                 and is never resumed; {}",
                super::postcopy::resume_hint(&status)
            ));
        }
        info.notes
            .push("recovered after a daemon restart in post-copy".into());
        dom.end_job(info);
        return false;
    }
    let mut info = from_query_migrate(&q, JobType::Failed, OP);
    let outcome: String = match (status.as_str(), dest_uri) {
        ("setup" | "active" | "pre-switchover" | "device", _) => {
            tracing::warn!("{name}: cancelling the outgoing migration left by the previous daemon");
            let _ = vmm.qmp("migrate_cancel", json!({}));
            if let Some(uri) = dest_uri {
                finish_cancelled(uri, &name);
            }
            "cancelled by the restarted daemon".into()
        }
        ("completed", _) if dest_decides => {
            // The destination confirmed it runs the guest: quit here; tell its daemon.
            if let Some(uri) = dest_uri {
                let r = Connection::open(uri).and_then(|mut c| {
                    c.set_timeout(Some(PEER_CALL_TIMEOUT))?;
                    call_finish(&mut c, &name, false)
                });
                if let Err(e) = r {
                    tracing::warn!("{name}: Finish on the destination: {e}");
                }
            }
            tracing::warn!("{name}: recovered migration: finished on the destination (it confirmed it runs); quitting the source");
            info.job_type = JobType::Completed;
            if let Err(e) = d.quit_domain(dom, "migrated") {
                tracing::error!("{name}: quitting the source: {e}");
            }
            "finished on the destination by the restarted daemon".into()
        }
        ("completed" | "x-tern-unconfirmed", Some(uri)) => {
            let first = Connection::open(uri).and_then(|mut c| {
                c.set_timeout(Some(PEER_CALL_TIMEOUT))?;
                call_finish(&mut c, &name, false)
            });
            match first {
                Ok(()) => {
                    tracing::warn!("{name}: recovered migration: finished on the destination; quitting the source");
                    info.job_type = JobType::Completed;
                    if let Err(e) = d.quit_domain(dom, "migrated") {
                        tracing::error!("{name}: quitting the source: {e}");
                    }
                    "finished on the destination by the restarted daemon".into()
                }
                Err(e @ (Error::Rpc { .. } | Error::Connect { .. })) => {
                    tracing::warn!("{name}: recovered migration ended '{status}' but the destination cannot be asked ({e}): the domain stays paused here; check the destination");
                    format!(
                        "the destination could not be asked ({e}): check it before resuming here"
                    )
                }
                Err(e) => {
                    tracing::warn!("{name}: recovered migration: the destination failed ({e}); resuming the source");
                    confirm_failed(dom, vmm, true);
                    format!("the destination failed ({e}); resumed here")
                }
            }
        }
        (s, uri) => {
            if let Some(uri) = uri {
                finish_cancelled(uri, &name);
            }
            tracing::warn!("{name}: the previous daemon's outgoing migration ended '{s}'");
            format!("ended '{s}' while the daemon was down")
        }
    };
    info.notes
        .push(format!("recovered after a daemon restart: {outcome}"));
    dom.end_job(info);
    false
}
