//! An i8042 keyboard controller, only as much as a reset needs: the status port answers "input
//! buffer empty, self-test passed", command `0xfe` (pulse the reset line) and a write of the
//! output port (command `0xd1`, then a data byte) with bit 0 clear request a system reset. Every
//! other command and data byte is accepted and ignored; data reads return 0. No keyboard, no
//! interrupts.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Status (read) and command (write) port.
pub const COMMAND_PORT: u16 = 0x64;
/// Command: pulse the CPU reset line.
pub const CMD_RESET: u8 = 0xfe;
/// Command: the next data byte is written to the output port (bit 0 = reset line, active low).
pub const CMD_WRITE_OUTPUT: u8 = 0xd1;
/// Status: system flag (self-test passed); input and output buffers empty.
const STATUS: u8 = 0x04;

/// What a write asks of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum I8042Action {
    /// Nothing.
    None,
    /// Reset the system.
    Reset,
}

/// The controller's state (migrated as the `i8042` component).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// A command waiting for its data byte.
    pub pending_command: Option<u8>,
}

/// The controller.
#[derive(Debug, Default)]
pub struct I8042 {
    state: Mutex<I8042State>,
}

impl I8042 {
    fn lock(&self) -> std::sync::MutexGuard<'_, I8042State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A read of `port`.
    pub fn read(&self, port: u16) -> u8 {
        if port == COMMAND_PORT {
            STATUS
        } else {
            0
        }
    }

    /// A write of `value` to `port`.
    pub fn write(&self, port: u16, value: u8) -> I8042Action {
        let mut s = self.lock();
        match port {
            COMMAND_PORT => {
                s.pending_command = None;
                match value {
                    CMD_RESET => return I8042Action::Reset,
                    // Commands followed by a data byte on port 0x60.
                    0x60 | CMD_WRITE_OUTPUT | 0xd2 | 0xd3 | 0xd4 => s.pending_command = Some(value),
                    _ => {}
                }
                I8042Action::None
            }
            _ => match s.pending_command.take() {
                Some(CMD_WRITE_OUTPUT) if value & 1 == 0 => I8042Action::Reset,
                _ => I8042Action::None,
            },
        }
    }

    /// The state.
    pub fn state(&self) -> I8042State {
        *self.lock()
    }

    /// Replaces the state.
    pub fn set_state(&self, s: &I8042State) {
        *self.lock() = *s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_commands_and_status() {
        let k = I8042::default();
        assert_eq!(k.read(COMMAND_PORT) & 0x3, 0, "buffers empty");
        assert_eq!(k.write(COMMAND_PORT, 0xaa), I8042Action::None);
        assert_eq!(k.write(COMMAND_PORT, CMD_RESET), I8042Action::Reset);
        assert_eq!(k.write(COMMAND_PORT, CMD_WRITE_OUTPUT), I8042Action::None);
        assert_eq!(k.state().pending_command, Some(CMD_WRITE_OUTPUT));
        assert_eq!(
            k.write(DATA_PORT, 0x01),
            I8042Action::None,
            "reset line high"
        );
        k.write(COMMAND_PORT, CMD_WRITE_OUTPUT);
        assert_eq!(k.write(DATA_PORT, 0xfe), I8042Action::Reset);
        assert_eq!(
            k.write(DATA_PORT, 0x00),
            I8042Action::None,
            "no command pending"
        );
    }
}
