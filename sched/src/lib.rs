//! Creditvisor scheduling policy: pure `no_std` code with no clock reads and no hardware access.
//! Time is always passed in, so every policy here is tested on the host with a virtual clock.
#![no_std]
#![forbid(unsafe_code)]
