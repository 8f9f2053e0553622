//! Job information as libvirt reports it (`virDomainGetJobStats`), with virsh's `domjobinfo`
//! labels and `--rawstats` keys.

use serde::{Deserialize, Serialize};

/// `virDomainJobType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum JobType {
    #[default]
    None,
    Unbounded,
    Completed,
    Failed,
    Cancelled,
}

impl JobType {
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::None => "None",
            JobType::Unbounded => "Unbounded",
            JobType::Completed => "Completed",
            JobType::Failed => "Failed",
            JobType::Cancelled => "Cancelled",
        }
    }
}

/// A migration job's statistics (absent values are not printed, as in libvirt).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    pub job_type: JobType,
    /// `Outgoing migration` / `Incoming migration`
    pub operation: Option<String>,
    /// The v3 phase (`begin`, `prepare`, `perform`, `finish`, `confirm`): Tern's addition.
    pub phase: Option<String>,
    pub time_elapsed_ms: Option<u64>,
    pub data_processed: Option<u64>,
    pub data_remaining: Option<u64>,
    pub data_total: Option<u64>,
    pub memory_processed: Option<u64>,
    pub memory_remaining: Option<u64>,
    pub memory_total: Option<u64>,
    /// bytes/s
    pub memory_bps: Option<u64>,
    /// pages/s
    pub memory_dirty_rate: Option<u64>,
    pub memory_page_size: Option<u64>,
    pub memory_iteration: Option<u64>,
    pub memory_postcopy_requests: Option<u64>,
    pub memory_constant: Option<u64>,
    pub memory_normal: Option<u64>,
    pub memory_normal_bytes: Option<u64>,
    /// Expected downtime while running; the real downtime once completed (ms).
    pub downtime_ms: Option<u64>,
    pub setup_time_ms: Option<u64>,
    pub auto_converge_throttle: Option<u64>,
    pub errmsg: Option<String>,
    /// Capability negotiation, one line each, e.g. `switchover-ack: off (the destination's
    /// VMM does not support it)`: Tern's addition, printed after the statistics.
    pub notes: Vec<String>,
    /// The source's samples over the job (completed jobs only; for `--report`).
    #[serde(default)]
    pub samples: Vec<JobSample>,
}

/// One sample of a running migration (the source's `query-migrate`), for the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobSample {
    /// Milliseconds since the job started.
    pub t_ms: u64,
    /// RAM bytes sent so far.
    pub transferred: u64,
    /// RAM bytes still to send.
    pub remaining: u64,
    /// bytes/s
    pub bandwidth: u64,
    /// pages/s
    pub dirty_rate: u64,
    /// The dirty pass (`dirty-sync-count`).
    pub pass: u64,
}

/// Bytes in virsh's `vshPrettyCapacity` style: `1.234 GiB`.
pub fn pretty_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.3} {}", UNITS[i])
}

impl JobInfo {
    /// `virsh domjobinfo` output (labels padded to 17 columns as virsh does).
    pub fn to_virsh_text(&self) -> String {
        let mut s = String::new();
        let mut line = |label: &str, value: String| {
            s.push_str(&format!("{:<17} {}\n", label, value));
        };
        line("Job type:", self.job_type.as_str().to_string());
        if self.job_type == JobType::None {
            return s;
        }
        if let Some(op) = &self.operation {
            line("Operation:", op.clone());
        }
        if let Some(p) = &self.phase {
            line("Phase:", p.clone());
        }
        let ms = |v: u64| format!("{v:<12} ms");
        let n = |v: u64| format!("{v:<12}");
        if let Some(v) = self.time_elapsed_ms {
            line("Time elapsed:", ms(v));
        }
        for (label, v) in [
            ("Data processed:", self.data_processed),
            ("Data remaining:", self.data_remaining),
            ("Data total:", self.data_total),
            ("Memory processed:", self.memory_processed),
            ("Memory remaining:", self.memory_remaining),
            ("Memory total:", self.memory_total),
        ] {
            if let Some(v) = v {
                line(label, pretty_bytes(v));
            }
        }
        if let Some(v) = self.memory_bps {
            line("Memory bandwidth:", format!("{}/s", pretty_bytes(v)));
        }
        if let Some(v) = self.memory_dirty_rate {
            line("Dirty rate:", format!("{v:<12} pages/s"));
        }
        if let Some(v) = self.memory_page_size {
            line("Page size:", format!("{v:<12} bytes"));
        }
        if let Some(v) = self.memory_iteration {
            line("Iteration:", n(v));
        }
        if let Some(v) = self.memory_postcopy_requests {
            line("Postcopy requests:", n(v));
        }
        if let Some(v) = self.memory_constant {
            line("Constant pages:", n(v));
        }
        if let Some(v) = self.memory_normal {
            line("Normal pages:", n(v));
        }
        if let Some(v) = self.memory_normal_bytes {
            line("Normal data:", pretty_bytes(v));
        }
        if let Some(v) = self.downtime_ms {
            let label = if self.job_type == JobType::Unbounded {
                "Expected downtime:"
            } else {
                "Total downtime:"
            };
            line(label, ms(v));
        }
        if let Some(v) = self.setup_time_ms {
            line("Setup time:", ms(v));
        }
        if let Some(v) = self.auto_converge_throttle {
            line("Auto converge throttle:", format!("{v:<12} %"));
        }
        if let Some(e) = &self.errmsg {
            line("Error message:", e.clone());
        }
        for note in &self.notes {
            line("Note:", note.clone());
        }
        s
    }

    /// `--rawstats`: libvirt's typed-parameter names (`VIR_DOMAIN_JOB_*`) and values.
    pub fn raw_stats(&self) -> Vec<(&'static str, String)> {
        let mut v: Vec<(&'static str, String)> = Vec::new();
        if let Some(op) = &self.operation {
            v.push(("operation", op.clone()));
        }
        let nums = [
            ("time_elapsed", self.time_elapsed_ms),
            ("downtime", self.downtime_ms),
            ("setup_time", self.setup_time_ms),
            ("data_total", self.data_total),
            ("data_processed", self.data_processed),
            ("data_remaining", self.data_remaining),
            ("memory_total", self.memory_total),
            ("memory_processed", self.memory_processed),
            ("memory_remaining", self.memory_remaining),
            ("memory_constant", self.memory_constant),
            ("memory_normal", self.memory_normal),
            ("memory_normal_bytes", self.memory_normal_bytes),
            ("memory_bps", self.memory_bps),
            ("memory_dirty_rate", self.memory_dirty_rate),
            ("memory_page_size", self.memory_page_size),
            ("memory_iteration", self.memory_iteration),
            ("memory_postcopy_requests", self.memory_postcopy_requests),
            ("auto_converge_throttle", self.auto_converge_throttle),
        ];
        for (k, x) in nums {
            if let Some(x) = x {
                v.push((k, x.to_string()));
            }
        }
        if let Some(e) = &self.errmsg {
            v.push(("errmsg", e.clone()));
        }
        if matches!(
            self.job_type,
            JobType::Completed | JobType::Failed | JobType::Cancelled
        ) {
            v.push(("success", (self.job_type == JobType::Completed).to_string()));
        }
        v
    }

    /// `virsh domjobinfo --rawstats` output.
    pub fn to_raw_text(&self) -> String {
        let mut s = format!("Job type: {}\n\n", self.job_type.as_str());
        for (k, v) in self.raw_stats() {
            s.push_str(&format!("{k}: {v}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virsh_labels_and_raw_keys() {
        let j = JobInfo {
            job_type: JobType::Completed,
            operation: Some("Outgoing migration".into()),
            time_elapsed_ms: Some(510),
            data_processed: Some(3 << 30),
            memory_bps: Some(100 << 20),
            downtime_ms: Some(4),
            memory_iteration: Some(7),
            ..Default::default()
        };
        let t = j.to_virsh_text();
        assert!(t.contains("Job type:         Completed"), "{t}");
        assert!(t.contains("Time elapsed:     510          ms"), "{t}");
        assert!(t.contains("Data processed:   3.000 GiB"), "{t}");
        assert!(t.contains("Memory bandwidth: 100.000 MiB/s"), "{t}");
        assert!(t.contains("Total downtime:   4            ms"), "{t}");
        let r = j.to_raw_text();
        assert!(r.contains("time_elapsed: 510\n"), "{r}");
        assert!(r.contains("memory_iteration: 7\n"), "{r}");
        assert!(r.contains("success: true\n"), "{r}");
        assert_eq!(
            JobInfo::default().to_virsh_text(),
            "Job type:         None\n"
        );
    }
}
