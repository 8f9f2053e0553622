//! User-creatable objects, QEMU's `object-add` / `object-del` / `-object` for what a migration
//! uses: `tls-creds-x509`, `authz-simple`, `authz-list` (`tls-creds-psk` is refused, decision
//! 41). An object is checked when it is added (its files are read and a TLS configuration is
//! built, so a mistake is reported by `object-add`, as QEMU does), and resolved into the
//! migration's TLS setup when a migration starts ([`Objects::client_tls`],
//! [`Objects::server_tls`]).

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use tern_migration::transport::authz::{Authz, AuthzFormat, AuthzPolicy, AuthzRule};
use tern_migration::transport::tls_config::{TlsEndpoint, X509Creds};
use tern_migration::transport::tls_stream::{ClientTls, ServerTls};
use tern_qmp::QmpError;

/// One object.
#[derive(Debug, Clone)]
pub enum UserObject {
    /// `tls-creds-x509`.
    TlsCredsX509(X509Creds),
    /// `authz-simple` or `authz-list`.
    Authz(Authz),
}

/// The objects of one process, by id.
#[derive(Debug, Default)]
pub struct Objects {
    map: BTreeMap<String, UserObject>,
}

fn err(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg.into())
}

fn str_prop<'a>(props: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    props.get(name).and_then(Value::as_str)
}

/// Why `tls-creds-psk` is refused (decision 41).
pub const PSK_REFUSED: &str = "tls-creds-psk is not supported by Tern: rustls, its TLS stack, \
    has no external pre-shared-key support (rustls issue #174); use tls-creds-x509 with a \
    private CA (scripts/tls-certs.sh, docs/tls.md)";

impl Objects {
    /// `object-add` (arguments already checked against the schema: `qom-type`, `id` and the
    /// type's properties).
    pub fn add(&mut self, args: &Map<String, Value>) -> Result<(), QmpError> {
        let qom_type = str_prop(args, "qom-type").unwrap_or_default();
        let id = str_prop(args, "id").unwrap_or_default().to_owned();
        if !valid_id(&id) {
            return Err(err(format!(
                "Parameter 'id' expects an identifier (a letter, then letters, digits, '-', \
                 '.', '_'): '{id}'"
            )));
        }
        if self.map.contains_key(&id) {
            // QEMU's text (object_property_try_add on /objects).
            return Err(err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        let obj = match qom_type {
            "tls-creds-x509" => UserObject::TlsCredsX509(x509(args)?),
            "authz-simple" => UserObject::Authz(Authz::Simple {
                identity: str_prop(args, "identity").unwrap_or_default().to_owned(),
            }),
            "authz-list" => UserObject::Authz(authz_list(args)?),
            "tls-creds-psk" => return Err(err(PSK_REFUSED)),
            other => return Err(err(format!("Invalid object type '{other}'"))),
        };
        self.map.insert(id, obj);
        Ok(())
    }

    /// `object-del`; `in_use` says whether a migration in progress uses the object.
    pub fn del(&mut self, id: &str, in_use: bool) -> Result<(), QmpError> {
        if !self.map.contains_key(id) {
            return Err(err(format!("object '{id}' not found")));
        }
        if in_use {
            return Err(err(format!("object '{id}' is in use, can not be deleted")));
        }
        self.map.remove(id);
        Ok(())
    }

    fn creds(&self, id: &str, endpoint: TlsEndpoint) -> Result<&X509Creds, QmpError> {
        match self.map.get(id) {
            None => Err(err(format!("No TLS credentials with id '{id}'"))),
            Some(UserObject::TlsCredsX509(c)) if c.endpoint == endpoint => Ok(c),
            Some(UserObject::TlsCredsX509(_)) => Err(err(format!(
                "Expected TLS credentials for a {} endpoint (tls-creds '{id}')",
                match endpoint {
                    TlsEndpoint::Server => "server",
                    TlsEndpoint::Client => "client",
                }
            ))),
            Some(UserObject::Authz(_)) => {
                Err(err(format!("Object with id '{id}' is not TLS credentials")))
            }
        }
    }

    /// The source's TLS for `tls-creds` = `id`: `hostname` is `tls-hostname` when set, else
    /// the URI's host (none for `unix:`: the name is then not checked, as QEMU).
    pub fn client_tls(&self, id: &str, hostname: Option<&str>) -> Result<ClientTls, QmpError> {
        let creds = self.creds(id, TlsEndpoint::Client)?;
        let config = creds
            .client_config_checking(hostname.is_some())
            .map_err(|e| err(e.to_string()))?;
        ClientTls::new(config, hostname).map_err(|e| err(e.to_string()))
    }

    /// The destination's TLS for `tls-creds` = `id` and `tls-authz` = `authz_id` ("" = none).
    pub fn server_tls(&self, id: &str, authz_id: &str) -> Result<ServerTls, QmpError> {
        let creds = self.creds(id, TlsEndpoint::Server)?;
        let config = creds.server_config().map_err(|e| err(e.to_string()))?;
        let authz = if authz_id.is_empty() {
            None
        } else {
            match self.map.get(authz_id) {
                Some(UserObject::Authz(a)) => Some((authz_id.to_owned(), a.clone())),
                Some(_) => {
                    return Err(err(format!(
                        "Object with id '{authz_id}' is not an authorization (tls-authz)"
                    )))
                }
                None => {
                    return Err(err(format!(
                        "No authorization object with id '{authz_id}' (tls-authz)"
                    )))
                }
            }
        };
        Ok(ServerTls::new(config, id, authz))
    }
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
fn valid_id(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || matches!(x, '-' | '.' | '_'))
}

fn x509(args: &Map<String, Value>) -> Result<X509Creds, QmpError> {
    let dir = str_prop(args, "dir")
        .ok_or_else(|| err("tls-creds-x509: the 'dir' property is missing (the directory with ca-cert.pem and the server or client certificate and key)"))?;
    // QEMU's default endpoint is the client.
    let endpoint = match str_prop(args, "endpoint") {
        None => TlsEndpoint::Client,
        Some(e) => TlsEndpoint::parse(e)
            .ok_or_else(|| err(format!("Parameter 'endpoint' does not accept value '{e}'")))?,
    };
    let verify_peer = args
        .get("verify-peer")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let creds = X509Creds {
        dir: dir.into(),
        endpoint,
        verify_peer,
    };
    // Read the files now: a missing or bad file is named by object-add.
    let built = match endpoint {
        TlsEndpoint::Server => creds.server_config().map(drop),
        TlsEndpoint::Client => creds.client_config().map(drop),
    };
    built.map_err(|e| err(e.to_string()))?;
    Ok(creds)
}

fn authz_list(args: &Map<String, Value>) -> Result<Authz, QmpError> {
    let policy = match str_prop(args, "policy") {
        None => AuthzPolicy::Deny,
        Some(p) => AuthzPolicy::parse(p).map_err(|e| err(e.to_string()))?,
    };
    let mut rules = Vec::new();
    for r in args
        .get("rules")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let pattern = r.get("match").and_then(Value::as_str).unwrap_or_default();
        let rule_policy = r.get("policy").and_then(Value::as_str).unwrap_or_default();
        let format = match r.get("format").and_then(Value::as_str) {
            None => AuthzFormat::Exact,
            Some(f) => AuthzFormat::parse(f).map_err(|e| err(e.to_string()))?,
        };
        rules.push(AuthzRule {
            pattern: pattern.to_owned(),
            policy: AuthzPolicy::parse(rule_policy).map_err(|e| err(e.to_string()))?,
            format,
        });
    }
    Ok(Authz::List { policy, rules })
}

/// Properties whose `-object` value is a boolean.
const BOOL_PROPS: &[&str] = &["verify-peer", "sanity-check", "loaded"];

/// `tern run --object` as QEMU's `-object`: `TYPE,id=ID,K=V,...` or `qom-type=TYPE,...`
/// (`,,` is a literal comma; booleans `on`/`off`/`yes`/`no`/`true`/`false`), or a JSON object
/// (needed for `authz-list`'s `rules`). Returns `object-add`'s arguments.
pub fn parse_cli(spec: &str) -> Result<Map<String, Value>, String> {
    if spec.trim_start().starts_with('{') {
        return match serde_json::from_str::<Value>(spec) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err("--object: the JSON form must be an object".into()),
            Err(e) => Err(format!("--object: invalid JSON: {e}")),
        };
    }
    let mut map = Map::new();
    for (i, part) in split_keyval(spec).into_iter().enumerate() {
        let (k, v) = match part.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None if i == 0 => ("qom-type".to_owned(), part.clone()),
            None => return Err(format!("--object: '{part}' is not KEY=VALUE")),
        };
        let value = if BOOL_PROPS.contains(&k.as_str()) {
            Value::Bool(match v.as_str() {
                "on" | "yes" | "true" => true,
                "off" | "no" | "false" => false,
                _ => return Err(format!("--object: '{k}' expects on or off, not '{v}'")),
            })
        } else {
            Value::String(v)
        };
        if map.insert(k.clone(), value).is_some() {
            return Err(format!("--object: '{k}' is given twice"));
        }
    }
    Ok(map)
}

/// Splits at `,` except `,,` (a literal comma).
fn split_keyval(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() != Some(&',') => parts.push(String::new()),
            c => {
                if c == ',' {
                    chars.next(); // `,,`: one literal comma
                }
                if let Some(p) = parts.last_mut() {
                    p.push(c);
                }
            }
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cli_forms() {
        let m =
            parse_cli("tls-creds-x509,id=tls0,dir=/a,,b,endpoint=server,verify-peer=off").unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"qom-type": "tls-creds-x509", "id": "tls0", "dir": "/a,b",
                   "endpoint": "server", "verify-peer": false})
        );
        let m = parse_cli("qom-type=authz-simple,id=a,identity=CN=x,,O=y").unwrap();
        assert_eq!(m["identity"], "CN=x,O=y");
        let m = parse_cli(r#"{"qom-type":"authz-list","id":"l","rules":[]}"#).unwrap();
        assert_eq!(m["qom-type"], "authz-list");
        assert!(parse_cli("tls-creds-x509,id=a,verify-peer=maybe").is_err());
        assert!(parse_cli("tls-creds-x509,id=a,id=b").is_err());
        assert!(parse_cli("a,b").is_err());
    }

    #[test]
    fn add_del_and_errors() {
        let mut o = Objects::default();
        let a = |v: Value| v.as_object().cloned().unwrap();
        o.add(&a(
            json!({"qom-type": "authz-simple", "id": "auth0", "identity": "CN=a"}),
        ))
        .unwrap();
        let e = o
            .add(&a(
                json!({"qom-type": "authz-simple", "id": "auth0", "identity": "CN=b"}),
            ))
            .unwrap_err();
        assert!(e.to_string().contains("duplicate property 'auth0'"), "{e}");
        let e = o
            .add(&a(
                json!({"qom-type": "tls-creds-psk", "id": "p", "dir": "/x"}),
            ))
            .unwrap_err();
        assert!(e.to_string().contains("rustls"), "{e}");
        let e = o
            .add(&a(
                json!({"qom-type": "tls-creds-x509", "id": "t", "dir": "/nonexistent",
                           "endpoint": "server"}),
            ))
            .unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/server-cert.pem"),
            "{e}"
        );
        let e = o
            .add(&a(json!({"qom-type": "tls-creds-x509", "id": "t"})))
            .unwrap_err();
        assert!(e.to_string().contains("'dir'"), "{e}");
        assert!(o
            .add(&a(json!({"qom-type": "authz-simple", "id": "9x"})))
            .is_err());
        let e = o.server_tls("auth0", "").unwrap_err();
        assert!(e.to_string().contains("not TLS credentials"), "{e}");
        let e = o.server_tls("nope", "").unwrap_err();
        assert!(
            e.to_string().contains("No TLS credentials with id 'nope'"),
            "{e}"
        );
        assert!(o
            .del("auth0", true)
            .unwrap_err()
            .to_string()
            .contains("in use"));
        o.del("auth0", false).unwrap();
        assert!(o
            .del("auth0", false)
            .unwrap_err()
            .to_string()
            .contains("not found"));
    }
}
