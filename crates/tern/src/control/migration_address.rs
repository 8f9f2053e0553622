//! Where `migrate` sends and `migrate-incoming` listens: QEMU's `uri` string, or its `channels`
//! list (QEMU 9+: `[{"channel-type": "main", "addr": {"transport": "socket", "type": "inet",
//! "host": ..., "port": ...}}]`), exactly one of the two, with QEMU 10's error texts.
//!
//! The arguments were already checked against `schema::MIGRATE_ARGS` / `INCOMING_ARGS` (only
//! channel type `main`, transports `socket` (`inet`, `unix`) and `file`); what is left here is
//! turning them into a [`MigrationUri`].

use serde::Deserialize;
use tern_migration::transport::MigrationUri;
use tern_qmp::QmpError;

/// One entry of `channels`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct MigrationChannel {
    /// Only `main` exists in Tern's schema (QEMU 10 also has `cpr`, for cpr-transfer).
    #[allow(dead_code)]
    channel_type: ChannelType,
    addr: MigrationAddress,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum ChannelType {
    Main,
}

/// QEMU's `MigrationAddress` flat union, flattened: which members are present depends on
/// `transport` and `type` (the schema check guarantees the right ones are).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrationAddress {
    transport: Transport,
    #[serde(rename = "type")]
    socket_type: Option<SocketType>,
    host: Option<String>,
    port: Option<String>,
    path: Option<String>,
    filename: Option<String>,
    offset: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Transport {
    Socket,
    File,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum SocketType {
    Inet,
    Unix,
}

/// Which command the address is for (they word the channel-count errors differently).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    /// `migrate`.
    Outgoing,
    /// `migrate-incoming`.
    Incoming,
}

fn generic(e: impl std::fmt::Display) -> QmpError {
    QmpError::generic(e.to_string())
}

/// The address given by `uri` or `channels` (an empty list counts as absent, as in QEMU).
pub(super) fn resolve(
    uri: Option<String>,
    channels: Option<Vec<MigrationChannel>>,
    direction: Direction,
) -> Result<MigrationUri, QmpError> {
    match (uri, channels.filter(|c| !c.is_empty())) {
        (Some(uri), None) => uri.parse().map_err(generic),
        (None, Some(mut channels)) => {
            if channels.len() > 1 {
                return Err(QmpError::generic(match direction {
                    Direction::Incoming => "Channel list must have only one entry, for type 'main'",
                    Direction::Outgoing => "Channel list has more than one main entry",
                }));
            }
            let channel = channels.remove(0);
            address(channel.addr, "channels[0].addr")
        }
        _ => Err(QmpError::generic(
            "need either 'uri' or 'channels' argument",
        )),
    }
}

fn member(v: Option<String>, path: &str, name: &str) -> Result<String, QmpError> {
    match v {
        Some(s) if !s.is_empty() => Ok(s),
        Some(_) => Err(QmpError::generic(format!(
            "Parameter '{path}.{name}' must not be empty"
        ))),
        None => Err(QmpError::generic(format!(
            "Parameter '{path}.{name}' is missing"
        ))),
    }
}

fn address(a: MigrationAddress, path: &str) -> Result<MigrationUri, QmpError> {
    match (a.transport, a.socket_type) {
        (Transport::Socket, Some(SocketType::Inet)) => {
            let host = member(a.host, path, "host")?;
            let port = member(a.port, path, "port")?;
            let port = port.parse::<u16>().map_err(|_| {
                QmpError::generic(format!(
                    "Parameter '{path}.port' expects a port number (0 to 65535), not '{port}'"
                ))
            })?;
            Ok(MigrationUri::Tcp { host, port })
        }
        (Transport::Socket, Some(SocketType::Unix)) => Ok(MigrationUri::Unix {
            path: member(a.path, path, "path")?.into(),
        }),
        (Transport::Socket, None) => Err(QmpError::generic(format!(
            "Parameter '{path}.type' is missing"
        ))),
        (Transport::File, _) => Ok(MigrationUri::File {
            path: member(a.filename, path, "filename")?.into(),
            offset: a.offset.ok_or_else(|| {
                QmpError::generic(format!("Parameter '{path}.offset' is missing"))
            })?,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn channels(v: Value) -> Option<Vec<MigrationChannel>> {
        Some(serde_json::from_value(v).expect("valid channels"))
    }

    fn inet(host: &str, port: &str) -> Value {
        json!({"channel-type": "main",
               "addr": {"transport": "socket", "type": "inet", "host": host, "port": port}})
    }

    #[test]
    fn channels_become_uris() {
        let out = Direction::Outgoing;
        assert_eq!(
            resolve(None, channels(json!([inet("127.0.0.1", "4444")])), out).ok(),
            Some(MigrationUri::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            })
        );
        let unix = json!([{"channel-type": "main",
            "addr": {"transport": "socket", "type": "unix", "path": "/tmp/m.sock"}}]);
        assert_eq!(
            resolve(None, channels(unix), out).ok(),
            Some(MigrationUri::Unix {
                path: "/tmp/m.sock".into()
            })
        );
        let file = json!([{"channel-type": "main",
            "addr": {"transport": "file", "filename": "/tmp/vm.img", "offset": 4096}}]);
        assert_eq!(
            resolve(None, channels(file), out).ok(),
            Some(MigrationUri::File {
                path: "/tmp/vm.img".into(),
                offset: 4096
            })
        );
    }

    #[test]
    fn qemu_texts_for_bad_combinations() {
        let err = |uri: Option<&str>, ch: Option<Value>, d| {
            resolve(uri.map(str::to_owned), ch.and_then(channels), d)
                .map(|u| u.to_string())
                .map_err(|e| e.desc)
        };
        let either = Err("need either 'uri' or 'channels' argument".to_owned());
        let one = json!([inet("h", "1")]);
        let two = json!([inet("h", "1"), inet("h", "2")]);
        assert_eq!(err(None, None, Direction::Outgoing), either);
        assert_eq!(err(None, Some(json!([])), Direction::Outgoing), either);
        assert_eq!(err(Some("tcp:h:1"), Some(one), Direction::Incoming), either);
        assert_eq!(
            err(None, Some(two.clone()), Direction::Outgoing),
            Err("Channel list has more than one main entry".to_owned())
        );
        assert_eq!(
            err(None, Some(two), Direction::Incoming),
            Err("Channel list must have only one entry, for type 'main'".to_owned())
        );
        assert_eq!(
            err(None, Some(json!([inet("h", "http")])), Direction::Outgoing),
            Err(
                "Parameter 'channels[0].addr.port' expects a port number (0 to 65535), not 'http'"
                    .to_owned()
            )
        );
        assert_eq!(
            err(None, Some(json!([inet("", "1")])), Direction::Outgoing),
            Err("Parameter 'channels[0].addr.host' must not be empty".to_owned())
        );
        assert_eq!(
            err(Some("tcp:[::1]:5"), None, Direction::Outgoing),
            Ok("tcp:[::1]:5".to_owned())
        );
    }
}
