//! The QMP dispatcher of a `tern run` process: QEMU's command names and semantics over the
//! machine (`tern-vmm`) and the migration engine (`tern-migration`).
//!
//! * [`runstate`]: QEMU's RunState as `query-status` reports it, and the STOP/RESUME events.
//! * [`vm_cmds`]: machine commands (`stop`, `cont`, `quit`, `pmemsave`, `x-tern-*`).

mod migration_cmds;
mod runstate;
mod vm_cmds;

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, Weak};

use serde_json::{Map, Value};
use tern_qmp::{ClientCtx, Dispatcher, EventSink, QmpError};
use tern_statedev::StateDevice;
use tern_vmm::Vm;

pub use runstate::RunState;

/// Every command this dispatcher answers (the QMP server adds `qmp_capabilities` and
/// `query-commands`).
const COMMANDS: &[&str] = &[
    "query-version",
    "query-status",
    "query-name",
    "query-uuid",
    "stop",
    "cont",
    "quit",
    "pmemsave",
    "x-tern-heartbeats",
    "x-tern-wait-heartbeat",
    "x-tern-guest-stats",
    "x-tern-serial",
    "x-tern-dirty-log",
    "x-tern-statedev",
    "migrate",
    "migrate-incoming",
    "query-migrate",
    "migrate_cancel",
    "migrate-continue",
    "migrate-set-capabilities",
    "migrate-set-parameters",
    "query-migrate-capabilities",
    "query-migrate-parameters",
];

/// Why the main thread of `tern run` should end the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitRequest {
    /// QMP `quit`: exit 0.
    Quit,
    /// The incoming migration failed and `exit-on-error` is on (QEMU's default): exit non-zero
    /// with this error on stderr.
    IncomingFailed(String),
}

/// Shared state of one `tern run` process, as seen by QMP.
pub struct Controller {
    pub(crate) vm: Arc<Vm>,
    /// Extra devices (`--device`), paused and resumed with the vCPUs.
    pub(crate) devices: Vec<StateDevice>,
    pub(crate) events: EventSink,
    pub(crate) run_state: Mutex<RunState>,
    /// Whether the vCPUs start when an incoming migration completes (QEMU's `autostart`:
    /// cleared by `-S` or `stop` during `inmigrate`, set by `cont`).
    pub(crate) autostart: Mutex<bool>,
    /// The vCPUs are stopped because an outgoing migration stopped a running guest (not the
    /// user): cleared when anything resumes them. A guest stopped this way whose migration
    /// stayed undecided travels to the next destination as running.
    pub(crate) stopped_by_migration: AtomicBool,
    quit_tx: Mutex<Sender<ExitRequest>>,
    pub(crate) migration: Mutex<migration_cmds::MigrationCtl>,
    me: Weak<Controller>,
}

impl Controller {
    /// A controller for `vm`, in `state`. `quit_tx` wakes the main thread for an orderly exit
    /// (and says why).
    pub fn new(
        vm: Arc<Vm>,
        devices: Vec<StateDevice>,
        events: EventSink,
        state: RunState,
        autostart: bool,
        quit_tx: Sender<ExitRequest>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            vm,
            devices,
            events,
            run_state: Mutex::new(state),
            autostart: Mutex::new(autostart),
            stopped_by_migration: AtomicBool::new(false),
            quit_tx: Mutex::new(quit_tx),
            migration: Mutex::new(migration_cmds::MigrationCtl::default()),
            me: me.clone(),
        })
    }

    /// The run control of the whole machine: vCPUs and devices together.
    pub fn machine(&self) -> crate::migrate::machine::VmVcpus {
        crate::migrate::machine::VmVcpus::new(self.vm.clone(), self.devices.clone())
    }

    /// A weak handle on this controller (for callbacks from migration threads).
    pub(crate) fn weak(&self) -> Weak<Controller> {
        self.me.clone()
    }

    /// Asks the main thread to end the process (best effort: it may already be exiting).
    pub(crate) fn request_exit(&self, why: ExitRequest) {
        if let Ok(tx) = self.quit_tx.lock() {
            let _ = tx.send(why);
        }
    }
}

/// QMP dispatch over an `Arc<Controller>`.
pub struct QmpDispatch(pub Arc<Controller>);

impl Dispatcher for QmpDispatch {
    fn commands(&self) -> Vec<&'static str> {
        COMMANDS.to_vec()
    }

    fn dispatch(
        &self,
        ctx: &ClientCtx,
        command: &str,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let c = &self.0;
        match command {
            "query-version" => vm_cmds::query_version(args),
            "query-status" => c.query_status(args),
            "query-name" => vm_cmds::query_name(args),
            "query-uuid" => c.query_uuid(args),
            "stop" => c.stop(args),
            "cont" => c.cont(args),
            "quit" => c.quit(ctx, args),
            "pmemsave" => c.pmemsave(args),
            "x-tern-heartbeats" => c.heartbeats(args),
            "x-tern-wait-heartbeat" => c.wait_heartbeat(args),
            "x-tern-guest-stats" => c.guest_stats(args),
            "x-tern-serial" => c.serial(args),
            "x-tern-dirty-log" => c.dirty_log(args),
            "x-tern-statedev" => c.statedev(args),
            "migrate" => c.migrate(args),
            "migrate-incoming" => c.migrate_incoming(args),
            "query-migrate" => c.query_migrate(args),
            "migrate_cancel" => c.migrate_cancel(args),
            "migrate-continue" => c.migrate_continue(args),
            "migrate-set-capabilities" => c.migrate_set_capabilities(args),
            "migrate-set-parameters" => c.migrate_set_parameters(args),
            "query-migrate-capabilities" => c.query_migrate_capabilities(args),
            "query-migrate-parameters" => c.query_migrate_parameters(args),
            other => Err(QmpError::command_not_found(format!(
                "The command {other} has not been found"
            ))),
        }
    }
}
