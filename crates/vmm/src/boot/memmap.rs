//! The guest memory map of the kernel boot paths (E820 types), for both `boot_params.e820_table`
//! and the PVH memory map.

use super::layout;
use crate::memory::RamRegionInfo;

/// Usable RAM.
pub const E820_RAM: u32 = 1;
/// Reserved.
pub const E820_RESERVED: u32 = 2;

/// One entry: GPA, length, E820 type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemEntry {
    /// Start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type.
    pub kind: u32,
}

/// RAM below the EBDA, the EBDA and the BIOS area with the ACPI tables reserved, RAM from 1 MiB
/// to the end of the low region, then every other region as RAM.
pub fn memory_map(regions: &[RamRegionInfo]) -> Vec<MemEntry> {
    let mut out = Vec::new();
    for r in regions {
        let end = r.gpa + r.size;
        if r.gpa == 0 {
            out.push(MemEntry {
                addr: 0,
                size: layout::EBDA_START,
                kind: E820_RAM,
            });
            out.push(MemEntry {
                addr: layout::EBDA_START,
                size: layout::LEGACY_HOLE - layout::EBDA_START,
                kind: E820_RESERVED,
            });
            out.push(MemEntry {
                addr: layout::ACPI_START,
                size: layout::HIMEM - layout::ACPI_START,
                kind: E820_RESERVED,
            });
            if end > layout::HIMEM {
                out.push(MemEntry {
                    addr: layout::HIMEM,
                    size: end - layout::HIMEM,
                    kind: E820_RAM,
                });
            }
        } else {
            out.push(MemEntry {
                addr: r.gpa,
                size: r.size,
                kind: E820_RAM,
            });
        }
    }
    out
}

/// The end of RAM below 4 GiB (where an initrd may go).
pub fn low_ram_end(regions: &[RamRegionInfo]) -> u64 {
    regions
        .iter()
        .find(|r| r.gpa == 0)
        .map_or(0, |r| r.gpa + r.size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_reserves_ebda_and_bios_area_and_keeps_high_ram() {
        let regions = [
            RamRegionInfo {
                id: 0,
                gpa: 0,
                size: 0xc000_0000,
                host_addr: 0,
            },
            RamRegionInfo {
                id: 1,
                gpa: 1 << 32,
                size: 1 << 30,
                host_addr: 0,
            },
        ];
        let m = memory_map(&regions);
        assert_eq!(m.len(), 5);
        assert_eq!(
            m[0],
            MemEntry {
                addr: 0,
                size: 0x9fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(m[2].addr, 0xe0000);
        assert_eq!(m[2].kind, E820_RESERVED);
        assert_eq!(
            m[3],
            MemEntry {
                addr: 0x100000,
                size: 0xc000_0000 - 0x100000,
                kind: E820_RAM
            }
        );
        assert_eq!(
            m[4],
            MemEntry {
                addr: 1 << 32,
                size: 1 << 30,
                kind: E820_RAM
            }
        );
        assert_eq!(low_ram_end(&regions), 0xc000_0000);
    }
}
