//! The `tern` binary's library half: the VMM process (`run`), its QMP dispatcher (`control`),
//! the dirty page rate measurement (`dirty_rate`),
//! the glue to the migration engine (`migrate`), and the harness that the main job (`demo`), the
//! integration tests and the benchmarks use to drive `tern run` processes.

pub mod args;
pub mod control;
pub mod demo;
pub mod dirty_rate;
pub mod harness;
pub mod migrate;
pub mod run;
pub mod size;
pub mod tools;
