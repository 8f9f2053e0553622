//! Host-side view of the guest's per-vCPU stats blocks.

use serde::{Deserialize, Serialize};

use crate::layout::{self, stats_off as off};
use crate::{Error, Result, Workload};

/// The `state` field of a stats block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestState {
    /// Options parsed, setting up.
    Booting,
    /// Filling (idle) or zeroing (pattern) the work share.
    Filling,
    /// Running the workload.
    Running,
    /// A Rust panic happened on this vCPU.
    Panicked,
    /// Anything else (raw value).
    Unknown(u64),
}

impl From<u64> for GuestState {
    fn from(v: u64) -> Self {
        match v {
            layout::STATE_BOOTING => GuestState::Booting,
            layout::STATE_FILLING => GuestState::Filling,
            layout::STATE_RUNNING => GuestState::Running,
            layout::STATE_PANICKED => GuestState::Panicked,
            other => GuestState::Unknown(other),
        }
    }
}

/// One vCPU's stats block, decoded (see `layout::stats_off` for the offsets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsBlock {
    pub state: GuestState,
    /// Raw workload id (`layout::WORKLOAD_*`); see [`StatsBlock::workload`].
    pub workload_id: u64,
    pub vcpu: u64,
    pub vcpus: u64,
    pub work_base: u64,
    pub work_len: u64,
    pub pages_written: u64,
    pub passes: u64,
    pub hb_seq: u64,
    pub tsc_khz: u64,
    pub loops: u64,
    pub rate_mib_s: u64,
    pub flags: u64,
}

fn field(b: &[u8], o: u64) -> u64 {
    let o = o as usize;
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(v)
}

impl StatsBlock {
    /// Decodes a stats block from `bytes` (its first byte is the block's first byte).
    /// `gpa` is only used in error messages.
    pub fn parse(bytes: &[u8], gpa: u64) -> Result<StatsBlock> {
        if (bytes.len() as u64) < off::SIZE {
            return Err(Error::TooShort {
                what: "stats block",
                need: off::SIZE,
                have: bytes.len() as u64,
            });
        }
        let magic = field(bytes, off::MAGIC);
        if magic != layout::STATS_MAGIC {
            return Err(Error::BadStatsMagic { gpa, magic });
        }
        Ok(StatsBlock {
            state: field(bytes, off::STATE).into(),
            workload_id: field(bytes, off::WORKLOAD),
            vcpu: field(bytes, off::VCPU),
            vcpus: field(bytes, off::VCPUS),
            work_base: field(bytes, off::WORK_BASE),
            work_len: field(bytes, off::WORK_LEN),
            pages_written: field(bytes, off::PAGES_WRITTEN),
            passes: field(bytes, off::PASSES),
            hb_seq: field(bytes, off::HB_SEQ),
            tsc_khz: field(bytes, off::TSC_KHZ),
            loops: field(bytes, off::LOOPS),
            rate_mib_s: field(bytes, off::RATE),
            flags: field(bytes, off::FLAGS),
        })
    }

    /// Decodes vCPU `vcpu`'s block from a dump of guest RAM that starts at `dump_gpa`.
    pub fn from_dump(dump: &[u8], dump_gpa: u64, vcpu: u32) -> Result<StatsBlock> {
        let gpa = layout::stats_addr(vcpu);
        let start = gpa.checked_sub(dump_gpa).ok_or(Error::OutsideDump {
            gpa,
            len: off::SIZE,
            dump_gpa,
            dump_len: dump.len() as u64,
        })?;
        let slice = usize::try_from(start)
            .ok()
            .and_then(|s| dump.get(s..))
            .unwrap_or(&[]);
        StatsBlock::parse(slice, gpa)
    }

    /// Decodes the blocks of all vCPUs (count taken from vCPU 0's block) from a dump of guest
    /// RAM starting at `dump_gpa`, checking that they agree.
    pub fn all_from_dump(dump: &[u8], dump_gpa: u64) -> Result<Vec<StatsBlock>> {
        let first = StatsBlock::from_dump(dump, dump_gpa, 0)?;
        if first.vcpus == 0 || first.vcpus > layout::MAX_VCPUS as u64 {
            return Err(Error::BadStats(format!("vCPU count {}", first.vcpus)));
        }
        let mut all = vec![first];
        for i in 1..first.vcpus as u32 {
            let b = StatsBlock::from_dump(dump, dump_gpa, i)?;
            if b.vcpus != first.vcpus || b.vcpu != i as u64 {
                return Err(Error::BadStats(format!(
                    "block {i} says vCPU {} of {}, block 0 says {} vCPUs",
                    b.vcpu, b.vcpus, first.vcpus
                )));
            }
            all.push(b);
        }
        Ok(all)
    }

    /// The workload, if the id is known.
    pub fn workload(&self) -> Option<Workload> {
        Workload::from_id(self.workload_id)
    }

    /// True once this vCPU runs its workload.
    pub fn is_running(&self) -> bool {
        self.state == GuestState::Running
    }

    /// The guest was booted through the PVH entry.
    pub fn is_pvh(&self) -> bool {
        self.flags & layout::FLAG_PVH != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn put(b: &mut [u8], o: u64, v: u64) {
        b[o as usize..o as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn parse_fields() {
        let mut b = vec![0u8; layout::STATS_STRIDE as usize];
        assert!(matches!(
            StatsBlock::parse(&b, 0x400000),
            Err(Error::BadStatsMagic { .. })
        ));
        assert!(matches!(
            StatsBlock::parse(&b[..8], 0),
            Err(Error::TooShort { .. })
        ));
        put(&mut b, off::MAGIC, layout::STATS_MAGIC);
        put(&mut b, off::STATE, layout::STATE_RUNNING);
        put(&mut b, off::WORKLOAD, layout::WORKLOAD_PATTERN);
        put(&mut b, off::VCPUS, 2);
        put(&mut b, off::WORK_BASE, layout::WORK_BASE);
        put(&mut b, off::WORK_LEN, 0x10000);
        put(&mut b, off::HB_SEQ, 42);
        put(&mut b, off::FLAGS, layout::FLAG_PVH);
        let s = StatsBlock::parse(&b, 0).unwrap();
        assert!(s.is_running() && s.is_pvh());
        assert_eq!(s.workload(), Some(Workload::Pattern));
        assert_eq!(
            (s.vcpus, s.work_base, s.work_len, s.hb_seq),
            (2, layout::WORK_BASE, 0x10000, 42)
        );
    }
}
