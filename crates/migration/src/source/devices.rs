//! The devices beside RAM on the source: their pending data and, with the VM stopped, their
//! drained pre-copy data and final states. Split out of `flow.rs`.

use super::*;

impl Sender {
    /// Drains the devices' pre-copy data, then writes their final states.
    pub(super) fn save_devices(&mut self) -> Result<(), SourceError> {
        for i in 0..self.m.devices.len() {
            let dev = &mut self.m.devices[i];
            let (id, inst, ver) = (dev.id().to_owned(), dev.instance(), dev.version());
            let err = |op, source| SourceError::Device {
                id: id.clone(),
                instance: inst,
                op,
                source,
            };
            if dev.is_iterative() {
                // With the VM stopped the device is frozen: it can only have what it reported
                // pending. A device that keeps producing (not frozen with the vCPUs) would
                // otherwise keep the VM stopped forever.
                let limit = dev
                    .pending_exact()
                    .map_err(|e| err("pending_exact", e))?
                    .saturating_add(DEVICE_CHUNK as u64);
                let mut drained = 0u64;
                loop {
                    self.chunk.clear();
                    dev.save_iterate(DEVICE_CHUNK, &mut self.chunk)
                        .map_err(|e| err("save_iterate", e))?;
                    if self.chunk.is_empty() {
                        break;
                    }
                    drained += self.chunk.len() as u64;
                    if drained > limit {
                        return Err(err(
                            "save_iterate",
                            MachineError::Failed(format!(
                                "the device produced more than the {limit} bytes it reported pending while the VM was stopped"
                            )),
                        ));
                    }
                    let chunk = std::mem::take(&mut self.chunk);
                    let w = self.writer.as_mut().ok_or(SourceError::Cancelled)?;
                    let r = w.write_device_chunk(&id, inst, ver, &chunk);
                    self.chunk = chunk;
                    r?;
                }
            }
            let dev = &mut self.m.devices[i];
            let data = dev.save_complete().map_err(|e| err("save_complete", e))?;
            self.writer()?.write_section(&id, inst, ver, &data)?;
        }
        Ok(())
    }

    /// Sum of the devices' pending bytes (estimate or exact).
    pub(super) fn devices_pending(&mut self, exact: bool) -> Result<u64, SourceError> {
        let mut sum = 0u64;
        for dev in self.m.devices.iter_mut().filter(|d| d.is_iterative()) {
            sum += if exact {
                dev.pending_exact().map_err(|source| SourceError::Device {
                    id: dev.id().to_owned(),
                    instance: dev.instance(),
                    op: "pending_exact",
                    source,
                })?
            } else {
                dev.pending_estimate()
            };
        }
        Ok(sum)
    }
}
