//! The end of the switchover: once END is flushed the destination decides, and the source
//! waits (bounded by `x-tern-resume-timeout`) for what it says on the return path.
//!
//! | the return path brings | the destination | source outcome |
//! | --- | --- | --- |
//! | `RESUMED` | runs | `completed`, refuses `cont` |
//! | `SHUT{0}` without `RESUMED` | loaded, paused (`-S`, or a paused guest) | `completed`, `cont` allowed |
//! | `ERROR` / `SHUT{1}` | failed, never runs | `failed`, resumed at once |
//! | nothing: closed, broken, cancel, timeout | unknown | `x-tern-unconfirmed`, paused |

use std::time::{Duration, Instant};

use super::{Flags, Sender};

/// What the destination said after END.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Confirmation {
    /// `RESUMED` (at this instant): the guest runs on the destination.
    Resumed(Instant),
    /// `SHUT{0}` without `RESUMED`: loaded and paused; nothing runs until someone says `cont`.
    LoadedPaused(Instant),
    /// `ERROR` / `SHUT{1}`: the destination failed and will never run this guest.
    Failed(String),
    /// No conclusive answer; why.
    Unknown(String),
}

/// The conclusion the flags allow now, if any.
fn conclude(f: &Flags) -> Option<Confirmation> {
    if let Some(at) = f.resumed_at {
        return Some(Confirmation::Resumed(at));
    }
    if let Some(d) = &f.dest_error {
        return Some(Confirmation::Failed(d.clone()));
    }
    if let Some((at, false)) = f.shut_at {
        return Some(Confirmation::LoadedPaused(at));
    }
    if f.cancel {
        return Some(Confirmation::Unknown(
            "migrate_cancel was issued while waiting for it".into(),
        ));
    }
    if let Some(r) = &f.rp_fault {
        return Some(Confirmation::Unknown(r.clone()));
    }
    if f.rp_closed {
        return Some(Confirmation::Unknown(
            "the return path closed without RESUMED".into(),
        ));
    }
    None
}

impl Sender {
    /// Waits for the destination's verdict on the stream whose END was flushed at
    /// `flushed_at`. The limit is re-read at every wake-up, so `migrate-set-parameters` can
    /// extend or shorten a wait in progress.
    pub(super) fn await_destination(&self, flushed_at: Instant) -> Confirmation {
        let mut f = self.shared.lock();
        loop {
            if let Some(c) = conclude(&f) {
                return c;
            }
            let ms = f.tuning.resume_timeout_ms;
            let deadline = flushed_at + Duration::from_millis(ms);
            let now = Instant::now();
            if now >= deadline {
                return Confirmation::Unknown(format!(
                    "no RESUMED within {ms} ms, x-tern-resume-timeout"
                ));
            }
            f = self
                .shared
                .cv
                .wait_timeout(f, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_destination_s_word_wins_over_the_channel_s_end() {
        let now = Instant::now();
        let mut f = Flags::default();
        assert_eq!(conclude(&f), None);
        f.rp_closed = true;
        assert!(matches!(conclude(&f), Some(Confirmation::Unknown(_))));
        f.shut_at = Some((now, false));
        assert_eq!(conclude(&f), Some(Confirmation::LoadedPaused(now)));
        f.dest_error = Some("checksum mismatch".into());
        assert_eq!(
            conclude(&f),
            Some(Confirmation::Failed("checksum mismatch".into()))
        );
        f.resumed_at = Some(now);
        assert_eq!(conclude(&f), Some(Confirmation::Resumed(now)));
    }

    #[test]
    fn cancel_without_an_answer_is_unknown() {
        let f = Flags {
            cancel: true,
            rp_closed: true,
            ..Flags::default()
        };
        match conclude(&f) {
            Some(Confirmation::Unknown(r)) => assert!(r.contains("migrate_cancel"), "{r}"),
            other => panic!("{other:?}"),
        }
    }
}
