//! ACPI tables for the kernel boot paths, built with the `acpi_tables` crate: RSDP, XSDT, FADT
//! (hardware-reduced, reset register = the i8042's port 0x64, value 0xfe), DSDT (COM1 as
//! `PNP0501`: I/O 0x3f8..0x3ff, IRQ 4), MADT (one enabled local APIC per vCPU, APIC ID = index,
//! the IOAPIC at 0xfec00000 with GSI base 0, ISA IRQ 0 → GSI 2). Written from `layout::ACPI_START`
//! (RSDP first: Linux finds it there by scanning 0xe0000..0xfffff, through PVH `rsdp_paddr`, or
//! through `boot_params.acpi_rsdp_addr`).

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use super::layout;
use crate::devices::i8042;
use crate::error::{Error, Result};
use crate::memory::GuestRam;

const OEM_ID: [u8; 6] = *b"TERN  ";
const OEM_TABLE: [u8; 8] = *b"TERNVMM ";
const OEM_REVISION: u32 = 1;
/// The local APIC's MMIO base.
pub const LAPIC_BASE: u32 = 0xfee0_0000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_BASE: u32 = 0xfec0_0000;

/// The tables and where each goes.
#[derive(Debug)]
pub struct AcpiTables {
    /// `(gpa, bytes)` of every table, RSDP first.
    pub tables: Vec<(u64, Vec<u8>)>,
}

impl AcpiTables {
    /// GPA of the RSDP.
    pub fn rsdp(&self) -> u64 {
        layout::ACPI_START
    }

    /// Writes every table into guest RAM.
    pub fn write(&self, ram: &GuestRam) -> Result<()> {
        for (gpa, bytes) in &self.tables {
            ram.write(*gpa, bytes)?;
        }
        Ok(())
    }
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Fixes length and checksum of a table built as raw bytes.
fn finish_table(t: &mut [u8]) {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = 0;
    let sum = t.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    t[9] = 0u8.wrapping_sub(sum);
}

fn dsdt() -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE, OEM_REVISION);
    let hid = aml::EISAName::new("PNP0501");
    let io = aml::IO::new(0x3f8, 0x3f8, 0, 8);
    let irq = aml::Interrupt::new(true, true, false, false, crate::devices::serial::IRQ);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let name_hid = aml::Name::new("_HID".into(), &hid);
    let name_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let name_crs = aml::Name::new("_CRS".into(), &crs);
    let com1 = aml::Device::new("COM1".into(), vec![&name_hid, &name_uid, &name_crs]);
    let sb = aml::Scope::new("\\_SB_".into(), vec![&com1]);
    sb.to_aml_bytes(&mut sdt);
    let mut v = sdt.as_slice().to_vec();
    finish_table(&mut v);
    v
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    f.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(i8042::COMMAND_PORT),
    );
    f.reset_value = i8042::CMD_RESET;
    // "TERNVMM" as the hypervisor vendor identity.
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"TERNVMM\0").into();
    bytes(&f.finalize())
}

fn madt(vcpus: u32) -> Result<Vec<u8>> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_BASE),
    );
    for i in 0..vcpus {
        let id = u8::try_from(i)
            .ok()
            .filter(|&id| id < 0xff)
            .ok_or_else(|| Error::Config(format!("{vcpus} vCPUs: xAPIC IDs end at 254")))?;
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_BASE, 0));
    let mut v = bytes(&m);
    // Flags: PCAT_COMPAT (the in-kernel irqchip has the two 8259s).
    v[40..44].copy_from_slice(&1u32.to_le_bytes());
    // Interrupt source override (type 2, length 10): ISA IRQ 0 (PIT) → GSI 2, conforming.
    v.extend_from_slice(&[2, 10, 0, 0]);
    v.extend_from_slice(&2u32.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes());
    finish_table(&mut v);
    Ok(v)
}

/// Builds the tables for `vcpus` vCPUs.
pub fn build(vcpus: u32) -> Result<AcpiTables> {
    let align = |a: u64| a.next_multiple_of(16);
    let xsdt_at = align(layout::ACPI_START + Rsdp::len() as u64);
    let xsdt_len = 36 + 8 * 2;
    let fadt_at = align(xsdt_at + xsdt_len);
    let dsdt_at = align(fadt_at + 276);
    let dsdt = dsdt();
    let madt_at = align(dsdt_at + dsdt.len() as u64);
    let fadt = fadt(dsdt_at);
    debug_assert!(fadt.len() <= 276);
    let madt = madt(vcpus)?;
    if madt_at + madt.len() as u64 > layout::HIMEM {
        return Err(Error::Config(format!(
            "{vcpus} vCPUs: the ACPI tables do not fit below 1 MiB"
        )));
    }
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt = bytes(&xsdt);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_at));
    Ok(AcpiTables {
        tables: vec![
            (layout::ACPI_START, rsdp),
            (xsdt_at, xsdt),
            (fadt_at, fadt),
            (dsdt_at, dsdt),
            (madt_at, madt),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_are_well_formed_and_madt_lists_every_vcpu() {
        let t = build(2).unwrap();
        let find = |sig: &[u8]| {
            t.tables
                .iter()
                .find(|(_, b)| &b[..sig.len()] == sig)
                .unwrap()
                .clone()
        };
        let (_, rsdp) = find(b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]));
        assert!(checksum_ok(&rsdp));
        let (xsdt_at, xsdt) = find(b"XSDT");
        assert_eq!(
            u64::from_le_bytes(rsdp[24..32].try_into().unwrap()),
            xsdt_at
        );
        for sig in [&b"XSDT"[..], b"FACP", b"DSDT", b"APIC"] {
            let (_, tb) = find(sig);
            assert_eq!(
                u32::from_le_bytes(tb[4..8].try_into().unwrap()) as usize,
                tb.len()
            );
            assert!(checksum_ok(&tb), "{}", String::from_utf8_lossy(sig));
        }
        let (madt_at, madt) = find(b"APIC");
        let (fadt_at, fadt) = find(b"FACP");
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries, vec![fadt_at, madt_at]);
        // FADT: X_DSDT points at the DSDT; hardware-reduced.
        let (dsdt_at, dsdt) = find(b"DSDT");
        assert_eq!(
            u64::from_le_bytes(fadt[140..148].try_into().unwrap()),
            dsdt_at
        );
        assert_ne!(
            u32::from_le_bytes(fadt[112..116].try_into().unwrap()) & (1 << 20),
            0
        );
        // DSDT: COM1 with PNP0501 (EISA id 0x0105d041) and IRQ 4.
        assert!(dsdt.windows(4).any(|w| w == [0x41, 0xd0, 0x05, 0x01]));
        // MADT: two enabled local APICs with IDs 0 and 1, one IOAPIC, one override.
        let mut off = 44;
        let mut lapics = Vec::new();
        let mut ioapics = 0;
        let mut overrides = 0;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            match kind {
                0 => {
                    assert_eq!(madt[off + 4] & 1, 1);
                    lapics.push(madt[off + 3]);
                }
                1 => ioapics += 1,
                2 => overrides += 1,
                _ => panic!("unexpected MADT entry {kind}"),
            }
            off += len;
        }
        assert_eq!(lapics, vec![0, 1]);
        assert_eq!((ioapics, overrides), (1, 1));
    }
}
