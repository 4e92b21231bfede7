//! Creditvisor's vendor-neutral virtualisation layer.
//!
//! The kernel has two backends, VMX (`kernel/src/virt/vmx`) and SVM (`kernel/src/virt/svm`), chosen by CPUID at
//! boot. A backend only enters the guest and decodes the hardware's exit information into one [`VmExit`]; everything
//! a guest can ask of the hypervisor — CPUID, MSRs, port I/O, MMIO, HLT, hypercalls — is handled once, here, above
//! the backends, against the [`Vcpu`] trait. That makes the code that parses hostile guest input:
//!
//! - unsafe-free (`#![forbid(unsafe_code)]`): a bug here is a wrong answer to a guest, never a hypervisor fault;
//! - host-tested: a fake backend drives the exit handling in ordinary `cargo test`.
//!
//! The dependency points one way: the kernel implements [`Vcpu`], [`GuestMemory`] and [`ConsoleSink`] and calls
//! into this crate; this crate never sees a VMCS, a VMCB or a host physical address.
//!
//! Modules: [`exit`] and [`vcpu`] (the backend contract), [`handler`] (exit handling, returning an
//! [`ExitAction`]), [`cpuid`], [`msr`], [`uart`] (COM1), [`hypercall`] (ABI vocabulary), [`sink`], [`stats`],
//! [`memory`], [`mmio`] (device windows, guest page walk, instruction decode), [`config`] (the VM configuration
//! format of docs/vm-config.md), [`loader`] (ELF images and the guest ABI's entry state), [`entry`] (the initial
//! register state backends load).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod action;
pub mod config;

pub mod cpuid;
pub mod entry;
pub mod exit;
pub mod handler;
pub mod hypercall;
pub mod loader;
pub mod memory;
pub mod mmio;
pub mod msr;
pub mod paging;
pub mod sink;
pub mod stats;
pub mod uart;
pub mod vcpu;
pub mod virtio;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod handler_tests;

pub use action::{ExitAction, StopCause, StopReport, NO_WAKE};
pub use exit::{AccessSize, EntryFailure, IoAccess, IoDirection, MemAccess, VmExit};
pub use handler::VmContext;
pub use memory::GuestMemory;
pub use mmio::{MmioAccess, MmioKind, MmioWindowError};
pub use sink::{ConsoleSink, Event};
pub use vcpu::{ControlState, Gpr, Vcpu};
