//! Migration with libvirt's version 3 phases, peer to peer: the source daemon runs Begin,
//! calls the destination daemon's Prepare, runs Perform, calls Finish, and runs Confirm
//! (`docs/management.md` §Migration has the phase table and every failure case).

pub mod dest;
pub mod jobs;
pub mod source;
mod stats;

/// Capabilities the cookies report (those the orchestration uses or refuses by name).
pub const COOKIE_CAPABILITIES: &[&str] = &[
    "events",
    "return-path",
    "switchover-ack",
    "pause-before-switchover",
    "postcopy-ram",
    "auto-converge",
    "multifd",
];

/// Terminal `query-migrate` statuses (Tern's `x-tern-unconfirmed` included).
pub fn is_terminal(status: &str) -> bool {
    matches!(
        status,
        "completed" | "failed" | "cancelled" | "x-tern-unconfirmed"
    )
}
