//! PCI tests against a fake configuration space.

extern crate std;

use std::collections::BTreeMap;
use std::vec::Vec;

use super::*;

/// A function's registers plus, per BAR slot, the writable address bits (0 = unimplemented) and type bits.
struct FakeFn {
    regs: [u32; 64],
    bar_mask: [u32; 6],
}

#[derive(Default)]
struct FakeBus {
    fns: BTreeMap<Bdf, FakeFn>,
    /// All-ones written to a BAR while decoding was enabled.
    unsafe_sizing: bool,
}

impl FakeBus {
    fn add(&mut self, bdf: Bdf, id: u32, class: u32, header: u32, bars: [(u32, u32); 6]) {
        let mut regs = [0u32; 64];
        regs[0] = id;
        regs[1] = 0x0010_0000; // status: capabilities list
        regs[2] = class;
        regs[3] = header << 16;
        let mut bar_mask = [0u32; 6];
        for (i, (value, mask)) in bars.iter().enumerate() {
            regs[4 + i] = *value;
            bar_mask[i] = *mask;
        }
        self.fns.insert(bdf, FakeFn { regs, bar_mask });
    }
}

impl ConfigSpace for FakeBus {
    fn read32(&mut self, bdf: Bdf, offset: u16) -> u32 {
        self.fns
            .get(&bdf)
            .map_or(u32::MAX, |f| f.regs[usize::from(offset / 4)])
    }

    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
        let Some(f) = self.fns.get_mut(&bdf) else {
            return;
        };
        let i = usize::from(offset / 4);
        let bars = if (f.regs[3] >> 16) & 0x7F == 1 { 2 } else { 6 };
        if (4..4 + bars).contains(&i) {
            let slot = i - 4;
            let mask = f.bar_mask[slot];
            let prev = if slot > 0 { f.regs[i - 1] } else { 0 };
            let upper_half = slot > 0 && prev & 1 == 0 && (prev >> 1) & 3 == 2;
            let low_bits = if upper_half {
                0
            } else if f.regs[i] & 1 == 1 {
                0x3
            } else {
                0xF
            };
            if value == u32::MAX && f.regs[1] & 0x3 != 0 {
                self.unsafe_sizing = true;
            }
            f.regs[i] = (value & mask & !low_bits) | (f.regs[i] & low_bits);
        } else if i == 1 {
            // Status is RW1C: keep it; take the command word.
            f.regs[1] = (f.regs[1] & 0xFFFF_0000) | (value & 0xFFFF);
        } else {
            f.regs[i] = value;
        }
    }
}

fn bdf(bus: u8, device: u8, function: u8) -> Bdf {
    Bdf {
        bus,
        device,
        function,
    }
}

fn machine() -> FakeBus {
    let mut b = FakeBus::default();
    let none = [(0, 0); 6];
    // Host bridge, single function.
    b.add(bdf(0, 0, 0), 0x1237_8086, 0x0600_0000, 0, none);
    // Multi-function ISA bridge with an IDE function (I/O BAR 4 at 0xC040, 16 ports).
    b.add(bdf(0, 1, 0), 0x7000_8086, 0x0601_0000, 0x80, none);
    let mut ide = none;
    ide[4] = (0xC041, 0xFFFF_FFF0);
    b.add(bdf(0, 1, 1), 0x7010_8086, 0x0101_8000, 0, ide);
    // NVMe: BAR0 64-bit non-prefetchable 16 KiB at 0x1_FEB0_0000, BAR2 32-bit 4 KiB, BAR4 absent.
    let mut nvme = none;
    nvme[0] = (0xFEB0_0004, 0xFFFF_C000);
    nvme[1] = (0x1, 0xFFFF_FFFF); // upper half: base bits 32+
    nvme[2] = (0xFEBD_1000, 0xFFFF_F000);
    b.add(bdf(0, 4, 0), 0x0010_1B36, 0x0108_0200, 0, nvme);
    // A device behind bus 2; a function 3 on a single-function device must not be seen.
    b.add(bdf(2, 3, 0), 0x1000_1AF4, 0x0100_0000, 0, none);
    b.add(bdf(2, 3, 3), 0x1001_1AF4, 0x0100_0000, 0, none);
    b
}

#[test]
fn addresses_follow_mechanism_1_and_ecam() {
    let a = cf8_address(bdf(1, 2, 3), 0x10);
    assert_eq!(a, Some(0x8001_1310));
    assert_eq!(cf8_address(bdf(0, 31, 7), 0xFF), Some(0x8000_FFFC));
    assert_eq!(cf8_address(bdf(0, 0, 0), 0x100), None);
    assert_eq!(cf8_address(bdf(0, 32, 0), 0), None);
    assert_eq!(
        ecam_offset(0, bdf(1, 2, 3), 0x104),
        Some((1 << 20) | (2 << 15) | (3 << 12) | 0x104)
    );
    assert_eq!(ecam_offset(0x10, bdf(0x11, 0, 0), 0), Some(1 << 20));
    assert_eq!(ecam_offset(0x10, bdf(0x0F, 0, 0), 0), None);
    assert_eq!(ecam_offset(0, bdf(0, 0, 0), 4096), None);
}

#[test]
fn enumeration_finds_functions_and_honours_multifunction() {
    let mut b = machine();
    let found = enumerate(&mut b, 0, 255);
    let addrs: Vec<Bdf> = found.iter().map(|f| f.bdf).collect();
    assert_eq!(
        addrs,
        [
            bdf(0, 0, 0),
            bdf(0, 1, 0),
            bdf(0, 1, 1),
            bdf(0, 4, 0),
            bdf(2, 3, 0)
        ]
    );
    let nvme: Vec<&Function> = found.iter().filter(|f| f.is_nvme()).collect();
    assert_eq!(nvme.len(), 1);
    assert_eq!((nvme[0].vendor, nvme[0].device), (0x1B36, 0x0010));
    assert_eq!(found[1].header_type, 0, "multi-function bit stripped");
    assert_eq!(std::format!("{}", nvme[0].bdf), "00:04.0");
}

#[test]
fn tree_walk_follows_bridges_only() {
    let mut b = machine();
    // Without a bridge, bus 2 is unreachable.
    let found = enumerate_tree(&mut b, 0, 255);
    assert_eq!(found.len(), 4);
    assert!(found.iter().all(|f| f.bdf.bus == 0));
    // A PCI-to-PCI bridge at 00:02.0 with secondary bus 2; a bogus bridge pointing back at bus 0 is ignored.
    b.add(bdf(0, 2, 0), 0x0001_1B36, 0x0604_0000, 1, [(0, 0); 6]);
    b.write32(bdf(0, 2, 0), reg::BUS_NUMBERS, 0x0002_0200);
    b.add(bdf(2, 5, 0), 0x0001_1B36, 0x0604_0000, 1, [(0, 0); 6]);
    b.write32(bdf(2, 5, 0), reg::BUS_NUMBERS, 0x0000_0002);
    let found = enumerate_tree(&mut b, 0, 255);
    let addrs: Vec<Bdf> = found.iter().map(|f| f.bdf).collect();
    assert_eq!(
        addrs,
        [
            bdf(0, 0, 0),
            bdf(0, 1, 0),
            bdf(0, 1, 1),
            bdf(0, 2, 0),
            bdf(0, 4, 0),
            bdf(2, 3, 0),
            bdf(2, 5, 0)
        ]
    );
    // The walk stays inside the mechanism's bus range.
    assert_eq!(enumerate_tree(&mut b, 0, 1).len(), 5);
}

#[test]
fn bars_are_decoded_and_sized_with_decoding_off() {
    let mut b = machine();
    let nv = bdf(0, 4, 0);
    enable(&mut b, nv, command::MEMORY);
    let bar0 = read_bar(&mut b, nv, 0);
    assert_eq!(
        bar0,
        Ok(Bar::Memory {
            base: 0x1_FEB0_0000,
            size: 16 * 1024,
            wide: true,
            prefetchable: false
        })
    );
    assert_eq!(read_bar(&mut b, nv, 1), Err(BarError::UpperHalf(1)));
    assert_eq!(
        read_bar(&mut b, nv, 2),
        Ok(Bar::Memory {
            base: 0xFEBD_1000,
            size: 4096,
            wide: false,
            prefetchable: false
        })
    );
    assert_eq!(read_bar(&mut b, nv, 4), Err(BarError::Unimplemented(4)));
    assert_eq!(read_bar(&mut b, nv, 6), Err(BarError::NoSuchBar(6)));
    assert_eq!(
        read_bar(&mut b, bdf(0, 1, 1), 4),
        Ok(Bar::Io {
            port: 0xC040,
            size: 16
        })
    );
    assert!(!b.unsafe_sizing, "BAR sized while decoding was on");
    // Everything restored: BAR values and the command register.
    assert_eq!(b.read32(nv, reg::BAR0), 0xFEB0_0004);
    assert_eq!(b.read32(nv, reg::BAR0 + 4), 0x1);
    assert_eq!(
        b.read32(nv, reg::COMMAND) & 0xFFFF,
        u32::from(command::MEMORY)
    );
}

#[test]
fn enable_sets_bits_without_clearing_status() {
    let mut b = machine();
    let nv = bdf(0, 4, 0);
    let cmd = enable(&mut b, nv, command::MEMORY | command::BUS_MASTER);
    assert_eq!(cmd, command::MEMORY | command::BUS_MASTER);
    assert_eq!(b.read32(nv, reg::COMMAND), 0x0010_0006);
}
