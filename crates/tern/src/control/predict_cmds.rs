//! `x-tern-predict-migration` (Tern's own, issue 13 item 8): before migrating, the passes,
//! total time, downtime and convergence a pre-copy migration of this guest is expected to
//! have over a link of a given bandwidth, from the last `calc-dirty-rate` measurement (or a
//! given dirty rate) and the migration parameters in force. The model is
//! `tern_migration::convergence::predict`.

use serde::Deserialize;
use serde_json::{json, Map, Value};
use tern_migration::convergence::predict::{predict, PredictInput};
use tern_qmp::{parse_args, QmpError};
use tern_vmm::PAGE_SIZE;

use super::Controller;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictArgs {
    /// What the link carries, bytes/s.
    bandwidth: u64,
    /// MiB/s; default: the last `calc-dirty-rate` result.
    #[serde(default, rename = "dirty-rate")]
    dirty_rate: Option<u64>,
    /// ms; default: the `downtime-limit` parameter.
    #[serde(default, rename = "downtime-limit")]
    downtime_limit: Option<u64>,
    /// bytes/s, 0 = unlimited; default: the `max-bandwidth` parameter.
    #[serde(default, rename = "max-bandwidth")]
    max_bandwidth: Option<u64>,
}

impl Controller {
    pub(super) fn predict_migration(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let a: PredictArgs = parse_args(args)?;
        if a.bandwidth == 0 {
            return Err(QmpError::generic(
                "Parameter 'bandwidth' expects a positive number of bytes per second",
            ));
        }
        let dirty_mib = match a.dirty_rate {
            Some(r) => r,
            None => {
                let r = self.dirty_rate.last_rate().map_err(|why| {
                    QmpError::generic(format!(
                        "No dirty rate to predict from ({why}): run calc-dirty-rate first, or \
                         give 'dirty-rate'"
                    ))
                })?;
                r.unsigned_abs()
            }
        };
        let params = self.mig().params.clone();
        let max_bw = a.max_bandwidth.unwrap_or(params.max_bandwidth);
        let precopy = if max_bw > 0 {
            a.bandwidth.min(max_bw)
        } else {
            a.bandwidth
        };
        let ram = self.vm.ram().total_bytes();
        let first_pass = self.touched_bytes().unwrap_or(ram);
        let input = PredictInput {
            first_pass_bytes: first_pass,
            ram_bytes: ram,
            dirty_rate: dirty_mib as f64 * (1u64 << 20) as f64,
            precopy_bandwidth: precopy as f64,
            link_bandwidth: a.bandwidth as f64,
            avail_switchover_bandwidth: params.avail_switchover_bandwidth,
            downtime_limit_ms: a.downtime_limit.unwrap_or(params.downtime_limit),
        };
        let p = predict(&input).map_err(|e| QmpError::generic(e.to_string()))?;
        let mut v = json!({
            "converges": p.converges,
            "passes": p.passes,
            "extra-passes": p.extra_passes,
            "transferred-bytes": p.transferred_bytes,
            "first-pass-bytes": first_pass,
            "dirty-rate": dirty_mib,
            "precopy-bandwidth": precopy,
            "downtime-limit": input.downtime_limit_ms,
            "reason": p.reason,
        });
        if let Some(t) = p.total_time_ms {
            v["expected-total-time-ms"] = json!(t);
        }
        if let Some(d) = p.downtime_ms {
            v["expected-downtime-ms"] = json!(d);
        }
        Ok(v)
    }

    /// Guest RAM the guest has touched (pages that do not read as zero may be among them);
    /// `None` when that cannot be known (swap configured).
    fn touched_bytes(&self) -> Option<u64> {
        let regions = self.vm.regions();
        let mut untouched: Vec<Vec<u64>> = regions
            .iter()
            .map(|r| vec![0u64; r.bitmap_words()])
            .collect();
        match self.vm.untouched_pages(&mut untouched) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                tracing::warn!("x-tern-predict-migration: counting touched pages: {e}");
                return None;
            }
        }
        let total: u64 = regions.iter().map(|r| r.pages()).sum();
        let never: u64 = untouched
            .iter()
            .zip(&regions)
            .map(|(bits, r)| {
                let ones: u64 = bits.iter().map(|w| u64::from(w.count_ones())).sum();
                ones.min(r.pages())
            })
            .sum();
        Some(total.saturating_sub(never) * PAGE_SIZE)
    }
}
