//! Entering VMX operation on a CPU (SDM Vol. 3C §24.7-24.8): IA32_FEATURE_CONTROL, CR0/CR4 fixed bits, the
//! VMXON region, VMXON.
//!
//! Design: [`enable`] is idempotent per logical CPU and is called on the CPU that will run guests (the VM runtime
//! calls it from each CPU's run loop before creating or running vCPUs there; the self-test calls it directly). The
//! VMXON region of CPU `n` is recorded in `VMXON_REGION[n]`; a CPU stays in VMX operation until reset (nothing here
//! executes VMXOFF, so a region is never freed).
//!
//! Invariant: `VMXON_REGION[n] != 0` exactly when CPU `n` executed VMXON successfully, and only CPU `n` writes it.

use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::registers::control::{Cr0, Cr0Flags, Cr4, Cr4Flags};

use super::caps::Caps;
use super::instr;
use super::VmxError;
use crate::arch::x86_64::{cpu, paging, percpu};
use crate::mm::frame;

const FEATURE_CONTROL_LOCK: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;

static VMXON_REGION: [AtomicU64; percpu::MAX_CPUS] =
    [const { AtomicU64::new(0) }; percpu::MAX_CPUS];

/// Whether this CPU has VMX (CPUID.1:ECX[5]).
pub fn has_vmx() -> bool {
    cpu::cpuid(1, 0).ecx & (1 << 5) != 0
}

/// This CPU's logical id as an index.
pub fn cpu_index() -> usize {
    usize::try_from(percpu::current_id()).unwrap_or(usize::MAX)
}

/// Whether this CPU is in VMX operation.
pub fn enabled() -> bool {
    VMXON_REGION
        .get(cpu_index())
        .is_some_and(|r| r.load(Ordering::Acquire) != 0)
}

/// Puts this CPU in VMX operation (once) and returns its capabilities.
///
/// # Errors
/// No VMX, VMX locked off by firmware, a CPU index beyond the per-CPU table, no frame for the VMXON region, or
/// VMXON failing.
pub fn enable() -> Result<Caps, VmxError> {
    if !has_vmx() {
        return Err(VmxError::NotSupported);
    }
    let slot = VMXON_REGION.get(cpu_index()).ok_or(VmxError::CpuIndex)?;
    // SAFETY: CPUID reported VMX, so the capability MSRs exist.
    let caps = unsafe { Caps::read() };
    if slot.load(Ordering::Acquire) != 0 {
        return Ok(caps);
    }
    // SAFETY: IA32_FEATURE_CONTROL exists on VMX-capable CPUs. If firmware left it unlocked we enable VMX outside
    // SMX and lock it, as firmware would; that changes no memory the compiler knows about.
    unsafe {
        let fc = cpu::rdmsr(cpu::IA32_FEATURE_CONTROL);
        if fc & FEATURE_CONTROL_LOCK == 0 {
            cpu::wrmsr(
                cpu::IA32_FEATURE_CONTROL,
                fc | FEATURE_CONTROL_LOCK | FEATURE_CONTROL_VMX_OUTSIDE_SMX,
            );
        } else if fc & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
            return Err(VmxError::DisabledByFirmware);
        }
    }
    // CR0/CR4 must satisfy the fixed bits in VMX operation (SDM §24.8): in practice CR0.NE and CR4.VMXE. CR4.OSFXSR
    // is set too, so FXSAVE/FXRSTOR (used to keep each guest's SSE state) cover the XMM registers.
    let cr0 = (Cr0::read().bits() | caps.cr0_fixed0) & caps.cr0_fixed1;
    let cr4 = (Cr4::read().bits()
        | caps.cr4_fixed0
        | Cr4Flags::VIRTUAL_MACHINE_EXTENSIONS.bits()
        | Cr4Flags::OSFXSR.bits())
        & caps.cr4_fixed1;
    // SAFETY: the fixed bits only add NE (x87 errors via #MF, which the kernel does not use: it has no x87 code)
    // and never clear PE/PG/WP or paging-related CR4 bits, which are fixed to 1 or left as they were; VMXE and
    // OSFXSR change no memory mapping.
    unsafe {
        Cr0::write(Cr0Flags::from_bits_retain(cr0));
        Cr4::write(Cr4Flags::from_bits_retain(cr4));
    }
    let region = frame::alloc_zeroed_below(u64::MAX).ok_or(VmxError::OutOfMemory)?;
    // SAFETY: the frame was just allocated to us and is mapped by the direct map; the first 4 bytes hold the VMCS
    // revision identifier (SDM §25.11.5).
    unsafe {
        paging::phys_to_virt(region)
            .cast::<u32>()
            .write_volatile(caps.revision)
    };
    // SAFETY: CR0/CR4 satisfy the fixed bits, CR4.VMXE is set, IA32_FEATURE_CONTROL allows VMX outside SMX, and
    // the region is a zeroed frame with the revision id that this CPU keeps for as long as it is in VMX operation.
    match unsafe { instr::vmxon(region) } {
        Ok(()) => {
            slot.store(region, Ordering::Release);
            Ok(caps)
        }
        Err(e) => {
            // SAFETY: VMXON failed, so the region is not in use; it came from the allocator above.
            unsafe { frame::free(region) };
            Err(VmxError::VmxOn(e))
        }
    }
}
