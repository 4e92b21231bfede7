//! One SVM virtual CPU: VMCB set-up, the run path with LAPIC-timer preemption, exit decoding, RIP advance, event
//! injection, TSC offset. Implements [`virt::Vcpu`].
//!
//! Sources: AMD APM Vol. 2 §15.5 (VMRUN), §15.9-§15.13 (intercepts, IOIO EXITINFO1 in §15.10.2, MSR in §15.11),
//! §15.17 (GIF, CLGI/STGI), §15.20 (event injection), §15.21.1 (V_INTR_MASKING), §15.25.6 (NPF EXITINFO), §15.7.1
//! (next RIP), §15.30.3 (TSC offset), Appendix C (exit codes).
//!
//! Preemption: [`SvmVcpu::run`] arms the LAPIC timer for the deadline (TSC-deadline mode when the CPU has it, else
//! one-shot), intercepts physical INTR, and sets V_INTR_MASKING, so the guest's RFLAGS.IF masks only virtual
//! interrupts: a guest spinning with interrupts disabled still exits when the timer fires. Around VMRUN the host
//! runs `CLGI; STI` (host IF = 1, which VMRUN saves and #VMEXIT restores, but GIF = 0 holds every interrupt until
//! the world switch is complete) and `CLI; STGI` after; an interrupt that caused the exit is then taken by the host's
//! own handler (the kernel's timer handler counts it and signals EOI) in a short interrupt window before `run`
//! returns. The exit is [`VmExit::SliceExpired`] when the TSC has reached the deadline, else
//! [`VmExit::ExternalInterrupt`]. A deadline already in the past returns `SliceExpired` without entering.
//! Bochs 2.7 does not honour V_INTR_MASKING for a guest entered with IF = 0 (it recomputes the interrupt mask while
//! loading the guest's RFLAGS, before it counts the CPU as in the guest), so there a guest that never executes STI
//! cannot be preempted; QEMU and the APM behave as described.
//!
//! #DB and #AC are intercepted only to guarantee an interrupt window (each re-entry is one); `run` delivers them
//! back to the guest itself, so the layer above never sees them.
//!
//! Host turn: after each exit the LAPIC timer is not disarmed but re-armed [`HOST_TURN_US`] ahead, and a timer
//! interrupt still pending from that (a host stint that lasted longer) is taken in a short interrupt window before
//! the next VMRUN, so it does not cause a spurious exit. On hardware it fires only when the host spends longer than
//! that between two entries. It exists for QEMU's `-icount` round robin (one host thread for all CPUs; a CPU keeps
//! running until the next timer deadline of any CPU unless it executes HLT or PAUSE): without a deadline of its own,
//! a CPU whose run loop yielded there (a PAUSE in a contended lock's spin) lost its turn until the other CPU's next
//! timer, up to a whole slice of a guest that spins without PAUSE. That was the 1.02 ms late real-time wake-up of
//! `qemu_epyc_smp2_hard_real_time` (analysis in kernel/src/vm/runloop.rs, "Host turn"). For the same reason the interrupt window
//! after a timer exit is `STI; NOP; CLI`, not a PAUSE.
//!
//! Invariants: the VMCB always has the VMRUN intercept, a non-zero ASID, EFER.SVME, NP_ENABLE with this VM's nCR3,
//! and the shared IOPM and the VM's MSRPM; `run` restores the caller's interrupt flag and leaves the LAPIC timer
//! armed at most [`HOST_TURN_US`] ahead (the run loop re-arms or disarms it).

use alloc::boxed::Box;
use alloc::sync::Arc;

use virt::entry::{EntryState, Segment as EntrySegment};
use virt::{
    AccessSize, ControlState, EntryFailure, Gpr, IoAccess, IoDirection, MemAccess, Vcpu, VmExit,
};
use x86_64::instructions::interrupts;

use super::check;
use super::entry::{svm_enter, FpuOwner, FxArea, GuestGprs};
use super::host::{self, AsidRecord};
use super::permission::{self, MsrAllow, MsrPermissionMap, PermissionError};
use super::vmcb::{
    attrib, event, exit_code, int_ctl, misc1, misc2, Ctl32, Ctl64, Ctl8, OutOfFrames, Save64,
    Save8, Seg, Segment, Vmcb, NP_ENABLE,
};
use crate::arch::x86_64::{lapic, tsc};

/// How far ahead the LAPIC timer stays armed after an exit (module doc, "Host turn"): half the run loop's 50 us
/// overrun bound, so a CPU that yielded under QEMU's round robin gets its turn back well within it.
pub const HOST_TURN_US: u64 = 25;

/// EFER.SVME: QEMU and the APM (§15.5.1) require it in the guest's EFER as well.
const EFER_SVME: u64 = 1 << 12;
/// DR6 and DR7 reset values (bits 63:32 must be zero).
const DR6_RESET: u64 = 0xFFFF_0FF0;
const DR7_RESET: u64 = 0x400;
/// Power-on PAT: WB, WT, UC-, UC, WB, WT, UC-, UC.
const PAT_RESET: u64 = 0x0007_0406_0007_0406;
/// Exceptions intercepted: #DB (1) and #AC (17), which a guest can otherwise make recur forever inside the CPU's
/// event delivery with no interrupt window (the CVE-2015-5307 / CVE-2015-8104 class). `run` re-injects them itself
/// and re-enters (each VMRUN is an interrupt window), so the layer above never sees them, as on VMX.
const EXCEPTION_INTERCEPTS: u32 = (1 << VEC_DB) | (1 << VEC_AC);
const VEC_DB: u8 = 1;
const VEC_AC: u8 = 17;
/// Exception vectors that push an error code (EXITINFO1 holds it).
const ERROR_CODE_VECTORS: [u8; 9] = [8, 10, 11, 12, 13, 14, 17, 21, 30];

/// Why a VM or vCPU could not be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvmError {
    /// No frame for the VMCB or a permission map.
    OutOfFrames,
    /// The MSR allow list names an MSR the MSRPM cannot pass through.
    Permission(PermissionError),
}

impl From<OutOfFrames> for SvmError {
    fn from(_: OutOfFrames) -> Self {
        Self::OutOfFrames
    }
}

impl From<PermissionError> for SvmError {
    fn from(e: PermissionError) -> Self {
        Self::Permission(e)
    }
}

/// What the vCPUs of one VM share: the nested page tables' root and the MSR permission map.
#[derive(Debug)]
pub struct SvmVm {
    ncr3: u64,
    msrpm: MsrPermissionMap,
}

impl SvmVm {
    /// A VM whose guest-physical memory is the nested page table at `ncr3`, whose guests may access the MSRs in
    /// `allow` without an exit (every other MSR exits).
    ///
    /// # Safety
    /// `ncr3` is the root of a nested page table (e.g. [`super::npt::NptMap::ncr3`]) that maps only memory owned
    /// by this VM and stays alive until every vCPU created from the returned handle is dropped.
    ///
    /// # Errors
    /// No frames for the MSR permission map, or an allow-list entry it cannot express.
    pub unsafe fn new(ncr3: u64, allow: &[MsrAllow]) -> Result<Arc<Self>, SvmError> {
        Ok(Arc::new(Self {
            ncr3,
            msrpm: MsrPermissionMap::new(allow)?,
        }))
    }

    /// Whether the guest's RDMSR (`write` false) or WRMSR of `msr` exits.
    pub fn msr_exits(&self, msr: u32, write: bool) -> bool {
        self.msrpm.intercepts(msr, write)
    }
}

/// The MSR allow list the layer above names as backend-owned (`virt::msr::BACKEND_MSRS`), opened for reads and
/// writes: VMLOAD/VMSAVE switch the SYSCALL/SYSENTER MSRs and the FS/GS/KernelGS bases, VMRUN/#VMEXIT switch EFER
/// and (with nested paging) PAT, so none of them reaches the host.
pub fn backend_msr_allow_list() -> alloc::vec::Vec<MsrAllow> {
    virt::msr::BACKEND_MSRS
        .iter()
        .map(|&msr| MsrAllow {
            msr,
            read: true,
            write: true,
        })
        .collect()
}

/// The decoded information of the last exit, kept for `skip_instruction`.
#[derive(Clone, Copy, Debug, Default)]
struct LastExit {
    code: u64,
    info2: u64,
    next_rip: u64,
}

/// What the run path remembers of the last VMRUN, for a stop dump (`super::dump`): TLB_CONTROL is cleared in the
/// VMCB after each exit, and the host TSC is not in the VMCB at all.
#[derive(Clone, Copy, Debug, Default)]
pub struct LastEntry {
    /// TLB_CONTROL as written for the last VMRUN (0 nothing, 1 flush all ASIDs; `host::CpuSvm::asid_for`).
    pub tlb_control: u8,
    /// Host TSC right before the last VMRUN.
    pub vmrun_tsc: u64,
    /// Host TSC right after its #VMEXIT.
    pub exit_tsc: u64,
}

/// One virtual CPU.
#[derive(Debug)]
pub struct SvmVcpu {
    /// Keeps the VM's MSR permission map and (by the `SvmVm::new` contract) its nested page tables alive.
    _vm: Arc<SvmVm>,
    vmcb: Vmcb,
    gprs: GuestGprs,
    fx: Box<FxArea>,
    /// Identity of `fx` for the lazy restore (entry::FpuHolder).
    fpu: FpuOwner,
    nrips: bool,
    asid: AsidRecord,
    flush_tlb: bool,
    last: LastExit,
    /// Event to inject at the next entry (a requested exception, or one whose delivery an exit interrupted).
    pending_event: Option<u64>,
    /// Intercepted #DB/#AC delivered back to the guest.
    reinjected: u64,
    /// The last VMRUN, for stop dumps.
    last_entry: LastEntry,
    /// LAPIC one-shot count for [`HOST_TURN_US`], computed once (the timer is calibrated before any vCPU exists).
    host_turn: u32,
}

fn segment(s: &EntrySegment) -> Segment {
    Segment {
        selector: s.selector,
        attrib: s.svm_attrib(),
        limit: s.limit,
        base: s.base,
    }
}

impl SvmVcpu {
    /// A vCPU of `vm` that starts in `entry` (the guest ABI's long-mode state, `virt::entry::EntryState`).
    ///
    /// # Errors
    /// No frame for the VMCB or for the shared I/O permission map.
    pub fn new(vm: &Arc<SvmVm>, entry: &EntryState) -> Result<Self, SvmError> {
        let mut vmcb = Vmcb::new()?;
        // Control area (APM Vol. 2, Table B-1).
        vmcb.set_ctl32(Ctl32::InterceptExceptions, EXCEPTION_INTERCEPTS);
        vmcb.set_ctl32(
            Ctl32::InterceptMisc1,
            misc1::INTR
                | misc1::NMI
                | misc1::SMI
                | misc1::INIT
                | misc1::CPUID
                | misc1::RSM
                | misc1::INVD
                | misc1::HLT
                | misc1::INVLPGA
                | misc1::IOIO_PROT
                | misc1::MSR_PROT
                | misc1::TASK_SWITCH
                | misc1::FERR_FREEZE
                | misc1::SHUTDOWN,
        );
        vmcb.set_ctl32(
            Ctl32::InterceptMisc2,
            misc2::VMRUN
                | misc2::VMMCALL
                | misc2::VMLOAD
                | misc2::VMSAVE
                | misc2::STGI
                | misc2::CLGI
                | misc2::SKINIT
                | misc2::MONITOR
                | misc2::MWAIT
                | misc2::XSETBV,
        );
        vmcb.set_ctl64(Ctl64::IopmBasePa, permission::iopm_pa()?);
        vmcb.set_ctl64(Ctl64::MsrpmBasePa, vm.msrpm.pa());
        vmcb.set_ctl64(Ctl64::TscOffset, 0);
        vmcb.set_ctl64(Ctl64::IntCtl, int_ctl::V_INTR_MASKING);
        vmcb.set_ctl64(Ctl64::NestedCtl, NP_ENABLE);
        vmcb.set_ctl64(Ctl64::NCr3, vm.ncr3);
        // The ASID is assigned per CPU at each entry (host.rs); 1 keeps the VMCB consistent until then.
        vmcb.set_ctl32(Ctl32::GuestAsid, 1);
        vmcb.set_ctl32(Ctl32::CleanBits, 0);

        // State-save area (APM Vol. 2, Table B-2).
        vmcb.set_segment(Seg::Cs, segment(&entry.cs));
        vmcb.set_segment(Seg::Ds, segment(&entry.ds));
        vmcb.set_segment(Seg::Es, segment(&entry.es));
        vmcb.set_segment(Seg::Ss, segment(&entry.ss));
        vmcb.set_segment(Seg::Fs, segment(&entry.fs));
        vmcb.set_segment(Seg::Gs, segment(&entry.gs));
        vmcb.set_segment(Seg::Tr, segment(&entry.tr));
        vmcb.set_segment(Seg::Ldtr, segment(&entry.ldtr));
        vmcb.set_segment(
            Seg::Gdtr,
            Segment {
                selector: 0,
                attrib: 0,
                limit: u32::from(entry.gdtr.limit),
                base: entry.gdtr.base,
            },
        );
        vmcb.set_segment(
            Seg::Idtr,
            Segment {
                selector: 0,
                attrib: 0,
                limit: u32::from(entry.idtr.limit),
                base: entry.idtr.base,
            },
        );
        vmcb.set_save8(Save8::Cpl, 0);
        vmcb.set_save64(Save64::Efer, entry.efer | EFER_SVME);
        vmcb.set_save64(Save64::Cr0, entry.cr0);
        vmcb.set_save64(Save64::Cr3, entry.cr3);
        vmcb.set_save64(Save64::Cr4, entry.cr4);
        vmcb.set_save64(Save64::Dr6, DR6_RESET);
        vmcb.set_save64(Save64::Dr7, DR7_RESET);
        vmcb.set_save64(Save64::Rflags, entry.rflags);
        vmcb.set_save64(Save64::Rip, entry.rip);
        vmcb.set_save64(Save64::Rsp, entry.rsp);
        vmcb.set_save64(Save64::Rax, 0);
        vmcb.set_save64(Save64::GPat, PAT_RESET);

        let nrips = crate::arch::x86_64::cpu::cpuid(0x8000_000A, 0).edx & (1 << 3) != 0;
        Ok(Self {
            _vm: Arc::clone(vm),
            vmcb,
            gprs: GuestGprs {
                rdi: entry.rdi,
                ..GuestGprs::default()
            },
            fx: Box::new(FxArea::reset()),
            fpu: FpuOwner::new(),
            nrips,
            asid: AsidRecord::default(),
            flush_tlb: false,
            last: LastExit::default(),
            pending_event: None,
            reinjected: 0,
            last_entry: LastEntry::default(),
            host_turn: lapic::oneshot_count(HOST_TURN_US),
        })
    }

    /// Sets the value added to the host TSC for the guest's TSC.
    pub fn set_tsc_offset(&mut self, offset: u64) {
        self.vmcb.set_ctl64(Ctl64::TscOffset, offset);
    }

    /// Makes the next entry run with a TLB free of this vCPU's old guest translations (call after changing the
    /// VM's nested page tables other than by adding mappings).
    pub fn flush_tlb(&mut self) {
        self.flush_tlb = true;
    }

    /// Raw VMCB access for reports and tests.
    pub fn vmcb(&self) -> &Vmcb {
        &self.vmcb
    }

    /// Mutable VMCB access (tests that build deliberately invalid states).
    pub fn vmcb_mut(&mut self) -> &mut Vmcb {
        &mut self.vmcb
    }

    /// The ASID the last entry used.
    pub fn asid(&self) -> u32 {
        self.asid.asid
    }

    /// What the run path remembered of the last VMRUN (TLB_CONTROL written, host TSC before it and after its exit).
    pub fn last_entry(&self) -> LastEntry {
        self.last_entry
    }

    /// Arms the LAPIC timer for `deadline` (TSC-deadline mode when present, else one-shot, converted from TSC ticks
    /// by one multiplication and rounded up so the interrupt is not earlier than the deadline). Returns true when
    /// it left the timer in one-shot mode (so the host turn after the exit needs only a new count).
    fn arm_timer(deadline: u64, now: u64) -> bool {
        if deadline == u64::MAX {
            return false;
        }
        if lapic::has_tsc_deadline() && lapic::arm_deadline(deadline) {
            return false;
        }
        lapic::arm_oneshot_ticks(deadline - now);
        true
    }

    /// Decodes the exit the VMCB now describes (`before`: the state handed to VMRUN, for invalid-state reports).
    fn decode(&mut self, deadline: u64, before: &check::Snapshot) -> Result<VmExit, EntryFailure> {
        let code = self.vmcb.ctl64(Ctl64::ExitCode);
        let info1 = self.vmcb.ctl64(Ctl64::ExitInfo1);
        let info2 = self.vmcb.ctl64(Ctl64::ExitInfo2);
        self.last = LastExit {
            code,
            info2,
            next_rip: if self.nrips {
                self.vmcb.ctl64(Ctl64::NextRip)
            } else {
                0
            },
        };
        if code & 0xFFFF_FFFF == exit_code::INVALID_LOW32 {
            return Err(EntryFailure::SvmInvalidState {
                detail: check::diagnose(before, &self.vmcb),
            });
        }
        // An event whose delivery the exit interrupted is delivered at the next entry (APM §15.7.2).
        let int_info = self.vmcb.ctl64(Ctl64::ExitIntInfo);
        if int_info & event::V != 0 {
            self.pending_event = Some(int_info);
        }
        Ok(match code {
            exit_code::CPUID => VmExit::Cpuid,
            exit_code::HLT => VmExit::Hlt,
            exit_code::VMMCALL => VmExit::Hypercall,
            exit_code::MSR if info1 == 0 => VmExit::Rdmsr,
            exit_code::MSR if info1 == 1 => VmExit::Wrmsr,
            exit_code::IOIO => match decode_io(info1) {
                Some(io) => VmExit::Io(io),
                None => VmExit::Unhandled { code, info1, info2 },
            },
            exit_code::NPF => {
                // EXITINFO1 is a #PF-style error code: bit 1 write, bit 4 instruction fetch (APM §15.25.6).
                let write = info1 & (1 << 1) != 0;
                let execute = info1 & (1 << 4) != 0;
                VmExit::NestedPageFault {
                    gpa: info2,
                    access: MemAccess {
                        read: !write && !execute,
                        write,
                        execute,
                    },
                }
            }
            exit_code::INTR if self.last_entry.exit_tsc >= deadline => VmExit::SliceExpired,
            exit_code::INTR | exit_code::NMI | exit_code::SMI | exit_code::INIT => {
                VmExit::ExternalInterrupt
            }
            exit_code::SHUTDOWN => VmExit::TripleFault,
            exit_code::EXCP_BASE..=exit_code::EXCP_LAST => {
                // The range bound makes the vector < 32.
                let vector = u8::try_from(code - exit_code::EXCP_BASE).unwrap_or(u8::MAX);
                let error_code = ERROR_CODE_VECTORS
                    .contains(&vector)
                    .then(|| u32::try_from(info1 & 0xFFFF_FFFF).unwrap_or(0));
                VmExit::Exception { vector, error_code }
            }
            _ => VmExit::Unhandled { code, info1, info2 },
        })
    }
}

/// Decodes IOIO EXITINFO1 (APM Vol. 2 §15.10.2, Figure 15-2): bit 0 TYPE (1 = IN), 2 STR, 3 REP, 4/5/6 SZ8/16/32,
/// 31:16 port.
fn decode_io(info1: u64) -> Option<IoAccess> {
    let size = match (info1 >> 4) & 0b111 {
        0b001 => AccessSize::Byte,
        0b010 => AccessSize::Word,
        0b100 => AccessSize::Dword,
        _ => return None,
    };
    Some(IoAccess {
        port: u16::try_from((info1 >> 16) & 0xFFFF).unwrap_or(0),
        size,
        direction: if info1 & 1 != 0 {
            IoDirection::In
        } else {
            IoDirection::Out
        },
        string: info1 & (1 << 2) != 0,
        rep: info1 & (1 << 3) != 0,
    })
}

/// `CLGI; STI`: GIF = 0 holds interrupts and NMIs; host IF = 1 is what VMRUN saves, so physical interrupts can
/// cause the INTR intercept while the guest runs (V_INTR_MASKING).
fn clgi_sti() {
    // SAFETY: CLGI requires EFER.SVME (set by `host::this_cpu`); with GIF = 0, STI delivers nothing until STGI.
    unsafe { core::arch::asm!("clgi", "sti", options(nomem, nostack)) };
}

/// `STI; NOP; CLI`: lets the host take a pending interrupt (STI's one-instruction shadow ends after the NOP). A
/// NOP, not a PAUSE: under QEMU's `-icount` round robin a PAUSE hands the host thread to the other CPU until its next
/// timer deadline (module doc).
fn interrupt_window() {
    // SAFETY: the kernel's IDT handles every vector a LAPIC can raise here (timer, IPI); IF is clear again on return.
    unsafe { core::arch::asm!("sti", "nop", "cli", options(nomem, nostack)) };
}

/// `CLI; STGI`: back to normal interrupt gating with interrupts masked by IF.
fn cli_stgi() {
    // SAFETY: STGI requires EFER.SVME (still set); IF = 0 first so nothing is taken inside this sequence.
    unsafe { core::arch::asm!("cli", "stgi", options(nomem, nostack)) };
}

impl Vcpu for SvmVcpu {
    fn run(&mut self, deadline_tsc: u64) -> Result<VmExit, EntryFailure> {
        let caller_if = interrupts::are_enabled();
        interrupts::disable();
        let result = self.run_masked(deadline_tsc);
        if caller_if {
            interrupts::enable();
        }
        result
    }

    fn gpr(&self, reg: Gpr) -> u64 {
        let g = &self.gprs;
        match reg {
            Gpr::Rax => self.vmcb.save64(Save64::Rax),
            Gpr::Rsp => self.vmcb.save64(Save64::Rsp),
            Gpr::Rcx => g.rcx,
            Gpr::Rdx => g.rdx,
            Gpr::Rbx => g.rbx,
            Gpr::Rbp => g.rbp,
            Gpr::Rsi => g.rsi,
            Gpr::Rdi => g.rdi,
            Gpr::R8 => g.r8,
            Gpr::R9 => g.r9,
            Gpr::R10 => g.r10,
            Gpr::R11 => g.r11,
            Gpr::R12 => g.r12,
            Gpr::R13 => g.r13,
            Gpr::R14 => g.r14,
            Gpr::R15 => g.r15,
        }
    }

    fn set_gpr(&mut self, reg: Gpr, value: u64) {
        let g = &mut self.gprs;
        match reg {
            Gpr::Rax => self.vmcb.set_save64(Save64::Rax, value),
            Gpr::Rsp => self.vmcb.set_save64(Save64::Rsp, value),
            Gpr::Rcx => g.rcx = value,
            Gpr::Rdx => g.rdx = value,
            Gpr::Rbx => g.rbx = value,
            Gpr::Rbp => g.rbp = value,
            Gpr::Rsi => g.rsi = value,
            Gpr::Rdi => g.rdi = value,
            Gpr::R8 => g.r8 = value,
            Gpr::R9 => g.r9 = value,
            Gpr::R10 => g.r10 = value,
            Gpr::R11 => g.r11 = value,
            Gpr::R12 => g.r12 = value,
            Gpr::R13 => g.r13 = value,
            Gpr::R14 => g.r14 = value,
            Gpr::R15 => g.r15 = value,
        }
    }

    fn rip(&self) -> u64 {
        self.vmcb.save64(Save64::Rip)
    }

    fn skip_instruction(&mut self) {
        let rip = self.rip();
        let next = if self.last.next_rip != 0 {
            self.last.next_rip
        } else {
            match self.last.code {
                // EXITINFO2 holds the next RIP for IOIO intercepts (APM §15.10.2).
                exit_code::IOIO => self.last.info2,
                // Lengths of the unprefixed encodings: CPUID 0F A2, RDMSR/WRMSR 0F 32 / 0F 30, VMMCALL 0F 01 D9,
                // HLT F4. A guest that prefixes them only confuses itself.
                exit_code::CPUID | exit_code::MSR => rip + 2,
                exit_code::VMMCALL => rip + 3,
                exit_code::HLT => rip + 1,
                _ => return,
            }
        };
        self.vmcb.set_save64(Save64::Rip, next);
        // The instruction completed: no interrupt shadow remains from it.
        self.vmcb.set_ctl64(Ctl64::InterruptShadow, 0);
    }

    fn set_rip(&mut self, rip: u64) {
        self.vmcb.set_save64(Save64::Rip, rip);
        // The emulated instruction completed: no interrupt shadow remains from it.
        self.vmcb.set_ctl64(Ctl64::InterruptShadow, 0);
    }

    fn control_state(&self) -> Option<ControlState> {
        let cs = self.vmcb.segment(Seg::Cs);
        Some(ControlState {
            cr0: self.vmcb.save64(Save64::Cr0),
            cr3: self.vmcb.save64(Save64::Cr3),
            cr4: self.vmcb.save64(Save64::Cr4),
            efer: self.vmcb.save64(Save64::Efer),
            rflags: self.vmcb.save64(Save64::Rflags),
            cs_l: cs.attrib & attrib::L != 0,
            cs_db: cs.attrib & attrib::DB != 0,
            cpl: self.vmcb.save8(Save8::Cpl) & 3,
            cs_base: cs.base,
            ds_base: self.vmcb.segment(Seg::Ds).base,
            es_base: self.vmcb.segment(Seg::Es).base,
        })
    }

    /// Queues the exception for the next entry (EVENTINJ, APM §15.20). It replaces an event the last exit
    /// interrupted (EXITINTINFO), which the layer above asks for only after exits that are not event deliveries.
    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        let ec = error_code.map_or(0, |ec| event::EV | (u64::from(ec) << 32));
        self.pending_event = Some(event::V | event::TYPE_EXCEPTION | u64::from(vector) | ec);
    }

    fn guest_tsc(&self, host_tsc: u64) -> u64 {
        host_tsc.wrapping_add(self.vmcb.ctl64(Ctl64::TscOffset))
    }
}

impl SvmVcpu {
    /// The run path with interrupts already disabled.
    fn run_masked(&mut self, deadline: u64) -> Result<VmExit, EntryFailure> {
        loop {
            match self.enter_once(deadline)? {
                VmExit::Exception { vector, error_code }
                    if vector == VEC_DB || vector == VEC_AC =>
                {
                    // Deliver it to the guest as if it had not been intercepted; an event the exit interrupted
                    // (EXITINTINFO, already queued) goes first and the exception recurs if it still applies.
                    let ec = error_code.map_or(0, |ec| event::EV | (u64::from(ec) << 32));
                    self.pending_event
                        .get_or_insert(event::V | event::TYPE_EXCEPTION | u64::from(vector) | ec);
                    self.reinjected += 1;
                }
                exit => return Ok(exit),
            }
        }
    }

    /// Intercepted #DB/#AC exceptions `run` delivered back to the guest.
    pub fn reinjected_exceptions(&self) -> u64 {
        self.reinjected
    }

    /// One VMRUN (or none, if the deadline has passed).
    fn enter_once(&mut self, deadline: u64) -> Result<VmExit, EntryFailure> {
        let now = tsc::rdtsc();
        if now >= deadline {
            return Ok(VmExit::SliceExpired);
        }
        let fresh = core::mem::take(&mut self.flush_tlb);
        let grant = host::this_cpu(|c| {
            let restore = c.fpu.must_restore(&self.fpu, &self.fx);
            (c.asid_for(&mut self.asid, fresh), c.host_vmsave_pa, restore)
        });
        let Ok((grant, host_page, restore_fpu)) = grant else {
            self.flush_tlb |= fresh;
            return Err(EntryFailure::SvmInvalidState {
                detail: "SVM cannot be enabled on this CPU (no SVM, disabled by firmware, or out of memory)",
            });
        };
        self.vmcb.set_ctl32(Ctl32::GuestAsid, grant.asid);
        self.vmcb.set_ctl8(Ctl8::TlbControl, grant.tlb_control);
        self.vmcb
            .set_ctl64(Ctl64::EventInj, self.pending_event.take().unwrap_or(0));
        let before = check::Snapshot::capture(&self.vmcb);
        // The host-turn timer of the last exit may have fired meanwhile (module doc): take it here, not as an
        // INTR exit right after VMRUN.
        interrupt_window();
        let oneshot = Self::arm_timer(deadline, now);
        self.last_entry.tlb_control = grant.tlb_control;
        self.last_entry.vmrun_tsc = tsc::rdtsc();
        clgi_sti();
        // SAFETY: GIF = 0 (above); SVM is enabled on this CPU and `host_page` is its host page (`this_cpu`); the VMCB
        // is owned by `self` and points at the live shared IOPM, this VM's MSRPM and nCR3 (kept alive by `self._vm`);
        // the GPR block and the FXSAVE area are owned by `self`.
        unsafe {
            svm_enter(
                self.vmcb.pa(),
                &mut self.gprs,
                host_page,
                &mut *self.fx,
                u64::from(restore_fpu),
            )
        };
        self.fpu.exited();
        cli_stgi();
        self.last_entry.exit_tsc = tsc::rdtsc();
        if oneshot {
            lapic::rearm_oneshot_count(self.host_turn);
        } else {
            lapic::arm_oneshot_count(self.host_turn);
        }
        self.vmcb.set_ctl8(Ctl8::TlbControl, 0);
        let exit = self.decode(deadline, &before);
        if matches!(exit, Ok(VmExit::SliceExpired | VmExit::ExternalInterrupt)) {
            // Let the host take the interrupt that caused the exit (it is still pending in the LAPIC).
            interrupt_window();
        }
        exit
    }
}
