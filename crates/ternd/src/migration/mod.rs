//! Migration with libvirt's version 3 phases, peer to peer: the source daemon runs Begin,
//! calls the destination daemon's Prepare, runs Perform, calls Finish, and runs Confirm
//! (`docs/management.md` §Migration has the phase table and every failure case).

pub mod dest;
pub mod jobs;
pub mod postcopy;
pub mod resume;
pub mod resume_dest;
pub mod source;
pub mod source_recovery;
mod stats;
mod tls;
mod tunnel;

/// Capabilities the cookies report: those the orchestration negotiates. (Each one found off
/// costs two QMP round trips to probe, in Begin and in Prepare: options needing others, e.g.
/// post-copy or multifd, are refused before Begin.)
pub const COOKIE_CAPABILITIES: &[&str] = &["events", "return-path", "switchover-ack"];

/// Terminal `query-migrate` statuses (Tern's `x-tern-unconfirmed` included).
pub fn is_terminal(status: &str) -> bool {
    matches!(
        status,
        "completed" | "failed" | "cancelled" | "x-tern-unconfirmed"
    )
}
