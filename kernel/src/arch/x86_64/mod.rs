//! x86_64 platform layer: boot entry, descriptor tables, exceptions, paging, interrupt controllers, timers,
//! per-CPU data and SMP start-up. Nothing here knows about VMs; `virt/` and the VM layer build on it.

pub mod cpu;
pub mod entry;
pub mod gdt;
pub mod idt;
pub mod ioapic;
pub mod lapic;
pub mod paging;
pub mod percpu;
pub mod pic;
pub mod pit;
pub mod smp;
pub mod stop;
pub mod tsc;
