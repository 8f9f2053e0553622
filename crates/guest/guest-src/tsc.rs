//! Where the guest's TSC frequency comes from when neither `tsc_khz=` nor the VMM (`rcx`) gives
//! it: CPUID (leaf 0x15, the hypervisor's leaf 0x40000010, leaf 0x16), else a one-time
//! measurement of the TSC against the PIT (channel 2, gated and read through port 0x61, all from
//! CPL 3 with IOPL 3). See docs/guest.md "TSC frequency".

use crate::arch::{cpuid, inb, outb, rdtsc};

/// Where the TSC frequency came from: the banner's `tsc_src=`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `tsc_khz=` on the command line.
    Cmdline,
    /// The VMM, in `rcx` at the Tern direct entry.
    Vmm,
    /// CPUID leaf 0x15: crystal clock × TSC/crystal ratio.
    Cpuid15,
    /// CPUID leaf 0x40000010 (the hypervisor's TSC kHz).
    Hypervisor,
    /// CPUID leaf 0x16: processor base MHz.
    Cpuid16,
    /// Measured against the PIT.
    Pit,
    /// Nothing worked: [`crate::DEFAULT_TSC_KHZ`].
    Default,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Cmdline => "cmdline",
            Source::Vmm => "vmm",
            Source::Cpuid15 => "cpuid15",
            Source::Hypervisor => "hypervisor",
            Source::Cpuid16 => "cpuid16",
            Source::Pit => "pit",
            Source::Default => "default",
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Source {
        match code {
            0 => Source::Cmdline,
            1 => Source::Vmm,
            2 => Source::Cpuid15,
            3 => Source::Hypervisor,
            4 => Source::Cpuid16,
            5 => Source::Pit,
            _ => Source::Default,
        }
    }
}

/// Rates outside this range (kHz) are taken for garbage.
const MIN_KHZ: u64 = 100_000;
const MAX_KHZ: u64 = 20_000_000;

fn plausible(khz: u64) -> Option<u64> {
    (MIN_KHZ..=MAX_KHZ).contains(&khz).then_some(khz)
}

/// The TSC rate CPUID reports, if any: leaf 0x15 (exact), the hypervisor leaf 0x40000010
/// (exact), leaf 0x16 (base MHz, rounded). AMD CPUs report none of them, nor does KVM's leaf
/// unless the VMM exposes it (QEMU: only with an invariant TSC, which blocks its migration).
pub fn from_cpuid() -> Option<(u64, Source)> {
    let (max, _, _, _) = cpuid(0, 0);
    if max >= 0x15 {
        let (den, num, crystal_hz, _) = cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal_hz != 0 {
            if let Some(k) = plausible(crystal_hz as u64 * num as u64 / den as u64 / 1000) {
                return Some((k, Source::Cpuid15));
            }
        }
    }
    let (_, _, features, _) = cpuid(1, 0);
    if features & (1 << 31) != 0 {
        let (max_hv, _, _, _) = cpuid(0x4000_0000, 0);
        if (0x4000_0010..0x4001_0000).contains(&max_hv) {
            let (khz, _, _, _) = cpuid(0x4000_0010, 0);
            if let Some(k) = plausible(khz as u64) {
                return Some((k, Source::Hypervisor));
            }
        }
    }
    if max >= 0x16 {
        let (base_mhz, _, _, _) = cpuid(0x16, 0);
        if let Some(k) = plausible((base_mhz & 0xffff) as u64 * 1000) {
            return Some((k, Source::Cpuid16));
        }
    }
    None
}

/// PIT input clock, Hz.
const PIT_HZ: u64 = 1_193_182;
/// Channel 2 count of one measurement: 50 ms.
const PIT_COUNT: u64 = PIT_HZ / 20;
const PIT_CH2: u16 = 0x42;
const PIT_MODE: u16 = 0x43;
/// Channel 2, low then high byte, mode 0 (OUT goes high when the count reaches zero), binary.
const PIT_CH2_MODE0: u8 = 0xb0;
/// Port B: bit 0 gates channel 2, bit 1 drives the speaker, bit 5 reads channel 2's OUT.
const PORT_B: u16 = 0x61;
const PORT_B_GATE2: u8 = 0x01;
const PORT_B_SPEAKER: u8 = 0x02;
const PORT_B_OUT2: u8 = 0x20;
/// Measurements at most; stop at the first whose edges are known to [`GOOD_PPM`].
const ATTEMPTS: u32 = 4;
const GOOD_PPM: u64 = 2_500;
/// The best measurement must be known to this (2 %), else the calibration fails.
const WORST_PPM: u64 = 20_000;
/// A 50 ms count that takes longer than this many TSC ticks (0.2 s at the highest plausible
/// rate, 2 s at 2 GHz) is not counting.
const MAX_TICKS: u64 = 4 * MAX_KHZ * 50;

/// A PIT calibration.
pub struct PitMeasurement {
    pub khz: u64,
    /// Port 0x61 reads of the measurement kept (each one a VM exit).
    pub polls: u64,
    /// Measurements made (the most precise is kept).
    pub attempts: u32,
    /// Half-width of the interval the start and end edges are known to, in ppm of the count.
    pub uncertainty_ppm: u64,
}

/// One 50 ms count: `(ticks, uncertainty_ticks, polls)`.
fn count_once(port_b: u8) -> Result<(u64, u64, u64), &'static str> {
    outb(PORT_B, (port_b & !PORT_B_SPEAKER) | PORT_B_GATE2);
    outb(PIT_MODE, PIT_CH2_MODE0);
    outb(PIT_CH2, (PIT_COUNT & 0xff) as u8);
    // Counting starts with the high byte: somewhere in [start_lo, start_hi].
    let start_lo = rdtsc();
    outb(PIT_CH2, (PIT_COUNT >> 8) as u8);
    let start_hi = rdtsc();
    let mut polls = 0u64;
    // TSC just before the latest read that still saw OUT low.
    let mut low_since = start_hi;
    loop {
        let before = rdtsc();
        let high = inb(PORT_B) & PORT_B_OUT2 != 0;
        let after = rdtsc();
        polls += 1;
        if high {
            if polls == 1 {
                return Err("channel 2 output high right after arming it (no PIT behind port 0x61)");
            }
            // The count ended in [low_since, after].
            let start = start_lo + (start_hi - start_lo) / 2;
            let end = low_since + (after - low_since) / 2;
            let uncertainty = (start_hi - start_lo) / 2 + (after - low_since) / 2;
            return Ok((end.saturating_sub(start), uncertainty, polls));
        }
        low_since = before;
        if after.wrapping_sub(start_lo) > MAX_TICKS {
            return Err("channel 2 never counted down (no PIT behind port 0x61)");
        }
    }
}

/// Measures the TSC against the PIT: up to [`ATTEMPTS`] 50 ms counts of channel 2, keeping the
/// one whose edges are best known. Port 0x61 is restored afterwards.
pub fn measure_pit() -> Result<PitMeasurement, &'static str> {
    let port_b = inb(PORT_B);
    let mut best: Option<PitMeasurement> = None;
    let mut failure = None;
    for attempt in 1..=ATTEMPTS {
        let (ticks, uncertainty, polls) = match count_once(port_b) {
            Ok(r) => r,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        let m = PitMeasurement {
            khz: ticks * PIT_HZ / (PIT_COUNT * 1000),
            polls,
            attempts: attempt,
            uncertainty_ppm: uncertainty.saturating_mul(1_000_000) / ticks.max(1),
        };
        let good = m.uncertainty_ppm <= GOOD_PPM;
        if best
            .as_ref()
            .is_none_or(|b| m.uncertainty_ppm < b.uncertainty_ppm)
        {
            best = Some(m);
        }
        if let Some(b) = best.as_mut() {
            b.attempts = attempt;
        }
        if good {
            break;
        }
    }
    outb(PORT_B, port_b);
    if let Some(e) = failure {
        return Err(e);
    }
    let m = best.ok_or("no measurement")?;
    if m.uncertainty_ppm > WORST_PPM {
        return Err("every count was disturbed (vCPU preempted at its edges)");
    }
    if plausible(m.khz).is_none() {
        return Err("measured rate outside 100 MHz..20 GHz");
    }
    Ok(m)
}
