//! Formatting a definition back to XML (`dumpxml`, the persistent files).

use std::fmt::Write;

use crate::{DomainDef, SerialDef, TERN_NS};

/// Escapes text and attribute values.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

/// The definition as libvirt-style XML. `id` is the running domain's id (`None` when inactive).
pub fn format_domain(d: &DomainDef, id: Option<u32>) -> String {
    let mut x = String::new();
    let id = id.map(|i| format!(" id='{i}'")).unwrap_or_default();
    let ns = if d.workload.is_some() {
        format!(" xmlns:tern='{TERN_NS}'")
    } else {
        String::new()
    };
    let _ = writeln!(x, "<domain type='kvm'{id}{ns}>");
    let _ = writeln!(x, "  <name>{}</name>", esc(&d.name));
    let _ = writeln!(x, "  <uuid>{}</uuid>", d.uuid);
    let _ = writeln!(x, "  <memory unit='KiB'>{}</memory>", d.memory_kib);
    let _ = writeln!(
        x,
        "  <currentMemory unit='KiB'>{}</currentMemory>",
        d.current_memory_kib
    );
    let _ = writeln!(x, "  <vcpu placement='static'>{}</vcpu>", d.vcpus);
    let _ = writeln!(x, "  <os>");
    let _ = writeln!(x, "    <type arch='x86_64'>hvm</type>");
    if let Some(k) = &d.os.kernel {
        let _ = writeln!(x, "    <kernel>{}</kernel>", esc(&k.display().to_string()));
    }
    if let Some(i) = &d.os.initrd {
        let _ = writeln!(x, "    <initrd>{}</initrd>", esc(&i.display().to_string()));
    }
    if let Some(c) = &d.os.cmdline {
        let _ = writeln!(x, "    <cmdline>{}</cmdline>", esc(c));
    }
    let _ = writeln!(x, "  </os>");
    let _ = writeln!(x, "  <devices>");
    if let Some(e) = &d.emulator {
        let _ = writeln!(
            x,
            "    <emulator>{}</emulator>",
            esc(&e.display().to_string())
        );
    }
    match &d.serial {
        Some(SerialDef::File(p)) => {
            let _ = writeln!(x, "    <serial type='file'>");
            let _ = writeln!(
                x,
                "      <source path='{}'/>",
                esc(&p.display().to_string())
            );
            let _ = writeln!(x, "      <target port='0'/>");
            let _ = writeln!(x, "    </serial>");
        }
        Some(SerialDef::Unix(p)) => {
            let _ = writeln!(x, "    <serial type='unix'>");
            let _ = writeln!(
                x,
                "      <source mode='bind' path='{}'/>",
                esc(&p.display().to_string())
            );
            let _ = writeln!(x, "      <target port='0'/>");
            let _ = writeln!(x, "    </serial>");
        }
        Some(SerialDef::Null) => {
            let _ = writeln!(x, "    <serial type='null'/>");
        }
        None => {}
    }
    let _ = writeln!(x, "  </devices>");
    if let Some(w) = &d.workload {
        let _ = writeln!(
            x,
            "  <tern:workload type='{}' mem='{}' rate='{}' order='{}'/>",
            esc(&w.kind),
            w.mem_mib,
            w.rate_mib_s,
            esc(&w.order)
        );
    }
    x.push_str("</domain>\n");
    x
}
