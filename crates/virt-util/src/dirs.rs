//! State and runtime directories.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use crate::UtilError;

/// Creates `dir` (and its parents) with `mode` if missing; sets `mode` on it.
pub fn ensure_dir(dir: &Path, mode: u32) -> Result<(), UtilError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| UtilError::io(format!("creating {}", dir.display()), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .map_err(|e| UtilError::io(format!("chmod {}", dir.display()), e))
}

/// Writes `data` to `path` atomically (temporary file + rename).
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), UtilError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)
        .map_err(|e| UtilError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| UtilError::io(format!("renaming {} into place", path.display()), e))
}

/// Removes a file; a missing file is fine.
pub fn remove_file(path: &Path) -> Result<(), UtilError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(UtilError::io(format!("removing {}", path.display()), e)),
    }
}
