//! One VMX virtual CPU: its VMCS and the structures the VMCS points to, the guest's register block, and the
//! `virt::Vcpu` implementation (enter, decode the exit, skip, inject, TSC).
//!
//! Set-up (SDM Vol. 3C Chapter 25 for the fields, Chapter 27 for the checks VM entry makes):
//! - controls adjusted against the (TRUE_) capability MSRs: external-interrupt and NMI exiting, the preemption
//!   timer; HLT exiting, TSC offsetting, I/O bitmaps (every port intercepted), MSR bitmap (all MSRs intercepted
//!   except those `virt::msr::BACKEND_MSRS` names and this backend can switch: [`VMCS_HELD_MSRS`], [`SWITCHED_MSRS`]); EPT, VPID when available, unrestricted guest for real-mode entry, RDTSCP and
//!   INVPCID when available (so guests do not get #UD for them); exits in 64-bit host mode saving/loading EFER and
//!   PAT and saving the preemption timer; entries loading EFER, PAT and debug controls.
//! - MSRs the VMCS does not hold (STAR, LSTAR, CSTAR, FMASK, KERNEL_GS_BASE) pass through the bitmap and are
//!   switched by the VM-exit MSR-store / VM-entry MSR-load area (guest values) and the VM-exit MSR-load area (host
//!   values), so one guest never sees another's, and the host gets its own back on every exit.
//! - SSE/x87 state is kept per vCPU with FXSAVE/FXRSTOR around each entry (the kernel itself uses no SSE).
//! - host state is this CPU's: CR0/CR3/CR4, selectors, FS/GS/TR/GDTR/IDTR bases, SYSENTER MSRs, EFER, PAT;
//!   HOST_RIP is the exit stub, HOST_RSP is written by the stub. On exit the CPU sets the GDTR/IDTR limits to
//!   0xFFFF (SDM §28.5.2); the kernel's tables are 4 KiB or less and it never loads an out-of-range selector, so
//!   they are not reloaded.
//! - guest state: any `virt::entry::EntryState` — 64-bit long mode per docs/guest-abi.md, or real mode through
//!   unrestricted guest ([`real_mode_entry`]). CR0/CR4 bits the
//!   hardware forces (NE, VMXE, ...) are host-owned in the guest/host masks and the guest reads its own values from
//!   the read shadows; a guest write that changes a host-owned bit exits as "control-register access"
//!   (`VmExit::Unhandled`).
//!
//! Slices: `run(deadline)` programs the preemption timer with `(deadline - now) >> rate` (IA32_VMX_MISC[4:0]), so
//! the exit comes at the deadline rounded down to the timer's granularity, even if the guest disabled interrupts.
//! A deadline beyond the 32-bit timer's reach is served by re-entering when the timer expires early; the value the
//! CPU saves on exit is kept for reports ([`VmxVcpu::timer_remaining`]).
//!
//! Invariants: the vCPU is used only on the CPU that created it ([`VmxVcpu::new`] records it; `run` refuses other
//! CPUs with `EntryFailure::VmxInstructionError(0)` — 0 is not an SDM error number, it means "wrong CPU"). Its frames
//! are freed by [`VmxVcpu::release`] (the reclaim, which counts them) or on drop, after VMCLEAR on that CPU; dropped
//! elsewhere they are leaked rather than freed while the hardware may still cache the VMCS. Every entry and exit
//! is recorded in the vCPU's [`super::trace`] ring (no logging on this path).

use core::arch::asm;
use core::sync::atomic::{AtomicU32, Ordering};

use virt::entry::{DescriptorTable, EntryState, Segment};
use virt::{ControlState, EntryFailure, Gpr, Vcpu, VmExit};

use super::caps::{Caps, ControlKind};
use super::entry::{cv_vmx_exit, cv_vmx_run, GuestRegs, EXITED, FAIL_INVALID, FAIL_VALID};
use super::exit::{self, reason, Delivered, ExitInfo, ENTRY_FAILURE};
use super::fields::{
    entry_ctl, exit_ctl, intr_info, pin, primary, secondary, Control16, Control32, Control64,
    ControlNat, Guest16, Guest32, Guest64, GuestNat, Host16, Host32, Host64, HostNat, ReadOnly32,
    ReadOnly64, ReadOnlyNat,
};
use super::instr::{self, set, InstructionError, VmFail};
use super::trace::{self, Ring};
use super::{cpu, VmxError};
use crate::arch::x86_64::{cpu as x86, paging, tsc};
use crate::mm::frame;

/// MSRs the VMCS guest-state area holds (SYSENTER_CS/ESP/EIP, PAT, EFER, FS/GS base): saved on every exit and
/// loaded on every entry by the controls this backend sets, so the guest may access them without an exit.
pub const VMCS_HELD_MSRS: [u32; 7] = [
    0x174,
    0x175,
    0x176,
    0x277,
    0xC000_0080,
    0xC000_0100,
    0xC000_0101,
];

/// Pass-through MSRs the VMCS does not hold: switched by the VM-exit/VM-entry MSR areas (SDM §25.7.2, §25.8.2).
pub const SWITCHED_MSRS: [u32; 5] = [
    0xC000_0081,
    0xC000_0082,
    0xC000_0083,
    0xC000_0084,
    0xC000_0102,
];

/// PAT power-on value (SDM Vol. 3A §13.12.4).
const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;
const IA32_PAT: u32 = 0x277;
const IA32_SYSENTER_CS: u32 = 0x174;
const IA32_SYSENTER_ESP: u32 = 0x175;
const IA32_SYSENTER_EIP: u32 = 0x176;
const IA32_FS_BASE: u32 = 0xC000_0100;
/// Vectors that push an error code in protected mode (SDM Vol. 3A Table 6-1).
const ERROR_CODE_VECTORS: [u8; 8] = [8, 10, 11, 12, 13, 14, 17, 21];

/// CR0.PE and CR0.PG: a guest without both needs unrestricted guest (SDM §26.2.1.1, §27.3.1.1).
const CR0_PE_PG: u64 = (1 << 0) | (1 << 31);
/// EFER.LMA: the guest enters in IA-32e mode.
const EFER_LMA: u64 = 1 << 10;

/// The real-mode entry state at `cs:ip` with SP = `sp` (for full-OS guests through unrestricted guest): CR0 = ET,
/// flat 64 KiB data segments, the real-mode IVT at 0, a busy 32-bit TSS and no LDT, as VM entry requires.
pub fn real_mode_entry(cs: u16, ip: u16, sp: u16) -> EntryState {
    let seg = |selector: u16, access: u16| Segment {
        selector,
        base: u64::from(selector) << 4,
        limit: 0xFFFF,
        access,
        unusable: false,
    };
    // Code: execute/read accessed, S, P. Data: read/write accessed, S, P (SDM Table 25-2).
    let data = seg(0, 0x93);
    EntryState {
        rip: u64::from(ip),
        rsp: u64::from(sp),
        rdi: 0,
        rflags: 0x2,
        cr0: 1 << 4,
        cr3: 0,
        cr4: 0,
        efer: 0,
        cs: seg(cs, 0x9B),
        ds: data,
        es: data,
        ss: data,
        fs: data,
        gs: data,
        tr: Segment {
            selector: 0,
            base: 0,
            limit: 0x67,
            access: 0x8B,
            unusable: false,
        },
        ldtr: Segment {
            selector: 0,
            base: 0,
            limit: 0,
            access: 0,
            unusable: true,
        },
        gdtr: DescriptorTable {
            base: 0,
            limit: 0xFFFF,
        },
        idtr: DescriptorTable {
            base: 0,
            limit: 0x3FF,
        },
    }
}

/// What a vCPU is built from.
#[derive(Clone, Copy, Debug)]
pub struct VcpuConfig {
    /// EPT pointer of the VM's guest-physical map (`ept::GuestPhysMap::eptp`).
    pub eptp: u64,
    /// Initial state: `virt::entry::EntryState::long_mode` for ABI guests, [`real_mode_entry`] for real mode.
    pub entry: EntryState,
    /// Guest exceptions that cause exits (bit n = vector n); 0 lets the guest handle all of its own.
    pub exception_bitmap: u32,
    /// Added to the host TSC for guest RDTSC (two's complement).
    pub tsc_offset: u64,
}

/// FXSAVE area.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct FxArea([u8; 512]);

impl core::fmt::Debug for FxArea {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("FxArea")
    }
}

/// One entry of an MSR load/store area (SDM Table 25-14).
#[repr(C)]
struct MsrEntry {
    index: u32,
    reserved: u32,
    value: u64,
}

/// An event to inject at the next entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Injection {
    info: u32,
    error_code: u32,
    instruction_len: u32,
}

static NEXT_VPID: AtomicU32 = AtomicU32::new(1);

/// What the run path remembers of the last entry and exit beyond the VMCS, for a stop dump (`super::dump`).
#[derive(Clone, Copy, Debug, Default)]
pub struct LastEntry {
    /// The guest's CR2 at the last exit (the VMCS does not hold CR2: `enter` saves and restores it).
    pub cr2: u64,
    /// Host TSC where the last entry's timer value was computed, right before VMLAUNCH/VMRESUME.
    pub entry_tsc: u64,
    /// Host TSC right after the last exit.
    pub exit_tsc: u64,
    /// IDT-vectoring information of the last exit (SDM §28.2.4), with its error code in bits 63:32 when valid.
    pub idt_vectoring: u64,
    /// VM-entry interruption information as last written (an injected event; the CPU clears its valid bit on
    /// entry, so the VMCS no longer shows it).
    pub injected: u32,
}

/// A VMX virtual CPU.
#[derive(Debug)]
pub struct VmxVcpu {
    cpu: usize,
    vmcs: u64,
    msr_bitmap: u64,
    io_bitmap_a: u64,
    io_bitmap_b: u64,
    guest_msrs: u64,
    host_msrs: u64,
    regs: GuestRegs,
    rip: u64,
    rsp: u64,
    launched: bool,
    vpid: u16,
    eptp: u64,
    tsc_offset: u64,
    timer_rate: u32,
    save_timer: bool,
    last: ExitInfo,
    skipped: bool,
    pending: Option<Injection>,
    timer_left: Option<u32>,
    timer_armed: u32,
    /// TSC read where the timer value of the last entry was computed.
    entry_tsc: u64,
    /// The last entries, for explaining a late exit ([`super::trace`]).
    trace: Ring,
    /// The last entry and exit, for stop dumps (its `cr2` is also the guest's CR2 between exits).
    last_entry: LastEntry,
    fx: FxArea,
}

fn frame_ptr<T>(frame: u64) -> *mut T {
    paging::phys_to_virt(frame).cast::<T>()
}

fn vmfail_number(e: VmFail) -> u32 {
    match e {
        VmFail::Invalid => 0,
        VmFail::Valid(InstructionError(n)) => n,
    }
}

impl VmxVcpu {
    /// Builds a vCPU on this CPU (entering VMX operation here first if needed): allocates and programs its VMCS, leaving it
    /// current. General-purpose registers start at zero; set them with `set_gpr`.
    ///
    /// # Errors
    /// VMX not enabled here, a missing feature or control, no memory, or a VMCS access failing.
    pub fn new(config: &VcpuConfig) -> Result<Self, VmxError> {
        // VMXON on this CPU the first time a vCPU is built here (idempotent).
        let caps = cpu::enable()?;
        if !caps.allows(ControlKind::Secondary, secondary::ENABLE_EPT) || !caps.ept_4level_wb() {
            return Err(VmxError::MissingFeature(
                "EPT with 4-level write-back walks",
            ));
        }
        if !caps.allows(ControlKind::Pin, pin::PREEMPTION_TIMER) {
            return Err(VmxError::MissingFeature("VMX-preemption timer"));
        }
        let real = config.entry.cr0 & CR0_PE_PG != CR0_PE_PG;
        if real && !caps.allows(ControlKind::Secondary, secondary::UNRESTRICTED_GUEST) {
            return Err(VmxError::MissingFeature(
                "unrestricted guest (for real-mode entry)",
            ));
        }
        let mut v = Self {
            cpu: cpu::cpu_index(),
            vmcs: 0,
            msr_bitmap: 0,
            io_bitmap_a: 0,
            io_bitmap_b: 0,
            guest_msrs: 0,
            host_msrs: 0,
            regs: GuestRegs::default(),
            rip: 0,
            rsp: 0,
            launched: false,
            vpid: 0,
            eptp: config.eptp,
            tsc_offset: config.tsc_offset,
            timer_rate: caps.preemption_timer_rate,
            save_timer: false,
            last: ExitInfo::default(),
            skipped: false,
            pending: None,
            timer_left: None,
            timer_armed: 0,
            entry_tsc: 0,
            trace: Ring::new(),
            last_entry: LastEntry::default(),
            fx: FxArea([0; 512]),
        };
        // Drop frees whatever was allocated if a later step fails.
        for slot in [
            &mut v.vmcs,
            &mut v.msr_bitmap,
            &mut v.io_bitmap_a,
            &mut v.io_bitmap_b,
            &mut v.guest_msrs,
            &mut v.host_msrs,
        ] {
            *slot = frame::alloc_zeroed_below(u64::MAX).ok_or(VmxError::OutOfMemory)?;
        }
        v.init_fx();
        v.fill_bitmaps();
        v.fill_msr_areas();
        // SAFETY: the VMCS frame is ours and zeroed; its first 4 bytes take the revision identifier (SDM §25.2).
        unsafe { frame_ptr::<u32>(v.vmcs).write_volatile(caps.revision) };
        // SAFETY: in VMX operation (checked above); the region is our own VMCS frame, never current elsewhere.
        unsafe {
            instr::vmclear(v.vmcs).map_err(VmxError::Vmcs)?;
            instr::vmptrld(v.vmcs).map_err(VmxError::Vmcs)?;
        }
        v.program(&caps, config)?;
        Ok(v)
    }

    /// The guest starts with the default x87/SSE state (FCW 0x37F, MXCSR 0x1F80), as after reset.
    fn init_fx(&mut self) {
        self.fx.0[0..2].copy_from_slice(&0x037Fu16.to_le_bytes());
        self.fx.0[24..28].copy_from_slice(&0x1F80u32.to_le_bytes());
        self.fx.0[28..32].copy_from_slice(&0xFFFFu32.to_le_bytes());
    }

    /// I/O bitmaps all ones (every port exits); MSR bitmap all ones except the MSRs the layer above leaves to the
    /// backend (`virt::msr::BACKEND_MSRS`) that this backend switches (SDM §25.6.9: read-low at 0, read-high at
    /// 1 KiB, write-low at 2 KiB, write-high at 3 KiB). A listed MSR this backend cannot switch stays intercepted.
    fn fill_bitmaps(&mut self) {
        for f in [self.io_bitmap_a, self.io_bitmap_b, self.msr_bitmap] {
            // SAFETY: our own frames, mapped by the direct map.
            unsafe { core::ptr::write_bytes(frame_ptr::<u8>(f), 0xFF, 4096) };
        }
        let bitmap = frame_ptr::<u8>(self.msr_bitmap);
        for &msr in virt::msr::BACKEND_MSRS {
            if !VMCS_HELD_MSRS.contains(&msr) && !SWITCHED_MSRS.contains(&msr) {
                log::warn!("vmx: MSR {msr:#x} is backend-owned but not switched by VMX; it stays intercepted");
                continue;
            }
            let (base, bit) = match msr {
                0..=0x1FFF => (0usize, msr),
                0xC000_0000..=0xC000_1FFF => (1024usize, msr - 0xC000_0000),
                _ => continue,
            };
            let Ok(byte) = usize::try_from(bit / 8) else {
                continue;
            };
            let mask = !(1u8 << (bit % 8));
            for half in [base, base + 2048] {
                // SAFETY: `half + byte` < 4096: bit < 0x2000, so byte < 1024, and half <= 3072.
                unsafe {
                    let p = bitmap.add(half + byte);
                    p.write_volatile(p.read_volatile() & mask);
                }
            }
        }
    }

    /// Guest MSR area: the switched MSRs at zero; host area: this CPU's current values.
    fn fill_msr_areas(&mut self) {
        let guest = frame_ptr::<MsrEntry>(self.guest_msrs);
        let host = frame_ptr::<MsrEntry>(self.host_msrs);
        for (i, msr) in SWITCHED_MSRS.into_iter().enumerate() {
            // SAFETY: these MSRs exist on every x86_64 CPU with long mode.
            let value = unsafe { x86::rdmsr(msr) };
            // SAFETY: 5 entries of 16 bytes fit in our own frames.
            unsafe {
                guest.add(i).write_volatile(MsrEntry {
                    index: msr,
                    reserved: 0,
                    value: 0,
                });
                host.add(i).write_volatile(MsrEntry {
                    index: msr,
                    reserved: 0,
                    value,
                });
            }
        }
    }

    fn program(&mut self, caps: &Caps, config: &VcpuConfig) -> Result<(), VmxError> {
        let real = config.entry.cr0 & CR0_PE_PG != CR0_PE_PG;
        let long = config.entry.efer & EFER_LMA != 0;
        let pin = caps.adjust(
            ControlKind::Pin,
            pin::EXTERNAL_INTERRUPT_EXITING | pin::NMI_EXITING | pin::PREEMPTION_TIMER,
            0,
        )?;
        let primary = caps.adjust(
            ControlKind::Primary,
            primary::HLT_EXITING
                | primary::USE_TSC_OFFSETTING
                | primary::USE_IO_BITMAPS
                | primary::USE_MSR_BITMAPS
                | primary::ACTIVATE_SECONDARY,
            0,
        )?;
        let mut wanted2 = secondary::ENABLE_RDTSCP | secondary::ENABLE_INVPCID;
        if caps.allows(ControlKind::Secondary, secondary::ENABLE_VPID) {
            let id = NEXT_VPID.fetch_add(1, Ordering::Relaxed);
            // VPIDs are not recycled; past 65535 vCPUs the rest run untagged (TLB flushed on every transition).
            if let Ok(id) = u16::try_from(id) {
                self.vpid = id;
                wanted2 |= secondary::ENABLE_VPID;
            }
        }
        let required2 = secondary::ENABLE_EPT
            | if real {
                secondary::UNRESTRICTED_GUEST
            } else {
                0
            };
        let secondary = caps.adjust(ControlKind::Secondary, required2, wanted2)?;
        if secondary & secondary::ENABLE_VPID == 0 {
            self.vpid = 0;
        }
        let exit = caps.adjust(
            ControlKind::Exit,
            exit_ctl::HOST_ADDRESS_SPACE_SIZE
                | exit_ctl::SAVE_EFER
                | exit_ctl::LOAD_EFER
                | exit_ctl::SAVE_PAT
                | exit_ctl::LOAD_PAT,
            exit_ctl::SAVE_DEBUG_CONTROLS | exit_ctl::SAVE_PREEMPTION_TIMER,
        )?;
        self.save_timer = exit & exit_ctl::SAVE_PREEMPTION_TIMER != 0;
        let entry = caps.adjust(
            ControlKind::Entry,
            entry_ctl::LOAD_EFER
                | entry_ctl::LOAD_PAT
                | if long { entry_ctl::IA32E_MODE_GUEST } else { 0 },
            entry_ctl::LOAD_DEBUG_CONTROLS,
        )?;
        set(Control32::PinBased, u64::from(pin))?;
        set(Control32::PrimaryProcBased, u64::from(primary))?;
        set(Control32::SecondaryProcBased, u64::from(secondary))?;
        set(Control32::ExitControls, u64::from(exit))?;
        set(Control32::EntryControls, u64::from(entry))?;
        set(
            Control32::ExceptionBitmap,
            u64::from(config.exception_bitmap),
        )?;
        set(Control32::Cr3TargetCount, 0)?;
        set(Control64::IoBitmapA, self.io_bitmap_a)?;
        set(Control64::IoBitmapB, self.io_bitmap_b)?;
        set(Control64::MsrBitmap, self.msr_bitmap)?;
        let n = u64::try_from(SWITCHED_MSRS.len()).unwrap_or(0);
        set(Control64::ExitMsrStoreAddr, self.guest_msrs)?;
        set(Control32::ExitMsrStoreCount, n)?;
        set(Control64::EntryMsrLoadAddr, self.guest_msrs)?;
        set(Control32::EntryMsrLoadCount, n)?;
        set(Control64::ExitMsrLoadAddr, self.host_msrs)?;
        set(Control32::ExitMsrLoadCount, n)?;
        set(Control64::TscOffset, self.tsc_offset)?;
        set(Control64::EptPointer, self.eptp)?;
        set(Control32::EntryInterruptionInfo, 0)?;
        if self.vpid != 0 {
            set(Control16::Vpid, u64::from(self.vpid))?;
            if caps.invvpid_single() {
                // SAFETY: in VMX operation; INVVPID single-context is supported (checked).
                unsafe { instr::invvpid_single(self.vpid).map_err(VmxError::Vmcs)? };
            }
        }
        if caps.invept_single() {
            // SAFETY: in VMX operation; INVEPT single-context is supported (checked). Drops translations a previous
            // user of the same EPT root frame may have left cached.
            unsafe { instr::invept_single(self.eptp).map_err(VmxError::Vmcs)? };
        }
        self.program_host()?;
        self.program_guest(caps, &config.entry, real)
    }

    /// Host state: this CPU as it is now (SDM §25.5, checks §27.2.2-27.2.4).
    fn program_host(&mut self) -> Result<(), VmxError> {
        use x86_64::instructions::tables::{sgdt, sidt};
        use x86_64::registers::control::{Cr0, Cr3, Cr4};
        let (cs, ss, ds, es, fs, gs, tr): (u16, u16, u16, u16, u16, u16, u16);
        // SAFETY: reading segment selectors and the task register has no side effects.
        unsafe {
            asm!(
                "mov {0:x}, cs", "mov {1:x}, ss", "mov {2:x}, ds", "mov {3:x}, es",
                "mov {4:x}, fs", "mov {5:x}, gs", "str {6:x}",
                out(reg) cs, out(reg) ss, out(reg) ds, out(reg) es, out(reg) fs, out(reg) gs, out(reg) tr,
                options(nomem, nostack, preserves_flags),
            );
        }
        let gdt = sgdt();
        let idt = sidt();
        // TR base from its 16-byte system descriptor in the GDT (SDM Vol. 3A §8.2.3).
        let tr_base = if tr & !7 == 0 {
            0
        } else {
            let desc = gdt.base.as_u64() + u64::from(tr & !7);
            // SAFETY: TR indexes a loaded, valid TSS descriptor in the current GDT, which the kernel keeps mapped.
            let (lo, hi) = unsafe {
                (
                    (desc as *const u64).read_volatile(),
                    ((desc + 8) as *const u64).read_volatile(),
                )
            };
            ((lo >> 16) & 0xFF_FFFF) | (((lo >> 56) & 0xFF) << 24) | ((hi & 0xFFFF_FFFF) << 32)
        };
        let (cr3_frame, cr3_flags) = Cr3::read_raw();
        set(HostNat::Cr0, Cr0::read_raw())?;
        set(
            HostNat::Cr3,
            cr3_frame.start_address().as_u64() | u64::from(cr3_flags),
        )?;
        set(HostNat::Cr4, Cr4::read_raw())?;
        // Selector fields need RPL = TI = 0 (§27.2.3); the values are this CPU's own.
        for (f, v) in [
            (Host16::CsSelector, cs),
            (Host16::SsSelector, ss),
            (Host16::DsSelector, ds),
            (Host16::EsSelector, es),
            (Host16::FsSelector, fs),
            (Host16::GsSelector, gs),
            (Host16::TrSelector, tr),
        ] {
            set(f, u64::from(v & !7))?;
        }
        // SAFETY: these MSRs exist on every x86_64 CPU; reading them has no side effects.
        let (fs_base, gs_base, sysenter_cs, sysenter_esp, sysenter_eip, efer, pat) = unsafe {
            (
                x86::rdmsr(IA32_FS_BASE),
                x86::rdmsr(x86::IA32_GS_BASE),
                x86::rdmsr(IA32_SYSENTER_CS),
                x86::rdmsr(IA32_SYSENTER_ESP),
                x86::rdmsr(IA32_SYSENTER_EIP),
                x86::rdmsr(x86::IA32_EFER),
                x86::rdmsr(IA32_PAT),
            )
        };
        set(HostNat::FsBase, fs_base)?;
        set(HostNat::GsBase, gs_base)?;
        set(HostNat::TrBase, tr_base)?;
        set(HostNat::GdtrBase, gdt.base.as_u64())?;
        set(HostNat::IdtrBase, idt.base.as_u64())?;
        set(Host32::SysenterCs, sysenter_cs & 0xFFFF_FFFF)?;
        set(HostNat::SysenterEsp, sysenter_esp)?;
        set(HostNat::SysenterEip, sysenter_eip)?;
        set(Host64::Efer, efer)?;
        set(Host64::Pat, pat)?;
        set(HostNat::Rip, cv_vmx_exit as *const () as u64)?;
        Ok(())
    }

    /// Guest state from `e` (SDM §25.4, checks §27.3.1). Fields the entry state does not name get their reset
    /// values (DR7 0x400, PAT power-on, no pending events, active).
    fn program_guest(
        &mut self,
        caps: &Caps,
        e: &EntryState,
        unrestricted: bool,
    ) -> Result<(), VmxError> {
        let (cr0_hw, cr0_mask) = caps.cr0_for(e.cr0, unrestricted);
        let (cr4_hw, cr4_mask) = caps.cr4_for(e.cr4);
        set(GuestNat::Cr0, cr0_hw)?;
        set(ControlNat::Cr0GuestHostMask, cr0_mask)?;
        set(ControlNat::Cr0ReadShadow, e.cr0)?;
        set(GuestNat::Cr4, cr4_hw)?;
        set(ControlNat::Cr4GuestHostMask, cr4_mask)?;
        set(ControlNat::Cr4ReadShadow, e.cr4)?;
        set(GuestNat::Cr3, e.cr3)?;
        set(Guest64::Efer, e.efer)?;
        set(Guest64::Pat, PAT_DEFAULT)?;
        set(Guest64::Debugctl, 0)?;
        set(Guest64::VmcsLinkPointer, u64::MAX)?;
        set(GuestNat::Dr7, 0x400)?;
        set(GuestNat::Rflags, e.rflags)?;
        set(GuestNat::PendingDebugExceptions, 0)?;
        set(Guest32::InterruptibilityState, 0)?;
        set(Guest32::ActivityState, 0)?;
        set(Guest32::SysenterCs, 0)?;
        set(GuestNat::SysenterEsp, 0)?;
        set(GuestNat::SysenterEip, 0)?;
        set(Guest32::PreemptionTimerValue, 0)?;
        let segments = [
            (
                &e.cs,
                Guest16::CsSelector,
                Guest32::CsLimit,
                Guest32::CsAccessRights,
                GuestNat::CsBase,
            ),
            (
                &e.ss,
                Guest16::SsSelector,
                Guest32::SsLimit,
                Guest32::SsAccessRights,
                GuestNat::SsBase,
            ),
            (
                &e.ds,
                Guest16::DsSelector,
                Guest32::DsLimit,
                Guest32::DsAccessRights,
                GuestNat::DsBase,
            ),
            (
                &e.es,
                Guest16::EsSelector,
                Guest32::EsLimit,
                Guest32::EsAccessRights,
                GuestNat::EsBase,
            ),
            (
                &e.fs,
                Guest16::FsSelector,
                Guest32::FsLimit,
                Guest32::FsAccessRights,
                GuestNat::FsBase,
            ),
            (
                &e.gs,
                Guest16::GsSelector,
                Guest32::GsLimit,
                Guest32::GsAccessRights,
                GuestNat::GsBase,
            ),
            (
                &e.tr,
                Guest16::TrSelector,
                Guest32::TrLimit,
                Guest32::TrAccessRights,
                GuestNat::TrBase,
            ),
            (
                &e.ldtr,
                Guest16::LdtrSelector,
                Guest32::LdtrLimit,
                Guest32::LdtrAccessRights,
                GuestNat::LdtrBase,
            ),
        ];
        for (seg, selector, limit, rights, base) in segments {
            set(selector, u64::from(seg.selector))?;
            set(limit, u64::from(seg.limit))?;
            set(rights, u64::from(seg.vmx_access_rights()))?;
            set(base, seg.base)?;
        }
        set(GuestNat::GdtrBase, e.gdtr.base)?;
        set(Guest32::GdtrLimit, u64::from(e.gdtr.limit))?;
        set(GuestNat::IdtrBase, e.idtr.base)?;
        set(Guest32::IdtrLimit, u64::from(e.idtr.limit))?;
        self.rip = e.rip;
        self.rsp = e.rsp;
        self.regs.rdi = e.rdi;
        Ok(())
    }

    /// Makes this vCPU's VMCS current if it is not.
    fn make_current(&self) -> Result<(), VmFail> {
        // SAFETY: called on the owning CPU, in VMX operation (checked by `run`); the VMCS is ours.
        unsafe {
            if instr::vmptrst() != self.vmcs {
                instr::vmptrld(self.vmcs)?;
            }
        }
        Ok(())
    }

    /// Sets the guest RIP (e.g. to step over a faulting instruction the layer above emulated).
    pub fn set_rip(&mut self, rip: u64) {
        self.rip = rip;
    }

    /// Sets the TSC offset used from the next entry on.
    pub fn set_tsc_offset(&mut self, offset: u64) {
        self.tsc_offset = offset;
    }

    /// The VMCS exit information of the last exit (for reports).
    pub fn last_exit(&self) -> ExitInfo {
        self.last
    }

    /// Preemption-timer value saved at the last exit, when the CPU saves it.
    pub fn timer_remaining(&self) -> Option<u32> {
        self.timer_left
    }

    /// Preemption-timer value programmed at the last entry: 0 means the deadline had already passed when `run` was
    /// called (a late slice is then the caller's delay, not the timer's).
    pub fn timer_at_entry(&self) -> u32 {
        self.timer_armed
    }

    /// The preemption timer counts once per 2^rate TSC ticks.
    pub fn timer_rate(&self) -> u32 {
        self.timer_rate
    }

    /// VPID (0 = none).
    pub fn vpid(&self) -> u16 {
        self.vpid
    }

    /// EPT pointer the VMCS was given.
    pub fn eptp(&self) -> u64 {
        self.eptp
    }

    /// What the run path remembered of the last entry and exit (guest CR2, host TSCs, IDT vectoring, injection).
    pub fn last_entry(&self) -> LastEntry {
        self.last_entry
    }

    /// Writes one VMCS field of this vCPU, bypassing the set-up rules: only for the self-test, which breaks a
    /// field on purpose to prove that entry failures are decoded.
    pub(super) fn overwrite_field<F: super::fields::Field>(
        &mut self,
        f: F,
        v: u64,
    ) -> Result<(), VmFail> {
        self.make_current()?;
        set(f, v).map_err(|e| e.fail)
    }

    /// Makes this vCPU's VMCS current for reads on its own CPU; `None` on another CPU or if VMPTRLD fails.
    pub(super) fn make_current_here(&self) -> Option<()> {
        if cpu::cpu_index() != self.cpu {
            return None;
        }
        self.make_current().ok()
    }

    /// Reads a guest-state field for reports (e.g. CR0, CR3); `None` if the VMCS cannot be made current here.
    pub fn guest_field(&self, f: GuestNat) -> Option<u64> {
        if cpu::cpu_index() != self.cpu {
            return None;
        }
        self.make_current().ok()?;
        instr::read_nat(f).ok()
    }

    /// Records the entry that just exited in the trace ring.
    fn trace_exit(&mut self, deadline_tsc: u64, exit_tsc: u64) {
        // RFLAGS and the interruptibility state cost two VMREADs: read only for a late exit, the one they explain.
        let late =
            self.trace.is_late(exit_tsc, deadline_tsc) && self.last.reason & ENTRY_FAILURE == 0;
        let (rflags, interruptibility) = if late {
            (
                instr::read_nat(GuestNat::Rflags).ok(),
                instr::read32(Guest32::InterruptibilityState).ok(),
            )
        } else {
            (None, None)
        };
        self.trace.record(trace::Entry {
            seq: 0,
            entry_tsc: self.entry_tsc,
            deadline: deadline_tsc,
            armed: self.timer_armed,
            saved: self.timer_left,
            exit_tsc,
            reason: self.last.reason,
            rip: self.rip,
            rflags,
            interruptibility,
        });
    }

    /// Prints the trace around this vCPU's first late exit (end of a run; `who` names it, e.g. "vm rt vCPU 0").
    pub fn trace_report(&self, who: &str) {
        self.trace.report(who);
    }

    /// Exits that came more than `trace::LATE_NS` after their deadline.
    pub fn late_exits(&self) -> u64 {
        self.trace.lates()
    }

    /// Drops the vCPU on its own CPU and returns the number of frames freed: VMCLEAR, then its VMCS, MSR and I/O
    /// bitmaps and MSR areas. Off its CPU, or if VMCLEAR fails, the frames are leaked (logged) and 0 is returned.
    pub fn release(mut self) -> u64 {
        self.free_frames()
    }

    /// VMCLEAR and free (see [`Self::release`]); leaves every frame field 0, so it runs once.
    fn free_frames(&mut self) -> u64 {
        let frames = [
            &mut self.vmcs,
            &mut self.msr_bitmap,
            &mut self.io_bitmap_a,
            &mut self.io_bitmap_b,
            &mut self.guest_msrs,
            &mut self.host_msrs,
        ];
        if frames.iter().all(|f| **f == 0) {
            return 0;
        }
        if cpu::cpu_index() != self.cpu {
            log::error!(
                "vmx: vCPU dropped off its CPU {}: leaking its VMCS and bitmaps",
                self.cpu
            );
            return 0;
        }
        if *frames[0] != 0 {
            // SAFETY: on the owning CPU in VMX operation; VMCLEAR writes the VMCS back and makes it not current,
            // after which the frame is ordinary memory again.
            if let Err(e) = unsafe { instr::vmclear(*frames[0]) } {
                log::error!(
                    "vmx: VMCLEAR of {:#x} failed ({e}): leaking its frames",
                    *frames[0]
                );
                return 0;
            }
        }
        let mut freed = 0;
        for f in frames {
            if *f != 0 {
                // SAFETY: each frame came from the allocator in `new`, is no longer referenced by any current VMCS
                // (cleared above), and is freed once (the field is zeroed right after).
                unsafe { frame::free(*f) };
                *f = 0;
                freed += 1;
            }
        }
        freed
    }

    /// Everything written before an entry; an error is a VMWRITE failure number.
    fn prepare_entry(&mut self, deadline_tsc: u64) -> Result<(), VmFail> {
        let w = |r: Result<(), VmFail>| r;
        w(instr::write_nat(GuestNat::Rip, self.rip))?;
        w(instr::write_nat(GuestNat::Rsp, self.rsp))?;
        w(instr::write64(Control64::TscOffset, self.tsc_offset))?;
        self.entry_tsc = tsc::rdtsc();
        let ticks = deadline_tsc.saturating_sub(self.entry_tsc);
        let timer = u32::try_from(ticks >> self.timer_rate).unwrap_or(u32::MAX);
        w(instr::write32(Guest32::PreemptionTimerValue, timer))?;
        self.timer_armed = timer;
        if self.skipped {
            // Skipping an instruction ends blocking by STI / MOV SS (SDM Table 25-3, bits 0-1).
            let s = instr::read32(Guest32::InterruptibilityState)?;
            if s & 0b11 != 0 {
                instr::write32(Guest32::InterruptibilityState, s & !0b11)?;
            }
            self.skipped = false;
        }
        if let Some(inj) = self.pending.take() {
            let mut info = inj.info;
            if info & intr_info::ERROR_CODE_VALID != 0 {
                // An error code is delivered only in protected mode (SDM §27.2.1.3).
                let cr0 = instr::read_nat(GuestNat::Cr0)?;
                if cr0 & 1 == 0 {
                    info &= !intr_info::ERROR_CODE_VALID;
                }
            }
            instr::write32(Control32::EntryInterruptionInfo, info)?;
            self.last_entry.injected = info;
            instr::write32(Control32::EntryExceptionErrorCode, inj.error_code)?;
            instr::write32(Control32::EntryInstructionLength, inj.instruction_len)?;
        }
        Ok(())
    }

    fn read_exit(&mut self) -> Result<(), VmFail> {
        self.last = ExitInfo {
            reason: instr::read32(ReadOnly32::ExitReason)?,
            qualification: instr::read_nat(ReadOnlyNat::ExitQualification)?,
            guest_physical: instr::read64(ReadOnly64::GuestPhysicalAddress)?,
            interruption_info: instr::read32(ReadOnly32::ExitInterruptionInfo)?,
            interruption_error: instr::read32(ReadOnly32::ExitInterruptionErrorCode)?,
            instruction_len: instr::read32(ReadOnly32::ExitInstructionLength)?,
        };
        if self.last.reason & ENTRY_FAILURE != 0 {
            return Ok(());
        }
        self.rip = instr::read_nat(GuestNat::Rip)?;
        self.rsp = instr::read_nat(GuestNat::Rsp)?;
        self.timer_left = if self.save_timer {
            Some(instr::read32(Guest32::PreemptionTimerValue)?)
        } else {
            None
        };
        // An event whose delivery the exit interrupted is delivered again at the next entry (SDM §28.2.4), unless
        // the layer above injects another one first.
        let idt = instr::read32(ReadOnly32::IdtVectoringInfo)?;
        self.last_entry.idt_vectoring = u64::from(idt);
        if idt & intr_info::VALID != 0 {
            let error_code = instr::read32(ReadOnly32::IdtVectoringErrorCode)?;
            self.last_entry.idt_vectoring |= u64::from(error_code) << 32;
            self.pending = Some(Injection {
                info: idt & !(1 << 12),
                error_code,
                instruction_len: self.last.instruction_len,
            });
        }
        Ok(())
    }

    /// Prepares, enters and decodes one exit; interrupts are disabled and the VMCS is current.
    fn enter_once(&mut self, deadline_tsc: u64) -> Result<VmExit, EntryFailure> {
        let fail = |e: VmFail| EntryFailure::VmxInstructionError(vmfail_number(e));
        match self.prepare_entry(deadline_tsc).map(|()| self.enter()) {
            Err(e) => Err(fail(e)),
            Ok(FAIL_INVALID) => Err(EntryFailure::VmxInstructionError(0)),
            Ok(FAIL_VALID) => {
                let n = instr::read32(ReadOnly32::InstructionError).unwrap_or(0);
                Err(EntryFailure::VmxInstructionError(n))
            }
            Ok(status) if status != EXITED => Err(EntryFailure::VmxInstructionError(0)),
            Ok(_) => {
                let exit_tsc = tsc::rdtsc();
                self.last_entry.exit_tsc = exit_tsc;
                self.last_entry.entry_tsc = self.entry_tsc;
                self.read_exit().map_err(fail)?;
                self.trace_exit(deadline_tsc, exit_tsc);
                if self.last.reason & ENTRY_FAILURE != 0 {
                    return Err(EntryFailure::VmxInvalidGuestState {
                        reason: self.last.reason & 0xFFFF,
                        qualification: self.last.qualification,
                    });
                }
                self.launched = true;
                if self.last.basic() == reason::EXCEPTION_OR_NMI
                    && exit::delivered(&self.last) == Delivered::Nmi
                {
                    // SAFETY: NMI exiting took a host NMI; vector 2 is the kernel's NMI handler, which runs on its
                    // IST stack and returns with IRET.
                    unsafe { asm!("int 2", options(nomem, nostack)) };
                }
                Ok(exit::decode(&self.last))
            }
        }
    }

    /// One entry and exit with interrupts disabled; returns the stub's status.
    ///
    /// CR2 is neither loaded by VM entry nor saved by VM exit (SDM §27.3, §28.3): the CPU's CR2 simply carries
    /// over, so another vCPU's guest (or a host page fault) could have changed it since this guest's last exit.
    /// It is saved after every exit and written back before entry when it differs (a CR2 write is costly on
    /// hardware, so only then), and a stop dump shows the guest's value.
    fn enter(&mut self) -> u64 {
        // SAFETY: FXRSTOR/FXSAVE use our own 16-byte aligned 512-byte area (CR4.OSFXSR was set by `cpu::enable`);
        // the entry stub gets a valid register block and the VMCS it enters is current and fully programmed. The
        // host state the VMCS restores on exit is this CPU's own, and the stub returns like a normal function.
        // CR2 only holds the last page-fault address: the host's own code does not depend on it, and interrupts
        // are disabled, so nothing runs between the write and the entry.
        unsafe {
            let cr2: u64;
            asm!("mov {0}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags));
            if cr2 != self.last_entry.cr2 {
                asm!("mov cr2, {0}", in(reg) self.last_entry.cr2, options(nomem, nostack, preserves_flags));
            }
            asm!("fxrstor64 [{0}]", in(reg) &self.fx, options(nostack, readonly, preserves_flags));
            let status = cv_vmx_run(&mut self.regs, u64::from(self.launched));
            asm!("fxsave64 [{0}]", in(reg) &mut self.fx, options(nostack, preserves_flags));
            asm!("mov {0}, cr2", out(reg) self.last_entry.cr2, options(nomem, nostack, preserves_flags));
            status
        }
    }
}

impl Vcpu for VmxVcpu {
    fn run(&mut self, deadline_tsc: u64) -> Result<VmExit, EntryFailure> {
        if cpu::cpu_index() != self.cpu {
            return Err(EntryFailure::VmxInstructionError(0));
        }
        let fail = |e: VmFail| EntryFailure::VmxInstructionError(vmfail_number(e));
        self.make_current().map_err(fail)?;
        let interrupts = x86_64::instructions::interrupts::are_enabled();
        x86_64::instructions::interrupts::disable();
        // The timer field is 32 bits: a deadline further away than 2^32 timer units expires early, and the guest is
        // simply entered again (host interrupts still end the run).
        let grain = 1u64 << self.timer_rate;
        let result = loop {
            match self.enter_once(deadline_tsc) {
                Ok(VmExit::SliceExpired) if tsc::rdtsc().saturating_add(grain) < deadline_tsc => {
                    continue
                }
                other => break other,
            }
        };
        if interrupts {
            // A host interrupt that caused an external-interrupt exit is still pending and is taken here.
            x86_64::instructions::interrupts::enable();
        }
        result
    }

    fn gpr(&self, reg: Gpr) -> u64 {
        let r = &self.regs;
        match reg {
            Gpr::Rax => r.rax,
            Gpr::Rcx => r.rcx,
            Gpr::Rdx => r.rdx,
            Gpr::Rbx => r.rbx,
            Gpr::Rsp => self.rsp,
            Gpr::Rbp => r.rbp,
            Gpr::Rsi => r.rsi,
            Gpr::Rdi => r.rdi,
            Gpr::R8 => r.r8,
            Gpr::R9 => r.r9,
            Gpr::R10 => r.r10,
            Gpr::R11 => r.r11,
            Gpr::R12 => r.r12,
            Gpr::R13 => r.r13,
            Gpr::R14 => r.r14,
            Gpr::R15 => r.r15,
        }
    }

    fn set_gpr(&mut self, reg: Gpr, value: u64) {
        let r = &mut self.regs;
        let slot = match reg {
            Gpr::Rax => &mut r.rax,
            Gpr::Rcx => &mut r.rcx,
            Gpr::Rdx => &mut r.rdx,
            Gpr::Rbx => &mut r.rbx,
            Gpr::Rsp => &mut self.rsp,
            Gpr::Rbp => &mut r.rbp,
            Gpr::Rsi => &mut r.rsi,
            Gpr::Rdi => &mut r.rdi,
            Gpr::R8 => &mut r.r8,
            Gpr::R9 => &mut r.r9,
            Gpr::R10 => &mut r.r10,
            Gpr::R11 => &mut r.r11,
            Gpr::R12 => &mut r.r12,
            Gpr::R13 => &mut r.r13,
            Gpr::R14 => &mut r.r14,
            Gpr::R15 => &mut r.r15,
        };
        *slot = value;
    }

    fn rip(&self) -> u64 {
        self.rip
    }

    fn skip_instruction(&mut self) {
        self.rip = self.rip.wrapping_add(u64::from(self.last.instruction_len));
        self.skipped = true;
    }

    fn set_rip(&mut self, rip: u64) {
        self.rip = rip;
        // Written at the next entry; like a skip, it ends STI / MOV SS blocking there.
        self.skipped = true;
    }

    fn control_state(&self) -> Option<ControlState> {
        if cpu::cpu_index() != self.cpu {
            return None;
        }
        self.make_current().ok()?;
        let nat = |f: GuestNat| instr::read_nat(f).ok();
        // Access-rights format (SDM Vol. 3C Table 25-2): DPL 6:5, L 13, D/B 14.
        let cs = instr::read32(Guest32::CsAccessRights).ok()?;
        let ss = instr::read32(Guest32::SsAccessRights).ok()?;
        Some(ControlState {
            cr0: nat(GuestNat::Cr0)?,
            cr3: nat(GuestNat::Cr3)?,
            cr4: nat(GuestNat::Cr4)?,
            efer: instr::read64(Guest64::Efer).ok()?,
            rflags: nat(GuestNat::Rflags)?,
            cs_l: cs & (1 << 13) != 0,
            cs_db: cs & (1 << 14) != 0,
            cpl: u8::try_from((ss >> 5) & 3).ok()?,
            cs_base: nat(GuestNat::CsBase)?,
            ds_base: nat(GuestNat::DsBase)?,
            es_base: nat(GuestNat::EsBase)?,
        })
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        let kind = match vector {
            2 => intr_info::TYPE_NMI,
            0..=31 => intr_info::TYPE_HARDWARE_EXCEPTION,
            _ => intr_info::TYPE_EXTERNAL,
        };
        let with_code =
            kind == intr_info::TYPE_HARDWARE_EXCEPTION && ERROR_CODE_VECTORS.contains(&vector);
        let info = u32::from(vector)
            | (kind << intr_info::TYPE_SHIFT)
            | if with_code {
                intr_info::ERROR_CODE_VALID
            } else {
                0
            }
            | intr_info::VALID;
        self.pending = Some(Injection {
            info,
            error_code: error_code.unwrap_or(0),
            instruction_len: 0,
        });
    }

    fn guest_tsc(&self, host_tsc: u64) -> u64 {
        host_tsc.wrapping_add(self.tsc_offset)
    }
}

impl Drop for VmxVcpu {
    fn drop(&mut self) {
        self.free_frames();
    }
}
