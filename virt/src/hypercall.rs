//! Hypercall numbers, statuses and limits of guest ABI version 2 (docs/guest-abi.md, the authority).
//!
//! The handling itself is in [`crate::handler`]; this module is the ABI's vocabulary, shared with the tests.

/// `VERSION`: RDX = [`ABI_VERSION`].
pub const VERSION: u64 = 0;
/// `LOG`: RDI = guest-physical address, RSI = length (at most [`LOG_MAX`]).
pub const LOG: u64 = 1;
/// `REPORT`: RDI = counter key, RSI = value.
pub const REPORT: u64 = 2;
/// `YIELD`.
pub const YIELD: u64 = 3;
/// `SLEEP_UNTIL`: RDI = guest TSC deadline.
pub const SLEEP_UNTIL: u64 = 4;
/// `EXIT`: RDI = exit code.
pub const EXIT: u64 = 5;

/// The ABI version `VERSION` returns.
pub const ABI_VERSION: u64 = 2;
/// Longest `LOG` message, bytes.
pub const LOG_MAX: u64 = 256;
/// Smallest and largest valid counter key.
pub const KEY_MIN: u64 = 1;
pub const KEY_MAX: u64 = 0xffff;
/// Distinct counter keys a VM may hold; a new key beyond these gets [`INVALID`].
pub const MAX_COUNTERS: usize = 16;

/// Status: success.
pub const OK: i64 = 0;
/// Status: unknown call number.
pub const UNKNOWN: i64 = -1;
/// Status: invalid argument.
pub const INVALID: i64 = -2;
/// Status: a buffer outside guest RAM.
pub const BAD_ADDRESS: i64 = -3;

/// A VM's latest counter values, `REPORT`ed by its guest.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    slots: [(u16, u64); MAX_COUNTERS],
    len: usize,
}

impl Counters {
    /// Stores `value` for `key`. Returns false if `key` is new and the table is full.
    pub fn set(&mut self, key: u16, value: u64) -> bool {
        if let Some(slot) = self.slots[..self.len].iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
            return true;
        }
        if self.len == MAX_COUNTERS {
            return false;
        }
        self.slots[self.len] = (key, value);
        self.len += 1;
        true
    }

    /// The latest value of `key`.
    pub fn get(&self, key: u16) -> Option<u64> {
        self.slots[..self.len]
            .iter()
            .find(|(k, _)| *k == key)
            .map(|&(_, v)| v)
    }

    /// All (key, value) pairs, in the order keys were first reported.
    pub fn iter(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.slots[..self.len].iter().copied()
    }
}
