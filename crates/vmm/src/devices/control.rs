//! The guest-control port (`CONTROL_PORT`, Tern only): heartbeats, idle-wait, guest events.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::log_limit::{LogLimiter, Permit, GUEST_LOG_LINES_PER_SEC};

/// Offset of the heartbeat register.
pub const HEARTBEAT: u16 = 0;
/// Offset of the idle-wait register.
pub const IDLE_WAIT: u16 = 4;
/// Offset of the guest-event register.
pub const EVENT: u16 = 8;
/// Ports the device decodes (base .. base + SPAN).
pub const SPAN: u16 = 12;
/// Longest idle-wait honoured.
pub const MAX_IDLE_WAIT: Duration = Duration::from_millis(100);
/// Heartbeats kept in memory.
pub const HEARTBEAT_RING: usize = 1 << 20;
/// Guest events kept in memory.
pub const EVENT_RING: usize = 4096;
/// Guest events carried in the saved state (`GuestControlState::recent_events`); a restore
/// refuses more.
pub const RECENT_EVENTS: usize = 64;
/// Guest event: the workload is running.
pub const EVENT_WORKLOAD_RUNNING: u32 = 1;
/// Guest event mask/tag of a guest panic (`0xdead0000 | n`).
pub const EVENT_PANIC_TAG: u32 = 0xdead_0000;

/// `CLOCK_REALTIME` in nanoseconds.
pub fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// One heartbeat as the VMM saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The guest's sequence number.
    pub seq: u64,
    /// `CLOCK_REALTIME` when the VMM handled the `out`.
    pub realtime_ns: u64,
    /// Which vCPU sent it.
    pub vcpu: u32,
}

/// Heartbeat statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatSummary {
    /// The last heartbeat.
    pub last: Option<Heartbeat>,
    /// Heartbeats received (including those carried over by a restore).
    pub count: u64,
    /// Largest time between two consecutive heartbeats, in ns.
    pub max_gap_ns: u64,
    /// Sequence number of the heartbeat that ended the largest gap.
    pub max_gap_end_seq: u64,
}

/// One guest event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestEvent {
    /// The code the guest wrote.
    pub code: u32,
    /// Which vCPU wrote it.
    pub vcpu: u32,
    /// `CLOCK_REALTIME` in ns.
    pub realtime_ns: u64,
}

impl GuestEvent {
    /// The panic number if this is a guest panic.
    pub fn panic_code(&self) -> Option<u32> {
        (self.code & 0xffff_0000 == EVENT_PANIC_TAG).then_some(self.code & 0xffff)
    }
}

/// What the vCPU has to do after a control-port write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlAction {
    /// Nothing.
    None,
    /// Park this long (interruptible by pause/shutdown).
    IdleWait(Duration),
    /// The guest asked for a system reset (i8042).
    Reset,
}

/// Saved state of the guest-control port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestControlState {
    /// Heartbeat statistics, so the destination continues the gap accounting.
    pub heartbeats: HeartbeatSummary,
    /// The last guest events (at most [`RECENT_EVENTS`]).
    pub recent_events: Vec<GuestEvent>,
    /// The first guest panic, if any.
    pub panic: Option<GuestEvent>,
    /// Whether the guest reported its workload running.
    pub workload_running: bool,
}

#[derive(Debug, Default)]
struct Heartbeats {
    ring: VecDeque<Heartbeat>,
    summary: HeartbeatSummary,
}

impl GuestControlState {
    /// Checks what a restore must not take from a hostile stream: at most [`RECENT_EVENTS`]
    /// events (the error names the limit).
    pub fn check(&self) -> Result<(), String> {
        if self.recent_events.len() > RECENT_EVENTS {
            return Err(format!(
                "recent_events has {} entries, at most {RECENT_EVENTS} are saved",
                self.recent_events.len()
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Events {
    ring: VecDeque<GuestEvent>,
    panic: Option<GuestEvent>,
    workload_running: bool,
    /// The guest decides how often events come: their log lines are rate-limited.
    log_limit: LogLimiter,
}

/// The guest-control port device.
#[derive(Debug, Default)]
pub struct GuestControl {
    heartbeats: Mutex<Heartbeats>,
    heartbeat_cv: Condvar,
    events: Mutex<Events>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The protected data are logs whose updates cannot be torn by a panic.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GuestControl {
    /// A fresh device.
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles an `out` of `data` (little endian, 1..4 bytes used) at `offset` from vCPU `vcpu`.
    pub fn write(&self, vcpu: u32, offset: u16, data: &[u8]) -> ControlAction {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(v);
        match offset {
            HEARTBEAT => {
                self.heartbeat(vcpu, u64::from(value), realtime_ns());
                ControlAction::None
            }
            IDLE_WAIT => {
                ControlAction::IdleWait(Duration::from_micros(u64::from(value)).min(MAX_IDLE_WAIT))
            }
            EVENT => {
                self.event(vcpu, value);
                ControlAction::None
            }
            _ => ControlAction::None,
        }
    }

    fn heartbeat(&self, vcpu: u32, seq: u64, now: u64) {
        let mut h = lock(&self.heartbeats);
        let hb = Heartbeat {
            seq,
            realtime_ns: now,
            vcpu,
        };
        if let Some(last) = h.summary.last {
            let gap = now.saturating_sub(last.realtime_ns);
            if gap > h.summary.max_gap_ns {
                h.summary.max_gap_ns = gap;
                h.summary.max_gap_end_seq = seq;
            }
        }
        h.summary.last = Some(hb);
        h.summary.count += 1;
        if h.ring.len() >= HEARTBEAT_RING {
            h.ring.pop_front();
        }
        h.ring.push_back(hb);
        drop(h);
        self.heartbeat_cv.notify_all();
    }

    fn event(&self, vcpu: u32, code: u32) {
        self.event_at(vcpu, code, Instant::now());
    }

    /// A guest event at `now` (the rate limit's clock).
    fn event_at(&self, vcpu: u32, code: u32, now: Instant) {
        let ev = GuestEvent {
            code,
            vcpu,
            realtime_ns: realtime_ns(),
        };
        let mut e = lock(&self.events);
        let log = match e.log_limit.check(now) {
            Permit::Log { suppressed } => {
                if suppressed > 0 {
                    tracing::warn!(
                        suppressed,
                        "{suppressed} guest event log lines suppressed (more than \
                         {GUEST_LOG_LINES_PER_SEC} per second)"
                    );
                }
                true
            }
            Permit::Suppress => false,
        };
        if let Some(n) = ev.panic_code() {
            if log {
                tracing::error!(
                    vcpu,
                    panic = n,
                    "guest panic {n:#x} reported by vcpu {vcpu}"
                );
            }
            if e.panic.is_none() {
                e.panic = Some(ev);
            }
        } else if code == EVENT_WORKLOAD_RUNNING {
            if log {
                tracing::info!(vcpu, "guest workload running on vcpu {vcpu}");
            }
            e.workload_running = true;
        } else if log {
            tracing::info!(vcpu, code, "guest event {code:#x}");
        }
        if e.ring.len() >= EVENT_RING {
            e.ring.pop_front();
        }
        e.ring.push_back(ev);
    }

    /// Heartbeat statistics.
    pub fn heartbeats(&self) -> HeartbeatSummary {
        lock(&self.heartbeats).summary
    }

    /// The heartbeats still in the ring whose sequence number is greater than `seq`.
    pub fn heartbeats_since(&self, seq: u64) -> Vec<Heartbeat> {
        let h = lock(&self.heartbeats);
        let start = h.ring.partition_point(|hb| hb.seq <= seq);
        h.ring.range(start..).copied().collect()
    }

    /// Waits until more than `count` heartbeats were received or `deadline` passes; returns the
    /// summary at that point.
    pub fn wait_heartbeats(&self, count: u64, deadline: Instant) -> HeartbeatSummary {
        let mut h = lock(&self.heartbeats);
        while h.summary.count <= count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            h = self
                .heartbeat_cv
                .wait_timeout(h, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        h.summary
    }

    /// All guest events still in the ring.
    pub fn events(&self) -> Vec<GuestEvent> {
        lock(&self.events).ring.iter().copied().collect()
    }

    /// The first guest panic.
    pub fn panic(&self) -> Option<GuestEvent> {
        lock(&self.events).panic
    }

    /// Whether the guest reported its workload running.
    pub fn workload_running(&self) -> bool {
        lock(&self.events).workload_running
    }

    /// The device state.
    pub fn state(&self) -> GuestControlState {
        let h = lock(&self.heartbeats);
        let e = lock(&self.events);
        let skip = e.ring.len().saturating_sub(RECENT_EVENTS);
        GuestControlState {
            heartbeats: h.summary,
            recent_events: e.ring.iter().skip(skip).copied().collect(),
            panic: e.panic,
            workload_running: e.workload_running,
        }
    }

    /// Guest event log lines dropped by the rate limit so far.
    pub fn suppressed_log_lines(&self) -> u64 {
        lock(&self.events).log_limit.total_suppressed()
    }

    /// Replaces the device state; refuses one that breaks [`GuestControlState::check`] (nothing
    /// changed then).
    pub fn set_state(&self, state: &GuestControlState) -> Result<(), String> {
        state.check()?;
        let mut h = lock(&self.heartbeats);
        h.summary = state.heartbeats;
        h.ring.clear();
        h.ring.extend(state.heartbeats.last);
        drop(h);
        let mut e = lock(&self.events);
        e.ring = state.recent_events.iter().copied().collect();
        e.panic = state.panic;
        e.workload_running = state.workload_running;
        drop(e);
        self.heartbeat_cv.notify_all();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_accounting_and_since() {
        let c = GuestControl::new();
        c.heartbeat(0, 1, 1_000);
        c.heartbeat(0, 2, 3_000);
        c.heartbeat(1, 3, 3_500);
        let s = c.heartbeats();
        assert_eq!(s.count, 3);
        assert_eq!(s.max_gap_ns, 2_000);
        assert_eq!(s.max_gap_end_seq, 2);
        assert_eq!(s.last.map(|h| h.seq), Some(3));
        let since: Vec<u64> = c.heartbeats_since(1).iter().map(|h| h.seq).collect();
        assert_eq!(since, vec![2, 3]);
    }

    #[test]
    fn decodes_writes() {
        let c = GuestControl::new();
        assert_eq!(
            c.write(0, HEARTBEAT, &7u32.to_le_bytes()),
            ControlAction::None
        );
        assert_eq!(c.heartbeats().last.map(|h| h.seq), Some(7));
        assert_eq!(
            c.write(0, IDLE_WAIT, &500u32.to_le_bytes()),
            ControlAction::IdleWait(Duration::from_micros(500))
        );
        assert_eq!(
            c.write(0, IDLE_WAIT, &u32::MAX.to_le_bytes()),
            ControlAction::IdleWait(MAX_IDLE_WAIT)
        );
        c.write(1, EVENT, &0xdead_0003u32.to_le_bytes());
        assert_eq!(c.panic().and_then(|e| e.panic_code()), Some(3));
        c.write(1, EVENT, &EVENT_WORKLOAD_RUNNING.to_le_bytes());
        assert!(c.workload_running());
    }

    #[test]
    fn a_panic_flood_is_recorded_but_not_all_logged() {
        let c = GuestControl::new();
        let t0 = Instant::now();
        for _ in 0..1000 {
            c.event_at(0, 0xdead_0007, t0);
        }
        // Every event is kept (bounded ring), the first panic is the one reported, and only
        // the limit's worth of lines reached the log within that second.
        assert_eq!(c.events().len(), 1000);
        assert_eq!(c.panic().and_then(|e| e.panic_code()), Some(7));
        assert_eq!(
            c.suppressed_log_lines(),
            1000 - u64::from(GUEST_LOG_LINES_PER_SEC)
        );
        // A second later the guest may log again (the summary line goes first).
        c.event_at(0, 0x42, t0 + Duration::from_secs(1));
        assert_eq!(
            c.suppressed_log_lines(),
            1000 - u64::from(GUEST_LOG_LINES_PER_SEC)
        );
        for _ in 0..EVENT_RING {
            c.write(0, EVENT, &0x42u32.to_le_bytes());
        }
        assert_eq!(c.events().len(), EVENT_RING);
    }

    #[test]
    fn restore_refuses_too_many_recent_events() {
        let ev = GuestEvent {
            code: 5,
            vcpu: 0,
            realtime_ns: 1,
        };
        let mut s = GuestControlState {
            recent_events: vec![ev; RECENT_EVENTS],
            ..Default::default()
        };
        let c = GuestControl::new();
        c.set_state(&s).unwrap();
        assert_eq!(c.events().len(), RECENT_EVENTS);
        s.recent_events.push(ev);
        let e = c.set_state(&s).unwrap_err();
        assert!(e.contains("65 entries") && e.contains("at most 64"), "{e}");
        // Nothing was changed by the refused state.
        assert_eq!(c.events().len(), RECENT_EVENTS);
    }

    #[test]
    fn state_round_trip() {
        let a = GuestControl::new();
        a.heartbeat(0, 10, 100);
        a.heartbeat(0, 11, 250);
        a.event(0, EVENT_WORKLOAD_RUNNING);
        let s = a.state();
        let b = GuestControl::new();
        b.set_state(&s).unwrap();
        assert_eq!(b.state(), s);
        b.heartbeat(0, 12, 1_000);
        assert_eq!(b.heartbeats().count, 3);
        assert_eq!(b.heartbeats().max_gap_ns, 750);
    }
}
