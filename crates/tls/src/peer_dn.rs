//! The identity `tls-authz` matches: a certificate's subject distinguished name in QEMU's text
//! form, which is GnuTLS' `gnutls_x509_crt_get_dn` (RFC 4514): the RDNs in reverse order of the
//! certificate's sequence (so `/O=Tern/CN=hosta` reads `CN=hosta,O=Tern`), joined by `,`,
//! multi-valued RDNs joined by `+`, short attribute names (`CN`, `O`, `OU`, `L`, `ST`, `C`,
//! `DC`, `UID`, `emailAddress`), and RFC 4514 escaping of the values.

use x509_parser::prelude::{FromDer, X509Certificate};

/// Errors of reading a peer certificate's name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DnError {
    /// The certificate does not parse (rustls already verified it, so this is unexpected).
    #[error("cannot read the peer certificate's subject: {0}")]
    Parse(String),
}

/// Short names GnuTLS prints; other attributes are printed as their dotted OID with the value
/// as `#` + hex of its DER (RFC 4514 §2.4).
const NAMES: &[(&str, &str)] = &[
    ("2.5.4.3", "CN"),
    ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"),
    ("2.5.4.7", "L"),
    ("2.5.4.8", "ST"),
    ("2.5.4.6", "C"),
    ("2.5.4.9", "STREET"),
    ("2.5.4.5", "serialNumber"),
    ("0.9.2342.19200300.100.1.25", "DC"),
    ("0.9.2342.19200300.100.1.1", "UID"),
    ("1.2.840.113549.1.9.1", "EMAIL"),
];

/// The subject DN of a DER certificate, in QEMU's (GnuTLS') text form.
pub fn subject_dn(der: &[u8]) -> Result<String, DnError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| DnError::Parse(e.to_string()))?;
    let mut rdns: Vec<String> = Vec::new();
    for rdn in cert.subject().iter() {
        let mut parts: Vec<String> = Vec::new();
        for attr in rdn.iter() {
            let oid = attr.attr_type().to_id_string();
            let name = NAMES.iter().find(|(o, _)| *o == oid).map(|(_, n)| *n);
            let part = match (name, attr.as_str()) {
                (Some(name), Ok(value)) => format!("{name}={}", escape(value)),
                _ => {
                    let hex: String = attr
                        .attr_value()
                        .data
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect();
                    format!("{oid}=#{hex}")
                }
            };
            parts.push(part);
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Ok(rdns.join(","))
}

/// RFC 4514 §2.4: `,` `+` `"` `\` `<` `>` `;` escaped anywhere, `#` and a space at the start,
/// a space at the end.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn cert_with(subject: &[(DnType, &str)]) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["h.example.com".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in subject {
            params.distinguished_name.push(t.clone(), *v);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reverse_order_as_gnutls_prints_it() {
        let der = cert_with(&[
            (DnType::OrganizationName, "Tern"),
            (DnType::CommonName, "hosta.example.com"),
        ]);
        assert_eq!(subject_dn(&der).unwrap(), "CN=hosta.example.com,O=Tern");
    }

    #[test]
    fn special_characters_are_escaped() {
        let der = cert_with(&[
            (DnType::CountryName, "GB"),
            (DnType::OrganizationName, "Example, Ltd"),
            (DnType::CommonName, " lead+trail "),
        ]);
        assert_eq!(
            subject_dn(&der).unwrap(),
            "CN=\\ lead\\+trail\\ ,O=Example\\, Ltd,C=GB"
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(subject_dn(b"\x30\x03\x02\x01").is_err());
        assert!(subject_dn(&[]).is_err());
    }
}
