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
    #[arg(long)]
    pub postcopy: bool,
    #[arg(long, visible_alias = "postcopy-after")]
    pub postcopy_after_precopy: bool,
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
    #[arg(long)]
    pub comp_methods: Option<String>,
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
        if self.timeout_postcopy {
            bail!("--timeout-postcopy: needs post-copy migration (issue 9), which is not available yet");
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
            auto_converge: self.auto_converge,
            parallel: self.parallel,
            parallel_connections: self.parallel_connections,
            compressed: self.compressed,
            comp_methods: self.comp_methods.clone(),
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
    let watcher = if a.verbose || a.timeout.is_some() {
        let (uri, dom, done, verbose, timeout) = (
            uri.to_string(),
            a.domain.clone(),
            done.clone(),
            a.verbose,
            a.timeout.map(Duration::from_secs),
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

/// Progress and the timeout action, from the job statistics on a second connection.
fn watch(uri: &str, dom: &str, done: &AtomicBool, verbose: bool, timeout: Option<Duration>) {
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
        if let Some(t) = timeout {
            if !timed_out && started.elapsed() >= t {
                timed_out = true;
                match c.call(Call::Suspend {
                    domain: dom.to_string(),
                }) {
                    Ok(_) => eprintln!(
                        "migrate: timeout: domain '{dom}' suspended to let the migration finish"
                    ),
                    Err(e) => eprintln!("migrate: timeout: suspending '{dom}' failed: {e}"),
                }
            }
        }
        std::thread::sleep(PROGRESS_PERIOD);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}
