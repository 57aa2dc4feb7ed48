//! aarch64 register state in plain structs, independent of any backend's bindings.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    /// x0..x30.
    pub x: [u64; 31],
    pub sp_el1: u64,
    pub pc: u64,
    pub pstate: u64,
}

/// PSTATE for entering a kernel: EL1h with D, A, I and F masked.
pub const PSTATE_EL1H_MASKED: u64 = 0x3c5;
