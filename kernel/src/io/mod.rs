//! Kernel-side I/O: PCI configuration access and the NVMe controller glue for the drivers in `drivers`.
//!
//! `pci` chooses ECAM (ACPI MCFG) or port I/O and hands the generic enumeration code in `drivers::pci` a
//! `ConfigSpace`; `nvme` implements the NVMe driver's hardware traits and brings the first controller up on
//! first use; `selftest` is `selftest=nvme`. Policy (which request goes next) stays in `sched::iops`.

pub mod nvme;
pub mod pci;
pub mod selftest;
