//! `ternd`: the Tern management daemon, one per host (libvirt's `libvirtd`/`virtqemud`).

mod daemon;
mod dispatch;
mod domain;
mod events;
mod fault;
mod migration;
mod runtime;
mod server;
mod vmm;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Parser;

use daemon::{Config, Daemon};

#[derive(Parser, Debug)]
#[command(name = "ternd", version, about = "The Tern management daemon")]
struct Args {
    /// Persistent state: domain definitions (STATE_DIR/domains/NAME.xml)
    #[arg(long, default_value = "/var/lib/tern")]
    state_dir: PathBuf,
    /// Runtime state: the local socket, VMM sockets, pid and status files, VMM logs
    #[arg(long, default_value = "/run/tern")]
    run_dir: PathBuf,
    /// The local API socket (default RUN_DIR/ternd.sock)
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The local socket's file mode (octal): 600 = only this user, 660 = also its group
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
    /// INSECURE: also serve the remote API on plain TCP at ADDR (e.g. 0.0.0.0:16519): no
    /// authentication, no encryption. Use only on a trusted network; --listen-tls is the secure
    /// remote API.
    #[arg(long, value_name = "ADDR")]
    listen_tcp: Option<SocketAddr>,
    /// Serve the remote API over TLS at ADDR (e.g. 0.0.0.0:16524) with mutual
    /// authentication: needs --tls-dir
    #[arg(long, value_name = "ADDR", requires = "tls_dir")]
    listen_tls: Option<SocketAddr>,
    /// This daemon's certificates for --listen-tls (QEMU's tls-creds-x509 layout: ca-cert.pem,
    /// server-cert.pem, server-key.pem; clients must present a certificate from that CA)
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Only clients whose certificate's subject DN matches one of these patterns (`*` and `?`
    /// wildcards, e.g. 'CN=*.example.com,O=Tern'; libvirt's tls_allowed_dn_list) may use the
    /// TLS API (repeatable; default: any certificate from the CA)
    #[arg(long = "tls-allowed-dn", value_name = "PATTERN")]
    tls_allowed_dn: Vec<String>,
    /// The `tern` binary (default: next to this executable)
    #[arg(long)]
    tern: Option<PathBuf>,
    /// The test guest ELF for the qemu driver (default: written by `tern guest-image` into
    /// the run directory at startup)
    #[arg(long)]
    qemu_guest_image: Option<PathBuf>,
    /// Seconds a prepared incoming migration waits for the source's stream before this
    /// (destination) daemon kills its VMM
    #[arg(long, default_value_t = 60)]
    migration_prepare_timeout: u64,
    /// This host's certificates for `migrate --tls` (QEMU's tls-creds-x509 layout: ca-cert.pem,
    /// server-cert.pem, server-key.pem, client-cert.pem, client-key.pem; docs/tls.md)
    #[arg(long, value_name = "DIR")]
    migrate_tls_dir: Option<PathBuf>,
    /// Testing: never offer this migration capability in cookies, as if the VMMs lacked it
    #[arg(long = "x-hide-capability", value_name = "CAP", hide = true)]
    hide_capabilities: Vec<String>,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("'{s}' is not an octal file mode"))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    virt_util::dirs::ensure_dir(&args.run_dir, 0o755)?;
    virt_util::dirs::ensure_dir(&args.run_dir.join("domains"), 0o700)?;
    virt_util::dirs::ensure_dir(&args.state_dir, 0o700)?;
    let tern = match args.tern {
        Some(t) => t,
        None => std::env::current_exe()
            .context("locating ternd")?
            .with_file_name("tern"),
    };
    if !tern.is_file() {
        bail!(
            "the tern binary {} does not exist (give --tern)",
            tern.display()
        );
    }
    let guest_image = match args.qemu_guest_image {
        Some(p) => Some(p),
        None => {
            let p = args.run_dir.join("guest.elf");
            let o = Command::new(&tern)
                .args(["guest-image", "-o"])
                .arg(&p)
                .output()
                .with_context(|| format!("running {} guest-image", tern.display()))?;
            if o.status.success() {
                Some(p)
            } else {
                tracing::warn!(
                    "tern guest-image failed ({}): the qemu driver can only run domains with <kernel>",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
        }
    };
    let drivers: Vec<Box<dyn virt::HypervisorDriver>> = vec![
        Box::new(virt_driver_tern::TernDriver::new(tern)),
        Box::new(virt_driver_qemu::QemuDriver::new(guest_image)),
    ];
    let d = Daemon::new(
        Config {
            state_dir: args.state_dir.clone(),
            run_dir: args.run_dir.clone(),
            hide_capabilities: args.hide_capabilities.clone(),
            prepare_timeout: std::time::Duration::from_secs(args.migration_prepare_timeout),
            migrate_tls_dir: args.migrate_tls_dir.clone(),
        },
        drivers,
    );
    let n = d.load_definitions()?;
    let recovered = vmm::recover(&d);
    tracing::info!(
        "{n} persistent definition(s), {} running domain(s) found again",
        recovered.len()
    );
    let sock = args
        .socket
        .unwrap_or_else(|| args.run_dir.join("ternd.sock"));
    let l = server::listen_unix(&sock, args.socket_mode)?;
    server::serve_unix(d.clone(), l)?;
    if let Some(addr) = args.listen_tcp {
        let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        tracing::warn!(
            "remote API on plain TCP {}: INSECURE (no authentication, no encryption)",
            l.local_addr()?
        );
        server::serve_tcp(d.clone(), l)?;
    }
    if let Some(addr) = args.listen_tls {
        let dir = args
            .tls_dir
            .clone()
            .context("--listen-tls needs --tls-dir")?;
        let creds = tern_tls::x509::X509Creds {
            dir,
            endpoint: tern_tls::x509::TlsEndpoint::Server,
            verify_peer: true,
        };
        let config = creds.server_config().context("--tls-dir")?;
        let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        tracing::info!(
            "remote API over TLS on {} (client certificates required)",
            l.local_addr()?
        );
        let allowed = (!args.tls_allowed_dn.is_empty()).then(|| {
            use tern_tls::authz::{Authz, AuthzFormat, AuthzPolicy, AuthzRule};
            Authz::List {
                policy: AuthzPolicy::Deny,
                rules: args
                    .tls_allowed_dn
                    .iter()
                    .map(|p| AuthzRule {
                        pattern: p.clone(),
                        policy: AuthzPolicy::Allow,
                        format: AuthzFormat::Glob,
                    })
                    .collect(),
            }
        });
        server::serve_tls(d.clone(), l, config, allowed)?;
    }
    // The readiness line (tests and service managers wait for it).
    eprintln!("ternd: ready on {}", sock.display());
    loop {
        std::thread::park();
    }
}
