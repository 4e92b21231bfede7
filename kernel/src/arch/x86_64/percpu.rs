//! Per-CPU data, reached through the GS base.
//!
//! Each CPU's GS base holds the address of its [`PerCpu`]; [`current`] reads it back. The BSP's area is a static,
//! each AP's is allocated and leaked by the BSP before the AP starts. The registry [`CPUS`] maps logical CPU
//! ids (BSP = 0, APs numbered in MADT order) to areas; an entry is published once and never changes.
//!
//! Invariant: a PerCpu is `'static` and shared only through atomics, so any CPU may read another's counters.

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::cpu;

/// Most CPUs supported.
pub const MAX_CPUS: usize = 64;

/// One CPU's data.
#[derive(Debug)]
pub struct PerCpu {
    /// Logical id (0 = BSP).
    pub id: u32,
    /// Local APIC id.
    pub apic_id: AtomicU32,
    /// LAPIC timer interrupts taken.
    pub timer_ticks: AtomicU64,
    /// Test IPIs taken.
    pub ipis: AtomicU64,
    /// The CPU reached Rust code (AP start-up handshake).
    pub started: AtomicBool,
    /// The CPU finished its bring-up and reported in.
    pub online: AtomicBool,
}

impl PerCpu {
    /// A fresh area for logical CPU `id`.
    pub const fn new(id: u32, apic_id: u32) -> Self {
        Self {
            id,
            apic_id: AtomicU32::new(apic_id),
            timer_ticks: AtomicU64::new(0),
            ipis: AtomicU64::new(0),
            started: AtomicBool::new(false),
            online: AtomicBool::new(false),
        }
    }
}

/// The BSP's area.
pub static BSP: PerCpu = PerCpu::new(0, 0);

static CPUS: [AtomicPtr<PerCpu>; MAX_CPUS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; MAX_CPUS];
static CPU_COUNT: AtomicUsize = AtomicUsize::new(0);

/// Points this CPU's GS base at `area`.
pub fn install(area: &'static PerCpu) {
    let addr = area as *const PerCpu as u64;
    // SAFETY: IA32_GS_BASE exists on every x86_64 CPU; the kernel never dereferences GS-relative memory other than
    // through `current`, which expects exactly this value.
    unsafe { cpu::wrmsr(cpu::IA32_GS_BASE, addr) };
}

/// Publishes `area` in the registry; returns false if the registry is full or the id is out of range.
pub fn register(area: &'static PerCpu) -> bool {
    let Ok(index) = usize::try_from(area.id) else {
        return false;
    };
    if index >= MAX_CPUS {
        return false;
    }
    CPUS[index].store(area as *const PerCpu as *mut PerCpu, Ordering::Release);
    CPU_COUNT.fetch_max(index + 1, Ordering::AcqRel);
    true
}

/// This CPU's area, or None before [`install`].
pub fn try_current() -> Option<&'static PerCpu> {
    // SAFETY: IA32_GS_BASE exists on every x86_64 CPU; reading it has no side effects.
    let addr = unsafe { cpu::rdmsr(cpu::IA32_GS_BASE) };
    if addr == 0 {
        return None;
    }
    // SAFETY: a non-zero GS base was set by `install` from a `&'static PerCpu`.
    Some(unsafe { &*(addr as *const PerCpu) })
}

/// This CPU's logical id (0 before [`install`], which only the BSP runs without).
pub fn current_id() -> u32 {
    try_current().map_or(0, |p| p.id)
}

/// The area of logical CPU `id`, if registered.
pub fn get(id: usize) -> Option<&'static PerCpu> {
    let p = CPUS.get(id)?.load(Ordering::Acquire);
    // SAFETY: registry entries are `&'static PerCpu` published by `register`, or null.
    unsafe { p.as_ref() }
}

/// Registered CPUs (ids 0..count).
pub fn count() -> usize {
    CPU_COUNT.load(Ordering::Acquire)
}
