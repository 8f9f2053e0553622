//! QEMU's dirty page rate measurement (`calc-dirty-rate` / `query-dirty-rate`,
//! `migration/dirtyrate.c`): the measurement's state and the `dirty-rate` thread that takes it.
//! The QMP surface is in `control::dirty_rate_cmds`.
//!
//! Two of QEMU's three modes:
//! * `dirty-bitmap`: the KVM dirty log over `calc-time`: dirty logging on, wait, one sync, off.
//!   The guest sees what a migration's setup, one sync and cleanup cost it (the same calls), and
//!   nothing more. It needs the dirty log for itself, so it never runs beside a migration (the
//!   commands refuse one while the other runs: decision 87).
//! * `page-sampling` (QEMU's default): hash `sample-pages` random pages per GiB, wait, hash them
//!   again; the changed fraction of the samples times the RAM size over the time. Reads guest
//!   memory only, so the guest is not disturbed at all.
//!
//! `dirty-ring` is refused: Tern does not use the KVM dirty ring (unusable on this project's
//! hosts, docs/TESTBED).

use std::hash::{DefaultHasher, Hasher};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{json, Value};
use tern_vmm::memory::PAGE_SIZE;
use tern_vmm::Vm;

/// QEMU's `MIN_CALC_TIME_MS` / `MAX_CALC_TIME_MS`.
pub const MIN_CALC_TIME_MS: i64 = 50;
pub const MAX_CALC_TIME_MS: i64 = 60_000;
/// QEMU's `MIN_SAMPLE_PAGE_COUNT` / `MAX_SAMPLE_PAGE_COUNT` / `DIRTYRATE_DEFAULT_SAMPLE_PAGES`
/// (sampled pages per GiB).
pub const MIN_SAMPLE_PAGES: i64 = 128;
pub const MAX_SAMPLE_PAGES: i64 = 4096;
pub const DEFAULT_SAMPLE_PAGES: u64 = 512;
/// QEMU's `MIN_RAMBLOCK_SIZE`: smaller RAM regions are not sampled.
const MIN_SAMPLED_REGION: u64 = 128 << 10;

/// QEMU's `DirtyRateStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyRateStatus {
    Unstarted,
    Measuring,
    Measured,
}

impl DirtyRateStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unstarted => "unstarted",
            Self::Measuring => "measuring",
            Self::Measured => "measured",
        }
    }
}

/// QEMU's `DirtyRateMeasureMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MeasureMode {
    PageSampling,
    DirtyRing,
    DirtyBitmap,
}

impl MeasureMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PageSampling => "page-sampling",
            Self::DirtyRing => "dirty-ring",
            Self::DirtyBitmap => "dirty-bitmap",
        }
    }
}

/// QEMU's `TimeUnit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TimeUnit {
    #[default]
    Second,
    Millisecond,
}

impl TimeUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Second => "second",
            Self::Millisecond => "millisecond",
        }
    }

    /// `value` in this unit, in milliseconds (saturating: out-of-range values stay out of range).
    pub fn to_ms(self, value: i64) -> i64 {
        match self {
            Self::Second => value.saturating_mul(1000),
            Self::Millisecond => value,
        }
    }

    /// `ms` milliseconds in this unit (truncated, as QEMU's `convert_time_unit`).
    pub fn from_ms(self, ms: i64) -> i64 {
        match self {
            Self::Second => ms / 1000,
            Self::Millisecond => ms,
        }
    }
}

/// What a measurement was asked to do (arguments already checked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeasureConfig {
    pub calc_time_ms: i64,
    /// Sampled pages per GiB (`page-sampling`).
    pub sample_pages: u64,
    pub mode: MeasureMode,
}

/// The last (or current) measurement: QEMU's `DirtyStat` and `CalculatingState`.
#[derive(Debug, Clone)]
struct Stat {
    status: DirtyRateStatus,
    /// Seconds since the epoch at the start.
    start_time: i64,
    /// The asked time until measured, then the time actually measured over.
    calc_time_ms: i64,
    sample_pages: u64,
    mode: MeasureMode,
    /// MiB/s (QEMU's "MB/s"); -1 when nothing could be measured.
    dirty_rate: i64,
}

impl Default for Stat {
    fn default() -> Self {
        Self {
            status: DirtyRateStatus::Unstarted,
            start_time: 0,
            calc_time_ms: 0,
            sample_pages: 0,
            mode: MeasureMode::PageSampling,
            dirty_rate: -1,
        }
    }
}

#[derive(Default)]
struct Inner {
    stat: Stat,
    /// Set to end a measurement early (process exit).
    stop: bool,
}

/// The process's dirty-rate measurement: at most one at a time, as in QEMU.
#[derive(Default)]
pub struct DirtyRate {
    inner: Mutex<Inner>,
    wake: Condvar,
}

/// Why a measurement could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the dirty rate is already being measured.")]
    Measuring,
    #[error("cannot start the dirty-rate thread: {0}")]
    Spawn(#[source] std::io::Error),
}

impl DirtyRate {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a measurement is running.
    pub fn measuring(&self) -> bool {
        self.lock().stat.status == DirtyRateStatus::Measuring
    }

    /// Whether a measurement that owns the dirty log (`dirty-bitmap`) is running.
    pub fn measuring_with_dirty_log(&self) -> bool {
        let g = self.lock();
        g.stat.status == DirtyRateStatus::Measuring && g.stat.mode == MeasureMode::DirtyBitmap
    }

    /// Starts a measurement on a `dirty-rate` thread (status `measuring` before this returns).
    pub fn start(self: &Arc<Self>, vm: Arc<Vm>, cfg: MeasureConfig) -> Result<(), StartError> {
        {
            let mut g = self.lock();
            if g.stat.status == DirtyRateStatus::Measuring {
                return Err(StartError::Measuring);
            }
            g.stop = false;
            g.stat = Stat {
                status: DirtyRateStatus::Measuring,
                start_time: epoch_secs(),
                calc_time_ms: cfg.calc_time_ms,
                sample_pages: cfg.sample_pages,
                mode: cfg.mode,
                dirty_rate: -1,
            };
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("dirty-rate".into())
            .spawn(move || me.run(&vm, cfg));
        if let Err(e) = spawned {
            self.finish(-1, cfg.calc_time_ms);
            return Err(StartError::Spawn(e));
        }
        Ok(())
    }

    /// Ends a running measurement early (its result is what was seen so far).
    pub fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_all();
    }

    /// The last measured rate (MiB/s), or why there is none (for `x-tern-predict-migration`).
    pub fn last_rate(&self) -> Result<i64, String> {
        let s = self.lock().stat.clone();
        match s.status {
            DirtyRateStatus::Measured if s.dirty_rate >= 0 => Ok(s.dirty_rate),
            DirtyRateStatus::Measured => Err("the last calc-dirty-rate measured nothing".into()),
            st => Err(format!("query-dirty-rate says '{}'", st.as_str())),
        }
    }

    /// `query-dirty-rate`, `calc-time` in `unit`.
    pub fn to_query_json(&self, unit: TimeUnit) -> Value {
        let s = self.lock().stat.clone();
        let measured = s.status == DirtyRateStatus::Measured;
        // QEMU reports 0 sample pages for the modes that do not sample, once measured.
        let sample_pages = if measured && s.mode != MeasureMode::PageSampling {
            0
        } else {
            s.sample_pages
        };
        let mut v = json!({
            "status": s.status.as_str(),
            "start-time": s.start_time,
            "calc-time": unit.from_ms(s.calc_time_ms),
            "calc-time-unit": unit.as_str(),
            "sample-pages": sample_pages,
            "mode": s.mode.as_str(),
        });
        if measured {
            v["dirty-rate"] = json!(s.dirty_rate);
        }
        v
    }

    fn finish(&self, dirty_rate: i64, calc_time_ms: i64) {
        let mut g = self.lock();
        g.stat.dirty_rate = dirty_rate;
        g.stat.calc_time_ms = calc_time_ms;
        g.stat.status = DirtyRateStatus::Measured;
    }

    /// Waits until `calc_time_ms` after `t0` (or a stop); returns the time waited, in ms.
    fn wait(&self, t0: Instant, calc_time_ms: i64) -> i64 {
        let end = t0 + Duration::from_millis(u64::try_from(calc_time_ms).unwrap_or(0));
        let mut g = self.lock();
        while !g.stop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            g = match self.wake.wait_timeout(g, end - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        drop(g);
        (t0.elapsed().as_millis() as i64).max(1)
    }

    fn run(&self, vm: &Vm, cfg: MeasureConfig) {
        let r = match cfg.mode {
            MeasureMode::DirtyBitmap => self.by_dirty_log(vm, cfg),
            MeasureMode::PageSampling => self.by_sampling(vm, cfg),
            MeasureMode::DirtyRing => Err(MeasureError::Unsupported(cfg.mode)),
        };
        match r {
            Ok((rate, ms)) => {
                tracing::info!(mode = cfg.mode.as_str(), rate, ms, "dirty rate measured");
                self.finish(rate, ms)
            }
            Err(e) => {
                tracing::warn!(
                    mode = cfg.mode.as_str(),
                    "dirty rate measurement failed: {e}"
                );
                self.finish(-1, cfg.calc_time_ms)
            }
        }
    }

    /// `dirty-bitmap`: every page the KVM dirty log (and the VMM's own writes) saw dirtied.
    fn by_dirty_log(&self, vm: &Vm, cfg: MeasureConfig) -> Result<(i64, i64), MeasureError> {
        let regions = vm.regions();
        let mut bitmaps: Vec<Vec<u64>> = regions
            .iter()
            .map(|r| vec![0u64; r.bitmap_words()])
            .collect();
        vm.start_dirty_log().map_err(MeasureError::DirtyLog)?;
        let t0 = Instant::now();
        let ms = self.wait(t0, cfg.calc_time_ms);
        let synced = vm.sync_dirty_log(&mut bitmaps);
        let stopped = vm.stop_dirty_log();
        synced.map_err(MeasureError::DirtyLog)?;
        stopped.map_err(MeasureError::DirtyLog)?;
        let pages: u64 = bitmaps
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        Ok((rate_from_pages(pages, ms), ms))
    }

    /// `page-sampling`: QEMU's sampling of random pages, compared by hash.
    fn by_sampling(&self, vm: &Vm, cfg: MeasureConfig) -> Result<(i64, i64), MeasureError> {
        let mut rng = XorShift::seeded();
        let mut samples = Vec::new();
        let mut total_mib = 0u64;
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let t0 = Instant::now();
        for r in vm.regions() {
            if r.size < MIN_SAMPLED_REGION {
                continue;
            }
            let count = ((u128::from(r.size) * u128::from(cfg.sample_pages)) >> 30) as u64;
            if count == 0 {
                continue;
            }
            total_mib += r.size >> 20;
            for _ in 0..count {
                let gpa = r.gpa + rng.below(r.pages()) * PAGE_SIZE;
                vm.read_page(gpa, &mut page).map_err(MeasureError::Read)?;
                samples.push((gpa, hash(&page)));
            }
        }
        let ms = self.wait(t0, cfg.calc_time_ms);
        if samples.is_empty() {
            // QEMU leaves the rate unknown (-1) when nothing was sampled.
            return Ok((-1, ms));
        }
        let mut dirty = 0u64;
        for (gpa, h) in &samples {
            vm.read_page(*gpa, &mut page).map_err(MeasureError::Read)?;
            if hash(&page) != *h {
                dirty += 1;
            }
        }
        let rate =
            u128::from(dirty) * u128::from(total_mib) * 1000 / (samples.len() as u128 * ms as u128);
        Ok((i64::try_from(rate).unwrap_or(i64::MAX), ms))
    }
}

/// A failed measurement (logged; the result is then -1).
#[derive(Debug, thiserror::Error)]
enum MeasureError {
    #[error("dirty log: {0}")]
    DirtyLog(#[source] tern_vmm::Error),
    #[error("reading a sampled page: {0}")]
    Read(#[source] tern_vmm::Error),
    #[error("mode {} is not supported", .0.as_str())]
    Unsupported(MeasureMode),
}

/// QEMU's `do_calculate_dirtyrate`: whole MiB dirtied, per second (integer arithmetic).
pub fn rate_from_pages(pages: u64, ms: i64) -> i64 {
    let mib = pages.saturating_mul(PAGE_SIZE) >> 20;
    let ms = u64::try_from(ms.max(1)).unwrap_or(1);
    i64::try_from(mib.saturating_mul(1000) / ms).unwrap_or(i64::MAX)
}

fn hash(page: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(page);
    h.finish()
}

fn epoch_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A small xorshift generator: the sample positions need no quality beyond "spread out".
struct XorShift(u64);

impl XorShift {
    fn seeded() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64 ^ d.as_secs())
            .unwrap_or(0);
        Self((nanos ^ (u64::from(std::process::id()) << 32)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform enough in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_counts_whole_mib_per_second() {
        assert_eq!(rate_from_pages(0, 1000), 0);
        assert_eq!(rate_from_pages(255, 1000), 0, "under 1 MiB");
        assert_eq!(rate_from_pages(256 * 32, 1000), 32);
        assert_eq!(rate_from_pages(256 * 32, 500), 64);
        assert!(rate_from_pages(u64::MAX, 0) > 0, "saturates, never panics");
    }

    #[test]
    fn time_units_convert_like_qemu() {
        assert_eq!(TimeUnit::Second.to_ms(2), 2000);
        assert_eq!(TimeUnit::Millisecond.to_ms(75), 75);
        assert_eq!(TimeUnit::Second.from_ms(1999), 1);
        assert_eq!(TimeUnit::Second.to_ms(i64::MAX), i64::MAX);
    }

    #[test]
    fn unstarted_query_has_qemu_shape() {
        let d = DirtyRate::default();
        let q = d.to_query_json(TimeUnit::Second);
        assert_eq!(q["status"], "unstarted");
        assert_eq!(q["mode"], "page-sampling");
        assert_eq!(q["calc-time-unit"], "second");
        assert!(q.get("dirty-rate").is_none());
    }

    #[test]
    fn xorshift_stays_below() {
        let mut r = XorShift::seeded();
        assert!((0..1000).all(|_| r.below(7) < 7));
    }
}
