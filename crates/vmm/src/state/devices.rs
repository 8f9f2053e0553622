//! Device components: COM1, the guest-control port and the i8042.

use super::Persist;
use crate::devices::control::{GuestControl, GuestControlState};
use crate::devices::i8042::{I8042State, I8042};
use crate::devices::serial::{SerialDevice, SerialDeviceState};
use crate::error::{Error, Result};

/// COM1 as a component.
pub struct SerialComponent<'a>(pub &'a SerialDevice);

impl Persist for SerialComponent<'_> {
    const ID: &'static str = "serial";
    const VERSION: u32 = 1;
    type State = SerialDeviceState;

    fn save(&self) -> Result<SerialDeviceState> {
        Ok(self.0.state())
    }

    fn restore(&mut self, state: &SerialDeviceState) -> Result<()> {
        self.0.set_state(state)
    }
}

/// The guest-control port as a component.
pub struct ControlComponent<'a>(pub &'a GuestControl);

impl Persist for ControlComponent<'_> {
    const ID: &'static str = "guest-control";
    const VERSION: u32 = 1;
    type State = GuestControlState;

    fn save(&self) -> Result<GuestControlState> {
        Ok(self.0.state())
    }

    fn restore(&mut self, state: &GuestControlState) -> Result<()> {
        self.0
            .set_state(state)
            .map_err(|reason| Error::component(Self::ID, 0, reason))
    }
}

/// The i8042 as a component.
pub struct I8042Component<'a>(pub &'a I8042);

impl Persist for I8042Component<'_> {
    const ID: &'static str = "i8042";
    const VERSION: u32 = 1;
    type State = I8042State;

    fn save(&self) -> Result<I8042State> {
        Ok(self.0.state())
    }

    fn restore(&mut self, state: &I8042State) -> Result<()> {
        self.0.set_state(state);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::control::{EVENT, EVENT_WORKLOAD_RUNNING, HEARTBEAT};
    use crate::devices::serial::SerialTarget;
    use crate::state::test_util::round_trip;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn i8042_round_trip() {
        use crate::devices::i8042::{CMD_WRITE_OUTPUT, COMMAND_PORT, DATA_PORT};
        let (a, b) = (I8042::default(), I8042::default());
        a.write(COMMAND_PORT, CMD_WRITE_OUTPUT);
        let (first, _) = round_trip(&I8042Component(&a), &mut I8042Component(&b), |_| {});
        assert_eq!(first.pending_command, Some(CMD_WRITE_OUTPUT));
        // The restored controller finishes the command the source started.
        assert_eq!(
            b.write(DATA_PORT, 0),
            crate::devices::i8042::I8042Action::Reset
        );
    }

    #[test]
    fn serial_round_trip() {
        let new = || SerialDevice::new(&SerialTarget::None, EventFd::new(0).unwrap()).unwrap();
        let (a, b) = (new(), new());
        a.write(3, 0x80);
        a.write(0, 0x01);
        a.write(3, 0x1b);
        a.write(1, 0x02);
        a.write(7, 0x42);
        let (_, second) = round_trip(&SerialComponent(&a), &mut SerialComponent(&b), |_| {});
        assert_eq!(second.scratch, 0x42);
        assert_eq!(second.line_control, 0x1b);
    }

    #[test]
    fn control_round_trip() {
        let (a, b) = (GuestControl::new(), GuestControl::new());
        a.write(0, HEARTBEAT, &41u32.to_le_bytes());
        a.write(1, HEARTBEAT, &42u32.to_le_bytes());
        a.write(0, EVENT, &EVENT_WORKLOAD_RUNNING.to_le_bytes());
        let (_, second) = round_trip(&ControlComponent(&a), &mut ControlComponent(&b), |_| {});
        assert_eq!(second.heartbeats.count, 2);
        assert_eq!(second.heartbeats.last.map(|h| h.seq), Some(42));
        assert!(second.workload_running);
    }
}
