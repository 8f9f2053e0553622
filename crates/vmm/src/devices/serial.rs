//! COM1 (0x3f8..0x3ff): vm-superio's 16550 with a pluggable output sink and a host-side,
//! timestamped, bounded ring of output lines.
//!
//! `SerialTarget::UnixSocket` *listens* on the path (like QEMU's `server=on,wait=off`): one
//! client at a time; a `serial-in` thread accepts it and feeds what it sends into the UART's
//! receive FIFO. Output goes to the connected client (non-blocking: bytes are dropped and counted
//! if the client does not read) and is dropped while nobody is connected.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::control::realtime_ns;
use super::log_limit::{LogLimiter, Permit};
use crate::error::{Error, Result};

/// First port of COM1.
pub const COM1: u16 = 0x3f8;
/// Ports COM1 decodes.
pub const SPAN: u16 = 8;
/// COM1's IRQ line.
pub const IRQ: u32 = 4;
/// Serial lines kept in memory.
pub const LINE_RING: usize = 4096;
/// Longest line kept (longer lines are split).
pub const MAX_LINE: usize = 4096;

/// Where the guest's serial output goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SerialTarget {
    /// Nowhere (the in-memory ring still records it).
    #[default]
    None,
    /// The VMM's stdout.
    Stdout,
    /// A file (created or truncated).
    File(PathBuf),
    /// A unix socket the VMM listens on.
    UnixSocket(PathBuf),
}

/// One line of serial output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialLine {
    /// Index of the line since the machine started (monotonic, never reused).
    pub index: u64,
    /// `CLOCK_REALTIME` (ns) when the newline arrived.
    pub realtime_ns: u64,
    /// The text, without the newline (bytes that are not UTF-8 are replaced).
    pub text: String,
}

enum Sink {
    None,
    Stdout,
    File(File),
    Socket(Option<UnixStream>),
}

struct SinkInner {
    sink: Sink,
    partial: Vec<u8>,
    lines: VecDeque<SerialLine>,
    next_index: u64,
}

/// The shared output side: sink + line ring.
pub struct SerialOutput {
    inner: Mutex<SinkInner>,
    cv: Condvar,
    lost_bytes: AtomicU64,
}

impl std::fmt::Debug for SerialOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialOutput").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Line buffers stay consistent even if a holder panicked.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SerialOutput {
    fn push_line(inner: &mut SinkInner) {
        let text = String::from_utf8_lossy(&inner.partial).into_owned();
        inner.partial.clear();
        if inner.lines.len() >= LINE_RING {
            inner.lines.pop_front();
        }
        let index = inner.next_index;
        inner.next_index += 1;
        inner.lines.push_back(SerialLine {
            index,
            realtime_ns: realtime_ns(),
            text,
        });
    }

    fn emit(&self, buf: &[u8]) {
        let mut inner = lock(&self.inner);
        let ok = match &mut inner.sink {
            Sink::None => true,
            Sink::Stdout => io::stdout().write_all(buf).is_ok(),
            Sink::File(f) => f.write_all(buf).is_ok(),
            Sink::Socket(None) => true,
            Sink::Socket(Some(s)) => s.write_all(buf).is_ok(),
        };
        if !ok {
            self.lost_bytes
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        let mut new_line = false;
        for &b in buf {
            if b == b'\n' {
                Self::push_line(&mut inner);
                new_line = true;
            } else if b != b'\r' {
                inner.partial.push(b);
                if inner.partial.len() >= MAX_LINE {
                    Self::push_line(&mut inner);
                    new_line = true;
                }
            }
        }
        drop(inner);
        if new_line {
            self.cv.notify_all();
        }
    }

    /// Lines with index >= `from` still in the ring.
    pub fn lines(&self, from: u64) -> Vec<SerialLine> {
        let inner = lock(&self.inner);
        inner
            .lines
            .iter()
            .filter(|l| l.index >= from)
            .cloned()
            .collect()
    }

    /// Waits until a line with index >= `from` satisfies `pred` or `deadline` passes.
    pub fn wait_line(
        &self,
        from: u64,
        deadline: Instant,
        pred: impl Fn(&SerialLine) -> bool,
    ) -> Option<SerialLine> {
        let mut inner = lock(&self.inner);
        loop {
            if let Some(l) = inner.lines.iter().find(|l| l.index >= from && pred(l)) {
                return Some(l.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            inner = self
                .cv
                .wait_timeout(inner, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Output bytes the sink could not take.
    pub fn lost_bytes(&self) -> u64 {
        self.lost_bytes.load(Ordering::Relaxed)
    }
}

/// The writer handed to vm-superio.
#[derive(Clone, Debug)]
pub struct SerialWriter(Arc<SerialOutput>);

impl Write for SerialWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.emit(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Raises COM1's interrupt through an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl IrqTrigger {
    fn try_clone(&self) -> Result<Self> {
        self.0
            .try_clone()
            .map(IrqTrigger)
            .map_err(|e| Error::io("cloning the serial irq eventfd", e))
    }
}

/// The UART type.
pub type Uart = Serial<IrqTrigger, NoEvents, SerialWriter>;

/// Saved UART registers and receive FIFO (vm-superio's `SerialState`, in our own serde type).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Unread input.
    pub in_buffer: Vec<u8>,
}

impl From<&SerialState> for SerialDeviceState {
    fn from(s: &SerialState) -> Self {
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// COM1.
#[derive(Debug)]
pub struct SerialDevice {
    uart: Arc<Mutex<Uart>>,
    output: Arc<SerialOutput>,
    trigger: IrqTrigger,
    stop: EventFd,
    input_thread: Mutex<Option<JoinHandle<()>>>,
    /// Rate limit of the log lines of failing guest writes.
    write_errors: Mutex<LogLimiter>,
}

impl SerialDevice {
    /// Opens `target` and builds the UART; `irq` is the eventfd wired to IRQ 4.
    pub fn new(target: &SerialTarget, irq: EventFd) -> Result<Self> {
        let mut listener = None;
        let sink = match target {
            SerialTarget::None => Sink::None,
            SerialTarget::Stdout => Sink::Stdout,
            SerialTarget::File(p) => Sink::File(
                File::create(p)
                    .map_err(|e| Error::io(format!("serial file {}", p.display()), e))?,
            ),
            SerialTarget::UnixSocket(p) => {
                // A stale socket file from an earlier run would make bind fail.
                if p.exists() {
                    let _ = std::fs::remove_file(p);
                }
                listener = Some(
                    UnixListener::bind(p)
                        .map_err(|e| Error::io(format!("serial socket {}", p.display()), e))?,
                );
                Sink::Socket(None)
            }
        };
        let output = Arc::new(SerialOutput {
            inner: Mutex::new(SinkInner {
                sink,
                partial: Vec::new(),
                lines: VecDeque::new(),
                next_index: 0,
            }),
            cv: Condvar::new(),
            lost_bytes: AtomicU64::new(0),
        });
        let trigger = IrqTrigger(irq);
        let uart = Uart::new(trigger.try_clone()?, SerialWriter(output.clone()));
        let uart = Arc::new(Mutex::new(uart));
        let stop =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::io("serial stop eventfd", e))?;
        let dev = SerialDevice {
            uart,
            output,
            trigger,
            stop,
            input_thread: Mutex::new(None),
            write_errors: Mutex::new(LogLimiter::default()),
        };
        if let Some(l) = listener {
            let uart = dev.uart.clone();
            let output = dev.output.clone();
            let stop = dev
                .stop
                .try_clone()
                .map_err(|e| Error::io("serial stop eventfd", e))?;
            *lock(&dev.input_thread) = Some(
                std::thread::Builder::new()
                    .name("serial-in".into())
                    .spawn(move || input_loop(l, stop, uart, output))
                    .map_err(|e| Error::io("spawning serial-in", e))?,
            );
        }
        Ok(dev)
    }

    /// Port read at `offset` from COM1.
    pub fn read(&self, offset: u8) -> u8 {
        lock(&self.uart).read(offset)
    }

    /// Port write at `offset` from COM1. A failing write (the output target broke) is logged
    /// under a rate limit: the guest writes every byte.
    pub fn write(&self, offset: u8, value: u8) {
        if let Err(e) = lock(&self.uart).write(offset, value) {
            let permit = lock(&self.write_errors).check(Instant::now());
            if let Permit::Log { suppressed } = permit {
                tracing::warn!(
                    suppressed,
                    "serial: write to offset {offset}: {e:?} ({suppressed} earlier failures not logged)"
                );
            }
        }
    }

    /// The output ring.
    pub fn output(&self) -> &Arc<SerialOutput> {
        &self.output
    }

    /// The UART state.
    pub fn state(&self) -> SerialDeviceState {
        SerialDeviceState::from(&lock(&self.uart).state())
    }

    /// Replaces the UART state (output sink and ring are host-side and kept).
    pub fn set_state(&self, state: &SerialDeviceState) -> Result<()> {
        let uart = Uart::from_state(
            &SerialState::from(state),
            self.trigger.try_clone()?,
            NoEvents,
            SerialWriter(self.output.clone()),
        )
        .map_err(|e| Error::component("serial", 0, format!("invalid UART state: {e:?}")))?;
        *lock(&self.uart) = uart;
        Ok(())
    }

    /// Stops the `serial-in` thread.
    pub fn shutdown(&self) {
        if let Some(t) = lock(&self.input_thread).take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

impl Drop for SerialDevice {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Waits until `fd` or `stop` is readable; false when `stop` fired.
fn wait_readable(fd: i32, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents != 0 {
            return true;
        }
    }
}

fn input_loop(
    listener: UnixListener,
    stop: EventFd,
    uart: Arc<Mutex<Uart>>,
    output: Arc<SerialOutput>,
) {
    while wait_readable(listener.as_raw_fd(), &stop) {
        let Ok((mut conn, _)) = listener.accept() else {
            continue;
        };
        if conn.set_nonblocking(true).is_err() {
            continue;
        }
        match conn.try_clone() {
            Ok(w) => lock(&output.inner).sink = Sink::Socket(Some(w)),
            Err(_) => continue,
        }
        let mut buf = [0u8; 64];
        loop {
            if !wait_readable(conn.as_raw_fd(), &stop) {
                return;
            }
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let mut u = lock(&uart);
                    let room = u.fifo_capacity();
                    if let Err(e) = u.enqueue_raw_bytes(&buf[..n.min(room)]) {
                        tracing::warn!("serial input: {e:?}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        lock(&output.inner).sink = Sink::Socket(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(target: &SerialTarget) -> SerialDevice {
        SerialDevice::new(target, EventFd::new(libc::EFD_NONBLOCK).unwrap()).unwrap()
    }

    #[test]
    fn lines_are_recorded_with_indices() {
        let d = dev(&SerialTarget::None);
        for b in b"hello\r\nworld\npartial" {
            d.write(0, *b);
        }
        let lines = d.output().lines(0);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].text, "hello");
        assert_eq!(lines[1].index, 1);
        assert_eq!(d.output().lines(1).len(), 1);
    }

    #[test]
    fn file_target_gets_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let d = dev(&SerialTarget::File(path.clone()));
        for b in b"abc\n" {
            d.write(0, *b);
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"abc\n");
    }

    #[test]
    fn socket_target_passes_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.sock");
        let d = dev(&SerialTarget::UnixSocket(path.clone()));
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"x").unwrap();
        // Wait (bounded) for the byte to reach the FIFO: LSR bit 0 = data ready.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while d.read(5) & 1 == 0 {
            assert!(Instant::now() < deadline, "input never arrived");
            std::thread::yield_now();
        }
        assert_eq!(d.read(0), b'x');
        // Output reaches the client once it is registered as the sink.
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while matches!(lock(&d.output.inner).sink, Sink::Socket(None)) {
            assert!(Instant::now() < deadline, "client never registered");
            std::thread::yield_now();
        }
        d.write(0, b'y');
        let mut b = [0u8; 1];
        client.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"y");
    }

    #[test]
    fn state_round_trip_keeps_registers_and_fifo() {
        let a = dev(&SerialTarget::None);
        a.write(3, 0x80); // DLAB
        a.write(0, 0x0c);
        a.write(3, 0x03);
        a.write(7, 0x5a);
        lock(&a.uart).enqueue_raw_bytes(b"in").unwrap();
        let s = a.state();
        let b = dev(&SerialTarget::None);
        b.set_state(&s).unwrap();
        assert_eq!(b.state(), s);
        assert_eq!(b.read(7), 0x5a);
    }
}
