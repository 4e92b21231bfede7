//! The triple-fault stop dump ([`stop_dump`]; docs/console.md "Triple-fault stop dump"): what the next engineer
//! needs to tell a bad stack pointer or corrupted guest memory from a fault of the hypervisor or the platform, from
//! one serial log.
//!
//! Design: every line starts `vm <name>: stop dump:` and stands alone. In order: the registers; the stack words
//! around RSP; the guest page-table walks of RIP and RSP (4-level paging read through CR3 from guest RAM); the
//! backend's lines (`svm ...` or `vmx ...`: `virt::svm::dump`, `virt::vmx::dump`); the guest's #DF/#GP/#PF IDT
//! gates; then the last exits of the faulting CPU and of every other CPU from the lock-free exit trail
//! ([`super::trail`]), where an entry another CPU overwrote while it was read is named as such. Runs only on the
//! stop path, on the faulting vCPU's CPU.

use virt::{Gpr, GuestMemory, Vcpu};

use super::trail::{self, Read, TRAIL_CPUS};
use super::Line;
use crate::virt::packed::Unpacked;
use crate::vm::backend::BackendVcpu;
use crate::vm::Runtime;
use core::fmt::Write as _;

/// Logs the stop dump of slot `slot`'s vCPU, which triple-faulted on CPU `cpu` (see the module doc).
pub fn stop_dump(rt: &Runtime, cpu: u32, slot: usize, vcpu: &BackendVcpu) {
    let s = &rt.slots[slot];
    let vm = &rt.vms[s.vm];
    let name = &vm.name;
    let emit = |args: core::fmt::Arguments<'_>| {
        crate::console::write_line_deferred(format_args!("vm {name}: stop dump: {args}"));
    };
    let mem: &dyn GuestMemory = &vm.ram;
    let read = |gpa: u64| {
        let mut b = [0u8; 8];
        mem.read(gpa, &mut b).ok().map(|()| u64::from_le_bytes(b))
    };
    let (rip, rsp) = (vcpu.rip(), vcpu.gpr(Gpr::Rsp));
    let cs = vcpu.control_state();
    let cr3 = cs.map_or(0, |c| c.cr3);
    emit(format_args!(
        "vCPU {} rip={rip:#x} rsp={rsp:#x} rax={:#x} rbp={:#x} cr0={:#x} cr3={cr3:#x} cr4={:#x} efer={:#x} rflags={:#x}",
        s.index,
        vcpu.gpr(Gpr::Rax),
        vcpu.gpr(Gpr::Rbp),
        cs.map_or(0, |c| c.cr0),
        cs.map_or(0, |c| c.cr4),
        cs.map_or(0, |c| c.efer),
        cs.map_or(0, |c| c.rflags),
    ));
    let mut line = Line(heapless::String::new());
    let _ = write!(line, "stack at rsp-16:");
    for i in 0..6u64 {
        let at = rsp.wrapping_sub(16).wrapping_add(8 * i);
        let _ = match read(at) {
            Some(v) => write!(line, " {v:#x}"),
            None => write!(line, " (unreadable {at:#x})"),
        };
    }
    emit(format_args!("{}", line.0));
    for (what, va) in [("rip", rip), ("rsp", rsp)] {
        let mut line = Line(heapless::String::new());
        let _ = write!(line, "walk of {what} {va:#x}:");
        let mut table = cr3 & 0x000f_ffff_ffff_f000;
        for (level, shift) in [(4u32, 39u32), (3, 30), (2, 21), (1, 12)] {
            let at = table + 8 * ((va >> shift) & 0x1ff);
            let Some(e) = read(at) else {
                let _ = write!(line, " L{level}@{at:#x}=(outside RAM)");
                break;
            };
            let _ = write!(line, " L{level}@{at:#x}={e:#x}");
            // Not present, or a large page (PS at levels 3 and 2): the walk ends here.
            if e & 1 == 0 || (level != 4 && level != 1 && e & 0x80 != 0) {
                break;
            }
            table = e & 0x000f_ffff_ffff_f000;
        }
        emit(format_args!("{}", line.0));
    }
    let mut each = |args: core::fmt::Arguments<'_>| emit(args);
    let idt = match vcpu {
        BackendVcpu::Svm(v) => {
            v.stop_lines(&mut each);
            Some(v.idtr_base())
        }
        BackendVcpu::Vmx(v) => {
            v.stop_lines(&mut each);
            v.idtr_base()
        }
    };
    // The guest's gates for #DF, #GP and #PF (16 bytes each): a fault it could not take shows here.
    if let Some(idt) = idt {
        let mut line = Line(heapless::String::new());
        let _ = write!(line, "idt gates");
        for vector in [8u64, 13, 14] {
            let lo = read(idt + 16 * vector).unwrap_or(u64::MAX);
            let hi = read(idt + 16 * vector + 8).unwrap_or(u64::MAX);
            let _ = write!(line, " {vector}={hi:#x}:{lo:#x}");
        }
        emit(format_args!("{}", line.0));
    }
    // This CPU's last exits, then every other CPU's (what the rest of the machine was doing at the time).
    let others = (0..rt.cpus.min(TRAIL_CPUS)).filter_map(|c| u32::try_from(c).ok());
    for c in core::iter::once(cpu).chain(others.filter(|&c| c != cpu)) {
        let Ok(ring) = usize::try_from(c) else {
            continue;
        };
        for r in trail::read(ring) {
            match r {
                Read::Exit { entry: e, exit } => {
                    let (vm_name, vcpu_index) = rt
                        .slots
                        .get(e.slot)
                        .map_or(("?", u32::MAX), |w| (rt.vms[w.vm].name.as_str(), w.index));
                    let shown = Shown(exit);
                    emit(format_args!(
                        "cpu{c} exit tsc={} vm={vm_name} vcpu={vcpu_index} rip={:#x} rsp={:#x} rax={:#x} int_info={:#x} {shown:?}",
                        e.tsc, e.rip, e.rsp, e.rax, e.int_info
                    ));
                }
                Read::Changed { n } => emit(format_args!(
                    "cpu{c} exit #{n} changed while it was read (that CPU is still running)"
                )),
            }
        }
    }
}

/// An unpacked exit shown as the trail always showed it (`Some(Cpuid)`, `None` for a failed entry).
struct Shown(Unpacked);

impl core::fmt::Debug for Shown {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Unpacked::Exit(e) => write!(f, "{e:?}"),
            Unpacked::Unknown(w) => write!(f, "unknown exit record {w:x?}"),
        }
    }
}
