//! The world switch: `VMLOAD; VMRUN; VMSAVE` with the general-purpose and SSE registers swapped around it.
//!
//! Sources: AMD APM Vol. 2 §15.5 (VMRUN saves to the host save area and restores on #VMEXIT only RIP, RSP, RAX,
//! RFLAGS, CR0/3/4, EFER, GDTR/IDTR and ES/CS/SS/DS), §15.5.2, and §15.6 (VMSAVE/VMLOAD move FS, GS, TR, LDTR with
//! their hidden state, KernelGSBase, STAR/LSTAR/CSTAR/SFMASK and the SYSENTER MSRs).
//!
//! Design: [`svm_enter`] is one assembly routine. It saves the host's callee-saved registers on its stack, VMSAVEs
//! the host's FS/GS/TR/... (the GS base is the kernel's per-CPU pointer) to the CPU's host page, restores the
//! guest's SSE state (FXRSTOR64, only when the CPU does not hold it already: [`FpuHolder`]) and GPRs, VMLOADs the guest's FS/GS/TR/..., runs the guest, VMSAVEs them back,
//! stores the guest GPRs, FXSAVE64s the guest's SSE state and VMLOADs the host page. Guest RAX and RSP live in the
//! VMCB (VMRUN loads and saves them). The kernel is built without SSE, so the host has no SSE state to preserve.
//!
//! Preconditions (the caller, `vcpu::SvmVcpu::run`, establishes them): RFLAGS.IF may be 1 but GIF is 0 (`CLGI`),
//! so no interrupt or NMI can arrive while FS/GS hold guest values; EFER.SVME = 1 and VM_HSAVE_PA are set on this
//! CPU; the VMCB passes the consistency checks or VMRUN returns at once with `VMEXIT_INVALID`. On return GIF is still
//! 0; the caller executes `STGI`.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// Guest general-purpose registers that VMRUN does not switch (RAX and RSP are in the VMCB). The order is the
/// assembly routine's (offsets 0, 8, ... in field order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestGprs {
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

/// FXSAVE64 image of the guest's x87/SSE state (Intel SDM Vol. 1 §10.5.1; 512 bytes, 16-byte aligned).
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug)]
pub struct FxArea(pub [u8; 512]);

impl FxArea {
    /// The reset state: FCW = 0x037F (all x87 exceptions masked), MXCSR = 0x1F80 (all SSE exceptions masked).
    pub fn reset() -> Self {
        let mut a = [0u8; 512];
        a[0..2].copy_from_slice(&0x037Fu16.to_le_bytes());
        a[24..28].copy_from_slice(&0x1F80u32.to_le_bytes());
        Self(a)
    }
}

/// Bytes of an FXSAVE64 image the processor writes (FCW..XMM15); 416..512 are reserved or available to software.
const FX_USED: usize = 416;

/// Identity of the image a CPU's x87/SSE registers hold: the vCPU ([`FpuOwner::new`]) and how many exits it had
/// taken when its state last left those registers through the exit path's FXSAVE64.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FpuToken {
    vcpu: u64,
    exits: u64,
}

/// A vCPU's side of the lazy restore: a number no other vCPU ever gets, and its exit count.
#[derive(Debug)]
pub struct FpuOwner {
    id: u64,
    exits: u64,
}

/// Source of [`FpuOwner`] ids; 0 is never handed out (a CPU's initial [`FpuToken`] names no vCPU).
static NEXT_FPU_ID: AtomicU64 = AtomicU64::new(1);

impl FpuOwner {
    pub fn new() -> Self {
        Self {
            id: NEXT_FPU_ID.fetch_add(1, Ordering::Relaxed),
            exits: 0,
        }
    }

    fn token(&self) -> FpuToken {
        FpuToken {
            vcpu: self.id,
            exits: self.exits,
        }
    }

    /// Called after every return from [`svm_enter`]: its FXSAVE64 stored the guest's state into the image.
    pub fn exited(&mut self) {
        self.exits = self.exits.wrapping_add(1);
    }
}

/// Lazy x87/SSE restore, one per CPU (in `host::CpuSvm`).
///
/// The kernel is built without SSE and never touches the x87/SSE registers, so after a #VMEXIT they keep the
/// guest's values until the next FXRSTOR64. Restoring the same image again is needless work, and under QEMU's
/// multi-threaded TCG it is harmful: QEMU 7.2 to 10.0 implement FXRSTOR (any CPU, any mode) by clearing IGNNE in
/// CPU 0's `hflags2` with an unlocked read-modify-write from the executing CPU's thread (`cpu_clear_ignne`), which
/// races with CPU 0's own updates of that word and can drop CPU 0's nested-paging or GIF flag in the middle of a
/// VMRUN (docs/console.md, "Triple-fault stop dump"). So [`svm_enter`] restores only when this says so:
/// - never when the vCPU entering is the one whose state the registers hold and its image has not been written
///   since (same token: no other entry on this CPU and no exit elsewhere in between);
/// - otherwise only when the registers' current content (FXSAVE64 into [`FpuHolder::held`]) differs from the
///   entering vCPU's image (guests that never use the FPU all keep the reset image, so they never restore).
///
/// Invariant: `owner` names the image the registers hold, or no vCPU (0) when unknown. Anything that writes a
/// vCPU's image other than the exit path must create a new [`FpuOwner`] (none does: images are only created).
#[derive(Debug)]
pub struct FpuHolder {
    owner: FpuToken,
    held: FxArea,
    /// VMRUNs on this CPU that restored the guest's x87/SSE state, and those that did not need to.
    pub restores: u64,
    pub skips: u64,
}

impl FpuHolder {
    pub const fn new() -> Self {
        Self {
            owner: FpuToken { vcpu: 0, exits: 0 },
            held: FxArea([0; 512]),
            restores: 0,
            skips: 0,
        }
    }

    /// Whether the VMRUN of `owner`, about to happen on this CPU, must load `image` first. Records that after that
    /// VMRUN's exit the registers hold `owner`'s next image.
    pub fn must_restore(&mut self, owner: &FpuOwner, image: &FxArea) -> bool {
        let now = owner.token();
        let same = self.owner == now;
        self.owner = FpuToken {
            exits: now.exits.wrapping_add(1),
            ..now
        };
        let restore = !same
            && {
                // SAFETY: stores the x87/SSE registers into a 16-byte-aligned 512-byte area this CPU's state owns;
                // CR4.OSFXSR is set on every CPU that runs SVM guests (`host::enable`).
                unsafe {
                    core::arch::asm!("fxsave64 [{}]", in(reg) self.held.0.as_mut_ptr(), options(nostack, preserves_flags))
                };
                self.held.0[..FX_USED] != image.0[..FX_USED]
            };
        if restore {
            self.restores += 1;
        } else {
            self.skips += 1;
        }
        restore
    }
}

global_asm!(
    r#"
    .section .text.svm_enter, "ax"
    .global svm_enter
    /* rdi = VMCB pa, rsi = &mut GuestGprs, rdx = host VMSAVE page pa, rcx = &mut FxArea, r8 = restore it (0/1) */
svm_enter:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    push rsi
    push rdi
    push rdx
    push rcx
    mov rax, rdx
    vmsave rax
    test r8, r8
    jz 2f
    fxrstor64 [rcx]
2:
    mov rax, rdi
    mov rbx, [rsi + 0]
    mov rcx, [rsi + 8]
    mov rdx, [rsi + 16]
    mov rdi, [rsi + 32]
    mov rbp, [rsi + 40]
    mov r8,  [rsi + 48]
    mov r9,  [rsi + 56]
    mov r10, [rsi + 64]
    mov r11, [rsi + 72]
    mov r12, [rsi + 80]
    mov r13, [rsi + 88]
    mov r14, [rsi + 96]
    mov r15, [rsi + 104]
    mov rsi, [rsi + 24]
    vmload rax
    vmrun rax
    /* #VMEXIT: RAX (VMCB pa) and RSP are the host's again; every other GPR holds the guest's value. */
    vmsave rax
    push rsi
    /* stack: guest rsi, fx, host page, vmcb, gprs */
    mov rsi, [rsp + 32]
    mov [rsi + 0], rbx
    mov [rsi + 8], rcx
    mov [rsi + 16], rdx
    mov [rsi + 32], rdi
    mov [rsi + 40], rbp
    mov [rsi + 48], r8
    mov [rsi + 56], r9
    mov [rsi + 64], r10
    mov [rsi + 72], r11
    mov [rsi + 80], r12
    mov [rsi + 88], r13
    mov [rsi + 96], r14
    mov [rsi + 104], r15
    pop rax
    mov [rsi + 24], rax
    /* stack: fx, host page, vmcb, gprs */
    mov rcx, [rsp]
    fxsave64 [rcx]
    mov rax, [rsp + 8]
    vmload rax
    add rsp, 32
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
    "#
);

extern "C" {
    /// Runs the guest of the VMCB at `vmcb_pa` until the next #VMEXIT (or returns at once on `VMEXIT_INVALID`).
    ///
    /// # Safety
    /// See the module preconditions: GIF = 0, SVM enabled on this CPU, `vmcb_pa` a VMCB page owned by the caller
    /// with valid IOPM/MSRPM/nCR3 pointers, `host_vmsave_pa` this CPU's host page, `gprs` and `fx` valid for writes.
    /// `restore` = 0 only when the x87/SSE registers already hold `fx` ([`FpuHolder::must_restore`]).
    pub fn svm_enter(
        vmcb_pa: u64,
        gprs: *mut GuestGprs,
        host_vmsave_pa: u64,
        fx: *mut FxArea,
        restore: u64,
    );
}
