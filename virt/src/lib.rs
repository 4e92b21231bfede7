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
//! The dependency points one way: the kernel implements [`Vcpu`] and calls into this crate; this crate never sees
//! a VMCS, a VMCB or a host physical address.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod exit;
pub mod paging;
pub mod vcpu;

pub use exit::{AccessSize, EntryFailure, IoAccess, IoDirection, MemAccess, VmExit};
pub use vcpu::{Gpr, Vcpu};
