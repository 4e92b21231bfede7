//! The `svm` self-test: a bring-up proof of the backend, independent of the VM runtime.
//!
//! It builds a tiny guest by hand (GDT and identity page tables as in docs/guest-abi.md, the code below copied to
//! guest-physical 0x20_0000, everything mapped through NPT), runs it with [`SvmVcpu`] and checks that every exit
//! decodes to the expected [`VmExit`] with the expected operands, in order:
//!
//! 1. `CPUID` (leaf 0) - the host's answer must reach the guest (checked at step 4);
//! 2. `OUT 0x3F8, AL` (byte) and `IN AL, 0x3FD` (byte);
//! 3. `RDMSR`/`WRMSR` of MSR 0x1A0 (intercepted: not on the allow list), the WRMSR echoing the RDMSR answer and the
//!    CPUID answer;
//! 4. a read of guest-physical 0x30_0000, which NPT does not map: a nested page fault; the test maps a page there and
//!    re-enters without advancing RIP, the read is retried and its value comes back in a 32-bit `OUT`;
//! 5. `VMMCALL` with the ABI's argument registers;
//! 6. 1000 `CPUID` exits in a loop counting down R8 (proves the GPR switch; the median host-side round trip, TSC
//!    ticks from before `run` to its return, is the reported figure);
//! 7. two spins on flags in guest memory, first with `STI`, then with `CLI` (bounded by R12 iterations): only the
//!    LAPIC-timer deadline (INTR intercept + V_INTR_MASKING) can stop them (`SliceExpired`, never before the
//!    deadline); the test then sets the flag. Bochs 2.7 cannot preempt the CLI spin (see `guest_run`): there the
//!    bounded spin ends with `VMMCALL(4)` and the detail says `cli_preempt=no(bochs)`;
//! 8. a single step (RFLAGS.TF): the #DB is intercepted (a CVE-2015-8104 guard) and must reach the guest's own
//!    handler, which reports the RIP after the stepped instruction by `VMMCALL(7)`;
//! 9. `HLT`; the test then injects #GP with an error code: the guest's handler reports the error
//!    code and the pushed RIP by `VMMCALL(6)`, drops its IDT and executes `UD2`: a triple fault, `SHUTDOWN`
//!    (skipped on Bochs, which stops the emulator on a guest triple fault under the harness's settings).
//!
//! Finally a second vCPU with EFER.SVME cleared must fail entry with a report naming that rule (APM §15.5.1).
//! Every exit taken, and one exit of each kind with extreme operands (`packed::samples`), must survive the exit
//! trail's packing (`crate::virt::packed`) unchanged.
//! The guest uses only CPU 0 of the VM; the test runs on the CPU that calls it.

#![allow(clippy::result_large_err)] // the explanation travels in the error, as in kernel/src/selftest.rs

use alloc::vec::Vec;
use core::arch::global_asm;
use core::fmt::Write;

use virt::entry::EntryState;
use virt::paging::{Attrs, PageSize};
use virt::{AccessSize, EntryFailure, Gpr, IoDirection, Vcpu, VmExit};

use super::host;
use super::npt::NptMap;
use super::vcpu::{backend_msr_allow_list, SvmVcpu, SvmVm};
use super::vmcb::{Save64, Seg, Segment};
use crate::arch::x86_64::{cpu, paging, tsc};
use crate::mm::{frame, PAGE_SIZE};
use crate::virt::detect::VirtSupport;
use crate::virt::packed;

/// The test's explanation.
pub type Detail = heapless::String<160>;

/// What the test found.
#[derive(Debug)]
pub enum Outcome {
    Pass(Detail),
    Fail(Detail),
    /// Not an SVM machine (the reason says what it is).
    Skipped(Detail),
}

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

/// CPUID exits timed for the round-trip figure.
const ROUNDTRIPS: u32 = 1000;
/// Guest-physical layout.
const GDT_GPA: u64 = 0x1000;
const PML4_GPA: u64 = 0x2000;
const PDPT_GPA: u64 = 0x3000;
const PD_GPA: u64 = 0x4000;
const IDT_GPA: u64 = 0x5000;
const CODE_GPA: u64 = 0x20_0000;
/// Guest RAM: the low 32 KiB (GDT, page tables, IDT), one 4 KiB frame at a time, and 12 KiB at 2 MiB (code, then
/// stack) from three contiguous frames.
const LOW_PAGES: u64 = 8;
const CODE_PAGES: u64 = 3;
/// Not mapped until the guest touches it.
const LATE_GPA: u64 = 0x30_0000;
const LATE_MAGIC: u32 = 0xC0DE_5AFE;
/// What the test answers CPUID leaf 0 and RDMSR with.
const CPUID_EAX: u64 = 0x4000_0001;
const MSR_VALUE: u64 = 0x1234_5678_9ABC_DEF0;
/// Error code of the injected #GP.
const GP_ERROR_CODE: u32 = 0x18;
/// How long each spin runs before the deadline stops it.
const SPIN_US: u64 = 2_000;
/// Iterations of the CLI spin before the guest gives up (far beyond the deadline on QEMU: ~0.1-1 s of TCG).
const SPIN_BOUND: u64 = 200_000_000;
/// The same on Bochs, which cannot preempt it (see `guest_run`): ~3 million instructions.
const BOCHS_SPIN_BOUND: u64 = 1_000_000;
/// Bound on any single `run` (a wedged guest ends as SliceExpired and fails the test, never hangs it).
const RUN_LIMIT_US: u64 = 2_000_000;

global_asm!(
    r#"
    .section .rodata.svm_test_guest, "a"
    .balign 16
    .global svm_test_guest_start
svm_test_guest_start:
    xor eax, eax
    xor ecx, ecx
    cpuid
    mov r9, rax
    mov dx, 0x3f8
    mov al, 0x53
    out dx, al
    mov dx, 0x3fd
    in al, dx
    mov ecx, 0x1a0
    rdmsr
    mov rbx, r9
    wrmsr
    mov eax, dword ptr [0x300000]
    mov dx, 0x3f8
    out dx, eax
    mov eax, 0
    mov edi, 0x11
    mov esi, 0x22
    mov edx, 0x33
    vmmcall
    mov r8d, {roundtrips}
2:
    xor eax, eax
    cpuid
    dec r8d
    jnz 2b
    mov eax, 3
    vmmcall
    sti
3:
    cmp byte ptr [rip + svm_test_guest_flag], 0
    je 3b
    cli
    mov eax, 3
    vmmcall
5:
    cmp byte ptr [rip + svm_test_guest_flag + 1], 0
    jne 6f
    dec r12
    jnz 5b
    mov eax, 4
    vmmcall
6:
    pushfq
    or qword ptr [rsp], 0x100
    popfq
    nop
    .global svm_test_guest_after_step
svm_test_guest_after_step:
    hlt
    mov eax, 5
    vmmcall
4:
    jmp 4b
    .global svm_test_guest_db
svm_test_guest_db:
    and qword ptr [rsp + 16], -0x101
    mov eax, 7
    mov rdi, [rsp]
    vmmcall
    iretq
    .global svm_test_guest_gp
svm_test_guest_gp:
    mov eax, 6
    mov rdi, [rsp]
    mov rsi, [rsp + 8]
    vmmcall
    lidt [rip + 7f]
    ud2
7:
    .word 0
    .quad 0
    .global svm_test_guest_flag
svm_test_guest_flag:
    .byte 0, 0
    .global svm_test_guest_end
svm_test_guest_end:
    "#,
    roundtrips = const ROUNDTRIPS,
);

extern "C" {
    static svm_test_guest_start: u8;
    static svm_test_guest_gp: u8;
    static svm_test_guest_db: u8;
    static svm_test_guest_after_step: u8;
    static svm_test_guest_flag: u8;
    static svm_test_guest_end: u8;
}

/// Offsets of labels inside the guest code blob.
struct Labels {
    gp: u64,
    db: u64,
    after_step: u64,
    flag: u64,
}

/// The guest code bytes and the offsets of its labels.
fn guest_code() -> (&'static [u8], Labels) {
    // SAFETY: the symbols delimit one contiguous blob in .rodata; every label lies between start and end.
    unsafe {
        let start = core::ptr::addr_of!(svm_test_guest_start);
        let off = |p: *const u8| u64::try_from(p as usize - start as usize).unwrap_or(0);
        let labels = Labels {
            gp: off(core::ptr::addr_of!(svm_test_guest_gp)),
            db: off(core::ptr::addr_of!(svm_test_guest_db)),
            after_step: off(core::ptr::addr_of!(svm_test_guest_after_step)),
            flag: off(core::ptr::addr_of!(svm_test_guest_flag)),
        };
        let len = core::ptr::addr_of!(svm_test_guest_end) as usize - start as usize;
        (core::slice::from_raw_parts(start, len), labels)
    }
}

/// A 64-bit interrupt gate (Intel SDM Vol. 3A 6.14.1) to guest code at `handler`, as two quadwords.
fn gate(handler: u64) -> (u64, u64) {
    (
        (handler & 0xFFFF) | (0x08 << 16) | (0x8E00 << 32) | (((handler >> 16) & 0xFFFF) << 48),
        handler >> 32,
    )
}

/// Host frames backing guest memory, freed on drop.
struct GuestRam {
    /// (guest-physical page, host frame).
    pages: Vec<(u64, u64)>,
}

impl GuestRam {
    fn frame_of(&self, gpa: u64) -> Option<u64> {
        self.pages
            .iter()
            .find(|(g, _)| *g == gpa & !(PAGE_SIZE - 1))
            .map(|(_, f)| *f)
    }

    /// Writes `bytes` at guest-physical `gpa` (within one page).
    fn write(&self, gpa: u64, bytes: &[u8]) -> Option<()> {
        let off = usize::try_from(gpa % PAGE_SIZE).ok()?;
        if off + bytes.len() > 4096 {
            return None;
        }
        let f = self.frame_of(gpa)?;
        // SAFETY: the frame belongs to this guest RAM and is mapped by the direct map; the range stays in the page.
        unsafe {
            core::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                paging::phys_to_virt(f).add(off),
                bytes.len(),
            )
        };
        Some(())
    }

    fn write_u64(&self, gpa: u64, v: u64) -> Option<()> {
        self.write(gpa, &v.to_le_bytes())
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        for &(_, f) in &self.pages {
            // SAFETY: each frame came from the allocator for this guest, whose vCPUs and NPT are gone.
            unsafe { frame::free(f) };
        }
    }
}

/// Builds guest RAM and its NPT mappings; writes the GDT, the guest page tables and the code.
fn build_guest(npt: &mut NptMap) -> Result<(GuestRam, Labels), Detail> {
    let mut ram = GuestRam { pages: Vec::new() };
    for i in 0..LOW_PAGES {
        let gpa = i * PAGE_SIZE;
        let f = frame::alloc_zeroed_below(u64::MAX)
            .ok_or_else(|| detail!("out of frames for guest RAM"))?;
        ram.pages.push((gpa, f));
        npt.map(gpa, f, PAGE_SIZE, PageSize::Size4K, Attrs::RAM)
            .map_err(|e| detail!("NPT map {gpa:#x}: {e:?}"))?;
    }
    let code = frame::alloc_contiguous(CODE_PAGES)
        .ok_or_else(|| detail!("no contiguous frames for guest code"))?;
    for i in 0..CODE_PAGES {
        ram.pages
            .push((CODE_GPA + i * PAGE_SIZE, code + i * PAGE_SIZE));
        // SAFETY: the frame was just allocated for this guest and is mapped by the direct map.
        unsafe { core::ptr::write_bytes(paging::phys_to_virt(code + i * PAGE_SIZE), 0, 4096) };
    }
    npt.map_range(CODE_GPA, code, CODE_PAGES * PAGE_SIZE, Attrs::RAM)
        .map_err(|e| detail!("NPT map code: {e:?}"))?;
    let w = |gpa: u64, v: u64| {
        ram.write_u64(gpa, v)
            .ok_or_else(|| detail!("guest write at {gpa:#x} failed"))
    };
    w(GDT_GPA, 0)?;
    w(GDT_GPA + 8, virt::entry::CODE_DESCRIPTOR)?;
    w(GDT_GPA + 16, virt::entry::DATA_DESCRIPTOR)?;
    // Identity map of the first GiB with 2 MiB pages (present, writable, PS).
    w(PML4_GPA, PDPT_GPA | 0x3)?;
    w(PDPT_GPA, PD_GPA | 0x3)?;
    for i in 0..512u64 {
        w(PD_GPA + i * 8, (i << 21) | 0x83)?;
    }
    let (code, labels) = guest_code();
    ram.write(CODE_GPA, code)
        .ok_or_else(|| detail!("guest code ({} bytes) does not fit a page", code.len()))?;
    // IDT gates 1 (#DB) and 13 (#GP) to the handlers in the blob.
    for (vector, handler) in [(1u64, labels.db), (13, labels.gp)] {
        let (low, high) = gate(CODE_GPA + handler);
        w(IDT_GPA + vector * 16, low)?;
        w(IDT_GPA + vector * 16 + 8, high)?;
    }
    Ok((ram, labels))
}

/// Runs once with the standard bound; the exit must survive the exit trail's packing.
fn step(vcpu: &mut SvmVcpu, exits: &mut u32) -> Result<VmExit, Detail> {
    let e = step_unchecked(vcpu, exits)?;
    packed::check_round_trip(Some(e))?;
    Ok(e)
}

/// [`step`] without the packing check, for the timed round trips (the check is made after the time is taken).
fn step_unchecked(vcpu: &mut SvmVcpu, exits: &mut u32) -> Result<VmExit, Detail> {
    let deadline = tsc::rdtsc() + tsc::us_to_ticks(RUN_LIMIT_US);
    let e = vcpu
        .run(deadline)
        .map_err(|f| detail!("entry failed at rip {:#x}: {f:?}", vcpu.rip()))?;
    *exits += 1;
    Ok(e)
}

/// Runs until an exit other than a stray host interrupt.
fn next(vcpu: &mut SvmVcpu, exits: &mut u32) -> Result<VmExit, Detail> {
    for _ in 0..100 {
        match step(vcpu, exits)? {
            VmExit::ExternalInterrupt => continue,
            e => return Ok(e),
        }
    }
    Err(detail!(
        "100 host interrupts in a row at rip {:#x}",
        vcpu.rip()
    ))
}

fn expect_io(e: VmExit, port: u16, size: AccessSize, dir: IoDirection) -> Result<(), Detail> {
    match e {
        VmExit::Io(io)
            if io.port == port
                && io.size == size
                && io.direction == dir
                && !io.string
                && !io.rep =>
        {
            Ok(())
        }
        other => Err(detail!(
            "expected {dir:?} {port:#x}/{size:?}, got {other:?}"
        )),
    }
}

/// Runs with a [`SPIN_US`] deadline until an exit other than a stray host interrupt; returns the exit and how
/// late after the deadline it came (microseconds). A SliceExpired must not come before the deadline.
fn spin_until_deadline(vcpu: &mut SvmVcpu, exits: &mut u32) -> Result<(VmExit, u64), Detail> {
    let deadline = tsc::rdtsc() + tsc::us_to_ticks(SPIN_US);
    for _ in 0..100 {
        let e = vcpu
            .run(deadline)
            .map_err(|f| detail!("entry failed in a spin: {f:?}"))?;
        *exits += 1;
        packed::check_round_trip(Some(e))?;
        if e == VmExit::ExternalInterrupt {
            continue;
        }
        let now = tsc::rdtsc();
        ensure!(
            e != VmExit::SliceExpired || now >= deadline,
            "SliceExpired {} ticks early",
            deadline - now
        );
        return Ok((e, tsc::ticks_to_us(now.saturating_sub(deadline))));
    }
    Err(detail!("100 host interrupts in a row in a spin"))
}

/// Bochs: its port 0xE9 hack reads back 0xE9, and (unlike QEMU) it sets no CPUID hypervisor bit.
fn is_bochs() -> bool {
    // SAFETY: reading port 0xE9 has no side effect on any PC (unclaimed ports read as all ones).
    let v: u8 = unsafe { x86_64::instructions::port::PortReadOnly::new(0xE9).read() };
    v == 0xE9 && cpu::cpuid(1, 0).ecx & (1 << 31) == 0
}

fn guest_run(
    vcpu: &mut SvmVcpu,
    ram: &GuestRam,
    npt: &mut NptMap,
    labels: &Labels,
) -> Result<Detail, Detail> {
    let mut exits = 0u32;
    let e = next(vcpu, &mut exits)?;
    ensure!(
        e == VmExit::Cpuid && vcpu.rip() == CODE_GPA + 4,
        "1st exit {e:?} at {:#x}, expected CPUID",
        vcpu.rip()
    );
    ensure!(
        vcpu.gpr(Gpr::Rax) == 0,
        "CPUID leaf {:#x}, expected 0",
        vcpu.gpr(Gpr::Rax)
    );
    vcpu.set_gpr(Gpr::Rax, CPUID_EAX);
    vcpu.skip_instruction();

    let e = next(vcpu, &mut exits)?;
    expect_io(e, 0x3F8, AccessSize::Byte, IoDirection::Out)?;
    ensure!(
        vcpu.gpr(Gpr::Rax) & 0xFF == 0x53,
        "OUT data {:#x}",
        vcpu.gpr(Gpr::Rax)
    );
    vcpu.skip_instruction();
    let e = next(vcpu, &mut exits)?;
    expect_io(e, 0x3FD, AccessSize::Byte, IoDirection::In)?;
    vcpu.set_gpr(Gpr::Rax, 0x60);
    vcpu.skip_instruction();

    let e = next(vcpu, &mut exits)?;
    ensure!(
        e == VmExit::Rdmsr && vcpu.gpr(Gpr::Rcx) == 0x1A0,
        "expected RDMSR 0x1a0, got {e:?}"
    );
    vcpu.set_gpr(Gpr::Rax, MSR_VALUE & 0xFFFF_FFFF);
    vcpu.set_gpr(Gpr::Rdx, MSR_VALUE >> 32);
    vcpu.skip_instruction();
    let e = next(vcpu, &mut exits)?;
    let written = (vcpu.gpr(Gpr::Rdx) << 32) | (vcpu.gpr(Gpr::Rax) & 0xFFFF_FFFF);
    ensure!(
        e == VmExit::Wrmsr && written == MSR_VALUE,
        "expected WRMSR {MSR_VALUE:#x}, got {e:?} {written:#x}"
    );
    ensure!(
        vcpu.gpr(Gpr::Rbx) == CPUID_EAX,
        "CPUID answer not seen by the guest (rbx {:#x})",
        vcpu.gpr(Gpr::Rbx)
    );
    vcpu.skip_instruction();

    let e = next(vcpu, &mut exits)?;
    let rip = vcpu.rip();
    match e {
        VmExit::NestedPageFault { gpa, access }
            if gpa == LATE_GPA && access.read && !access.write => {}
        other => return Err(detail!("expected NPF read at {LATE_GPA:#x}, got {other:?}")),
    }
    let late =
        frame::alloc_zeroed_below(u64::MAX).ok_or_else(|| detail!("no frame for the late page"))?;
    // SAFETY: `late` was just allocated and is mapped by the direct map.
    unsafe {
        paging::phys_to_virt(late)
            .cast::<u32>()
            .write_volatile(LATE_MAGIC)
    };
    let mapped = npt.map(LATE_GPA, late, PAGE_SIZE, PageSize::Size4K, Attrs::RAM);
    if let Err(err) = mapped {
        // SAFETY: not mapped anywhere, freed once.
        unsafe { frame::free(late) };
        return Err(detail!("NPT map of the late page: {err:?}"));
    }
    // A TLB flush request must give the vCPU a fresh ASID on this CPU.
    let asid_before = vcpu.asid();
    vcpu.flush_tlb();
    let e = next(vcpu, &mut exits);
    ensure!(
        vcpu.asid() != asid_before,
        "flush_tlb kept ASID {asid_before}"
    );
    let late_ok =
        matches!(e, Ok(VmExit::Io(_))) && vcpu.gpr(Gpr::Rax) & 0xFFFF_FFFF == u64::from(LATE_MAGIC);
    let e = e?;
    expect_io(e, 0x3F8, AccessSize::Dword, IoDirection::Out)?;
    ensure!(
        late_ok && vcpu.rip() > rip,
        "after NPF the guest read {:#x}",
        vcpu.gpr(Gpr::Rax)
    );
    vcpu.skip_instruction();

    let e = next(vcpu, &mut exits)?;
    let args = [Gpr::Rax, Gpr::Rdi, Gpr::Rsi, Gpr::Rdx].map(|r| vcpu.gpr(r));
    ensure!(
        e == VmExit::Hypercall && args == [0, 0x11, 0x22, 0x33],
        "expected VMMCALL(0,11,22,33), got {e:?} {args:x?}"
    );
    vcpu.set_gpr(Gpr::Rax, 0);
    vcpu.set_gpr(Gpr::Rdx, 1);
    vcpu.skip_instruction();

    let mut ticks: Vec<u64> = Vec::with_capacity(usize::try_from(ROUNDTRIPS).unwrap_or(0));
    // A host interrupt (the host-turn timer, vcpu.rs module doc) may end any of these runs before the guest's
    // next CPUID: it is not a round trip and does not advance the count, which counts the guest's CPUIDs.
    let mut i = 0;
    let mut stray = 0u32;
    while i < ROUNDTRIPS {
        let t0 = tsc::rdtsc();
        let e = step_unchecked(vcpu, &mut exits)?;
        let t1 = tsc::rdtsc();
        packed::check_round_trip(Some(e))?;
        if e == VmExit::ExternalInterrupt {
            stray += 1;
            ensure!(
                stray <= 10 * ROUNDTRIPS,
                "{stray} host interrupts during {i} round trips"
            );
            continue;
        }
        let r8 = vcpu.gpr(Gpr::R8);
        ensure!(
            e == VmExit::Cpuid && r8 == u64::from(ROUNDTRIPS - i),
            "loop exit {i}: {e:?} with r8 {r8}"
        );
        vcpu.skip_instruction();
        ticks.push(t1 - t0);
        i += 1;
    }
    ticks.sort_unstable();
    let median = ticks
        .get(ticks.len() / 2)
        .copied()
        .ok_or_else(|| detail!("no round trip measured"))?;

    // STI spin: the guest takes no interrupt itself (INTR is intercepted); only the deadline stops it.
    let e = next(vcpu, &mut exits)?;
    ensure!(
        e == VmExit::Hypercall && vcpu.gpr(Gpr::Rax) == 3,
        "expected VMMCALL(3), got {e:?}"
    );
    vcpu.skip_instruction();
    let (e, sti_late_us) = spin_until_deadline(vcpu, &mut exits)?;
    ensure!(
        e == VmExit::SliceExpired,
        "STI spin ended with {e:?}, expected SliceExpired"
    );
    ram.write(CODE_GPA + labels.flag, &[1])
        .ok_or_else(|| detail!("cannot set the flag"))?;

    // CLI spin, bounded by R12 iterations so an emulator that never preempts it cannot hang the test.
    let e = next(vcpu, &mut exits)?;
    ensure!(
        e == VmExit::Hypercall && vcpu.gpr(Gpr::Rax) == 3,
        "expected 2nd VMMCALL(3), got {e:?}"
    );
    vcpu.skip_instruction();
    let bochs = is_bochs();
    vcpu.set_gpr(Gpr::R12, if bochs { BOCHS_SPIN_BOUND } else { SPIN_BOUND });
    let (e, cli_late_us) = spin_until_deadline(vcpu, &mut exits)?;
    let rflags = vcpu.vmcb().save64(Save64::Rflags);
    let cli = match e {
        VmExit::SliceExpired => {
            ensure!(
                rflags & (1 << 9) == 0,
                "guest IF set in the CLI spin (rflags {rflags:#x})"
            );
            ram.write(CODE_GPA + labels.flag + 1, &[1])
                .ok_or_else(|| detail!("cannot set the flag"))?;
            detail!("cli_late_us={cli_late_us}")
        }
        // Bochs 2.7 computes the interrupt mask at VMRUN before it marks the CPU as in the guest, so it masks
        // physical INTR for a guest entered with IF=0 despite V_INTR_MASKING (cpu/svm.cc, setEFlags during
        // SvmEnterLoadCheckGuestState); the guest's STI unmasks it, which is why the STI spin above is preempted.
        VmExit::Hypercall if bochs && vcpu.gpr(Gpr::Rax) == 4 => {
            vcpu.skip_instruction();
            detail!("cli_preempt=no(bochs)")
        }
        other => {
            return Err(detail!(
                "CLI spin ended with {other:?} (rax {}), expected SliceExpired",
                vcpu.gpr(Gpr::Rax)
            ))
        }
    };

    // Single step (RFLAGS.TF): the intercepted #DB must reach the guest's handler without surfacing as an exit.
    let e = next(vcpu, &mut exits)?;
    let step_rip = vcpu.gpr(Gpr::Rdi);
    ensure!(
        e == VmExit::Hypercall
            && vcpu.gpr(Gpr::Rax) == 7
            && step_rip == CODE_GPA + labels.after_step,
        "single step: got {e:?} rax {} rip {step_rip:#x}",
        vcpu.gpr(Gpr::Rax)
    );
    vcpu.skip_instruction();

    let e = next(vcpu, &mut exits)?;
    ensure!(
        e == VmExit::Hlt,
        "expected HLT, got {e:?} at {:#x}",
        vcpu.rip()
    );
    vcpu.skip_instruction();
    let resume = vcpu.rip();
    vcpu.vmcb_mut().set_segment(
        Seg::Idtr,
        Segment {
            selector: 0,
            attrib: 0,
            limit: 0xFFF,
            base: IDT_GPA,
        },
    );
    vcpu.inject_exception(13, Some(GP_ERROR_CODE));
    let e = next(vcpu, &mut exits)?;
    let (code, pushed_rip) = (vcpu.gpr(Gpr::Rdi), vcpu.gpr(Gpr::Rsi));
    ensure!(
        e == VmExit::Hypercall
            && vcpu.gpr(Gpr::Rax) == 6
            && code == u64::from(GP_ERROR_CODE)
            && pushed_rip == resume,
        "injected #GP: got {e:?} rax {} error {code:#x} rip {pushed_rip:#x} (expected {resume:#x})",
        vcpu.gpr(Gpr::Rax)
    );
    vcpu.skip_instruction();
    // The handler now drops its IDT and executes UD2: #UD, #GP, #DF, triple fault. Bochs with the harness's
    // `panic: action=fatal` stops the emulator on a guest triple fault before its SHUTDOWN intercept, so the last
    // step runs only elsewhere.
    let shutdown = if bochs {
        "shutdown=skipped(bochs)"
    } else {
        let e = next(vcpu, &mut exits)?;
        ensure!(
            e == VmExit::TripleFault,
            "expected a triple fault after UD2 without an IDT, got {e:?}"
        );
        "shutdown=ok"
    };

    Ok(detail!(
        "exits={exits} roundtrip_ticks={median} roundtrip_ns={} sti_late_us={sti_late_us} {cli} {shutdown} db={} asid={} cpu={}",
        tsc::ticks_to_us(median * 1000),
        vcpu.reinjected_exceptions(),
        vcpu.asid(),
        crate::arch::x86_64::percpu::current_id()
    ))
}

fn invalid_state(vm: &alloc::sync::Arc<SvmVm>, entry: &EntryState) -> Result<(), Detail> {
    let mut bad = SvmVcpu::new(vm, entry).map_err(|e| detail!("second vCPU: {e:?}"))?;
    let efer = bad.vmcb().save64(Save64::Efer);
    bad.vmcb_mut().set_save64(Save64::Efer, efer & !(1 << 12));
    let deadline = tsc::rdtsc() + tsc::us_to_ticks(RUN_LIMIT_US);
    match bad.run(deadline) {
        Err(EntryFailure::SvmInvalidState { detail }) if detail.contains("EFER.SVME") => Ok(()),
        other => Err(detail!("EFER.SVME=0 entry gave {other:?}")),
    }
}

fn run_test() -> Result<Detail, Detail> {
    for e in packed::samples() {
        packed::check_round_trip(e)?;
    }
    let mut npt = NptMap::new().map_err(|e| detail!("NPT root: {e:?}"))?;
    let (ram, labels) = build_guest(&mut npt)?;
    // SAFETY: the NPT maps only this test's frames and outlives both vCPUs (dropped in reverse order below).
    let vm = unsafe { SvmVm::new(npt.ncr3(), &backend_msr_allow_list()) }
        .map_err(|e| detail!("VM: {e:?}"))?;
    for (msr, write, exits) in [
        (0x1A0, false, true),
        (0x1A0, true, true),
        (0xC000_0080, true, false),
        (0x174, false, false),
    ] {
        ensure!(
            vm.msr_exits(msr, write) == exits,
            "MSRPM: MSR {msr:#x} write={write} exits={}",
            !exits
        );
    }
    let entry = EntryState::long_mode(CODE_GPA, 0, CODE_GPA + CODE_PAGES * PAGE_SIZE);
    let mut vcpu = SvmVcpu::new(&vm, &entry).map_err(|e| detail!("vCPU: {e:?}"))?;
    vcpu.set_tsc_offset(0u64.wrapping_sub(tsc::rdtsc()));
    // The guest has an IDT (gates for #DB and #GP) from the start.
    vcpu.vmcb_mut().set_segment(
        Seg::Idtr,
        Segment {
            selector: 0,
            attrib: 0,
            limit: 0xFFF,
            base: IDT_GPA,
        },
    );
    let result = guest_run(&mut vcpu, &ram, &mut npt, &labels);
    let invalid = invalid_state(&vm, &entry);
    drop(vcpu);
    drop(vm);
    let late = npt.translate(LATE_GPA).map(|t| t.hpa);
    drop(npt);
    if let Some(f) = late {
        // SAFETY: the late page was allocated by `guest_run` and its only mapping (the NPT) is gone.
        unsafe { frame::free(f) };
    }
    drop(ram);
    let detail = result?;
    invalid?;
    // Per-CPU enabling took: EFER.SVME set and VM_HSAVE_PA pointing at this CPU's page.
    let (asids, hsave) =
        host::this_cpu(|c| (c.asids(), c.hsave_pa())).map_err(|e| detail!("host state: {e:?}"))?;
    // SAFETY: EFER and VM_HSAVE_PA exist on an SVM CPU (the test ran a guest on it).
    let (efer, hsave_msr) = unsafe { (cpu::rdmsr(cpu::IA32_EFER), cpu::rdmsr(0xC001_0117)) };
    ensure!(
        efer & (1 << 12) != 0 && hsave_msr == hsave,
        "EFER {efer:#x}, VM_HSAVE_PA {hsave_msr:#x} != {hsave:#x}"
    );
    let mut d = detail;
    let _ = write!(d, " asids={asids}");
    Ok(d)
}

/// Runs the test on this CPU.
pub fn run(virt: &VirtSupport) -> Outcome {
    match virt {
        VirtSupport::Svm(c) if c.npt => {}
        VirtSupport::Svm(_) => return Outcome::Skipped(detail!("SVM without nested paging")),
        other => return Outcome::Skipped(detail!("not an SVM machine (virt={})", other.name())),
    }
    match run_test() {
        Ok(d) => Outcome::Pass(d),
        Err(d) => Outcome::Fail(d),
    }
}

/// The test as `kernel/src/selftest.rs` reports it: a skip (not an SVM machine) is a pass that says so.
///
/// # Errors
/// The test failed; the detail says where.
pub fn outcome() -> Result<Detail, Detail> {
    match run(&crate::virt::detect::detect()) {
        Outcome::Pass(d) => Ok(d),
        Outcome::Fail(d) => Err(d),
        Outcome::Skipped(reason) => Ok(detail!("skipped: {reason}")),
    }
}
