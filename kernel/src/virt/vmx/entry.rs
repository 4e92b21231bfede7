//! The VM entry/exit stub: saves the host's callee-saved registers, loads the guest's general-purpose registers,
//! executes VMLAUNCH (first entry) or VMRESUME, and on VM exit (HOST_RIP = `cv_vmx_exit`) stores the guest's
//! registers back and returns to the caller as if from an ordinary call.
//!
//! Design: HOST_RSP is written by the stub itself, right before entry, to the stack pointer at which the exit path
//! finds the pointer to the register block. RSP, RIP and RFLAGS are not in the block: the VMCS holds them. The
//! return value says how the call ended: 0 = a VM exit happened, 1 = VMfailInvalid, 2 = VMfailValid (the
//! VM-instruction error field has the number; SDM Vol. 3C §31.2). Interrupts must be disabled by the caller; the
//! exit leaves them disabled (RFLAGS is 0x2 after an exit, SDM §28.5.3).

use core::arch::global_asm;

/// The guest's general-purpose registers except RSP (in the VMCS). Layout known to the stub: keep the order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegs {
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rbx: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

/// The stub returned because a VM exit happened.
pub const EXITED: u64 = 0;
/// VMLAUNCH/VMRESUME (or the HOST_RSP write) failed with VMfailInvalid.
pub const FAIL_INVALID: u64 = 1;
/// VMLAUNCH/VMRESUME failed with VMfailValid.
pub const FAIL_VALID: u64 = 2;

global_asm!(
    ".pushsection .text.cv_vmx, \"ax\"",
    ".global cv_vmx_run",
    "cv_vmx_run:",
    "    push rbp",
    "    push rbx",
    "    push r12",
    "    push r13",
    "    push r14",
    "    push r15",
    "    push rdi",
    // HOST_RSP (0x6C14) = the stack pointer now: [rsp] is the register-block pointer on exit.
    "    mov rax, 0x6C14",
    "    vmwrite rax, rsp",
    "    jbe 3f",
    "    test rsi, rsi",
    "    mov rax, rdi",
    "    mov rcx, [rax + 8]",
    "    mov rdx, [rax + 16]",
    "    mov rbx, [rax + 24]",
    "    mov rbp, [rax + 32]",
    "    mov rsi, [rax + 40]",
    "    mov rdi, [rax + 48]",
    "    mov r8, [rax + 56]",
    "    mov r9, [rax + 64]",
    "    mov r10, [rax + 72]",
    "    mov r11, [rax + 80]",
    "    mov r12, [rax + 88]",
    "    mov r13, [rax + 96]",
    "    mov r14, [rax + 104]",
    "    mov r15, [rax + 112]",
    "    mov rax, [rax]",
    // Flags still hold `test rsi, rsi` (MOV does not change them): non-zero = already launched.
    "    jnz 2f",
    "    vmlaunch",
    "    jmp 3f",
    "2:  vmresume",
    // Fall-through: the entry failed. CF = VMfailInvalid, else ZF = VMfailValid.
    "3:  mov eax, 2",
    "    mov ecx, 1",
    "    cmovc eax, ecx",
    "    pop rdi",
    "    jmp 4f",
    ".global cv_vmx_exit",
    "cv_vmx_exit:",
    "    push rax",
    "    mov rax, [rsp + 8]",
    "    mov [rax + 8], rcx",
    "    mov [rax + 16], rdx",
    "    mov [rax + 24], rbx",
    "    mov [rax + 32], rbp",
    "    mov [rax + 40], rsi",
    "    mov [rax + 48], rdi",
    "    mov [rax + 56], r8",
    "    mov [rax + 64], r9",
    "    mov [rax + 72], r10",
    "    mov [rax + 80], r11",
    "    mov [rax + 88], r12",
    "    mov [rax + 96], r13",
    "    mov [rax + 104], r14",
    "    mov [rax + 112], r15",
    "    pop rcx",
    "    mov [rax], rcx",
    "    pop rdi",
    "    xor eax, eax",
    "4:  pop r15",
    "    pop r14",
    "    pop r13",
    "    pop r12",
    "    pop rbx",
    "    pop rbp",
    "    ret",
    ".popsection",
);

extern "sysv64" {
    /// Enters the guest whose VMCS is current; see the module doc for the return value.
    pub fn cv_vmx_run(regs: *mut GuestRegs, launched: u64) -> u64;
    /// The host RIP of every VM exit (never called directly).
    pub fn cv_vmx_exit();
}
