//! Multiboot headers and the 32-bit entry stub.
//!
//! Both boot paths (Multiboot 1 from QEMU `-kernel`, Multiboot 2 from GRUB under BIOS or UEFI) enter `_start32`
//! in 32-bit protected mode with paging off, `eax` = loader magic and `ebx` = physical address of the boot
//! information. The stub zeroes .bss, checks for long mode (printing `CV:FATAL` on COM1 and halting when absent),
//! builds early page tables that identity-map the first 4 GiB with 2 MiB pages, enables PAE, long mode, NX (when
//! present) and paging, loads a minimal 64-bit GDT and calls [`crate::kernel_main`] with the magic and the
//! boot-information address. The early tables live in .bss below 4 GiB; the kernel replaces them once the memory
//! map is known (see `paging`).
//!
//! Invariants: nothing here touches memory outside the kernel image before the boot information is parsed, so the
//! loader's structures (placed outside our ELF segments) stay intact.

use core::arch::global_asm;

/// Multiboot 1 magic in the header.
pub const MB1_HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Multiboot 1 magic passed in `eax`.
pub const MB1_BOOT_MAGIC: u32 = 0x2BAD_B002;
/// Multiboot 2 magic in the header.
pub const MB2_HEADER_MAGIC: u32 = 0xE852_50D6;
/// Multiboot 2 magic passed in `eax`.
pub const MB2_BOOT_MAGIC: u32 = 0x36D7_6289;

/// Size of the bootstrap processor's boot stack. `kernel_main` and the self-tests run on it with large frames
/// (a `BootInfo` alone is ~12 KiB); 64 KiB overflowed into the statics below it (the frame allocator).
pub const BOOT_STACK_SIZE: usize = 256 * 1024;
/// Deepest use of the boot stack still judged healthy; deeper means it came within 32 KiB of overflowing.
pub const BOOT_STACK_HEALTHY: usize = BOOT_STACK_SIZE - 32 * 1024;

global_asm!(
    r#"
    .section .multiboot_header, "a"
    /* Multiboot 1 header: flags = page-align modules (bit 0) | memory information (bit 1); ELF loading. */
    .balign 4
mb1_header:
    .long {mb1_magic}
    .long 0x00000003
    .long 0x100000000 - ({mb1_magic} + 0x00000003)

    /* Multiboot 2 header (architecture 0 = i386 protected mode). */
    .balign 8
mb2_header:
    .long {mb2_magic}
    .long 0
    .long mb2_header_end - mb2_header
    .long 0x100000000 - ({mb2_magic} + 0 + (mb2_header_end - mb2_header))
    /* Module alignment tag: modules page aligned. */
    .balign 8
    .short 6
    .short 0
    .long 8
    /* End tag. */
    .balign 8
    .short 0
    .short 0
    .long 8
mb2_header_end:

    .section .boot.text, "ax"
    .code32
    .global _start32
_start32:
    cli
    cld
    mov %eax, %ebp
    mov %ebx, %esi

    /* Zero .bss (boot stack and early page tables live there). */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl

    mov $({boot_stack} + {stack_size}), %esp

    /* Long mode available? CPUID 0x80000001 EDX bit 29. */
    mov $0x80000000, %eax
    cpuid
    cmp $0x80000001, %eax
    jb no_long_mode
    mov $0x80000001, %eax
    cpuid
    bt $29, %edx
    jnc no_long_mode
    mov %edx, %edi          /* keep extended features: bit 20 = NX */

    /* PML4[0] -> PDPT; PDPT[0..4] -> PD pages; PD entries -> 2 MiB pages (P | RW | PS). */
    mov ${boot_pdpt}, %eax
    or $0x3, %eax
    mov %eax, {boot_pml4}
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $12, %eax
    add ${boot_pd}, %eax
    or $0x3, %eax
    mov %eax, {boot_pdpt}(,%ecx,8)
    inc %ecx
    cmp $4, %ecx
    jb 1b
    xor %ecx, %ecx
2:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, {boot_pd}(,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jb 2b

    /* CR4.PAE, CR3, EFER.LME (+NXE), CR0.PG|WP|PE. */
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov ${boot_pml4}, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    bt $20, %edi
    jnc 3f
    or $0x800, %eax
3:  wrmsr
    mov %cr0, %eax
    or $0x80010001, %eax
    mov %eax, %cr0

    lgdt boot_gdtr
    ljmp $0x08, $long_mode_entry

no_long_mode:
    mov $no_long_mode_msg, %esi
4:  lodsb
    test %al, %al
    jz 6f
    mov %al, %bl
    mov $0x3FD, %dx
5:  inb %dx, %al
    test $0x20, %al
    jz 5b
    mov $0x3F8, %dx
    mov %bl, %al
    outb %al, %dx
    jmp 4b
6:  cli
    hlt
    jmp 6b

    .code64
long_mode_entry:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %ax, %ax
    mov %ax, %fs
    mov %ax, %gs
    mov $({boot_stack} + {stack_size}), %rsp
    mov %ebp, %edi
    mov %esi, %esi
    call {kernel_main}
7:  cli
    hlt
    jmp 7b

    .section .rodata.boot, "a"
    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF   /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF   /* 0x10: data */
boot_gdt_end:
boot_gdtr:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt
no_long_mode_msg:
    .asciz "CV:FATAL reason=\"CPU lacks long mode (CPUID 0x80000001 EDX.LM=0)\"\r\n"
    "#,
    mb1_magic = const MB1_HEADER_MAGIC,
    mb2_magic = const MB2_HEADER_MAGIC,
    boot_stack = sym BOOT_STACK,
    stack_size = const BOOT_STACK_SIZE,
    boot_pml4 = sym BOOT_PML4,
    boot_pdpt = sym BOOT_PDPT,
    boot_pd = sym BOOT_PD,
    kernel_main = sym crate::kernel_main,
    options(att_syntax)
);

/// Page-aligned storage the stub fills before paging is on.
#[repr(C, align(4096))]
pub struct PageAligned<const N: usize>(pub [u8; N]);

/// Early PML4 (only entry 0 used).
static mut BOOT_PML4: PageAligned<4096> = PageAligned([0; 4096]);
/// Early PDPT covering 0..512 GiB (entries 0..4 used).
static mut BOOT_PDPT: PageAligned<4096> = PageAligned([0; 4096]);
/// Four page directories: 0..4 GiB in 2 MiB pages.
static mut BOOT_PD: PageAligned<{ 4 * 4096 }> = PageAligned([0; 4 * 4096]);

/// The BSP's boot stack.
#[repr(C, align(16))]
pub struct BootStack(pub [u8; BOOT_STACK_SIZE]);

static mut BOOT_STACK: BootStack = BootStack([0; BOOT_STACK_SIZE]);

/// How many bytes of the boot stack have ever been written (a lower bound of the deepest use: the stub zeroes
/// .bss, and a frame that reserved space without writing it is not seen). There is no guard page below the stack
/// yet, so this is how an overflow towards the statics below it is caught.
pub fn boot_stack_used() -> usize {
    let base = core::ptr::addr_of!(BOOT_STACK).cast::<u8>();
    for offset in 0..BOOT_STACK_SIZE {
        // SAFETY: `offset` is inside the static; the bytes below the stack pointer are unused, those above belong
        // to this CPU's own active frames, and a volatile byte read of either has no effect.
        if unsafe { core::ptr::read_volatile(base.add(offset)) } != 0 {
            return BOOT_STACK_SIZE - offset;
        }
    }
    0
}
