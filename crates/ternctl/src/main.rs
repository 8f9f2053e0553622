//! `ternctl`: the Tern management client, with virsh's command names, options and output.

mod commands;
mod migrate;
mod report;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// The default connection (virsh: `qemu:///system`).
const DEFAULT_URI: &str = "tern:///system";

#[derive(Parser, Debug)]
#[command(
    name = "ternctl",
    version,
    about = "Manage Tern and QEMU VMs through ternd (virsh's commands)"
)]
pub struct Cli {
    /// Connection URI: tern:///system, tern+unix:///system?socket=PATH, tern+tcp://HOST[:PORT]/system
    #[arg(short = 'c', long = "connect", global = true)]
    pub uri: Option<String>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// List domains
    List {
        /// Inactive domains too
        #[arg(long)]
        all: bool,
        /// Only inactive domains
        #[arg(long)]
        inactive: bool,
        /// Names only
        #[arg(long)]
        name: bool,
    },
    /// Define a persistent domain from an XML file
    Define { file: String },
    /// Undefine a domain (a running one becomes transient)
    Undefine { domain: String },
    /// Create and start a transient domain from an XML file
    Create {
        file: String,
        #[arg(long)]
        paused: bool,
    },
    /// Start a defined domain
    Start {
        domain: String,
        #[arg(long)]
        paused: bool,
    },
    /// Shut a domain down (the VMM exits cleanly)
    Shutdown { domain: String },
    /// Stop a domain at once (kill its VMM)
    Destroy { domain: String },
    /// Pause a domain
    Suspend { domain: String },
    /// Resume a paused domain
    Resume { domain: String },
    /// Domain information (including its driver)
    Dominfo { domain: String },
    /// Domain state
    Domstate {
        domain: String,
        #[arg(long)]
        reason: bool,
    },
    /// Domain XML
    Dumpxml {
        domain: String,
        #[arg(long)]
        inactive: bool,
    },
    /// Job statistics
    Domjobinfo {
        domain: String,
        /// The last completed job
        #[arg(long)]
        completed: bool,
        /// libvirt's raw statistics names
        #[arg(long)]
        rawstats: bool,
        /// Accepted for virsh compatibility: keep the completed job's statistics
        #[arg(long)]
        keep_completed: bool,
        /// With --completed: draw the migration (remaining data, bandwidth, dirty rate, passes,
        /// switchover, downtime) into FILE.svg
        #[arg(long, value_name = "FILE.svg", requires = "completed")]
        report: Option<std::path::PathBuf>,
    },
    /// Abort the running job
    Domjobabort {
        domain: String,
        /// Interrupt a migration in post-copy (QMP migrate-pause on the source VMM)
        #[arg(long)]
        postcopy: bool,
    },
    /// Set the maximum tolerable downtime (ms)
    #[command(name = "migrate-setmaxdowntime")]
    MigrateSetmaxdowntime { domain: String, downtime: u64 },
    /// Get the maximum tolerable downtime (ms)
    #[command(name = "migrate-getmaxdowntime")]
    MigrateGetmaxdowntime { domain: String },
    /// Set the maximum migration bandwidth (MiB/s)
    #[command(name = "migrate-setspeed")]
    MigrateSetspeed {
        domain: String,
        bandwidth: u64,
        /// The post-copy phase's bandwidth (max-postcopy-bandwidth)
        #[arg(long)]
        postcopy: bool,
    },
    /// Get the maximum migration bandwidth (MiB/s)
    #[command(name = "migrate-getspeed")]
    MigrateGetspeed {
        domain: String,
        /// The post-copy phase's bandwidth (max-postcopy-bandwidth)
        #[arg(long)]
        postcopy: bool,
    },
    /// Switch a migration started with --postcopy to post-copy
    #[command(name = "migrate-postcopy")]
    MigratePostcopy { domain: String },
    /// Migrate a domain to another host (peer to peer: this daemon talks to the destination's)
    Migrate(migrate::MigrateArgs),
    /// Wait for events
    Event {
        /// Only this domain
        #[arg(long)]
        domain: Option<String>,
        /// Only this event (lifecycle, migration-iteration, job-completed)
        #[arg(long)]
        event: Option<String>,
        /// Every event
        #[arg(long)]
        all: bool,
        /// Keep waiting after the first event
        #[arg(long = "loop")]
        looping: bool,
        /// Give up after this many seconds
        #[arg(long)]
        timeout: Option<u64>,
        /// Print a timestamp before each event
        #[arg(long)]
        timestamp: bool,
    },
    /// Run a raw QMP command on the domain's VMM (virsh's qemu-monitor-command)
    #[command(name = "qemu-monitor-command")]
    QemuMonitorCommand { domain: String, command: String },
}

fn main() {
    let cli = Cli::parse();
    let uri = cli.uri.clone().unwrap_or_else(|| DEFAULT_URI.to_string());
    if let Err(e) = run(&uri, cli.cmd) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(uri: &str, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Migrate(a) => migrate::run(uri, a),
        Cmd::Event {
            domain,
            event,
            all,
            looping,
            timeout,
            timestamp,
        } => commands::event(uri, domain, event, all, looping, timeout, timestamp),
        other => commands::run(uri, other),
    }
}
