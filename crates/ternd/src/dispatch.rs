//! Procedure calls → daemon operations.

use std::net::IpAddr;
use std::sync::Arc;

use virt::protocol::{Call, Reply};
use virt::{Error, Result};

use crate::daemon::Daemon;
use crate::migration::{dest, jobs, postcopy, resume_dest, source};

pub fn dispatch(d: &Arc<Daemon>, call: Call, local_ip: Option<IpAddr>) -> Result<Reply> {
    Ok(match call {
        Call::Ping => Reply::Pong {
            host: d.hostname.clone(),
        },
        Call::ListDomains { all } => Reply::Domains(d.list(all)),
        Call::DefineXml { xml } => Reply::Name(d.define(&xml)?),
        Call::Undefine { domain } => {
            d.undefine(&domain)?;
            Reply::Unit
        }
        Call::CreateXml { xml, paused } => Reply::Name(d.create(&xml, paused)?),
        Call::Start { domain, paused } => {
            d.start(&domain, paused)?;
            Reply::Unit
        }
        Call::Shutdown { domain } => {
            d.shutdown(&domain)?;
            Reply::Unit
        }
        Call::Destroy { domain } => {
            d.destroy(&domain)?;
            Reply::Unit
        }
        Call::Suspend { domain } => {
            d.suspend(&domain)?;
            Reply::Unit
        }
        Call::Resume { domain } => {
            d.resume(&domain)?;
            Reply::Unit
        }
        Call::DomInfo { domain } => Reply::Info(Box::new(d.info(&domain)?)),
        Call::DomState { domain } => {
            let i = d.info(&domain)?;
            Reply::State {
                state: i.state,
                reason: i.reason,
            }
        }
        Call::DumpXml { domain, inactive } => Reply::Xml(d.dumpxml(&domain, inactive)?),
        Call::JobInfo { domain, completed } => {
            Reply::Job(Box::new(jobs::job_info(d, &domain, completed)?))
        }
        Call::JobAbort { domain, postcopy } => {
            jobs::abort(d, &domain, postcopy)?;
            Reply::Unit
        }
        Call::MigrateStartPostcopy { domain } => {
            postcopy::start(d, &domain)?;
            Reply::Unit
        }
        Call::SetMaxDowntime { domain, ms } => {
            jobs::set_max_downtime(d, &domain, ms)?;
            Reply::Unit
        }
        Call::GetMaxDowntime { domain } => Reply::Number(jobs::get_max_downtime(d, &domain)?),
        Call::SetMaxSpeed {
            domain,
            mib_s,
            postcopy,
        } => {
            jobs::set_max_speed(d, &domain, mib_s, postcopy)?;
            Reply::Unit
        }
        Call::GetMaxSpeed { domain, postcopy } => {
            Reply::Number(jobs::get_max_speed(d, &domain, postcopy)?)
        }
        Call::Migrate {
            domain,
            dest_uri,
            options,
        } => {
            source::migrate(d, &domain, &dest_uri, &options)?;
            Reply::Unit
        }
        Call::MonitorCommand { domain, command } => {
            Reply::Text(d.monitor_command(&domain, &command)?)
        }
        Call::EventRegister { .. } | Call::MigrateTunnel { .. } => {
            return Err(Error::Internal(
                "EventRegister and MigrateTunnel are handled by the server".into(),
            ))
        }
        Call::MigratePrepare {
            xml,
            cookie,
            options,
        } => Reply::Cookie(dest::prepare(d, &xml, &cookie, &options, local_ip)?),
        Call::MigratePrepareResume {
            domain,
            cookie,
            options,
        } => Reply::Cookie(resume_dest::prepare(
            d, &domain, &cookie, &options, local_ip,
        )?),
        Call::MigrateFinish { domain, cancelled } => {
            dest::finish(d, &domain, cancelled)?;
            Reply::Unit
        }
    })
}
