//! The source's post-copy recovery and `release-ram` numbers in `query-migrate`
//! (`x-tern-postcopy-recovery`, `x-tern-release-ram`; `docs/qmp.md`).

use std::time::Duration;

use serde_json::{json, Map, Value};

/// Completed recoveries listed one by one in `query-migrate` (the oldest are dropped; the
/// totals keep counting).
pub const RECOVERIES_LISTED: usize = 16;

/// One completed post-copy recovery on the source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// `migrate {"resume": true}` taken → `postcopy-active` again (`RESUME_ACK`).
    pub total: Duration,
    /// Connecting the recovery channel (and its TLS handshake): → `postcopy-recover`.
    pub connect: Duration,
    /// The handshake up to the last received bitmap.
    pub bitmaps: Duration,
    /// Pages the destination lacked at the recovery (to send on the new channel).
    pub missing_pages: u64,
    /// Of those, pages this source had already sent: lost with the broken channel, sent
    /// again.
    pub resent_pages: u64,
}

/// Every post-copy recovery of the source (`x-tern-postcopy-recovery`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryStats {
    /// Recoveries completed (`postcopy-active` again).
    pub recoveries: u64,
    /// Attempts that went back to `postcopy-paused` (connect, TLS, handshake failures).
    pub failed_attempts: u64,
    /// Sum of every completed recovery's `total`.
    pub total: Duration,
    /// Sum of every completed recovery's `resent_pages`.
    pub resent_pages: u64,
    /// The last [`RECOVERIES_LISTED`] completed recoveries, oldest first.
    pub list: Vec<Recovery>,
}

impl RecoveryStats {
    /// A recovery completed.
    pub fn completed(&mut self, r: Recovery) {
        self.recoveries += 1;
        self.total += r.total;
        self.resent_pages += r.resent_pages;
        if self.list.len() == RECOVERIES_LISTED {
            self.list.remove(0);
        }
        self.list.push(r);
    }
}

/// `release-ram` on the source (`x-tern-release-ram`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReleaseRamStats {
    /// Pages of guest RAM freed on the source so far.
    pub released_pages: u64,
    /// Why releasing stopped (the machine refused; the migration went on).
    pub error: Option<String>,
}

fn us(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

/// Adds `x-tern-postcopy-recovery` and `x-tern-release-ram` when there is something to say.
pub(crate) fn source_info(
    m: &mut Map<String, Value>,
    recovery: Option<&RecoveryStats>,
    release: Option<&ReleaseRamStats>,
) {
    if let Some(r) = recovery {
        let list: Vec<Value> = r
            .list
            .iter()
            .map(|x| {
                json!({
                    "total-us": us(x.total),
                    "connect-us": us(x.connect),
                    "bitmaps-us": us(x.bitmaps),
                    "missing-pages": x.missing_pages,
                    "resent-pages": x.resent_pages,
                })
            })
            .collect();
        m.insert(
            "x-tern-postcopy-recovery".into(),
            json!({
                "recoveries": r.recoveries,
                "failed-attempts": r.failed_attempts,
                "total-us": us(r.total),
                "resent-pages": r.resent_pages,
                "list": list,
            }),
        );
    }
    if let Some(r) = release {
        let mut v = json!({ "released-pages": r.released_pages });
        if let (Some(e), Some(o)) = (&r.error, v.as_object_mut()) {
            o.insert("error".into(), json!(e));
        }
        m.insert("x-tern-release-ram".into(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recoveries_are_counted_summed_and_the_last_ones_listed() {
        let mut s = RecoveryStats::default();
        for i in 0..(RECOVERIES_LISTED as u64 + 2) {
            s.completed(Recovery {
                total: Duration::from_millis(10),
                resent_pages: i,
                ..Recovery::default()
            });
        }
        s.failed_attempts = 3;
        let n = RECOVERIES_LISTED as u64 + 2;
        assert_eq!(s.recoveries, n);
        assert_eq!(s.total, Duration::from_millis(10 * n));
        assert_eq!(s.resent_pages, (0..n).sum::<u64>());
        assert_eq!(s.list.len(), RECOVERIES_LISTED);
        assert_eq!(s.list[0].resent_pages, 2, "the two oldest dropped");
        let mut m = Map::new();
        let rel = ReleaseRamStats {
            released_pages: 5,
            error: Some("no".into()),
        };
        source_info(&mut m, Some(&s), Some(&rel));
        let r = &m["x-tern-postcopy-recovery"];
        assert_eq!(r["recoveries"], n);
        assert_eq!(r["failed-attempts"], 3);
        assert_eq!(r["list"][0]["total-us"], 10_000);
        assert_eq!(m["x-tern-release-ram"]["released-pages"], 5);
        assert_eq!(m["x-tern-release-ram"]["error"], "no");
        let mut m = Map::new();
        source_info(&mut m, None, Some(&ReleaseRamStats::default()));
        assert!(m.get("x-tern-postcopy-recovery").is_none());
        assert!(m["x-tern-release-ram"].get("error").is_none());
    }
}
