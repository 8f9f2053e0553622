//! Strict parsing of the domain XML subset.

use std::path::PathBuf;

use roxmltree::{Document, Node};

use crate::{check_name, ConfError, DomainDef, OsDef, SerialDef, WorkloadDef, TERN_NS};

/// Largest definition accepted (libvirt's limit on an XML document is 10 MiB; ours is smaller).
const MAX_XML: usize = 1 << 20;
/// Largest vCPU count (the test guest's limit).
pub(crate) const MAX_VCPUS: u32 = 128;

/// Parses and validates a domain definition. A missing `<uuid>` gets a random one.
pub fn parse_domain(xml: &str) -> Result<DomainDef, ConfError> {
    if xml.len() > MAX_XML {
        return Err(ConfError::Syntax(format!(
            "document of {} bytes exceeds the limit of {MAX_XML}",
            xml.len()
        )));
    }
    let doc = Document::parse(xml).map_err(|e| ConfError::Syntax(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" || root.tag_name().namespace().is_some() {
        return Err(ConfError::BadValue {
            what: "the root element".into(),
            value: qname(&root),
            why: "expected <domain>".into(),
        });
    }
    attrs(&root, &["type", "id"])?;
    match root.attribute("type") {
        Some("kvm") => {}
        Some(other) => {
            return Err(ConfError::BadValue {
                what: "<domain type>".into(),
                value: other.into(),
                why: "only 'kvm' is supported".into(),
            })
        }
        None => {
            return Err(ConfError::MissingElement(
                "domain type='kvm' (attribute)".into(),
            ))
        }
    }

    let mut seen: Vec<String> = Vec::new();
    let mut name = None;
    let mut uuid = None;
    let mut memory = None;
    let mut current = None;
    let mut vcpus = None;
    let mut os = None;
    let mut emulator = None;
    let mut serial = None;
    let mut workload = None;
    for child in elements(&root) {
        let q = qname(&child);
        if seen.contains(&q) {
            return Err(ConfError::Duplicate(q));
        }
        seen.push(q.clone());
        match (child.tag_name().namespace(), child.tag_name().name()) {
            (None, "name") => {
                attrs(&child, &[])?;
                let n = leaf_text(&child)?;
                check_name(&n)?;
                name = Some(n);
            }
            (None, "uuid") => {
                attrs(&child, &[])?;
                let t = leaf_text(&child)?;
                uuid = Some(
                    uuid::Uuid::parse_str(t.trim()).map_err(|e| ConfError::BadValue {
                        what: "<uuid>".into(),
                        value: t.clone(),
                        why: e.to_string(),
                    })?,
                );
            }
            (None, "memory") => memory = Some(memory_kib(&child)?),
            (None, "currentMemory") => current = Some(memory_kib(&child)?),
            (None, "vcpu") => {
                attrs(&child, &["placement"])?;
                if let Some(p) = child.attribute("placement") {
                    if p != "static" {
                        return Err(bad("<vcpu placement>", p, "only 'static' is supported"));
                    }
                }
                let t = leaf_text(&child)?;
                let n: u32 = t
                    .trim()
                    .parse()
                    .map_err(|_| bad("<vcpu>", &t, "expected a positive integer"))?;
                if n == 0 || n > MAX_VCPUS {
                    return Err(bad("<vcpu>", &t, &format!("must be 1..={MAX_VCPUS}")));
                }
                vcpus = Some(n);
            }
            (None, "os") => os = Some(parse_os(&child)?),
            (None, "devices") => {
                attrs(&child, &[])?;
                let (e, s) = parse_devices(&child)?;
                emulator = e;
                serial = s;
            }
            (None, "on_poweroff" | "on_reboot" | "on_crash") => {
                attrs(&child, &[])?;
                let t = leaf_text(&child)?;
                if t.trim() != "destroy" {
                    return Err(bad(&format!("<{q}>"), &t, "only 'destroy' is supported"));
                }
            }
            (Some(TERN_NS), "workload") => workload = Some(parse_workload(&child)?),
            _ => return Err(ConfError::UnknownElement(q)),
        }
    }
    let memory_kib = memory.ok_or_else(|| ConfError::MissingElement("memory".into()))?;
    if memory_kib < 64 * 1024 {
        return Err(bad(
            "<memory>",
            &format!("{memory_kib} KiB"),
            "at least 64 MiB (the test guest's layout needs 16 MiB + its working set)",
        ));
    }
    if memory_kib % 1024 != 0 {
        return Err(bad(
            "<memory>",
            &format!("{memory_kib} KiB"),
            "must be a whole number of MiB",
        ));
    }
    let current_memory_kib = current.unwrap_or(memory_kib);
    if current_memory_kib != memory_kib {
        return Err(bad(
            "<currentMemory>",
            &format!("{current_memory_kib} KiB"),
            "must equal <memory> (no balloon device)",
        ));
    }
    let def = DomainDef {
        name: name.ok_or_else(|| ConfError::MissingElement("name".into()))?,
        uuid: uuid.unwrap_or_else(uuid::Uuid::new_v4),
        memory_kib,
        current_memory_kib,
        vcpus: vcpus.unwrap_or(1),
        os: os.ok_or_else(|| ConfError::MissingElement("os".into()))?,
        emulator,
        serial,
        workload,
    };
    if let Some(w) = &def.workload {
        let need = 16 + w.mem_mib;
        if need > def.memory_mib() {
            return Err(bad(
                "<tern:workload mem>",
                &w.mem_mib.to_string(),
                &format!(
                    "the working set starts at 16 MiB and must fit in <memory> ({} MiB)",
                    def.memory_mib()
                ),
            ));
        }
    }
    Ok(def)
}

fn bad(what: &str, value: &str, why: &str) -> ConfError {
    ConfError::BadValue {
        what: what.into(),
        value: value.into(),
        why: why.into(),
    }
}

/// The element's name as written (`tern:workload` for Tern's namespace).
fn qname(n: &Node) -> String {
    match n.tag_name().namespace() {
        Some(TERN_NS) => format!("tern:{}", n.tag_name().name()),
        Some(ns) => format!("{{{ns}}}{}", n.tag_name().name()),
        None => n.tag_name().name().to_string(),
    }
}

/// Child elements; any non-whitespace text between them is an error reported by the caller
/// through [`leaf_text`] (containers ignore whitespace only).
fn elements<'a, 'i>(n: &Node<'a, 'i>) -> impl Iterator<Item = Node<'a, 'i>> {
    n.children().filter(|c| c.is_element())
}

/// Rejects attributes not in `allowed` (namespace declarations are not attributes).
fn attrs(n: &Node, allowed: &[&str]) -> Result<(), ConfError> {
    for a in n.attributes() {
        if a.namespace().is_some() || !allowed.contains(&a.name()) {
            return Err(ConfError::UnknownAttribute {
                element: qname(n),
                attr: a.name().to_string(),
            });
        }
    }
    Ok(())
}

/// The text of an element that must have no child elements.
fn leaf_text(n: &Node) -> Result<String, ConfError> {
    if let Some(c) = elements(n).next() {
        return Err(ConfError::UnknownElement(format!(
            "{} inside <{}>",
            qname(&c),
            qname(n)
        )));
    }
    Ok(n.text().unwrap_or("").to_string())
}

/// Containers: text other than whitespace is an error.
fn no_text(n: &Node) -> Result<(), ConfError> {
    for c in n.children() {
        if c.is_text() && !c.text().unwrap_or("").trim().is_empty() {
            return Err(bad(
                &format!("<{}>", qname(n)),
                c.text().unwrap_or("").trim(),
                "text is not allowed here",
            ));
        }
    }
    Ok(())
}

/// `<memory unit='...'>N</memory>` in KiB (libvirt's units; KiB by default).
fn memory_kib(n: &Node) -> Result<u64, ConfError> {
    attrs(n, &["unit"])?;
    let what = format!("<{}>", qname(n));
    let t = leaf_text(n)?;
    let v: u64 = t
        .trim()
        .parse()
        .map_err(|_| bad(&what, &t, "expected a non-negative integer"))?;
    let unit = n.attribute("unit").unwrap_or("KiB");
    let bytes_per: u64 = match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "T" | "TiB" => 1 << 40,
        other => {
            return Err(bad(
                &format!("{what} unit"),
                other,
                "expected one of b, bytes, KB, k, KiB, MB, M, MiB, GB, G, GiB, TB, T, TiB",
            ))
        }
    };
    let bytes = v
        .checked_mul(bytes_per)
        .ok_or_else(|| bad(&what, &t, "too large"))?;
    Ok(bytes.div_ceil(1024))
}

fn parse_os(n: &Node) -> Result<OsDef, ConfError> {
    attrs(n, &[])?;
    no_text(n)?;
    let mut os = OsDef::default();
    let mut have_type = false;
    let mut seen = Vec::new();
    for c in elements(n) {
        let q = qname(&c);
        if seen.contains(&q) {
            return Err(ConfError::Duplicate(format!("os/{q}")));
        }
        seen.push(q.clone());
        match (c.tag_name().namespace(), c.tag_name().name()) {
            (None, "type") => {
                attrs(&c, &["arch", "machine"])?;
                if let Some(a) = c.attribute("arch") {
                    if a != "x86_64" {
                        return Err(bad("<os><type arch>", a, "only 'x86_64' is supported"));
                    }
                }
                let t = leaf_text(&c)?;
                if t.trim() != "hvm" {
                    return Err(bad("<os><type>", &t, "only 'hvm' is supported"));
                }
                have_type = true;
            }
            (None, "kernel") => os.kernel = Some(path_text(&c)?),
            (None, "initrd") => os.initrd = Some(path_text(&c)?),
            (None, "cmdline") => {
                attrs(&c, &[])?;
                os.cmdline = Some(leaf_text(&c)?);
            }
            _ => return Err(ConfError::UnknownElement(format!("{q} inside <os>"))),
        }
    }
    if !have_type {
        return Err(ConfError::MissingElement("os/type".into()));
    }
    if os.initrd.is_some() && os.kernel.is_none() {
        return Err(ConfError::MissingElement(
            "os/kernel (an <initrd> needs a <kernel>)".into(),
        ));
    }
    Ok(os)
}

fn path_text(n: &Node) -> Result<PathBuf, ConfError> {
    attrs(n, &[])?;
    let t = leaf_text(n)?;
    let t = t.trim();
    if !t.starts_with('/') {
        return Err(bad(
            &format!("<{}>", qname(n)),
            t,
            "expected an absolute path",
        ));
    }
    Ok(PathBuf::from(t))
}

type Devices = (Option<PathBuf>, Option<SerialDef>);

fn parse_devices(n: &Node) -> Result<Devices, ConfError> {
    no_text(n)?;
    let mut emulator = None;
    let mut serial = None;
    for c in elements(n) {
        let q = qname(&c);
        match (c.tag_name().namespace(), c.tag_name().name()) {
            (None, "emulator") => {
                if emulator.is_some() {
                    return Err(ConfError::Duplicate("devices/emulator".into()));
                }
                emulator = Some(path_text(&c)?);
            }
            (None, "serial") => {
                if serial.is_some() {
                    return Err(bad(
                        "<devices><serial>",
                        "a second serial port",
                        "only one serial port is supported",
                    ));
                }
                serial = Some(parse_serial(&c)?);
            }
            _ => return Err(ConfError::UnknownElement(format!("{q} inside <devices>"))),
        }
    }
    Ok((emulator, serial))
}

fn parse_serial(n: &Node) -> Result<SerialDef, ConfError> {
    attrs(n, &["type"])?;
    no_text(n)?;
    let kind = n
        .attribute("type")
        .ok_or_else(|| ConfError::MissingElement("serial type='...' (attribute)".into()))?;
    let mut path = None;
    for c in elements(n) {
        match (c.tag_name().namespace(), c.tag_name().name()) {
            (None, "source") => {
                attrs(&c, &["path", "mode"])?;
                leaf_text(&c)?;
                if let Some(m) = c.attribute("mode") {
                    if m != "bind" {
                        return Err(bad(
                            "<serial><source mode>",
                            m,
                            "only 'bind' is supported (the VMM listens)",
                        ));
                    }
                }
                let p = c.attribute("path").ok_or_else(|| {
                    ConfError::MissingElement("serial/source path (attribute)".into())
                })?;
                if !p.starts_with('/') {
                    return Err(bad("<serial><source path>", p, "expected an absolute path"));
                }
                path = Some(PathBuf::from(p));
            }
            (None, "target") => {
                attrs(&c, &["port"])?;
                leaf_text(&c)?;
                if let Some(p) = c.attribute("port") {
                    if p != "0" {
                        return Err(bad("<serial><target port>", p, "only port 0 exists"));
                    }
                }
            }
            _ => {
                return Err(ConfError::UnknownElement(format!(
                    "{} inside <serial>",
                    qname(&c)
                )))
            }
        }
    }
    let need_path = |p: Option<PathBuf>| {
        p.ok_or_else(|| ConfError::MissingElement(format!("serial/source (type '{kind}')")))
    };
    match kind {
        "file" => Ok(SerialDef::File(need_path(path)?)),
        "unix" => Ok(SerialDef::Unix(need_path(path)?)),
        "null" => Ok(SerialDef::Null),
        other => Err(bad(
            "<serial type>",
            other,
            "expected 'file', 'unix' or 'null'",
        )),
    }
}

fn parse_workload(n: &Node) -> Result<WorkloadDef, ConfError> {
    attrs(n, &["type", "mem", "rate", "order"])?;
    leaf_text(n)?;
    let kind = n.attribute("type").unwrap_or("idle");
    if !matches!(kind, "idle" | "dirty" | "pattern") {
        return Err(bad(
            "<tern:workload type>",
            kind,
            "expected 'idle', 'dirty' or 'pattern'",
        ));
    }
    let num = |a: &str| -> Result<u64, ConfError> {
        match n.attribute(a) {
            None => Ok(0),
            Some(v) => v.trim().parse().map_err(|_| {
                bad(
                    &format!("<tern:workload {a}>"),
                    v,
                    "expected a non-negative integer",
                )
            }),
        }
    };
    let order = n.attribute("order").unwrap_or("seq");
    if !matches!(order, "seq" | "random") {
        return Err(bad(
            "<tern:workload order>",
            order,
            "expected 'seq' or 'random'",
        ));
    }
    Ok(WorkloadDef {
        kind: kind.to_string(),
        mem_mib: num("mem")?,
        rate_mib_s: num("rate")?,
        order: order.to_string(),
    })
}
