//! The machine: one KVM VM, its RAM, devices and vCPU threads, and the API the glue uses.
//! Booting an image and resetting: `booting.rs`.

mod booting;

use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::kernel::{KernelEntry, KernelImage};
use crate::boot::source::BootSource;
use crate::boot::{self, BootInfo};
use crate::caps::HostCaps;
use crate::config::VmConfig;
use crate::cpuid::{migration_cpuid, CpuIdentity};
use crate::devices::control::{realtime_ns, GuestControl, GuestEvent, Heartbeat, HeartbeatSummary};
use crate::devices::serial::{self, SerialDevice, SerialLine};
use crate::devices::{ExitCounters, ExitStats, PioBus};
use crate::error::{Error, Result};
use crate::memory::{ram_layout, GuestRam, RamRegionInfo};
use crate::runctl::{register_kick_handler, Request, RunControl};
use crate::stall::{MaxStall, StallMeter};
use crate::state::cpu::{VcpuComponent, VcpuState};
use crate::state::snapshot::{restore_all, save_all, MachineParts, SaveBreakdown};
use crate::state::{ComponentState, Persist};
use crate::vcpu::{self, lock_vcpu, Shared, SharedVcpu, VcpuFailure};
use crate::{abi, vcpu::describe_regs};

/// How long `pause` waits for the vCPUs before giving up.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Where KVM may put its TSS (VMX hosts), just below 4 GiB.
const TSS_ADDRESS: usize = 0xfffb_d000;
/// Where KVM may put its identity-map page (VMX hosts).
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// What to load into a fresh machine.
#[derive(Clone, Copy, Debug)]
pub enum GuestImage<'a> {
    /// The test guest (`tern_guest::GUEST_ELF`).
    Builtin,
    /// An ELF image entered the same way (direct entry).
    Elf(&'a [u8]),
    /// Raw code copied to `load` and entered at `load` (tests, probes).
    Raw {
        /// GPA to copy the code to (and entry point).
        load: u64,
        /// The code.
        code: &'a [u8],
    },
    /// A kernel (`tern run --kernel`): PVH ELF, vmlinux or bzImage, with the machine's command
    /// line (docs/machine.md "Boot paths").
    Kernel(&'a KernelImage),
}

/// Where the vCPUs start.
#[derive(Clone, Copy, Debug)]
enum Entry {
    /// The test guest's direct entry: every vCPU in long mode at CPL 3.
    Direct(BootInfo),
    /// A kernel: the boot CPU at the kernel's entry, the others waiting for INIT/SIPI.
    Kernel(KernelEntry),
}

/// The machine's lifecycle as the API sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStatus {
    /// Built, the guest not started yet.
    Created,
    /// Built for an incoming migration, waiting for RAM and state.
    Incoming,
    /// vCPUs run.
    Running,
    /// vCPUs are parked.
    Paused,
    /// A vCPU stopped for good (HLT, SHUTDOWN, FAIL_ENTRY, INTERNAL_ERROR, KVM_RUN error).
    Failed(VcpuFailure),
    /// `shutdown` was called.
    Shutdown,
}

/// Measured durations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmTimings {
    /// Last `pause`: request → every vCPU parked.
    pub last_pause: Option<Duration>,
    /// Largest `pause` so far.
    pub max_pause: Option<Duration>,
    /// Last `save_components`.
    pub last_save: Option<Duration>,
    /// Split of the last `save_components`.
    pub last_save_breakdown: Option<SaveBreakdown>,
    /// Last `restore_components`.
    pub last_restore: Option<Duration>,
    /// Building the machine (`new` / `new_for_incoming`).
    pub create: Duration,
    /// `CLOCK_REALTIME` (ns) of the first `resume`.
    pub first_resume_ns: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Created,
    Incoming,
    Started,
    Shutdown,
}

/// A machine.
pub struct Vm {
    config: RwLock<VmConfig>,
    phase: Mutex<Phase>,
    timings: Mutex<VmTimings>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    shared: Arc<Shared>,
    vcpus: Vec<SharedVcpu>,
    /// vCPU 0's CPUID and TSC frequency as KVM reports them, read while it is not running (at
    /// build and after a restore), so [`Vm::cpu_identity`] never waits for a running vCPU.
    cpu: Mutex<CpuSnapshot>,
    caps: &'static HostCaps,
    /// Each vCPU's state as KVM created it (the architectural reset state), for `system_reset`.
    pristine: Vec<VcpuState>,
    /// The image a reset reloads (`None`: an incoming machine not given one).
    boot: Mutex<Option<BootSource>>,
    vm_fd: VmFd,
    _kvm: Kvm,
    /// Declared last: dropped after the VM fd, so KVM never sees unmapped slots.
    ram: Arc<GuestRam>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config())
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

/// What [`Vm::cpu_identity`] reports, read from vCPU 0.
#[derive(Debug, Default)]
struct CpuSnapshot {
    cpuid: Vec<kvm_cpuid_entry2>,
    tsc_khz: Option<u32>,
}

impl CpuSnapshot {
    /// Reads vCPU 0 (which must not be in `KVM_RUN`).
    fn read(fd: &kvm_ioctls::VcpuFd) -> Result<Self> {
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::kvm("vcpu 0", "KVM_GET_CPUID2", e))?
            .as_slice()
            .to_vec();
        Ok(Self {
            cpuid,
            tsc_khz: fd.get_tsc_khz().ok(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data; a panicked holder cannot leave it half-updated in a way that matters here.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Turns on `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with `KVM_DIRTY_LOG_INITIALLY_SET` when the host
/// offers both (as QEMU does): dirty logging then starts without a write-protect walk over
/// every slot, and `GuestRam` write-protects in bounded chunks. False: the classic
/// `KVM_GET_DIRTY_LOG` (fetch, clear and write-protect in one call) is used.
fn enable_manual_dirty_protect(vm_fd: &kvm_ioctls::VmFd) -> bool {
    let want = u64::from(
        kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            | kvm_bindings::KVM_DIRTY_LOG_INITIALLY_SET,
    );
    let offered =
        vm_fd.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    if offered < 0 || (offered as u64) & want != want {
        tracing::debug!("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = {offered}: not used");
        return false;
    }
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = want;
    match vm_fd.enable_cap(&cap) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                "enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: {e}; using KVM_GET_DIRTY_LOG alone"
            );
            false
        }
    }
}

impl Vm {
    /// Builds a machine with the test guest loaded; the vCPUs wait for [`Vm::start`].
    pub fn new(config: VmConfig) -> Result<Vm> {
        Self::with_image(config, GuestImage::Builtin)
    }

    /// Builds a machine with `image` loaded; the vCPUs wait for [`Vm::start`].
    pub fn with_image(config: VmConfig, image: GuestImage<'_>) -> Result<Vm> {
        let t0 = Instant::now();
        let vm = Self::build(config, Phase::Created)?;
        vm.boot_vcpus(image)?;
        *lock(&vm.boot) = Some(BootSource::from_image(image));
        vm.spawn_threads()?;
        lock(&vm.timings).create = t0.elapsed();
        Ok(vm)
    }

    /// Builds a machine for an incoming migration: VM, RAM, devices, vCPU fds and threads, but
    /// no guest image and nothing running. Receive RAM, then [`Vm::restore_components`], then
    /// [`Vm::resume`].
    pub fn new_for_incoming(config: VmConfig) -> Result<Vm> {
        Self::new_for_incoming_with_image(config, None)
    }

    /// [`Vm::new_for_incoming`] that keeps `image` for a later [`Vm::system_reset`] (nothing
    /// is loaded now: RAM comes from the source). The test guest is always known; a kernel
    /// guest migrated to a destination without its image cannot be reset there.
    pub fn new_for_incoming_with_image(
        config: VmConfig,
        image: Option<GuestImage<'_>>,
    ) -> Result<Vm> {
        let t0 = Instant::now();
        let vm = Self::build(config, Phase::Incoming)?;
        *lock(&vm.boot) = Some(BootSource::from_image(image.unwrap_or(GuestImage::Builtin)));
        vm.spawn_threads()?;
        lock(&vm.timings).create = t0.elapsed();
        Ok(vm)
    }

    fn build(config: VmConfig, phase: Phase) -> Result<Vm> {
        config.validate()?;
        register_kick_handler()?;
        let kvm = Kvm::new().map_err(|e| Error::kvm("host", "open /dev/kvm", e))?;
        let caps = HostCaps::get(&kvm)?;
        let vm_fd = kvm
            .create_vm()
            .map_err(|e| Error::kvm("vm", "KVM_CREATE_VM", e))?;
        if let Err(e) = vm_fd.set_tss_address(TSS_ADDRESS) {
            tracing::debug!("KVM_SET_TSS_ADDR not accepted ({e}); not needed on this host");
        }
        if let Err(e) = vm_fd.set_identity_map_address(IDENTITY_MAP_ADDRESS) {
            tracing::debug!("KVM_SET_IDENTITY_MAP_ADDR not accepted ({e}); not needed here");
        }
        vm_fd
            .create_irq_chip()
            .map_err(|e| Error::kvm("vm", "KVM_CREATE_IRQCHIP", e))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(|e| Error::kvm("vm", "KVM_CREATE_PIT2", e))?;

        // An incoming machine's RAM is written page by page by the migration: 4 KiB pages restore
        // 2–2.5x faster here than huge pages (docs/machine.md "Guest RAM on huge pages"), so the
        // advice waits until the state is restored.
        let ram = Arc::new(GuestRam::with_huge_pages(
            &ram_layout(config.memory_bytes),
            config.ram_backend,
            config.huge_pages && phase != Phase::Incoming,
        )?);
        ram.register(&vm_fd)?;
        ram.set_manual_protect(enable_manual_dirty_protect(&vm_fd));

        let irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::io("serial irq eventfd", e))?;
        vm_fd
            .register_irqfd(&irq, serial::IRQ)
            .map_err(|e| Error::kvm("serial", "KVM_IRQFD", e))?;
        let serial = SerialDevice::new(&config.serial, irq)?;
        let ctl = RunControl::new(config.vcpus as usize);
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for i in 0..config.vcpus {
            let mut fd = vm_fd
                .create_vcpu(u64::from(i))
                .map_err(|e| Error::kvm(format!("vcpu {i}"), "KVM_CREATE_VCPU", e))?;
            fd.set_cpuid2(&boot::vcpu_cpuid(&caps.supported_cpuid, i))
                .map_err(|e| Error::kvm(format!("vcpu {i}"), "KVM_SET_CPUID2", e))?;
            ctl.add_vcpu(&mut fd);
            vcpus.push(Arc::new(Mutex::new(fd)));
        }
        let cpu = match vcpus.first() {
            Some(fd) => CpuSnapshot::read(&lock_vcpu(fd))?,
            None => CpuSnapshot::default(),
        };
        let pristine = vcpus
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                VcpuComponent {
                    index: i as u32,
                    fd: &lock_vcpu(fd),
                    caps,
                }
                .save()
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            ctl,
            bus: PioBus {
                serial,
                control: GuestControl::new(),
                i8042: Default::default(),
                counters: ExitCounters::default(),
            },
            failure: Mutex::new(None),
            stalls: StallMeter::default(),
            resets: Default::default(),
            throttle: Default::default(),
            thread_ids: Default::default(),
        });
        Ok(Vm {
            config: RwLock::new(config),
            phase: Mutex::new(phase),
            timings: Mutex::new(VmTimings::default()),
            threads: Mutex::new(Vec::new()),
            shared,
            vcpus,
            cpu: Mutex::new(cpu),
            caps,
            pristine,
            boot: Mutex::new(None),
            vm_fd,
            _kvm: kvm,
            ram,
        })
    }

    fn spawn_threads(&self) -> Result<()> {
        let mut threads = lock(&self.threads);
        for (i, fd) in self.vcpus.iter().enumerate() {
            let t = vcpu::spawn(i as u32, fd.clone(), self.shared.clone())?;
            self.shared
                .ctl
                .set_thread(i, t.as_pthread_t() as libc::pthread_t);
            threads.push(t);
        }
        Ok(())
    }

    /// The configuration (after a restore: with the source's UUID and command line).
    pub fn config(&self) -> VmConfig {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts the guest (same as [`Vm::resume`]).
    pub fn start(&self) -> Result<()> {
        self.resume()
    }

    /// Stops every vCPU outside `KVM_RUN` and returns once all are parked, with the time it
    /// took. Pausing a paused machine is cheap and succeeds.
    pub fn pause(&self) -> Result<Duration> {
        if *lock(&self.phase) == Phase::Shutdown {
            return Err(Error::State("the machine is shut down".into()));
        }
        let took = self.shared.ctl.pause(PAUSE_TIMEOUT)?;
        let mut t = lock(&self.timings);
        t.last_pause = Some(took);
        t.max_pause = Some(t.max_pause.map_or(took, |m| m.max(took)));
        Ok(took)
    }

    /// Lets the vCPUs run.
    pub fn resume(&self) -> Result<()> {
        if let Some(f) = self.shared.failure() {
            return Err(Error::Vcpu {
                vcpu: f.vcpu,
                reason: format!("cannot resume a failed machine: {}", f.reason),
            });
        }
        let mut phase = lock(&self.phase);
        match *phase {
            Phase::Shutdown => return Err(Error::State("the machine is shut down".into())),
            Phase::Incoming => {
                return Err(Error::State(
                    "an incoming machine runs only after restore_components".into(),
                ))
            }
            _ => {}
        }
        *phase = Phase::Started;
        drop(phase);
        {
            let mut t = lock(&self.timings);
            if t.first_resume_ns.is_none() {
                t.first_resume_ns = Some(realtime_ns());
            }
        }
        self.shared.ctl.resume()
    }

    /// Whether the vCPUs are (asked to be) running and none has failed.
    pub fn is_running(&self) -> bool {
        self.shared.ctl.requested() == Request::Run && self.shared.failure().is_none()
    }

    /// The lifecycle state.
    pub fn status(&self) -> VmStatus {
        let phase = *lock(&self.phase);
        if phase == Phase::Shutdown {
            return VmStatus::Shutdown;
        }
        if let Some(f) = self.shared.failure() {
            return VmStatus::Failed(f);
        }
        match (phase, self.shared.ctl.requested()) {
            (Phase::Created, _) => VmStatus::Created,
            (Phase::Incoming, _) => VmStatus::Incoming,
            (_, Request::Run) => VmStatus::Running,
            _ => VmStatus::Paused,
        }
    }

    /// Asks every vCPU thread to leave (kicking it out of `KVM_RUN`) without waiting; the
    /// machine cannot run again. For a post-copy destination whose pages will never come: a
    /// vCPU blocked on a missing page leaves only once the pager lets go of the page, so the
    /// order is this, then `postcopy::Pager::shutdown`, then [`Vm::shutdown`] (which joins).
    pub fn request_stop(&self) {
        self.shared.ctl.stop();
    }

    /// Stops and joins the vCPU threads and the serial input thread. Idempotent.
    pub fn shutdown(&self) -> Result<()> {
        {
            let mut phase = lock(&self.phase);
            if *phase == Phase::Shutdown {
                return Ok(());
            }
            *phase = Phase::Shutdown;
        }
        self.shared.throttle.shutdown();
        self.shared.ctl.stop();
        let threads: Vec<_> = lock(&self.threads).drain(..).collect();
        let mut panicked = Vec::new();
        for (i, t) in threads.into_iter().enumerate() {
            if t.join().is_err() {
                panicked.push(i);
            }
        }
        self.shared.ctl.clear_threads();
        self.shared.bus.serial.shutdown();
        if let Some(&i) = panicked.first() {
            return Err(Error::Vcpu {
                vcpu: i as u32,
                reason: "the vCPU thread panicked".into(),
            });
        }
        Ok(())
    }

    /// Timings measured so far.
    pub fn timings(&self) -> VmTimings {
        *lock(&self.timings)
    }

    /// Exit counters.
    pub fn exit_stats(&self) -> ExitStats {
        self.shared.bus.counters.snapshot()
    }

    /// Register dump of vCPU `index` (paused machine, or a failed vCPU).
    pub fn describe_vcpu(&self, index: u32) -> Result<String> {
        let fd = self.vcpu(index)?;
        if !self.shared.ctl.all_parked() {
            return Err(Error::State("pause the machine first".into()));
        }
        Ok(describe_regs(&lock_vcpu(fd)))
    }

    fn vcpu(&self, index: u32) -> Result<&SharedVcpu> {
        self.vcpus
            .get(index as usize)
            .ok_or_else(|| Error::State(format!("no vcpu {index}")))
    }

    /// What a migration destination compares before it accepts this machine's state: the
    /// masked CPUID of vCPU 0 (`docs/machine.md`, "CPU compatibility"), the TSC frequency, and
    /// whether this host can scale the TSC. Cheap; never waits for the vCPUs.
    pub fn cpu_identity(&self) -> CpuIdentity {
        let c = lock(&self.cpu);
        CpuIdentity {
            cpuid: migration_cpuid(&c.cpuid),
            tsc_khz: c.tsc_khz,
            tsc_scaling: self.caps.tsc_control,
            tsc_tolerance_khz: crate::state::cpu::TSC_KHZ_TOLERANCE,
        }
    }

    // ---- heartbeats, events, serial -------------------------------------------------------

    /// Kernel thread id of each vCPU thread, by index. Every thread records its id before it
    /// first parks, so after [`Vm::pause`] or [`Vm::restore_components`] all are known.
    pub fn vcpu_thread_ids(&self) -> Vec<Option<i32>> {
        let mut ids = self.shared.thread_ids.get();
        ids.resize(self.vcpus.len(), None);
        ids
    }

    /// The longest time a vCPU that wanted to run was kept out of `KVM_RUN` since the last
    /// [`Vm::reset_vcpu_stall`] (see `stall.rs` for what counts).
    pub fn max_vcpu_stall(&self) -> MaxStall {
        self.shared.stalls.max()
    }

    /// `auto-converge`: lets every vCPU run only `100 - pct` % of the time by time slicing
    /// (`throttle.rs`, QEMU's cpu-throttle); 0 removes the throttle, values above 99 are
    /// clamped. A pause, stop or shutdown is never delayed by it.
    pub fn set_cpu_throttle(&self, pct: u8) -> Result<()> {
        self.shared.throttle.set(&self.shared, pct)
    }

    /// The throttle in force and what it did.
    pub fn cpu_throttle(&self) -> crate::throttle::ThrottleStats {
        self.shared.throttle.stats()
    }

    /// Starts a new vCPU stall measurement window.
    pub fn reset_vcpu_stall(&self) {
        self.shared.stalls.reset()
    }

    /// Heartbeat statistics: last, count, largest gap.
    pub fn heartbeats(&self) -> HeartbeatSummary {
        self.shared.bus.control.heartbeats()
    }

    /// Heartbeats with a sequence number above `seq` still in the ring (1 M entries).
    pub fn heartbeats_since(&self, seq: u64) -> Vec<Heartbeat> {
        self.shared.bus.control.heartbeats_since(seq)
    }

    /// Waits until more than `count` heartbeats arrived or `deadline` passed.
    pub fn wait_heartbeats(&self, count: u64, deadline: Instant) -> HeartbeatSummary {
        self.shared.bus.control.wait_heartbeats(count, deadline)
    }

    /// Guest events still in the ring.
    pub fn guest_events(&self) -> Vec<GuestEvent> {
        self.shared.bus.control.events()
    }

    /// The first guest panic.
    pub fn guest_panic(&self) -> Option<GuestEvent> {
        self.shared.bus.control.panic()
    }

    /// Serial lines with index >= `from` still in the ring (4096 lines).
    pub fn serial_lines(&self, from: u64) -> Vec<SerialLine> {
        self.shared.bus.serial.output().lines(from)
    }

    /// Waits for a serial line with index >= `from` matching `pred`.
    pub fn wait_serial_line(
        &self,
        from: u64,
        deadline: Instant,
        pred: impl Fn(&SerialLine) -> bool,
    ) -> Option<SerialLine> {
        self.shared
            .bus
            .serial
            .output()
            .wait_line(from, deadline, pred)
    }

    // ---- memory ---------------------------------------------------------------------------

    /// RAM regions (id = memslot).
    pub fn regions(&self) -> Vec<RamRegionInfo> {
        self.ram.regions().to_vec()
    }

    /// The RAM object (for zero-copy users such as a uffd handler).
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Reads guest memory.
    pub fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.ram.read(gpa, buf)
    }

    /// Writes guest memory (tracked in the VMM dirty bitmap).
    pub fn write_memory(&self, gpa: u64, buf: &[u8]) -> Result<()> {
        self.ram.write(gpa, buf)
    }

    /// Reads one 4 KiB page.
    pub fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.ram.read_page(gpa, buf)
    }

    /// Writes one 4 KiB page.
    pub fn write_page(&self, gpa: u64, buf: &[u8]) -> Result<()> {
        self.ram.write_page(gpa, buf)
    }

    /// Makes one page read as zeros (no allocation if it already does).
    pub fn zero_page(&self, gpa: u64) -> Result<()> {
        self.ram.zero_page(gpa)
    }

    /// Frees guest memory `gpa..gpa+len` on the host (`release-ram`, see
    /// [`GuestRam::discard`]); the pages read as zeros afterwards.
    pub fn discard_ram(&self, gpa: u64, len: u64) -> Result<()> {
        self.ram.discard(gpa, len)
    }

    /// Starts dirty logging.
    pub fn start_dirty_log(&self) -> Result<()> {
        self.ram.start_dirty_log(&self.vm_fd)
    }

    /// ORs the pages dirtied since the last sync into `bitmaps` (one per region).
    pub fn sync_dirty_log(&self, bitmaps: &mut [Vec<u64>]) -> Result<()> {
        self.ram.sync_dirty_log(&self.vm_fd, bitmaps)
    }

    /// ORs into `out` (one bitmap per region) the pages never touched (they read as zero);
    /// false when that cannot be known (swap configured).
    pub fn untouched_pages(&self, out: &mut [Vec<u64>]) -> Result<bool> {
        self.ram.untouched_pages(out)
    }

    /// Stops dirty logging.
    pub fn stop_dirty_log(&self) -> Result<()> {
        self.ram.stop_dirty_log(&self.vm_fd)
    }

    /// Decodes vCPU `vcpu`'s stats block from guest RAM.
    pub fn guest_stats(&self, vcpu: u32) -> Result<abi::StatsBlock> {
        self.vcpu(vcpu)?;
        let gpa = abi::stats_addr(vcpu);
        let mut buf = vec![0u8; abi::STATS_STRIDE as usize];
        self.ram.read(gpa, &mut buf)?;
        abi::StatsBlock::parse(&buf, gpa).map_err(|source| Error::GuestStats { vcpu, source })
    }

    // ---- state ----------------------------------------------------------------------------

    fn parts(&self) -> MachineParts<'_> {
        MachineParts {
            vm: &self.vm_fd,
            vcpus: &self.vcpus,
            shared: &self.shared,
            regions: self.ram.regions(),
            caps: self.caps,
            boot: &self.boot,
        }
    }

    fn require_parked(&self) -> Result<()> {
        if *lock(&self.phase) == Phase::Shutdown {
            return Err(Error::State("the machine is shut down".into()));
        }
        if self.shared.ctl.requested() == Request::Run {
            return Err(Error::State("pause the machine first".into()));
        }
        // Already paused: this only waits for vCPU threads that have not parked yet (a machine
        // fresh from `new_for_incoming`).
        self.shared.ctl.pause(PAUSE_TIMEOUT).map(|_| ())
    }

    /// Saves every component (machine must be paused). Order: machine, kvmclock, irqchip, pit,
    /// serial, guest-control, cpu 0..n.
    pub fn save_components(&self) -> Result<Vec<ComponentState>> {
        self.require_parked()?;
        let t0 = Instant::now();
        let config = self.config();
        let (out, breakdown) = save_all(&self.parts(), &config)?;
        let mut t = lock(&self.timings);
        t.last_save = Some(t0.elapsed());
        t.last_save_breakdown = Some(breakdown);
        Ok(out)
    }

    /// Validates `states` against this machine (unknown, missing, duplicate, newer or
    /// malformed component → error, nothing touched), then restores VM-level state, devices,
    /// and the vCPUs. The machine must be paused (or fresh from [`Vm::new_for_incoming`]).
    pub fn restore_components(&self, states: &[ComponentState]) -> Result<()> {
        self.require_parked()?;
        let t0 = Instant::now();
        let mut config = self.config();
        restore_all(&self.parts(), &mut config, states)?;
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
        // vCPU 0 now has the source's CPUID (and TSC frequency, with scaling).
        if let Some(fd) = self.vcpus.first() {
            *lock(&self.cpu) = CpuSnapshot::read(&lock_vcpu(fd))?;
        }
        lock(&self.timings).last_restore = Some(t0.elapsed());
        let huge_pages = self.config().huge_pages;
        let mut phase = lock(&self.phase);
        if *phase == Phase::Incoming {
            // RAM is in: from now on the guest's own faults may get huge pages.
            if huge_pages {
                self.ram.advise_huge_pages();
            }
            *phase = Phase::Started;
        }
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!("machine shutdown: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Vm>();
    }
}
