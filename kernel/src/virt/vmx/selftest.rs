//! The `vmx` self-test: a bring-up proof of the backend that does not need the VM runtime.
//!
//! It enables VMX on the current CPU, builds a 64 KiB guest (GDT, identity page tables and code at the guest-abi
//! addresses) mapped by EPT with 4 KiB pages, and runs this code in 64-bit long mode:
//!
//! ```text
//! 0x5000  l: xor eax,eax; cpuid; dec rsi; jnz l   ; ROUNDS CPUID exits, RSI counts them in the guest
//! 0x5009  mov dx,0x3f8; mov al,'V'; out dx,al     ; I/O exit: port, size, direction, data
//! 0x5010  add r15,r14                             ; GPRs written by the host survive entries and exits
//! 0x5013  mov eax,0x1234; vmcall                  ; hypercall exit with RAX
//! 0x501B  mov rax,[0x100000]                      ; EPT violation (GPA not mapped), mapped by the host, retried
//! 0x5023  ud2                                     ; #UD intercepted through the exception bitmap
//! 0x5025  hlt                                     ; HLT exit
//! 0x5026  jmp $
//! 0x5030  sti; jmp $                              ; a host LAPIC timer interrupt exits (and reaches the host),
//!                                                 ; then the preemption timer ends the slice
//! ```
//!
//! then injects #GP into the guest, which has no IDT, and expects the triple-fault exit. Fresh vCPUs on the same EPT
//! then run: a guest-timed loop at 0x6000 (RDTSC around CPUID, reported by VMCALL: the round trip as the guest
//! sees it); an MSR/port program at 0x7100 (LSTAR written and read back without exits and the host's LSTAR intact,
//! MISC_ENABLE RDMSR/WRMSR exits, `IN al,0x71`); a CR2 program at 0x7200 (the guest's CR2 survives an exit during
//! which the CPU's CR2 changed); a real-mode vCPU at 0700:0000 (HLT) when the CPU has unrestricted
//! guest; and two vCPUs with a control field and a guest-state field broken on purpose, whose entry failures must
//! decode as VM-instruction error 7 and exit reason 33. Every exit is checked (kind, operands, RIP) and must survive
//! the exit trail's packing (`crate::virt::packed`) unchanged. The round trip is the host TSC across `run()` for a CPUID exit plus `skip_instruction`,
//! median of ROUNDS. On a CPU without VMX (or with VMX disabled by firmware, or without EPT or the preemption timer)
//! it reports "skipped: ..." with the reason — as a pass, because nothing is wrong with the kernel on that machine;
//! the word "skipped" is the signal that nothing was proven, and a harness that must prove VMX has to require a
//! detail without it.

// A failing test's explanation travels in the error: its size is the point.
#![allow(clippy::result_large_err)]

use alloc::vec::Vec;
use core::fmt::Write;

use virt::entry::{EntryState, CODE_DESCRIPTOR, DATA_DESCRIPTOR};
use virt::paging::{Attrs, PageSize};
use virt::{AccessSize, Gpr, IoDirection, Vcpu, VmExit};

use super::caps::{Caps, ControlKind};
use super::cpu;
use super::ept::GuestPhysMap;
use super::fields::{pin, secondary};
use super::vcpu::{real_mode_entry, VcpuConfig, VmxVcpu};
use super::VmxError;
use crate::arch::x86_64::{paging, tsc};
use crate::mm::frame;
use crate::virt::packed;

/// A result line's detail.
pub type Detail = heapless::String<160>;

const ROUNDS: u64 = 1000;
/// Short preemption-timer slices whose worst lateness is reported.
const SHORT_SLICES: u64 = 100;
const GUEST_PAGES: u64 = 16;
const CODE: u64 = 0x5000;
const LATE_GPA: u64 = 0x10_0000;
const LATE_VALUE: u64 = 0xC0DE_CAFE_F00D_BEEF;
const R14: u64 = 0x1111_2222_3333_4444;
const R15: u64 = 0x0101_0101_0101_0101;

/// At 0x6000: the guest measures one CPUID exit with RDTSC on both sides and reports the delta by VMCALL in RAX.
const TIMED_CODE: u64 = 0x6000;
const TIMED_GUEST: [u8; 33] = [
    0x0F, 0x31, // rdtsc
    0x48, 0xC1, 0xE2, 0x20, // shl rdx,32
    0x48, 0x09, 0xD0, // or rax,rdx
    0x49, 0x89, 0xC0, // mov r8,rax
    0x31, 0xC0, // xor eax,eax
    0x0F, 0xA2, // cpuid
    0x0F, 0x31, // rdtsc
    0x48, 0xC1, 0xE2, 0x20, // shl rdx,32
    0x48, 0x09, 0xD0, // or rax,rdx
    0x4C, 0x29, 0xC0, // sub rax,r8
    0x0F, 0x01, 0xC1, // vmcall
    0xEB, 0xDF, // jmp 0x6000
];

/// At 0x5030: `sti; jmp $` — spin with interrupts enabled (see [`host_interrupt`]).
const SPIN_CODE: u64 = 0x5030;

/// TSC offset of the guest-timed vCPU: its RDTSC must read the host TSC plus this.
const TSC_OFFSET: u64 = 1 << 50;

/// At 0x7100: MSR and port checks, on a fresh vCPU.
const MSR_CODE: u64 = 0x7100;
const MSR_GUEST: [u8; 38] = [
    0xB9, 0x82, 0x00, 0x00,
    0xC0, // mov ecx,0xC0000082 (LSTAR: passed through, switched by the MSR areas)
    0xB8, 0xEF, 0xBE, 0xAD, 0xDE, // mov eax,0xDEADBEEF
    0xBA, 0x34, 0x12, 0x00, 0x00, // mov edx,0x1234 (LSTAR must be canonical)
    0x0F, 0x30, // wrmsr (no exit)
    0x31, 0xC0, // xor eax,eax
    0x31, 0xD2, // xor edx,edx
    0x0F, 0x32, // rdmsr (no exit)
    0x0F, 0x01, 0xC1, // vmcall
    0xB9, 0xA0, 0x01, 0x00, 0x00, // mov ecx,0x1A0 (MISC_ENABLE: intercepted)
    0x0F, 0x32, // rdmsr
    0x0F, 0x30, // wrmsr
    0xE4, 0x71, // in al,0x71
    0xF4, // hlt
];

/// At 0x7200: the guest sets CR2, exits, and reads CR2 back after the host has changed the CPU's CR2 meanwhile
/// (as another guest's page fault would): the backend must save the guest's CR2 at the exit and restore it.
const CR2_CODE: u64 = 0x7200;
/// The value the CR2 guest writes (canonical, every byte distinct).
const CR2_GUEST_VALUE: u64 = 0x0000_7654_3210_fedc;
const CR2_GUEST: [u8; 23] = [
    0x48, 0xB8, 0xDC, 0xFE, 0x10, 0x32, 0x54, 0x76, 0x00, 0x00, // mov rax,CR2_GUEST_VALUE
    0x0F, 0x22, 0xD0, // mov cr2,rax
    0x0F, 0x01, 0xC1, // vmcall
    0x0F, 0x20, 0xD0, // mov rax,cr2
    0x0F, 0x01, 0xC1, // vmcall
    0xF4, // hlt
];

const GUEST_CODE: [u8; 40] = [
    0x31, 0xC0, // xor eax,eax
    0x0F, 0xA2, // cpuid
    0x48, 0xFF, 0xCE, // dec rsi
    0x75, 0xF7, // jnz -9
    0x66, 0xBA, 0xF8, 0x03, // mov dx,0x3f8
    0xB0, 0x56, // mov al,'V'
    0xEE, // out dx,al
    0x4D, 0x01, 0xF7, // add r15,r14
    0xB8, 0x34, 0x12, 0x00, 0x00, // mov eax,0x1234
    0x0F, 0x01, 0xC1, // vmcall
    0x48, 0x8B, 0x04, 0x25, 0x00, 0x00, 0x10, 0x00, // mov rax,[0x100000]
    0x0F, 0x0B, // ud2
    0xF4, // hlt
    0xEB, 0xFE, // jmp $
];

macro_rules! detail {
    ($($arg:tt)*) => {{
        let mut d = Detail::new();
        // Overflowing the buffer only truncates the explanation.
        let _ = write!(d, $($arg)*);
        d
    }};
}

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(detail!($($arg)*));
        }
    };
}

/// Guest memory: host frames backing GPA 0.. in 4 KiB pages, freed on drop.
struct GuestMem {
    frames: Vec<u64>,
}

impl GuestMem {
    fn new(pages: u64) -> Result<Self, Detail> {
        let mut m = Self { frames: Vec::new() };
        for _ in 0..pages {
            let f = frame::alloc_zeroed_below(u64::MAX)
                .ok_or_else(|| detail!("out of frames for guest memory"))?;
            m.frames.push(f);
        }
        Ok(m)
    }

    fn write(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), Detail> {
        for (i, b) in bytes.iter().enumerate() {
            let a = gpa + u64::try_from(i).unwrap_or(u64::MAX);
            let page = usize::try_from(a / 4096).unwrap_or(usize::MAX);
            let f = *self
                .frames
                .get(page)
                .ok_or_else(|| detail!("guest write outside memory at {a:#x}"))?;
            // SAFETY: `f` is a guest frame owned by this test, mapped by the direct map; the offset is < 4096.
            unsafe { paging::phys_to_virt(f + a % 4096).write_volatile(*b) };
        }
        Ok(())
    }

    fn write_u64(&mut self, gpa: u64, v: u64) -> Result<(), Detail> {
        self.write(gpa, &v.to_le_bytes())
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        for &f in &self.frames {
            // SAFETY: each frame came from the allocator in `new`/`push` and no EPT or vCPU uses it any more (they are
            // dropped first: declared after this value in `run_test`).
            unsafe { frame::free(f) };
        }
    }
}

/// Runs the test: `Ok(detail)` for a pass (or a skip), `Err(detail)` for a failure.
pub fn run() -> Result<Detail, Detail> {
    if !cpu::has_vmx() {
        return Ok(detail!("skipped: no vmx"));
    }
    for e in packed::samples() {
        packed::check_round_trip(e)?;
    }
    let caps = match cpu::enable() {
        Ok(c) => c,
        // The machine, not the kernel, rules VMX out: say so, as a skip.
        Err(VmxError::DisabledByFirmware) => {
            return Ok(detail!("skipped: vmx disabled by firmware"))
        }
        Err(e) => return Err(detail!("VMX enable failed: {e:?}")),
    };
    if let Some(missing) = missing_feature(&caps) {
        return Ok(detail!("skipped: vmx without {missing}"));
    }
    let mut mem = GuestMem::new(GUEST_PAGES)?;
    // Declared after `mem`: dropped before it, so the EPT and the vCPU release the guest frames first.
    let mut map = GuestPhysMap::new().map_err(|e| detail!("EPT root: {e:?}"))?;
    build_guest(&mut mem, &mut map)?;
    let config = VcpuConfig {
        eptp: map.eptp(),
        entry: long_mode(),
        exception_bitmap: 1 << 6,
        tsc_offset: 0,
    };
    let mut v = VmxVcpu::new(&config).map_err(|e| detail!("vCPU: {e:?}"))?;
    let (mut exits, median, slice_late) = drive(&mut v, &mut map, &mut mem)?;
    // The triple fault ended `v`'s guest; the guest-timed loop gets a fresh vCPU.
    let guest_median = guest_timed(&map)?;
    exits += 2 * ROUNDS;
    exits += msrs_and_ports(&map)?;
    exits += guest_cr2(&map)?;
    let real = if caps.allows(ControlKind::Secondary, secondary::UNRESTRICTED_GUEST) {
        real_mode(&map)?
    } else {
        "unsupported"
    };
    entry_failures(&map)?;
    drop(v);
    drop(map);
    Ok(detail!(
        "exits={} roundtrip_ticks={} guest_roundtrip_ticks={} timer_late_max_ticks={} real_mode={} entry_failures=decoded vpid={}",
        exits + 1,
        median,
        guest_median,
        slice_late,
        real,
        if caps.allows(ControlKind::Secondary, secondary::ENABLE_VPID) { "on" } else { "off" }
    ))
}

/// What the backend needs that this CPU lacks, if anything (the same checks `VmxVcpu::new` makes).
fn missing_feature(caps: &Caps) -> Option<&'static str> {
    if !caps.allows(ControlKind::Secondary, secondary::ENABLE_EPT) || !caps.ept_4level_wb() {
        Some("EPT")
    } else if !caps.allows(ControlKind::Pin, pin::PREEMPTION_TIMER) {
        Some("the preemption timer")
    } else {
        None
    }
}

/// GDT at 0x1000, PML4/PDPT/PD at 0x2000/0x3000/0x4000 identity-mapping 2 MiB, code at 0x5000; EPT maps the 64 KiB.
fn build_guest(mem: &mut GuestMem, map: &mut GuestPhysMap) -> Result<(), Detail> {
    mem.write_u64(0x1000, 0)?;
    mem.write_u64(0x1008, CODE_DESCRIPTOR)?;
    mem.write_u64(0x1010, DATA_DESCRIPTOR)?;
    mem.write_u64(0x2000, 0x3000 | 0x3)?;
    mem.write_u64(0x3000, 0x4000 | 0x3)?;
    mem.write_u64(0x4000, 0x83)?;
    mem.write(CODE, &GUEST_CODE)?;
    mem.write(TIMED_CODE, &TIMED_GUEST)?;
    mem.write(MSR_CODE, &MSR_GUEST)?;
    mem.write(CR2_CODE, &CR2_GUEST)?;
    mem.write(SPIN_CODE, &[0xFB, 0xEB, 0xFE])?;
    // Real-mode vCPU: HLT at 0x7000.
    mem.write(0x7000, &[0xF4])?;
    for (i, &f) in mem.frames.iter().enumerate() {
        let gpa = u64::try_from(i).unwrap_or(u64::MAX) * 4096;
        map.map(gpa, f, 4096, PageSize::Size4K, Attrs::RAM)
            .map_err(|e| detail!("EPT map {gpa:#x}: {e:?}"))?;
    }
    ensure!(
        map.translate(0x5123).map(|t| t.hpa) == Some(mem.frames[5] + 0x123),
        "EPT translate of 0x5123 wrong"
    );
    ensure!(
        map.translate(LATE_GPA).is_none(),
        "GPA {LATE_GPA:#x} mapped before the test maps it"
    );
    Ok(())
}

/// The ABI's long-mode entry state with RIP at the test code and the stack at the top of the 64 KiB.
fn long_mode() -> EntryState {
    EntryState::long_mode(CODE, 0, GUEST_PAGES * 4096)
}

fn far_deadline() -> u64 {
    tsc::rdtsc().saturating_add(1 << 40)
}

/// Runs until an exit other than a host interrupt. Every exit must survive the exit trail's packing
/// (`crate::virt::packed`) unchanged.
fn run_once(v: &mut VmxVcpu, deadline: u64) -> Result<VmExit, Detail> {
    let e = run_unchecked(v, deadline)?;
    packed::check_round_trip(Some(e))?;
    Ok(e)
}

/// [`run_once`] without the packing check, for the timed round trips (their callers check after the timing).
fn run_unchecked(v: &mut VmxVcpu, deadline: u64) -> Result<VmExit, Detail> {
    for _ in 0..1000 {
        match v.run(deadline) {
            Ok(VmExit::ExternalInterrupt) => continue,
            Ok(e) => return Ok(e),
            Err(f) => return Err(detail!("entry failed at rip {:#x}: {f:?}", v.rip())),
        }
    }
    Err(detail!("1000 host interrupts in a row"))
}

/// The guest's CR2 survives an exit during which the CPU's CR2 changed (see [`CR2_CODE`]), and the stop-dump
/// record shows it. Returns the exits checked.
fn guest_cr2(map: &GuestPhysMap) -> Result<u64, Detail> {
    let config = VcpuConfig {
        eptp: map.eptp(),
        entry: EntryState::long_mode(CR2_CODE, 0, GUEST_PAGES * 4096),
        exception_bitmap: 0,
        tsc_offset: 0,
    };
    let mut v = VmxVcpu::new(&config).map_err(|e| detail!("CR2 vCPU: {e:?}"))?;
    let e = run_once(&mut v, far_deadline())?;
    ensure!(
        e == VmExit::Hypercall && v.rip() == CR2_CODE + 13,
        "CR2 guest: {e:?} at {:#x}",
        v.rip()
    );
    let saved = v.last_entry().cr2;
    ensure!(
        saved == CR2_GUEST_VALUE,
        "guest CR2 saved at the exit as {saved:#x}, not {CR2_GUEST_VALUE:#x}"
    );
    // SAFETY: CR2 only records the last page-fault address; the kernel never reads it outside its #PF report, and
    // this is what another guest's page fault between two entries of this vCPU would do.
    unsafe {
        core::arch::asm!("mov cr2, {0}", in(reg) 0x1000_u64, options(nomem, nostack, preserves_flags))
    };
    v.skip_instruction();
    let e = run_once(&mut v, far_deadline())?;
    let seen = v.gpr(Gpr::Rax);
    ensure!(
        e == VmExit::Hypercall && seen == CR2_GUEST_VALUE,
        "CR2 guest read back {seen:#x} ({e:?}), not {CR2_GUEST_VALUE:#x}"
    );
    v.skip_instruction();
    let e = run_once(&mut v, far_deadline())?;
    ensure!(e == VmExit::Hlt, "CR2 guest: expected HLT, got {e:?}");
    Ok(3)
}

/// Drives the long-mode guest; returns (exits, median round trip, preemption lateness).
fn drive(
    v: &mut VmxVcpu,
    map: &mut GuestPhysMap,
    mem: &mut GuestMem,
) -> Result<(u64, u64, u64), Detail> {
    v.set_gpr(Gpr::Rsi, ROUNDS);
    v.set_gpr(Gpr::R14, R14);
    v.set_gpr(Gpr::R15, R15);
    let mut ticks = Vec::with_capacity(usize::try_from(ROUNDS).unwrap_or(0));
    for i in 0..ROUNDS {
        let t0 = tsc::rdtsc();
        let e = run_unchecked(v, far_deadline())?;
        ensure!(
            e == VmExit::Cpuid,
            "round {i}: expected CPUID, got {e:?} at rip {:#x}",
            v.rip()
        );
        ensure!(v.rip() == CODE + 2, "CPUID exit at rip {:#x}", v.rip());
        for r in [Gpr::Rax, Gpr::Rbx, Gpr::Rcx, Gpr::Rdx] {
            v.set_gpr(r, 0);
        }
        v.skip_instruction();
        ticks.push(tsc::rdtsc() - t0);
        packed::check_round_trip(Some(e))?;
    }
    ticks.sort_unstable();
    let median = ticks[ticks.len() / 2];
    let mut exits = ROUNDS;

    let e = run_once(v, far_deadline())?;
    let VmExit::Io(io) = e else {
        return Err(detail!("expected OUT, got {e:?} at rip {:#x}", v.rip()));
    };
    ensure!(
        io.port == 0x3F8
            && io.size == AccessSize::Byte
            && io.direction == IoDirection::Out
            && !io.string
            && !io.rep,
        "OUT decoded as {io:?}"
    );
    ensure!(
        v.gpr(Gpr::Rax) & 0xFF == u64::from(b'V'),
        "OUT data {:#x}",
        v.gpr(Gpr::Rax)
    );
    ensure!(v.rip() == 0x500F, "OUT exit at rip {:#x}", v.rip());
    v.skip_instruction();
    exits += 1;

    let e = run_once(v, far_deadline())?;
    ensure!(
        e == VmExit::Hypercall,
        "expected VMCALL, got {e:?} at rip {:#x}",
        v.rip()
    );
    ensure!(
        v.gpr(Gpr::Rax) == 0x1234,
        "VMCALL RAX {:#x}",
        v.gpr(Gpr::Rax)
    );
    ensure!(
        v.gpr(Gpr::Rsi) == 0,
        "guest loop counter RSI {} after {ROUNDS} CPUIDs",
        v.gpr(Gpr::Rsi)
    );
    ensure!(
        v.gpr(Gpr::R15) == R15.wrapping_add(R14) && v.gpr(Gpr::R14) == R14,
        "R14/R15 not preserved: {:#x}/{:#x}",
        v.gpr(Gpr::R14),
        v.gpr(Gpr::R15)
    );
    v.set_gpr(Gpr::Rax, 0);
    v.skip_instruction();
    exits += 1;

    let e = run_once(v, far_deadline())?;
    let VmExit::NestedPageFault { gpa, access } = e else {
        return Err(detail!(
            "expected EPT violation, got {e:?} at rip {:#x}",
            v.rip()
        ));
    };
    ensure!(
        gpa == LATE_GPA && access.read && !access.write && !access.execute,
        "EPT violation {gpa:#x} {access:?}"
    );
    ensure!(v.rip() == 0x501B, "EPT violation at rip {:#x}", v.rip());
    exits += 1;
    // Back the page and retry the same instruction.
    let page =
        frame::alloc_zeroed_below(u64::MAX).ok_or_else(|| detail!("no frame for the late page"))?;
    mem.frames.push(page);
    // SAFETY: the frame was just allocated to this test and is mapped by the direct map.
    unsafe {
        paging::phys_to_virt(page)
            .cast::<u64>()
            .write_volatile(LATE_VALUE)
    };
    map.map(LATE_GPA, page, 4096, PageSize::Size4K, Attrs::RAM)
        .map_err(|e| detail!("late map: {e:?}"))?;

    let e = run_once(v, far_deadline())?;
    ensure!(
        e == VmExit::Exception {
            vector: 6,
            error_code: None
        },
        "expected #UD, got {e:?} at rip {:#x}",
        v.rip()
    );
    ensure!(
        v.gpr(Gpr::Rax) == LATE_VALUE,
        "read after EPT fix gave {:#x}",
        v.gpr(Gpr::Rax)
    );
    ensure!(v.rip() == 0x5023, "#UD at rip {:#x}", v.rip());
    v.set_rip(0x5025);
    exits += 1;

    let e = run_once(v, far_deadline())?;
    ensure!(
        e == VmExit::Hlt && v.rip() == 0x5025,
        "expected HLT at 0x5025, got {e:?} at {:#x}",
        v.rip()
    );
    v.skip_instruction();
    exits += 1;

    exits += host_interrupt(v)?;

    let slice = 200_000;
    let deadline = tsc::rdtsc() + slice;
    let e = run_once(v, deadline)?;
    let now = tsc::rdtsc();
    ensure!(
        e == VmExit::SliceExpired,
        "expected the preemption timer, got {e:?} at rip {:#x}",
        v.rip()
    );
    ensure!(
        v.rip() == SPIN_CODE + 1,
        "slice ended at rip {:#x}",
        v.rip()
    );
    // The timer counts in units of 2^rate ticks, so it may fire up to one unit before the deadline.
    let grain = 1u64 << v.timer_rate();
    ensure!(
        now + grain >= deadline,
        "slice ended {} ticks early",
        deadline - now
    );
    let mut late = now.saturating_sub(deadline);
    exits += 1;
    // Short slices of varied length (25-300 us at Bochs's 20 MHz TSC): the worst lateness is the figure reported.
    for k in 0..SHORT_SLICES {
        let slice = 500 + (k * 37) % 5500;
        let deadline = tsc::rdtsc() + slice;
        let e = run_once(v, deadline)?;
        let now = tsc::rdtsc();
        ensure!(
            e == VmExit::SliceExpired,
            "short slice {k} of {slice} ticks ended with {e:?}"
        );
        ensure!(
            now + grain >= deadline,
            "short slice {k} ended {} ticks early",
            deadline - now
        );
        late = late.max(now.saturating_sub(deadline));
        exits += 1;
    }

    v.inject_exception(13, Some(0));
    let e = run_once(v, far_deadline())?;
    ensure!(
        e == VmExit::TripleFault,
        "#GP into a guest without IDT gave {e:?}, not a triple fault"
    );
    Ok((exits, median, late))
}

/// WRMSR/RDMSR of LSTAR pass through (no exit) and stay the guest's (the host's LSTAR is unchanged at the next
/// exit); MISC_ENABLE exits for RDMSR and WRMSR with ECX decoded by the layer above; `IN al,0x71` exits as a 1-byte
/// input from port 0x71. Returns the number of exits checked.
fn msrs_and_ports(map: &GuestPhysMap) -> Result<u64, Detail> {
    const IA32_LSTAR: u32 = 0xC000_0082;
    let config = VcpuConfig {
        eptp: map.eptp(),
        entry: EntryState::long_mode(MSR_CODE, 0, GUEST_PAGES * 4096),
        exception_bitmap: 0,
        tsc_offset: 0,
    };
    let mut v = VmxVcpu::new(&config).map_err(|e| detail!("MSR vCPU: {e:?}"))?;
    // SAFETY: LSTAR exists on every x86_64 CPU; reading it has no side effects.
    let host_lstar = unsafe { crate::arch::x86_64::cpu::rdmsr(IA32_LSTAR) };
    let e = run_once(&mut v, far_deadline())?;
    ensure!(
        e == VmExit::Hypercall && v.rip() == MSR_CODE + 0x17,
        "MSR guest: {e:?} at {:#x}",
        v.rip()
    );
    let (rax, rdx) = (v.gpr(Gpr::Rax), v.gpr(Gpr::Rdx));
    ensure!(
        rax == 0xDEAD_BEEF && rdx == 0x1234,
        "guest LSTAR read back {rdx:#x}:{rax:#x}"
    );
    // SAFETY: as above.
    let after = unsafe { crate::arch::x86_64::cpu::rdmsr(IA32_LSTAR) };
    ensure!(
        after == host_lstar,
        "host LSTAR {after:#x} after the guest wrote it (was {host_lstar:#x})"
    );
    v.skip_instruction();
    let e = run_once(&mut v, far_deadline())?;
    ensure!(
        e == VmExit::Rdmsr && v.gpr(Gpr::Rcx) == 0x1A0,
        "expected RDMSR 0x1a0, got {e:?}"
    );
    v.set_gpr(Gpr::Rax, 1);
    v.set_gpr(Gpr::Rdx, 0);
    v.skip_instruction();
    let e = run_once(&mut v, far_deadline())?;
    ensure!(
        e == VmExit::Wrmsr && v.rip() == MSR_CODE + 0x21,
        "expected WRMSR, got {e:?} at {:#x}",
        v.rip()
    );
    v.skip_instruction();
    let e = run_once(&mut v, far_deadline())?;
    let VmExit::Io(io) = e else {
        return Err(detail!("expected IN, got {e:?}"));
    };
    ensure!(
        io.port == 0x71
            && io.size == AccessSize::Byte
            && io.direction == IoDirection::In
            && !io.string,
        "IN decoded as {io:?}"
    );
    v.skip_instruction();
    let e = run_once(&mut v, far_deadline())?;
    ensure!(
        e == VmExit::Hlt && v.rip() == MSR_CODE + 0x25,
        "expected HLT, got {e:?} at {:#x}",
        v.rip()
    );
    Ok(5)
}

/// Runs the guest-timed loop on a fresh vCPU: ROUNDS pairs of CPUID (timed by the guest) and VMCALL (reporting
/// the time), with a TSC offset the guest's RDTSC must show; returns the median CPUID round trip in guest TSC
/// ticks.
fn guest_timed(map: &GuestPhysMap) -> Result<u64, Detail> {
    let config = VcpuConfig {
        eptp: map.eptp(),
        entry: EntryState::long_mode(TIMED_CODE, 0, GUEST_PAGES * 4096),
        exception_bitmap: 0,
        tsc_offset: TSC_OFFSET,
    };
    let mut v = VmxVcpu::new(&config).map_err(|e| detail!("timed vCPU: {e:?}"))?;
    let mut ticks = Vec::with_capacity(usize::try_from(ROUNDS).unwrap_or(0));
    for i in 0..ROUNDS {
        let before = tsc::rdtsc();
        // Unchecked: the guest times everything the host does between its exit and the next entry.
        let e = run_unchecked(&mut v, far_deadline())?;
        // R8 holds the guest's first RDTSC of this round: the host TSC plus the offset, taken during this run.
        let seen = v.gpr(Gpr::R8);
        let (lo, hi) = (v.guest_tsc(before), v.guest_tsc(tsc::rdtsc()));
        ensure!(
            (lo..=hi).contains(&seen),
            "guest TSC {seen:#x} outside [{lo:#x}, {hi:#x}]"
        );
        ensure!(
            e == VmExit::Cpuid && v.rip() == TIMED_CODE + 0xE,
            "timed round {i}: {e:?} at {:#x}",
            v.rip()
        );
        v.skip_instruction();
        let e = run_unchecked(&mut v, far_deadline())?;
        ensure!(
            e == VmExit::Hypercall && v.rip() == TIMED_CODE + 0x1C,
            "timed round {i}: {e:?} at {:#x}",
            v.rip()
        );
        ticks.push(v.gpr(Gpr::Rax));
        v.skip_instruction();
    }
    ticks.sort_unstable();
    Ok(ticks[ticks.len() / 2])
}

/// Breaks a control field and a guest-state field on purpose and checks both entry failures are decoded: CR3-target
/// count 5 (more than the 4 the SDM allows, §27.2.1.1) must fail VMLAUNCH with VM-instruction error 7, and guest RFLAGS
/// with reserved bit 1 clear (§27.3.1.4) must fail with exit reason 33, "invalid guest state".
fn entry_failures(map: &GuestPhysMap) -> Result<(), Detail> {
    use super::fields::{Control32, GuestNat};
    use virt::EntryFailure;
    let config = VcpuConfig {
        eptp: map.eptp(),
        entry: long_mode(),
        exception_bitmap: 0,
        tsc_offset: 0,
    };
    let mut v = VmxVcpu::new(&config).map_err(|e| detail!("vCPU: {e:?}"))?;
    v.overwrite_field(Control32::Cr3TargetCount, 5)
        .map_err(|e| detail!("VMWRITE: {e}"))?;
    let r = v.run(far_deadline());
    ensure!(
        r == Err(EntryFailure::VmxInstructionError(7)),
        "bad control field gave {r:?}, not error 7"
    );
    let mut v = VmxVcpu::new(&config).map_err(|e| detail!("vCPU: {e:?}"))?;
    v.overwrite_field(GuestNat::Rflags, 0)
        .map_err(|e| detail!("VMWRITE: {e}"))?;
    let r = v.run(far_deadline());
    ensure!(
        matches!(
            r,
            Err(EntryFailure::VmxInvalidGuestState { reason: 33, .. })
        ),
        "bad guest RFLAGS gave {r:?}, not exit reason 33"
    );
    Ok(())
}

/// While the guest spins at 0x5031 (after its own STI), a host LAPIC timer interrupt must end the run as
/// `ExternalInterrupt` and then reach the host's own handler (the per-CPU tick count moves) once `run` re-enables
/// interrupts. Returns the exits checked.
///
/// The guest enables its interrupts first because Bochs 2.7 does not take external-interrupt exits from a guest
/// with RFLAGS.IF=0 entered from a host with IF=0 (it re-evaluates its interrupt mask only when IF changes, and the
/// entry loads the guest's IF before it marks the CPU as being in non-root operation). The SDM says the exit happens
/// regardless of the guest's IF (Vol. 3C §26.7.1, "Event Blocking"); on Bochs a guest with IF=0 is stopped by the
/// preemption timer, which is what ends every slice anyway.
fn host_interrupt(v: &mut VmxVcpu) -> Result<u64, Detail> {
    use crate::arch::x86_64::{lapic, percpu};
    use core::sync::atomic::Ordering;
    use x86_64::instructions::interrupts;
    let Some(me) = percpu::try_current() else {
        return Err(detail!("no per-CPU area"));
    };
    if !lapic::is_initialised() {
        return Err(detail!("LAPIC not initialised"));
    }
    let was_enabled = interrupts::are_enabled();
    let before = me.timer_ticks.load(Ordering::Relaxed);
    interrupts::enable();
    v.set_rip(SPIN_CODE);
    lapic::arm_oneshot_us(200);
    let e = v.run(far_deadline());
    let delivered = tsc::wait_until(100_000, || me.timer_ticks.load(Ordering::Relaxed) != before);
    lapic::disarm();
    if !was_enabled {
        interrupts::disable();
    }
    ensure!(
        e == Ok(VmExit::ExternalInterrupt),
        "host timer during the guest gave {e:?}"
    );
    ensure!(
        delivered,
        "the host timer interrupt never reached the host handler after the exit"
    );
    ensure!(
        v.rip() == SPIN_CODE + 1,
        "interrupted at rip {:#x}",
        v.rip()
    );
    Ok(1)
}

/// Enters a second vCPU in real mode at 0700:0000 (HLT) through unrestricted guest.
fn real_mode(map: &GuestPhysMap) -> Result<&'static str, Detail> {
    let config = VcpuConfig {
        eptp: map.eptp(),
        entry: real_mode_entry(0x0700, 0, 0x7000),
        exception_bitmap: 0,
        tsc_offset: 0,
    };
    let mut v = VmxVcpu::new(&config).map_err(|e| detail!("real-mode vCPU: {e:?}"))?;
    let e = run_once(&mut v, far_deadline())?;
    ensure!(
        e == VmExit::Hlt && v.rip() == 0,
        "real mode: expected HLT at 0700:0000, got {e:?} at ip {:#x}",
        v.rip()
    );
    Ok("ok")
}
