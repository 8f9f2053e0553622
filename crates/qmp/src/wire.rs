//! Serialization of server messages in QEMU's style: `{"return": {}, "id": 1}` with `": "` and
//! `", "` separators, one message per line terminated by `"\r\n"`.

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;

use crate::error::QmpError;

/// A `serde_json` formatter producing QEMU's compact-with-spaces layout.
struct QemuFormatter;

impl serde_json::ser::Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }
}

/// Serializes `msg` as one QMP line (with the trailing `"\r\n"`).
pub(crate) fn line<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuFormatter);
    if let Err(e) = msg.serialize(&mut ser) {
        // Only non-string map keys can fail, which `Value` cannot hold; stay safe anyway.
        tracing::error!("cannot serialize QMP message: {e}");
        out.clear();
        out.extend_from_slice(
            br#"{"error": {"class": "GenericError", "desc": "internal serialization error"}}"#,
        );
    }
    out.extend_from_slice(b"\r\n");
    out
}

#[derive(Serialize)]
struct ReturnMsg<'a> {
    #[serde(rename = "return")]
    ret: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    class: &'a str,
    desc: &'a str,
}

#[derive(Serialize)]
struct ErrorMsg<'a> {
    error: ErrorBody<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
}

pub(crate) fn reply(result: &Result<Value, QmpError>, id: Option<&Value>) -> Vec<u8> {
    match result {
        Ok(ret) => line(&ReturnMsg { ret, id }),
        Err(e) => line(&ErrorMsg {
            error: ErrorBody {
                class: e.class.as_str(),
                desc: &e.desc,
            },
            id,
        }),
    }
}

#[derive(Serialize)]
struct Timestamp {
    seconds: u64,
    microseconds: u32,
}

#[derive(Serialize)]
struct EventMsg<'a> {
    timestamp: Timestamp,
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a Value>,
}

pub(crate) fn event(name: &str, data: Option<&Value>) -> Vec<u8> {
    // SystemTime is CLOCK_REALTIME on Linux.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    line(&EventMsg {
        timestamp: Timestamp {
            seconds: now.as_secs(),
            microseconds: now.subsec_micros(),
        },
        event: name,
        data,
    })
}

/// The version triple in the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QemuVersion {
    /// Micro version.
    pub micro: u32,
    /// Minor version.
    pub minor: u32,
    /// Major version.
    pub major: u32,
}

#[derive(Serialize)]
struct VersionInfo<'a> {
    qemu: QemuVersion,
    package: &'a str,
}

#[derive(Serialize)]
struct GreetingBody<'a> {
    version: VersionInfo<'a>,
    capabilities: &'a [&'a str],
}

#[derive(Serialize)]
struct GreetingMsg<'a> {
    #[serde(rename = "QMP")]
    qmp: GreetingBody<'a>,
}

pub(crate) fn greeting(version: QemuVersion, package: &str) -> Vec<u8> {
    line(&GreetingMsg {
        qmp: GreetingBody {
            version: VersionInfo {
                qemu: version,
                package,
            },
            capabilities: &[],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn layout_matches_qemu() {
        let l = reply(&Ok(json!({"a": [1, 2]})), Some(&json!("x")));
        assert_eq!(l, b"{\"return\": {\"a\": [1, 2]}, \"id\": \"x\"}\r\n");
        let l = reply(&Err(QmpError::generic("boom")), None);
        assert_eq!(
            l,
            b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"boom\"}}\r\n"
        );
        let g = greeting(
            QemuVersion {
                micro: 0,
                minor: 2,
                major: 8,
            },
            "tern",
        );
        assert_eq!(
            std::str::from_utf8(&g).unwrap_or_default(),
            "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 8}, \"package\": \"tern\"}, \"capabilities\": []}}\r\n"
        );
    }
}
