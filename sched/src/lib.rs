//! Creditvisor scheduling policy: pure code with no clock reads and no hardware access. Time is always
//! passed in, so every policy here is tested on the host with a virtual clock.
//!
//! - [`cpu`]: the hard-real-time rolling-credit vCPU scheduler (EDF baselines + weighted credit bursts).
//! - [`iops`]: the NVMe IOPS partitioner (committed rates, limits, weights, burst buckets; mClock family).
//!
//! The crate is `no_std` (with `alloc`); the `std` feature adds the simulators behind `cargo xtask sim`.
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod cpu;
pub mod iops;
#[cfg(feature = "std")]
pub mod plot_font;
