//! The kernel boot paths' loaders on Debian's real bzImage (skipped with a message when
//! `scripts/install-deps.sh` has not fetched it): what the guest finds in RAM before it runs.

use tern_vmm::boot::kernel::{BootProtocol, KernelImage};
use tern_vmm::boot::layout;
use tern_vmm::{GuestImage, Vm, VmConfig};

fn bzimage() -> Option<Vec<u8>> {
    let p = std::env::var_os("TERN_LINUX_BZIMAGE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/cache/tern/linux/vmlinuz".into());
    match std::fs::read(&p) {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!(
                "SKIP: no Linux kernel at {} ({e}); scripts/install-deps.sh fetches it",
                p.display()
            );
            None
        }
    }
}

fn read<const N: usize>(vm: &Vm, gpa: u64) -> [u8; N] {
    let mut b = [0u8; N];
    vm.read_memory(gpa, &mut b).unwrap();
    b
}

/// A bzImage with an initrd and a command line: the protected-mode code at 1 MiB, `boot_params`
/// with our loader type, command line, initrd (page aligned, below `initrd_addr_max`), E820 map
/// and RSDP; the ACPI tables at the RSDP; a PVH request refused.
#[test]
fn bzimage_boot_params_describe_the_machine() {
    let Some(kernel) = bzimage() else { return };
    let setup = (usize::from(kernel[0x1f1]) + 1) * 512;
    let initrd = vec![0x5a; 3 << 20];
    let img = KernelImage {
        kernel: kernel.clone(),
        initrd: Some(initrd.clone()),
        protocol: BootProtocol::Auto,
    };
    let cmdline = "console=ttyS0 tern=test";
    let vm = Vm::with_image(
        VmConfig::new(256 << 20, 2, cmdline),
        GuestImage::Kernel(&img),
    )
    .unwrap();
    assert_eq!(read::<64>(&vm, 0x10_0000), kernel[setup..setup + 64]);
    let zp = layout::ZERO_PAGE;
    let u32_at = |o: u64| u32::from_le_bytes(read::<4>(&vm, zp + o));
    assert_eq!(&read::<4>(&vm, zp + 0x202), b"HdrS");
    assert_eq!(read::<1>(&vm, zp + 0x210)[0], 0xff, "type_of_loader");
    assert_eq!(u64::from(u32_at(0x228)), layout::CMDLINE);
    let mut cmd = vec![0u8; cmdline.len() + 1];
    vm.read_memory(layout::CMDLINE, &mut cmd).unwrap();
    assert_eq!(&cmd[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(cmd[cmdline.len()], 0);
    let (rd, rd_size) = (u64::from(u32_at(0x218)), u32_at(0x21c));
    assert_eq!(rd_size as usize, initrd.len());
    assert_eq!(rd % 4096, 0);
    assert!(
        rd + u64::from(rd_size) <= u64::from(u32_at(0x22c)) + 1,
        "initrd_addr_max"
    );
    assert_eq!(read::<16>(&vm, rd), [0x5a; 16]);
    let rsdp = u64::from_le_bytes(read::<8>(&vm, zp + 0x70));
    assert_eq!(rsdp, layout::ACPI_START);
    assert_eq!(&read::<8>(&vm, rsdp), b"RSD PTR ");
    let e820_entries = read::<1>(&vm, zp + 0x1e8)[0];
    assert_eq!(e820_entries, 4);
    // The last entry: RAM from 1 MiB to the end.
    let last = zp + 0x2d0 + 3 * 20;
    assert_eq!(u64::from_le_bytes(read::<8>(&vm, last)), 0x10_0000);
    assert_eq!(
        u64::from_le_bytes(read::<8>(&vm, last + 8)),
        (256 << 20) - 0x10_0000
    );
    assert_eq!(u32::from_le_bytes(read::<4>(&vm, last + 16)), 1);
    drop(vm);

    let pvh = KernelImage {
        protocol: BootProtocol::Pvh,
        ..img
    };
    let e = Vm::with_image(VmConfig::new(256 << 20, 1, ""), GuestImage::Kernel(&pvh)).unwrap_err();
    assert!(e.to_string().contains("PVH"), "{e}");
}
