//! Creditvisor device drivers: 16550 UART, PCI, NVMe. Hardware access sits behind small traits so the
//! queue and protocol logic is tested on the host against fake devices.
#![no_std]

extern crate alloc;

pub mod nvme;
pub mod pci;
pub mod uart16550;
