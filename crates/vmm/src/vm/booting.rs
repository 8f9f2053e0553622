//! Booting the machine's image (direct entry or `--kernel`) and `system_reset`.

use crate::abi;
use crate::boot::kernel::load_kernel;
use crate::boot::{self, BootInfo};
use crate::error::{Error, Result};
use crate::state::cpu::VcpuComponent;
use crate::state::Persist;
use crate::vcpu::lock_vcpu;

use super::{lock, Entry, GuestImage, Phase, Vm};

impl Vm {
    /// Loads `image` and puts every vCPU at its entry (vCPUs parked or not yet started).
    pub(super) fn boot_vcpus(&self, image: GuestImage<'_>) -> Result<()> {
        let count = self.vcpus.len() as u32;
        match self.load(image)? {
            Entry::Direct(boot) => {
                for (i, fd) in self.vcpus.iter().enumerate() {
                    let fd = lock_vcpu(fd);
                    let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
                    boot::setup_vcpu(&fd, i as u32, count, &boot, tsc_khz)?;
                }
            }
            Entry::Kernel(entry) => {
                for (i, fd) in self.vcpus.iter().enumerate() {
                    let fd = lock_vcpu(fd);
                    boot::cpu::set_boot_msrs(&fd, i as u32)?;
                    if i == 0 {
                        boot::cpu::setup_boot_cpu(&fd, &entry)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn load(&self, image: GuestImage<'_>) -> Result<Entry> {
        let cmdline = self.config().cmdline;
        match image {
            GuestImage::Builtin => {
                boot::load_guest(&self.ram, abi::guest_elf(), &cmdline).map(Entry::Direct)
            }
            GuestImage::Elf(elf) => boot::load_guest(&self.ram, elf, &cmdline).map(Entry::Direct),
            GuestImage::Kernel(k) => {
                boot::cpu::write_gdt(&self.ram)?;
                load_kernel(&self.ram, self.vcpus.len() as u32, k, &cmdline).map(Entry::Kernel)
            }
            GuestImage::Raw { load, code } => {
                self.ram.write(load, code)?;
                let gdt = boot::write_page_tables(&self.ram)?;
                let mut cmd = cmdline.into_bytes();
                cmd.push(0);
                self.ram.write(abi::CMDLINE, &cmd)?;
                Ok(Entry::Direct(BootInfo {
                    entry: load,
                    gdt,
                    image_end: load + code.len() as u64,
                }))
            }
        }
    }

    /// Resets the machine as a reset button would: every vCPU back to the state KVM created it
    /// in (LAPIC, MSRs, TSC...), the boot image and its boot structures loaded again, the vCPUs
    /// at their entry; RAM is otherwise kept (as QEMU does). Runs again if it ran before.
    /// Also clears a vCPU failure (a reset is how a triple-faulted machine comes back).
    pub fn system_reset(&self) -> Result<()> {
        let phase = *lock(&self.phase);
        if matches!(phase, Phase::Shutdown | Phase::Incoming) {
            return Err(Error::State(format!(
                "cannot reset a machine that is {}",
                if phase == Phase::Shutdown {
                    "shut down"
                } else {
                    "waiting for its incoming state"
                }
            )));
        }
        let source = lock(&self.boot).clone().ok_or_else(|| {
            Error::State(
                "this machine has no boot image to reset to (an incoming kernel guest started without --kernel)"
                    .into(),
            )
        })?;
        let was_running =
            self.is_running() || (self.shared.failure().is_some() && phase == Phase::Started);
        self.pause()?;
        for (i, (fd, state)) in self.vcpus.iter().zip(&self.pristine).enumerate() {
            VcpuComponent {
                index: i as u32,
                fd: &lock_vcpu(fd),
                caps: self.caps,
            }
            .restore(state)?;
        }
        self.boot_vcpus(source.image())?;
        self.shared.bus.i8042.set_state(&Default::default());
        self.shared
            .resets
            .completed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Served: the guest's next request reaches the owner again.
        self.finish_reset_request();
        if self.shared.clear_failure() {
            tracing::info!("system reset cleared the vCPU failure");
        }
        if was_running {
            self.resume()?;
        }
        Ok(())
    }

    /// Calls `f` (on the vCPU thread) when the guest asks for a reset (i8042) and no earlier
    /// request is pending; the machine does not reset by itself: the owner calls
    /// [`Vm::system_reset`] from another thread (a vCPU thread cannot wait for itself to park),
    /// or [`Vm::finish_reset_request`] when it refuses.
    pub fn on_guest_reset(&self, f: impl Fn() + Send + Sync + 'static) {
        *self
            .shared
            .resets
            .callback
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Box::new(f));
    }

    /// Forgets a pending guest reset request (done by [`Vm::system_reset`]; the owner calls it
    /// when it refuses a request), so the next one reaches the callback again.
    pub fn finish_reset_request(&self) {
        self.shared
            .resets
            .pending
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Guest reset requests so far, and resets done.
    pub fn reset_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.shared.resets.requested.load(Relaxed),
            self.shared.resets.completed.load(Relaxed),
        )
    }
}
