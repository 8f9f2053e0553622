//! The RPC protocol between `ternctl`/peer daemons and `ternd`: frames of a 4-byte big-endian
//! length followed by that many bytes of JSON (serde). A client sends [`Request`]s and reads
//! [`ServerMessage`]s: one `Reply` per request, in order; after `EventRegister` the connection
//! carries only `Event`s.

use std::io::{Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{
    DomainEvent, DomainInfo, DomainState, DomainSummary, Error, JobInfo, MigrateOptions,
    MigrationCookie,
};

/// Largest frame either side accepts (a peer is not trusted to be reasonable).
pub const MAX_FRAME: usize = 16 << 20;

/// The default TCP port of `ternd`'s remote API (libvirt's is 16509).
pub const DEFAULT_TCP_PORT: u16 = 16519;
/// The default port of the remote API over TLS, `tern+tls` (libvirt's is 16514; Tern's
/// ports sit 10 above libvirt's so both can run on one host).
pub const DEFAULT_TLS_PORT: u16 = 16524;

/// A request: `id` is echoed in the reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub call: Call,
}

/// The procedures (libvirt's `remote_procedure`). `domain` is a name or a UUID.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Call {
    Ping,
    ListDomains {
        all: bool,
    },
    DefineXml {
        xml: String,
    },
    Undefine {
        domain: String,
    },
    CreateXml {
        xml: String,
        paused: bool,
    },
    Start {
        domain: String,
        paused: bool,
    },
    Shutdown {
        domain: String,
    },
    Destroy {
        domain: String,
    },
    Suspend {
        domain: String,
    },
    Resume {
        domain: String,
    },
    DomInfo {
        domain: String,
    },
    DomState {
        domain: String,
    },
    DumpXml {
        domain: String,
        inactive: bool,
    },
    JobInfo {
        domain: String,
        completed: bool,
    },
    /// `domjobabort`; `postcopy`: `--postcopy` (`VIR_DOMAIN_ABORT_JOB_POSTCOPY`), QMP
    /// `migrate-pause` on a migration in post-copy.
    JobAbort {
        domain: String,
        #[serde(default)]
        postcopy: bool,
    },
    SetMaxDowntime {
        domain: String,
        ms: u64,
    },
    GetMaxDowntime {
        domain: String,
    },
    /// MiB/s, libvirt's unit.
    /// `postcopy`: `max-postcopy-bandwidth` instead of `max-bandwidth` (`--postcopy`).
    SetMaxSpeed {
        domain: String,
        mib_s: u64,
        #[serde(default)]
        postcopy: bool,
    },
    GetMaxSpeed {
        domain: String,
        #[serde(default)]
        postcopy: bool,
    },
    /// `migrate-postcopy` (`virDomainMigrateStartPostCopy`): QMP `migrate-start-postcopy` on
    /// the source VMM of an outgoing migration started with `--postcopy`.
    MigrateStartPostcopy {
        domain: String,
    },
    /// Peer-to-peer migration driven by this daemon (the source).
    Migrate {
        domain: String,
        dest_uri: String,
        options: MigrateOptions,
    },
    /// `qemu-monitor-command`: a raw QMP command (JSON text) to the domain's VMM.
    MonitorCommand {
        domain: String,
        command: String,
    },
    /// Turns this connection into an event stream (`domain`: only that domain's events).
    EventRegister {
        domain: Option<String>,
    },
    /// v3 Prepare, called by the source daemon on the destination daemon.
    MigratePrepare {
        xml: String,
        cookie: MigrationCookie,
        options: MigrateOptions,
    },
    /// Prepare of a post-copy resume (`--postcopy-resume`, libvirt's prepare_resume phase),
    /// called by the source daemon on the destination daemon: its VMM, `postcopy-paused`,
    /// listens for the recovery channel (`migrate-recover`); the reply's cookie has the URI.
    MigratePrepareResume {
        domain: String,
        cookie: MigrationCookie,
        options: MigrateOptions,
    },
    /// Tunnelled migration (`VIR_MIGRATE_TUNNELLED`): after its `Unit` reply this connection
    /// carries only the migration stream, raw, into the prepared incoming VMM of `domain`.
    MigrateTunnel {
        domain: String,
    },
    /// v3 Finish on the destination: `cancelled` = the source's Perform failed.
    MigrateFinish {
        domain: String,
        cancelled: bool,
    },
}

/// Reply payloads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    Unit,
    Pong { host: String },
    Domains(Vec<DomainSummary>),
    Info(Box<DomainInfo>),
    State { state: DomainState, reason: String },
    Xml(String),
    Job(Box<JobInfo>),
    Number(u64),
    Text(String),
    Cookie(MigrationCookie),
    Name(String),
}

/// What the server sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ServerMessage {
    Reply {
        id: u64,
        result: Result<Reply, Error>,
    },
    Event(DomainEvent),
}

/// Framing errors.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    /// The first bytes are a TLS record header (handshake or alert), not a frame length.
    #[error(
        "the peer speaks TLS on this connection (use tern+tls:// for a daemon's --listen-tls port)"
    )]
    PeerSpeaksTls,
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame. EOF before a frame starts is [`FrameError::Closed`].
pub fn read_frame<T: DeserializeOwned>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    // A TLS record starts with its type (0x15 alert, 0x16 handshake) and version 0x03 0x0N:
    // as a length that is far above MAX_FRAME, so it is never a real frame.
    if matches!(len, [0x15 | 0x16, 0x03, 0..=0x04, _]) {
        return Err(FrameError::PeerSpeaksTls);
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(FrameError::TooLarge(n));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_record_is_named_not_taken_for_a_frame() {
        for head in [[0x16, 0x03, 0x01, 0x02], [0x15, 0x03, 0x03, 0x00]] {
            let mut r: &[u8] = &[head[0], head[1], head[2], head[3], 0, 0];
            assert!(matches!(
                read_frame::<Request>(&mut r),
                Err(FrameError::PeerSpeaksTls)
            ));
        }
    }

    #[test]
    fn frames_round_trip_and_limits_hold() {
        let mut buf = Vec::new();
        let req = Request {
            id: 7,
            call: Call::Start {
                domain: "vm1".into(),
                paused: false,
            },
        };
        write_frame(&mut buf, &req).expect("write");
        let back: Request = read_frame(&mut buf.as_slice()).expect("read");
        assert_eq!(back.id, 7);
        assert!(matches!(back.call, Call::Start { ref domain, paused: false } if domain == "vm1"));

        let mut huge = Vec::new();
        huge.extend_from_slice(&((MAX_FRAME as u32) + 1).to_be_bytes());
        let e = read_frame::<Request>(&mut huge.as_slice()).expect_err("too large");
        assert!(matches!(e, FrameError::TooLarge(_)), "{e}");

        let mut junk = Vec::new();
        junk.extend_from_slice(&3u32.to_be_bytes());
        junk.extend_from_slice(b"{{{");
        let e = read_frame::<Request>(&mut junk.as_slice()).expect_err("junk");
        assert!(matches!(e, FrameError::Json(_)), "{e}");

        let e = read_frame::<Request>(&mut [].as_slice()).expect_err("eof");
        assert!(matches!(e, FrameError::Closed), "{e}");

        let reply = ServerMessage::Reply {
            id: 1,
            result: Err(Error::NoDomain("no domain with matching name 'x'".into())),
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &reply).expect("write");
        match read_frame::<ServerMessage>(&mut buf.as_slice()).expect("read") {
            ServerMessage::Reply { result: Err(e), .. } => {
                assert_eq!(
                    e.to_string(),
                    "Domain not found: no domain with matching name 'x'"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
