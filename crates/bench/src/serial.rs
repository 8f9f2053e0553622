//! The harness side of a QEMU guest's serial port: the harness listens on a unix socket, QEMU
//! connects to it (`-chardev socket,server=off`), so no byte is lost before the harness is ready.
//! A named reader thread stamps every read with `CLOCK_REALTIME` on arrival.
//!
//! Guest output under the PVH entry: one heartbeat byte per beat (`0x40 + seq % 32`, '@'..'_')
//! and status lines starting with '#' and ending with '\n' (which may contain the same bytes, so
//! the parser tracks whether it is inside a line).

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

use crate::facts::realtime_ns;

/// What the reader has seen so far.
#[derive(Debug, Default, Clone)]
pub struct TapData {
    /// (seq % 32, arrival ns) per heartbeat byte.
    pub heartbeats: Vec<(u64, u64)>,
    /// (arrival ns, text without '#' and '\n') per status line.
    pub lines: Vec<(u64, String)>,
    pub connected_ns: Option<u64>,
    pub closed: bool,
}

#[derive(Default)]
struct Parser {
    line: Option<Vec<u8>>,
}

impl Parser {
    fn feed(&mut self, bytes: &[u8], ns: u64, d: &mut TapData) {
        for &b in bytes {
            if let Some(line) = self.line.as_mut() {
                if b == b'\n' {
                    let text = String::from_utf8_lossy(line).to_string();
                    d.lines.push((ns, text));
                    self.line = None;
                } else if line.len() < 4096 {
                    line.push(b);
                }
            } else if b == b'#' {
                self.line = Some(Vec::new());
            } else if (0x40..=0x5f).contains(&b) {
                d.heartbeats.push(((b - 0x40) as u64, ns));
            }
        }
    }
}

/// A listening serial socket plus its reader thread.
pub struct SerialTap {
    path: PathBuf,
    data: Arc<Mutex<TapData>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SerialTap {
    pub fn listen(path: &Path, name: &str) -> anyhow::Result<SerialTap> {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        listener.set_nonblocking(true)?;
        let data = Arc::new(Mutex::new(TapData::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (data.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("serial-{name}"))
            .spawn(move || reader(listener, d, s))
            .context("spawning the serial reader")?;
        Ok(SerialTap {
            path: path.to_path_buf(),
            data,
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Heartbeats arrived after index `from` (and the new length).
    pub fn heartbeats_from(&self, from: usize) -> Vec<(u64, u64)> {
        self.data
            .lock()
            .map(|d| {
                d.heartbeats
                    .get(from..)
                    .map(|s| s.to_vec())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    pub fn lines(&self) -> Vec<(u64, String)> {
        self.data
            .lock()
            .map(|d| d.lines.clone())
            .unwrap_or_default()
    }
}

impl Drop for SerialTap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn reader(listener: UnixListener, data: Arc<Mutex<TapData>>, stop: Arc<AtomicBool>) {
    let mut stream = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => {
                tracing::warn!("serial accept: {e}");
                return;
            }
        }
    };
    if let Ok(mut d) = data.lock() {
        d.connected_ns = Some(realtime_ns());
    }
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut parser = Parser::default();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let ns = realtime_ns();
                if let Ok(mut d) = data.lock() {
                    parser.feed(&buf[..n], ns, &mut d);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if let Ok(mut d) = data.lock() {
        d.closed = true;
    }
}

/// Parses `key=<number>` out of a status line such as `t=3s hb=2999 pages=12913 passes=0 vcpus=1`.
pub fn line_value(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|tok| tok.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.trim_end_matches('s').parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_heartbeats_and_lines() {
        let mut d = TapData::default();
        let mut p = Parser::default();
        p.feed(b"@AB#running fill_ms=0\nC#t=1", 5, &mut d);
        p.feed(b"s hb=699 pages=1_\n_", 7, &mut d);
        let seqs: Vec<u64> = d.heartbeats.iter().map(|h| h.0).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 31]);
        assert_eq!(d.lines.len(), 2);
        assert_eq!(d.lines[0].1, "running fill_ms=0");
        assert_eq!(line_value(&d.lines[1].1, "hb"), Some(699));
        assert_eq!(line_value(&d.lines[1].1, "t"), Some(1));
        assert_eq!(line_value("running fill_ms=12", "fill_ms"), Some(12));
    }
}
