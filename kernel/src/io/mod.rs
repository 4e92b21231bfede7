//! Kernel-side I/O: PCI configuration access and the NVMe controller glue for the drivers in `drivers`.
//!
//! `pci` chooses ECAM (ACPI MCFG) or port I/O and hands the generic enumeration code in `drivers::pci` a
//! `ConfigSpace`; `nvme` implements the NVMe driver's hardware traits and brings the first controller up on
//! first use; `volumes` puts volumes (LBA ranges with IOPS commitments) on a controller queue through the
//! `sched::iops` partitioner, which alone decides the order; `selftest` is `selftest=nvme`, `iops_test` is
//! `selftest=nvme-iops` and `faults_test` is `selftest=nvme-faults`; `virtio_blk` connects `virt`'s virtio-blk device
//! model to the engine (bounce buffers, completion back into the guest) and `virtio_test` is `selftest=virtio-blk`;
//! `service` is the VM runtime's I/O path: one engine for the controller, the VMs' volumes and devices, completion
//! pumping, and the management API (`set_commitment`, `volume_stats`); `server` is the I/O server, the real-time
//! server (admitted by the CPU scheduler) in whose slices, and in idle time, the run loops serve that path.

pub mod faults_test;
pub mod iops_test;
pub mod nvme;
pub mod pci;
pub mod selftest;
pub mod server;
pub mod service;
pub mod virtio_blk;
pub mod virtio_test;
pub mod volumes;
