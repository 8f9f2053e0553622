//! `calc-dirty-rate` and `query-dirty-rate`, QEMU's names, arguments, checks (in QEMU's order)
//! and error texts (`migration/dirtyrate.c`); the measurement itself is [`crate::dirty_rate`].

use serde::Deserialize;
use serde_json::{json, Map, Value};
use tern_qmp::{parse_args, QmpError};

use super::Controller;
use crate::dirty_rate::{
    MeasureConfig, MeasureMode, TimeUnit, DEFAULT_SAMPLE_PAGES, MAX_CALC_TIME_MS, MAX_SAMPLE_PAGES,
    MIN_CALC_TIME_MS, MIN_SAMPLE_PAGES,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CalcArgs {
    #[serde(rename = "calc-time")]
    calc_time: i64,
    #[serde(default, rename = "calc-time-unit")]
    calc_time_unit: Option<TimeUnit>,
    #[serde(default, rename = "sample-pages")]
    sample_pages: Option<i64>,
    #[serde(default)]
    mode: Option<MeasureMode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryArgs {
    #[serde(default, rename = "calc-time-unit")]
    calc_time_unit: Option<TimeUnit>,
}

/// QEMU's argument checks of `qmp_calc_dirty_rate`, in its order (after "already measuring").
fn check_args(a: &CalcArgs) -> Result<MeasureConfig, QmpError> {
    let calc_time_ms = a.calc_time_unit.unwrap_or_default().to_ms(a.calc_time);
    if !(MIN_CALC_TIME_MS..=MAX_CALC_TIME_MS).contains(&calc_time_ms) {
        return Err(QmpError::generic(format!(
            "Calculation time is out of range [{MIN_CALC_TIME_MS}ms, {MAX_CALC_TIME_MS}ms]."
        )));
    }
    let mode = a.mode.unwrap_or(MeasureMode::PageSampling);
    if a.sample_pages.is_some() && mode != MeasureMode::PageSampling {
        return Err(QmpError::generic(
            "sample-pages is used only in page-sampling mode",
        ));
    }
    let sample_pages = match a.sample_pages {
        Some(n) if !(MIN_SAMPLE_PAGES..=MAX_SAMPLE_PAGES).contains(&n) => {
            return Err(QmpError::generic(format!(
                "sample-pages is out of range[{MIN_SAMPLE_PAGES}, {MAX_SAMPLE_PAGES}]."
            )));
        }
        Some(n) => n.unsigned_abs(),
        None => DEFAULT_SAMPLE_PAGES,
    };
    // QEMU: dirty-ring only with a KVM dirty ring, dirty-bitmap only without one. Tern never
    // uses the ring (decision 88).
    if mode == MeasureMode::DirtyRing {
        return Err(QmpError::generic(format!(
            "mode {} is not enabled, use other method instead.",
            mode.as_str()
        )));
    }
    Ok(MeasureConfig {
        calc_time_ms,
        sample_pages,
        mode,
    })
}

impl Controller {
    pub(super) fn calc_dirty_rate(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let a: CalcArgs = parse_args(args)?;
        if self.dirty_rate.measuring() {
            return Err(QmpError::generic(
                "the dirty rate is already being measured.",
            ));
        }
        let cfg = check_args(&a)?;
        // Held across the start so that `migrate` (which takes it too) sees either no
        // measurement or a running one, never half of one.
        let m = self.mig();
        if cfg.mode == MeasureMode::DirtyBitmap {
            // Tern's dirty log has one reader: a measurement beside a migration would take the
            // migration's dirty pages (QEMU shares its log between clients; decision 87).
            if m.status().is_running() || m.incoming.as_ref().is_some_and(|i| !i.finished()) {
                return Err(QmpError::generic("There's a migration process in progress"));
            }
            if self.vm.ram().dirty_logging() {
                return Err(QmpError::generic(
                    "Dirty logging is already on (x-tern-dirty-log): mode dirty-bitmap needs \
                     the dirty log for itself",
                ));
            }
        }
        self.dirty_rate
            .start(self.vm.clone(), cfg)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        drop(m);
        Ok(json!({}))
    }

    pub(super) fn query_dirty_rate(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let a: QueryArgs = parse_args(args)?;
        Ok(self
            .dirty_rate
            .to_query_json(a.calc_time_unit.unwrap_or_default()))
    }

    /// Why `migrate` (or `x-tern-dirty-log`) must wait: a `dirty-bitmap` measurement owns the
    /// dirty log.
    pub(crate) fn dirty_log_busy(&self) -> Result<(), QmpError> {
        if self.dirty_rate.measuring_with_dirty_log() {
            return Err(QmpError::generic(
                "The dirty rate is being measured with the dirty log (calc-dirty-rate, mode \
                 dirty-bitmap): wait until query-dirty-rate says 'measured'",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(
        calc_time: i64,
        unit: Option<TimeUnit>,
        pages: Option<i64>,
        mode: Option<MeasureMode>,
    ) -> CalcArgs {
        CalcArgs {
            calc_time,
            calc_time_unit: unit,
            sample_pages: pages,
            mode,
        }
    }

    fn err(a: CalcArgs) -> String {
        check_args(&a).map(|_| ()).unwrap_err().to_string()
    }

    #[test]
    fn qemu_checks_and_texts() {
        let range = "Calculation time is out of range [50ms, 60000ms].";
        assert!(err(args(0, None, None, None)).contains(range));
        assert!(err(args(61, None, None, None)).contains(range));
        assert!(err(args(49, Some(TimeUnit::Millisecond), None, None)).contains(range));
        assert!(err(args(-1, None, None, None)).contains(range));
        assert!(
            err(args(1, None, Some(512), Some(MeasureMode::DirtyBitmap)))
                .contains("sample-pages is used only in page-sampling mode")
        );
        assert!(err(args(1, None, Some(127), None))
            .contains("sample-pages is out of range[128, 4096]."));
        assert!(err(args(1, None, Some(4097), None))
            .contains("sample-pages is out of range[128, 4096]."));
        assert!(err(args(1, None, None, Some(MeasureMode::DirtyRing)))
            .contains("mode dirty-ring is not enabled, use other method instead."));
    }

    #[test]
    fn defaults_are_qemus() {
        let c = check_args(&args(1, None, None, None)).unwrap();
        assert_eq!(
            c,
            MeasureConfig {
                calc_time_ms: 1000,
                sample_pages: 512,
                mode: MeasureMode::PageSampling
            }
        );
        let c = check_args(&args(
            50,
            Some(TimeUnit::Millisecond),
            None,
            Some(MeasureMode::DirtyBitmap),
        ))
        .unwrap();
        assert_eq!((c.calc_time_ms, c.mode), (50, MeasureMode::DirtyBitmap));
    }
}
