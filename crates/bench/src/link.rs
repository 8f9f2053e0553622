//! The two links: loopback TCP in the root namespace, and a veth pair between the network
//! namespaces `tern-src` / `tern-dst` shaped with tc tbf (`scripts/netns.sh`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

pub const SRC_NS: &str = "tern-src";
pub const DST_NS: &str = "tern-dst";
pub const DST_ADDR: &str = "10.77.0.2";

/// Where the two VMMs run and how fast the wire between them is.
#[derive(Debug, Clone, Serialize)]
pub struct Link {
    /// `loopback` or `veth-1gbit`.
    pub name: String,
    /// Destination address for `migrate-incoming` / `migrate`.
    pub host: String,
    #[serde(skip)]
    pub src_ns: Option<&'static str>,
    #[serde(skip)]
    pub dst_ns: Option<&'static str>,
    /// Bytes per second used for the wire-limit column.
    pub rate_bytes_s: f64,
    /// How `rate_bytes_s` was obtained.
    pub rate_source: String,
    /// `max-bandwidth` given to both VMMs on this link.
    pub max_bandwidth: u64,
}

/// `max-bandwidth` on loopback: far above what 2 cores move through loopback TCP, so the cap
/// never binds (QEMU's default 128 MiB/s would otherwise dominate the result).
pub const LOOPBACK_MAX_BANDWIDTH: u64 = 10 << 30;

impl Link {
    pub fn loopback(measured: f64) -> Link {
        Link {
            name: "loopback".into(),
            host: "127.0.0.1".into(),
            src_ns: None,
            dst_ns: None,
            rate_bytes_s: measured,
            rate_source: "measured: one TCP stream over 127.0.0.1 for 1.5 s, no VM running".into(),
            max_bandwidth: LOOPBACK_MAX_BANDWIDTH,
        }
    }

    /// Loopback with its rate measured for `secs` ([`measure_loopback`]); 0 (no wire-limit
    /// figures) with a warning when the measurement fails.
    pub fn measured_loopback(secs: f64) -> Link {
        let measured = measure_loopback(secs).unwrap_or_else(|e| {
            tracing::warn!("loopback measurement failed: {e:#}");
            0.0
        });
        Link::loopback(measured)
    }

    /// The shaped veth link; `mbit` is the tbf rate.
    pub fn shaped(mbit: u64) -> Link {
        let bytes = mbit * 1_000_000 / 8;
        Link {
            name: if (mbit / 1000) * 1000 == mbit {
                format!("veth-{}gbit", mbit / 1000)
            } else {
                format!("veth-{mbit}mbit")
            },
            host: DST_ADDR.into(),
            src_ns: Some(SRC_NS),
            dst_ns: Some(DST_NS),
            rate_bytes_s: bytes as f64,
            rate_source: format!("nominal tbf rate {mbit} Mbit/s"),
            max_bandwidth: bytes,
        }
    }
}

/// `scripts/netns.sh up RATE` now, `down` when dropped (also on error paths and panics).
pub struct Netns {
    script: PathBuf,
}

impl Netns {
    pub fn up(repo: &Path, rate: &str) -> anyhow::Result<Netns> {
        let script = repo.join("scripts/netns.sh");
        let st = Command::new(&script)
            .args(["up", rate])
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        let guard = Netns { script };
        if !st.success() {
            bail!("netns.sh up {rate} failed: {st}");
        }
        Ok(guard)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new(&self.script).arg("down").status() {
            Ok(st) if st.success() => tracing::debug!("netns down"),
            other => tracing::warn!("netns.sh down: {other:?}"),
        }
    }
}

/// Throughput of one TCP stream over loopback, bytes/s.
pub fn measure_loopback(secs: f64) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let sink = std::thread::Builder::new().name("tcp-sink".into()).spawn(
        move || -> std::io::Result<u64> {
            let (mut s, _) = listener.accept()?;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                match s.read(&mut buf)? {
                    0 => return Ok(total),
                    n => total += n as u64,
                }
            }
        },
    )?;
    let mut s = TcpStream::connect(addr)?;
    let buf = vec![0x5au8; 1 << 20];
    let t0 = Instant::now();
    let mut sent = 0u64;
    while t0.elapsed() < Duration::from_secs_f64(secs) {
        s.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    drop(s);
    let received = sink
        .join()
        .map_err(|_| anyhow::anyhow!("tcp-sink panicked"))??;
    let el = t0.elapsed().as_secs_f64();
    Ok(received.min(sent) as f64 / el)
}
