//! Kernel access to PCI configuration space for the generic code in `drivers::pci`.
//!
//! Two mechanisms, chosen once: ECAM when ACPI has an MCFG entry for segment 0 (PCI Firmware Specification 3.2
//! section 4.1.2), else configuration mechanism #1 through ports 0xCF8/0xCFC (PCI 3.0 section 3.2.2.3.2).
//! ECAM pages are mapped uncached on first use, one 4 KiB page per function, so enumerating a few buses costs a
//! few dozen page mappings instead of the whole 256 MiB window.
//!
//! Locking: one spin lock serialises all configuration accesses (the 0xCF8/0xCFC pair is not atomic, and the
//! ECAM page cache is shared). Nothing else is taken while it is held except the paging lock inside
//! `paging::map_mmio` (lock order: PCI, then paging).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use acpi::mcfg::Mcfg;
use acpi::AcpiTables;
use drivers::pci::{self, Bdf, ConfigSpace};
use spin::Mutex;
use x86_64::instructions::port::Port;

use crate::acpi::DirectMapHandler;
use crate::arch::x86_64::paging;
use crate::boot::{Firmware, RsdpInfo};

/// An ECAM window for segment 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EcamWindow {
    /// Physical base (the address of bus `start_bus`).
    pub base: u64,
    /// First bus decoded.
    pub start_bus: u8,
    /// Last bus decoded.
    pub end_bus: u8,
}

/// How configuration space is reached.
enum Mechanism {
    Ecam {
        window: EcamWindow,
        pages: BTreeMap<Bdf, u64>,
    },
    Ports,
}

/// Configuration-space access for the whole machine.
pub struct Config {
    mechanism: Mechanism,
}

static ACCESS: Mutex<Option<Config>> = Mutex::new(None);

/// The MCFG entry for segment 0, if the firmware provides one.
fn find_ecam() -> Option<EcamWindow> {
    let bi = crate::BOOT_INFO.get()?;
    let h = DirectMapHandler;
    let phys = |a: u64| usize::try_from(a).ok();
    // SAFETY: as in crate::acpi::init, which validated the same root table during boot.
    let tables = unsafe {
        match bi.rsdp {
            Some(RsdpInfo::Xsdt(a)) => AcpiTables::from_rsdt(h, 2, phys(a)?),
            Some(RsdpInfo::Rsdt(a)) => AcpiTables::from_rsdt(h, 0, phys(a)?),
            None if bi.firmware == Firmware::Bios => AcpiTables::search_for_rsdp_bios(h),
            None => return None,
        }
    }
    .ok()?;
    let mcfg = tables.find_table::<Mcfg>().ok()?;
    let table = mcfg.get();
    let window = table
        .entries()
        .iter()
        .find(|e| e.pci_segment_group == 0 && e.bus_number_start <= e.bus_number_end)
        .map(|e| EcamWindow {
            base: e.base_address,
            start_bus: e.bus_number_start,
            end_bus: e.bus_number_end,
        });
    window
}

impl Config {
    fn detect() -> Self {
        match find_ecam() {
            Some(window) => Self {
                mechanism: Mechanism::Ecam {
                    window,
                    pages: BTreeMap::new(),
                },
            },
            None => Self {
                mechanism: Mechanism::Ports,
            },
        }
    }

    /// "ecam" or "ports".
    pub fn name(&self) -> &'static str {
        match self.mechanism {
            Mechanism::Ecam { .. } => "ecam",
            Mechanism::Ports => "ports",
        }
    }

    /// Buses the mechanism reaches.
    pub fn buses(&self) -> (u8, u8) {
        match &self.mechanism {
            Mechanism::Ecam { window, .. } => (window.start_bus, window.end_bus),
            Mechanism::Ports => (0, 255),
        }
    }

    /// Virtual address of `bdf`'s ECAM page, mapping it on first use.
    fn ecam_page(window: &EcamWindow, pages: &mut BTreeMap<Bdf, u64>, bdf: Bdf) -> Option<u64> {
        if bdf.bus > window.end_bus {
            return None;
        }
        if let Some(&va) = pages.get(&bdf) {
            return Some(va);
        }
        let off = pci::ecam_offset(window.start_bus, bdf, 0)?;
        let va = paging::map_mmio(window.base.checked_add(off)?, 4096).ok()?;
        pages.insert(bdf, va);
        Some(va)
    }
}

impl ConfigSpace for Config {
    fn read32(&mut self, bdf: Bdf, offset: u16) -> u32 {
        match &mut self.mechanism {
            Mechanism::Ecam { window, pages } => {
                let Some(va) = Self::ecam_page(window, pages, bdf) else {
                    return u32::MAX;
                };
                if offset >= 4096 {
                    return u32::MAX;
                }
                // SAFETY: va maps this function's 4 KiB ECAM page uncached; offset is dword aligned below 4 KiB.
                unsafe { ((va + u64::from(offset & !3)) as *const u32).read_volatile() }
            }
            Mechanism::Ports => {
                let Some(addr) = pci::cf8_address(bdf, offset) else {
                    return u32::MAX;
                };
                // SAFETY: 0xCF8/0xCFC are the PCI configuration ports; the ACCESS lock serialises the pair.
                unsafe {
                    Port::<u32>::new(0xCF8).write(addr);
                    Port::<u32>::new(0xCFC).read()
                }
            }
        }
    }

    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
        match &mut self.mechanism {
            Mechanism::Ecam { window, pages } => {
                let Some(va) = Self::ecam_page(window, pages, bdf) else {
                    return;
                };
                if offset >= 4096 {
                    return;
                }
                // SAFETY: as in read32.
                unsafe { ((va + u64::from(offset & !3)) as *mut u32).write_volatile(value) }
            }
            Mechanism::Ports => {
                let Some(addr) = pci::cf8_address(bdf, offset) else {
                    return;
                };
                // SAFETY: as in read32.
                unsafe {
                    Port::<u32>::new(0xCF8).write(addr);
                    Port::<u32>::new(0xCFC).write(value);
                }
            }
        }
    }
}

/// Runs `f` with exclusive configuration-space access (detected on first use).
pub fn with<R>(f: impl FnOnce(&mut Config) -> R) -> R {
    let mut guard = ACCESS.lock();
    let cfg = guard.get_or_insert_with(Config::detect);
    f(cfg)
}

/// Every function reachable from bus 0 through PCI-to-PCI bridges.
pub fn functions() -> Vec<pci::Function> {
    with(|cfg| {
        let (first, last) = cfg.buses();
        pci::enumerate_tree(cfg, first, last)
    })
}
