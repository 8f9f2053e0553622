//! Builds the guest program (`guest-src/`) with `rustc` into a freestanding ELF at
//! `$OUT_DIR/guest.elf`, embedded by the library as `GUEST_ELF`.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const SOURCES: &[&str] = &[
    "guest-src/main.rs",
    "guest-src/arch.rs",
    "guest-src/console.rs",
    "guest-src/entry.rs",
    "guest-src/fault.rs",
    "guest-src/mem.rs",
    "guest-src/opts.rs",
    "guest-src/tsc.rs",
    "guest-src/work.rs",
    "guest-src/link.ld",
    "src/layout.rs",
    "src/fill.rs",
];

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    println!("cargo:rerun-if-changed=build.rs");
    for s in SOURCES {
        println!("cargo:rerun-if-changed={}", manifest.join(s).display());
    }
    let script = manifest.join("guest-src/link.ld");
    let output = out_dir.join("guest.elf");
    let status = Command::new(&rustc)
        .arg(manifest.join("guest-src/main.rs"))
        .args(["--crate-name", "tern_guest_image", "--crate-type", "bin"])
        .args(["--edition", "2021", "--target", "x86_64-unknown-linux-gnu"])
        .args([
            "-C",
            "panic=abort",
            "-C",
            "opt-level=2",
            "-C",
            "debuginfo=0",
            "-C",
            "strip=debuginfo",
        ])
        .args(["-C", "codegen-units=1", "-C", "relocation-model=static"])
        .args(["-C", "link-arg=-nostdlib", "-C", "link-arg=-static"])
        .args(["-C", "link-arg=-no-pie"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", script.display()))
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        .arg("-o")
        .arg(&output)
        // The guest build must not inherit flags meant for the host crates.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", rustc.to_string_lossy()));
    if !status.success() {
        panic!("building the guest program failed ({status})");
    }
}
