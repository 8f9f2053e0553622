//! Runtime status files (`RUN_DIR/domains/NAME.json`): what a restarted daemon needs to find
//! a running VMM again (libvirt's `/run/libvirt/qemu/NAME.xml` status files).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One active domain's status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub id: u32,
    pub pid: u32,
    pub exe_name: String,
    /// The live definition.
    pub xml: String,
    pub persistent: bool,
    /// An incoming migration whose Finish has not completed: a restarted daemon kills the VMM
    /// (the source never heard that it runs here, so the source may run the domain).
    pub incoming: bool,
    /// An outgoing migration was in flight (the source side's recovery).
    pub outgoing: bool,
    /// Its destination daemon's URI (a restarted source daemon calls Finish there).
    #[serde(default)]
    pub dest_uri: Option<String>,
    /// The outgoing migration's destination runs the guest by itself after the stream (a
    /// `completed` source means it runs).
    #[serde(default)]
    pub dest_decides: bool,
    /// The migration (either direction) switched to post-copy: a restarted daemon never
    /// resumes this source, never cancels, and never kills this destination (§5c).
    #[serde(default)]
    pub postcopy: bool,
    /// This side of a post-copy migration failed after the switch and may be resumed
    /// (`--postcopy-resume`, §5d): a restarted daemon shows it `post-copy failed` again, never
    /// resumes a source and never kills a destination.
    #[serde(default)]
    pub postcopy_failed: Option<PostcopySide>,
}

/// Which side of a failed post-copy migration a VMM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PostcopySide {
    Source,
    Destination,
}

pub fn status_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join("domains").join(format!("{name}.json"))
}

pub fn vmm_dir(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join("domains").join(name)
}

pub fn save(run_dir: &Path, name: &str, st: &Status) -> Result<(), String> {
    let data = serde_json::to_vec_pretty(st).map_err(|e| e.to_string())?;
    virt_util::dirs::write_atomic(&status_path(run_dir, name), &data).map_err(|e| e.to_string())
}

pub fn load(path: &Path) -> Result<Status, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&data).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn remove(run_dir: &Path, name: &str) {
    let _ = virt_util::dirs::remove_file(&status_path(run_dir, name));
    let _ = std::fs::remove_dir_all(vmm_dir(run_dir, name));
}
