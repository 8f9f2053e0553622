//! A TLS session over a socket, split into a reading and a writing half that work at the same
//! time (the main stream and the return path share one connection).
//!
//! The rustls state sits behind one mutex that is held only for CPU work (encrypting into a
//! buffer, decrypting from one), never across a socket call: a reader blocked in `read(2)`
//! never holds it, so a writer can always encrypt, and a writer blocked on a full send buffer
//! never stops the reader from draining the peer. A second mutex orders the encrypted records
//! on the socket (encrypt + send under it), so records leave in the order rustls made them.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::Connection;

use crate::x509::describe;

struct Shared {
    conn: Mutex<Connection>,
    send_order: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another half cannot leave rustls' state half-updated in a way we could
    // repair; keep going and let rustls report the error it sees.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn tls_io_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, TlsIoError(describe(&e), e))
}

/// A rustls error with its description (what `error-desc` shows).
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsIoError(pub String, #[source] pub rustls::Error);

/// Runs the handshake to completion on `sock` (blocking), before any application byte.
pub fn handshake<S: Read + Write>(conn: &mut Connection, sock: &mut S) -> io::Result<()> {
    while conn.is_handshaking() {
        match conn.complete_io(sock) {
            Ok((0, 0)) if conn.is_handshaking() => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "TLS: the peer closed the connection during the handshake",
                ))
            }
            Ok(_) => {}
            Err(e) => return Err(map_rustls_io(e)),
        }
    }
    Ok(())
}

/// An io::Error that wraps a rustls::Error gets the described text.
fn map_rustls_io(e: io::Error) -> io::Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => tls_io_error(tls.clone()),
        None => e,
    }
}

/// The reading half.
pub struct TlsReader<R> {
    shared: Arc<Shared>,
    sock: R,
    buf: Vec<u8>,
    /// `buf[start..end]`: ciphertext read from the socket, not yet given to rustls.
    start: usize,
    end: usize,
}

/// The writing half.
pub struct TlsWriter<W> {
    shared: Arc<Shared>,
    sock: W,
}

/// Splits an established session into halves over two handles of the same socket (e.g.
/// `try_clone`s). The handshake must be complete ([`handshake`]).
pub fn split<R: Read, W: Write>(
    conn: Connection,
    reader: R,
    writer: W,
) -> (TlsReader<R>, TlsWriter<W>) {
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        send_order: Mutex::new(()),
    });
    (
        TlsReader {
            shared: shared.clone(),
            sock: reader,
            buf: vec![0; 64 << 10],
            start: 0,
            end: 0,
        },
        TlsWriter {
            shared,
            sock: writer,
        },
    )
}

/// Encrypted bytes rustls has queued, taken out under the connection lock.
fn take_pending(conn: &mut Connection) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(out)
}

impl<R: Read> Read for TlsReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let mut conn = lock(&self.shared.conn);
                match conn.reader().read(out) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            if self.start < self.end {
                // Plaintext is empty: hand rustls the next of the ciphertext already read.
                let mut conn = lock(&self.shared.conn);
                let mut data = &self.buf[self.start..self.end];
                let taken = conn.read_tls(&mut data)?;
                if taken == 0 {
                    return Err(io::Error::other("TLS: the session accepts no more input"));
                }
                self.start += taken;
                // Anything rustls must answer (a key update) stays queued and leaves, in order,
                // with the writer's next record (take_pending drains the whole queue).
                conn.process_new_packets().map_err(tls_io_error)?;
                continue;
            }
            // No lock held across the socket read.
            let n = self.sock.read(&mut self.buf)?;
            if n == 0 {
                let conn = lock(&self.shared.conn);
                return match conn.is_handshaking() {
                    true => Err(io::ErrorKind::UnexpectedEof.into()),
                    // No close_notify: the peer vanished; the caller sees end-of-stream as with
                    // a plain socket and its own framing decides whether that was premature.
                    false => Ok(0),
                };
            }
            (self.start, self.end) = (0, n);
        }
    }
}

impl<W: Write> Write for TlsWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let _order = lock(&self.shared.send_order);
        // One TLS record's worth at a time, so rustls' send buffer limit is never reached.
        for chunk in data.chunks(16 << 10) {
            let encrypted = {
                let mut conn = lock(&self.shared.conn);
                conn.writer().write_all(chunk)?;
                take_pending(&mut conn)?
            };
            self.sock.write_all(&encrypted)?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

impl<W: Write> TlsWriter<W> {
    /// Sends close_notify (the peer then reads end-of-stream).
    pub fn close(&mut self) -> io::Result<()> {
        let _order = lock(&self.shared.send_order);
        let encrypted = {
            let mut conn = lock(&self.shared.conn);
            conn.send_close_notify();
            take_pending(&mut conn)?
        };
        self.sock.write_all(&encrypted)
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
