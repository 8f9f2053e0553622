//! `query-migrate` → libvirt's job statistics.

use serde_json::Value;
use virt::{JobInfo, JobType};

fn n(v: &Value, k: &str) -> Option<u64> {
    v.get(k).and_then(Value::as_u64)
}

/// Builds the job info from a `query-migrate` reply.
pub fn from_query_migrate(q: &Value, job_type: JobType, operation: &str) -> JobInfo {
    let ram = q.get("ram").cloned().unwrap_or(Value::Null);
    let transferred = n(&ram, "transferred");
    let remaining = n(&ram, "remaining");
    let total = n(&ram, "total");
    let done = matches!(job_type, JobType::Completed);
    JobInfo {
        job_type,
        operation: Some(operation.to_string()),
        phase: None,
        time_elapsed_ms: n(q, "total-time"),
        data_processed: transferred,
        data_remaining: remaining,
        data_total: total,
        memory_processed: transferred,
        memory_remaining: remaining,
        memory_total: total,
        memory_bps: ram
            .get("mbps")
            .and_then(Value::as_f64)
            .map(|m| (m * 1_000_000.0 / 8.0) as u64),
        memory_dirty_rate: n(&ram, "dirty-pages-rate"),
        memory_page_size: n(&ram, "page-size"),
        memory_iteration: n(&ram, "dirty-sync-count"),
        memory_postcopy_requests: n(&ram, "postcopy-requests"),
        memory_constant: n(&ram, "duplicate"),
        memory_normal: n(&ram, "normal"),
        memory_normal_bytes: n(&ram, "normal-bytes"),
        downtime_ms: if done {
            n(q, "downtime")
        } else {
            n(q, "expected-downtime")
        },
        setup_time_ms: n(q, "setup-time"),
        auto_converge_throttle: n(q, "cpu-throttle-percentage"),
        errmsg: q
            .get("error-desc")
            .and_then(Value::as_str)
            .map(str::to_string),
        notes: Vec::new(),
        samples: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn maps_qemu_names_to_libvirt_fields() {
        let q = json!({"status": "completed", "total-time": 510, "downtime": 4, "setup-time": 2,
            "ram": {"transferred": 1000, "remaining": 0, "total": 4096, "mbps": 8.0,
                    "dirty-sync-count": 7, "duplicate": 3, "normal": 5, "normal-bytes": 20480,
                    "page-size": 4096, "dirty-pages-rate": 9}});
        let j = from_query_migrate(&q, JobType::Completed, "Outgoing migration");
        assert_eq!(j.time_elapsed_ms, Some(510));
        assert_eq!(j.downtime_ms, Some(4));
        assert_eq!(j.memory_bps, Some(1_000_000));
        assert_eq!(j.memory_iteration, Some(7));
        assert_eq!(j.memory_constant, Some(3));
        let r = from_query_migrate(&q, JobType::Unbounded, "Outgoing migration");
        assert_eq!(r.downtime_ms, None, "expected-downtime is absent");
    }
}
