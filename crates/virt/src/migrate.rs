//! Migration options (virsh `migrate` flags) and the cookies the v3 phases exchange.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `virDomainMigrate3` flags and parameters that Tern understands. Options needing an engine
/// feature Tern does not have yet are carried so that [`MigrateOptions::check_supported`] can
/// refuse them by name (they start working as the features land).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrateOptions {
    pub live: bool,
    pub offline: bool,
    pub p2p: bool,
    pub tunnelled: bool,
    pub persistent: bool,
    pub undefine_source: bool,
    /// Leave the domain paused on the destination.
    pub suspend: bool,
    pub abort_on_error: bool,
    /// `--bandwidth` in MiB/s (libvirt's unit).
    pub bandwidth_mib_s: Option<u64>,
    /// `--postcopy` (`VIR_MIGRATE_POSTCOPY`): `postcopy-ram` on both VMMs; the migration
    /// starts in pre-copy and switches on `migrate-postcopy` (docs/management.md §5c).
    pub postcopy: bool,
    /// `--postcopy-after-precopy`: the client switches after the first pass (virsh's rule,
    /// on `migration-iteration` 2); carried for the checks only.
    pub postcopy_after_precopy: bool,
    /// `--postcopy-bandwidth` in MiB/s: the source VMM's `max-postcopy-bandwidth`.
    pub postcopy_bandwidth: Option<u64>,
    /// `--postcopy-resume` (`VIR_MIGRATE_POSTCOPY_RESUME`, libvirt 8.5): resume a post-copy
    /// migration that failed after the switch (`migrate-recover` on the destination's VMM,
    /// `migrate {resume: true}` on the source's; docs/management.md §5d).
    #[serde(default)]
    pub postcopy_resume: bool,
    pub auto_converge: bool,
    pub parallel: bool,
    pub parallel_connections: Option<u32>,
    pub compressed: bool,
    /// `--comp-methods` (comma separated, libvirt's names): with `--parallel`, one of `zlib`,
    /// `zstd` becomes both VMMs' `multifd-compression` ([`MigrateOptions::multifd_compression`]).
    pub comp_methods: Option<String>,
    /// `--comp-zlib-level` (0..=9): the source VMM's `multifd-zlib-level`.
    #[serde(default)]
    pub comp_zlib_level: Option<u8>,
    /// `--comp-zstd-level` (0..=20): the source VMM's `multifd-zstd-level`.
    #[serde(default)]
    pub comp_zstd_level: Option<u8>,
    pub tls: bool,
    /// `--available-switchover-bandwidth` in MiB/s (libvirt's unit): the source VMM's
    /// `avail-switchover-bandwidth` (bytes/s), used instead of the measured bandwidth for the
    /// expected downtime and the switchover decision.
    pub available_switchover_bandwidth: Option<u64>,
}

/// A multifd compression method (`zlib` / `zstd`) and, when given, its level parameter
/// (`multifd-zlib-level` / `multifd-zstd-level`) with the value.
pub type MultifdCompression = (&'static str, Option<(&'static str, u8)>);

impl MigrateOptions {
    /// libvirt's post-copy rules (`qemuMigrationSrcBeginPhase` and friends): `--postcopy`
    /// needs a live migration that leaves the domain running, a return path (not tunnelled);
    /// its companions need it.
    fn check_postcopy(&self) -> Result<()> {
        if !self.postcopy {
            if self.postcopy_after_precopy {
                return Err(Error::InvalidArg(
                    "--postcopy-after-precopy can only be used with --postcopy".into(),
                ));
            }
            if self.postcopy_bandwidth.is_some() {
                return Err(Error::InvalidArg(
                    "--postcopy-bandwidth can only be used with --postcopy".into(),
                ));
            }
            return Ok(());
        }
        if self.tunnelled {
            return Err(Error::Unsupported(
                "post-copy is not supported with tunnelled migration (the page requests need \
                 a return path, which a tunnel through the daemons does not have)"
                    .into(),
            ));
        }
        if !self.live || self.suspend || self.offline {
            return Err(Error::Unsupported(
                "post-copy migration is not supported with non-live or paused migration \
                 (--postcopy needs --live and no --suspend: the guest runs on the destination \
                 from the switch on)"
                    .into(),
            ));
        }
        if self
            .postcopy_bandwidth
            .is_some_and(|b| b.checked_mul(1 << 20).is_none())
        {
            return Err(Error::InvalidArg(
                "--postcopy-bandwidth is too large".into(),
            ));
        }
        Ok(())
    }

    /// libvirt's rules for `VIR_MIGRATE_POSTCOPY_RESUME` (`qemuMigrationAnyCanResume`): the
    /// resumed migration is a post-copy one, and the options that shape a new migration's
    /// pre-copy or switch have nothing left to act on.
    fn check_resume(&self) -> Result<()> {
        if !self.postcopy_resume {
            return Ok(());
        }
        if !self.postcopy {
            return Err(Error::InvalidArg(
                "resuming failed post-copy migration requires post-copy to be enabled \
                 (--postcopy-resume needs --postcopy, as the migration it resumes had)"
                    .into(),
            ));
        }
        let pre_copy_only: &[(bool, &str)] = &[
            (self.offline, "--offline"),
            (
                self.postcopy_after_precopy,
                "--postcopy-after-precopy (the migration already switched to post-copy)",
            ),
            (
                self.auto_converge,
                "--auto-converge (it throttles pre-copy)",
            ),
            (
                self.available_switchover_bandwidth.is_some(),
                "--available-switchover-bandwidth (the switchover is over)",
            ),
        ];
        for (set, opt) in pre_copy_only {
            if *set {
                return Err(Error::InvalidArg(format!(
                    "--postcopy-resume cannot be used with {opt}"
                )));
            }
        }
        Ok(())
    }

    /// libvirt's rules for `--parallel` (`VIR_MIGRATE_PARALLEL`): `--parallel-connections`
    /// only with it, 1..=255 connections (QEMU's `multifd-channels` range), not tunnelled
    /// (the channels are extra connections between the VMMs).
    fn check_parallel(&self) -> Result<()> {
        if !self.parallel {
            if self.parallel_connections.is_some() {
                return Err(Error::InvalidArg(
                    "--parallel-connections can only be used with --parallel (turn parallel \
                     migration on to tune it)"
                        .into(),
                ));
            }
            return Ok(());
        }
        if self.tunnelled {
            return Err(Error::InvalidArg(
                "--parallel is not supported with --tunnelled (the parallel connections go \
                 directly between the VMMs)"
                    .into(),
            ));
        }
        if let Some(n) = self.parallel_connections {
            if !(1..=255).contains(&n) {
                return Err(Error::InvalidArg(format!(
                    "--parallel-connections {n}: expects a value between 1 and 255"
                )));
            }
        }
        Ok(())
    }

    /// libvirt's compression rules (`qemuMigrationParamsSetCompression`) for the methods Tern
    /// has: with `--parallel`, exactly one of `zlib`, `zstd` (multifd compression, both VMMs'
    /// `multifd-compression`) and its level (`--comp-zlib-level` / `--comp-zstd-level`, only
    /// with that method, QEMU's ranges); `zlib` / `zstd` without `--parallel` are refused, as
    /// libvirt does. `--compressed` alone means libvirt's default, `xbzrle`, and `mt` is the
    /// removed compress-threads method: neither is in the Tern engine nor in QEMU 10's multifd,
    /// so both are refused by name. Returns the method and, when given, its level parameter.
    pub fn multifd_compression(&self) -> Result<Option<MultifdCompression>> {
        let mut methods: Vec<&'static str> = Vec::new();
        for m in self.comp_methods.iter().flat_map(|s| s.split(',')) {
            let m = m.trim();
            let known = match m {
                "zlib" => "zlib",
                "zstd" => "zstd",
                "xbzrle" | "mt" => {
                    return Err(Error::Unsupported(format!(
                        "--comp-methods {m}: needs {} in the Tern engine, which is not \
                         available; use --parallel --comp-methods zstd or zlib",
                        if m == "xbzrle" {
                            "xbzrle"
                        } else {
                            "multithreaded compression (mt, removed in QEMU 9.1)"
                        }
                    )))
                }
                other => {
                    return Err(Error::InvalidArg(format!(
                    "--comp-methods: unknown compression method '{other}' (xbzrle, mt, zlib, zstd)"
                )))
                }
            };
            if methods.contains(&known) {
                return Err(Error::InvalidArg(format!(
                    "--comp-methods: compression method '{known}' is specified twice"
                )));
            }
            if !self.parallel {
                return Err(Error::InvalidArg(format!(
                    "--comp-methods {known}: compression method '{known}' is only supported \
                     with parallel migration (--parallel)"
                )));
            }
            methods.push(known);
        }
        if methods.len() > 1 {
            return Err(Error::InvalidArg(
                "--comp-methods: only one compression method can be used with parallel \
                 migration"
                    .into(),
            ));
        }
        if self.compressed && methods.is_empty() {
            return Err(Error::Unsupported(
                "--compressed without --comp-methods means xbzrle (libvirt's default), which \
                 the Tern engine does not have; use --parallel --comp-methods zstd or zlib"
                    .into(),
            ));
        }
        let method = methods.first().copied();
        for (level, name, param, max, needs) in [
            (
                self.comp_zlib_level,
                "--comp-zlib-level",
                "multifd-zlib-level",
                9,
                "zlib",
            ),
            (
                self.comp_zstd_level,
                "--comp-zstd-level",
                "multifd-zstd-level",
                20,
                "zstd",
            ),
        ] {
            let Some(level) = level else { continue };
            if method != Some(needs) {
                return Err(Error::InvalidArg(format!(
                    "{name}: turn {needs} compression on to tune it (--parallel --comp-methods {needs})"
                )));
            }
            if level > max {
                return Err(Error::InvalidArg(format!(
                    "{name} {level}: expects a value between 0 and {max}"
                )));
            }
            return Ok(Some((needs, Some((param, level)))));
        }
        Ok(method.map(|m| (m, None)))
    }

    /// `multifd-channels` for `--parallel`: `--parallel-connections`, else QEMU's default 2.
    pub fn multifd_channels(&self) -> Option<u8> {
        self.parallel.then(|| {
            self.parallel_connections
                .and_then(|n| u8::try_from(n).ok())
                .unwrap_or(2)
        })
    }

    /// Refuses options that need something not built yet, naming the missing feature.
    pub fn check_supported(&self) -> Result<()> {
        // `--parallel` with `--postcopy` is built (multifd carries pre-copy, decision 245).
        self.check_postcopy()?;
        self.check_resume()?;
        self.check_parallel()?;
        self.multifd_compression()?;
        if self.offline && !self.persistent {
            return Err(Error::InvalidArg(
                "--offline needs --persistent (an offline migration only copies the definition)"
                    .into(),
            ));
        }
        if self.tunnelled && self.tls {
            return Err(Error::InvalidArg(
                "--tls and --tunnelled are mutually exclusive: a tunnelled stream goes through the daemons' connection, not between the VMMs".into(),
            ));
        }
        if self.tunnelled && !self.p2p {
            return Err(Error::InvalidArg(
                "--tunnelled needs --p2p (the source daemon carries the stream to its peer)".into(),
            ));
        }
        if self.offline && self.live {
            return Err(Error::InvalidArg(
                "--offline and --live are mutually exclusive".into(),
            ));
        }
        Ok(())
    }
}

/// The destination cookie's `uri` of a tunnelled migration: the stream goes to the peer daemon
/// over a [`crate::protocol::Call::MigrateTunnel`] connection, not to a VMM port.
pub const TUNNEL_URI: &str = "tunnel:";

/// A cookie (libvirt's migration cookie): what one side's VMM supports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationCookie {
    /// The sender's hostname (for messages).
    pub host: String,
    /// The driver (`tern` / `qemu`).
    pub driver: String,
    /// Migration capabilities the VMM supports (QEMU names).
    pub capabilities: Vec<String>,
    /// Destination only: where the source's VMM sends the stream (`tcp:HOST:PORT`), or
    /// [`TUNNEL_URI`] for a tunnelled migration.
    pub uri: Option<String>,
    /// Destination only: its VMM runs the guest by itself after the stream (no `-S` wait for
    /// Finish): the VMM's return-path verdict decides (Tern). See `docs/management.md` §5.
    #[serde(default)]
    pub autostart: bool,
}

impl MigrationCookie {
    pub fn supports(&self, cap: &str) -> bool {
        self.capabilities.iter().any(|c| c == cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_follows_libvirts_rules_for_the_methods_tern_has() {
        let opts = |parallel: bool,
                    compressed: bool,
                    methods: Option<&str>,
                    zlib: Option<u8>,
                    zstd: Option<u8>| MigrateOptions {
            live: true,
            p2p: true,
            parallel,
            compressed,
            comp_methods: methods.map(str::to_owned),
            comp_zlib_level: zlib,
            comp_zstd_level: zstd,
            ..Default::default()
        };
        let ok = opts(true, true, Some("zstd"), None, Some(5));
        assert!(ok.check_supported().is_ok());
        assert_eq!(
            ok.multifd_compression().expect("ok"),
            Some(("zstd", Some(("multifd-zstd-level", 5))))
        );
        let ok = opts(true, false, Some("zlib"), Some(9), None);
        assert_eq!(
            ok.multifd_compression().expect("ok"),
            Some(("zlib", Some(("multifd-zlib-level", 9))))
        );
        assert_eq!(
            opts(true, false, Some("zlib"), None, None)
                .multifd_compression()
                .expect("ok"),
            Some(("zlib", None))
        );
        assert_eq!(
            opts(true, false, None, None, None)
                .multifd_compression()
                .expect("ok"),
            None
        );
        for (o, text) in [
            (opts(false, true, None, None, None), "means xbzrle"),
            (opts(true, true, None, None, None), "means xbzrle"),
            (
                opts(true, true, Some("xbzrle"), None, None),
                "xbzrle in the Tern engine",
            ),
            (
                opts(true, true, Some("mt"), None, None),
                "removed in QEMU 9.1",
            ),
            (
                opts(false, true, Some("zstd"), None, None),
                "only supported with parallel",
            ),
            (
                opts(true, true, Some("zstd,zlib"), None, None),
                "only one compression method",
            ),
            (
                opts(true, true, Some("zstd,zstd"), None, None),
                "specified twice",
            ),
            (
                opts(true, true, Some("lz4"), None, None),
                "unknown compression method 'lz4'",
            ),
            (
                opts(true, true, Some("zstd"), Some(1), None),
                "turn zlib compression on",
            ),
            (
                opts(true, true, Some("zlib"), None, Some(1)),
                "turn zstd compression on",
            ),
            (
                opts(true, true, Some("zlib"), Some(10), None),
                "between 0 and 9",
            ),
            (
                opts(true, true, Some("zstd"), None, Some(21)),
                "between 0 and 20",
            ),
        ] {
            let e = o.check_supported().expect_err(text).to_string();
            assert!(e.contains(text), "{text}: {e}");
        }
    }

    #[test]
    fn parallel_options_are_checked() {
        // `--parallel` with `--postcopy` is built (decision 245).
        let o = MigrateOptions {
            parallel: true,
            postcopy: true,
            live: true,
            p2p: true,
            ..Default::default()
        };
        assert!(o.check_supported().is_ok());
        let o = MigrateOptions {
            live: true,
            p2p: true,
            parallel: true,
            parallel_connections: Some(4),
            ..Default::default()
        };
        assert!(o.check_supported().is_ok());
        assert_eq!(o.multifd_channels(), Some(4));
        for (parallel, conns, tunnelled, text) in [
            (false, Some(4), false, "only be used with --parallel"),
            (true, Some(0), false, "between 1 and 255"),
            (true, Some(256), false, "between 1 and 255"),
            (true, None, true, "--tunnelled"),
        ] {
            let o = MigrateOptions {
                live: true,
                p2p: true,
                parallel,
                parallel_connections: conns,
                tunnelled,
                ..Default::default()
            };
            let e = o.check_supported().expect_err(text).to_string();
            assert!(e.contains(text), "{e}");
        }
        let o = MigrateOptions {
            parallel: true,
            ..Default::default()
        };
        assert_eq!(o.multifd_channels(), Some(2), "QEMU's default");
        let o = MigrateOptions {
            tls: true,
            tunnelled: true,
            p2p: true,
            ..Default::default()
        };
        assert!(o
            .check_supported()
            .expect_err("tls + tunnelled")
            .to_string()
            .contains("mutually exclusive"));
        assert!(MigrateOptions {
            live: true,
            p2p: true,
            ..Default::default()
        }
        .check_supported()
        .is_ok());
        let pc = MigrateOptions {
            live: true,
            p2p: true,
            postcopy: true,
            ..Default::default()
        };
        assert!(pc.check_supported().is_ok());
        let e = MigrateOptions {
            tunnelled: true,
            ..pc.clone()
        }
        .check_supported()
        .expect_err("tunnelled + postcopy")
        .to_string();
        assert!(e.contains("not supported with tunnelled migration"), "{e}");
        for o in [
            MigrateOptions {
                live: false,
                ..pc.clone()
            },
            MigrateOptions {
                suspend: true,
                ..pc.clone()
            },
        ] {
            let e = o.check_supported().expect_err("non-live").to_string();
            assert!(e.contains("non-live or paused"), "{e}");
        }
        let e = MigrateOptions {
            postcopy_after_precopy: true,
            live: true,
            ..Default::default()
        }
        .check_supported()
        .expect_err("after-precopy alone")
        .to_string();
        assert!(e.contains("only be used with --postcopy"), "{e}");
        // --postcopy-resume: post-copy required, pre-copy's options refused.
        let e = MigrateOptions {
            postcopy_resume: true,
            live: true,
            ..Default::default()
        }
        .check_supported()
        .expect_err("resume without postcopy")
        .to_string();
        assert!(e.contains("requires post-copy to be enabled"), "{e}");
        let resume = MigrateOptions {
            postcopy_resume: true,
            ..pc.clone()
        };
        assert!(resume.check_supported().is_ok());
        for o in [
            MigrateOptions {
                postcopy_after_precopy: true,
                ..resume.clone()
            },
            MigrateOptions {
                auto_converge: true,
                ..resume.clone()
            },
        ] {
            let e = o
                .check_supported()
                .expect_err("pre-copy option")
                .to_string();
            assert!(e.contains("--postcopy-resume cannot be used with"), "{e}");
        }
        // Supported since the engine honours avail-switchover-bandwidth.
        assert!(MigrateOptions {
            live: true,
            available_switchover_bandwidth: Some(1024),
            ..Default::default()
        }
        .check_supported()
        .is_ok());
    }
}
