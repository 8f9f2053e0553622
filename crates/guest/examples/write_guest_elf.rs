//! Writes the embedded guest ELF to a file: `cargo run -p tern-guest --example write_guest_elf -- guest.elf`
//! (then e.g. `qemu-system-x86_64 -accel kvm -cpu host,-arch-capabilities -kernel guest.elf
//! -append "workload=pattern mem=64"`; `-cpu`: see `tern_guest::host_cpu`).

fn main() -> std::io::Result<()> {
    let path = std::env::args_os()
        .nth(1)
        .unwrap_or_else(|| "guest.elf".into());
    std::fs::write(&path, tern_guest::GUEST_ELF)?;
    eprintln!(
        "wrote {} ({} bytes)",
        std::path::Path::new(&path).display(),
        tern_guest::GUEST_ELF.len()
    );
    Ok(())
}
