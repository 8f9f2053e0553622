//! The guest command line, typed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::layout;
use crate::{Error, Result};

/// `workload=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Fill `mem` MiB with compressible data once, then idle.
    #[default]
    Idle,
    /// Write one byte per page over the share at `rate` MiB/s.
    Dirty,
    /// QEMU's migration-test workload: increment the first byte of every page, in order.
    Pattern,
}

impl Workload {
    /// The command-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Idle => "idle",
            Workload::Dirty => "dirty",
            Workload::Pattern => "pattern",
        }
    }

    /// The id the guest stores in its stats block (`layout::WORKLOAD_*`).
    pub fn id(self) -> u64 {
        match self {
            Workload::Idle => layout::WORKLOAD_IDLE,
            Workload::Dirty => layout::WORKLOAD_DIRTY,
            Workload::Pattern => layout::WORKLOAD_PATTERN,
        }
    }

    /// Inverse of [`Workload::id`].
    pub fn from_id(id: u64) -> Option<Workload> {
        match id {
            layout::WORKLOAD_IDLE => Some(Workload::Idle),
            layout::WORKLOAD_DIRTY => Some(Workload::Dirty),
            layout::WORKLOAD_PATTERN => Some(Workload::Pattern),
            _ => None,
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Workload {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "idle" => Ok(Workload::Idle),
            "dirty" => Ok(Workload::Dirty),
            "pattern" => Ok(Workload::Pattern),
            _ => Err(bad("workload", s, "expected idle, dirty or pattern")),
        }
    }
}

/// `order=` (dirty workload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Pages in address order.
    #[default]
    Seq,
    /// Pages picked by a xorshift PRNG.
    Random,
}

impl Order {
    /// The command-line spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Order::Seq => "seq",
            Order::Random => "random",
        }
    }
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Order {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "seq" => Ok(Order::Seq),
            "random" => Ok(Order::Random),
            _ => Err(bad("order", s, "expected seq or random")),
        }
    }
}

/// The guest's options (its command line), see docs/guest.md.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestOptions {
    /// `workload=`, default idle.
    pub workload: Workload,
    /// `mem=`: total working set in MiB, split in equal shares per vCPU. Default 0.
    pub mem_mib: u64,
    /// `rate=`: dirty rate in MiB/s, total over all vCPUs; 0 = as fast as possible. Default 0.
    pub rate_mib_s: u64,
    /// `order=`, default seq.
    pub order: Order,
    /// `hb=`: heartbeat period in ms, 0 = off. Default 1.
    pub hb_ms: u64,
    /// `status=`: status-line period in ms, 0 = off. Default 1000.
    pub status_ms: u64,
    /// `tsc_khz=`: TSC frequency; `None` = the entry's value (Tern: `rcx`), else CPUID, else
    /// measured against the PIT (docs/guest.md "TSC frequency").
    pub tsc_khz: Option<u64>,
}

impl Default for GuestOptions {
    fn default() -> Self {
        GuestOptions {
            workload: Workload::Idle,
            mem_mib: 0,
            rate_mib_s: 0,
            order: Order::Seq,
            hb_ms: 1,
            status_ms: 1000,
            tsc_khz: None,
        }
    }
}

fn bad(key: &str, value: &str, reason: &'static str) -> Error {
    Error::BadValue {
        key: key.to_owned(),
        value: value.to_owned(),
        reason,
    }
}

fn number(key: &str, value: &str) -> Result<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad(key, value, "expected a decimal number"));
    }
    value
        .parse()
        .map_err(|_| bad(key, value, "number too large"))
}

impl GuestOptions {
    /// Parses a command line (space-separated `key=value`). Stricter than the guest: unknown
    /// keys and bad values are errors here (the guest reports and ignores them).
    pub fn parse(cmdline: &str) -> Result<Self> {
        let mut o = GuestOptions::default();
        for tok in cmdline.split_ascii_whitespace() {
            let (key, value) = tok
                .split_once('=')
                .ok_or_else(|| Error::NotKeyValue(tok.to_owned()))?;
            match key {
                "workload" => o.workload = value.parse()?,
                "mem" => {
                    let m = number(key, value)?;
                    if m > layout::MAX_MEM_MIB {
                        return Err(bad(key, value, "larger than layout::MAX_MEM_MIB"));
                    }
                    o.mem_mib = m;
                }
                "rate" => o.rate_mib_s = number(key, value)?,
                "order" => o.order = value.parse()?,
                "hb" => o.hb_ms = number(key, value)?,
                "status" => o.status_ms = number(key, value)?,
                "tsc_khz" => {
                    let v = number(key, value)?;
                    if v == 0 {
                        return Err(bad(key, value, "must not be 0"));
                    }
                    o.tsc_khz = Some(v);
                }
                _ => return Err(Error::UnknownOption(tok.to_owned())),
            }
        }
        Ok(o)
    }

    /// The command line for these options (every option spelled out, so the result does not
    /// depend on the guest's defaults). It always fits in `layout::CMDLINE_MAX`.
    pub fn to_cmdline(&self) -> String {
        let mut s = format!(
            "workload={} mem={} rate={} order={} hb={} status={}",
            self.workload, self.mem_mib, self.rate_mib_s, self.order, self.hb_ms, self.status_ms
        );
        if let Some(k) = self.tsc_khz {
            s.push_str(&format!(" tsc_khz={k}"));
        }
        s
    }

    /// Total working set in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }

    /// vCPU `vcpu`'s work share `(gpa, len)` for these options.
    pub fn work_share(&self, vcpu: u32, vcpus: u32) -> (u64, u64) {
        layout::work_share(vcpu, vcpus, self.mem_bytes())
    }

    /// Smallest guest RAM size (bytes) that holds the layout and the working set.
    pub fn min_ram_bytes(&self) -> u64 {
        layout::WORK_BASE + self.mem_bytes()
    }
}

impl FromStr for GuestOptions {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        GuestOptions::parse(s)
    }
}

impl fmt::Display for GuestOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_cmdline())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_round_trip() {
        let d = GuestOptions::parse("").unwrap();
        assert_eq!(d, GuestOptions::default());
        let o = GuestOptions {
            workload: Workload::Dirty,
            mem_mib: 256,
            rate_mib_s: 100,
            order: Order::Random,
            hb_ms: 5,
            status_ms: 0,
            tsc_khz: Some(2_100_000),
        };
        let line = o.to_cmdline();
        assert_eq!(
            line,
            "workload=dirty mem=256 rate=100 order=random hb=5 status=0 tsc_khz=2100000"
        );
        assert_eq!(GuestOptions::parse(&line).unwrap(), o);
        assert!((line.len() as u64) < layout::CMDLINE_MAX);
        assert_eq!(
            GuestOptions::parse("  workload=pattern\tmem=64  ")
                .unwrap()
                .mem_mib,
            64
        );
    }

    #[test]
    fn errors() {
        assert!(matches!(
            GuestOptions::parse("workload=busy"),
            Err(Error::BadValue { .. })
        ));
        assert!(matches!(
            GuestOptions::parse("mem=-1"),
            Err(Error::BadValue { .. })
        ));
        assert!(matches!(
            GuestOptions::parse("mem=+1"),
            Err(Error::BadValue { .. })
        ));
        assert!(matches!(
            GuestOptions::parse("mem=99999999999999999999999"),
            Err(Error::BadValue { .. })
        ));
        assert!(matches!(
            GuestOptions::parse("mem=65537"),
            Err(Error::BadValue { .. })
        ));
        assert!(matches!(
            GuestOptions::parse("tsc_khz=0"),
            Err(Error::BadValue { .. })
        ));
        assert!(matches!(
            GuestOptions::parse("mem"),
            Err(Error::NotKeyValue(_))
        ));
        assert!(matches!(
            GuestOptions::parse("foo=1"),
            Err(Error::UnknownOption(_))
        ));
    }

    #[test]
    fn serde_names() {
        let o: GuestOptions =
            serde_json::from_str(r#"{"workload":"pattern","mem_mib":64}"#).unwrap();
        assert_eq!(o.workload, Workload::Pattern);
        assert_eq!(o.hb_ms, 1);
    }
}
