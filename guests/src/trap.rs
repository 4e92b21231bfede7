//! Exception reporting: an IDT whose 32 exception vectors log what happened and stop the VM with code
//! `0x100 + vector`, so a guest's own fault is reported instead of escalating to a triple fault.
//!
//! Each stub pushes a zero error code where the CPU pushes none, then the vector, so the common handler always sees
//! `[vector, error, rip, cs, rflags, rsp, ss]` on the stack.

use core::sync::atomic::{AtomicBool, Ordering};

#[repr(C, packed)]
struct IdtPointer {
    limit: u16,
    base: u64,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

static mut IDT: [Gate; 32] = [Gate {
    offset_low: 0,
    selector: 0,
    ist: 0,
    attributes: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
}; 32];
static INSTALLED: AtomicBool = AtomicBool::new(false);

extern "C" {
    static guest_trap_stubs: [u8; 32 * 16];
}

/// Installs the exception IDT (once; later calls do nothing).
pub(crate) fn install() {
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return;
    }
    let cs: u16;
    // SAFETY: reading CS has no effects.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
    // Only the address of the stubs (defined in the global_asm below) is taken.
    let stubs = core::ptr::addr_of!(guest_trap_stubs) as u64;
    // SAFETY: `INSTALLED` makes this the only writer, before any exception can use the table; the CPU reads it
    // only after `lidt` below.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    for (vector, gate) in idt.iter_mut().enumerate() {
        let handler = stubs + 16 * vector as u64;
        // An IDT gate splits the handler address into 16/16/32-bit fields (Intel SDM Vol. 3A, Figure 6-8).
        #[allow(clippy::cast_possible_truncation)]
        let gate_value = Gate {
            offset_low: handler as u16,
            selector: cs,
            ist: 0,
            attributes: 0x8e, // present, DPL 0, 64-bit interrupt gate
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        };
        *gate = gate_value;
    }
    const LIMIT: u16 = 32 * 16 - 1;
    let pointer = IdtPointer {
        limit: LIMIT,
        base: idt.as_ptr() as u64,
    };
    // SAFETY: the IDT is static and fully initialised; the gates point at the stubs below with the current CS.
    unsafe { core::arch::asm!("lidt [{0}]", in(reg) &pointer, options(readonly, nostack)) };
}

/// Loads an empty IDT, so the next exception escalates to a triple fault (the `hostile` guest's last act).
pub fn remove() {
    let pointer = IdtPointer { limit: 0, base: 0 };
    // SAFETY: an empty IDT is a valid (if fatal) state; the caller wants exactly that.
    unsafe { core::arch::asm!("lidt [{0}]", in(reg) &pointer, options(readonly, nostack)) };
}

#[no_mangle]
extern "C" fn guest_trap(frame: &[u64; 7]) -> ! {
    let [vector, error, rip, ..] = *frame;
    crate::println!("guest: exception vector={vector} error={error:#x} rip={rip:#x}");
    crate::exit(0x100 + vector)
}

// One 16-byte stub per vector; vectors 8, 10-14, 17, 21 and 29 (Intel SDM Vol. 3A, Table 6-1) already have an
// error code on the stack, the others push a zero in its place.
core::arch::global_asm!(
    r#"
    .section .text, "ax"
    .balign 16
    .global guest_trap_stubs
guest_trap_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if (\v == 8) || ((\v >= 10) && (\v <= 14)) || (\v == 17) || (\v == 21) || (\v == 29)
    .else
    push 0
    .endif
    push \v
    jmp guest_trap_common
    .endr
guest_trap_common:
    mov rdi, rsp
    and rsp, -16
    call guest_trap
    ud2
"#
);
