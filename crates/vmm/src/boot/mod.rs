//! Boot paths.
//!
//! * `direct`: the test guest's direct entry (long mode, CPL 3, set up by the VMM; the default).
//! * `kernel`: `tern run --kernel`: a kernel Tern did not write, loaded with `linux-loader` and
//!   entered through the PVH protocol (`pvh`) or the Linux 64-bit boot protocol (`linux`), with
//!   the memory map (`memmap`), ACPI tables (`acpi`) and the boot CPU state (`cpu`) it expects.
//!   Addresses of everything the VMM writes: `layout`.

pub mod acpi;
pub mod cpu;
pub mod direct;
pub mod kernel;
pub mod layout;
pub mod linux;
pub mod memmap;
pub mod pvh;
pub mod source;

pub use direct::*;
