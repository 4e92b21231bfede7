//! Application-processor start-up: INIT-SIPI-SIPI with a real-mode trampoline below 1 MiB.
//!
//! Design: the trampoline (below) is copied to a page reserved under 1 MiB at boot. The BSP starts APs one at a
//! time: it patches the trampoline's data block (linear addresses of its GDT and far-jump targets, CR3, EFER,
//! stack, entry point, per-CPU pointer), sends INIT, waits 10 ms, sends SIPI (and a second one if the AP has not
//! reached Rust after 200 us), then waits for the AP to come online. The AP goes real mode -> 32-bit protected
//! mode -> long mode on the kernel page tables, then runs [`ap_entry`]: GS base, its own GDT/TSS (IST stacks),
//! the shared IDT, its LAPIC, and a one-shot LAPIC timer that must fire before it reports `CV:CPU ... online`.
//!
//! Invariant: only one AP runs the trampoline at a time (the BSP waits for `started` before reusing it).

use alloc::boxed::Box;
use core::arch::global_asm;
use core::sync::atomic::Ordering;

use super::percpu::{self, PerCpu};
use super::{cpu, gdt, idt, lapic, paging, tsc};
use crate::acpi::CpuEntry;

/// Stack size of each AP.
pub const AP_STACK_SIZE: usize = 64 * 1024;
/// Time an AP gets to reach Rust after its SIPIs.
const START_TIMEOUT_US: u64 = 200_000;
/// Time an AP gets to finish its bring-up once in Rust.
const ONLINE_TIMEOUT_US: u64 = 2_000_000;
/// One-shot timer period each AP proves its LAPIC timer with.
const AP_TIMER_TEST_US: u64 = 1_000;

global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .balign 16
    .global ap_tramp_start
ap_tramp_start:
    .code16
    cli
    cld
    xor %ebx, %ebx
    mov %cs, %bx
    mov %bx, %ds
    shl $4, %ebx                          /* ebx = linear base of this page */
    lgdtl (tramp_gdtr - ap_tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl *(tramp_far32 - ap_tramp_start)

    .code32
tramp32:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %cr4, %eax
    or $0x20, %eax                        /* PAE */
    mov %eax, %cr4
    mov (tramp_cr3 - ap_tramp_start)(%ebx), %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or (tramp_efer - ap_tramp_start)(%ebx), %eax
    wrmsr
    mov %cr0, %eax
    or $0x80010001, %eax                  /* PG | WP | PE */
    mov %eax, %cr0
    ljmpl *(tramp_far64 - ap_tramp_start)(%ebx)

    .code64
tramp64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ebx, %ebx
    mov (tramp_stack - ap_tramp_start)(%rbx), %rsp
    mov (tramp_arg - ap_tramp_start)(%rbx), %rdi
    mov (tramp_entry - ap_tramp_start)(%rbx), %rax
    call *%rax
1:  cli
    hlt
    jmp 1b

    .balign 8
tramp_gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF              /* 0x08: 32-bit code */
    .quad 0x00CF92000000FFFF              /* 0x10: data */
    .quad 0x00AF9A000000FFFF              /* 0x18: 64-bit code */
tramp_gdt_end:
    .balign 8
    .global tramp_gdtr
tramp_gdtr:
    .short tramp_gdt_end - tramp_gdt - 1
    .long 0                               /* patched: linear address of tramp_gdt */
    .balign 8
    .global tramp_far32
tramp_far32:
    .long 0                               /* patched: linear address of tramp32 */
    .short 0x08
    .balign 8
    .global tramp_far64
tramp_far64:
    .long 0                               /* patched: linear address of tramp64 */
    .short 0x18
    .balign 8
    .global tramp_cr3
tramp_cr3:
    .long 0
    .global tramp_efer
tramp_efer:
    .long 0
    .global tramp_stack
tramp_stack:
    .quad 0
    .global tramp_arg
tramp_arg:
    .quad 0
    .global tramp_entry
tramp_entry:
    .quad 0
    .global ap_tramp_end
ap_tramp_end:

    /* Offsets the BSP patches, exported as absolute symbols. */
    .global TRAMP_OFF_GDT
    .set TRAMP_OFF_GDT, tramp_gdt - ap_tramp_start
    .global TRAMP_OFF_32
    .set TRAMP_OFF_32, tramp32 - ap_tramp_start
    .global TRAMP_OFF_64
    .set TRAMP_OFF_64, tramp64 - ap_tramp_start
    "#,
    options(att_syntax)
);

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static tramp_gdtr: u8;
    static tramp_far32: u8;
    static tramp_far64: u8;
    static tramp_cr3: u8;
    static tramp_efer: u8;
    static tramp_stack: u8;
    static tramp_arg: u8;
    static tramp_entry: u8;
    static TRAMP_OFF_GDT: u8;
    static TRAMP_OFF_32: u8;
    static TRAMP_OFF_64: u8;
}

/// Offset of a trampoline symbol from its start.
fn off(sym: *const u8) -> u64 {
    let start = core::ptr::addr_of!(ap_tramp_start) as u64;
    sym as u64 - start
}

/// Value of an absolute symbol (its "address").
fn abs(sym: *const u8) -> u64 {
    sym as u64
}

/// Outcome of starting the APs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmpResult {
    /// CPUs online, BSP included.
    pub online: usize,
    /// Enabled CPUs in the MADT, BSP included.
    pub expected: usize,
}

/// Writes `value` (little-endian, `N` bytes) at offset `at` of the trampoline copy.
///
/// # Safety
/// `page` maps the trampoline copy and `at + N` lies within it.
unsafe fn patch<const N: usize>(page: *mut u8, at: u64, value: [u8; N]) {
    let at = usize::try_from(at).unwrap_or(usize::MAX);
    // SAFETY: forwarded to the caller.
    unsafe { core::ptr::copy_nonoverlapping(value.as_ptr(), page.add(at), N) };
}

/// Starts every enabled AP in `cpus` through the trampoline page at physical `tramp_page` (< 1 MiB).
pub fn start_aps(cpus: &[CpuEntry], tramp_page: u64) -> SmpResult {
    let bsp_apic = lapic::id();
    let expected = cpus.iter().filter(|c| c.enabled).count().max(1);
    let mut online = 1;
    let (start, end) = (
        core::ptr::addr_of!(ap_tramp_start),
        core::ptr::addr_of!(ap_tramp_end),
    );
    let len = usize::try_from(end as u64 - start as u64).unwrap_or(usize::MAX);
    let Ok(sipi_page) = u8::try_from(tramp_page >> 12) else {
        log::error!("smp: trampoline page {tramp_page:#x} is not below 1 MiB");
        return SmpResult { online, expected };
    };
    if len > 4096 || tramp_page & 0xFFF != 0 {
        log::error!("smp: trampoline ({len} bytes) does not fit page {tramp_page:#x}");
        return SmpResult { online, expected };
    }
    let page = paging::phys_to_virt(tramp_page);
    // SAFETY: the trampoline page is reserved for this purpose (excluded from the frame allocator) and mapped by
    // the direct map; the source is the trampoline image in .rodata.
    unsafe { core::ptr::copy_nonoverlapping(start, page, len) };
    // SAFETY: each patch writes inside the copied trampoline at the offset of its data field.
    unsafe {
        let gdt = tramp_page + abs(core::ptr::addr_of!(TRAMP_OFF_GDT));
        let t32 = tramp_page + abs(core::ptr::addr_of!(TRAMP_OFF_32));
        let t64 = tramp_page + abs(core::ptr::addr_of!(TRAMP_OFF_64));
        let as32 = |v: u64| u32::try_from(v).unwrap_or(0).to_le_bytes();
        patch(page, off(core::ptr::addr_of!(tramp_gdtr)) + 2, as32(gdt));
        patch(page, off(core::ptr::addr_of!(tramp_far32)), as32(t32));
        patch(page, off(core::ptr::addr_of!(tramp_far64)), as32(t64));
        patch(
            page,
            off(core::ptr::addr_of!(tramp_cr3)),
            as32(paging::kernel_cr3()),
        );
        let efer = cpu::rdmsr(cpu::IA32_EFER) & ((1 << 8) | (1 << 11));
        patch(page, off(core::ptr::addr_of!(tramp_efer)), as32(efer));
        patch(
            page,
            off(core::ptr::addr_of!(tramp_entry)),
            (ap_entry as *const () as u64).to_le_bytes(),
        );
    }

    let mut next_id = 1u32;
    for c in cpus.iter().filter(|c| c.enabled && c.apic_id != bsp_apic) {
        if usize::try_from(next_id).unwrap_or(usize::MAX) >= percpu::MAX_CPUS {
            log::warn!(
                "smp: more than {} CPUs; apic {} not started",
                percpu::MAX_CPUS,
                c.apic_id
            );
            continue;
        }
        let area: &'static PerCpu = Box::leak(Box::new(PerCpu::new(next_id, c.apic_id)));
        let stack: &'static mut [u8] = alloc::vec![0u8; AP_STACK_SIZE].leak();
        let stack_top = (stack.as_ptr() as u64 + AP_STACK_SIZE as u64) & !0xF;
        // SAFETY: patching the stack and argument fields of the trampoline copy (see above).
        unsafe {
            patch(
                page,
                off(core::ptr::addr_of!(tramp_stack)),
                stack_top.to_le_bytes(),
            );
            patch(
                page,
                off(core::ptr::addr_of!(tramp_arg)),
                (area as *const PerCpu as u64).to_le_bytes(),
            );
        }
        percpu::register(area);
        core::sync::atomic::fence(Ordering::SeqCst);

        lapic::send_init(c.apic_id);
        tsc::delay_us(10_000);
        lapic::send_startup(c.apic_id, sipi_page);
        if !tsc::wait_until(200, || area.started.load(Ordering::Acquire)) {
            lapic::send_startup(c.apic_id, sipi_page);
        }
        if !tsc::wait_until(START_TIMEOUT_US, || area.started.load(Ordering::Acquire)) {
            log::error!("smp: cpu{} (apic {}) did not start", next_id, c.apic_id);
            next_id += 1;
            continue;
        }
        if tsc::wait_until(ONLINE_TIMEOUT_US, || area.online.load(Ordering::Acquire)) {
            online += 1;
        } else {
            log::error!(
                "smp: cpu{} (apic {}) started but did not come online",
                next_id,
                c.apic_id
            );
        }
        next_id += 1;
    }
    SmpResult { online, expected }
}

/// First Rust code on an AP (called by the trampoline on its own stack).
extern "C" fn ap_entry(area: &'static PerCpu) -> ! {
    percpu::install(area);
    let tables = gdt::alloc_for_ap();
    gdt::load(tables);
    idt::load();
    lapic::init_cpu();
    area.started.store(true, Ordering::Release);

    bring_up_local(area);
    // Idles until the VM runtime starts, then runs this CPU's share of the vCPUs.
    crate::vm::ap_main()
}

/// Proves this CPU's LAPIC timer (a one-shot must interrupt it), then reports it online. Leaves interrupts on.
pub fn bring_up_local(area: &'static PerCpu) -> bool {
    let before = area.timer_ticks.load(Ordering::Relaxed);
    lapic::arm_oneshot_us(AP_TIMER_TEST_US);
    x86_64::instructions::interrupts::enable();
    let fired = tsc::wait_until(AP_TIMER_TEST_US * 100 + 100_000, || {
        area.timer_ticks.load(Ordering::Relaxed) != before
    });
    if !fired {
        lapic::disarm();
        log::error!("LAPIC timer did not fire on this CPU; not reporting online");
        return false;
    }
    crate::marker!("CPU id={} apic={} online", area.id, lapic::id());
    area.online.store(true, Ordering::Release);
    true
}
