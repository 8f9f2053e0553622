//! The Tern test guest: a freestanding x86_64 program whose workloads run at CPL 3 in long mode.
//! Built by `crates/guest/build.rs` (not part of the `tern-guest` library's module tree).
//! See docs/guest.md for the contract.

#![no_std]
#![no_main]
#![allow(dead_code)]

#[path = "../src/fill.rs"]
mod fill;
#[path = "../src/layout.rs"]
mod layout;

mod arch;
mod console;
mod entry;
mod fault;
mod mem;
mod opts;
mod tsc;
mod work;

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use console::Console;

const MODE_UNKNOWN: u8 = 0;
const MODE_TERN: u8 = 1;
const MODE_PVH: u8 = 2;
static MODE: AtomicU8 = AtomicU8::new(MODE_UNKNOWN);

/// Fallback TSC frequency when nothing else tells us.
const DEFAULT_TSC_KHZ: u64 = 2_000_000;

/// The TSC rate vCPU 0 found when neither `tsc_khz=` nor the VMM gave one (0 = not yet), and
/// its source: the other vCPUs wait for it instead of calibrating too.
static FOUND_TSC_KHZ: AtomicU64 = AtomicU64::new(0);
static FOUND_TSC_SOURCE: AtomicU8 = AtomicU8::new(0);

/// The TSC frequency in kHz and where it came from: `tsc_khz=`, else the entry's value (Tern's
/// `rcx`), else (found by vCPU 0 only) CPUID, else a PIT measurement, else
/// [`DEFAULT_TSC_KHZ`] with a line on COM1 saying why.
fn tsc_rate(vcpu: u32, cmdline_khz: u64, entry_khz: u64) -> (u64, tsc::Source) {
    if cmdline_khz != 0 {
        return (cmdline_khz, tsc::Source::Cmdline);
    }
    if entry_khz != 0 {
        return (entry_khz, tsc::Source::Vmm);
    }
    if vcpu != 0 {
        loop {
            let khz = FOUND_TSC_KHZ.load(Ordering::Acquire);
            if khz != 0 {
                let src = tsc::Source::from_code(FOUND_TSC_SOURCE.load(Ordering::Relaxed));
                return (khz, src);
            }
            arch::pause();
        }
    }
    let (khz, src) = if let Some(found) = tsc::from_cpuid() {
        found
    } else {
        match tsc::measure_pit() {
            Ok(m) => {
                Console
                    .str("#tsc pit: khz=")
                    .dec(m.khz)
                    .str(" uncertainty_ppm=")
                    .dec(m.uncertainty_ppm)
                    .str(" polls=")
                    .dec(m.polls)
                    .str(" attempts=")
                    .dec(m.attempts as u64)
                    .str("\n");
                (m.khz, tsc::Source::Pit)
            }
            Err(why) => {
                Console
                    .str("#tsc: no TSC rate: CPUID reports none; PIT: ")
                    .str(why)
                    .str("; assuming ")
                    .dec(DEFAULT_TSC_KHZ)
                    .str(" kHz (give tsc_khz=)\n");
                (DEFAULT_TSC_KHZ, tsc::Source::Default)
            }
        }
    };
    FOUND_TSC_SOURCE.store(src.code(), Ordering::Relaxed);
    FOUND_TSC_KHZ.store(khz, Ordering::Release);
    (khz, src)
}

/// Facts about this vCPU and the machine.
pub struct Env {
    pub vcpu: u32,
    pub vcpus: u32,
    pub pvh: bool,
    /// TSC ticks per millisecond.
    pub tsc_khz: u64,
}

/// A stats block (volatile accessors; see `layout::stats_off`).
#[derive(Clone, Copy)]
pub struct Stats(*mut u64);

impl Stats {
    pub fn of(vcpu: u32) -> Stats {
        Stats(layout::stats_addr(vcpu) as *mut u64)
    }
    pub fn set(self, off: u64, v: u64) {
        // SAFETY: stats blocks are identity-mapped guest RAM reserved for this purpose
        // (layout::STATS_BASE..STATS_END) and `off` is one of the stats_off constants.
        unsafe { core::ptr::write_volatile(self.0.add((off / 8) as usize), v) }
    }
    pub fn get(self, off: u64) -> u64 {
        // SAFETY: as in `set`.
        unsafe { core::ptr::read_volatile(self.0.add((off / 8) as usize)) }
    }
}

fn workload_name(w: u64) -> &'static str {
    match w {
        layout::WORKLOAD_DIRTY => "dirty",
        layout::WORKLOAD_PATTERN => "pattern",
        _ => "idle",
    }
}

/// Common 64-bit, CPL 3 entry of both entries (System V arguments = entry registers).
#[no_mangle]
pub extern "C" fn tern_main(vcpu: u64, vcpus: u64, cmdline: u64, tsc_khz: u64, magic: u64) -> ! {
    let pvh = magic == layout::ENTRY_MAGIC_PVH;
    if pvh {
        MODE.store(MODE_PVH, Ordering::Relaxed);
    } else if magic == layout::ENTRY_MAGIC_TERN {
        MODE.store(MODE_TERN, Ordering::Relaxed);
    } else {
        panic!("bad entry magic");
    }
    if vcpus == 0 || vcpus > layout::MAX_VCPUS as u64 || vcpu >= vcpus {
        panic!("bad vcpu index/count");
    }
    let (vcpu, vcpus) = (vcpu as u32, vcpus as u32);
    let st = Stats::of(vcpu);
    st.set(layout::stats_off::STATE, layout::STATE_BOOTING);

    let mut o = opts::parse(cmdline, vcpu == 0);
    if pvh && o.mem_mib > layout::PVH_MAX_MEM_MIB {
        if vcpu == 0 {
            Console
                .str("#mem clamped to ")
                .dec(layout::PVH_MAX_MEM_MIB)
                .str("\n");
        }
        o.mem_mib = layout::PVH_MAX_MEM_MIB;
    }
    let (khz, tsc_src) = tsc_rate(vcpu, o.tsc_khz, tsc_khz);
    let env = Env {
        vcpu,
        vcpus,
        pvh,
        tsc_khz: khz,
    };
    let (base, len) = layout::work_share(vcpu, vcpus, o.mem_mib << 20);
    {
        use layout::stats_off as f;
        st.set(f::WORKLOAD, o.workload);
        st.set(f::VCPU, vcpu as u64);
        st.set(f::VCPUS, vcpus as u64);
        st.set(f::WORK_BASE, base);
        st.set(f::WORK_LEN, len);
        st.set(f::PAGES_WRITTEN, 0);
        st.set(f::PASSES, 0);
        st.set(f::HB_SEQ, 0);
        st.set(f::TSC_KHZ, khz);
        st.set(f::LOOPS, 0);
        st.set(f::RATE, o.rate_mib_s);
        let flags =
            if o.random { layout::FLAG_RANDOM } else { 0 } | if pvh { layout::FLAG_PVH } else { 0 };
        st.set(f::FLAGS, flags);
        st.set(f::MAGIC, layout::STATS_MAGIC);
    }
    if vcpu == 0 {
        Console
            .str("#tern-guest entry=")
            .str(if pvh { "pvh" } else { "tern" })
            .str(" vcpus=")
            .dec(vcpus as u64)
            .str(" workload=")
            .str(workload_name(o.workload))
            .str(" mem=")
            .dec(o.mem_mib)
            .str(" rate=")
            .dec(o.rate_mib_s)
            .str(" order=")
            .str(if o.random { "random" } else { "seq" })
            .str(" hb=")
            .dec(o.hb_ms)
            .str(" tsc_khz=")
            .dec(khz)
            .str(" tsc_src=")
            .str(tsc_src.name())
            .str("\n");
    }
    work::run(&env, &o, st, base, len)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let line = info.location().map(|l| l.line()).unwrap_or(0);
    // Which vCPU: the one whose stack we are on.
    let rsp: u64;
    // SAFETY: reads the stack pointer only.
    unsafe {
        core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags))
    };
    if (layout::STACK_BASE..layout::STACK_END).contains(&rsp) {
        let vcpu = ((rsp - layout::STACK_BASE) / layout::STACK_SIZE) as u32;
        Stats::of(vcpu).set(layout::stats_off::STATE, layout::STATE_PANICKED);
    }
    let mode = MODE.load(Ordering::Relaxed);
    if mode != MODE_TERN {
        use core::fmt::Write;
        let mut c = Console;
        c.str("#PANIC ");
        if let Some(l) = info.location() {
            c.str(l.file()).str(":").dec(l.line() as u64).str(": ");
        }
        let _ = write!(c, "{}", info.message());
        c.str("\n");
    }
    if mode != MODE_PVH {
        arch::outl(layout::CONTROL_EVENT, layout::EVENT_PANIC | (line & 0xffff));
        loop {
            arch::outl(layout::CONTROL_IDLE, 1_000_000);
        }
    }
    loop {
        arch::pause();
    }
}
