//! The QMP dispatcher of a `tern run` process: QEMU's command names and semantics over the
//! machine (`tern-vmm`) and the migration engine (`tern-migration`).
//!
//! * [`runstate`]: QEMU's RunState as `query-status` reports it, and the STOP/RESUME events.
//! * [`vm_cmds`]: machine commands (`stop`, `cont`, `quit`, `pmemsave`, `x-tern-*`).
//! * [`dirty_rate_cmds`]: `calc-dirty-rate`, `query-dirty-rate` (the measurement: [`crate::dirty_rate`]).
//! * [`predict_cmds`]: `x-tern-predict-migration` (issue 13's prediction before migrating).
//! * [`schema`]: the QAPI types of the commands' arguments and replies, and the events.
//!
//! [`COMMANDS`] is the one table of commands: the QMP server lists it (`query-commands`,
//! `query-qmp-schema`), checks arguments against it, and dispatch runs its handlers.

mod dirty_rate_cmds;
mod migration_address;
mod migration_cmds;
pub mod objects;
mod predict_cmds;
mod runstate;
mod schema;
mod vm_cmds;

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, Weak};

use serde_json::{Map, Value};
use tern_qmp::schema::{Command, Event, Member, Object, Type, EMPTY};
use tern_qmp::{ClientCtx, Dispatcher, EventSink, QmpError};
use tern_statedev::StateDevice;
use tern_vmm::Vm;

pub use runstate::RunState;

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
    /// `object-add` objects (TLS credentials, authorizations).
    pub(crate) objects: Mutex<objects::Objects>,
    /// `calc-dirty-rate`'s measurement (at most one at a time).
    pub(crate) dirty_rate: Arc<crate::dirty_rate::DirtyRate>,
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
            objects: Mutex::new(objects::Objects::default()),
            dirty_rate: Arc::default(),
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

/// Runs one command (arguments already checked against the entry's schema).
type Handler = fn(&Controller, &ClientCtx, Map<String, Value>) -> Result<Value, QmpError>;

/// A command: its schema and its handler.
struct Entry {
    spec: Command,
    run: Handler,
}

const fn entry(name: &'static str, args: &'static [Member], ret: Type, run: Handler) -> Entry {
    Entry {
        spec: Command {
            name,
            args,
            boxed: None,
            ret,
        },
        run,
    }
}

/// A command whose arguments are one type (QAPI `boxed`, e.g. a union).
const fn boxed_entry(name: &'static str, args: &'static Object, ret: Type, run: Handler) -> Entry {
    Entry {
        spec: Command {
            name,
            args: &[],
            boxed: Some(args),
            ret,
        },
        run,
    }
}

/// Every command this dispatcher answers (the QMP server adds `qmp_capabilities`,
/// `query-commands` and `query-qmp-schema`). A new argument is one line in its `schema` table.
static COMMANDS: [Entry; 33] = [
    entry("query-version", &[], schema::VERSION, |_, _, a| {
        vm_cmds::query_version(a)
    }),
    entry("query-status", &[], schema::STATUS, |c, _, a| {
        c.query_status(a)
    }),
    entry("query-name", &[], schema::NAME, |_, _, a| {
        vm_cmds::query_name(a)
    }),
    entry("query-uuid", &[], schema::UUID, |c, _, a| c.query_uuid(a)),
    entry("stop", &[], EMPTY, |c, _, a| c.stop(a)),
    entry("cont", &[], EMPTY, |c, _, a| c.cont(a)),
    entry("quit", &[], EMPTY, |c, ctx, a| c.quit(ctx, a)),
    entry("system_reset", &[], EMPTY, |c, _, a| c.system_reset(a)),
    entry("system_powerdown", &[], EMPTY, |c, _, a| {
        c.system_powerdown(a)
    }),
    entry("pmemsave", &schema::PMEMSAVE_ARGS, EMPTY, |c, _, a| {
        c.pmemsave(a)
    }),
    entry(
        "x-tern-heartbeats",
        &schema::SINCE_ARGS,
        schema::HEARTBEATS,
        |c, _, a| c.heartbeats(a),
    ),
    entry(
        "x-tern-wait-heartbeat",
        &schema::WAIT_HEARTBEAT_ARGS,
        schema::WAIT_HEARTBEAT,
        |c, _, a| c.wait_heartbeat(a),
    ),
    entry("x-tern-guest-stats", &[], schema::GUEST_STATS, |c, _, a| {
        c.guest_stats(a)
    }),
    entry(
        "x-tern-serial",
        &schema::SERIAL_ARGS,
        schema::SERIAL,
        |c, _, a| c.serial(a),
    ),
    entry(
        "x-tern-dirty-log",
        &schema::DIRTY_LOG_ARGS,
        EMPTY,
        |c, _, a| c.dirty_log(a),
    ),
    entry("x-tern-statedev", &[], schema::STATEDEVS, |c, _, a| {
        c.statedev(a)
    }),
    entry("migrate", &schema::MIGRATE_ARGS, EMPTY, |c, _, a| {
        c.migrate(a)
    }),
    entry(
        "migrate-incoming",
        &schema::INCOMING_ARGS,
        EMPTY,
        |c, _, a| c.migrate_incoming(a),
    ),
    entry("query-migrate", &[], schema::MIGRATION, |c, _, a| {
        c.query_migrate(a)
    }),
    entry("migrate_cancel", &[], EMPTY, |c, _, a| c.migrate_cancel(a)),
    entry("migrate-start-postcopy", &[], EMPTY, |c, _, a| {
        c.migrate_start_postcopy(a)
    }),
    entry("migrate-pause", &[], EMPTY, |c, _, a| c.migrate_pause(a)),
    entry(
        "migrate-recover",
        &schema::RECOVER_ARGS,
        EMPTY,
        |c, _, a| c.migrate_recover(a),
    ),
    entry(
        "migrate-continue",
        &schema::CONTINUE_ARGS,
        EMPTY,
        |c, _, a| c.migrate_continue(a),
    ),
    entry(
        "migrate-set-capabilities",
        &schema::SET_CAPABILITIES_ARGS,
        EMPTY,
        |c, _, a| c.migrate_set_capabilities(a),
    ),
    entry(
        "migrate-set-parameters",
        &schema::SET_PARAMETERS_ARGS,
        EMPTY,
        |c, _, a| c.migrate_set_parameters(a),
    ),
    entry(
        "query-migrate-capabilities",
        &[],
        schema::CAPABILITIES,
        |c, _, a| c.query_migrate_capabilities(a),
    ),
    boxed_entry("object-add", &schema::OBJECT_OPTIONS, EMPTY, |c, _, a| {
        c.object_add(a)
    }),
    entry("object-del", &schema::OBJECT_DEL_ARGS, EMPTY, |c, _, a| {
        c.object_del(a)
    }),
    entry(
        "query-migrate-parameters",
        &[],
        schema::PARAMETERS_INFO,
        |c, _, a| c.query_migrate_parameters(a),
    ),
    entry(
        "calc-dirty-rate",
        &schema::CALC_DIRTY_RATE_ARGS,
        EMPTY,
        |c, _, a| c.calc_dirty_rate(a),
    ),
    entry(
        "query-dirty-rate",
        &schema::QUERY_DIRTY_RATE_ARGS,
        schema::DIRTY_RATE,
        |c, _, a| c.query_dirty_rate(a),
    ),
    entry(
        "x-tern-predict-migration",
        &schema::PREDICT_ARGS,
        schema::PREDICTION,
        |c, _, a| c.predict_migration(a),
    ),
];

impl Controller {
    fn objs(&self) -> std::sync::MutexGuard<'_, objects::Objects> {
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `object-add` (and `tern run --object`, whose arguments are checked here as QMP checks
    /// a command's): the object is built (its files read) and kept.
    pub fn object_add(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let entry = COMMANDS
            .iter()
            .find(|e| e.spec.name == "object-add")
            .ok_or_else(|| QmpError::generic("object-add is not in the command table"))?;
        tern_qmp::schema::check_command_args(&entry.spec, &args)?;
        self.objs().add(&args)?;
        Ok(Value::Object(Map::new()))
    }

    /// `object-del`: refused while a migration in progress uses the object.
    fn object_del(&self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let id = args.get("id").and_then(Value::as_str).unwrap_or_default();
        let in_use = self.tls_objects_in_use().iter().any(|o| o == id);
        self.objs().del(id, in_use)?;
        Ok(Value::Object(Map::new()))
    }
}

/// QMP dispatch over an `Arc<Controller>`.
pub struct QmpDispatch(pub Arc<Controller>);

impl Dispatcher for QmpDispatch {
    fn commands(&self) -> Vec<&'static Command> {
        COMMANDS.iter().map(|e| &e.spec).collect()
    }

    fn events(&self) -> Vec<&'static Event> {
        schema::EVENTS.iter().collect()
    }

    fn dispatch(
        &self,
        ctx: &ClientCtx,
        command: &str,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        match COMMANDS.iter().find(|e| e.spec.name == command) {
            Some(e) => (e.run)(&self.0, ctx, args),
            None => Err(QmpError::command_not_found(format!(
                "The command {command} has not been found"
            ))),
        }
    }
}
