//! Hand-written multifd sources for hostile-input tests: a main stream up to
//! `MULTIFD_CHANNELS` and channel connections with their handshake, over real TCP sockets.

use std::io::{BufWriter, Write};
use std::net::TcpStream;

use tern_migration::transport::{Listener, MigrationUri};
use tern_migration::wire::{
    ChannelHandshake, Command, Compression, Limits, StreamConfig, StreamWriter,
};

/// A listener on an ephemeral port of 127.0.0.1, and its URI.
pub fn listen() -> (Listener, MigrationUri) {
    let l = Listener::bind(&MigrationUri::Tcp {
        host: "127.0.0.1".into(),
        port: 0,
    })
    .expect("bind");
    let uri = l.local_uri();
    (l, uri)
}

/// Connects to `uri` (a `tcp:` one).
pub fn connect(uri: &MigrationUri) -> TcpStream {
    let MigrationUri::Tcp { host, port } = uri else {
        panic!("tcp")
    };
    TcpStream::connect((host.as_str(), *port)).expect("connect")
}

/// The main stream of stream `version`: header, CONFIG, `OPEN_RETURN_PATH`, `CAPABILITIES`
/// (multifd, and `postcopy-ram` as given) and `MULTIFD_CHANNELS` announcing `channels` of
/// migration `id`. Returns the writer (the caller writes what follows) and the socket.
pub fn main_stream_to_channels(
    uri: &MigrationUri,
    cfg: &StreamConfig,
    version: u32,
    postcopy_ram: bool,
    channels: u16,
    id: [u8; 16],
) -> (StreamWriter<BufWriter<TcpStream>>, TcpStream) {
    main_stream_with(uri, cfg, version, postcopy_ram, false, channels, id)
}

/// [`main_stream_to_channels`] with `x-tern-ram-digest` (`CAPABILITIES` bit 3) as given too.
pub fn main_stream_with(
    uri: &MigrationUri,
    cfg: &StreamConfig,
    version: u32,
    postcopy_ram: bool,
    ram_digest: bool,
    channels: u16,
    id: [u8; 16],
) -> (StreamWriter<BufWriter<TcpStream>>, TcpStream) {
    let s = connect(uri);
    let mut w = StreamWriter::with_version(
        BufWriter::new(s.try_clone().expect("clone")),
        cfg,
        &Limits::default(),
        version,
    )
    .expect("writer");
    w.write_command(Command::OpenReturnPath).expect("orp");
    w.write_command(Command::Capabilities {
        switchover_ack: false,
        validate_uuid: false,
        ram_digest,
        postcopy_ram,
        postcopy_preempt: false,
        multifd: true,
    })
    .expect("caps");
    w.write_command(Command::MultifdChannels {
        channels,
        compression: Compression::None,
        id,
    })
    .expect("channels");
    (w, s)
}

/// Connects to `uri` as multifd channel `channel` of `channels` of migration `id` in a stream
/// of `version` (its handshake sent, nothing else).
pub fn channel(
    uri: &MigrationUri,
    version: u32,
    channel: u16,
    channels: u16,
    id: [u8; 16],
) -> TcpStream {
    let h = ChannelHandshake {
        version,
        channel,
        channels,
        id,
    };
    let mut s = connect(uri);
    s.write_all(&h.encode()).expect("handshake");
    s
}
