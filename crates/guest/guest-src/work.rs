//! The workloads and the per-vCPU event loop (heartbeat, status line, pacing, idle waits).

use crate::arch::{outb, outl, pause, rdtsc};
use crate::console::Console;
use crate::layout::{self, stats_off as f};
use crate::opts::Opts;
use crate::{fill, Env, Stats};

/// Pages handled per step of a busy workload before the timers are checked again.
const CHUNK: u64 = 256;
/// Most pages a paced step writes before returning to the loop.
const MAX_PACED_STEP: u64 = 16 * CHUNK;
/// Waits shorter than this (microseconds) are spun instead of idle-waited (Tern).
const SPIN_US: u64 = 200;
/// Idle-wait requests are shortened by this much (exit latency), microseconds.
const EXIT_US: u64 = 30;

/// A periodic deadline. `period == 0` means off.
struct Timer {
    next: u64,
    period: u64,
}

impl Timer {
    fn new(now: u64, period: u64) -> Timer {
        Timer {
            next: now.saturating_add(period),
            period,
        }
    }

    fn deadline(&self) -> u64 {
        if self.period == 0 {
            u64::MAX
        } else {
            self.next
        }
    }

    /// True (and re-armed) when due. Never bursts to catch up, and survives the TSC jumping
    /// backwards (e.g. after a migration).
    fn due(&mut self, now: u64) -> bool {
        if self.period == 0 {
            return false;
        }
        if self.next > now.saturating_add(self.period) {
            self.next = now.saturating_add(self.period);
        }
        if now < self.next {
            return false;
        }
        self.next = self.next.saturating_add(self.period);
        if self.next <= now {
            self.next = now.saturating_add(self.period);
        }
        true
    }
}

struct Worker {
    workload: u64,
    base: u64,
    npages: u64,
    random: bool,
    filling: bool,
    fill_pos: u64,
    pos: u64,
    passes: u64,
    written: u64,
    rng: u64,
    /// Pacing (dirty with rate > 0): pages per second for this vCPU, 0 = unpaced.
    pps: u64,
    ticks_per_s: u64,
    slice: u64,
    next_slice: u64,
    last: u64,
    credit: u64,
}

impl Worker {
    fn page_ptr(&self, i: u64) -> *mut u8 {
        (self.base + i * layout::PAGE_SIZE) as *mut u8
    }

    fn publish(&self, st: Stats) {
        st.set(f::PAGES_WRITTEN, self.written);
        st.set(f::PASSES, self.passes);
    }

    /// Fill (idle) or zero (pattern) the next chunk. Returns true when done.
    fn fill_step(&mut self) -> bool {
        let end = (self.fill_pos + CHUNK).min(self.npages);
        while self.fill_pos < end {
            let p = self.page_ptr(self.fill_pos);
            if self.workload == layout::WORKLOAD_PATTERN {
                // SAFETY: the page is inside this vCPU's work share, identity-mapped RAM that
                // nothing else in the guest uses.
                unsafe { core::ptr::write_volatile(p, 0) };
            } else {
                // SAFETY: as above; the slice covers exactly one page of the share and no
                // other reference to it exists.
                let page =
                    unsafe { core::slice::from_raw_parts_mut(p, layout::PAGE_SIZE as usize) };
                fill::fill_page(p as u64, page);
            }
            self.fill_pos += 1;
            self.written += 1;
        }
        self.fill_pos == self.npages
    }

    /// One dirty write (one byte in one page).
    #[inline(always)]
    fn dirty_one(&mut self) {
        let i = if self.random {
            // xorshift64, reduced to [0, npages) by multiply-high.
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            ((self.rng as u128 * self.npages as u128) >> 64) as u64
        } else {
            self.pos
        };
        let v = (self.passes % 255) as u8 + 1;
        // SAFETY: i < npages, so the byte is inside this vCPU's work share.
        unsafe { core::ptr::write_volatile(self.page_ptr(i), v) };
        self.written += 1;
        if self.random {
            if self.written % self.npages == 0 {
                self.passes += 1;
            }
        } else {
            self.pos += 1;
            if self.pos == self.npages {
                self.pos = 0;
                self.passes += 1;
            }
        }
    }

    /// Does some work. Returns `None` to be called again at once, or the TSC deadline until
    /// which this vCPU has nothing to do.
    fn step(&mut self, now: u64, st: Stats) -> Option<u64> {
        if self.filling {
            let done = self.fill_step();
            self.publish(st);
            if done {
                self.filling = false;
                st.set(f::STATE, layout::STATE_RUNNING);
                self.last = rdtsc();
                self.next_slice = self.last;
            }
            return None;
        }
        let far = now.saturating_add(self.ticks_per_s);
        if self.npages == 0 || self.workload == layout::WORKLOAD_IDLE {
            return Some(far);
        }
        if self.workload == layout::WORKLOAD_PATTERN {
            let start = self.pos;
            let end = (start + CHUNK).min(self.npages);
            while self.pos < end {
                let p = self.page_ptr(self.pos);
                // SAFETY: pos < npages: a byte of this vCPU's work share.
                unsafe {
                    core::ptr::write_volatile(p, core::ptr::read_volatile(p).wrapping_add(1))
                };
                self.pos += 1;
            }
            self.written += end - start;
            if self.pos == self.npages {
                self.pos = 0;
                self.passes += 1;
            }
            self.publish(st);
            return None;
        }
        // dirty
        if self.pps == 0 {
            for _ in 0..CHUNK {
                self.dirty_one();
            }
            self.publish(st);
            return None;
        }
        if self.next_slice > now.saturating_add(self.slice) {
            self.next_slice = now; // the TSC went backwards
        }
        if now < self.next_slice {
            return Some(self.next_slice);
        }
        let elapsed = now.saturating_sub(self.last).min(100 * self.slice);
        self.last = now;
        self.credit = self.credit.saturating_add(elapsed.saturating_mul(self.pps));
        let due = self.credit / self.ticks_per_s;
        let n = due.min(MAX_PACED_STEP);
        self.credit -= n * self.ticks_per_s;
        for _ in 0..n {
            self.dirty_one();
        }
        self.publish(st);
        if n < due {
            return None;
        }
        self.next_slice = now.saturating_add(self.slice);
        Some(self.next_slice)
    }
}

/// Waits until the TSC reaches `deadline`: idle-waits on the control port under Tern when it is
/// far enough, spins otherwise.
fn wait_until(env: &Env, deadline: u64) {
    let ticks_per_us = (env.tsc_khz / 1000).max(1);
    loop {
        let now = rdtsc();
        if now >= deadline {
            return;
        }
        let us = (deadline - now) / ticks_per_us;
        if !env.pvh && us > SPIN_US {
            outl(layout::CONTROL_IDLE, (us - EXIT_US).min(1_000_000) as u32);
        } else {
            pause();
        }
    }
}

fn all_running(vcpus: u32) -> bool {
    (0..vcpus).all(|i| {
        let s = Stats::of(i);
        s.get(f::MAGIC) == layout::STATS_MAGIC && s.get(f::STATE) == layout::STATE_RUNNING
    })
}

fn status_line(env: &Env, now: u64, t0: u64, seq: u64) {
    let (mut pages, mut passes) = (0u64, 0u64);
    for i in 0..env.vcpus {
        let s = Stats::of(i);
        pages = pages.wrapping_add(s.get(f::PAGES_WRITTEN));
        passes = passes.wrapping_add(s.get(f::PASSES));
    }
    Console
        .str("#t=")
        .dec(now.saturating_sub(t0) / env.tsc_khz.saturating_mul(1000).max(1))
        .str("s hb=")
        .dec(seq)
        .str(" pages=")
        .dec(pages)
        .str(" passes=")
        .dec(passes)
        .str(" vcpus=")
        .dec(env.vcpus as u64)
        .str("\n");
}

/// Runs this vCPU's workload forever.
pub fn run(env: &Env, o: &Opts, st: Stats, base: u64, len: u64) -> ! {
    let t0 = rdtsc();
    let ms = env.tsc_khz;
    let npages = len / layout::PAGE_SIZE;
    let filling = npages > 0 && o.workload != layout::WORKLOAD_DIRTY;
    let vcpus = env.vcpus as u64;
    let mut w = Worker {
        workload: o.workload,
        base,
        npages,
        random: o.random,
        filling,
        fill_pos: 0,
        pos: 0,
        passes: 0,
        written: 0,
        rng: 0x9e37_79b9_7f4a_7c15 ^ ((env.vcpu as u64 + 1) << 32) | 1,
        // MiB/s total -> pages/s for this vCPU.
        pps: o.rate_mib_s.saturating_mul(256) / vcpus,
        ticks_per_s: ms.saturating_mul(1000).max(1),
        slice: ms.max(1),
        next_slice: t0,
        last: t0,
        credit: 0,
    };
    if o.workload == layout::WORKLOAD_DIRTY && o.rate_mib_s > 0 && w.pps == 0 {
        w.pps = 1;
    }
    st.set(
        f::STATE,
        if filling {
            layout::STATE_FILLING
        } else {
            layout::STATE_RUNNING
        },
    );
    let vcpu0 = env.vcpu == 0;
    let mut hb = Timer::new(t0, if vcpu0 { o.hb_ms.saturating_mul(ms) } else { 0 });
    let mut status = Timer::new(
        t0,
        if vcpu0 {
            o.status_ms.saturating_mul(ms)
        } else {
            0
        },
    );
    let mut seq: u64 = 0;
    let mut announced = !vcpu0;
    let mut loops: u64 = 0;
    loop {
        let now = rdtsc();
        let mut deadline = w.step(now, st);
        if vcpu0 {
            let now = rdtsc();
            if hb.due(now) {
                seq += 1;
                st.set(f::HB_SEQ, seq);
                if env.pvh {
                    outb(layout::COM1, layout::HB_SERIAL_BASE + (seq % 32) as u8);
                } else {
                    outl(layout::CONTROL_HEARTBEAT, seq as u32);
                }
            }
            if status.due(now) {
                status_line(env, now, t0, seq);
            }
            if !announced {
                if all_running(env.vcpus) {
                    announced = true;
                    if !env.pvh {
                        outl(layout::CONTROL_EVENT, layout::EVENT_RUNNING);
                    }
                    Console
                        .str("#running fill_ms=")
                        .dec(rdtsc().saturating_sub(t0) / ms.max(1))
                        .str("\n");
                } else {
                    deadline = deadline.map(|d| d.min(now.saturating_add(ms)));
                }
            }
            deadline = deadline.map(|d| d.min(hb.deadline()).min(status.deadline()));
        }
        loops = loops.wrapping_add(1);
        st.set(f::LOOPS, loops);
        if let Some(d) = deadline {
            wait_until(env, d);
        }
    }
}
