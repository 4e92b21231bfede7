//! The AMD-V (SVM) backend: runs a guest vCPU with nested paging and decodes its exits into `virt::VmExit`.
//!
//! Source throughout: AMD64 Architecture Programmer's Manual Vol. 2, chapter 15 "Secure Virtual Machine" and
//! Appendices B (VMCB layout) and C (exit codes).
//!
//! Layout:
//! - [`vmcb`]: the typed VMCB (offset enums per width, intercept bits, exit codes, EVENTINJ format);
//! - [`host`]: per-CPU enabling (EFER.SVME, VM_HSAVE_PA, the host VMSAVE page) and per-CPU ASID generations;
//! - [`permission`]: the shared all-ports IOPM and per-VM MSR permission maps;
//! - [`npt`]: one VM's nested page tables (the shared `virt::paging` builder with the NPT entry format);
//! - [`entry`]: the world-switch routine (VMSAVE host / VMLOAD guest / VMRUN / VMSAVE guest / VMLOAD host, GPRs and
//!   SSE state swapped around it);
//! - [`vcpu`]: [`SvmVm`] and [`SvmVcpu`] (implements `virt::Vcpu`: run with LAPIC-timer preemption, exit decode,
//!   RIP advance, event injection, TSC offset);
//! - [`check`]: readable reports for `VMEXIT_INVALID` (the consistency rules of APM §15.5.1);
//! - [`dump`]: the VMCB fields and last-VMRUN record a triple-fault stop dump shows;
//! - [`selftest`]: the `svm` self-test, a hand-built guest that exercises every exit the backend decodes.
//!
//! How the runtime uses it: build the guest memory in an [`NptMap`], create one [`SvmVm`] per VM from its
//! nCR3 and the MSR allow list ([`backend_msr_allow_list`]), one [`SvmVcpu`] per vCPU from a
//! `virt::entry::EntryState`, then
//! loop `Vcpu::run(deadline_tsc)` on whichever CPU the scheduler picks. SVM is enabled on a CPU the first time a
//! vCPU runs there. Keep the NPT alive as long as the `SvmVm`; call [`SvmVcpu::flush_tlb`] on every vCPU after
//! removing or downgrading an NPT mapping.
//!
//! Known limits: without NRIPS (QEMU TCG) the RIP advance uses the unprefixed instruction lengths; debug registers
//! DR0-3 and the guest's XSAVE state beyond SSE are not switched (XSETBV is intercepted, so a guest cannot enable
//! AVX state). Emulators: Bochs 2.7 cannot preempt a guest that runs with IF = 0 from entry on (see [`vcpu`]) and
//! stops itself on a guest triple fault instead of taking the SHUTDOWN intercept; QEMU TCG has neither problem.

pub mod check;
pub mod dump;
pub mod entry;
pub mod host;
pub mod npt;
pub mod permission;
pub mod selftest;
pub mod vcpu;
pub mod vmcb;

pub use npt::NptMap;
pub use vcpu::{backend_msr_allow_list, SvmError, SvmVcpu, SvmVm};
