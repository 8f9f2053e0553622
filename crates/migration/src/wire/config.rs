//! The CONFIG record: what the destination checks before loading anything (§3 of
//! `docs/stream-format.md`), and the destination's expectations.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::WireError;
use super::format::{put_str8, Cursor, Limits, MAX_PAGE_SIZE, MIN_PAGE_SIZE};

/// One guest RAM block as described in the CONFIG record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamBlockInfo {
    /// Block id, e.g. `"ram0"`.
    pub id: String,
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Size in bytes, a multiple of the page size.
    pub size: u64,
}

impl RamBlockInfo {
    /// Number of pages of `page_size` bytes in the block.
    pub fn pages(&self, page_size: u32) -> u64 {
        self.size / u64::from(page_size.max(1))
    }
}

/// One CPUID leaf the saved vCPU state depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// Leaf (EAX input).
    pub function: u32,
    /// Sub-leaf (ECX input).
    pub index: u32,
    /// Output EAX.
    pub eax: u32,
    /// Output EBX.
    pub ebx: u32,
    /// Output ECX.
    pub ecx: u32,
    /// Output EDX.
    pub edx: u32,
}

/// The CONFIG record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamConfig {
    /// Page size of RAM records (power of two, 4 KiB..=2 MiB).
    pub page_size: u32,
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Guest TSC frequency in kHz.
    pub tsc_khz: u32,
    /// The VM's UUID (checked with `validate-uuid`).
    pub vm_uuid: Uuid,
    /// RAM blocks; RAM records refer to them by index.
    pub ram_blocks: Vec<RamBlockInfo>,
    /// CPUID leaves the vCPU state depends on.
    pub cpuid: Vec<CpuidEntry>,
    /// Opaque machine configuration, checked by the machine.
    pub machine_blob: Vec<u8>,
}

impl StreamConfig {
    /// Pages in block `block`, or `None` when there is no such block.
    pub fn pages_in_block(&self, block: usize) -> Option<u64> {
        self.ram_blocks.get(block).map(|b| b.pages(self.page_size))
    }

    /// Structural checks (used by the writer before encoding and by the reader after decoding).
    /// `offset` is the stream offset reported in errors.
    pub fn validate(&self, limits: &Limits, offset: u64) -> Result<(), WireError> {
        let invalid = |field: &'static str, reason: String| WireError::Invalid {
            field,
            offset,
            reason,
        };
        if !self.page_size.is_power_of_two()
            || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&self.page_size)
        {
            return Err(invalid(
                "page_size",
                format!(
                    "{} is not a power of two in {MIN_PAGE_SIZE}..={MAX_PAGE_SIZE}",
                    self.page_size
                ),
            ));
        }
        if self.vcpu_count == 0 || self.vcpu_count > limits.max_vcpus {
            return Err(invalid(
                "vcpu_count",
                format!("{} not in 1..={}", self.vcpu_count, limits.max_vcpus),
            ));
        }
        if self.ram_blocks.is_empty() || self.ram_blocks.len() > usize::from(limits.max_ram_blocks)
        {
            return Err(invalid(
                "block_count",
                format!(
                    "{} not in 1..={}",
                    self.ram_blocks.len(),
                    limits.max_ram_blocks
                ),
            ));
        }
        if self.cpuid.len() > usize::from(limits.max_cpuid_entries) {
            return Err(invalid(
                "cpuid_count",
                format!(
                    "{} exceeds the limit of {}",
                    self.cpuid.len(),
                    limits.max_cpuid_entries
                ),
            ));
        }
        if self.machine_blob.len() as u64 > u64::from(limits.max_machine_blob) {
            return Err(invalid(
                "machine_blob_len",
                format!(
                    "{} exceeds the limit of {}",
                    self.machine_blob.len(),
                    limits.max_machine_blob
                ),
            ));
        }
        let ps = u64::from(self.page_size);
        let mut ranges: Vec<(u64, u64, usize)> = Vec::with_capacity(self.ram_blocks.len());
        for (i, b) in self.ram_blocks.iter().enumerate() {
            if b.id.is_empty() || b.id.len() > limits.max_string_len {
                return Err(invalid(
                    "block id",
                    format!(
                        "block {i}: id length {} not in 1..={}",
                        b.id.len(),
                        limits.max_string_len
                    ),
                ));
            }
            if b.size == 0 || b.size % ps != 0 || b.gpa % ps != 0 {
                return Err(invalid(
                    "block size",
                    format!(
                        "block '{}': gpa {:#x} size {:#x} must be non-empty and {ps}-byte aligned",
                        b.id, b.gpa, b.size
                    ),
                ));
            }
            if b.size / ps > u64::from(u32::MAX) + 1 {
                return Err(invalid(
                    "block size",
                    format!("block '{}': more than 2^32 pages", b.id),
                ));
            }
            let end = b.gpa.checked_add(b.size).ok_or_else(|| {
                invalid(
                    "block gpa",
                    format!("block '{}': gpa + size overflows", b.id),
                )
            })?;
            if self.ram_blocks[..i].iter().any(|o| o.id == b.id) {
                return Err(invalid(
                    "block id",
                    format!("duplicate block id '{}'", b.id),
                ));
            }
            ranges.push((b.gpa, end, i));
        }
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            if let [a, b] = w {
                if b.0 < a.1 {
                    return Err(invalid(
                        "block gpa",
                        format!(
                            "blocks '{}' and '{}' overlap",
                            self.ram_blocks[a.2].id, self.ram_blocks[b.2].id
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Encodes the CONFIG body.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.machine_blob.len() + self.cpuid.len() * 24);
        out.extend_from_slice(&self.page_size.to_le_bytes());
        out.extend_from_slice(&self.vcpu_count.to_le_bytes());
        out.extend_from_slice(&self.tsc_khz.to_le_bytes());
        out.extend_from_slice(self.vm_uuid.as_bytes());
        out.extend_from_slice(&(self.ram_blocks.len() as u16).to_le_bytes());
        for b in &self.ram_blocks {
            put_str8(&mut out, &b.id);
            out.extend_from_slice(&b.gpa.to_le_bytes());
            out.extend_from_slice(&b.size.to_le_bytes());
        }
        out.extend_from_slice(&(self.cpuid.len() as u16).to_le_bytes());
        for c in &self.cpuid {
            for v in [c.function, c.index, c.eax, c.ebx, c.ecx, c.edx] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out.extend_from_slice(&(self.machine_blob.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.machine_blob);
        out
    }

    /// Decodes and structurally validates a CONFIG body that starts at stream offset `base`.
    pub(crate) fn decode(body: &[u8], base: u64, limits: &Limits) -> Result<Self, WireError> {
        let mut c = Cursor::new(body, base, "config");
        let page_size = c.u32("page_size")?;
        let vcpu_count = c.u32("vcpu_count")?;
        let tsc_khz = c.u32("tsc_khz")?;
        let vm_uuid = Uuid::from_bytes(c.bytes16("vm_uuid")?);
        let at = c.offset();
        let nblocks = c.u16("block_count")?;
        if nblocks == 0 || nblocks > limits.max_ram_blocks {
            return Err(WireError::Invalid {
                field: "block_count",
                offset: at,
                reason: format!("{nblocks} not in 1..={}", limits.max_ram_blocks),
            });
        }
        let mut ram_blocks = Vec::with_capacity(usize::from(nblocks));
        for _ in 0..nblocks {
            let id = c.str8("block id", limits.max_string_len)?.to_owned();
            let gpa = c.u64("block gpa")?;
            let size = c.u64("block size")?;
            ram_blocks.push(RamBlockInfo { id, gpa, size });
        }
        let at = c.offset();
        let ncpuid = c.u16("cpuid_count")?;
        if ncpuid > limits.max_cpuid_entries {
            return Err(WireError::TooLarge {
                what: "cpuid_count",
                len: u64::from(ncpuid),
                limit: u64::from(limits.max_cpuid_entries),
                offset: at,
            });
        }
        let mut cpuid = Vec::with_capacity(usize::from(ncpuid));
        for _ in 0..ncpuid {
            cpuid.push(CpuidEntry {
                function: c.u32("cpuid function")?,
                index: c.u32("cpuid index")?,
                eax: c.u32("cpuid eax")?,
                ebx: c.u32("cpuid ebx")?,
                ecx: c.u32("cpuid ecx")?,
                edx: c.u32("cpuid edx")?,
            });
        }
        let at = c.offset();
        let blob_len = c.u32("machine_blob_len")?;
        if blob_len > limits.max_machine_blob {
            return Err(WireError::TooLarge {
                what: "machine_blob_len",
                len: u64::from(blob_len),
                limit: u64::from(limits.max_machine_blob),
                offset: at,
            });
        }
        let machine_blob = c.take(blob_len as usize, "machine_blob")?.to_vec();
        c.finish()?;
        let cfg = Self {
            page_size,
            vcpu_count,
            tsc_khz,
            vm_uuid,
            ram_blocks,
            cpuid,
            machine_blob,
        };
        cfg.validate(limits, base)?;
        Ok(cfg)
    }
}

/// A component the destination can load, with the versions it accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComponentVersion {
    /// Component id.
    pub id: String,
    /// Oldest version the loader converts from.
    pub min_version: u32,
    /// Newest version the loader understands.
    pub max_version: u32,
}

/// What the destination requires of an incoming stream. `None` fields are not checked
/// (`Expectations::default()` checks nothing beyond structure: used by `analyze`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expectations {
    /// Required page size.
    pub page_size: Option<u32>,
    /// Required vCPU count.
    pub vcpu_count: Option<u32>,
    /// The destination's TSC frequency (`None` or 0: not compared; a source's 0 is not
    /// compared either).
    pub tsc_khz: Option<u32>,
    /// Largest accepted difference between the two TSC frequencies, in kHz.
    pub tsc_tolerance_khz: u32,
    /// The destination can run the guest's TSC at the source's frequency (TSC scaling): any
    /// source frequency is accepted.
    pub tsc_scaling: bool,
    /// Required VM UUID (set when `validate-uuid` is on).
    pub vm_uuid: Option<Uuid>,
    /// Required RAM blocks (same order, id, GPA and size).
    pub ram_blocks: Option<Vec<RamBlockInfo>>,
    /// CPUID leaves of the destination; every source leaf must be present with equal values.
    pub cpuid: Option<Vec<CpuidEntry>>,
    /// Components the destination loads; any other id is an error.
    pub components: Option<Vec<ComponentVersion>>,
}

impl Expectations {
    /// Expect exactly the destination's own configuration `cfg` (everything except the
    /// machine blob, which the machine checks; the TSC with no tolerance and no scaling until
    /// the caller sets them). The UUID is only checked when `validate_uuid` is set.
    pub fn from_config(cfg: &StreamConfig, validate_uuid: bool) -> Self {
        Self {
            page_size: Some(cfg.page_size),
            vcpu_count: Some(cfg.vcpu_count),
            tsc_khz: Some(cfg.tsc_khz),
            tsc_tolerance_khz: 0,
            tsc_scaling: false,
            vm_uuid: validate_uuid.then_some(cfg.vm_uuid),
            ram_blocks: Some(cfg.ram_blocks.clone()),
            cpuid: Some(cfg.cpuid.clone()),
            components: None,
        }
    }

    /// Checks a decoded source configuration against these expectations.
    pub fn check(&self, src: &StreamConfig) -> Result<(), WireError> {
        let mm = |s: String| Err(WireError::ConfigMismatch(s));
        if let Some(ps) = self.page_size {
            if ps != src.page_size {
                return mm(format!(
                    "page size: source {} bytes, destination {ps} bytes",
                    src.page_size
                ));
            }
        }
        if let Some(n) = self.vcpu_count {
            if n != src.vcpu_count {
                return mm(format!(
                    "vCPU count: source {}, destination {n}",
                    src.vcpu_count
                ));
            }
        }
        if let Some(t) = self.tsc_khz.filter(|t| *t != 0) {
            let s = src.tsc_khz;
            if s != 0 && s.abs_diff(t) > self.tsc_tolerance_khz && !self.tsc_scaling {
                return mm(format!(
                    "TSC frequency: source {s} kHz, destination {t} kHz (they differ by more \
                     than {} kHz and the destination cannot scale the guest's TSC)",
                    self.tsc_tolerance_khz
                ));
            }
        }
        if let Some(u) = self.vm_uuid {
            if u != src.vm_uuid {
                return mm(format!(
                    "VM UUID: source {}, destination {u} (validate-uuid)",
                    src.vm_uuid
                ));
            }
        }
        if let Some(blocks) = &self.ram_blocks {
            if blocks.len() != src.ram_blocks.len() {
                return mm(format!(
                    "RAM block count: source {}, destination {}",
                    src.ram_blocks.len(),
                    blocks.len()
                ));
            }
            for (i, (s, d)) in src.ram_blocks.iter().zip(blocks).enumerate() {
                if s != d {
                    return mm(format!(
                        "RAM block {i}: source '{}' gpa {:#x} size {:#x}, destination '{}' gpa {:#x} size {:#x}",
                        s.id, s.gpa, s.size, d.id, d.gpa, d.size
                    ));
                }
            }
        }
        if let Some(dst) = &self.cpuid {
            for s in &src.cpuid {
                let Some(d) = dst
                    .iter()
                    .find(|d| d.function == s.function && d.index == s.index)
                else {
                    return mm(format!(
                        "CPUID leaf {:#x}.{:#x} missing on the destination",
                        s.function, s.index
                    ));
                };
                for (reg, a, b) in [
                    ("eax", s.eax, d.eax),
                    ("ebx", s.ebx, d.ebx),
                    ("ecx", s.ecx, d.ecx),
                    ("edx", s.edx, d.edx),
                ] {
                    if a != b {
                        return mm(format!(
                            "CPUID leaf {:#x}.{:#x} {reg}: source {a:#010x}, destination {b:#010x}",
                            s.function, s.index
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks a component id/version against `components` (no-op when `None`).
    pub(crate) fn check_component(
        &self,
        id: &str,
        instance: u32,
        version: u32,
        offset: u64,
    ) -> Result<(), WireError> {
        let Some(list) = &self.components else {
            return Ok(());
        };
        let Some(c) = list.iter().find(|c| c.id == id) else {
            return Err(WireError::UnknownComponent {
                id: id.to_owned(),
                instance,
                offset,
            });
        };
        if version < c.min_version || version > c.max_version {
            return Err(WireError::UnsupportedComponentVersion {
                id: id.to_owned(),
                version,
                min: c.min_version,
                max: c.max_version,
                offset,
            });
        }
        Ok(())
    }
}
