//! The virtual-machine control block (VMCB): typed layout and accessors.
//!
//! Source: AMD64 Architecture Programmer's Manual Vol. 2 (APM), Appendix B "Layout of VMCB": Table B-1 (control
//! area, offsets 0x000-0x3FF) and Table B-2 (state-save area, offsets 0x400-0xFFF, listed in the table relative to
//! 0x400). Intercept bits: §15.9-§15.13 and Table B-1; exit codes: Appendix C; event injection: §15.20.
//!
//! Design: a field is a variant of an offset enum whose discriminant is its byte offset in the 4 KiB page, one enum
//! per access width, so a field can only be read at its architectural width and no offset arithmetic is written
//! twice. [`Vmcb`] owns the page (a frame of the kernel's allocator, reached through the direct map) and accesses it
//! only with volatile loads and stores: the processor reads and writes the page during `VMRUN`, behind the
//! compiler's back.
//!
//! Invariants: the page is 4 KiB aligned, zeroed at creation (reserved fields must be zero, APM §15.5.1), owned by
//! exactly one [`Vmcb`] and freed when it drops; it is never handed to `VMRUN` on two CPUs at once (the owning vCPU
//! is `!Sync` in use: `run` takes `&mut self`).

// The whole APM table is declared, so fields and bits the backend does not use yet are still named here.
#![allow(dead_code)]

use crate::arch::x86_64::paging;
use crate::mm::frame;

/// 64-bit control-area fields (APM Vol. 2, Table B-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Ctl64 {
    /// Physical base of the I/O permission map (12 KiB, 4 KiB aligned; §15.10.1).
    IopmBasePa = 0x040,
    /// Physical base of the MSR permission map (8 KiB, 4 KiB aligned; §15.11).
    MsrpmBasePa = 0x048,
    /// Added to the host TSC for guest reads of the TSC (§15.30.3).
    TscOffset = 0x050,
    /// Bits 7:0 V_TPR, 8 V_IRQ, 9 VGIF, 19:16 V_INTR_PRIO, 20 V_IGN_TPR, 24 V_INTR_MASKING, 39:32 V_INTR_VECTOR
    /// (§15.21).
    IntCtl = 0x060,
    /// Bit 0 INTERRUPT_SHADOW, bit 1 GUEST_INTERRUPT_MASK.
    InterruptShadow = 0x068,
    /// Exit code (Appendix C); `VMEXIT_INVALID` is -1.
    ExitCode = 0x070,
    /// Exit-specific information 1 (e.g. IOIO operands, MSR direction, NPF error code).
    ExitInfo1 = 0x078,
    /// Exit-specific information 2 (e.g. IOIO next RIP, NPF guest-physical address).
    ExitInfo2 = 0x080,
    /// Event that was being delivered when the exit happened (EVENTINJ format, §15.7.2).
    ExitIntInfo = 0x088,
    /// Bit 0 NP_ENABLE (nested paging, §15.25.3).
    NestedCtl = 0x090,
    /// Event injection (§15.20).
    EventInj = 0x0A8,
    /// Nested page table root (nCR3, §15.25.4).
    NCr3 = 0x0B0,
    /// Bit 0 LBR virtualisation, bit 1 virtualised VMSAVE/VMLOAD.
    VirtExt = 0x0B8,
    /// Next sequential instruction pointer, saved on instruction intercepts when NRIPS is supported (§15.7.1).
    NextRip = 0x0C8,
}

/// 32-bit control-area fields (APM Vol. 2, Table B-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Ctl32 {
    /// Bits 15:0 intercept reads of CR0-15, 31:16 writes.
    InterceptCr = 0x000,
    /// Bits 15:0 intercept reads of DR0-15, 31:16 writes.
    InterceptDr = 0x004,
    /// Bit n intercepts exception vector n.
    InterceptExceptions = 0x008,
    /// First miscellaneous intercept word ([`Misc1`]).
    InterceptMisc1 = 0x00C,
    /// Second miscellaneous intercept word ([`Misc2`]).
    InterceptMisc2 = 0x010,
    /// Guest ASID (bits 31:0 of the quadword at 0x058).
    GuestAsid = 0x058,
    /// VMCB clean bits (§15.15.3); zero = the processor reloads everything.
    CleanBits = 0x0C0,
}

/// 8-bit control-area fields (APM Vol. 2, Table B-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Ctl8 {
    /// TLB_CONTROL (bits 39:32 of the quadword at 0x058, §15.16.1): 0 nothing, 1 flush the whole TLB, 3 flush this
    /// guest's entries, 7 flush this guest's non-global entries.
    TlbControl = 0x05C,
}

/// First miscellaneous intercept word, offset 0x00C (APM Vol. 2, Table B-1).
pub mod misc1 {
    /// Physical maskable interrupt.
    pub const INTR: u32 = 1 << 0;
    /// Physical NMI.
    pub const NMI: u32 = 1 << 1;
    /// Physical SMI.
    pub const SMI: u32 = 1 << 2;
    /// Physical INIT.
    pub const INIT: u32 = 1 << 3;
    /// `CPUID`.
    pub const CPUID: u32 = 1 << 18;
    /// `RSM`.
    pub const RSM: u32 = 1 << 19;
    /// `INVD`.
    pub const INVD: u32 = 1 << 22;
    /// `HLT`.
    pub const HLT: u32 = 1 << 24;
    /// `INVLPGA`.
    pub const INVLPGA: u32 = 1 << 26;
    /// Port I/O, filtered by the I/O permission map.
    pub const IOIO_PROT: u32 = 1 << 27;
    /// `RDMSR`/`WRMSR`, filtered by the MSR permission map.
    pub const MSR_PROT: u32 = 1 << 28;
    /// Task switches.
    pub const TASK_SWITCH: u32 = 1 << 29;
    /// FERR_FREEZE (x87 freeze).
    pub const FERR_FREEZE: u32 = 1 << 30;
    /// Shutdown (triple fault).
    pub const SHUTDOWN: u32 = 1 << 31;
}

/// Second miscellaneous intercept word, offset 0x010 (APM Vol. 2, Table B-1).
pub mod misc2 {
    /// `VMRUN` (must be set: APM §15.5.1).
    pub const VMRUN: u32 = 1 << 0;
    /// `VMMCALL`.
    pub const VMMCALL: u32 = 1 << 1;
    /// `VMLOAD`.
    pub const VMLOAD: u32 = 1 << 2;
    /// `VMSAVE`.
    pub const VMSAVE: u32 = 1 << 3;
    /// `STGI`.
    pub const STGI: u32 = 1 << 4;
    /// `CLGI`.
    pub const CLGI: u32 = 1 << 5;
    /// `SKINIT`.
    pub const SKINIT: u32 = 1 << 6;
    /// `WBINVD`.
    pub const WBINVD: u32 = 1 << 9;
    /// `MONITOR`/`MONITORX`.
    pub const MONITOR: u32 = 1 << 10;
    /// `MWAIT`/`MWAITX`.
    pub const MWAIT: u32 = 1 << 11;
    /// `XSETBV`.
    pub const XSETBV: u32 = 1 << 13;
}

/// Bits of [`Ctl64::IntCtl`] (APM Vol. 2, §15.21).
pub mod int_ctl {
    /// V_INTR_MASKING: the guest's RFLAGS.IF masks only virtual interrupts; physical ones follow the host's IF.
    pub const V_INTR_MASKING: u64 = 1 << 24;
}

/// Bit of [`Ctl64::NestedCtl`]: enable nested paging.
pub const NP_ENABLE: u64 = 1 << 0;

/// Segment registers in the state-save area; the value is the offset of the 16-byte slot (selector u16,
/// attributes u16, limit u32, base u64; APM Vol. 2, Table B-2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Seg {
    Es = 0x400,
    Cs = 0x410,
    Ss = 0x420,
    Ds = 0x430,
    Fs = 0x440,
    Gs = 0x450,
    Gdtr = 0x460,
    Ldtr = 0x470,
    Idtr = 0x480,
    Tr = 0x490,
}

/// 64-bit state-save-area fields (APM Vol. 2, Table B-2; offsets from the start of the VMCB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Save64 {
    Efer = 0x4D0,
    Cr4 = 0x548,
    Cr3 = 0x550,
    Cr0 = 0x558,
    Dr7 = 0x560,
    Dr6 = 0x568,
    Rflags = 0x570,
    Rip = 0x578,
    Rsp = 0x5D8,
    Rax = 0x5F8,
    Star = 0x600,
    Lstar = 0x608,
    Cstar = 0x610,
    Sfmask = 0x618,
    KernelGsBase = 0x620,
    SysenterCs = 0x628,
    SysenterEsp = 0x630,
    SysenterEip = 0x638,
    Cr2 = 0x640,
    /// Guest PAT, used with nested paging (§15.25.8).
    GPat = 0x668,
}

/// 8-bit state-save-area fields (APM Vol. 2, Table B-2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Save8 {
    /// Current privilege level.
    Cpl = 0x4CB,
}

/// One segment register as the VMCB holds it. `attrib` packs descriptor bits 47:40 (type, S, DPL, P) into 7:0
/// and bits 55:52 (AVL, L, D/B, G) into 11:8 (APM Vol. 2, §15.5.1 "Segment state in the VMCB").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub attrib: u16,
    pub limit: u32,
    pub base: u64,
}

/// Segment attribute bits (VMCB packing).
pub mod attrib {
    /// Present.
    pub const P: u16 = 1 << 7;
    /// Code or data (not system).
    pub const S: u16 = 1 << 4;
    /// 64-bit code segment.
    pub const L: u16 = 1 << 9;
    /// Default operand size 32 bits.
    pub const DB: u16 = 1 << 10;
    /// 4 KiB limit granularity.
    pub const G: u16 = 1 << 11;
}

/// Exit codes (APM Vol. 2, Appendix C, Table C-1).
pub mod exit_code {
    /// First exception intercept (vector 0); vector n is `EXCP_BASE + n`.
    pub const EXCP_BASE: u64 = 0x40;
    /// Last exception intercept (vector 31).
    pub const EXCP_LAST: u64 = 0x5F;
    pub const INTR: u64 = 0x60;
    pub const NMI: u64 = 0x61;
    pub const SMI: u64 = 0x62;
    pub const INIT: u64 = 0x63;
    pub const CPUID: u64 = 0x72;
    pub const HLT: u64 = 0x78;
    pub const IOIO: u64 = 0x7B;
    pub const MSR: u64 = 0x7C;
    pub const SHUTDOWN: u64 = 0x7F;
    pub const VMRUN: u64 = 0x80;
    pub const VMMCALL: u64 = 0x81;
    pub const NPF: u64 = 0x400;
    /// `VMEXIT_INVALID` (-1): the VMCB failed the consistency checks of §15.5.1. Compare the low 32 bits: QEMU
    /// stores 0x0000_0000_FFFF_FFFF.
    pub const INVALID_LOW32: u64 = 0xFFFF_FFFF;
}

/// EVENTINJ / EXITINTINFO format (APM Vol. 2, §15.20).
pub mod event {
    /// Valid.
    pub const V: u64 = 1 << 31;
    /// Error code valid (it is in bits 63:32).
    pub const EV: u64 = 1 << 11;
    /// Type: external interrupt.
    pub const TYPE_INTR: u64 = 0 << 8;
    /// Type: NMI.
    pub const TYPE_NMI: u64 = 2 << 8;
    /// Type: exception.
    pub const TYPE_EXCEPTION: u64 = 3 << 8;
    /// Type field mask.
    pub const TYPE_MASK: u64 = 7 << 8;
    /// Vector mask.
    pub const VECTOR_MASK: u64 = 0xFF;
}

/// Why a VMCB could not be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfFrames;

/// One VMCB page.
#[derive(Debug)]
pub struct Vmcb {
    /// Physical address (4 KiB aligned), handed to VMRUN/VMLOAD/VMSAVE.
    pa: u64,
    /// The page through the direct map.
    va: *mut u8,
}

// SAFETY: the page is owned by this value; moving it to another CPU moves the only handle.
unsafe impl Send for Vmcb {}

impl Vmcb {
    /// A zeroed VMCB page.
    ///
    /// # Errors
    /// No free frame.
    pub fn new() -> Result<Self, OutOfFrames> {
        let pa = frame::alloc_zeroed_below(u64::MAX).ok_or(OutOfFrames)?;
        Ok(Self {
            pa,
            va: paging::phys_to_virt(pa),
        })
    }

    /// Physical address of the page.
    pub fn pa(&self) -> u64 {
        self.pa
    }

    fn ptr<T>(&self, offset: u16) -> *mut T {
        // The offsets are enum discriminants below 0x1000 and naturally aligned for their width.
        self.va.wrapping_add(usize::from(offset)).cast()
    }

    /// Reads a 64-bit control field.
    pub fn ctl64(&self, f: Ctl64) -> u64 {
        // SAFETY: the page is owned and mapped; the offset is inside it and 8-byte aligned.
        unsafe { self.ptr::<u64>(f as u16).read_volatile() }
    }

    /// Writes a 64-bit control field.
    pub fn set_ctl64(&mut self, f: Ctl64, v: u64) {
        // SAFETY: as in `ctl64`.
        unsafe { self.ptr::<u64>(f as u16).write_volatile(v) }
    }

    /// Reads a 32-bit control field.
    pub fn ctl32(&self, f: Ctl32) -> u32 {
        // SAFETY: the page is owned and mapped; the offset is inside it and 4-byte aligned.
        unsafe { self.ptr::<u32>(f as u16).read_volatile() }
    }

    /// Writes a 32-bit control field.
    pub fn set_ctl32(&mut self, f: Ctl32, v: u32) {
        // SAFETY: as in `ctl32`.
        unsafe { self.ptr::<u32>(f as u16).write_volatile(v) }
    }

    /// Writes an 8-bit control field.
    pub fn set_ctl8(&mut self, f: Ctl8, v: u8) {
        // SAFETY: the page is owned and mapped; the offset is inside it.
        unsafe { self.ptr::<u8>(f as u16).write_volatile(v) }
    }

    /// Reads an 8-bit control field.
    pub fn ctl8(&self, f: Ctl8) -> u8 {
        // SAFETY: as in `set_ctl8`.
        unsafe { self.ptr::<u8>(f as u16).read_volatile() }
    }

    /// Reads a 64-bit state-save field.
    pub fn save64(&self, f: Save64) -> u64 {
        // SAFETY: the page is owned and mapped; the offset is inside it and 8-byte aligned.
        unsafe { self.ptr::<u64>(f as u16).read_volatile() }
    }

    /// Writes a 64-bit state-save field.
    pub fn set_save64(&mut self, f: Save64, v: u64) {
        // SAFETY: as in `save64`.
        unsafe { self.ptr::<u64>(f as u16).write_volatile(v) }
    }

    /// Reads an 8-bit state-save field.
    pub fn save8(&self, f: Save8) -> u8 {
        // SAFETY: the page is owned and mapped; the offset is inside it.
        unsafe { self.ptr::<u8>(f as u16).read_volatile() }
    }

    /// Writes an 8-bit state-save field.
    pub fn set_save8(&mut self, f: Save8, v: u8) {
        // SAFETY: as in `save8`.
        unsafe { self.ptr::<u8>(f as u16).write_volatile(v) }
    }

    /// Reads a segment register.
    pub fn segment(&self, s: Seg) -> Segment {
        let o = s as u16;
        // SAFETY: the 16-byte slot at `o` lies inside the owned page; each part is naturally aligned.
        unsafe {
            Segment {
                selector: self.ptr::<u16>(o).read_volatile(),
                attrib: self.ptr::<u16>(o + 2).read_volatile(),
                limit: self.ptr::<u32>(o + 4).read_volatile(),
                base: self.ptr::<u64>(o + 8).read_volatile(),
            }
        }
    }

    /// Writes a segment register.
    pub fn set_segment(&mut self, s: Seg, v: Segment) {
        let o = s as u16;
        // SAFETY: as in `segment`.
        unsafe {
            self.ptr::<u16>(o).write_volatile(v.selector);
            self.ptr::<u16>(o + 2).write_volatile(v.attrib);
            self.ptr::<u32>(o + 4).write_volatile(v.limit);
            self.ptr::<u64>(o + 8).write_volatile(v.base);
        }
    }
}

impl Drop for Vmcb {
    fn drop(&mut self) {
        // SAFETY: the frame came from the allocator in `new`, is owned only by this value, and no VMRUN can be
        // using it (the owner holds `&mut` across VMRUN and is being dropped).
        unsafe { frame::free(self.pa) };
    }
}
