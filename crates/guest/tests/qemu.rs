//! Boots the guest under QEMU (PVH entry, `-accel kvm`, `-cpu` chosen from the host's vendor by
//! `tern_guest::host_cpu::qemu_cpu`) when `qemu-system-x86_64` and `/dev/kvm` exist, and checks
//! heartbeats, status lines, the TSC calibration, the pattern (on a memory dump taken through the
//! monitor) and the idle fill. Skips with a message otherwise.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use tern_guest::{fill, host_cpu, layout, pattern, GuestState, StatsBlock, GUEST_ELF};

const QEMU: &str = "qemu-system-x86_64";
/// SeaBIOS and the 32-bit PVH code run emulated on PVM: booting takes seconds.
const BOOT_DEADLINE: Duration = Duration::from_secs(120);

fn find_qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(QEMU))
        .find(|p| p.is_file())
}

fn skip_reason() -> Option<String> {
    if find_qemu().is_none() {
        return Some(format!("{QEMU} not found in PATH"));
    }
    if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        return Some(format!("/dev/kvm: {e}"));
    }
    None
}

struct Qemu {
    cpu: String,
    child: Child,
    stdin: Option<ChildStdin>,
    dir: PathBuf,
    serial: PathBuf,
}

impl Qemu {
    fn start(name: &str, append: &str, ram_mib: u64) -> Qemu {
        let dir = std::env::temp_dir().join(format!("tern-guest-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let elf = dir.join("guest.elf");
        fs::write(&elf, GUEST_ELF).unwrap();
        let serial = dir.join("serial.txt");
        let log = File::create(dir.join("qemu.log")).unwrap();
        let cpu = host_cpu::qemu_cpu().expect("choosing QEMU's -cpu");
        let mut child = Command::new(QEMU)
            .args(["-accel", "kvm", "-cpu", &cpu])
            .args(["-nodefaults", "-display", "none"])
            .args(["-no-reboot", "-monitor", "stdio", "-m"])
            .arg(ram_mib.to_string())
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-kernel")
            .arg(&elf)
            .arg("-append")
            .arg(append)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn qemu");
        let stdin = child.stdin.take();
        Qemu {
            cpu,
            child,
            stdin,
            dir,
            serial,
        }
    }

    fn serial(&self) -> Vec<u8> {
        fs::read(&self.serial).unwrap_or_default()
    }

    /// Polls the serial output until `done` accepts it.
    fn wait_serial<T>(&mut self, what: &str, mut done: impl FnMut(&Serial) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            let s = Serial::parse(&self.serial());
            if let Some(t) = done(&s) {
                return t;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "qemu exited ({status}) while waiting for {what}; {}",
                    self.diag()
                );
            }
            if start.elapsed() > BOOT_DEADLINE {
                panic!("timeout waiting for {what}; {}", self.diag());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn diag(&self) -> String {
        let serial = String::from_utf8_lossy(&self.serial()).into_owned();
        let tail: String = serial
            .chars()
            .rev()
            .take(600)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let log = fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default();
        format!("-cpu {}; serial tail: {tail:?}; qemu log: {log}", self.cpu)
    }

    /// Sends one command to the QEMU monitor (stdin).
    fn monitor(&mut self, cmd: &str) {
        let stdin = self.stdin.as_mut().expect("monitor");
        stdin.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Stops the guest, saves guest RAM [0, len) through the monitor, quits, returns the dump.
    fn dump(mut self, len: u64) -> Vec<u8> {
        let path = self.dir.join("ram.bin");
        let cmds = format!("stop\npmemsave 0 {len} \"{}\"\nquit\n", path.display());
        let mut stdin = self.stdin.take().expect("monitor");
        stdin.write_all(cmds.as_bytes()).unwrap();
        drop(stdin);
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "qemu did not quit; {}",
                self.diag()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let dump = fs::read(&path).unwrap();
        assert_eq!(dump.len() as u64, len);
        dump
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The serial stream split in heartbeat bytes (0x40..=0x5f outside lines) and `#...\n` lines.
struct Serial {
    heartbeats: Vec<u8>,
    lines: Vec<String>,
}

impl Serial {
    fn parse(bytes: &[u8]) -> Serial {
        let (mut heartbeats, mut lines, mut line) = (Vec::new(), Vec::new(), None::<Vec<u8>>);
        for &b in bytes {
            match (&mut line, b) {
                (Some(l), b'\n') => {
                    lines.push(String::from_utf8_lossy(l).into_owned());
                    line = None;
                }
                (Some(l), b) => l.push(b),
                (None, b'#') => line = Some(vec![b'#']),
                (None, 0x40..=0x5f) => heartbeats.push(b),
                (None, _) => {}
            }
        }
        Serial { heartbeats, lines }
    }

    /// Status lines as (hb, pages).
    fn status(&self) -> Vec<(u64, u64)> {
        self.lines
            .iter()
            .filter(|l| l.starts_with("#t="))
            .filter_map(|l| Some((field(l, "hb=")?, field(l, "pages=")?)))
            .collect()
    }
}

fn field(line: &str, key: &str) -> Option<u64> {
    word(line, key)?.parse().ok()
}

/// The text after ` key` (e.g. `key = "tsc_src="`) up to the next space.
fn word<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}"))? + 1 + key.len();
    line[at..].split(' ').next()
}

/// A (TSC, wall clock) sample of this host, to measure the TSC rate over a test.
struct TscSample(u64, Instant);

impl TscSample {
    fn now() -> TscSample {
        // SAFETY: `rdtsc` has no preconditions on x86_64; it only reads the time-stamp counter.
        TscSample(unsafe { std::arch::x86_64::_rdtsc() }, Instant::now())
    }

    /// The host's TSC rate in kHz between `self` and now (the guest's TSC runs at the same rate:
    /// PVM has no TSC scaling).
    fn khz_since(&self) -> u64 {
        let end = TscSample::now();
        let secs = end.1.duration_since(self.1).as_secs_f64();
        ((end.0 - self.0) as f64 / secs / 1000.0).round() as u64
    }
}

#[test]
fn pattern_under_qemu() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED pattern_under_qemu: {why}");
        return;
    }
    let mem_mib = 32;
    let mut q = Qemu::start(
        "pattern",
        &format!("workload=pattern mem={mem_mib} hb=1 status=300 bogus=1"),
        256,
    );
    let s = q.wait_serial("two increasing status lines", |s| {
        let st = s.status();
        (st.len() >= 2 && s.heartbeats.len() >= 100).then_some(())?;
        let (a, b) = (st[st.len() - 2], st[st.len() - 1]);
        (b.0 > a.0 && b.1 > a.1).then(|| Serial {
            heartbeats: s.heartbeats.clone(),
            lines: s.lines.clone(),
        })
    });
    assert!(
        s.lines
            .iter()
            .any(|l| l.starts_with("#unknown option: bogus=1")),
        "{:?}",
        s.lines
    );
    assert!(s
        .lines
        .iter()
        .any(|l| l.starts_with("#tern-guest entry=pvh vcpus=1 workload=pattern")));
    assert!(s.lines.iter().any(|l| l.starts_with("#running")));
    // Heartbeat k is 0x40 + k % 32, k = 1, 2, ...: consecutive bytes step by one (mod 32).
    assert_eq!(s.heartbeats[0], 0x41);
    for w in s.heartbeats.windows(2) {
        assert_eq!(
            w[1] - 0x40,
            (w[0] - 0x40 + 1) % 32,
            "heartbeat sequence broken"
        );
    }
    let last_hb = s.status().last().unwrap().0;

    let dump = q.dump(layout::WORK_BASE + (mem_mib << 20));
    let stats = StatsBlock::from_dump(&dump, 0, 0).unwrap();
    assert_eq!(stats.state, GuestState::Running);
    assert!(stats.is_pvh());
    assert!(stats.hb_seq >= last_hb, "{stats:?}");
    assert!(
        stats.passes > 0 && stats.pages_written > 0 && stats.loops > 0,
        "{stats:?}"
    );
    assert_eq!(
        (stats.work_base, stats.work_len),
        (layout::WORK_BASE, mem_mib << 20)
    );
    let report = pattern::check_dump(&dump, 0).unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.pages_checked, (mem_mib << 20) / layout::PAGE_SIZE);
    assert!(report.ranges[0].edges <= 1);

    // The same dump with one stale page fails.
    let mut bad = dump;
    let page = (layout::WORK_BASE + 1000 * layout::PAGE_SIZE) as usize;
    bad[page] = bad[page].wrapping_sub(7);
    assert!(!pattern::check_dump(&bad, 0).unwrap().is_ok());
}

#[test]
fn idle_fill_under_qemu() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED idle_fill_under_qemu: {why}");
        return;
    }
    let mem_mib = 8;
    // `tsc_khz=` wins over every other source (an arbitrary value, not this host's).
    let mut q = Qemu::start(
        "idle",
        &format!("workload=idle mem={mem_mib} hb=0 status=200 tsc_khz=1234567"),
        128,
    );
    let lines = q.wait_serial("running and a status line", |s| {
        (s.lines.iter().any(|l| l.starts_with("#running")) && !s.status().is_empty())
            .then(|| s.lines.clone())
    });
    let banner = lines
        .iter()
        .find(|l| l.starts_with("#tern-guest "))
        .expect("banner");
    assert!(
        banner.ends_with(" tsc_khz=1234567 tsc_src=cmdline"),
        "{banner}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("#tsc")),
        "no calibration with tsc_khz=: {lines:?}"
    );
    let dump = q.dump(layout::WORK_BASE + (mem_mib << 20));
    let stats = StatsBlock::from_dump(&dump, 0, 0).unwrap();
    assert_eq!(stats.state, GuestState::Running);
    assert_eq!(stats.tsc_khz, 1_234_567);
    assert_eq!(stats.hb_seq, 0, "hb=0 means no heartbeats");
    assert_eq!(stats.pages_written, (mem_mib << 20) / layout::PAGE_SIZE);
    let mut expect = vec![0u8; layout::PAGE_SIZE as usize];
    for (i, page) in dump[layout::WORK_BASE as usize..]
        .chunks_exact(layout::PAGE_SIZE as usize)
        .enumerate()
    {
        let gpa = layout::WORK_BASE + i as u64 * layout::PAGE_SIZE;
        fill::fill_page(gpa, &mut expect);
        assert!(page == expect.as_slice(), "fill mismatch at {gpa:#x}");
    }
}

/// No `tsc_khz=` on the command line (QEMU passes no TSC rate to a PVH guest): the guest finds
/// the rate itself (CPUID where the host reports it, else the PIT; on AMD hosts the PIT), says
/// so in its banner, and beats at that rate.
#[test]
fn calibrates_its_tsc_without_tsc_khz() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED calibrates_its_tsc_without_tsc_khz: {why}");
        return;
    }
    let host = TscSample::now();
    let mut q = Qemu::start("tsc", "workload=idle hb=1 status=200", 64);
    let s = q.wait_serial("the banner, 200 heartbeats and a status line", |s| {
        (s.heartbeats.len() >= 200 && !s.status().is_empty()).then(|| Serial {
            heartbeats: s.heartbeats.clone(),
            lines: s.lines.clone(),
        })
    });
    let host_khz = host.khz_since();
    let banner = s
        .lines
        .iter()
        .find(|l| l.starts_with("#tern-guest entry=pvh "))
        .unwrap_or_else(|| panic!("no banner: {:?}", s.lines));
    let khz = field(banner, "tsc_khz=").expect("tsc_khz in the banner");
    let src = word(banner, "tsc_src=").expect("tsc_src in the banner");
    eprintln!(
        "guest: {khz} kHz from {src}; host: {host_khz} kHz; -cpu {}",
        q.cpu
    );
    assert!(
        ["cpuid15", "hypervisor", "cpuid16", "pit"].contains(&src),
        "the guest found no TSC rate: {:?}",
        s.lines
    );
    let pit_line = s.lines.iter().find(|l| l.starts_with("#tsc pit: "));
    assert_eq!(pit_line.is_some(), src == "pit", "{:?}", s.lines);
    if let Some(l) = pit_line {
        assert_eq!(field(l, "khz="), Some(khz), "{l}");
    }
    // 2 % is the guest's own limit on a PIT measurement; CPUID rates are exact or MHz-rounded.
    let off_ppm = khz.abs_diff(host_khz) * 1_000_000 / host_khz;
    assert!(
        off_ppm <= 20_000,
        "guest {khz} kHz ({src}) vs host {host_khz} kHz: {off_ppm} ppm off"
    );
    assert_eq!(s.heartbeats[0], 0x41, "first heartbeat is seq 1");
    for w in s.heartbeats.windows(2) {
        assert_eq!(
            w[1] - 0x40,
            (w[0] - 0x40 + 1) % 32,
            "heartbeat sequence broken"
        );
    }
}

/// The PVH entry installs an IDT: an exception or NMI in the running guest prints a `#FAULT`
/// line (instead of a silent triple fault) and marks vCPU 0's stats block panicked. The NMI
/// comes from QEMU's monitor.
#[test]
fn an_exception_is_reported_on_the_serial_line() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED an_exception_is_reported_on_the_serial_line: {why}");
        return;
    }
    let mem_mib = 8;
    let mut q = Qemu::start(
        "fault",
        &format!("workload=pattern mem={mem_mib} hb=1 status=0"),
        64,
    );
    q.wait_serial("#running and 20 heartbeats", |s| {
        (s.lines.iter().any(|l| l.starts_with("#running")) && s.heartbeats.len() >= 20)
            .then_some(())
    });
    q.monitor("nmi");
    let line = q.wait_serial("the #FAULT line", |s| {
        s.lines.iter().find(|l| l.starts_with("#FAULT ")).cloned()
    });
    assert!(line.starts_with("#FAULT vector=0x02 error=0x"), "{line}");
    let hex = |key: &str| {
        let w = word(&line, key).unwrap_or_else(|| panic!("no {key} in {line}"));
        u64::from_str_radix(w, 16).unwrap_or_else(|e| panic!("{line}: {e}"))
    };
    let (rip, rsp) = (hex("rip=0x"), hex("rsp=0x"));
    assert!(
        (layout::IMAGE_BASE..layout::IMAGE_END).contains(&rip),
        "rip {rip:#x} is not in the image: {line}"
    );
    assert!(
        (layout::STACK_BASE..layout::stack_top(0)).contains(&rsp),
        "rsp {rsp:#x} is not on vCPU 0's stack: {line}"
    );
    let dump = q.dump(layout::WORK_BASE + (mem_mib << 20));
    let stats = StatsBlock::from_dump(&dump, 0, 0).unwrap();
    assert_eq!(stats.state, GuestState::Panicked, "{stats:?}");
}
