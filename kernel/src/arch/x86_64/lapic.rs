//! Local APIC: x2APIC through MSRs when CPUID reports it, else xAPIC through uncached MMIO.
//!
//! The BSP chooses the mode once ([`init_bsp`]); every CPU then enables its own APIC in that mode ([`init_cpu`]).
//! The timer runs one-shot from a divided bus clock (calibrated against the TSC on the BSP) or, when CPUID.1:ECX
//! bit 24 says so, in TSC-deadline mode. Registers are named by their xAPIC MMIO offset (Intel SDM Vol. 3A,
//! Table 11-1); x2APIC MSR = 0x800 + offset / 16 (Table 11-6).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use spin::Once;

use super::{cpu, paging, tsc};

/// LAPIC timer vector.
pub const TIMER_VECTOR: u8 = 0x30;
/// Vector of the SMP self-test IPI.
pub const IPI_VECTOR: u8 = 0x31;
/// Spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xFF;

const REG_ID: u32 = 0x20;
const REG_TPR: u32 = 0x80;
const REG_EOI: u32 = 0xB0;
const REG_SVR: u32 = 0xF0;
const REG_ESR: u32 = 0x280;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_LVT_LINT0: u32 = 0x350;
const REG_TIMER_INITIAL: u32 = 0x380;
const REG_TIMER_CURRENT: u32 = 0x390;
const REG_TIMER_DIVIDE: u32 = 0x3E0;

const LVT_MASKED: u32 = 1 << 16;
const LVT_TSC_DEADLINE: u32 = 0b10 << 17;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_INIT: u32 = 0b101 << 8;
const ICR_STARTUP: u32 = 0b110 << 8;
const ICR_NMI: u32 = 0b100 << 8;
const ICR_ALL_BUT_SELF: u32 = 0b11 << 18;
/// Divide configuration value for divide-by-16.
const DIVIDE_BY_16: u32 = 0b0011;

/// How this machine's local APICs are accessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// x2APIC (MSR access).
    X2Apic,
    /// xAPIC at this virtual address (uncached mapping of the APIC base).
    XApic(u64),
}

static MODE: Once<Mode> = Once::new();
static TIMER_HZ: AtomicU64 = AtomicU64::new(0);
/// Divided timer ticks per TSC tick in 32.32 fixed point, rounded up (0 before [`calibrate_timer`]), so
/// [`arm_oneshot_ticks`] converts with one multiplication instead of two divisions.
static TIMER_PER_TSC: AtomicU64 = AtomicU64::new(0);
/// One microsecond in divided timer ticks (at least 1): the margin [`arm_oneshot_ticks`] adds, as
/// `arm_oneshot_us(ticks_to_us(t) + 1)` always did, so a slightly low calibration never fires early.
static MARGIN: AtomicU64 = AtomicU64::new(1);
static TSC_DEADLINE: AtomicBool = AtomicBool::new(false);

fn read(reg: u32) -> u32 {
    match MODE.get() {
        Some(Mode::X2Apic) => {
            // SAFETY: x2APIC mode is enabled on this CPU, so the 0x800.. MSR range exists. Registers are 32-bit.
            #[allow(clippy::cast_possible_truncation)]
            let v = unsafe { cpu::rdmsr(0x800 + reg / 16) } as u32;
            v
        }
        // SAFETY: base maps this CPU's 4 KiB APIC register page uncached; reg is a register offset in it.
        Some(Mode::XApic(base)) => unsafe {
            core::ptr::read_volatile((base + u64::from(reg)) as *const u32)
        },
        None => 0,
    }
}

fn write(reg: u32, value: u32) {
    match MODE.get() {
        // SAFETY: as in `read`; writes to the APIC affect only interrupt delivery.
        Some(Mode::X2Apic) => unsafe { cpu::wrmsr(0x800 + reg / 16, u64::from(value)) },
        // SAFETY: as in `read`.
        Some(Mode::XApic(base)) => unsafe {
            core::ptr::write_volatile((base + u64::from(reg)) as *mut u32, value)
        },
        None => {}
    }
}

/// Whether the LAPIC has been set up on the BSP.
pub fn is_initialised() -> bool {
    MODE.get().is_some()
}

/// Chooses the mode and enables the BSP's LAPIC.
pub fn init_bsp() -> Result<Mode, paging::PagingError> {
    let features = cpu::cpuid(1, 0).ecx;
    TSC_DEADLINE.store(features & (1 << 24) != 0, Ordering::Relaxed);
    let mode = if features & (1 << 21) != 0 {
        Mode::X2Apic
    } else {
        // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC (all x86_64 CPUs).
        let base = unsafe { cpu::rdmsr(cpu::IA32_APIC_BASE) } & 0x000F_FFFF_FFFF_F000;
        Mode::XApic(paging::map_mmio(base, 4096)?)
    };
    MODE.call_once(|| mode);
    init_cpu();
    Ok(mode)
}

/// Enables this CPU's LAPIC in the chosen mode: software enable, spurious vector, timer masked, TPR 0.
pub fn init_cpu() {
    let Some(mode) = MODE.get() else { return };
    // SAFETY: IA32_APIC_BASE exists; setting EN (bit 11), and EXTD (bit 10) when the CPU supports x2APIC (the BSP
    // checked CPUID; all CPUs of a machine share the feature), is the documented enable sequence.
    unsafe {
        let base = cpu::rdmsr(cpu::IA32_APIC_BASE);
        let extd = if *mode == Mode::X2Apic { 1 << 10 } else { 0 };
        cpu::wrmsr(cpu::IA32_APIC_BASE, base | (1 << 11) | extd);
    }
    write(REG_TPR, 0);
    write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    // Once per CPU: the one-shot paths count in divided ticks and do not rewrite it ([`arm_oneshot_count`]).
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    if percpu_is_ap() {
        // Only the BSP takes legacy ExtINT through LINT0 (and the PIC is masked anyway).
        write(REG_LVT_LINT0, LVT_MASKED);
    }
    write(REG_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    write(REG_ESR, 0);
    write(REG_ESR, 0);
    eoi();
}

fn percpu_is_ap() -> bool {
    super::percpu::current_id() != 0
}

/// This CPU's APIC id.
pub fn id() -> u32 {
    match MODE.get() {
        Some(Mode::X2Apic) => read(REG_ID),
        Some(Mode::XApic(_)) => read(REG_ID) >> 24,
        None => cpu::cpuid(1, 0).ebx >> 24,
    }
}

/// Signals end of interrupt.
pub fn eoi() {
    write(REG_EOI, 0);
}

fn send_icr(dest: u32, low: u32) {
    match MODE.get() {
        // SAFETY: x2APIC ICR is one 64-bit MSR with the destination in bits 63:32.
        Some(Mode::X2Apic) => unsafe {
            cpu::wrmsr(0x830, (u64::from(dest) << 32) | u64::from(low))
        },
        Some(Mode::XApic(_)) => {
            write(REG_ICR_HIGH, dest << 24);
            write(REG_ICR_LOW, low);
            // Bounded wait for the send to be accepted; a stuck bit is reported by the caller's timeout.
            for _ in 0..1_000_000 {
                if read(REG_ICR_LOW) & ICR_DELIVERY_PENDING == 0 {
                    break;
                }
                core::hint::spin_loop();
            }
        }
        None => {}
    }
}

/// Sends INIT to `apic`.
pub fn send_init(apic: u32) {
    send_icr(apic, ICR_INIT | ICR_LEVEL_ASSERT);
}

/// Sends a start-up IPI to `apic` for the trampoline at physical `page << 12`.
pub fn send_startup(apic: u32, page: u8) {
    send_icr(apic, ICR_STARTUP | ICR_LEVEL_ASSERT | u32::from(page));
}

/// Sends a fixed interrupt `vector` to `apic`.
pub fn send_fixed(apic: u32, vector: u8) {
    send_icr(apic, ICR_LEVEL_ASSERT | u32::from(vector));
}

/// Sends an NMI to every CPU but this one.
pub fn send_nmi_all_but_self() {
    send_icr(0, ICR_NMI | ICR_LEVEL_ASSERT | ICR_ALL_BUT_SELF);
}

/// Whether the TSC-deadline timer mode exists.
pub fn has_tsc_deadline() -> bool {
    TSC_DEADLINE.load(Ordering::Relaxed)
}

/// LAPIC timer input frequency after the divider (0 before calibration).
pub fn timer_hz() -> u64 {
    TIMER_HZ.load(Ordering::Relaxed)
}

/// Measures the divided LAPIC timer clock against the TSC (BSP, after TSC calibration). Three 10 ms windows; the
/// smallest count wins, because a window can only be stretched (by an SMI or a preempted virtual CPU between the
/// end of the wait and the read), never shortened.
pub fn calibrate_timer() -> Option<u64> {
    const WINDOW_US: u64 = 10_000;
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    let mut best = u64::MAX;
    for _ in 0..3 {
        write(REG_TIMER_INITIAL, u32::MAX);
        tsc::delay_us(WINDOW_US);
        best = best.min(u64::from(u32::MAX - read(REG_TIMER_CURRENT)));
        write(REG_TIMER_INITIAL, 0);
    }
    let hz = best * 1_000_000 / WINDOW_US;
    (hz > 0).then(|| {
        TIMER_HZ.store(hz, Ordering::Relaxed);
        let tsc_hz = tsc::hz();
        if tsc_hz > 0 {
            let per_tsc = (u128::from(hz) << 32).div_ceil(u128::from(tsc_hz));
            TIMER_PER_TSC.store(u64::try_from(per_tsc).unwrap_or(0), Ordering::Relaxed);
            MARGIN.store(u64::from(oneshot_count(1)), Ordering::Relaxed);
        }
        hz
    })
}

/// Arms a one-shot timer interrupt ([`TIMER_VECTOR`]) after `us` microseconds.
pub fn arm_oneshot_us(us: u64) {
    arm_oneshot_count(oneshot_count(us));
}

/// Arms a one-shot timer interrupt no earlier than `ticks` TSC ticks from now (plus about a microsecond's margin):
/// the per-entry path of the SVM backend, so one multiplication and two register writes. Before calibration, or
/// with a TSC rate the fixed point cannot hold, it takes the microsecond path.
pub fn arm_oneshot_ticks(ticks: u64) {
    let per_tsc = TIMER_PER_TSC.load(Ordering::Relaxed);
    if per_tsc == 0 {
        arm_oneshot_us(tsc::ticks_to_us(ticks) + 1);
        return;
    }
    let count = u64::try_from((u128::from(ticks) * u128::from(per_tsc)) >> 32)
        .unwrap_or(u64::MAX)
        .saturating_add(MARGIN.load(Ordering::Relaxed));
    arm_oneshot_count(u32::try_from(count).unwrap_or(u32::MAX));
}

/// The one-shot initial count for `us` microseconds (at least 1), for callers that arm the same interval often
/// ([`arm_oneshot_count`]; 0 timer ticks per second before [`calibrate_timer`] gives 1).
pub fn oneshot_count(us: u64) -> u32 {
    u32::try_from(timer_hz() * us / 1_000_000)
        .unwrap_or(u32::MAX)
        .max(1)
}

/// Arms a one-shot timer interrupt after `count` divided timer ticks ([`oneshot_count`]): two register writes. The
/// divider is set once per CPU by [`init_cpu`] (and [`calibrate_timer`]), never changed after.
pub fn arm_oneshot_count(count: u32) {
    write(REG_LVT_TIMER, u32::from(TIMER_VECTOR));
    write(REG_TIMER_INITIAL, count.max(1));
}

/// Restarts the one-shot timer with `count` divided timer ticks, when the LVT is known to be in one-shot mode,
/// unmasked, with [`TIMER_VECTOR`] (the last arming was [`arm_oneshot_count`], [`arm_oneshot_us`] or
/// [`arm_oneshot_ticks`], with no [`disarm`] or [`arm_deadline`] since): a write of the initial count starts a new
/// count-down (Intel SDM Vol. 3A §11.5.4), so one register write.
pub fn rearm_oneshot_count(count: u32) {
    write(REG_TIMER_INITIAL, count.max(1));
}

/// Arms a TSC-deadline timer interrupt at TSC value `deadline`; false when the mode is unsupported.
pub fn arm_deadline(deadline: u64) -> bool {
    if !has_tsc_deadline() {
        return false;
    }
    write(REG_LVT_TIMER, LVT_TSC_DEADLINE | u32::from(TIMER_VECTOR));
    // The LVT write must be ordered before the deadline write (Intel SDM Vol. 3A, 11.5.4.1).
    // SAFETY: MFENCE has no memory-safety effect.
    unsafe { core::arch::asm!("mfence", options(nostack, preserves_flags)) };
    // SAFETY: IA32_TSC_DEADLINE exists (CPUID.1:ECX[24] checked above).
    unsafe { cpu::wrmsr(cpu::IA32_TSC_DEADLINE, deadline) };
    true
}

/// Stops the timer in whatever mode it runs.
pub fn disarm() {
    if has_tsc_deadline() {
        // SAFETY: IA32_TSC_DEADLINE exists; zero disarms it.
        unsafe { cpu::wrmsr(cpu::IA32_TSC_DEADLINE, 0) };
    }
    write(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    write(REG_TIMER_INITIAL, 0);
}
