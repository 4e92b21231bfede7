//! Per-CPU SVM state: EFER.SVME, the host save area (VM_HSAVE_PA), the host's VMSAVE page, and ASIDs.
//!
//! Sources: AMD APM Vol. 2 §15.4 (enabling SVM: EFER.SVME, VM_CR.SVMDIS), §15.30.4 (VM_HSAVE_PA MSR
//! C001_0117h), §15.5.2 and §15.6 (what VMRUN saves, what VMSAVE/VMLOAD move), §15.16 (ASIDs and TLB_CONTROL).
//!
//! Design: each CPU enables SVM lazily, the first time a vCPU runs on it ([`this_cpu`]), so the backend needs no
//! hook in the CPU bring-up path and works on every CPU the runtime uses. The state lives in a fixed array indexed
//! by logical CPU id; only the owning CPU touches its slot (with interrupts and GIF off around VMRUN), so the lock
//! is never contended and is a leaf.
//!
//! ASIDs are handed out per CPU and per vCPU, with generations (the scheme KVM uses), not one per VM: two vCPUs of
//! one VM run different guest page tables, and VMRUN does not flush guest-virtual translations when it loads a
//! different guest CR3, so sharing an ASID between them would let one see the other's stale TLB entries. A CPU
//! gives each ASID (1 ..= max) out at most once per generation, so a freshly assigned ASID holds no translations
//! on that CPU. When the ASIDs run out the CPU starts a new generation and the next VMRUN flushes its whole TLB
//! (TLB_CONTROL = 1, the one encoding every SVM CPU has). A vCPU whose (CPU, generation) record is stale, or that
//! asked for a flush (e.g. after its nested page tables changed), simply gets a fresh ASID.
//!
//! Invariant: once `enabled`, the CPU keeps EFER.SVME set and its HSAVE page for the life of the kernel.

use super::entry::FpuHolder;
use spin::Mutex;

use crate::arch::x86_64::{cpu, percpu};
use crate::mm::frame;

/// VM_HSAVE_PA (APM Vol. 2 §15.30.4).
const VM_HSAVE_PA: u32 = 0xC001_0117;
/// EFER.SVME (APM Vol. 2 §15.4).
const EFER_SVME: u64 = 1 << 12;
/// CR4.OSFXSR: FXSAVE/FXRSTOR include the XMM registers (the guest's SSE state is switched with them).
const CR4_OSFXSR: u64 = 1 << 9;

/// Why SVM could not be enabled on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostError {
    /// CPUID says no SVM, or the firmware disabled it (VM_CR.SVMDIS).
    Unsupported,
    /// No frame for the host save areas.
    OutOfFrames,
    /// The logical CPU id is beyond the backend's table.
    TooManyCpus,
}

/// One CPU's SVM state.
#[derive(Debug)]
pub struct CpuSvm {
    /// Logical CPU id.
    pub cpu: u32,
    /// Physical page holding the host state VMRUN saves (VM_HSAVE_PA); owned by the CPU for ever.
    hsave_pa: u64,
    /// Physical page the entry stub VMSAVEs the host's FS/GS/TR/LDTR/syscall MSRs into, and VMLOADs them back.
    pub host_vmsave_pa: u64,
    /// Highest usable ASID (CPUID 0x8000000A EBX - 1; ASID 0 is the host's).
    max_asid: u32,
    /// Next ASID to hand out in this generation.
    next_asid: u32,
    /// Current generation (starts at 1; 0 is never current, so a zeroed record is stale).
    generation: u64,
    /// The next VMRUN on this CPU must flush the whole TLB.
    flush_pending: bool,
    /// Whose x87/SSE state the registers hold (lazy restore, [`FpuHolder`]).
    pub fpu: FpuHolder,
}

/// A vCPU's ASID on one CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AsidRecord {
    pub cpu: u32,
    pub generation: u64,
    pub asid: u32,
}

/// What VMRUN must use on this CPU for this vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsidGrant {
    pub asid: u32,
    /// TLB_CONTROL value for this VMRUN (0 or 1).
    pub tlb_control: u8,
}

impl CpuSvm {
    /// ASID for the vCPU holding `record` (updated in place). `fresh` forces a new ASID (a TLB flush request).
    pub fn asid_for(&mut self, record: &mut AsidRecord, fresh: bool) -> AsidGrant {
        let current =
            record.cpu == self.cpu && record.generation == self.generation && record.asid != 0;
        if !current || fresh {
            if self.next_asid > self.max_asid {
                self.generation += 1;
                self.next_asid = 1;
                self.flush_pending = true;
            }
            *record = AsidRecord {
                cpu: self.cpu,
                generation: self.generation,
                asid: self.next_asid,
            };
            self.next_asid += 1;
        }
        let tlb_control = u8::from(core::mem::take(&mut self.flush_pending));
        AsidGrant {
            asid: record.asid,
            tlb_control,
        }
    }

    /// ASIDs this CPU hands out per generation.
    pub fn asids(&self) -> u32 {
        self.max_asid
    }

    /// Physical address of this CPU's VM_HSAVE_PA page.
    pub fn hsave_pa(&self) -> u64 {
        self.hsave_pa
    }
}

static CPUS: [Mutex<Option<CpuSvm>>; percpu::MAX_CPUS] =
    [const { Mutex::new(None) }; percpu::MAX_CPUS];

/// Number of ASIDs the CPU reports (CPUID 0x8000000A EBX), or None without SVM.
fn svm_asids() -> Option<u32> {
    if cpu::max_extended_leaf() < 0x8000_000A || cpu::cpuid(0x8000_0001, 0).ecx & (1 << 2) == 0 {
        return None;
    }
    // SAFETY: CPUID says SVM exists, so VM_CR (C001_0114h) exists.
    let vm_cr = unsafe { cpu::rdmsr(0xC001_0114) };
    if vm_cr & (1 << 4) != 0 {
        return None;
    }
    Some(cpu::cpuid(0x8000_000A, 0).ebx)
}

fn enable(id: u32) -> Result<CpuSvm, HostError> {
    let asids = svm_asids().ok_or(HostError::Unsupported)?;
    if asids < 2 {
        return Err(HostError::Unsupported);
    }
    let hsave_pa = frame::alloc_zeroed_below(u64::MAX).ok_or(HostError::OutOfFrames)?;
    let Some(host_vmsave_pa) = frame::alloc_zeroed_below(u64::MAX) else {
        // SAFETY: allocated just above and not yet published anywhere.
        unsafe { frame::free(hsave_pa) };
        return Err(HostError::OutOfFrames);
    };
    // SAFETY: SVM is supported and not disabled (checked above), so setting EFER.SVME is permitted; the HSAVE page
    // is a fresh 4 KiB-aligned frame owned by this CPU for ever. Setting CR4.OSFXSR only widens what FXSAVE/FXRSTOR
    // transfer; the kernel itself never uses SSE.
    unsafe {
        let efer = cpu::rdmsr(cpu::IA32_EFER);
        cpu::wrmsr(cpu::IA32_EFER, efer | EFER_SVME);
        cpu::wrmsr(VM_HSAVE_PA, hsave_pa);
        let cr4: u64;
        core::arch::asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack, preserves_flags));
        if cr4 & CR4_OSFXSR == 0 {
            core::arch::asm!("mov cr4, {}", in(reg) cr4 | CR4_OSFXSR, options(nostack, preserves_flags));
        }
    }
    Ok(CpuSvm {
        cpu: id,
        hsave_pa,
        host_vmsave_pa,
        max_asid: asids - 1,
        next_asid: 1,
        generation: 1,
        flush_pending: true,
        fpu: FpuHolder::new(),
    })
}

/// x87/SSE restores and skipped restores of all CPUs' VMRUNs so far ([`FpuHolder`]), for the end-of-run summary.
pub fn fpu_restores() -> (u64, u64) {
    CPUS.iter()
        .filter_map(|slot| slot.lock().as_ref().map(|c| (c.fpu.restores, c.fpu.skips)))
        .fold((0, 0), |(r, s), (cr, cs)| (r + cr, s + cs))
}

/// Runs `f` with this CPU's SVM state, enabling SVM on the CPU first if needed. Call with interrupts disabled (the
/// caller must not migrate between reading the CPU id and using the state).
///
/// # Errors
/// SVM unsupported or disabled, or no memory for the save areas.
pub fn this_cpu<R>(f: impl FnOnce(&mut CpuSvm) -> R) -> Result<R, HostError> {
    let id = percpu::current_id();
    let slot = CPUS
        .get(usize::try_from(id).map_err(|_| HostError::TooManyCpus)?)
        .ok_or(HostError::TooManyCpus)?;
    let mut guard = slot.lock();
    if guard.is_none() {
        *guard = Some(enable(id)?);
    }
    match guard.as_mut() {
        Some(state) => Ok(f(state)),
        None => Err(HostError::Unsupported),
    }
}
