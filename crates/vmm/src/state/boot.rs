//! The `boot` component: what kind of image the machine booted (`boot::source`), so a
//! destination resets into the same guest, or refuses to (docs/machine.md "Reset and power").

use std::sync::Mutex;

use super::Persist;
use crate::boot::source::{adopt, BootKind, BootSource};
use crate::error::Result;

/// The machine's boot source as a component.
pub struct BootComponent<'a>(pub &'a Mutex<Option<BootSource>>);

impl Persist for BootComponent<'_> {
    const ID: &'static str = "boot";
    const VERSION: u32 = 1;
    type State = BootKind;

    fn save(&self) -> Result<BootKind> {
        Ok(self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(BootKind::Custom, BootSource::kind))
    }

    fn restore(&mut self, state: &BootKind) -> Result<()> {
        let mut here = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let adopted = adopt(here.take(), state);
        if adopted.is_none() {
            tracing::info!(
                "the source booted {state:?}, which this machine was not given: system_reset will be refused"
            );
        }
        *here = adopted;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::test_util::round_trip;

    #[test]
    fn boot_round_trip() {
        let a = Mutex::new(Some(BootSource::Builtin));
        let b = Mutex::new(None);
        let (first, _) = round_trip(&BootComponent(&a), &mut BootComponent(&b), |_| {});
        assert_eq!(first, BootKind::Builtin);
        assert!(matches!(*b.lock().unwrap(), Some(BootSource::Builtin)));
    }
}
