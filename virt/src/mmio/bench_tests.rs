//! Host micro-benchmark of the MMIO path: page walk alone, and a whole exit (fetch through a 4-level walk, decode,
//! `ExitAction::Mmio`, `complete_mmio`), as median nanoseconds per access over repeated batches.
//!
//! Run: `cargo test -p virt --release mmio_cost -- --ignored --nocapture` (ignored in ordinary runs: timing, not
//! correctness; the correctness of each iteration is still asserted).
extern crate std;

use std::time::Instant;
use std::vec::Vec;

use crate::action::ExitAction;
use crate::cpuid::{CpuidPolicy, CpuidResult};
use crate::exit::{MemAccess, VmExit};
use crate::fake::{FakeVcpu, RecordingSink};
use crate::handler::VmContext;
use crate::memory::{GuestMemory, VecMemory};
use crate::mmio::walk::{self, Access};
use crate::vcpu::{ControlState, Gpr, Vcpu, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA};

const BATCH: u32 = 20_000;
const ROUNDS: usize = 31;
const WINDOW: u64 = 0xD000_0000;
const CODE_LINEAR: u64 = 0xFFFF_8000_0010_0000;

fn median_ns(mut f: impl FnMut()) -> f64 {
    let mut per: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..BATCH {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(BATCH)
        })
        .collect();
    per.sort_by(f64::total_cmp);
    per[ROUNDS / 2]
}

fn no_cpuid(_: u32, _: u32) -> CpuidResult {
    CpuidResult::default()
}

#[test]
#[ignore = "timing benchmark; run with --ignored --nocapture"]
fn mmio_cost() {
    let mut mem = VecMemory::new(4 << 20);
    let put = |mem: &mut VecMemory, gpa: u64, v: u64| mem.write(gpa, &v.to_le_bytes()).unwrap();
    // Code at a 4 KiB page behind all four levels: PML4[256] -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 -> 0x20_0000.
    put(&mut mem, 0x1000 + 256 * 8, 0x2000 | 3);
    put(&mut mem, 0x2000, 0x3000 | 3);
    put(&mut mem, 0x3000, 0x4000 | 3);
    put(&mut mem, 0x4000 + 0x100 * 8, 0x20_0000 | 3);
    let cs = ControlState {
        cr0: CR0_PE | CR0_PG,
        cr3: 0x1000,
        cr4: CR4_PAE,
        efer: EFER_LMA,
        cs_l: true,
        ..ControlState::default()
    };
    let walk_ns = median_ns(|| {
        let gpa = walk::translate(
            &mem,
            &cs,
            std::hint::black_box(CODE_LINEAR + 5),
            Access::FETCH,
        );
        assert_eq!(gpa, Ok(0x20_0005));
    });
    std::eprintln!("mmio bench: 4-level page walk (4 KiB page): {walk_ns:.1} ns median");

    let mut vm = VmContext::new("b", 1, CpuidPolicy::from_host(&mut no_cpuid, 1_000_000));
    vm.set_ram_size(mem.size());
    vm.add_mmio_window(WINDOW, 0x1000).unwrap();
    let mut sink = RecordingSink::default();
    let forms: [(&str, &[u8], bool); 4] = [
        ("mov eax, [rdx] (8B 02)", &[0x8B, 0x02], false),
        ("mov [rdx+0x70], ecx (89 4A 70)", &[0x89, 0x4A, 0x70], true),
        (
            "movzx r9d, word [rip+d32] (44 0F B7 0D ..)",
            &[0x44, 0x0F, 0xB7, 0x0D, 0, 1, 0, 0],
            false,
        ),
        (
            "mov qword [rax+rbx*8+d32], imm32 (48 C7 84 D8 ..)",
            &[0x48, 0xC7, 0x84, 0xD8, 0, 1, 0, 0, 1, 0, 0, 0],
            true,
        ),
    ];
    for (name, code, write) in forms {
        mem.write(0x20_0000, code).unwrap();
        let mut vcpu = FakeVcpu::new();
        vcpu.control = Some(cs);
        let exit = VmExit::NestedPageFault {
            gpa: WINDOW + 0x70,
            access: MemAccess {
                read: !write,
                write,
                execute: false,
            },
        };
        let ns = median_ns(|| {
            vcpu.rip = CODE_LINEAR;
            let action =
                vm.handle_exit(std::hint::black_box(exit), &mut vcpu, 0, &mem, &mut sink, 0);
            let ExitAction::Mmio(access) = action else {
                panic!("{name}: {action:?}")
            };
            vm.complete_mmio(&mut vcpu, &access, 0x1234);
            assert_eq!(vcpu.rip, CODE_LINEAR + code.len() as u64);
        });
        if !write {
            assert_ne!(vcpu.gpr(Gpr::Rax) | vcpu.gpr(Gpr::R9), 0);
        }
        std::eprintln!(
            "mmio bench: exit -> decode -> complete, {name}: {ns:.1} ns median per access"
        );
    }
}
