//! MMIO exits end to end through the fake backend: a guest with real page tables and instruction bytes in its
//! memory faults on a device window; `handle_exit` fetches and decodes, `complete_mmio` finishes the instruction.
#![allow(clippy::cast_possible_truncation)] // fixtures: small constants on a 64-bit host

use crate::action::{ExitAction, StopCause, StopReport};
use crate::cpuid::{CpuidPolicy, CpuidResult};
use crate::exit::{AccessSize, MemAccess, VmExit};
use crate::fake::{FakeVcpu, RecordingSink};
use crate::handler::VmContext;
use crate::memory::{GuestMemory, VecMemory};
use crate::mmio::{MmioAccess, MmioKind, MmioWindowError};
use crate::vcpu::{ControlState, Gpr, Vcpu, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA};

const MEM: u64 = 4 << 20;
const WINDOW: u64 = 0xD000_0000;
/// Page tables: PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000 mapping the first 4 MiB with 2 MiB pages, plus a
/// 4 KiB mapping of code at linear 0xFFFF_8000_0000_0000 through the PT at 0x5000 to 0x30_0000.
const PML4: u64 = 0x1000;
const CODE: u64 = 0x20_0000;
const HIGH_CODE: u64 = 0xFFFF_8000_0000_0000;

fn no_cpuid(_: u32, _: u32) -> CpuidResult {
    CpuidResult::default()
}

struct Guest {
    vm: VmContext,
    vcpu: FakeVcpu,
    mem: VecMemory,
    sink: RecordingSink,
}

fn put64(mem: &mut VecMemory, gpa: u64, v: u64) {
    mem.write(gpa, &v.to_le_bytes()).unwrap();
}

fn long_mode() -> ControlState {
    ControlState {
        cr0: CR0_PE | CR0_PG,
        cr3: PML4,
        cr4: CR4_PAE,
        efer: EFER_LMA | 1 << 8,
        cs_l: true,
        ..ControlState::default()
    }
}

impl Guest {
    fn new() -> Self {
        let mut mem = VecMemory::new(MEM as usize);
        put64(&mut mem, PML4, 0x2000 | 3);
        put64(&mut mem, 0x2000, 0x3000 | 3);
        put64(&mut mem, 0x3000, 0x83);
        put64(&mut mem, 0x3008, 0x20_0000 | 0x83);
        // 0xFFFF_8000_0000_0000: PML4 slot 256 -> PDPT 0x4000 -> PD 0x6000 -> PT 0x5000 -> 0x30_0000.
        put64(&mut mem, PML4 + 256 * 8, 0x4000 | 3);
        put64(&mut mem, 0x4000, 0x6000 | 3);
        put64(&mut mem, 0x6000, 0x5000 | 3);
        put64(&mut mem, 0x5000, 0x30_0000 | 3);
        let mut vm = VmContext::new("m1", 1, CpuidPolicy::from_host(&mut no_cpuid, 1_000_000));
        assert_eq!(
            vm.add_mmio_window(WINDOW, 0x1000),
            Err(MmioWindowError::RamSizeUnknown)
        );
        vm.set_ram_size(mem.size());
        vm.add_mmio_window(WINDOW, 0x1000).unwrap();
        let mut vcpu = FakeVcpu::new();
        vcpu.control = Some(long_mode());
        vcpu.rip = CODE;
        Self {
            vm,
            vcpu,
            mem,
            sink: RecordingSink::default(),
        }
    }

    /// Puts `code` at the current RIP (identity-mapped below 4 MiB) and faults on `gpa`.
    fn fault(&mut self, code: &[u8], gpa: u64, write: bool) -> ExitAction {
        self.mem.write(self.vcpu.rip, code).unwrap();
        self.exit(gpa, write)
    }

    fn exit(&mut self, gpa: u64, write: bool) -> ExitAction {
        let access = MemAccess {
            read: !write,
            write,
            execute: false,
        };
        self.vcpu
            .script
            .push_back(Ok(VmExit::NestedPageFault { gpa, access }));
        let exit = self.vcpu.run(u64::MAX).unwrap();
        self.vm
            .handle_exit(exit, &mut self.vcpu, 0, &self.mem, &mut self.sink, 0)
    }

    fn access(&mut self, code: &[u8], gpa: u64, write: bool) -> MmioAccess {
        match self.fault(code, gpa, write) {
            ExitAction::Mmio(a) => a,
            other => panic!("{code:02x?}: {other:?}"),
        }
    }

    /// A load: decodes, completes with `value`, and returns the new RAX (or `reg`).
    fn load(&mut self, code: &[u8], reg: Gpr, old: u64, value: u64) -> (MmioAccess, u64) {
        self.vcpu.set_gpr(reg, old);
        let rip = self.vcpu.rip;
        let a = self.access(code, WINDOW + 0x10, false);
        assert_eq!(a.kind, MmioKind::Read);
        assert_eq!(a.instruction_len() as usize, code.len());
        self.vm.complete_mmio(&mut self.vcpu, &a, value);
        assert_eq!(
            self.vcpu.rip,
            rip + code.len() as u64,
            "RIP advanced past {code:02x?}"
        );
        (a, self.vcpu.gpr(reg))
    }
}

#[test]
fn loads_of_each_size_write_the_register_with_x86_rules() {
    let mut g = Guest::new();
    let old = 0x1111_2222_3333_4444;
    // mov al, [rdx]; mov ah, [rdx]; mov ax, [rdx]; mov eax, [rdx]; mov rax, [rdx]
    let cases: [(&[u8], AccessSize, u64); 5] = [
        (&[0x8A, 0x02], AccessSize::Byte, 0x1111_2222_3333_44AB),
        (&[0x8A, 0x22], AccessSize::Byte, 0x1111_2222_3333_AB44),
        (&[0x66, 0x8B, 0x02], AccessSize::Word, 0x1111_2222_3333_CDAB),
        (&[0x8B, 0x02], AccessSize::Dword, 0x89EF_CDAB),
        (
            &[0x48, 0x8B, 0x02],
            AccessSize::Qword,
            0x0123_4567_89EF_CDAB,
        ),
    ];
    for (code, size, expect) in cases {
        let (a, rax) = g.load(code, Gpr::Rax, old, 0x0123_4567_89EF_CDAB);
        assert_eq!((a.gpa, a.size), (WINDOW + 0x10, size));
        assert_eq!(rax, expect, "{code:02x?}");
    }
    // movzx r9d, byte [rdx]; movsx r9, word [rdx]; movsx ecx, byte [rdx]
    assert_eq!(
        g.load(&[0x44, 0x0F, 0xB6, 0x0A], Gpr::R9, old, 0xF0).1,
        0xF0
    );
    assert_eq!(
        g.load(&[0x4C, 0x0F, 0xBF, 0x0A], Gpr::R9, old, 0x8001).1,
        0xFFFF_FFFF_FFFF_8001
    );
    assert_eq!(
        g.load(&[0x0F, 0xBE, 0x0A], Gpr::Rcx, old, 0x80).1,
        0xFFFF_FF80
    );
}

#[test]
fn stores_carry_the_register_or_immediate_value() {
    let mut g = Guest::new();
    g.vcpu.set_gpr(Gpr::Rax, 0x8877_6655_4433_2211);
    g.vcpu.set_gpr(Gpr::R10, 0xAAAA_BBBB_CCCC_DDDD);
    let cases: [(&[u8], AccessSize, u64); 8] = [
        (&[0x88, 0x02], AccessSize::Byte, 0x11), // mov [rdx], al
        (&[0x88, 0x22], AccessSize::Byte, 0x22), // mov [rdx], ah
        (&[0x66, 0x89, 0x02], AccessSize::Word, 0x2211), // mov [rdx], ax
        (&[0x89, 0x02], AccessSize::Dword, 0x4433_2211), // mov [rdx], eax
        (
            &[0x4C, 0x89, 0x12],
            AccessSize::Qword,
            0xAAAA_BBBB_CCCC_DDDD,
        ), // mov [rdx], r10
        (&[0xC6, 0x02, 0x7F], AccessSize::Byte, 0x7F), // mov byte [rdx], 0x7f
        (
            &[0xC7, 0x42, 0x04, 1, 0, 0, 0x80],
            AccessSize::Dword,
            0x8000_0001,
        ), // mov dword [rdx+4], 0x80000001
        (
            &[0x48, 0xC7, 0x02, 0xFF, 0xFF, 0xFF, 0xFF],
            AccessSize::Qword,
            u64::MAX,
        ), // mov qword [rdx], -1
    ];
    for (code, size, value) in cases {
        let rip = g.vcpu.rip;
        let regs = g.vcpu.regs;
        let a = g.access(code, WINDOW + 8, true);
        assert_eq!(
            (a.size, a.kind),
            (size, MmioKind::Write(value)),
            "{code:02x?}"
        );
        g.vm.complete_mmio(&mut g.vcpu, &a, 0xDEAD);
        assert_eq!(g.vcpu.regs, regs, "a store changes no register");
        assert_eq!(g.vcpu.rip, rip + code.len() as u64);
    }
    // moffs: mov [0xD0000020], eax with a 64-bit offset
    let mut code = alloc::vec![0xA3];
    code.extend_from_slice(&(WINDOW + 0x20).to_le_bytes());
    let a = g.access(&code, WINDOW + 0x20, true);
    assert_eq!(a.kind, MmioKind::Write(0x4433_2211));
    assert_eq!(a.instruction_len(), 9);
}

#[test]
fn code_behind_4k_pages_and_across_a_page_boundary_is_fetched() {
    let mut g = Guest::new();
    // The instruction starts 2 bytes before the end of the high code page; its rest is on the next page, which is
    // unmapped: the fetch faults at the page boundary.
    g.vcpu.rip = HIGH_CODE + 0xFFE;
    g.mem.write(0x30_0FFE, &[0x48, 0x8B]).unwrap();
    let stop = g.exit(WINDOW, false);
    assert_eq!(
        stop,
        ExitAction::Stop(StopReport {
            cause: StopCause::MmioFetchFault {
                linear: HIGH_CODE + 0x1000
            },
            rip: HIGH_CODE + 0xFFE,
            addr: Some(WINDOW),
        })
    );
    // Map the next page to 0x10_0000 and put the last byte there.
    put64(&mut g.mem, 0x5008, 0x10_0000 | 3);
    g.mem.write(0x10_0000, &[0x02]).unwrap();
    let a = match g.exit(WINDOW, false) {
        ExitAction::Mmio(a) => a,
        other => panic!("{other:?}"),
    };
    assert_eq!((a.size, a.instruction_len()), (AccessSize::Qword, 3));
    g.vm.complete_mmio(&mut g.vcpu, &a, 5);
    assert_eq!(g.vcpu.gpr(Gpr::Rax), 5);
    assert_eq!(g.vcpu.rip, HIGH_CODE + 0x1001);
}

#[test]
fn real_mode_code_is_fetched_at_cs_base_plus_ip() {
    let mut g = Guest::new();
    g.vcpu.control = Some(ControlState {
        cs_base: 0x1_0000,
        ..ControlState::default()
    });
    g.vcpu.rip = 0x100;
    // mov [bx+si], ax (16-bit: 89 00)
    g.mem.write(0x1_0100, &[0x89, 0x00]).unwrap();
    g.vcpu.set_gpr(Gpr::Rax, 0xABCD_1234);
    match g.exit(WINDOW + 2, true) {
        ExitAction::Mmio(a) => {
            assert_eq!(
                (a.size, a.kind),
                (AccessSize::Word, MmioKind::Write(0x1234))
            );
        }
        other => panic!("{other:?}"),
    }
    // IP wraps at 16 bits: mov ax, [bx] (8B 07) at CS:FFFE completes at CS:0000.
    g.vcpu.rip = 0xFFFE;
    g.mem.write(0x1_FFFE, &[0x8B, 0x07]).unwrap();
    let ExitAction::Mmio(a) = g.exit(WINDOW, false) else {
        panic!("not decoded")
    };
    g.vm.complete_mmio(&mut g.vcpu, &a, 0xBEEF);
    assert_eq!((g.vcpu.rip, g.vcpu.gpr(Gpr::Rax)), (0, 0xABCD_BEEF));
}

fn stop_cause(action: ExitAction) -> StopCause {
    match action {
        ExitAction::Stop(r) => r.cause,
        other => panic!("expected a stop, got {other:?}"),
    }
}

#[test]
fn what_cannot_be_emulated_stops_the_vm_with_a_report() {
    let mut g = Guest::new();
    // add [rdx], eax: unsupported; the report carries the fetched bytes.
    let cause = stop_cause(g.fault(&[0x01, 0x02], WINDOW, true));
    let StopCause::MmioUnsupported { bytes, len } = cause else {
        panic!("{cause:?}")
    };
    assert_eq!((&bytes[..2], len), (&[0x01, 0x02][..], 15));
    let line = alloc::format!(
        "{}",
        StopReport {
            cause,
            rip: CODE,
            addr: Some(WINDOW)
        }
        .line("m1")
    );
    assert!(
        line.starts_with("name=m1 cause=mmio-unsupported rip=0x200000 addr=0xd0000000 detail=\"unsupported MMIO instruction 01 02"),
        "{line}"
    );
    // A load decoded where the hardware saw a write, and an access running past the window's end.
    assert!(matches!(
        stop_cause(g.fault(&[0x8B, 0x02], WINDOW, true)),
        StopCause::MmioMismatch { write: false, .. }
    ));
    assert!(matches!(
        stop_cause(g.fault(&[0x89, 0x02], WINDOW + 0xFFE, true)),
        StopCause::MmioMismatch { write: true, .. }
    ));
    // RIP not mapped in the guest's tables.
    g.vcpu.rip = 0x40_0000;
    assert_eq!(
        stop_cause(g.exit(WINDOW, false)),
        StopCause::MmioFetchFault { linear: 0x40_0000 }
    );
    // The backend cannot give the paging state.
    g.vcpu.rip = CODE;
    g.vcpu.control = None;
    assert!(matches!(
        stop_cause(g.fault(&[0x8B, 0x02], WINDOW, false)),
        StopCause::HostFailure { .. }
    ));
    // Executing from the window.
    g.vcpu.control = Some(long_mode());
    g.vcpu.script.push_back(Ok(VmExit::NestedPageFault {
        gpa: WINDOW,
        access: MemAccess {
            read: false,
            write: false,
            execute: true,
        },
    }));
    let exit = g.vcpu.run(u64::MAX).unwrap();
    let action =
        g.vm.handle_exit(exit, &mut g.vcpu, 0, &g.mem, &mut g.sink, 0);
    assert!(matches!(
        stop_cause(action),
        StopCause::MmioFetchFault { .. }
    ));
    // Outside every window and RAM: a wild access, as before windows existed.
    assert!(matches!(
        stop_cause(g.fault(&[0x8B, 0x02], WINDOW + 0x1000, false)),
        StopCause::WildAccess { .. }
    ));
    assert!(matches!(
        stop_cause(g.fault(&[0x8B, 0x02], 0x1000, false)),
        StopCause::FaultInRam { .. }
    ));
    assert_eq!(g.vcpu.rip_writes, 0, "no stop moved RIP");
}

// ---- string port I/O ----

use crate::exit::{IoAccess, IoDirection};
use crate::mmio::string_io::MAX_BYTES_PER_EXIT;
use crate::vcpu::RFLAGS_DF;

/// Data for string I/O lives at 0x10_0000 (identity-mapped); linear 0x40_0000 and up is unmapped.
const DATA: u64 = 0x10_0000;

impl Guest {
    /// Puts `code` at RIP and delivers a string I/O exit on `port`; `rw` selects `handle_exit_rw`.
    fn string_io(
        &mut self,
        code: &[u8],
        port: u16,
        size: AccessSize,
        input: bool,
        rep: bool,
        rw: bool,
    ) -> ExitAction {
        self.mem.write(self.vcpu.rip, code).unwrap();
        self.vcpu.insn_len = code.len() as u64;
        let io = IoAccess {
            port,
            size,
            direction: if input {
                IoDirection::In
            } else {
                IoDirection::Out
            },
            string: true,
            rep,
        };
        self.vcpu.script.push_back(Ok(VmExit::Io(io)));
        let exit = self.vcpu.run(u64::MAX).unwrap();
        if rw {
            self.vm
                .handle_exit_rw(exit, &mut self.vcpu, 0, &mut self.mem, &mut self.sink, 0)
        } else {
            self.vm
                .handle_exit(exit, &mut self.vcpu, 0, &self.mem, &mut self.sink, 0)
        }
    }

    fn set_df(&mut self, on: bool) {
        let mut cs = self.vcpu.control.unwrap();
        cs.rflags = if on { RFLAGS_DF } else { 0 };
        self.vcpu.control = Some(cs);
    }
}

const COM1: u16 = 0x3F8;

#[test]
fn outs_without_and_with_rep_reach_the_uart() {
    let mut g = Guest::new();
    g.mem.write(DATA, b"hello\nH\n").unwrap();
    g.vcpu.set_gpr(Gpr::Rsi, DATA);
    g.vcpu.set_gpr(Gpr::Rdx, u64::from(COM1));
    g.vcpu.set_gpr(Gpr::Rcx, 6);
    // rep outsb (F3 6E)
    let a = g.string_io(&[0xF3, 0x6E], COM1, AccessSize::Byte, false, true, false);
    assert_eq!(a, ExitAction::Continue);
    assert_eq!(g.sink.lines, ["m1: hello"]);
    assert_eq!((g.vcpu.gpr(Gpr::Rsi), g.vcpu.gpr(Gpr::Rcx)), (DATA + 6, 0));
    assert_eq!(g.vcpu.rip, CODE + 2, "the completed instruction is skipped");
    // outsb (6E) moves one byte whatever RCX says.
    g.vcpu.set_gpr(Gpr::Rcx, 99);
    let _ = g.string_io(&[0x6E], COM1, AccessSize::Byte, false, false, false);
    let _ = g.string_io(&[0x6E], COM1, AccessSize::Byte, false, false, false);
    assert_eq!(g.sink.lines, ["m1: hello", "m1: H"]);
    assert_eq!(g.vcpu.gpr(Gpr::Rcx), 99);
    assert_eq!(g.vcpu.gpr(Gpr::Rsi), DATA + 8);
    assert_eq!(g.vm.console_bytes(), 8);
}

#[test]
fn df_counts_down_and_rep_with_zero_count_does_nothing() {
    let mut g = Guest::new();
    g.mem.write(DATA, b"\nolleh").unwrap();
    g.set_df(true);
    g.vcpu.set_gpr(Gpr::Rsi, DATA + 5);
    g.vcpu.set_gpr(Gpr::Rcx, 6);
    let _ = g.string_io(&[0xF3, 0x6E], COM1, AccessSize::Byte, false, true, false);
    assert_eq!(g.sink.lines, ["m1: hello"]);
    assert_eq!(g.vcpu.gpr(Gpr::Rsi), DATA - 1);
    let rip = g.vcpu.rip;
    let _ = g.string_io(&[0xF3, 0x6E], COM1, AccessSize::Byte, false, true, false);
    assert_eq!(g.vcpu.gpr(Gpr::Rsi), DATA - 1, "RCX = 0 moves nothing");
    assert_eq!(g.vcpu.rip, rip + 2);
    assert_eq!(g.vm.console_bytes(), 6);
}

#[test]
fn a_huge_rep_count_is_served_in_bounded_batches() {
    let mut g = Guest::new();
    let total = 10_000u64;
    g.mem
        .write(DATA, &alloc::vec![b'x'; total as usize])
        .unwrap();
    g.vcpu.set_gpr(Gpr::Rsi, DATA);
    g.vcpu.set_gpr(Gpr::Rcx, total);
    let mut exits = 0;
    while g.vcpu.rip == CODE {
        let a = g.string_io(&[0xF3, 0x6E], COM1, AccessSize::Byte, false, true, false);
        assert_eq!(a, ExitAction::Continue);
        exits += 1;
        let left = total.saturating_sub(exits * MAX_BYTES_PER_EXIT);
        assert_eq!(g.vcpu.gpr(Gpr::Rcx), left);
        assert_eq!(g.vm.console_bytes(), total - left);
    }
    assert_eq!(exits, total.div_ceil(MAX_BYTES_PER_EXIT));
    assert_eq!(g.vcpu.gpr(Gpr::Rsi), DATA + total);
}

#[test]
fn word_and_dword_elements_and_32_bit_addressing() {
    let mut g = Guest::new();
    g.mem.write(DATA, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    // rep outsw to an unowned port: 2 elements of 2 bytes.
    g.vcpu.set_gpr(Gpr::Rsi, DATA);
    g.vcpu.set_gpr(Gpr::Rcx, 2);
    let _ = g.string_io(
        &[0x66, 0xF3, 0x6F],
        0x80,
        AccessSize::Word,
        false,
        true,
        false,
    );
    assert_eq!(g.vcpu.gpr(Gpr::Rsi), DATA + 4);
    assert_eq!(g.vm.stats.unowned_port_writes, 1, "one event per exit");
    // addr32 rep outsd: ESI is used and RSI's upper half is cleared on update.
    g.vcpu.set_gpr(Gpr::Rsi, 0xFFFF_FFFF_0000_0000 | DATA);
    g.vcpu.set_gpr(Gpr::Rcx, 0xAAAA_AAAA_0000_0002);
    let _ = g.string_io(
        &[0x67, 0xF3, 0x6F],
        0x80,
        AccessSize::Dword,
        false,
        true,
        false,
    );
    assert_eq!(g.vcpu.gpr(Gpr::Rsi), DATA + 8);
    assert_eq!(g.vcpu.gpr(Gpr::Rcx), 0);
}

#[test]
fn ins_writes_guest_memory_when_it_is_writable() {
    let mut g = Guest::new();
    g.vcpu.set_gpr(Gpr::Rdi, DATA + 0x10);
    g.vcpu.set_gpr(Gpr::Rcx, 3);
    // rep insb from LSR (0x3FD): THRE | TEMT = 0x60, three times.
    let code = [0xF3, 0x6C];
    let stop = g.string_io(&code, COM1 + 5, AccessSize::Byte, true, true, false);
    assert!(matches!(
        stop_cause(stop),
        StopCause::StringIo { port: 0x3FD, .. }
    ));
    assert_eq!(
        g.string_io(&code, COM1 + 5, AccessSize::Byte, true, true, true),
        ExitAction::Continue
    );
    let mut got = [0u8; 4];
    g.mem.read(DATA + 0x10, &mut got).unwrap();
    assert_eq!(got, [0x60, 0x60, 0x60, 0]);
    assert_eq!(
        (g.vcpu.gpr(Gpr::Rdi), g.vcpu.gpr(Gpr::Rcx)),
        (DATA + 0x13, 0)
    );
    // insd from an unowned port reads all ones.
    let _ = g.string_io(&[0x6D], 0x80, AccessSize::Dword, true, false, true);
    g.mem.read(DATA + 0x13, &mut got).unwrap();
    assert_eq!(got, [0xFF; 4]);
}

#[test]
fn string_io_faults_and_refusals_stop_the_vm() {
    let mut g = Guest::new();
    // The source runs off the end of the identity map at 4 MiB after two bytes.
    g.mem.write(MEM - 2, b"ab").unwrap();
    g.vcpu.set_gpr(Gpr::Rsi, MEM - 2);
    g.vcpu.set_gpr(Gpr::Rcx, 5);
    let stop = g.string_io(&[0xF3, 0x6E], COM1, AccessSize::Byte, false, true, false);
    assert_eq!(
        stop_cause(stop),
        StopCause::StringIoFault {
            port: COM1,
            linear: MEM
        }
    );
    assert_eq!(
        (g.vcpu.gpr(Gpr::Rsi), g.vcpu.gpr(Gpr::Rcx)),
        (MEM, 3),
        "registers reflect the elements moved before the fault"
    );
    assert_eq!(g.vcpu.rip, CODE);
    // FS override; an exit that does not match the instruction (REP reported, none decoded); not a string op.
    for (code, rep) in [
        (&[0x64, 0xF3, 0x6E][..], true),
        (&[0x6E][..], true),
        (&[0x90][..], false),
    ] {
        g.vcpu.set_gpr(Gpr::Rsi, DATA);
        let cause = stop_cause(g.string_io(code, COM1, AccessSize::Byte, false, rep, false));
        assert!(
            matches!(cause, StopCause::StringIo { port: COM1, .. }),
            "{code:02x?}: {cause:?}"
        );
    }
}

mod arbitrary {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever bytes sit at RIP, in whatever mode and with whatever registers, an MMIO or string I/O exit
        /// ends in an action, never a panic; a decoded access advances RIP by 1..=15 bytes.
        #[test]
        fn arbitrary_code_and_state_never_panic(
            code in proptest::collection::vec(any::<u8>(), 15),
            mode in 0u8..3,
            regs in proptest::collection::vec(any::<u64>(), 16),
            rflags in any::<u64>(),
            offset in 0u64..0x1000,
            write in any::<bool>(),
            io in any::<(u16, u8, bool, bool, bool)>(),
        ) {
            let mut g = Guest::new();
            let mut cs = long_mode();
            match mode {
                0 => {}
                1 => {
                    cs.efer = 0;
                    cs.cr4 = 0;
                    cs.cr3 = 0x7000;
                    cs.cs_l = false;
                    cs.cs_db = true;
                }
                _ => cs = ControlState::default(),
            }
            cs.rflags = rflags;
            g.vcpu.control = Some(cs);
            g.vcpu.regs.copy_from_slice(&regs);
            let rip = g.vcpu.rip;
            match g.fault(&code, WINDOW + offset, write) {
                ExitAction::Mmio(a) => {
                    g.vm.complete_mmio(&mut g.vcpu, &a, regs[0]);
                    let len = g.vcpu.rip.wrapping_sub(rip);
                    prop_assert!((1..=15).contains(&len));
                }
                ExitAction::Stop(_) => prop_assert_eq!(g.vcpu.rip, rip),
                other => prop_assert!(false, "{:?}", other),
            }
            let (port, size, input, rep, rw) = io;
            let size = [AccessSize::Byte, AccessSize::Word, AccessSize::Dword][usize::from(size % 3)];
            g.vcpu.regs[Gpr::Rcx as usize] &= 0xFFFF;
            let _ = g.string_io(&code, port, size, input, rep, rw);
        }
    }
}
