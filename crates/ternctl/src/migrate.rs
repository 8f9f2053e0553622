//! `migrate`: virsh's options; the source daemon drives the migration (peer to peer), this
//! client shows progress (`--verbose`, from `domjobinfo` on a second connection as virsh
//! does) and applies `--timeout` (virsh's client-side action: suspend the domain).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use virt::protocol::{Call, Reply};
use virt::{Connection, JobType, MigrateOptions};

/// How often `--verbose` and `--timeout` look at the job (virsh: 50 ms to 500 ms).
const PROGRESS_PERIOD: Duration = Duration::from_millis(200);

#[derive(Args, Debug)]
pub struct MigrateArgs {
    pub domain: String,
    /// The destination daemon's URI (tern+tcp://HOST/system)
    pub desturi: String,
    /// Accepted for virsh compatibility (the migration URI comes from the destination)
    pub migrateuri: Option<String>,
    #[arg(long)]
    pub live: bool,
    #[arg(long)]
    pub offline: bool,
    /// Peer to peer (the only mode: the source daemon always talks to the destination's)
    #[arg(long)]
    pub p2p: bool,
    #[arg(long)]
    pub direct: bool,
    #[arg(long)]
    pub tunnelled: bool,
    #[arg(long)]
    pub persistent: bool,
    #[arg(long)]
    pub undefinesource: bool,
    /// Leave the domain paused on the destination
    #[arg(long)]
    pub suspend: bool,
    /// Enable post-copy: the migration starts in pre-copy; migrate-postcopy switches
    #[arg(long)]
    pub postcopy: bool,
    /// Switch to post-copy after the first pre-copy pass (with --postcopy)
    #[arg(long, visible_alias = "postcopy-after")]
    pub postcopy_after_precopy: bool,
    /// Resume a post-copy migration that failed after the switch (with --postcopy)
    #[arg(long)]
    pub postcopy_resume: bool,
    /// MiB/s for the post-copy phase's background push (max-postcopy-bandwidth)
    #[arg(long)]
    pub postcopy_bandwidth: Option<u64>,
    /// Seconds before the timeout action
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Timeout action: suspend the domain (the default)
    #[arg(long)]
    pub timeout_suspend: bool,
    /// Timeout action: switch to post-copy
    #[arg(long)]
    pub timeout_postcopy: bool,
    /// MiB/s
    #[arg(long)]
    pub bandwidth: Option<u64>,
    /// MiB/s the link can carry at the switchover (the VMM's avail-switchover-bandwidth)
    #[arg(long)]
    pub available_switchover_bandwidth: Option<u64>,
    #[arg(long)]
    pub auto_converge: bool,
    #[arg(long)]
    pub parallel: bool,
    #[arg(long)]
    pub parallel_connections: Option<u32>,
    #[arg(long)]
    pub compressed: bool,
    /// zstd or zlib (with --parallel: the VMMs' multifd-compression)
    #[arg(long)]
    pub comp_methods: Option<String>,
    /// 0..=9: multifd-zlib-level
    #[arg(long)]
    pub comp_zlib_level: Option<u8>,
    /// 0..=20: multifd-zstd-level
    #[arg(long)]
    pub comp_zstd_level: Option<u8>,
    #[arg(long)]
    pub tls: bool,
    /// Progress bar with percentage and ETA
    #[arg(long)]
    pub verbose: bool,
    #[arg(long)]
    pub abort_on_error: bool,
}

impl MigrateArgs {
    fn options(&self) -> Result<MigrateOptions> {
        if self.direct {
            bail!("--direct: Tern has no hypervisor-native direct migration; use --p2p");
        }
        if self.postcopy_resume && self.timeout.is_some() {
            bail!("--postcopy-resume cannot be used with --timeout (the resumed migration is already in post-copy: there is nothing to suspend or switch)");
        }
        if self.timeout_postcopy && !self.postcopy {
            bail!("--timeout-postcopy requires --postcopy");
        }
        if self.timeout_suspend && self.timeout_postcopy {
            bail!("--timeout-suspend and --timeout-postcopy are mutually exclusive");
        }
        if (self.timeout_suspend || self.timeout_postcopy) && self.timeout.is_none() {
            bail!("--timeout-suspend / --timeout-postcopy need --timeout");
        }
        if self.timeout == Some(0) {
            bail!("--timeout must be at least 1 second");
        }
        let o = MigrateOptions {
            live: self.live,
            offline: self.offline,
            p2p: self.p2p,
            tunnelled: self.tunnelled,
            persistent: self.persistent,
            undefine_source: self.undefinesource,
            suspend: self.suspend,
            abort_on_error: self.abort_on_error,
            bandwidth_mib_s: self.bandwidth,
            postcopy: self.postcopy,
            postcopy_after_precopy: self.postcopy_after_precopy,
            postcopy_bandwidth: self.postcopy_bandwidth,
            postcopy_resume: self.postcopy_resume,
            auto_converge: self.auto_converge,
            parallel: self.parallel,
            parallel_connections: self.parallel_connections,
            compressed: self.compressed,
            comp_methods: self.comp_methods.clone(),
            comp_zlib_level: self.comp_zlib_level,
            comp_zstd_level: self.comp_zstd_level,
            tls: self.tls,
            available_switchover_bandwidth: self.available_switchover_bandwidth,
        };
        o.check_supported().map_err(|e| anyhow!(e))?;
        Ok(o)
    }
}

pub fn run(uri: &str, a: MigrateArgs) -> Result<()> {
    let options = a.options()?;
    let mut c = Connection::open(uri)?;
    let done = Arc::new(AtomicBool::new(false));
    // virsh's --postcopy-after-precopy: listen before the migration starts, switch on the
    // second iteration (the first pass is over). The thread is left behind at the end.
    if a.postcopy_after_precopy {
        let events = Connection::open(uri)?.events(Some(a.domain.clone()))?;
        let (uri, dom, done) = (uri.to_string(), a.domain.clone(), done.clone());
        std::thread::Builder::new()
            .name("postcopy-after".into())
            .spawn(move || switch_after_first_pass(events, &uri, &dom, &done))?;
    }
    let watcher = if a.verbose || a.timeout.is_some() {
        let action = if a.timeout_postcopy {
            TimeoutAction::Postcopy
        } else {
            TimeoutAction::Suspend
        };
        let (uri, dom, done, verbose, timeout) = (
            uri.to_string(),
            a.domain.clone(),
            done.clone(),
            a.verbose,
            a.timeout.map(|t| (Duration::from_secs(t), action)),
        );
        Some(
            std::thread::Builder::new()
                .name("progress".into())
                .spawn(move || watch(&uri, &dom, &done, verbose, timeout))?,
        )
    } else {
        None
    };
    let r = c.call(Call::Migrate {
        domain: a.domain.clone(),
        dest_uri: a.desturi.clone(),
        options,
    });
    done.store(true, Ordering::SeqCst);
    if let Some(w) = watcher {
        let _ = w.join();
    }
    match r {
        Ok(Reply::Unit) => {
            if a.verbose {
                eprintln!("Migration: [100 %]");
            }
            Ok(())
        }
        Ok(other) => bail!("unexpected reply {other:?}"),
        Err(e) => Err(anyhow!(e)),
    }
}

/// What `--timeout` does (virsh: `--timeout-suspend`, the default, or `--timeout-postcopy`).
#[derive(Debug, Clone, Copy)]
enum TimeoutAction {
    Suspend,
    Postcopy,
}

/// `migrate-postcopy` on a connection of its own.
fn start_postcopy(uri: &str, dom: &str) -> virt::Result<Reply> {
    Connection::open(uri)?.call(Call::MigrateStartPostcopy {
        domain: dom.to_string(),
    })
}

/// `--postcopy-after-precopy`: on the `migration-iteration` event for pass 2 (the first
/// pass is over), `migrate-postcopy`, once.
fn switch_after_first_pass(mut events: virt::EventStream, uri: &str, dom: &str, done: &AtomicBool) {
    while !done.load(Ordering::SeqCst) {
        match events.next(None) {
            Ok(Some(virt::DomainEvent::MigrationIteration { iteration, .. })) if iteration >= 2 => {
                match start_postcopy(uri, dom) {
                    Ok(_) => eprintln!("migrate: first pass over: switched '{dom}' to post-copy"),
                    Err(e) => eprintln!("migrate: switching '{dom}' to post-copy failed: {e}"),
                }
                return;
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// Progress and the timeout action, from the job statistics on a second connection.
fn watch(
    uri: &str,
    dom: &str,
    done: &AtomicBool,
    verbose: bool,
    timeout: Option<(Duration, TimeoutAction)>,
) {
    let Ok(mut c) = Connection::open(uri) else {
        return;
    };
    let bar = verbose.then(|| {
        let b = ProgressBar::new(100);
        b.set_style(
            ProgressStyle::with_template("Migration: [{percent:>3} %] [{bar:30}] ETA {eta} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    });
    let started = Instant::now();
    let mut timed_out = false;
    while !done.load(Ordering::SeqCst) {
        if let Ok(Reply::Job(j)) = c.call(Call::JobInfo {
            domain: dom.to_string(),
            completed: false,
        }) {
            if let (Some(b), JobType::Unbounded) = (&bar, j.job_type) {
                if let (Some(total), Some(rem)) = (j.data_total, j.data_remaining) {
                    if let Some(left) = (rem.min(total) * 100).checked_div(total) {
                        b.set_position(100 - left);
                    }
                }
                b.set_message(j.phase.clone().unwrap_or_default());
            }
        }
        if let Some((t, action)) = timeout {
            if !timed_out && started.elapsed() >= t {
                timed_out = true;
                match action {
                    TimeoutAction::Suspend => match c.call(Call::Suspend {
                        domain: dom.to_string(),
                    }) {
                        Ok(_) => eprintln!(
                            "migrate: timeout: domain '{dom}' suspended to let the migration finish"
                        ),
                        Err(e) => eprintln!("migrate: timeout: suspending '{dom}' failed: {e}"),
                    },
                    TimeoutAction::Postcopy => match start_postcopy(uri, dom) {
                        Ok(_) => eprintln!("migrate: timeout: switched '{dom}' to post-copy"),
                        Err(e) => {
                            eprintln!(
                                "migrate: timeout: switching '{dom}' to post-copy failed: {e}"
                            )
                        }
                    },
                }
            }
        }
        std::thread::sleep(PROGRESS_PERIOD);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}
