//! Rate limit for log lines a guest can trigger (a guest event, a panic code, a failing serial
//! write): a guest that loops on an `out` must not flood the VMM's log.
//!
//! At most `max_per_window` lines are logged per window; the rest are counted, and the first
//! line logged in a later window carries the count ("N similar lines suppressed"). A flood that
//! stops is therefore summarised at the next line the guest triggers, not by a timer.

use std::time::{Duration, Instant};

/// Guest-triggered lines logged per second at most, per source of lines.
pub const GUEST_LOG_LINES_PER_SEC: u32 = 10;

/// Decision for one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permit {
    /// Log it; `suppressed` lines were dropped since the last one logged (report them).
    Log {
        /// Lines dropped before this one.
        suppressed: u64,
    },
    /// Drop it (counted).
    Suppress,
}

/// A fixed-window limiter. Not synchronised: keep it under the lock of the state it guards.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    max_per_window: u32,
    window: Duration,
    start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
    total_suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new(GUEST_LOG_LINES_PER_SEC, Duration::from_secs(1))
    }
}

impl LogLimiter {
    /// At most `max_per_window` lines per `window`.
    pub fn new(max_per_window: u32, window: Duration) -> Self {
        Self {
            max_per_window,
            window,
            start: None,
            in_window: 0,
            suppressed: 0,
            total_suppressed: 0,
        }
    }

    /// Whether a line triggered at `now` may be logged.
    pub fn check(&mut self, now: Instant) -> Permit {
        let expired = self
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= self.window);
        if expired {
            self.start = Some(now);
            self.in_window = 0;
        }
        if self.in_window >= self.max_per_window {
            self.suppressed += 1;
            self.total_suppressed += 1;
            return Permit::Suppress;
        }
        self.in_window += 1;
        Permit::Log {
            suppressed: std::mem::take(&mut self.suppressed),
        }
    }

    /// Lines dropped since this limiter was made.
    pub fn total_suppressed(&self) -> u64 {
        self.total_suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floods_are_cut_and_summarised() {
        let mut l = LogLimiter::new(10, Duration::from_secs(1));
        let t0 = Instant::now();
        let logged = (0..100)
            .filter(|i| matches!(l.check(t0 + Duration::from_millis(*i)), Permit::Log { .. }))
            .count();
        assert_eq!(logged, 10);
        assert_eq!(l.total_suppressed(), 90);
        // The next window's first line reports the 90 dropped ones, the second none.
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!(l.check(t1), Permit::Log { suppressed: 90 });
        assert_eq!(l.check(t1), Permit::Log { suppressed: 0 });
        // A quiet guest is never limited.
        let mut q = LogLimiter::default();
        for s in 0..30 {
            assert_eq!(
                q.check(t0 + Duration::from_secs(s)),
                Permit::Log { suppressed: 0 }
            );
        }
    }
}
