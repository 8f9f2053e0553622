//! The daemon's domain registry and the lifecycle operations (libvirt's `virDomain*` calls).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use virt::conf::{format_domain, parse_domain, DomainDef, DriverKind};
use virt::{
    DomainInfo, DomainState, DomainSummary, Error, HypervisorDriver, LaunchMode, LifecycleEvent,
    Result,
};

use crate::domain::Domain;
use crate::events::EventBus;
use crate::vmm;

/// How long `destroy`/`shutdown` wait for the VMM to exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Config {
    /// Persistent definitions: `STATE_DIR/domains/NAME.xml`.
    pub state_dir: PathBuf,
    /// Sockets, pid files, status files, VMM logs.
    pub run_dir: PathBuf,
    /// Capabilities this daemon's cookies never offer (`--x-hide-capability`: testing the
    /// negotiation against a VMM without them).
    pub hide_capabilities: Vec<String>,
    /// How long a prepared incoming migration waits for its stream to start before the
    /// destination gives up on it (the source daemon vanished after Prepare).
    pub prepare_timeout: std::time::Duration,
    /// `--migrate-tls-dir`: this host's certificates for `--tls` migrations, in QEMU's
    /// `tls-creds-x509` layout (libvirt's `migrate_tls_x509_cert_dir`).
    pub migrate_tls_dir: Option<PathBuf>,
}

pub struct Daemon {
    pub cfg: Config,
    pub hostname: String,
    pub events: EventBus,
    drivers: Vec<Box<dyn HypervisorDriver>>,
    domains: Mutex<Vec<Arc<Domain>>>,
    next_id: AtomicU32,
}

impl Daemon {
    pub fn new(cfg: Config, drivers: Vec<Box<dyn HypervisorDriver>>) -> Arc<Daemon> {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        Arc::new(Daemon {
            cfg,
            hostname,
            events: EventBus::default(),
            drivers,
            domains: Mutex::new(Vec::new()),
            next_id: AtomicU32::new(1),
        })
    }

    fn defs_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("domains")
    }

    fn def_path(&self, name: &str) -> PathBuf {
        self.defs_dir().join(format!("{name}.xml"))
    }

    pub fn driver(&self, kind: DriverKind) -> Result<&dyn HypervisorDriver> {
        self.drivers
            .iter()
            .find(|d| d.kind() == kind)
            .map(|d| d.as_ref())
            .ok_or_else(|| {
                Error::Unsupported(format!("this daemon has no '{}' driver", kind.name()))
            })
    }

    pub fn next_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::SeqCst)
    }

    pub fn bump_id(&self, seen: u32) {
        self.next_id.fetch_max(seen + 1, Ordering::SeqCst);
    }

    fn all(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Domain>>> {
        self.domains.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks a domain up by name or UUID (virsh accepts both; ids too).
    pub fn lookup(&self, key: &str) -> Result<Arc<Domain>> {
        let all = self.all();
        all.iter()
            .find(|d| d.name == key || d.uuid.eq_ignore_ascii_case(key))
            .or_else(|| {
                let id: u32 = key.parse().ok()?;
                all.iter().find(|d| d.lock().id == Some(id))
            })
            .cloned()
            .ok_or_else(|| Error::NoDomain(format!("no domain with matching name or uuid '{key}'")))
    }

    /// Removes a domain from the registry.
    pub fn forget(&self, dom: &Arc<Domain>) {
        self.all().retain(|d| !Arc::ptr_eq(d, dom));
        dom.lock().removed = true;
    }

    /// Checks that `def` may join the registry: no other domain with its name or UUID.
    /// Returns the existing domain with the same name and UUID, if any.
    fn check_unique(all: &[Arc<Domain>], def: &DomainDef) -> Result<Option<Arc<Domain>>> {
        let uuid = def.uuid.to_string();
        for d in all {
            if d.name == def.name && d.uuid != uuid {
                return Err(Error::DomainExists(format!(
                    "domain '{}' already exists with uuid {}",
                    d.name, d.uuid
                )));
            }
            if d.uuid == uuid && d.name != def.name {
                return Err(Error::DomainExists(format!(
                    "domain '{}' is already defined with uuid {}",
                    d.name, d.uuid
                )));
            }
        }
        Ok(all.iter().find(|d| d.name == def.name).cloned())
    }

    /// Adds a domain found running at startup (or a transient one).
    pub fn adopt(&self, def: DomainDef, persistent: bool) -> Result<Arc<Domain>> {
        let mut all = self.all();
        if let Some(d) = Self::check_unique(&all, &def)? {
            let mut g = d.lock();
            g.def = def;
            g.persistent |= persistent;
            drop(g);
            return Ok(d);
        }
        let d = Domain::new(def, persistent);
        all.push(d.clone());
        Ok(d)
    }

    /// Loads the persistent definitions at startup.
    pub fn load_definitions(&self) -> Result<usize> {
        virt_util::dirs::ensure_dir(&self.defs_dir(), 0o700)
            .map_err(|e| Error::OperationFailed(e.to_string()))?;
        let mut n = 0;
        let rd = std::fs::read_dir(self.defs_dir())
            .map_err(|e| Error::OperationFailed(format!("{}: {e}", self.defs_dir().display())))?;
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("xml") {
                continue;
            }
            let loaded = std::fs::read_to_string(&p)
                .map_err(|e| e.to_string())
                .and_then(|x| parse_domain(&x).map_err(|e| e.to_string()));
            match loaded {
                Ok(def) => {
                    self.adopt(def, true)?;
                    n += 1;
                }
                Err(e) => tracing::warn!("{}: skipped: {e}", p.display()),
            }
        }
        Ok(n)
    }

    fn save_def(&self, def: &DomainDef) -> Result<()> {
        virt_util::dirs::write_atomic(
            &self.def_path(&def.name),
            format_domain(def, None).as_bytes(),
        )
        .map_err(|e| Error::OperationFailed(e.to_string()))
    }

    pub fn list(&self, all: bool) -> Vec<DomainSummary> {
        let mut v: Vec<DomainSummary> = self
            .all()
            .iter()
            .map(|d| {
                let g = d.lock();
                DomainSummary {
                    id: g.id,
                    name: d.name.clone(),
                    state: g.state,
                }
            })
            .filter(|s| all || s.state.is_active())
            .collect();
        v.sort_by(|a, b| (a.id.is_none(), a.id, &a.name).cmp(&(b.id.is_none(), b.id, &b.name)));
        v
    }

    pub fn define(&self, xml: &str) -> Result<String> {
        let def = parse_domain(xml)?;
        self.driver(def.driver())?.check(&def)?;
        let mut all = self.all();
        let existing = Self::check_unique(&all, &def)?;
        if let Some(d) = &existing {
            let g = d.lock();
            if g.def.driver() != def.driver() && g.state.is_active() {
                return Err(Error::OperationInvalid(
                    "cannot change the driver of a running domain".into(),
                ));
            }
        }
        self.save_def(&def)?;
        match existing {
            Some(d) => {
                let mut g = d.lock();
                if !g.state.is_active() {
                    g.def = def.clone();
                }
                g.persistent = true;
            }
            None => all.push(Domain::new(def.clone(), true)),
        }
        drop(all);
        self.events
            .lifecycle(&def.name, LifecycleEvent::Defined, "Added");
        Ok(def.name)
    }

    pub fn undefine(&self, key: &str) -> Result<()> {
        let d = self.lookup(key)?;
        let mut g = d.lock();
        if !g.persistent {
            return Err(Error::OperationInvalid(format!(
                "cannot undefine transient domain '{}'",
                d.name
            )));
        }
        virt_util::dirs::remove_file(&self.def_path(&d.name))
            .map_err(|e| Error::OperationFailed(e.to_string()))?;
        g.persistent = false;
        let active = g.state.is_active();
        drop(g);
        if !active {
            self.forget(&d);
        }
        self.events
            .lifecycle(&d.name, LifecycleEvent::Undefined, "Removed");
        Ok(())
    }

    pub fn create(self: &Arc<Self>, xml: &str, paused: bool) -> Result<String> {
        let def = parse_domain(xml)?;
        self.driver(def.driver())?.check(&def)?;
        let dom = {
            let mut all = self.all();
            match Self::check_unique(&all, &def)? {
                Some(d) => {
                    let mut g = d.lock();
                    if g.state.is_active() {
                        return Err(Error::OperationInvalid(format!(
                            "domain '{}' is already active",
                            d.name
                        )));
                    }
                    g.def = def;
                    drop(g);
                    d
                }
                None => {
                    let d = Domain::new(def, false);
                    all.push(d.clone());
                    d
                }
            }
        };
        if let Err(e) = self.start_domain(&dom, paused) {
            if !dom.lock().persistent {
                self.forget(&dom);
            }
            return Err(e);
        }
        Ok(dom.name.clone())
    }

    pub fn start(self: &Arc<Self>, key: &str, paused: bool) -> Result<()> {
        let dom = self.lookup(key)?;
        self.start_domain(&dom, paused)
    }

    fn start_domain(self: &Arc<Self>, dom: &Arc<Domain>, paused: bool) -> Result<()> {
        if dom.lock().state.is_active() {
            return Err(Error::OperationInvalid("domain is already running".into()));
        }
        let mode = if paused {
            LaunchMode::Paused
        } else {
            LaunchMode::Run
        };
        vmm::launch(self, dom, mode)?;
        if paused {
            dom.set_state(DomainState::Paused, "user");
        } else {
            dom.set_state(DomainState::Running, "booted");
        }
        self.events
            .lifecycle(&dom.name, LifecycleEvent::Started, "Booted");
        Ok(())
    }

    fn wait_gone(&self, dom: &Domain) -> Result<()> {
        if dom.wait_until(STOP_TIMEOUT, |g| g.vmm.is_none()) {
            Ok(())
        } else {
            Err(Error::OperationFailed(format!(
                "the VMM of '{}' did not exit within {STOP_TIMEOUT:?}",
                dom.name
            )))
        }
    }

    /// `destroy`: SIGKILL the VMM.
    pub fn destroy(&self, key: &str) -> Result<()> {
        let dom = self.lookup(key)?;
        self.destroy_domain(&dom, "destroyed")
    }

    pub fn destroy_domain(&self, dom: &Domain, reason: &'static str) -> Result<()> {
        let vmm = dom.vmm()?;
        dom.lock().stop_reason = Some(reason);
        virt_util::process::signal(vmm.pid, libc::SIGKILL)
            .map_err(|e| Error::OperationFailed(e.to_string()))?;
        self.wait_gone(dom)
    }

    /// `shutdown`: the test guest has no ACPI, so the VMM is asked to exit (`quit`).
    pub fn shutdown(&self, key: &str) -> Result<()> {
        let dom = self.lookup(key)?;
        self.quit_domain(&dom, "shutdown")
    }

    pub fn quit_domain(&self, dom: &Domain, reason: &'static str) -> Result<()> {
        let vmm = dom.vmm()?;
        dom.lock().stop_reason = Some(reason);
        match vmm.qmp("quit", json!({})) {
            Ok(_) | Err(Error::Monitor(_)) => {}
            Err(e) => return Err(e),
        }
        self.wait_gone(dom)
    }

    pub fn suspend(&self, key: &str) -> Result<()> {
        let dom = self.lookup(key)?;
        let vmm = dom.vmm()?;
        let receiving_pages = {
            let g = dom.lock();
            g.postcopy_failed == Some(crate::domain::JobKind::MigrationIn)
                || g.job.as_ref().is_some_and(|j| {
                    j.kind == crate::domain::JobKind::MigrationIn && j.postcopy_switched
                })
        };
        if receiving_pages {
            // A vCPU waiting for a page cannot be stopped until the page arrives
            // (docs/postcopy.md, "Facts"): pausing here would stall this call, not the guest.
            return Err(Error::OperationInvalid(format!(
                "'{}' is receiving its memory in post-copy (or waits for the rest of it: \
                 post-copy failed); it can be suspended once the migration completed",
                dom.name
            )));
        }
        if let Some(j) = dom.lock().job.as_mut() {
            // The guest now travels paused: the destination will not run it by itself.
            j.user_suspended = true;
        }
        vmm::mark_decides(self, &dom, false);
        vmm.qmp("stop", json!({}))?;
        dom.wait_until(STOP_TIMEOUT, |g| g.state == DomainState::Paused);
        Ok(())
    }

    pub fn resume(&self, key: &str) -> Result<()> {
        let dom = self.lookup(key)?;
        if dom.lock().job.is_some() {
            return Err(Error::OperationInvalid(
                "a migration job is running; resume refused (domjobabort first)".into(),
            ));
        }
        {
            // The source of a post-copy migration that switched: its memory is stale and the
            // destination may run the guest (docs/management.md §5c).
            let g = dom.lock();
            let was_source = g
                .last_job
                .as_ref()
                .is_some_and(|j| j.operation.as_deref() == Some("Outgoing migration"));
            let failed_source = g.postcopy_failed == Some(crate::domain::JobKind::MigrationOut);
            if (was_source && g.reason.starts_with("post-copy")) || failed_source {
                return Err(Error::OperationInvalid(format!(
                    "'{}' is the source of a post-copy migration that switched: its memory is \
                     stale and the destination may run the guest, so it is never resumed \
                     (check the destination, then destroy it here)",
                    dom.name
                )));
            }
        }
        let vmm = dom.vmm()?;
        vmm.qmp("cont", json!({}))?;
        dom.wait_until(STOP_TIMEOUT, |g| g.state == DomainState::Running);
        Ok(())
    }

    pub fn info(&self, key: &str) -> Result<DomainInfo> {
        let dom = self.lookup(key)?;
        let g = dom.lock();
        let driver = self.driver(g.def.driver())?;
        Ok(DomainInfo {
            id: g.id,
            name: dom.name.clone(),
            uuid: dom.uuid.clone(),
            state: g.state,
            reason: g.reason.clone(),
            vcpus: g.def.vcpus,
            max_memory_kib: g.def.memory_kib,
            used_memory_kib: g.def.current_memory_kib,
            persistent: g.persistent,
            driver: g.def.driver().name().to_string(),
            emulator: driver.emulator(&g.def).display().to_string(),
            pid: g.vmm.as_ref().map(|v| v.pid),
        })
    }

    pub fn dumpxml(&self, key: &str, inactive: bool) -> Result<String> {
        let dom = self.lookup(key)?;
        let g = dom.lock();
        if inactive && g.persistent {
            if let Ok(x) = std::fs::read_to_string(self.def_path(&dom.name)) {
                return Ok(x);
            }
        }
        Ok(format_domain(&g.def, g.id))
    }

    /// `qemu-monitor-command`: a raw QMP command to the domain's VMM.
    pub fn monitor_command(&self, key: &str, command: &str) -> Result<String> {
        let dom = self.lookup(key)?;
        let vmm = dom.vmm()?;
        let v: serde_json::Value = serde_json::from_str(command)
            .map_err(|e| Error::InvalidArg(format!("the command is not JSON: {e}")))?;
        let name = v
            .get("execute")
            .and_then(|x| x.as_str())
            .ok_or_else(|| Error::InvalidArg("the command has no \"execute\"".into()))?;
        let args = v
            .get("arguments")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        let r = vmm.qmp(name, args)?;
        Ok(json!({ "return": r }).to_string())
    }
}
