//! Command-line interface of the `tern` binary.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tern_guest::{GuestOptions, Order, Workload};

use crate::size::parse_size;

/// Tern: a KVM VMM built for live migration.
#[derive(Debug, Parser)]
#[command(name = "tern", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a VM with the built-in test guest, controlled over a QMP socket.
    Run(RunArgs),
    /// Write the test guest's ELF image (PVH-bootable: `qemu-system-x86_64 -kernel FILE`).
    GuestImage {
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
        /// Write the PVH test guest of the `--kernel` tests instead (tests/guests/pvh_guest.rs;
        /// the benchmark's `boot` suite uses it).
        #[arg(long, hide = true)]
        x_pvh_test: bool,
    },
    /// Check a memory dump of a `pattern` guest (QEMU migration-test rule).
    CheckPattern(CheckPatternArgs),
    /// Print a migration stream (file) as JSON, like QEMU's analyze-migration.py.
    AnalyzeStream {
        /// Stream file (from `migrate {"uri": "file:..."}`).
        file: PathBuf,
    },
    /// Save a running VM to a file (QMP `migrate file:`; the VM stays stopped, like QEMU).
    Snapshot {
        /// QMP socket of the running `tern run`.
        #[arg(long)]
        qmp: PathBuf,
        /// Output file.
        file: PathBuf,
    },
    /// Start a VM from a snapshot file (a `tern run` whose machine shape comes from the file).
    Restore(RestoreArgs),
    /// Boot a test guest and live-migrate it between two tern processes, printing the result.
    Demo(crate::demo::DemoArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum WorkloadArg {
    Idle,
    Dirty,
    Pattern,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BootProtocolArg {
    Auto,
    Pvh,
    Linux,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OrderArg {
    Seq,
    Random,
}

/// `tern run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest RAM (e.g. 512M, 1G).
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub memory: u64,
    /// Number of vCPUs (each runs its own share of the workload).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// QMP control socket (unix socket path).
    #[arg(long)]
    pub qmp: PathBuf,
    /// Serial console: none, stdout, file:PATH or unix:PATH (the VMM listens).
    #[arg(long, default_value = "none")]
    pub serial: String,
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Boot this kernel instead of the test guest: a PVH ELF, a vmlinux or a bzImage
    /// (docs/machine.md "Boot paths"); `--append` is then its command line. On an incoming
    /// machine it is only kept for a later reset (RAM comes from the source).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initrd for `--kernel` (PVH: module 0; Linux: `ramdisk_image`).
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Entry of `--kernel`: auto (PVH when the ELF has the Xen PVH note, as QEMU does), pvh,
    /// or linux (the 64-bit boot protocol).
    #[arg(long, value_enum, default_value = "auto", requires = "kernel")]
    pub boot_protocol: BootProtocolArg,
    /// Wait for an incoming migration: `defer` (then QMP migrate-incoming), or a URI
    /// (tcp:HOST:PORT, unix:PATH, file:PATH).
    #[arg(long)]
    pub incoming: Option<String>,
    /// Do not start the vCPUs (QMP `cont` starts them), like QEMU's -S.
    #[arg(short = 'S', long)]
    pub paused: bool,
    /// VM UUID (default: random).
    #[arg(long)]
    pub uuid: Option<uuid::Uuid>,
    /// Back guest RAM with transparent huge pages (`madvise(MADV_HUGEPAGE)`, as QEMU does);
    /// `--huge-pages false` keeps 4 KiB pages. Host-side only: both ends of a migration may differ.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub huge_pages: bool,
    /// Extra device, e.g. `statedev,size=300M,setup-ms=1400` (a VFIO-like device with pre-copy
    /// initial data, see docs/statedev.md). Source and destination need the same devices.
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// An object, as QEMU's `-object`: `tls-creds-x509,id=tls0,dir=DIR,endpoint=server`,
    /// `authz-simple,id=auth0,identity=CN=host,,O=Org` (`,,` is a comma), or a JSON object
    /// (for `authz-list` rules). The same as QMP `object-add`; see docs/tls.md.
    #[arg(long = "object")]
    pub objects: Vec<String>,
    /// TEST ONLY: `LEAF:SUBLEAF:REG:MASK` (e.g. `0x7:0:ebx:0x20`) XORed into the CPUID this
    /// process describes in a migration, to provoke the CPU compatibility check on one host.
    #[arg(long, hide = true, value_parser = parse_cpuid_xor)]
    pub x_test_only_cpuid_xor: Option<(u32, u32, usize, u32)>,
    /// TEST ONLY: the guest TSC frequency (kHz) this process describes in a migration, as if
    /// its host could not scale the TSC.
    #[arg(long, hide = true)]
    pub x_test_only_tsc_khz: Option<u32>,
    /// TEST ONLY (destination): flips the byte at this guest physical address whenever an
    /// incoming migration writes or zeroes its page (a ZERO entry included), as a placement or
    /// decoding bug would, which the
    /// stream's checksum cannot see and `x-tern-ram-digest` must catch.
    #[arg(long, hide = true, value_parser = parse_u64_auto)]
    pub x_test_only_corrupt_ram: Option<u64>,
}

fn parse_u64_auto(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("'{s}': {e}"))
}

fn parse_cpuid_xor(s: &str) -> Result<(u32, u32, usize, u32), String> {
    let parts: Vec<&str> = s.split(':').collect();
    let [leaf, sub, reg, mask] = parts.as_slice() else {
        return Err(format!("'{s}' is not LEAF:SUBLEAF:REG:MASK"));
    };
    let reg = ["eax", "ebx", "ecx", "edx"]
        .iter()
        .position(|r| r == reg)
        .ok_or_else(|| format!("register '{reg}': expected eax, ebx, ecx or edx"))?;
    let n = |v: &str| u32::try_from(parse_num(v)?).map_err(|_| format!("'{v}' exceeds 32 bits"));
    Ok((n(leaf)?, n(sub)?, reg, n(mask)?))
}

/// Guest workload options, turned into the guest's command line.
#[derive(Debug, Clone, Args)]
pub struct GuestArgs {
    /// Workload: idle (optionally fill --work-mem with data first), dirty, pattern.
    #[arg(long, value_enum, default_value = "idle")]
    pub workload: WorkloadArg,
    /// Working set in MiB (total, split between vCPUs).
    #[arg(long, default_value_t = 0)]
    pub work_mem: u64,
    /// Dirty rate in MiB/s for `dirty` (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Page order for `dirty`.
    #[arg(long, value_enum, default_value = "seq")]
    pub order: OrderArg,
    /// Heartbeat period in ms (0 = off).
    #[arg(long, default_value_t = 1)]
    pub heartbeat_ms: u64,
    /// Status line period in ms (0 = off).
    #[arg(long, default_value_t = 1000)]
    pub status_ms: u64,
    /// Raw guest options appended to the command line (`key=value ...`), overriding the flags;
    /// with `--kernel`, the kernel's whole command line.
    #[arg(long)]
    pub append: Option<String>,
}

impl GuestArgs {
    /// The guest options these flags describe.
    pub fn options(&self) -> Result<GuestOptions, tern_guest::Error> {
        let base = GuestOptions {
            workload: match self.workload {
                WorkloadArg::Idle => Workload::Idle,
                WorkloadArg::Dirty => Workload::Dirty,
                WorkloadArg::Pattern => Workload::Pattern,
            },
            mem_mib: self.work_mem,
            rate_mib_s: self.rate,
            order: match self.order {
                OrderArg::Seq => Order::Seq,
                OrderArg::Random => Order::Random,
            },
            hb_ms: self.heartbeat_ms,
            status_ms: self.status_ms,
            tsc_khz: None,
        };
        match &self.append {
            None => Ok(base),
            Some(extra) => GuestOptions::parse(&format!("{} {extra}", base.to_cmdline())),
        }
    }
}

/// `tern check-pattern`.
#[derive(Debug, Args)]
pub struct CheckPatternArgs {
    /// Memory dump (e.g. from QMP `pmemsave`).
    pub dump: PathBuf,
    /// Guest-physical address of the dump's first byte.
    #[arg(long, default_value_t = 0)]
    pub gpa: u64,
    /// Ranges to check, `GPA:LEN` (hex with 0x or decimal); default: read the per-vCPU ranges
    /// from the guest's stats blocks inside the dump.
    #[arg(long = "range", value_parser = parse_range)]
    pub ranges: Vec<(u64, u64)>,
}

fn parse_num(s: &str) -> Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|_| format!("invalid number '{s}'"))
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s
        .split_once(':')
        .ok_or_else(|| format!("range '{s}' is not GPA:LEN"))?;
    Ok((parse_num(a)?, parse_size(b).or_else(|_| parse_num(b))?))
}

/// `tern restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot file (from `tern snapshot` or `migrate file:`).
    pub file: PathBuf,
    /// QMP control socket.
    #[arg(long)]
    pub qmp: PathBuf,
    /// Serial console: none, stdout, file:PATH or unix:PATH.
    #[arg(long, default_value = "none")]
    pub serial: String,
    /// Stay paused after loading (QMP `cont` runs it).
    #[arg(short = 'S', long)]
    pub paused: bool,
}
