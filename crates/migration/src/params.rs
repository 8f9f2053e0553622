//! Migration capabilities and parameters with QEMU's names, defaults, checks and error texts
//! (`qapi/migration.json`, `migration/options.c`: `migrate_caps_check`, `migrate_params_check`).
//!
//! JSON in and out is QMP's: `query-migrate-capabilities` returns
//! `[{"capability": name, "state": bool}]`, `migrate-set-capabilities` takes
//! `{"capabilities": [...]}`, `query-migrate-parameters` / `migrate-set-parameters` use the
//! kebab-case parameter names. Capabilities may not change while a migration runs
//! ([`check_not_running`]); parameters may (QEMU applies e.g. `max-bandwidth` and
//! `downtime-limit` to a running migration, and libvirt relies on it).

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::status::MigrationStatus;

#[path = "params_json.rs"]
mod json_args;
use json_args::{
    expects, get_bool, get_enum, get_str_or_null, get_u32, get_u64, get_u8, missing, type_error,
    unexpected,
};

/// QEMU's `MAX_THROTTLE`: default `max-bandwidth`, 128 MiB/s.
pub const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;
/// QEMU's `DEFAULT_MIGRATE_SET_DOWNTIME`, ms.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// QEMU's `MAX_MIGRATE_DOWNTIME` (2000 s), ms.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2000 * 1000;
/// Target page size used by the `xbzrle-cache-size` check.
pub const TARGET_PAGE_SIZE: u64 = 4096;
/// Tern: default `x-tern-liveness-timeout`, ms.
pub const DEFAULT_LIVENESS_TIMEOUT_MS: u64 = 10_000;
/// Tern: largest `x-tern-liveness-timeout` (one hour), ms.
pub const MAX_LIVENESS_TIMEOUT_MS: u64 = 3_600_000;
/// Tern's default `x-tern-resume-timeout`, ms.
pub const DEFAULT_RESUME_TIMEOUT_MS: u64 = 10_000;
/// Largest `x-tern-resume-timeout` (one hour), ms.
pub const MAX_RESUME_TIMEOUT_MS: u64 = 3_600_000;

/// Error of a capability or parameter command; `Display` is the QMP error `desc`
/// (class `GenericError`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A QEMU check failed (text as QEMU's).
    #[error("{0}")]
    Invalid(String),
    /// The capability or value exists in QEMU but Tern does not implement it.
    #[error("{0} is not yet supported by Tern")]
    NotSupported(String),
    /// Changing capabilities while a migration runs.
    #[error("There's a migration process in progress")]
    InProgress,
}

/// Refuses `migrate-set-capabilities` (and `migrate`) while a migration runs.
pub fn check_not_running(status: MigrationStatus) -> Result<(), ParamError> {
    if status.is_running() {
        Err(ParamError::InProgress)
    } else {
        Ok(())
    }
}

macro_rules! capabilities {
    ($($variant:ident = $name:literal, $implemented:literal;)*) => {
        /// QEMU's `MigrationCapability` (9.1+ list; `compress` and `block` were removed in 9.1).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Capability {
            $(
                #[doc = concat!("`", $name, "`")]
                $variant,
            )*
        }

        impl Capability {
            /// Every capability, in QEMU's order (the order of `query-migrate-capabilities`).
            pub const ALL: &'static [Capability] = &[$(Capability::$variant),*];

            /// QEMU's name.
            pub fn name(self) -> &'static str {
                match self {
                    $(Capability::$variant => $name,)*
                }
            }

            /// Whether Tern implements it (others are listed but cannot be enabled).
            pub fn implemented(self) -> bool {
                match self {
                    $(Capability::$variant => $implemented,)*
                }
            }
        }
    };
}

capabilities! {
    Xbzrle = "xbzrle", false;
    RdmaPinAll = "rdma-pin-all", false;
    AutoConverge = "auto-converge", true;
    ZeroBlocks = "zero-blocks", false;
    Events = "events", true;
    PostcopyRam = "postcopy-ram", true;
    XColo = "x-colo", false;
    // Source only; needs `postcopy-ram` (pages are released once the destination confirmed
    // them in post-copy, decision 180).
    ReleaseRam = "release-ram", true;
    ReturnPath = "return-path", true;
    PauseBeforeSwitchover = "pause-before-switchover", true;
    Multifd = "multifd", true;
    DirtyBitmaps = "dirty-bitmaps", false;
    PostcopyBlocktime = "postcopy-blocktime", true;
    LateBlockActivate = "late-block-activate", false;
    XIgnoreShared = "x-ignore-shared", false;
    ValidateUuid = "validate-uuid", true;
    BackgroundSnapshot = "background-snapshot", false;
    // Multifd channels send with `MSG_ZEROCOPY` (`source/multifd_zerocopy.rs`, decisions
    // 220–226); QEMU's refusals below (no TLS, no compression, needs `multifd`).
    ZeroCopySend = "zero-copy-send", true;
    PostcopyPreempt = "postcopy-preempt", true;
    SwitchoverAck = "switchover-ack", true;
    DirtyLimit = "dirty-limit", false;
    MappedRam = "mapped-ram", false;
    // Tern: the destination checks a digest of the source's memory before it runs
    // (`docs/stream-format.md` §7a).
    XTernRamDigest = "x-tern-ram-digest", true;
    // Tern: switch to post-copy by itself when pre-copy is predicted not to meet
    // `downtime-limit` (docs/migration-engine.md §2.4). Needs `postcopy-ram`.
    XTernPostcopyAuto = "x-tern-postcopy-auto", true;
}

impl Capability {
    /// Looks a capability up by its QEMU name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.name() == name)
    }

    fn index(self) -> usize {
        Self::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

/// Capabilities incompatible with `background-snapshot` (QEMU's
/// `check_caps_background_snapshot`, without the removed `compress`).
const BACKGROUND_SNAPSHOT_CONFLICTS: &[Capability] = &[
    Capability::PostcopyRam,
    Capability::DirtyBitmaps,
    Capability::PostcopyBlocktime,
    Capability::LateBlockActivate,
    Capability::ReturnPath,
    Capability::Multifd,
    Capability::PauseBeforeSwitchover,
    Capability::AutoConverge,
    Capability::ReleaseRam,
    Capability::RdmaPinAll,
    Capability::Xbzrle,
    Capability::XColo,
    Capability::ValidateUuid,
    Capability::ZeroCopySend,
];

/// A set of capability states (all off by default, as in QEMU).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    on: Vec<Capability>,
}

impl Capabilities {
    /// Whether `cap` is on.
    pub fn get(&self, cap: Capability) -> bool {
        self.on.contains(&cap)
    }

    fn put(&mut self, cap: Capability, state: bool) {
        self.on.retain(|c| *c != cap);
        if state {
            self.on.push(cap);
            self.on.sort_by_key(|c| c.index());
        }
    }

    /// QEMU's `migrate_caps_check` on this set (the rules that can apply without a running
    /// migration), then Tern's "not yet supported" check for every enabled capability.
    pub fn check(&self, params: &Parameters) -> Result<(), ParamError> {
        use Capability as C;
        let on = |c| self.get(c);
        let bad = |s: &str| Err(ParamError::Invalid(s.to_owned()));
        if on(C::PostcopyRam) && on(C::XIgnoreShared) {
            return bad("Postcopy is not compatible with ignore-shared");
        }
        if on(C::BackgroundSnapshot) {
            if let Some(c) = BACKGROUND_SNAPSHOT_CONFLICTS.iter().find(|c| on(**c)) {
                return Err(ParamError::Invalid(format!(
                    "Background-snapshot is not compatible with {}",
                    c.name()
                )));
            }
        }
        if on(C::ZeroCopySend)
            && (!on(C::Multifd)
                || on(C::Xbzrle)
                || params.multifd_compression != MultifdCompression::None
                || !params.tls_creds.is_empty())
        {
            return bad("Zero copy only available for non-compressed non-TLS multifd migration");
        }
        if on(C::PostcopyPreempt) && !on(C::PostcopyRam) {
            return bad("Postcopy preempt requires postcopy-ram");
        }
        if on(C::ReleaseRam) && !on(C::PostcopyRam) {
            return bad(
                "Capability 'release-ram' requires capability 'postcopy-ram' (Tern releases \
                 the source's pages only once post-copy has sent them)",
            );
        }
        if on(C::XTernPostcopyAuto) && !on(C::PostcopyRam) {
            return bad(
                "Capability 'x-tern-postcopy-auto' requires capability 'postcopy-ram' (the \
                 automatic switch goes to post-copy, which both sides must have negotiated)",
            );
        }
        if on(C::SwitchoverAck) && !on(C::ReturnPath) {
            return bad("Capability 'switchover-ack' requires capability 'return-path'");
        }
        if on(C::DirtyLimit) && on(C::AutoConverge) {
            return bad(
                "dirty-limit conflicts with auto-converge either of then available currently",
            );
        }
        if on(C::Multifd) && on(C::Xbzrle) {
            return bad("Multifd is not compatible with xbzrle");
        }
        if on(C::MappedRam) {
            if on(C::Xbzrle) {
                return bad("Mapped-ram migration is incompatible with xbzrle");
            }
            if on(C::PostcopyRam) {
                return bad("Mapped-ram migration is incompatible with postcopy");
            }
        }
        // Tern: multifd is built with `postcopy-ram` (QEMU 10.1's semantics, decision 245) and
        // with `x-tern-ram-digest` (decision 252); a `file:` URI is refused at `migrate`.
        if on(C::Multifd) && params.multifd_compression.wire().is_none() {
            return Err(multifd_compression_refused(params.multifd_compression));
        }
        if let Some(c) = self.on.iter().find(|c| !c.implemented()) {
            return Err(ParamError::NotSupported(format!(
                "Capability '{}'",
                c.name()
            )));
        }
        Ok(())
    }

    /// Sets several capabilities at once, all or nothing, after [`Capabilities::check`] on the
    /// resulting set. The caller must first call [`check_not_running`].
    pub fn set(
        &mut self,
        updates: &[(Capability, bool)],
        params: &Parameters,
    ) -> Result<(), ParamError> {
        let mut next = self.clone();
        for (c, s) in updates {
            next.put(*c, *s);
        }
        next.check(params)?;
        *self = next;
        Ok(())
    }

    /// `query-migrate-capabilities`: `[{"capability": name, "state": bool}, ...]`.
    pub fn to_query_json(&self) -> Value {
        Value::Array(
            Capability::ALL
                .iter()
                .map(|c| json!({ "capability": c.name(), "state": self.get(*c) }))
                .collect(),
        )
    }

    /// `migrate-set-capabilities` with the command's `arguments` object
    /// (`{"capabilities": [{"capability": ..., "state": ...}]}`).
    pub fn apply_json(&mut self, args: &Value, params: &Parameters) -> Result<(), ParamError> {
        let obj = args
            .as_object()
            .ok_or_else(|| type_error("arguments", "object"))?;
        for k in obj.keys() {
            if k != "capabilities" {
                return Err(unexpected(k));
            }
        }
        let list = obj
            .get("capabilities")
            .ok_or_else(|| ParamError::Invalid("Parameter 'capabilities' is missing".into()))?
            .as_array()
            .ok_or_else(|| type_error("capabilities", "array"))?;
        let mut updates = Vec::with_capacity(list.len());
        for (i, item) in list.iter().enumerate() {
            let path = format!("capabilities[{i}]");
            let o = item
                .as_object()
                .ok_or_else(|| type_error(&path, "object"))?;
            for k in o.keys() {
                if k != "capability" && k != "state" {
                    return Err(unexpected(&format!("{path}.{k}")));
                }
            }
            let name = o
                .get("capability")
                .ok_or_else(|| missing(&format!("{path}.capability")))?
                .as_str()
                .ok_or_else(|| type_error(&format!("{path}.capability"), "string"))?;
            let cap = Capability::from_name(name).ok_or_else(|| {
                ParamError::Invalid(format!(
                    "Parameter '{path}.capability' does not accept value '{name}'"
                ))
            })?;
            let state = o
                .get("state")
                .ok_or_else(|| missing(&format!("{path}.state")))?
                .as_bool()
                .ok_or_else(|| type_error(&format!("{path}.state"), "boolean"))?;
            updates.push((cap, state));
        }
        self.set(&updates, params)
    }
}

/// `multifd-compression` `qpl`, `uadk` or `qatzip` with `multifd` on: QEMU builds them only
/// with their hardware libraries, and Tern has none of them (zlib and zstd are built).
fn multifd_compression_refused(c: MultifdCompression) -> ParamError {
    ParamError::Invalid(format!(
        "Parameter 'multifd-compression' value '{}' is not supported by this build (Tern \
         has none, zlib and zstd)",
        serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    ))
}

/// QEMU's `MultiFDCompression`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MultifdCompression {
    /// No compression.
    #[default]
    None,
    /// zlib.
    Zlib,
    /// zstd.
    Zstd,
    /// Intel QPL.
    Qpl,
    /// UADK.
    Uadk,
    /// QATzip.
    Qatzip,
}

impl MultifdCompression {
    /// The method as the stream names it (`docs/stream-format.md` §5.3); `None` for the
    /// methods this build does not have (`qpl`, `uadk`, `qatzip`).
    pub fn wire(self) -> Option<crate::wire::Compression> {
        use crate::wire::Compression as W;
        match self {
            Self::None => Some(W::None),
            Self::Zlib => Some(W::Zlib),
            Self::Zstd => Some(W::Zstd),
            Self::Qpl | Self::Uadk | Self::Qatzip => None,
        }
    }
}

/// QEMU's `MigMode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigMode {
    /// Normal migration.
    #[default]
    Normal,
    /// CPR reboot.
    CprReboot,
    /// CPR transfer.
    CprTransfer,
}

/// QEMU's `ZeroPageDetection` (default `multifd` since 9.0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ZeroPageDetection {
    /// No detection.
    None,
    /// In the main migration thread.
    Legacy,
    /// In the multifd threads (Tern: where pages are read).
    #[default]
    Multifd,
}

/// QEMU's `MigrationParameters`, with QEMU's defaults. Serialises to the
/// `query-migrate-parameters` object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Parameters {
    /// Initial self-announce delay, ms.
    pub announce_initial: u64,
    /// Maximum self-announce delay, ms.
    pub announce_max: u64,
    /// Self-announce rounds.
    pub announce_rounds: u64,
    /// Self-announce step, ms.
    pub announce_step: u64,
    /// Dirty/transfer ratio (%) that triggers throttling.
    pub throttle_trigger_threshold: u8,
    /// Initial auto-converge throttle (%).
    pub cpu_throttle_initial: u8,
    /// Auto-converge throttle increment (%).
    pub cpu_throttle_increment: u8,
    /// Smaller increments at the tail.
    pub cpu_throttle_tailslow: bool,
    /// TLS credentials object id ("" = plain).
    pub tls_creds: String,
    /// TLS hostname override.
    pub tls_hostname: String,
    /// TLS authz object id.
    pub tls_authz: String,
    /// Pre-copy bandwidth limit, bytes/s.
    pub max_bandwidth: u64,
    /// Bandwidth assumed for the switchover decision, bytes/s (0 = estimate).
    pub avail_switchover_bandwidth: u64,
    /// Maximum tolerated downtime, ms.
    pub downtime_limit: u64,
    /// COLO checkpoint delay, ms.
    pub x_checkpoint_delay: u32,
    /// Number of multifd channels.
    pub multifd_channels: u8,
    /// Multifd compression method.
    pub multifd_compression: MultifdCompression,
    /// zlib level.
    pub multifd_zlib_level: u8,
    /// QATzip level.
    pub multifd_qatzip_level: u8,
    /// zstd level.
    pub multifd_zstd_level: u8,
    /// XBZRLE cache size, bytes.
    pub xbzrle_cache_size: u64,
    /// Post-copy background bandwidth, bytes/s (0 = unlimited).
    pub max_postcopy_bandwidth: u64,
    /// Auto-converge throttle cap (%).
    pub max_cpu_throttle: u8,
    /// Dirty-limit period, ms.
    pub x_vcpu_dirty_limit_period: u64,
    /// Dirty-limit quota, MB/s.
    pub vcpu_dirty_limit: u64,
    /// Migration mode.
    pub mode: MigMode,
    /// Zero-page detection.
    pub zero_page_detection: ZeroPageDetection,
    /// O_DIRECT for mapped-ram files.
    pub direct_io: bool,
    /// Tern: inactivity limit of a migration on both ends, and `TCP_USER_TIMEOUT`, ms (0 = off;
    /// read when the migration starts; `docs/migration-engine.md` §5.1).
    pub x_tern_liveness_timeout: u64,
    /// Tern: how long the source waits, after END was flushed, for the destination to confirm
    /// it runs (`RESUMED`) or to say it stays paused or failed (`SHUT`), ms; on expiry the
    /// migration ends `x-tern-unconfirmed`. 1..=3600000.
    pub x_tern_resume_timeout: u64,
}

impl Default for Parameters {
    fn default() -> Self {
        Self {
            announce_initial: 50,
            announce_max: 550,
            announce_rounds: 5,
            announce_step: 100,
            throttle_trigger_threshold: 50,
            cpu_throttle_initial: 20,
            cpu_throttle_increment: 10,
            cpu_throttle_tailslow: false,
            tls_creds: String::new(),
            tls_hostname: String::new(),
            tls_authz: String::new(),
            max_bandwidth: DEFAULT_MAX_BANDWIDTH,
            avail_switchover_bandwidth: 0,
            downtime_limit: DEFAULT_DOWNTIME_LIMIT_MS,
            x_checkpoint_delay: 200 * 100,
            multifd_channels: 2,
            multifd_compression: MultifdCompression::None,
            multifd_zlib_level: 1,
            multifd_qatzip_level: 1,
            multifd_zstd_level: 1,
            xbzrle_cache_size: 64 << 20,
            max_postcopy_bandwidth: 0,
            max_cpu_throttle: 99,
            x_vcpu_dirty_limit_period: 1000,
            vcpu_dirty_limit: 1,
            mode: MigMode::Normal,
            zero_page_detection: ZeroPageDetection::Multifd,
            direct_io: false,
            x_tern_liveness_timeout: DEFAULT_LIVENESS_TIMEOUT_MS,
            x_tern_resume_timeout: DEFAULT_RESUME_TIMEOUT_MS,
        }
    }
}

/// The QAPI type of a migration parameter (what the QMP schema says `migrate-set-parameters`
/// takes; `query-migrate-parameters` shows strings for `StrOrNull`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamType {
    /// `bool`.
    Bool,
    /// `uint8`.
    U8,
    /// `uint32`.
    U32,
    /// `uint64` / `size`.
    U64,
    /// A string, or `null` for "".
    StrOrNull,
    /// [`MultifdCompression`].
    MultifdCompression,
    /// [`MigMode`].
    MigMode,
    /// [`ZeroPageDetection`].
    ZeroPageDetection,
}

/// Every parameter `migrate-set-parameters` accepts and `query-migrate-parameters` shows, with
/// its type, in QEMU's order. The QMP schema (and the check of `migrate-set-parameters`
/// arguments) is generated from this table: a new parameter is a [`Parameters`] field, its
/// default, its arm in [`Parameters::apply_json`] and one line here.
pub const PARAMETERS: &[(&str, ParamType)] = &[
    ("announce-initial", ParamType::U64),
    ("announce-max", ParamType::U64),
    ("announce-rounds", ParamType::U64),
    ("announce-step", ParamType::U64),
    ("throttle-trigger-threshold", ParamType::U8),
    ("cpu-throttle-initial", ParamType::U8),
    ("cpu-throttle-increment", ParamType::U8),
    ("cpu-throttle-tailslow", ParamType::Bool),
    ("tls-creds", ParamType::StrOrNull),
    ("tls-hostname", ParamType::StrOrNull),
    ("tls-authz", ParamType::StrOrNull),
    ("max-bandwidth", ParamType::U64),
    ("avail-switchover-bandwidth", ParamType::U64),
    ("downtime-limit", ParamType::U64),
    ("x-checkpoint-delay", ParamType::U32),
    ("multifd-channels", ParamType::U8),
    ("multifd-compression", ParamType::MultifdCompression),
    ("multifd-zlib-level", ParamType::U8),
    ("multifd-qatzip-level", ParamType::U8),
    ("multifd-zstd-level", ParamType::U8),
    ("xbzrle-cache-size", ParamType::U64),
    ("max-postcopy-bandwidth", ParamType::U64),
    ("max-cpu-throttle", ParamType::U8),
    ("x-vcpu-dirty-limit-period", ParamType::U64),
    ("vcpu-dirty-limit", ParamType::U64),
    ("mode", ParamType::MigMode),
    ("zero-page-detection", ParamType::ZeroPageDetection),
    ("direct-io", ParamType::Bool),
    ("x-tern-liveness-timeout", ParamType::U64),
    ("x-tern-resume-timeout", ParamType::U64),
];

impl Parameters {
    /// `query-migrate-parameters`.
    pub fn to_query_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// QEMU's `migrate_params_check` for the parameters named in `supplied` (kebab-case), as
    /// QEMU checks only what the command set. Texts are QEMU's (`QERR_INVALID_PARAMETER_VALUE`:
    /// "Parameter '%s' expects %s", with QEMU's underscore names).
    pub fn check(&self, supplied: &[&str], caps: &Capabilities) -> Result<(), ParamError> {
        let has = |n: &str| supplied.contains(&n);
        if has("throttle-trigger-threshold")
            && !(1..=100).contains(&self.throttle_trigger_threshold)
        {
            return Err(expects(
                "throttle_trigger_threshold",
                "an integer in the range of 1 to 100",
            ));
        }
        if has("cpu-throttle-initial") && !(1..=99).contains(&self.cpu_throttle_initial) {
            return Err(expects(
                "cpu_throttle_initial",
                "an integer in the range of 1 to 99",
            ));
        }
        if has("cpu-throttle-increment") && !(1..=99).contains(&self.cpu_throttle_increment) {
            return Err(expects(
                "cpu_throttle_increment",
                "an integer in the range of 1 to 99",
            ));
        }
        if has("downtime-limit") && self.downtime_limit > MAX_DOWNTIME_LIMIT_MS {
            return Err(expects(
                "downtime_limit",
                &format!("an integer in the range of 0 to {MAX_DOWNTIME_LIMIT_MS} ms"),
            ));
        }
        if has("multifd-channels") && self.multifd_channels < 1 {
            return Err(expects("multifd_channels", "a value between 1 and 255"));
        }
        if has("multifd-zlib-level") && self.multifd_zlib_level > 9 {
            return Err(expects("multifd_zlib_level", "a value between 0 and 9"));
        }
        if has("multifd-qatzip-level") && !(1..=9).contains(&self.multifd_qatzip_level) {
            return Err(expects("multifd_qatzip_level", "a value between 1 and 9"));
        }
        if has("multifd-zstd-level") && self.multifd_zstd_level > 20 {
            return Err(expects("multifd_zstd_level", "a value between 0 and 20"));
        }
        if has("xbzrle-cache-size")
            && (self.xbzrle_cache_size < TARGET_PAGE_SIZE
                || !self.xbzrle_cache_size.is_power_of_two())
        {
            return Err(expects(
                "xbzrle_cache_size",
                "a power of two no less than the target page size",
            ));
        }
        if has("max-cpu-throttle")
            && (self.max_cpu_throttle < self.cpu_throttle_initial || self.max_cpu_throttle > 99)
        {
            return Err(expects(
                "max_cpu_throttle",
                "an integer in the range of cpu_throttle_initial to 99",
            ));
        }
        if has("announce-initial") && self.announce_initial > 100_000 {
            return Err(expects("announce_initial", "a value between 0 and 100000"));
        }
        if has("announce-max") && self.announce_max > 100_000 {
            return Err(expects("announce_max", "a value between 0 and 100000"));
        }
        if has("announce-rounds") && self.announce_rounds > 1000 {
            return Err(expects("announce_rounds", "a value between 0 and 1000"));
        }
        if has("announce-step") && !(1..=10_000).contains(&self.announce_step) {
            return Err(expects("announce_step", "a value between 0 and 10000"));
        }
        if caps.get(Capability::ZeroCopySend)
            && ((has("multifd-compression")
                && self.multifd_compression != MultifdCompression::None)
                || !self.tls_creds.is_empty())
        {
            return Err(ParamError::Invalid(
                "Zero copy only available for non-compressed non-TLS multifd migration".into(),
            ));
        }
        if caps.get(Capability::MappedRam)
            && (self.multifd_compression != MultifdCompression::None || !self.tls_creds.is_empty())
        {
            return Err(ParamError::Invalid(
                "Mapped-ram only available for non-compressed non-TLS multifd migration".into(),
            ));
        }
        if has("x-vcpu-dirty-limit-period") && !(1..=1000).contains(&self.x_vcpu_dirty_limit_period)
        {
            return Err(expects(
                "x-vcpu-dirty-limit-period",
                "a value between 1 and 1000",
            ));
        }
        if has("vcpu-dirty-limit") && self.vcpu_dirty_limit < 1 {
            return Err(ParamError::Invalid(
                "Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s".into(),
            ));
        }
        if has("x-tern-liveness-timeout") && self.x_tern_liveness_timeout > MAX_LIVENESS_TIMEOUT_MS
        {
            return Err(expects(
                "x-tern-liveness-timeout",
                &format!("a value between 0 and {MAX_LIVENESS_TIMEOUT_MS} (ms, 0 = off)"),
            ));
        }
        if has("x-tern-resume-timeout")
            && !(1..=MAX_RESUME_TIMEOUT_MS).contains(&self.x_tern_resume_timeout)
        {
            return Err(expects(
                "x-tern-resume-timeout",
                &format!("a value between 1 and {MAX_RESUME_TIMEOUT_MS} ms"),
            ));
        }
        // Tern: values it cannot honour.
        if caps.get(Capability::Multifd) && self.multifd_compression.wire().is_none() {
            return Err(multifd_compression_refused(self.multifd_compression));
        }
        if self.mode != MigMode::Normal {
            return Err(ParamError::NotSupported(format!(
                "Migration mode '{}'",
                serde_json::to_value(self.mode)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// `migrate-set-parameters` with the command's `arguments` object: type-checks every
    /// member, applies them to a copy, runs [`Parameters::check`], then commits (all or
    /// nothing). Allowed while a migration runs; the engine reads the new values (e.g.
    /// `max-bandwidth`, `downtime-limit`) at its next rate-limit window.
    pub fn apply_json(&mut self, args: &Value, caps: &Capabilities) -> Result<(), ParamError> {
        let obj: &Map<String, Value> = args
            .as_object()
            .ok_or_else(|| type_error("arguments", "object"))?;
        let mut next = self.clone();
        let mut supplied = Vec::with_capacity(obj.len());
        for (name, v) in obj {
            let n = name.as_str();
            match n {
                "announce-initial" => next.announce_initial = get_u64(n, v, "uint64")?,
                "announce-max" => next.announce_max = get_u64(n, v, "uint64")?,
                "announce-rounds" => next.announce_rounds = get_u64(n, v, "uint64")?,
                "announce-step" => next.announce_step = get_u64(n, v, "uint64")?,
                "throttle-trigger-threshold" => next.throttle_trigger_threshold = get_u8(n, v)?,
                "cpu-throttle-initial" => next.cpu_throttle_initial = get_u8(n, v)?,
                "cpu-throttle-increment" => next.cpu_throttle_increment = get_u8(n, v)?,
                "cpu-throttle-tailslow" => next.cpu_throttle_tailslow = get_bool(n, v)?,
                "tls-creds" => next.tls_creds = get_str_or_null(n, v)?,
                "tls-hostname" => next.tls_hostname = get_str_or_null(n, v)?,
                "tls-authz" => next.tls_authz = get_str_or_null(n, v)?,
                "max-bandwidth" => next.max_bandwidth = get_u64(n, v, "uint64")?,
                "avail-switchover-bandwidth" => {
                    next.avail_switchover_bandwidth = get_u64(n, v, "uint64")?
                }
                "downtime-limit" => next.downtime_limit = get_u64(n, v, "uint64")?,
                "x-checkpoint-delay" => next.x_checkpoint_delay = get_u32(n, v)?,
                "multifd-channels" => next.multifd_channels = get_u8(n, v)?,
                "multifd-compression" => next.multifd_compression = get_enum(n, v)?,
                "multifd-zlib-level" => next.multifd_zlib_level = get_u8(n, v)?,
                "multifd-qatzip-level" => next.multifd_qatzip_level = get_u8(n, v)?,
                "multifd-zstd-level" => next.multifd_zstd_level = get_u8(n, v)?,
                "xbzrle-cache-size" => next.xbzrle_cache_size = get_u64(n, v, "uint64")?,
                "max-postcopy-bandwidth" => next.max_postcopy_bandwidth = get_u64(n, v, "uint64")?,
                "max-cpu-throttle" => next.max_cpu_throttle = get_u8(n, v)?,
                "x-vcpu-dirty-limit-period" => {
                    next.x_vcpu_dirty_limit_period = get_u64(n, v, "uint64")?
                }
                "vcpu-dirty-limit" => next.vcpu_dirty_limit = get_u64(n, v, "uint64")?,
                "mode" => next.mode = get_enum(n, v)?,
                "zero-page-detection" => next.zero_page_detection = get_enum(n, v)?,
                "direct-io" => next.direct_io = get_bool(n, v)?,
                "x-tern-liveness-timeout" => {
                    next.x_tern_liveness_timeout = get_u64(n, v, "uint64")?
                }
                "x-tern-resume-timeout" => next.x_tern_resume_timeout = get_u64(n, v, "uint64")?,
                "block-bitmap-mapping" => {
                    return Err(ParamError::NotSupported(
                        "Parameter 'block-bitmap-mapping'".into(),
                    ))
                }
                _ => return Err(unexpected(n)),
            }
            supplied.push(n);
        }
        next.check(&supplied, caps)?;
        *self = next;
        Ok(())
    }
}

#[cfg(test)]
#[path = "params_tests.rs"]
mod tests;
