use crate::{format_domain, parse_domain, ConfError, DriverKind, SerialDef};

const GOOD: &str = r#"<domain type='kvm' xmlns:tern='http://tern.dev/schemas/domain/1.0'>
  <name>vm1</name>
  <uuid>6f1c2a4e-3b7d-4c1e-9a55-0d2b8f7e9a10</uuid>
  <memory unit='MiB'>256</memory>
  <currentMemory unit='MiB'>256</currentMemory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <emulator>/usr/local/bin/tern</emulator>
    <serial type='file'><source path='/tmp/vm1.log'/><target port='0'/></serial>
  </devices>
  <tern:workload type='pattern' mem='64'/>
</domain>"#;

fn err(xml: &str) -> ConfError {
    match parse_domain(xml) {
        Ok(d) => panic!("accepted: {d:?}"),
        Err(e) => e,
    }
}

fn with(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "{from}");
    GOOD.replacen(from, to, 1)
}

#[test]
fn parses_the_documented_subset() {
    let d = parse_domain(GOOD).expect("parse");
    assert_eq!(d.name, "vm1");
    assert_eq!(d.memory_kib, 256 * 1024);
    assert_eq!(d.vcpus, 2);
    assert_eq!(d.driver(), DriverKind::Tern);
    assert_eq!(d.serial, Some(SerialDef::File("/tmp/vm1.log".into())));
    let w = d.workload.as_ref().expect("workload");
    assert_eq!((w.kind.as_str(), w.mem_mib), ("pattern", 64));
}

#[test]
fn format_round_trips() {
    let d = parse_domain(GOOD).expect("parse");
    let x = format_domain(&d, Some(3));
    assert!(x.contains("<domain type='kvm' id='3'"), "{x}");
    assert_eq!(parse_domain(&x).expect("reparse"), d);
}

#[test]
fn uuid_generated_when_absent() {
    let x = with("<uuid>6f1c2a4e-3b7d-4c1e-9a55-0d2b8f7e9a10</uuid>", "");
    let a = parse_domain(&x).expect("a");
    let b = parse_domain(&x).expect("b");
    assert_ne!(a.uuid, b.uuid);
}

#[test]
fn emulator_basename_selects_the_driver() {
    let x = with("/usr/local/bin/tern", "/usr/bin/qemu-system-x86_64");
    assert_eq!(parse_domain(&x).expect("qemu").driver(), DriverKind::Qemu);
    let x = with("<emulator>/usr/local/bin/tern</emulator>", "");
    assert_eq!(parse_domain(&x).expect("none").driver(), DriverKind::Tern);
}

#[test]
fn memory_units() {
    let x = with(
        "<memory unit='MiB'>256</memory>",
        "<memory unit='GiB'>1</memory>",
    )
    .replace("<currentMemory unit='MiB'>256</currentMemory>", "");
    assert_eq!(parse_domain(&x).expect("GiB").memory_kib, 1 << 20);
    let x = with("<memory unit='MiB'>256</memory>", "<memory>262144</memory>");
    assert_eq!(parse_domain(&x).expect("KiB default").memory_kib, 262144);
    let e = err(&with(
        "unit='MiB'>256</memory>",
        "unit='parsecs'>256</memory>",
    ));
    assert!(
        e.to_string().contains("parsecs") && e.to_string().contains("<memory> unit"),
        "{e}"
    );
}

#[test]
fn unknown_element_is_named() {
    let e = err(&with("<vcpu>2</vcpu>", "<vcpu>2</vcpu><cputune/>"));
    assert_eq!(e, ConfError::UnknownElement("cputune".into()));
    let e = err(&with("<target port='0'/>", "<target port='0'/><alias/>"));
    assert!(e.to_string().contains("<alias inside <serial>"), "{e}");
    let e = err(&with("<tern:workload", "<tern:turbo/><tern:workload"));
    assert!(e.to_string().contains("tern:turbo"), "{e}");
}

#[test]
fn unknown_attribute_is_named() {
    let e = err(&with("<vcpu>", "<vcpu current='1'>"));
    assert_eq!(
        e,
        ConfError::UnknownAttribute {
            element: "vcpu".into(),
            attr: "current".into()
        }
    );
    let e = err(&with("mem='64'", "mem='64' speed='9'"));
    assert!(e.to_string().contains("'speed' on <tern:workload>"), "{e}");
}

#[test]
fn bad_values_are_named() {
    for (from, to, needle) in [
        ("<vcpu>2</vcpu>", "<vcpu>0</vcpu>", "<vcpu>"),
        ("<vcpu>2</vcpu>", "<vcpu>two</vcpu>", "'two'"),
        ("type='kvm'", "type='xen'", "'xen'"),
        (
            "<type arch='x86_64'>hvm</type>",
            "<type>xen</type>",
            "<os><type>",
        ),
        ("6f1c2a4e-3b7d", "zz1c2a4e-3b7d", "<uuid>"),
        ("<name>vm1</name>", "<name>a/b</name>", "<name>"),
        ("type='pattern'", "type='mining'", "'mining'"),
        ("mem='64'", "mem='1000'", "<tern:workload mem>"),
        (
            "<currentMemory unit='MiB'>256",
            "<currentMemory unit='MiB'>128",
            "<currentMemory>",
        ),
        ("<serial type='file'>", "<serial type='pty'>", "'pty'"),
        ("/tmp/vm1.log", "vm1.log", "absolute path"),
    ] {
        let e = err(&with(from, to)).to_string();
        assert!(e.contains(needle), "{to}: {e}");
    }
}

#[test]
fn missing_and_duplicate_elements() {
    let e = err(&with("<name>vm1</name>", ""));
    assert_eq!(e, ConfError::MissingElement("name".into()));
    let e = err(&with("<vcpu>2</vcpu>", "<vcpu>2</vcpu><vcpu>1</vcpu>"));
    assert_eq!(e, ConfError::Duplicate("vcpu".into()));
    let e = err("<domain type='kvm'><name>x</name>");
    assert!(matches!(e, ConfError::Syntax(_)), "{e}");
}

#[test]
fn kernel_boot_elements() {
    let x = with(
        "<type arch='x86_64'>hvm</type>",
        "<type>hvm</type><kernel>/boot/vmlinuz</kernel><initrd>/boot/initrd</initrd><cmdline>console=ttyS0</cmdline>",
    );
    let d = parse_domain(&x).expect("kernel");
    assert_eq!(
        d.os.kernel.as_deref(),
        Some(std::path::Path::new("/boot/vmlinuz"))
    );
    assert_eq!(d.os.cmdline.as_deref(), Some("console=ttyS0"));
    assert_eq!(parse_domain(&format_domain(&d, None)).expect("reparse"), d);
}
