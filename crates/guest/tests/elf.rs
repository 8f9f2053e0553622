//! Structure of the embedded guest ELF: what QEMU's PVH loader and linux-loader rely on.

use tern_guest::{layout, GUEST_ELF};

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

struct Phdr {
    p_type: u32,
    offset: u64,
    paddr: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
}

fn phdrs(e: &[u8]) -> Vec<Phdr> {
    let phoff = u64_at(e, 0x20) as usize;
    let phentsize = u16_at(e, 0x36) as usize;
    let phnum = u16_at(e, 0x38) as usize;
    (0..phnum)
        .map(|i| {
            let p = phoff + i * phentsize;
            Phdr {
                p_type: u32_at(e, p),
                offset: u64_at(e, p + 8),
                vaddr: u64_at(e, p + 16),
                paddr: u64_at(e, p + 24),
                filesz: u64_at(e, p + 32),
                memsz: u64_at(e, p + 40),
            }
        })
        .collect()
}

#[test]
fn header_and_segments() {
    let e = GUEST_ELF;
    assert_eq!(&e[..4], b"\x7fELF");
    assert_eq!(e[4], 2, "ELF64");
    assert_eq!(u16_at(e, 0x10), 2, "ET_EXEC");
    assert_eq!(u16_at(e, 0x12), 0x3e, "x86_64");
    let entry = u64_at(e, 0x18);
    assert_eq!(entry, layout::IMAGE_BASE, "direct entry first in .text");
    let loads: Vec<_> = phdrs(e).into_iter().filter(|p| p.p_type == 1).collect();
    assert_eq!(loads.len(), 1);
    let l = &loads[0];
    assert_eq!((l.paddr, l.vaddr), (layout::IMAGE_BASE, layout::IMAGE_BASE));
    assert_eq!(
        l.filesz, l.memsz,
        ".bss must be in the file (linux-loader does not zero it)"
    );
    assert!(l.paddr + l.memsz <= layout::IMAGE_END, "image too large");
    assert!(l.offset + l.filesz <= e.len() as u64);
}

#[test]
fn pvh_note() {
    let e = GUEST_ELF;
    let notes: Vec<_> = phdrs(e).into_iter().filter(|p| p.p_type == 4).collect();
    assert_eq!(notes.len(), 1);
    let n = &notes[0];
    let mut o = n.offset as usize;
    let end = o + n.filesz as usize;
    let mut found = None;
    while o + 12 <= end {
        let (namesz, descsz, ty) = (
            u32_at(e, o) as usize,
            u32_at(e, o + 4) as usize,
            u32_at(e, o + 8),
        );
        let name = &e[o + 12..o + 12 + namesz];
        let desc = o + 12 + namesz.div_ceil(4) * 4;
        if ty == 18 && name == b"Xen\0" {
            // QEMU reads the descriptor as a 64-bit value in ELF64, linux-loader as 32-bit.
            assert_eq!(descsz, 8);
            found = Some(u64_at(e, desc));
        }
        o = desc + descsz.div_ceil(4) * 4;
    }
    let pvh = found.expect("XEN_ELFNOTE_PHYS32_ENTRY note");
    assert!(pvh > layout::IMAGE_BASE && pvh < layout::IMAGE_END && pvh < 1 << 32);
}
