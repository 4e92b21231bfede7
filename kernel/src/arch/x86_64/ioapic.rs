//! I/O APIC: mapped from the MADT, all redirection entries masked until devices are routed (later issues).
//!
//! Access is indirect through IOREGSEL (offset 0x00) and IOWIN (0x10) (82093AA data sheet, 3.1).

use super::paging;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_REDIR_BASE: u32 = 0x10;
const REDIR_MASKED: u32 = 1 << 16;

/// One mapped I/O APIC.
#[derive(Clone, Copy, Debug)]
pub struct IoApic {
    /// Physical base from the MADT.
    pub phys: u64,
    /// Virtual base in the MMIO window.
    virt: u64,
    /// First global system interrupt it serves.
    pub gsi_base: u32,
}

impl IoApic {
    /// Maps the registers at `phys`.
    pub fn map(phys: u64, gsi_base: u32) -> Result<Self, paging::PagingError> {
        Ok(Self {
            phys,
            virt: paging::map_mmio(phys, 0x20)?,
            gsi_base,
        })
    }

    fn read(&self, reg: u32) -> u32 {
        // SAFETY: virt maps the IOAPIC's register window uncached; IOREGSEL/IOWIN are 32-bit registers in it.
        unsafe {
            core::ptr::write_volatile((self.virt + IOREGSEL) as *mut u32, reg);
            core::ptr::read_volatile((self.virt + IOWIN) as *const u32)
        }
    }

    fn write(&self, reg: u32, value: u32) {
        // SAFETY: as in `read`.
        unsafe {
            core::ptr::write_volatile((self.virt + IOREGSEL) as *mut u32, reg);
            core::ptr::write_volatile((self.virt + IOWIN) as *mut u32, value);
        }
    }

    /// IOAPIC id (register 0, bits 27:24).
    pub fn id(&self) -> u32 {
        (self.read(REG_ID) >> 24) & 0xF
    }

    /// Version (register 1, bits 7:0).
    pub fn version(&self) -> u32 {
        self.read(REG_VERSION) & 0xFF
    }

    /// Number of redirection entries (register 1, bits 23:16, plus one).
    pub fn pins(&self) -> u32 {
        ((self.read(REG_VERSION) >> 16) & 0xFF) + 1
    }

    /// Masks every redirection entry.
    pub fn mask_all(&self) {
        for pin in 0..self.pins() {
            self.write(REG_REDIR_BASE + pin * 2, REDIR_MASKED);
            self.write(REG_REDIR_BASE + pin * 2 + 1, 0);
        }
    }

    /// Whether redirection entry `pin` is masked.
    pub fn is_masked(&self, pin: u32) -> bool {
        self.read(REG_REDIR_BASE + pin * 2) & REDIR_MASKED != 0
    }
}
