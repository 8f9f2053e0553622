//! The QAPI types of Tern's commands and events (QEMU's names and shapes where QEMU has the
//! command; `x-tern-*` for Tern's own). The command table in `super` refers to these; the QMP
//! server checks arguments against them and generates `query-qmp-schema` from them.
//!
//! Enums that mirror a Rust enum take their values from it (migration statuses, capabilities),
//! and the migration parameters come from `tern_migration::params::PARAMETERS`, so none of them
//! can drift from what the engine accepts.

use tern_migration::convergence::postcopy_auto::AutoRule;
use tern_migration::convergence::RuleName;
use tern_migration::params::{Capability, ParamType, PARAMETERS};
use tern_migration::status::MigrationStatus;
use tern_qmp::schema::{
    Alternate, Enum, Event, IntKind, Member, Object, Type, Values, Variants, STR_OR_NULL,
};

const INT: Type = Type::Int(IntKind::Int64);
const U8: Type = Type::Int(IntKind::Uint8);
const U32: Type = Type::Int(IntKind::Uint32);
const U64: Type = Type::Int(IntKind::Uint64);

const fn object(name: &'static str, members: &'static [Member]) -> Object {
    Object {
        name,
        members,
        variants: None,
    }
}

// ---- machine ----

static RUN_STATE: Enum = Enum {
    name: "RunState",
    values: Values::List(&[
        "debug",
        "inmigrate",
        "internal-error",
        "io-error",
        "paused",
        "postmigrate",
        "prelaunch",
        "finish-migrate",
        "restore-vm",
        "running",
        "save-vm",
        "shutdown",
        "suspended",
        "watchdog",
        "guest-panicked",
        "colo",
    ]),
};

static STATUS_INFO: Object = object(
    "StatusInfo",
    &[
        Member::req("running", Type::Bool),
        Member::req("status", Type::Enum(&RUN_STATE)),
    ],
);
/// `query-status`.
pub(super) const STATUS: Type = Type::Object(&STATUS_INFO);

static VERSION_TRIPLE: Object = object(
    "VersionTriple",
    &[
        Member::req("major", INT),
        Member::req("minor", INT),
        Member::req("micro", INT),
    ],
);
static VERSION_INFO: Object = object(
    "VersionInfo",
    &[
        Member::req("qemu", Type::Object(&VERSION_TRIPLE)),
        Member::req("package", Type::Str),
    ],
);
/// `query-version`.
pub(super) const VERSION: Type = Type::Object(&VERSION_INFO);

static NAME_INFO: Object = object("NameInfo", &[Member::opt("name", Type::Str)]);
/// `query-name`.
pub(super) const NAME: Type = Type::Object(&NAME_INFO);

static UUID_INFO: Object = object("UuidInfo", &[Member::req("UUID", Type::Str)]);
/// `query-uuid`.
pub(super) const UUID: Type = Type::Object(&UUID_INFO);

/// `pmemsave`.
pub(super) static PMEMSAVE_ARGS: [Member; 3] = [
    Member::req("val", U64),
    Member::req("size", U64),
    Member::req("filename", Type::Str),
];

// ---- x-tern-* observability ----

static HEARTBEAT_RECORD: Type = Type::Array(&U64);
static HEARTBEATS_INFO: Object = object(
    "x-tern-HeartbeatsInfo",
    &[
        Member::req("count", U64),
        Member::req("last-seq", U64),
        Member::req("last-ns", U64),
        Member::req("max-gap-ns", U64),
        Member::req("max-gap-end-seq", U64),
        Member::req("records", Type::Array(&HEARTBEAT_RECORD)),
    ],
);
/// `x-tern-heartbeats`.
pub(super) const HEARTBEATS: Type = Type::Object(&HEARTBEATS_INFO);
/// `x-tern-heartbeats` arguments.
pub(super) static SINCE_ARGS: [Member; 1] = [Member::opt("since", U64)];

static HEARTBEAT: Object = object(
    "x-tern-Heartbeat",
    &[Member::req("seq", U64), Member::req("ns", U64)],
);
/// `x-tern-wait-heartbeat`.
pub(super) const WAIT_HEARTBEAT: Type = Type::Object(&HEARTBEAT);
/// `x-tern-wait-heartbeat` arguments.
pub(super) static WAIT_HEARTBEAT_ARGS: [Member; 2] =
    [Member::req("after", U64), Member::opt("timeout-ms", U64)];

static VCPU_STATS: Object = object(
    "x-tern-VcpuStats",
    &[
        Member::req("vcpu", U32),
        Member::req("state", Type::Str),
        Member::opt("workload", Type::Str),
        Member::opt("work-base", U64),
        Member::opt("work-len", U64),
        Member::opt("pages-written", U64),
        Member::opt("passes", U64),
        Member::opt("heartbeat-seq", U64),
        Member::opt("loops", U64),
        Member::opt("error", Type::Str),
    ],
);
static GUEST_STATS_INFO: Object = object(
    "x-tern-GuestStats",
    &[Member::req(
        "vcpus",
        Type::Array(&Type::Object(&VCPU_STATS)),
    )],
);
/// `x-tern-guest-stats`.
pub(super) const GUEST_STATS: Type = Type::Object(&GUEST_STATS_INFO);

static SERIAL_LINE: Object = object(
    "x-tern-SerialLine",
    &[
        Member::req("index", U64),
        Member::req("ns", U64),
        Member::req("text", Type::Str),
    ],
);
static SERIAL_INFO: Object = object(
    "x-tern-SerialLines",
    &[Member::req(
        "lines",
        Type::Array(&Type::Object(&SERIAL_LINE)),
    )],
);
/// `x-tern-serial`.
pub(super) const SERIAL: Type = Type::Object(&SERIAL_INFO);
/// `x-tern-serial` arguments.
pub(super) static SERIAL_ARGS: [Member; 1] = [Member::opt("from", U64)];

/// `x-tern-dirty-log` arguments.
pub(super) static DIRTY_LOG_ARGS: [Member; 1] = [Member::req("enable", Type::Bool)];

// ---- dirty page rate (QEMU's `calc-dirty-rate` / `query-dirty-rate`) ----

static TIME_UNIT: Enum = Enum {
    name: "TimeUnit",
    values: Values::List(&["second", "millisecond"]),
};
static DIRTY_RATE_MEASURE_MODE: Enum = Enum {
    name: "DirtyRateMeasureMode",
    values: Values::List(&["page-sampling", "dirty-ring", "dirty-bitmap"]),
};
static DIRTY_RATE_STATUS: Enum = Enum {
    name: "DirtyRateStatus",
    values: Values::List(&["unstarted", "measuring", "measured"]),
};
static DIRTY_RATE_VCPU: Object = object(
    "DirtyRateVcpu",
    &[Member::req("id", INT), Member::req("dirty-rate", INT)],
);
static DIRTY_RATE_INFO: Object = object(
    "DirtyRateInfo",
    &[
        Member::opt("dirty-rate", INT),
        Member::req("status", Type::Enum(&DIRTY_RATE_STATUS)),
        Member::req("start-time", INT),
        Member::req("calc-time", INT),
        Member::req("calc-time-unit", Type::Enum(&TIME_UNIT)),
        Member::req("sample-pages", U64),
        Member::req("mode", Type::Enum(&DIRTY_RATE_MEASURE_MODE)),
        Member::opt(
            "vcpu-dirty-rate",
            Type::Array(&Type::Object(&DIRTY_RATE_VCPU)),
        ),
    ],
);
/// `query-dirty-rate`.
pub(super) const DIRTY_RATE: Type = Type::Object(&DIRTY_RATE_INFO);
/// `calc-dirty-rate` arguments.
pub(super) static CALC_DIRTY_RATE_ARGS: [Member; 4] = [
    Member::req("calc-time", INT),
    Member::opt("calc-time-unit", Type::Enum(&TIME_UNIT)),
    Member::opt("sample-pages", INT),
    Member::opt("mode", Type::Enum(&DIRTY_RATE_MEASURE_MODE)),
];
/// `x-tern-predict-migration` arguments.
pub(super) static PREDICT_ARGS: [Member; 4] = [
    Member::req("bandwidth", U64),
    Member::opt("dirty-rate", U64),
    Member::opt("downtime-limit", U64),
    Member::opt("max-bandwidth", U64),
];
static PREDICTION_INFO: Object = object(
    "x-tern-MigrationPrediction",
    &[
        Member::req("converges", Type::Bool),
        Member::req("passes", U32),
        Member::req("extra-passes", U32),
        Member::req("transferred-bytes", U64),
        Member::req("first-pass-bytes", U64),
        Member::req("dirty-rate", U64),
        Member::req("precopy-bandwidth", U64),
        Member::req("downtime-limit", U64),
        Member::req("reason", Type::Str),
        Member::opt("expected-total-time-ms", U64),
        Member::opt("expected-downtime-ms", U64),
    ],
);
/// `x-tern-predict-migration`.
pub(super) const PREDICTION: Type = Type::Object(&PREDICTION_INFO);
/// `query-dirty-rate` arguments.
pub(super) static QUERY_DIRTY_RATE_ARGS: [Member; 1] =
    [Member::opt("calc-time-unit", Type::Enum(&TIME_UNIT))];

static INT_OR_NULL: Alternate = Alternate {
    name: "x-tern-IntOrNull",
    members: &[U64, Type::Null],
};
static STATEDEV_INFO: Object = object(
    "x-tern-StateDevice",
    &[
        Member::req("size", U64),
        Member::req("digest", Type::Alternate(&INT_OR_NULL)),
        Member::req("has-state", Type::Bool),
        Member::req("mutations", U64),
        Member::req("initial-bytes-sent", U64),
        Member::req("init-done-sent", Type::Bool),
        Member::req("switch-digest", Type::Alternate(&INT_OR_NULL)),
        Member::req("prep-started", Type::Bool),
        Member::req("prep-finished", Type::Bool),
        Member::req("stats", Type::Str),
    ],
);
static STATEDEVS_INFO: Object = object(
    "x-tern-StateDevices",
    &[Member::req(
        "devices",
        Type::Array(&Type::Object(&STATEDEV_INFO)),
    )],
);
/// `x-tern-statedev`.
pub(super) const STATEDEVS: Type = Type::Object(&STATEDEVS_INFO);

// ---- migration ----

static MIGRATION_STATUS: Enum = Enum {
    name: "MigrationStatus",
    values: Values::From(|| MigrationStatus::ALL.iter().map(|s| s.as_str()).collect()),
};

static MIGRATION_CAPABILITY: Enum = Enum {
    name: "MigrationCapability",
    values: Values::From(|| Capability::ALL.iter().map(|c| c.name()).collect()),
};

static CAPABILITY_STATUS: Object = object(
    "MigrationCapabilityStatus",
    &[
        Member::req("capability", Type::Enum(&MIGRATION_CAPABILITY)),
        Member::req("state", Type::Bool),
    ],
);
/// `query-migrate-capabilities`.
pub(super) const CAPABILITIES: Type = Type::Array(&Type::Object(&CAPABILITY_STATUS));
/// `migrate-set-capabilities` arguments.
pub(super) static SET_CAPABILITIES_ARGS: [Member; 1] = [Member::req(
    "capabilities",
    Type::Array(&Type::Object(&CAPABILITY_STATUS)),
)];

/// `migrate-continue` arguments.
/// `migrate-recover` (QEMU: `uri` only).
pub(super) static RECOVER_ARGS: [Member; 1] = [Member::req("uri", Type::Str)];

pub(super) static CONTINUE_ARGS: [Member; 1] =
    [Member::req("state", Type::Enum(&MIGRATION_STATUS))];

const MULTIFD_COMPRESSION: Enum = Enum {
    name: "MultiFDCompression",
    values: Values::List(&["none", "zlib", "zstd", "qpl", "uadk", "qatzip"]),
};
const MIG_MODE: Enum = Enum {
    name: "MigMode",
    values: Values::List(&["normal", "cpr-reboot", "cpr-transfer"]),
};
const ZERO_PAGE_DETECTION: Enum = Enum {
    name: "ZeroPageDetection",
    values: Values::List(&["none", "legacy", "multifd"]),
};

/// The QAPI type of a parameter: in `migrate-set-parameters` (`set`) or in
/// `query-migrate-parameters`.
const fn param_type(t: ParamType, set: bool) -> Type {
    match t {
        ParamType::Bool => Type::Bool,
        ParamType::U8 => U8,
        ParamType::U32 => U32,
        ParamType::U64 => U64,
        ParamType::StrOrNull if set => Type::Alternate(&STR_OR_NULL),
        ParamType::StrOrNull => Type::Str,
        ParamType::MultifdCompression => Type::Enum(&MULTIFD_COMPRESSION),
        ParamType::MigMode => Type::Enum(&MIG_MODE),
        ParamType::ZeroPageDetection => Type::Enum(&ZERO_PAGE_DETECTION),
    }
}

const N_PARAMS: usize = PARAMETERS.len();

/// One optional member per row of `PARAMETERS`.
const fn param_members(set: bool) -> [Member; N_PARAMS] {
    let mut out = [Member::opt("", Type::Any); N_PARAMS];
    let mut i = 0;
    while i < N_PARAMS {
        let (name, ty) = PARAMETERS[i];
        out[i] = Member::opt(name, param_type(ty, set));
        i += 1;
    }
    out
}

/// `migrate-set-parameters` arguments (QEMU's `MigrateSetParameters`).
pub(super) static SET_PARAMETERS_ARGS: [Member; N_PARAMS] = param_members(true);
static QUERY_PARAMETERS_MEMBERS: [Member; N_PARAMS] = param_members(false);
static MIGRATION_PARAMETERS: Object = object("MigrationParameters", &QUERY_PARAMETERS_MEMBERS);
/// `query-migrate-parameters`.
pub(super) const PARAMETERS_INFO: Type = Type::Object(&MIGRATION_PARAMETERS);

// Addresses: `channels` of `migrate` / `migrate-incoming` (what Tern can connect to or listen
// on) and `socket-address` of `query-migrate` (with QEMU's `ipv4` / `ipv6` flags).

static CHANNEL_TYPE: Enum = Enum {
    name: "MigrationChannelType",
    values: Values::List(&["main"]),
};
static ADDRESS_TYPE: Enum = Enum {
    name: "MigrationAddressType",
    values: Values::List(&["socket", "file"]),
};
static SOCKET_TYPE: Enum = Enum {
    name: "SocketAddressType",
    values: Values::List(&["inet", "unix"]),
};
static INET_ADDRESS: Object = object(
    "InetSocketAddress",
    &[
        Member::req("host", Type::Str),
        Member::req("port", Type::Str),
    ],
);
static UNIX_ADDRESS: Object = object("UnixSocketAddress", &[Member::req("path", Type::Str)]);
static SOCKET_ADDRESS: Object = Object {
    name: "SocketAddress",
    members: &[Member::req("type", Type::Enum(&SOCKET_TYPE))],
    variants: Some(Variants {
        tag: "type",
        cases: &[("inet", &INET_ADDRESS), ("unix", &UNIX_ADDRESS)],
    }),
};
static FILE_ADDRESS: Object = object(
    "FileMigrationArgs",
    &[
        Member::req("filename", Type::Str),
        Member::req("offset", U64),
    ],
);
static MIGRATION_ADDRESS: Object = Object {
    name: "MigrationAddress",
    members: &[Member::req("transport", Type::Enum(&ADDRESS_TYPE))],
    variants: Some(Variants {
        tag: "transport",
        cases: &[("socket", &SOCKET_ADDRESS), ("file", &FILE_ADDRESS)],
    }),
};
static MIGRATION_CHANNEL: Object = object(
    "MigrationChannel",
    &[
        Member::req("channel-type", Type::Enum(&CHANNEL_TYPE)),
        Member::req("addr", Type::Object(&MIGRATION_ADDRESS)),
    ],
);
const CHANNELS: Type = Type::Array(&Type::Object(&MIGRATION_CHANNEL));

/// `migrate` arguments.
pub(super) static MIGRATE_ARGS: [Member; 4] = [
    Member::opt("uri", Type::Str),
    Member::opt("channels", CHANNELS),
    Member::opt("detach", Type::Bool),
    Member::opt("resume", Type::Bool),
];

/// `migrate-incoming` arguments.
pub(super) static INCOMING_ARGS: [Member; 3] = [
    Member::opt("uri", Type::Str),
    Member::opt("channels", CHANNELS),
    Member::opt("exit-on-error", Type::Bool),
];

static LISTEN_INET: Object = object(
    "x-tern-InetListenAddress",
    &[
        Member::req("host", Type::Str),
        Member::req("port", Type::Str),
        Member::opt("ipv4", Type::Bool),
        Member::opt("ipv6", Type::Bool),
    ],
);
static LISTEN_ADDRESS: Object = Object {
    name: "x-tern-ListenAddress",
    members: &[Member::req("type", Type::Enum(&SOCKET_TYPE))],
    variants: Some(Variants {
        tag: "type",
        cases: &[("inet", &LISTEN_INET), ("unix", &UNIX_ADDRESS)],
    }),
};

static RAM_STATS: Object = object(
    "MigrationStats",
    &[
        Member::req("transferred", U64),
        Member::req("remaining", U64),
        Member::req("total", U64),
        Member::req("duplicate", U64),
        Member::req("normal", U64),
        Member::req("normal-bytes", U64),
        Member::req("dirty-pages-rate", U64),
        Member::req("mbps", Type::Number),
        Member::req("dirty-sync-count", U64),
        Member::req("postcopy-requests", U64),
        Member::req("page-size", U64),
        Member::req("multifd-bytes", U64),
        Member::req("pages-per-second", U64),
        Member::req("precopy-bytes", U64),
        Member::req("downtime-bytes", U64),
        Member::req("postcopy-bytes", U64),
        Member::req("dirty-sync-missed-zero-copy", U64),
    ],
);
static SWITCHOVER_ACK: Object = object(
    "x-tern-SwitchoverAck",
    &[
        Member::req("acked", Type::Bool),
        Member::req("waited-ms", U64),
    ],
);
static DOWNTIME_BREAKDOWN: Object = object(
    "x-tern-DowntimeBreakdown",
    &[
        Member::req("pause-us", U64),
        Member::req("pre-switchover-us", U64),
        Member::req("final-ram-us", U64),
        Member::req("final-ram-bytes", U64),
        Member::req("device-state-us", U64),
        Member::req("end-flush-us", U64),
        Member::req("digest-wait-us", U64),
        Member::req("destination-us", U64),
    ],
);
static POSTCOPY_SWITCH: Object = object(
    "x-tern-PostcopySwitch",
    &[
        Member::req("wait-discard-us", U64),
        Member::req("discard-us", U64),
        Member::req("discard-pages", U64),
        Member::req("listen-us", U64),
        Member::req("package-us", U64),
        Member::req("restore-us", U64),
        Member::req("total-us", U64),
        Member::req("early-discard-pages", U64),
        Member::req("early-discard-us", U64),
    ],
);
static RAM_DIGEST: Object = object(
    "x-tern-RamDigest",
    &[
        Member::req("chunks", U64),
        Member::req("chunk-bytes", U64),
        Member::req("hash-us", U64),
        Member::req("verify-us", U64),
        Member::req("verified", Type::Bool),
    ],
);
static POSTCOPY_RECOVERY_ONE: Object = object(
    "x-tern-PostcopyRecoveryOne",
    &[
        Member::req("total-us", U64),
        Member::req("connect-us", U64),
        Member::req("bitmaps-us", U64),
        Member::req("missing-pages", U64),
        Member::req("resent-pages", U64),
    ],
);
static POSTCOPY_RECOVERY: Object = object(
    "x-tern-PostcopyRecovery",
    &[
        Member::req("recoveries", U64),
        Member::req("failed-attempts", U64),
        Member::req("total-us", U64),
        Member::req("resent-pages", U64),
        Member::req("list", Type::Array(&Type::Object(&POSTCOPY_RECOVERY_ONE))),
    ],
);
static RELEASE_RAM: Object = object(
    "x-tern-ReleaseRam",
    &[
        Member::req("released-pages", U64),
        Member::opt("error", Type::Str),
    ],
);
static SWITCHOVER_RULE: Enum = Enum {
    name: "x-tern-SwitchoverRule",
    values: Values::From(|| RuleName::ALL.iter().map(|r| r.as_str()).collect()),
};
static SWITCHOVER_DECISION: Object = object(
    "x-tern-SwitchoverDecision",
    &[
        Member::req("rule", Type::Enum(&SWITCHOVER_RULE)),
        Member::req("switch", Type::Bool),
        Member::req("reason", Type::Str),
        Member::opt("passes-since-qemu-would-switch", U64),
        Member::opt("expected-downtime-ms", U64),
    ],
);
static POSTCOPY_AUTO_RULE: Enum = Enum {
    name: "x-tern-PostcopyAutoRule",
    values: Values::From(|| AutoRule::ALL.iter().map(|r| r.as_str()).collect()),
};
static POSTCOPY_AUTO: Object = object(
    "x-tern-PostcopyAuto",
    &[
        Member::req("rule", Type::Enum(&POSTCOPY_AUTO_RULE)),
        Member::req("switch", Type::Bool),
        Member::req("reason", Type::Str),
        Member::opt("predicted-passes", U64),
        Member::opt("predicted-time-ms", U64),
    ],
);
static POSTCOPY_LATENCY: Object = object(
    "x-tern-PostcopyLatency",
    &[
        Member::req("pages", U64),
        Member::req("median-us", U64),
        Member::req("p99-us", U64),
        Member::req("max-us", U64),
    ],
);
static GUEST_STALL_PHASE: Enum = Enum {
    name: "x-tern-GuestStallPhase",
    values: Values::List(&["pre-copy", "switchover"]),
};
static GUEST_STALL_DETAIL: Object = object(
    "x-tern-GuestStallDetail",
    &[
        Member::req("at-ms", U64),
        Member::req("phase", Type::Enum(&GUEST_STALL_PHASE)),
        Member::req("vcpu-stall-us", U64),
    ],
);
static MIGRATION_INFO: Object = object(
    "MigrationInfo",
    &[
        Member::opt("status", Type::Enum(&MIGRATION_STATUS)),
        Member::opt("ram", Type::Object(&RAM_STATS)),
        Member::opt("total-time", U64),
        Member::opt("expected-downtime", U64),
        Member::opt("downtime", U64),
        Member::opt("setup-time", U64),
        Member::opt("cpu-throttle-percentage", U64),
        Member::opt("error-desc", Type::Str),
        Member::opt(
            "socket-address",
            Type::Array(&Type::Object(&LISTEN_ADDRESS)),
        ),
        Member::opt("x-tern-switchover-ack", Type::Object(&SWITCHOVER_ACK)),
        Member::opt(
            "x-tern-switchover-decision",
            Type::Object(&SWITCHOVER_DECISION),
        ),
        Member::opt(
            "x-tern-downtime-breakdown",
            Type::Object(&DOWNTIME_BREAKDOWN),
        ),
        Member::opt("x-tern-max-guest-stall", U64),
        Member::opt(
            "x-tern-max-guest-stall-detail",
            Type::Object(&GUEST_STALL_DETAIL),
        ),
        Member::opt("x-tern-ram-digest", Type::Object(&RAM_DIGEST)),
        Member::opt("x-tern-postcopy-recovery", Type::Object(&POSTCOPY_RECOVERY)),
        Member::opt("x-tern-release-ram", Type::Object(&RELEASE_RAM)),
        Member::opt("postcopy-blocktime", U64),
        Member::opt("postcopy-vcpu-blocktime", Type::Array(&U64)),
        Member::opt("postcopy-latency", U64),
        Member::opt("x-tern-postcopy-latency", Type::Object(&POSTCOPY_LATENCY)),
        Member::opt("x-tern-postcopy-auto", Type::Object(&POSTCOPY_AUTO)),
        Member::opt("x-tern-postcopy-switch", Type::Object(&POSTCOPY_SWITCH)),
    ],
);
/// `query-migrate`.
pub(super) const MIGRATION: Type = Type::Object(&MIGRATION_INFO);

// ---- events ----

static SHUTDOWN_CAUSE: Enum = Enum {
    name: "ShutdownCause",
    values: Values::List(&[
        "none",
        "host-error",
        "host-qmp-quit",
        "host-qmp-system-reset",
        "host-signal",
        "host-ui",
        "guest-shutdown",
        "guest-reset",
        "guest-panic",
        "subsystem-reset",
        "snapshot-load",
    ]),
};

/// Every event Tern emits.
pub(super) static EVENTS: [Event; 7] = [
    Event {
        name: "SHUTDOWN",
        data: &[
            Member::req("guest", Type::Bool),
            Member::req("reason", Type::Enum(&SHUTDOWN_CAUSE)),
        ],
    },
    Event {
        name: "STOP",
        data: &[],
    },
    Event {
        name: "RESUME",
        data: &[],
    },
    Event {
        name: "MIGRATION",
        data: &[Member::req("status", Type::Enum(&MIGRATION_STATUS))],
    },
    Event {
        name: "MIGRATION_PASS",
        data: &[Member::req("pass", INT)],
    },
    Event {
        name: "RESET",
        data: &[
            Member::req("guest", Type::Bool),
            Member::req("reason", Type::Enum(&SHUTDOWN_CAUSE)),
        ],
    },
    Event {
        name: "POWERDOWN",
        data: &[],
    },
];

// ---- user-creatable objects (QEMU's `ObjectOptions`, the types a migration uses) ----

static OBJECT_TYPE: Enum = Enum {
    name: "ObjectType",
    values: Values::List(&[
        "authz-list",
        "authz-simple",
        "tls-creds-psk",
        "tls-creds-x509",
    ]),
};
static TLS_ENDPOINT: Enum = Enum {
    name: "QCryptoTLSCredsEndpoint",
    values: Values::List(&["client", "server"]),
};
static AUTHZ_POLICY: Enum = Enum {
    name: "QAuthZListPolicy",
    values: Values::List(&["deny", "allow"]),
};
static AUTHZ_FORMAT: Enum = Enum {
    name: "QAuthZListFormat",
    values: Values::List(&["exact", "glob"]),
};
static AUTHZ_RULE: Object = object(
    "QAuthZListRule",
    &[
        Member::req("match", Type::Str),
        Member::req("policy", Type::Enum(&AUTHZ_POLICY)),
        Member::opt("format", Type::Enum(&AUTHZ_FORMAT)),
    ],
);

const ENDPOINT: Member = Member::opt("endpoint", Type::Enum(&TLS_ENDPOINT));
static AUTHZ_RULE_TYPE: Type = Type::Object(&AUTHZ_RULE);

static TLS_CREDS_X509: Object = object(
    "TlsCredsX509Properties",
    &[
        Member::opt("verify-peer", Type::Bool),
        Member::opt("dir", Type::Str),
        ENDPOINT,
        Member::opt("priority", Type::Str),
        Member::opt("sanity-check", Type::Bool),
        Member::opt("passwordid", Type::Str),
        Member::opt("loaded", Type::Bool),
    ],
);
static TLS_CREDS_PSK: Object = object(
    "TlsCredsPskProperties",
    &[
        Member::opt("verify-peer", Type::Bool),
        Member::opt("dir", Type::Str),
        ENDPOINT,
        Member::opt("priority", Type::Str),
        Member::opt("username", Type::Str),
        Member::opt("loaded", Type::Bool),
    ],
);
static AUTHZ_SIMPLE: Object = object(
    "AuthZSimpleProperties",
    &[Member::req("identity", Type::Str)],
);
static AUTHZ_LIST: Object = object(
    "AuthZListProperties",
    &[
        Member::opt("policy", Type::Enum(&AUTHZ_POLICY)),
        Member::opt("rules", Type::Array(&AUTHZ_RULE_TYPE)),
    ],
);
/// `object-add`'s arguments (QAPI `boxed`): QEMU's flat union `ObjectOptions` on `qom-type`,
/// with the types a migration uses.
pub(super) static OBJECT_OPTIONS: Object = Object {
    name: "ObjectOptions",
    members: &[
        Member::req("qom-type", Type::Enum(&OBJECT_TYPE)),
        Member::req("id", Type::Str),
    ],
    variants: Some(Variants {
        tag: "qom-type",
        cases: &[
            ("authz-list", &AUTHZ_LIST),
            ("authz-simple", &AUTHZ_SIMPLE),
            ("tls-creds-psk", &TLS_CREDS_PSK),
            ("tls-creds-x509", &TLS_CREDS_X509),
        ],
    }),
};

/// `object-del`.
pub(super) static OBJECT_DEL_ARGS: [Member; 1] = [Member::req("id", Type::Str)];
