//! The domain commands, printed as virsh prints them.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use virt::protocol::{Call, Reply};
use virt::{Connection, DomainSummary};

use crate::Cmd;

/// virsh's table: a header, a dashed line, rows; columns 3 spaces apart, one leading space.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::from(" ");
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{:<width$}   ", c, width = w[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|s| s.to_string()).collect());
    let total: usize = w.iter().sum::<usize>() + 3 * (w.len() - 1) + 2;
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

fn list_text(doms: &[DomainSummary]) -> String {
    let rows: Vec<Vec<String>> = doms
        .iter()
        .map(|d| {
            vec![
                d.id.map_or("-".to_string(), |i| i.to_string()),
                d.name.clone(),
                d.state.as_str().to_string(),
            ]
        })
        .collect();
    table(&["Id", "Name", "State"], &rows)
}

fn expect_unit(r: Reply) -> Result<()> {
    match r {
        Reply::Unit => Ok(()),
        other => bail!("unexpected reply {other:?}"),
    }
}

fn read_file(f: &str) -> Result<String> {
    std::fs::read_to_string(f).with_context(|| format!("Failed to open file '{f}'"))
}

pub fn run(uri: &str, cmd: Cmd) -> Result<()> {
    let mut c = Connection::open(uri)?;
    let mut call = |call: Call| c.call(call).map_err(|e| anyhow!(e));
    match cmd {
        Cmd::List {
            all,
            inactive,
            name,
        } => {
            let Reply::Domains(mut d) = call(Call::ListDomains {
                all: all || inactive,
            })?
            else {
                bail!("unexpected reply");
            };
            if inactive {
                d.retain(|x| !x.state.is_active());
            }
            if name {
                for x in d {
                    println!("{}", x.name);
                }
                println!();
            } else {
                println!("{}", list_text(&d));
            }
        }
        Cmd::Define { file } => {
            let Reply::Name(n) = call(Call::DefineXml {
                xml: read_file(&file)?,
            })?
            else {
                bail!("unexpected reply");
            };
            println!("Domain '{n}' defined from {file}\n");
        }
        Cmd::Undefine { domain } => {
            expect_unit(call(Call::Undefine {
                domain: domain.clone(),
            })?)?;
            println!("Domain '{domain}' has been undefined\n");
        }
        Cmd::Create { file, paused } => {
            let Reply::Name(n) = call(Call::CreateXml {
                xml: read_file(&file)?,
                paused,
            })?
            else {
                bail!("unexpected reply");
            };
            println!("Domain '{n}' created from {file}\n");
        }
        Cmd::Start { domain, paused } => {
            expect_unit(call(Call::Start {
                domain: domain.clone(),
                paused,
            })?)?;
            println!("Domain '{domain}' started\n");
        }
        Cmd::Shutdown { domain } => {
            expect_unit(call(Call::Shutdown {
                domain: domain.clone(),
            })?)?;
            println!("Domain '{domain}' is being shutdown\n");
        }
        Cmd::Destroy { domain } => {
            expect_unit(call(Call::Destroy {
                domain: domain.clone(),
            })?)?;
            println!("Domain '{domain}' destroyed\n");
        }
        Cmd::Suspend { domain } => {
            expect_unit(call(Call::Suspend {
                domain: domain.clone(),
            })?)?;
            println!("Domain '{domain}' suspended\n");
        }
        Cmd::Resume { domain } => {
            expect_unit(call(Call::Resume {
                domain: domain.clone(),
            })?)?;
            println!("Domain '{domain}' resumed\n");
        }
        Cmd::Dominfo { domain } => {
            let Reply::Info(i) = call(Call::DomInfo { domain })? else {
                bail!("unexpected reply");
            };
            let l = |k: &str, v: String| println!("{:<15} {v}", format!("{k}:"));
            l("Id", i.id.map_or("-".into(), |x| x.to_string()));
            l("Name", i.name.clone());
            l("UUID", i.uuid.clone());
            l("OS Type", "hvm".into());
            l("State", i.state.as_str().into());
            l("CPU(s)", i.vcpus.to_string());
            l("Max memory", format!("{} KiB", i.max_memory_kib));
            l("Used memory", format!("{} KiB", i.used_memory_kib));
            l("Persistent", if i.persistent { "yes" } else { "no" }.into());
            l("Autostart", "disable".into());
            l("Managed save", "no".into());
            l("Security model", "none".into());
            l("Security DOI", "0".into());
            l("Driver", i.driver.clone());
            l("Emulator", i.emulator.clone());
            if let Some(p) = i.pid {
                l("Pid", p.to_string());
            }
            println!();
        }
        Cmd::Domstate { domain, reason } => {
            let Reply::State { state, reason: r } = call(Call::DomState { domain })? else {
                bail!("unexpected reply");
            };
            if reason {
                println!("{} ({r})\n", state.as_str());
            } else {
                println!("{}\n", state.as_str());
            }
        }
        Cmd::Dumpxml { domain, inactive } => {
            let Reply::Xml(x) = call(Call::DumpXml { domain, inactive })? else {
                bail!("unexpected reply");
            };
            print!("{x}");
        }
        Cmd::Domjobinfo {
            domain,
            completed,
            rawstats,
            keep_completed: _,
            report,
        } => {
            let Reply::Job(j) = call(Call::JobInfo {
                domain: domain.clone(),
                completed,
            })?
            else {
                bail!("unexpected reply");
            };
            if let Some(path) = report {
                crate::report::write_svg(&domain, &j, &path)?;
            }
            if rawstats {
                println!("{}", j.to_raw_text());
            } else {
                println!("{}", j.to_virsh_text());
            }
        }
        Cmd::Domjobabort { domain, postcopy } => {
            expect_unit(call(Call::JobAbort { domain, postcopy })?)?;
        }
        Cmd::MigratePostcopy { domain } => {
            expect_unit(call(Call::MigrateStartPostcopy { domain })?)?;
        }
        Cmd::MigrateSetmaxdowntime { domain, downtime } => {
            expect_unit(call(Call::SetMaxDowntime {
                domain,
                ms: downtime,
            })?)?;
        }
        Cmd::MigrateGetmaxdowntime { domain } => {
            let Reply::Number(n) = call(Call::GetMaxDowntime { domain })? else {
                bail!("unexpected reply");
            };
            println!("{n}\n");
        }
        Cmd::MigrateSetspeed {
            domain,
            bandwidth,
            postcopy,
        } => {
            expect_unit(call(Call::SetMaxSpeed {
                domain,
                mib_s: bandwidth,
                postcopy,
            })?)?;
        }
        Cmd::MigrateGetspeed { domain, postcopy } => {
            let Reply::Number(n) = call(Call::GetMaxSpeed { domain, postcopy })? else {
                bail!("unexpected reply");
            };
            println!("{n}\n");
        }
        Cmd::QemuMonitorCommand { domain, command } => {
            let Reply::Text(t) = call(Call::MonitorCommand { domain, command })? else {
                bail!("unexpected reply");
            };
            println!("{t}");
        }
        Cmd::Migrate(_) | Cmd::Event { .. } => {
            bail!("handled in main")
        }
    }
    Ok(())
}

/// `event [--domain D] [--event NAME] [--all] [--loop] [--timeout S] [--timestamp]`.
pub fn event(
    uri: &str,
    domain: Option<String>,
    event: Option<String>,
    all: bool,
    looping: bool,
    timeout: Option<u64>,
    timestamp: bool,
) -> Result<()> {
    const NAMES: [&str; 3] = ["lifecycle", "migration-iteration", "job-completed"];
    match (&event, all) {
        (None, false) => bail!("one of --event or --all is required"),
        (Some(e), _) if !NAMES.contains(&e.as_str()) => {
            bail!("unknown event type '{e}' (known: {})", NAMES.join(", "))
        }
        _ => {}
    }
    let mut s = Connection::open(uri)?.events(domain)?;
    let deadline = timeout.map(|t| Instant::now() + Duration::from_secs(t));
    let mut count = 0u64;
    loop {
        let left = match deadline {
            Some(d) => {
                let l = d.saturating_duration_since(Instant::now());
                if l.is_zero() {
                    println!("event loop timed out");
                    break;
                }
                Some(l)
            }
            None => None,
        };
        let Some(ev) = s.next(left)? else {
            continue;
        };
        if event.as_deref().is_some_and(|e| e != ev.name()) {
            continue;
        }
        if timestamp {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            print!("{}.{:03}: ", now.as_secs(), now.subsec_millis());
        }
        println!("{}", ev.to_virsh_line());
        use std::io::Write;
        let _ = std::io::stdout().flush();
        count += 1;
        if !looping {
            break;
        }
    }
    println!("events received: {count}\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use virt::DomainState;

    #[test]
    fn list_like_virsh() {
        let t = list_text(&[
            DomainSummary {
                id: Some(1),
                name: "vm1".into(),
                state: DomainState::Running,
            },
            DomainSummary {
                id: None,
                name: "other".into(),
                state: DomainState::Shutoff,
            },
        ]);
        assert_eq!(
            t,
            " Id   Name    State\n-----------------------\n 1    vm1     running\n -    other   shut off\n"
        );
    }
}
