//! VMM processes: spawned in their own session (so they outlive the daemon), output to a log
//! file, pid files, liveness checks that are not fooled by pid reuse.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::UtilError;

/// Spawns `program args` in a new session (`setsid`: a daemon restart or its terminal's
/// hang-up does not touch it), stdin from /dev/null, stdout and stderr appended to `log`, and
/// writes its pid to `pid_file`. The caller keeps the [`Child`] to reap it.
pub fn spawn_detached(
    program: &Path,
    args: &[String],
    log: &Path,
    pid_file: &Path,
) -> Result<Child, UtilError> {
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| UtilError::io(format!("opening {}", log.display()), e))?;
    let err = out
        .try_clone()
        .map_err(|e| UtilError::io(format!("duplicating {}", log.display()), e))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    // SAFETY: `setsid` is async-signal-safe and touches no memory of the parent; it runs in
    // the forked child before exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| UtilError::io(format!("starting {}", program.display()), e))?;
    crate::dirs::write_atomic(pid_file, format!("{}\n", child.id()).as_bytes())?;
    Ok(child)
}

/// Reads a pid file.
pub fn read_pid_file(path: &Path) -> Result<u32, UtilError> {
    let t = std::fs::read_to_string(path)
        .map_err(|e| UtilError::io(format!("reading {}", path.display()), e))?;
    t.trim()
        .parse()
        .map_err(|_| UtilError::Vmm(format!("{}: not a pid: '{}'", path.display(), t.trim())))
}

/// Whether `pid` is a live process (not a zombie) whose executable's name is `exe_name`
/// (guards against a recycled pid).
pub fn is_alive(pid: u32, exe_name: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) S ...`: the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    if matches!(state, Some("Z" | "X") | None) {
        return false;
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let name = exe
        .as_ref()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(" (deleted)").to_string());
    name.as_deref() == Some(exe_name)
}

/// Sends `sig` to `pid` (a vanished process is fine).
pub fn signal(pid: u32, sig: libc::c_int) -> Result<(), UtilError> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| UtilError::Vmm(format!("pid {pid} out of range")))?;
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    let r = unsafe { libc::kill(pid, sig) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(UtilError::io(format!("kill({pid}, {sig})"), e))
    }
}

/// The last `max` bytes of a log file (for error messages).
pub fn log_tail(path: &Path, max: usize) -> String {
    let data = std::fs::read(path).unwrap_or_default();
    let start = data.len().saturating_sub(max);
    String::from_utf8_lossy(&data[start..]).trim().to_string()
}
