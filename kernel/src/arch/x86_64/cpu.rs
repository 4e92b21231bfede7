//! Small CPU primitives: CPUID, MSRs, halting. Thin, so the rest of the kernel states intent, not instructions.

use core::arch::x86_64::{__cpuid_count, CpuidResult};

use x86_64::registers::model_specific::Msr;

/// IA32_APIC_BASE.
pub const IA32_APIC_BASE: u32 = 0x1B;
/// IA32_FEATURE_CONTROL.
pub const IA32_FEATURE_CONTROL: u32 = 0x3A;
/// IA32_TSC_DEADLINE.
pub const IA32_TSC_DEADLINE: u32 = 0x6E0;
/// IA32_EFER.
pub const IA32_EFER: u32 = 0xC000_0080;
/// IA32_GS_BASE.
pub const IA32_GS_BASE: u32 = 0xC000_0101;

/// Executes CPUID for `leaf`/`subleaf`.
pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    #[allow(unused_unsafe)]
    // SAFETY: CPUID is available on every x86_64 CPU and has no side effects.
    unsafe {
        __cpuid_count(leaf, subleaf)
    }
}

/// Highest basic CPUID leaf.
pub fn max_basic_leaf() -> u32 {
    cpuid(0, 0).eax
}

/// Highest extended CPUID leaf.
pub fn max_extended_leaf() -> u32 {
    cpuid(0x8000_0000, 0).eax
}

/// Reads an MSR.
///
/// # Safety
/// The MSR must exist on this CPU (else #GP).
pub unsafe fn rdmsr(msr: u32) -> u64 {
    // SAFETY: forwarded to the caller.
    unsafe { Msr::new(msr).read() }
}

/// Writes an MSR.
///
/// # Safety
/// The MSR must exist and the value must be valid and not break memory safety (e.g. EFER, GS base).
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { Msr::new(msr).write(value) }
}

/// Disables interrupts and halts this CPU forever.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Idles this CPU with interrupts enabled (it keeps serving IPIs and timers).
pub fn idle_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::enable_and_hlt();
    }
}
