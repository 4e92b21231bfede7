//! The world switch: `VMLOAD; VMRUN; VMSAVE` with the general-purpose and SSE registers swapped around it.
//!
//! Sources: AMD APM Vol. 2 §15.5 (VMRUN saves to the host save area and restores on #VMEXIT only RIP, RSP, RAX,
//! RFLAGS, CR0/3/4, EFER, GDTR/IDTR and ES/CS/SS/DS), §15.5.2, and §15.6 (VMSAVE/VMLOAD move FS, GS, TR, LDTR with
//! their hidden state, KernelGSBase, STAR/LSTAR/CSTAR/SFMASK and the SYSENTER MSRs).
//!
//! Design: [`svm_enter`] is one assembly routine. It saves the host's callee-saved registers on its stack, VMSAVEs
//! the host's FS/GS/TR/... (the GS base is the kernel's per-CPU pointer) to the CPU's host page, restores the
//! guest's SSE state (FXRSTOR64) and GPRs, VMLOADs the guest's FS/GS/TR/..., runs the guest, VMSAVEs them back,
//! stores the guest GPRs, FXSAVE64s the guest's SSE state and VMLOADs the host page. Guest RAX and RSP live in the
//! VMCB (VMRUN loads and saves them). The kernel is built without SSE, so the host has no SSE state to preserve.
//!
//! Preconditions (the caller, `vcpu::SvmVcpu::run`, establishes them): RFLAGS.IF may be 1 but GIF is 0 (`CLGI`),
//! so no interrupt or NMI can arrive while FS/GS hold guest values; EFER.SVME = 1 and VM_HSAVE_PA are set on this
//! CPU; the VMCB passes the consistency checks or VMRUN returns at once with `VMEXIT_INVALID`. On return GIF is still
//! 0; the caller executes `STGI`.

use core::arch::global_asm;

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

global_asm!(
    r#"
    .section .text.svm_enter, "ax"
    .global svm_enter
    /* rdi = VMCB pa, rsi = &mut GuestGprs, rdx = host VMSAVE page pa, rcx = &mut FxArea */
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
    fxrstor64 [rcx]
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
    pub fn svm_enter(vmcb_pa: u64, gprs: *mut GuestGprs, host_vmsave_pa: u64, fx: *mut FxArea);
}
