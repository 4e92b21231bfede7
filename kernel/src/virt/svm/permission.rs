//! I/O and MSR permission maps (APM Vol. 2 §15.10.1 and §15.11).
//!
//! - IOPM: 12 KiB, one bit per port (set = intercept), plus the bits past port 0xFFFF that multi-byte accesses at
//!   the top of the port space consult. Every port is intercepted (port I/O goes to the virtual devices of the layer
//!   above), so one all-ones map serves every vCPU of every VM: it is built once and never freed.
//! - MSRPM: 8 KiB, two bits per MSR (bit 2n intercepts RDMSR, bit 2n+1 WRMSR) for three ranges: 0000_0000h-
//!   0000_1FFFh at byte 0x000, C000_0000h-C000_1FFFh at 0x800, C001_0000h-C001_1FFFh at 0x1000. MSRs outside the
//!   ranges always exit. A map starts with everything intercepted; the VM's policy (the layer above decides the allow
//!   list) opens individual MSRs for reads and/or writes.
//!
//! Invariant: both maps are physically contiguous, 4 KiB aligned, and live as long as any VMCB points to them
//! (the IOPM for ever; an MSRPM is reference-counted by the VM's vCPUs).

use spin::Once;

use crate::arch::x86_64::paging;
use crate::mm::{frame, PAGE_SIZE};

/// Pages of the IOPM.
const IOPM_PAGES: u64 = 3;
/// Pages of the MSRPM.
const MSRPM_PAGES: u64 = 2;

/// Why a map could not be built or changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PermissionError {
    /// No contiguous frames.
    OutOfFrames,
    /// The MSR lies outside the three ranges the MSRPM covers; it always exits.
    MsrNotMappable(u32),
}

static IOPM: Once<Result<u64, PermissionError>> = Once::new();

/// Physical address of the shared intercept-every-port IOPM.
///
/// # Errors
/// No contiguous frames for it (checked once; later calls give the same answer).
pub fn iopm_pa() -> Result<u64, PermissionError> {
    *IOPM.call_once(|| {
        let pa = frame::alloc_contiguous(IOPM_PAGES).ok_or(PermissionError::OutOfFrames)?;
        let len = usize::try_from(IOPM_PAGES * PAGE_SIZE).unwrap_or(0);
        // SAFETY: the frames were just allocated for the IOPM, are contiguous and mapped by the direct map.
        unsafe { core::ptr::write_bytes(paging::phys_to_virt(pa), 0xFF, len) };
        Ok(pa)
    })
}

/// Which accesses to one MSR the guest may make without an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsrAllow {
    pub msr: u32,
    pub read: bool,
    pub write: bool,
}

/// One VM's MSR permission map.
#[derive(Debug)]
pub struct MsrPermissionMap {
    pa: u64,
}

// SAFETY: the frames are owned by this value and only changed through `&mut self`.
unsafe impl Send for MsrPermissionMap {}
// SAFETY: shared references only read the physical address.
unsafe impl Sync for MsrPermissionMap {}

/// Bit index of the read-intercept bit of `msr` in the MSRPM.
fn msr_bit(msr: u32) -> Option<usize> {
    let (base, vector) = match msr {
        0x0000_0000..=0x0000_1FFF => (0x0000_0000, 0),
        0xC000_0000..=0xC000_1FFF => (0xC000_0000, 1),
        0xC001_0000..=0xC001_1FFF => (0xC001_0000, 2),
        _ => return None,
    };
    let index = usize::try_from(msr - base).ok()?;
    Some(vector * 0x800 * 8 + index * 2)
}

impl MsrPermissionMap {
    /// A map intercepting every MSR except those in `allow`.
    ///
    /// # Errors
    /// No contiguous frames, or an allowed MSR outside the mappable ranges (it could never be passed through).
    pub fn new(allow: &[MsrAllow]) -> Result<Self, PermissionError> {
        if let Some(a) = allow.iter().find(|a| msr_bit(a.msr).is_none()) {
            return Err(PermissionError::MsrNotMappable(a.msr));
        }
        let pa = frame::alloc_contiguous(MSRPM_PAGES).ok_or(PermissionError::OutOfFrames)?;
        let mut map = Self { pa };
        map.bytes().fill(0xFF);
        for a in allow {
            map.set(a.msr, !a.read, !a.write)?;
        }
        Ok(map)
    }

    /// Physical address for the VMCB.
    pub fn pa(&self) -> u64 {
        self.pa
    }

    fn bytes(&mut self) -> &mut [u8] {
        let len = usize::try_from(MSRPM_PAGES * PAGE_SIZE).unwrap_or(0);
        // SAFETY: the frames are owned by this map, contiguous and mapped by the direct map; `&mut self` makes this
        // the only reference.
        unsafe { core::slice::from_raw_parts_mut(paging::phys_to_virt(self.pa), len) }
    }

    fn byte(&self, index: usize) -> u8 {
        if u64::try_from(index).map_or(true, |i| i >= MSRPM_PAGES * PAGE_SIZE) {
            return 0xFF;
        }
        // SAFETY: as in `bytes`; the index is inside the map and the read is a plain byte load (the processor only
        // reads the map).
        unsafe { paging::phys_to_virt(self.pa).add(index).read_volatile() }
    }

    /// Sets whether RDMSR / WRMSR of `msr` exit.
    ///
    /// # Errors
    /// The MSR is outside the mappable ranges.
    pub fn set(
        &mut self,
        msr: u32,
        intercept_read: bool,
        intercept_write: bool,
    ) -> Result<(), PermissionError> {
        let bit = msr_bit(msr).ok_or(PermissionError::MsrNotMappable(msr))?;
        let bytes = self.bytes();
        for (b, on) in [(bit, intercept_read), (bit + 1, intercept_write)] {
            let mask = 1u8 << (b % 8);
            if on {
                bytes[b / 8] |= mask;
            } else {
                bytes[b / 8] &= !mask;
            }
        }
        Ok(())
    }

    /// Whether RDMSR (`write` false) or WRMSR of `msr` exits.
    pub fn intercepts(&self, msr: u32, write: bool) -> bool {
        let Some(bit) = msr_bit(msr).map(|b| b + usize::from(write)) else {
            return true;
        };
        self.byte(bit / 8) & (1 << (bit % 8)) != 0
    }
}

impl Drop for MsrPermissionMap {
    fn drop(&mut self) {
        for i in 0..MSRPM_PAGES {
            // SAFETY: the frames came from the allocator in `new`; no VMCB uses them any more (vCPUs hold the map
            // by reference count and are gone).
            unsafe { frame::free(self.pa + i * PAGE_SIZE) };
        }
    }
}
