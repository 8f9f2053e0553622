//! Builds the PVH test guest (`tests/guests/pvh_guest.rs`, a kernel Tern did not write) with
//! `rustc` into a freestanding ELF at `$OUT_DIR/pvh-guest.elf`; its path is `TERN_PVH_GUEST_ELF`
//! at compile time (the tests and the benchmark boot it with `--kernel`).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let src = manifest.join("tests/guests/pvh_guest.rs");
    let script = manifest.join("tests/guests/pvh_guest.ld");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", script.display());
    let output = out_dir.join("pvh-guest.elf");
    let status = Command::new(&rustc)
        .arg(&src)
        .args(["--crate-name", "tern_pvh_guest", "--crate-type", "bin"])
        .args(["--edition", "2021", "--target", "x86_64-unknown-linux-gnu"])
        .args([
            "-C",
            "panic=abort",
            "-C",
            "opt-level=2",
            "-C",
            "debuginfo=0",
        ])
        .args(["-C", "relocation-model=static"])
        .args(["-C", "link-arg=-nostdlib", "-C", "link-arg=-static"])
        .args(["-C", "link-arg=-no-pie"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", script.display()))
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        .arg("-o")
        .arg(&output)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", rustc.to_string_lossy()));
    if !status.success() {
        panic!("building the PVH test guest failed ({status})");
    }
    println!("cargo:rustc-env=TERN_PVH_GUEST_ELF={}", output.display());
}
