//! Per-CPU GDT and TSS with interrupt stacks for double fault, NMI and machine check.
//!
//! Every CPU gets its own GDT (null, 64-bit code 0x08, data 0x10, TSS 0x18) and TSS, because a TSS descriptor is
//! marked busy when loaded and its IST stacks must be private. The BSP's tables and IST stacks are statics (they
//! are needed before the heap exists); each AP's are allocated by the BSP and leaked.
//!
//! Invariant: the selector values match the early boot GDT and the AP trampoline, so CS/SS stay valid across the
//! switch from the boot GDT.

use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::segmentation::SegmentSelector;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST slot (0-based index into the TSS table) for #DF.
pub const DOUBLE_FAULT_IST: u8 = 0;
/// IST slot for NMI.
pub const NMI_IST: u8 = 1;
/// IST slot for #MC.
pub const MACHINE_CHECK_IST: u8 = 2;
/// Size of each IST stack.
pub const IST_STACK_SIZE: usize = 16 * 1024;
/// Kernel code selector.
pub const KERNEL_CODE: u16 = 0x08;

/// A CPU's loaded descriptor tables.
#[derive(Debug)]
pub struct CpuTables {
    gdt: GlobalDescriptorTable,
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

/// Builds a TSS whose IST entries point at the tops of `stacks` (one per IST slot used).
pub fn make_tss(stack_tops: [u64; 3]) -> TaskStateSegment {
    let mut tss = TaskStateSegment::new();
    for (slot, top) in [DOUBLE_FAULT_IST, NMI_IST, MACHINE_CHECK_IST]
        .into_iter()
        .zip(stack_tops)
    {
        tss.interrupt_stack_table[usize::from(slot)] = VirtAddr::new(top);
    }
    tss
}

/// Builds a GDT referring to `tss`.
pub fn make_tables(tss: &'static TaskStateSegment) -> CpuTables {
    let mut gdt = GlobalDescriptorTable::new();
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    let tss = gdt.append(Descriptor::tss_segment(tss));
    CpuTables {
        gdt,
        code,
        data,
        tss,
    }
}

/// Loads `tables` on this CPU and reloads CS, SS, DS and ES. FS and GS are left alone: loading a selector into
/// GS would reset the GS base (the per-CPU pointer) on Intel CPUs.
pub fn load(tables: &'static CpuTables) {
    tables.gdt.load();
    // SAFETY: the selectors index the GDT just loaded (code 0x08, data 0x10, TSS 0x18), whose descriptors are a
    // valid 64-bit code segment, a data segment and an available TSS that lives for 'static.
    unsafe {
        CS::set_reg(tables.code);
        SS::set_reg(tables.data);
        DS::set_reg(tables.data);
        ES::set_reg(tables.data);
        load_tss(tables.tss);
    }
}

#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_SIZE]; 3]);

static mut BSP_IST: IstStacks = IstStacks([[0; IST_STACK_SIZE]; 3]);
static BSP_TSS: Once<TaskStateSegment> = Once::new();
static BSP_TABLES: Once<CpuTables> = Once::new();

/// Sets up and loads the BSP's GDT and TSS.
pub fn init_bsp() {
    let base = core::ptr::addr_of!(BSP_IST) as u64;
    let size = IST_STACK_SIZE as u64;
    let tss = BSP_TSS.call_once(|| make_tss([base + size, base + 2 * size, base + 3 * size]));
    load(BSP_TABLES.call_once(|| make_tables(tss)));
}

/// Allocates (and leaks) an AP's IST stacks, TSS and GDT, ready for [`load`] on that AP.
pub fn alloc_for_ap() -> &'static CpuTables {
    let mut tops = [0u64; 3];
    for top in &mut tops {
        let stack: &'static mut [u8] = alloc::vec![0u8; IST_STACK_SIZE].leak();
        // Stacks grow down; keep the top 16-byte aligned.
        *top = (stack.as_ptr() as u64 + IST_STACK_SIZE as u64) & !0xF;
    }
    let tss: &'static TaskStateSegment =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(make_tss(tops)));
    alloc::boxed::Box::leak(alloc::boxed::Box::new(make_tables(tss)))
}
