//! The destination's end of a pre-copy stream: the loaders' setup, and restoring every
//! component then running the guest (split out of `dest.rs`).

use super::*;

impl Receiver {
    /// Counts the loaders needing an ACK and calls every `load_setup`.
    pub(super) fn setup_loaders(&mut self) -> Result<(), DestError> {
        let needed = if self.opts.switchover_ack {
            self.m
                .loaders
                .iter()
                .filter(|l| l.switchover_ack_needed())
                .count()
        } else {
            0
        };
        let ack = Arc::new(AckState {
            inner: Mutex::new(AckInner {
                enabled: self.opts.switchover_ack,
                needed,
                approved: 0,
                rp_open: false,
                sent: false,
            }),
            rp: self.rp.clone(),
            stats: self.stats.clone(),
        });
        self.stats.set_switchover_ack(SwitchoverAckStats {
            enabled: self.opts.switchover_ack,
            ..Default::default()
        });
        self.ack = Some(ack.clone());
        for l in &mut self.m.loaders {
            let a = ack.clone();
            let approval = SwitchoverApproval::new(move || a.approve());
            l.load_setup(approval).map_err(|source| DestError::Loader {
                id: l.id().to_owned(),
                instance: l.instance(),
                op: "load_setup",
                source,
            })?;
        }
        Ok(())
    }

    /// After a verified END: final device states, components, resume, tell the source.
    pub(super) fn finish(&mut self, finals: Vec<ComponentState>) -> Result<(), DestError> {
        if let Some(d) = self.digest.verify(&self.m.ram.blocks())? {
            self.stats.set_ram_digest(d);
        }
        self.restore_and_run(finals)?;
        if let Err(e) = send_rp(&self.rp, &RpMessage::Shut { error: false }) {
            tracing::warn!(error = %e, "cannot send SHUT");
        }
        Ok(())
    }

    /// Final device states, components, resume (`RESUMED`): END in pre-copy, `POSTCOPY_RUN`
    /// in post-copy.
    pub(super) fn restore_and_run(&mut self, finals: Vec<ComponentState>) -> Result<(), DestError> {
        let mut components = Vec::with_capacity(finals.len());
        let mut loaded = vec![false; self.m.loaders.len()];
        for c in finals {
            match self
                .m
                .loaders
                .iter_mut()
                .position(|l| l.id() == c.id && l.instance() == c.instance)
            {
                Some(i) => {
                    if loaded[i] {
                        return Err(DestError::Protocol(format!(
                            "two final states for device '{}' instance {}",
                            c.id, c.instance
                        )));
                    }
                    loaded[i] = true;
                    self.m.loaders[i]
                        .load_complete(c.version, &c.data)
                        .map_err(|source| DestError::Loader {
                            id: c.id.clone(),
                            instance: c.instance,
                            op: "load_complete",
                            source,
                        })?;
                }
                None => components.push(c),
            }
        }
        if let Some(i) = loaded.iter().position(|l| !l) {
            let l = &self.m.loaders[i];
            return Err(DestError::Protocol(format!(
                "no final state for device '{}' instance {}",
                l.id(),
                l.instance()
            )));
        }
        self.m
            .state
            .restore_components(components)
            .map_err(|source| DestError::Machine {
                op: "restoring the machine state".into(),
                source,
            })?;
        // The point of no return: a `migrate_cancel` before it fails the migration, after it
        // is refused; `stop` / `cont` during the load decided autostart.
        let autostart = {
            let _st = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
            if self.shared.cancel.load(Ordering::SeqCst) {
                return Err(DestError::Cancelled);
            }
            self.shared.committed.store(true, Ordering::SeqCst);
            self.shared.autostart.load(Ordering::SeqCst)
        };
        // Resume unless told to stay paused (`-S`, `stop` during inmigrate) or the guest was
        // paused on the source (QEMU keeps the source's run state).
        if autostart && self.source_running != Some(false) {
            self.m.vcpus.resume().map_err(|source| DestError::Machine {
                op: "resuming the vCPUs".into(),
                source,
            })?;
            self.events.vm_resumed();
            // The source's downtime ends when this arrives; a lost message is not our failure.
            if let Err(e) = send_rp(&self.rp, &RpMessage::Resumed) {
                tracing::warn!(error = %e, "cannot send RESUMED");
            }
        }
        Ok(())
    }
}
