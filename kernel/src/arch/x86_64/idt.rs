//! Interrupt descriptor table and the single trap entry path.
//!
//! Design: build.rs generates 256 stubs, 16 bytes apart from `isr_stub_table`; each pushes a zero error code when
//! the CPU does not, then its vector, and jumps to `isr_common`, which saves all general registers into a
//! [`TrapFrame`] and calls [`trap_dispatch`]. One IDT is shared by all CPUs (it is immutable once built). #DF, NMI
//! and #MC run on IST stacks so a corrupt kernel stack still gets reported.
//!
//! Any exception is fatal today: it prints `CV:EXCEPTION` (vector, name, error code, RIP, CR2, CPU) and stops the
//! machine with failure status. An NMI while the machine is stopping is the stop request itself and just halts.
//! Interrupt handlers never log (the console lock may be held by the interrupted code).

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use spin::Once;
use x86_64::instructions::tables::lidt;
use x86_64::registers::control::Cr2;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

use super::{cpu, gdt, lapic, percpu, pic, stop};

global_asm!(include_str!(concat!(env!("OUT_DIR"), "/isr_stubs.s")));

global_asm!(
    r#"
    .section .text.isr_common, "ax"
    .global isr_common
isr_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    cld
    call {dispatch}
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq
    "#,
    dispatch = sym trap_dispatch,
);

extern "C" {
    static isr_stub_table: [u8; 256 * 16];
}

/// Registers saved by `isr_common`, then what the stub and the CPU pushed.
#[repr(C)]
#[derive(Debug)]
#[allow(missing_docs)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// One 64-bit interrupt gate (Intel SDM Vol. 3A, 6.14.1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    /// Present, DPL 0, 64-bit interrupt gate (interrupts off on entry); `ist` is the 1-based IST slot or 0.
    #[allow(clippy::cast_possible_truncation)] // splitting an address into its descriptor fields
    fn interrupt(handler: u64, ist: u8) -> Self {
        Self {
            offset_low: handler as u16,
            selector: gdt::KERNEL_CODE,
            ist,
            type_attr: 0x8E,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

static IDT: Once<Idt> = Once::new();

/// Vector numbers of the exceptions with IST stacks.
const VEC_NMI: u64 = 2;
const VEC_DOUBLE_FAULT: u64 = 8;
const VEC_MACHINE_CHECK: u64 = 18;

/// Unexpected (unassigned) interrupts taken, for diagnostics.
pub static UNEXPECTED_INTERRUPTS: AtomicU64 = AtomicU64::new(0);

/// Builds the shared IDT (once) and loads it on this CPU.
pub fn load() {
    let idt = IDT.call_once(|| {
        let base = core::ptr::addr_of!(isr_stub_table) as u64;
        let mut gates = [Gate::default(); 256];
        for (vector, gate) in (0u64..).zip(gates.iter_mut()) {
            let ist = match vector {
                VEC_DOUBLE_FAULT => gdt::DOUBLE_FAULT_IST + 1,
                VEC_NMI => gdt::NMI_IST + 1,
                VEC_MACHINE_CHECK => gdt::MACHINE_CHECK_IST + 1,
                _ => 0,
            };
            *gate = Gate::interrupt(base + vector * 16, ist);
        }
        Idt(gates)
    });
    let ptr = DescriptorTablePointer {
        limit: u16::try_from(core::mem::size_of::<Idt>() - 1).unwrap_or(u16::MAX),
        base: VirtAddr::from_ptr(idt as *const Idt),
    };
    // SAFETY: the IDT is 'static and immutable once built; every gate points at a generated stub in .text.
    unsafe { lidt(&ptr) };
}

/// Mnemonic of an exception vector.
pub fn exception_name(vector: u64) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "#RES15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#RES22", "#RES23",
        "#RES24", "#RES25", "#RES26", "#RES27", "#HV", "#VC", "#SX", "#RES31",
    ];
    usize::try_from(vector)
        .ok()
        .and_then(|v| NAMES.get(v))
        .copied()
        .unwrap_or("#INTR")
}

/// Set by the first CPU that reports a fatal exception; others just halt.
static REPORTING: AtomicBool = AtomicBool::new(false);

extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    match frame.vector {
        VEC_NMI if stop::stopping() => cpu::halt_forever(),
        0..=31 => fatal_exception(frame),
        v if v == u64::from(lapic::TIMER_VECTOR) => {
            if let Some(p) = percpu::try_current() {
                p.timer_ticks.fetch_add(1, Ordering::Relaxed);
            }
            lapic::eoi();
        }
        v if v == u64::from(lapic::IPI_VECTOR) => {
            if let Some(p) = percpu::try_current() {
                p.ipis.fetch_add(1, Ordering::Relaxed);
            }
            lapic::eoi();
        }
        // LAPIC spurious interrupts take no EOI.
        v if v == u64::from(lapic::SPURIOUS_VECTOR) => {}
        // Masked legacy PIC lines can only raise spurious IRQ 7/15, which take no EOI either.
        v if (u64::from(pic::PIC_VECTOR_BASE)..u64::from(pic::PIC_VECTOR_BASE) + 16)
            .contains(&v) => {}
        _ => {
            UNEXPECTED_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
            lapic::eoi();
        }
    }
}

fn fatal_exception(frame: &TrapFrame) -> ! {
    if REPORTING.swap(true, Ordering::AcqRel) {
        cpu::halt_forever();
    }
    let cr2 = Cr2::read_raw();
    let cpu = percpu::current_id();
    crate::console::write_line_fatal(format_args!(
        "CV:EXCEPTION cpu={} vector={} name={} error={:#x} rip={:#x} cr2={:#x}",
        cpu,
        frame.vector,
        exception_name(frame.vector),
        frame.error_code,
        frame.rip,
        cr2
    ));
    crate::console::write_line_fatal(format_args!(
        "  cs={:#x} rflags={:#x} rsp={:#x} ss={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} \
         rbp={:#x}",
        frame.cs,
        frame.rflags,
        frame.rsp,
        frame.ss,
        frame.rax,
        frame.rbx,
        frame.rcx,
        frame.rdx,
        frame.rsi,
        frame.rdi,
        frame.rbp
    ));
    stop::stop(stop::Status::Fail)
}
