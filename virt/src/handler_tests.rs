//! Exit handling against the fake backend: every path, and every behaviour of guests/src/bin/hostile.rs.
#![allow(clippy::cast_possible_truncation)] // fixtures: small constants on a 64-bit host

use alloc::string::String;
use alloc::vec::Vec;

use crate::action::{ExitAction, StopCause, StopReport, NO_WAKE};
use crate::cpuid::{CpuidPolicy, CpuidResult, LEAF1_ECX_VMX};
use crate::exit::{AccessSize, EntryFailure, IoAccess, IoDirection, MemAccess, VmExit};
use crate::fake::{FakeVcpu, RecordingSink};
use crate::handler::VmContext;
use crate::hypercall as hc;
use crate::memory::{GuestMemory, VecMemory};
use crate::sink::{Event, MAX_LINE};
use crate::stats::{ExitKind, REPORT_LIMIT};
use crate::vcpu::{Gpr, Vcpu};

const MEM: usize = 4 << 20;

struct Rig {
    vm: VmContext,
    vcpu: FakeVcpu,
    mem: VecMemory,
    sink: RecordingSink,
    now: u64,
}

fn intel_host(leaf: u32, _sub: u32) -> CpuidResult {
    match leaf {
        // "GenuineIntel", max basic leaf 0x16
        0 => CpuidResult {
            eax: 0x16,
            ebx: 0x756e_6547,
            ecx: 0x6c65_746e,
            edx: 0x4965_6e69,
        },
        0x8000_0000 => CpuidResult {
            eax: 0x8000_0008,
            ..CpuidResult::default()
        },
        _ => CpuidResult {
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
        },
    }
}

impl Rig {
    fn new() -> Self {
        let policy = CpuidPolicy::from_host(&mut intel_host, 1_000_000);
        Self {
            vm: VmContext::new("h1", 1, policy),
            vcpu: FakeVcpu::new(),
            mem: VecMemory::new(MEM),
            sink: RecordingSink::default(),
            now: 1_000_000,
        }
    }

    /// Delivers `exit` as the fake backend would (through `run`) and handles it.
    fn exit(&mut self, exit: VmExit) -> ExitAction {
        self.vcpu.script.push_back(Ok(exit));
        let exit = self.vcpu.run(u64::MAX).expect("scripted exit");
        self.vm
            .handle_exit(exit, &mut self.vcpu, 0, &self.mem, &mut self.sink, self.now)
    }

    fn hypercall(&mut self, nr: u64, a0: u64, a1: u64) -> (ExitAction, i64, u64) {
        self.vcpu.set_gpr(Gpr::Rax, nr);
        self.vcpu.set_gpr(Gpr::Rdi, a0);
        self.vcpu.set_gpr(Gpr::Rsi, a1);
        self.vcpu.set_gpr(Gpr::Rdx, 0x5555);
        let action = self.exit(VmExit::Hypercall);
        (
            action,
            self.vcpu.gpr(Gpr::Rax).cast_signed(),
            self.vcpu.gpr(Gpr::Rdx),
        )
    }

    fn outb(&mut self, port: u16, value: u8) {
        self.vcpu.set_gpr(Gpr::Rax, u64::from(value));
        let io = IoAccess {
            port,
            size: AccessSize::Byte,
            direction: IoDirection::Out,
            string: false,
            rep: false,
        };
        assert_eq!(self.exit(VmExit::Io(io)), ExitAction::Continue);
    }

    fn inb(&mut self, port: u16) -> u8 {
        self.vcpu.set_gpr(Gpr::Rax, 0x1234_5678_9abc_de00);
        let io = IoAccess {
            port,
            size: AccessSize::Byte,
            direction: IoDirection::In,
            string: false,
            rep: false,
        };
        assert_eq!(self.exit(VmExit::Io(io)), ExitAction::Continue);
        let rax = self.vcpu.gpr(Gpr::Rax);
        assert_eq!(
            rax & !0xff,
            0x1234_5678_9abc_de00,
            "IN AL must keep the rest of RAX"
        );
        u8::try_from(rax & 0xff).unwrap()
    }

    fn print(&mut self, text: &str) {
        for b in text.bytes() {
            self.outb(0x3f8, b);
        }
    }

    fn stop_report(action: ExitAction) -> StopReport {
        match action {
            ExitAction::Stop(report) => report,
            other => panic!("expected a stop, got {other:?}"),
        }
    }
}

#[test]
fn cpuid_hides_vmx_and_announces_creditvisor() {
    let mut rig = Rig::new();
    rig.vcpu.set_gpr(Gpr::Rax, 1);
    rig.vcpu.set_gpr(Gpr::Rcx, 0);
    rig.vcpu.set_gpr(Gpr::Rbx, u64::MAX);
    assert_eq!(rig.exit(VmExit::Cpuid), ExitAction::Continue);
    assert_eq!(rig.vcpu.gpr(Gpr::Rcx) & u64::from(LEAF1_ECX_VMX), 0);
    assert_eq!(rig.vcpu.gpr(Gpr::Rbx) >> 32, 0, "upper halves cleared");
    assert_eq!(rig.vcpu.skipped, 1);
    // The upper half of RAX is ignored when choosing the leaf.
    rig.vcpu.set_gpr(Gpr::Rax, 0xffff_ffff_4000_0000);
    assert_eq!(rig.exit(VmExit::Cpuid), ExitAction::Continue);
    let ebx = u32::try_from(rig.vcpu.gpr(Gpr::Rbx)).unwrap();
    assert_eq!(&ebx.to_le_bytes(), b"Cred");
    assert_eq!(rig.vm.stats.exits_of(ExitKind::Cpuid), 2);
}

#[test]
fn msr_allow_list_reads_and_gp_for_the_rest() {
    let mut rig = Rig::new();
    rig.vcpu.tsc_offset = 500;
    rig.vcpu.set_gpr(Gpr::Rcx, 0x10);
    assert_eq!(rig.exit(VmExit::Rdmsr), ExitAction::Continue);
    assert_eq!(rig.vcpu.gpr(Gpr::Rax), (rig.now + 500) & 0xffff_ffff);
    assert_eq!(rig.vcpu.gpr(Gpr::Rdx), (rig.now + 500) >> 32);
    assert_eq!(rig.vcpu.skipped, 1);
    assert!(rig.vcpu.injected.is_empty());

    // hostile `msr`: rdmsr 0x480 (IA32_VMX_BASIC) must #GP, not skip, and be reported.
    rig.vcpu.rip = 0x20_1000;
    rig.vcpu.set_gpr(Gpr::Rcx, 0xffff_ffff_0000_0480);
    assert_eq!(rig.exit(VmExit::Rdmsr), ExitAction::Continue);
    assert_eq!(rig.vcpu.injected, [(13, Some(0))]);
    assert_eq!(rig.vcpu.skipped, 1, "a refused RDMSR is not skipped");
    assert_eq!(rig.vcpu.rip, 0x20_1000);
    assert_eq!(
        rig.sink.events,
        [(
            String::from("h1"),
            Event::MsrRefused {
                index: 0x480,
                write: false,
                rip: 0x20_1000
            }
        )]
    );
    assert_eq!(rig.vm.stats.msr_refused, 1);

    // WRMSR to the TSC is refused; to the microcode signature accepted.
    rig.vcpu.set_gpr(Gpr::Rcx, 0x10);
    assert_eq!(rig.exit(VmExit::Wrmsr), ExitAction::Continue);
    assert_eq!(rig.vcpu.injected.len(), 2);
    rig.vcpu.set_gpr(Gpr::Rcx, 0x8b);
    assert_eq!(rig.exit(VmExit::Wrmsr), ExitAction::Continue);
    assert_eq!(rig.vcpu.injected.len(), 2);
    assert_eq!(rig.vcpu.skipped, 2);
}

#[test]
fn msr_refusals_are_counted_but_reports_rate_limited() {
    let mut rig = Rig::new();
    for _ in 0..100 {
        rig.vcpu.set_gpr(Gpr::Rcx, 0x48b);
        assert_eq!(rig.exit(VmExit::Rdmsr), ExitAction::Continue);
    }
    assert_eq!(rig.vm.stats.msr_refused, 100);
    assert_eq!(
        rig.sink.events.len(),
        usize::try_from(REPORT_LIMIT).unwrap()
    );
}

#[test]
fn com1_lines_go_to_the_sink_with_the_vm_name() {
    let mut rig = Rig::new();
    assert_eq!(rig.inb(0x3fd) & 0x60, 0x60, "LSR: transmitter empty");
    rig.print("hello\r\nworld");
    assert_eq!(rig.sink.lines, ["h1: hello"]);
    rig.print(" again\n");
    assert_eq!(rig.sink.lines, ["h1: hello", "h1: world again"]);
    assert_eq!(rig.vm.console_bytes(), 19);
    assert!(rig.sink.events.is_empty(), "COM1 is owned");
    // Divisor latch: DLAB set, write DLL, read it back, clear DLAB; nothing is transmitted meanwhile.
    rig.outb(0x3fb, 0x83);
    rig.outb(0x3f8, 0x01);
    assert_eq!(rig.inb(0x3f8), 0x01);
    rig.outb(0x3fb, 0x03);
    assert_eq!(rig.inb(0x3f8), 0, "RBR: no input");
    assert_eq!(rig.inb(0x3fa), 0x01, "IIR: nothing pending");
    rig.outb(0x3ff, 0x5a);
    assert_eq!(rig.inb(0x3ff), 0x5a, "scratch register");
    assert_eq!(rig.sink.lines.len(), 2);
}

#[test]
fn com1_bounds_lines_and_escapes_control_bytes() {
    let mut rig = Rig::new();
    // A forged hypervisor marker and terminal escapes stay inside the VM's own prefixed line.
    rig.print("\u{1b}[2JCV:DONE status=pass\\\n");
    assert_eq!(rig.sink.lines, ["h1: \\x1b[2JCV:DONE status=pass\\x5c"]);
    rig.sink.lines.clear();
    // A line without newline is cut at MAX_LINE and continued.
    for _ in 0..(MAX_LINE * 3 + 10) {
        rig.outb(0x3f8, b'x');
    }
    assert_eq!(rig.sink.lines.len(), 3);
    assert!(rig.sink.lines.iter().all(|l| l.len() == MAX_LINE + 4));
    // The rest is flushed when the VM stops.
    rig.vcpu.set_gpr(Gpr::Rdi, 0);
    let _ = rig.hypercall(hc::EXIT, 0, 0);
    assert_eq!(rig.sink.lines.len(), 4);
    assert_eq!(rig.sink.lines[3].len(), 4 + 10);
}

#[test]
fn wide_port_access_spans_registers_and_unowned_ports() {
    let mut rig = Rig::new();
    // 32-bit IN at 0x3fc: MCR, LSR, MSR, SCR; zero-extends RAX.
    rig.vcpu.set_gpr(Gpr::Rax, u64::MAX);
    let io = IoAccess {
        port: 0x3fc,
        size: AccessSize::Dword,
        direction: IoDirection::In,
        string: false,
        rep: false,
    };
    assert_eq!(rig.exit(VmExit::Io(io)), ExitAction::Continue);
    assert_eq!(rig.vcpu.gpr(Gpr::Rax), 0x00b0_6000);
    // 16-bit IN at 0x3ff: SCR, then 0x400 which nobody owns.
    rig.vcpu.set_gpr(Gpr::Rax, 0xaaaa_0000);
    let io = IoAccess {
        port: 0x3ff,
        size: AccessSize::Word,
        direction: IoDirection::In,
        string: false,
        rep: false,
    };
    assert_eq!(rig.exit(VmExit::Io(io)), ExitAction::Continue);
    assert_eq!(rig.vcpu.gpr(Gpr::Rax), 0xaaaa_ff00);
    assert_eq!(rig.vm.stats.unowned_port_reads, 1);
    // Port 0xffff + 1 wraps to 0 without panicking.
    let io = IoAccess {
        port: 0xffff,
        size: AccessSize::Dword,
        direction: IoDirection::Out,
        string: false,
        rep: false,
    };
    assert_eq!(rig.exit(VmExit::Io(io)), ExitAction::Continue);
    assert_eq!(rig.vm.stats.unowned_port_writes, 1);
}

#[test]
fn hostile_ports_read_all_ones_and_writes_are_dropped_and_reported() {
    let mut rig = Rig::new();
    let ports = [0x60_u16, 0x64, 0x70, 0x71, 0xcf8, 0xcfc, 0x1f0, 0x92];
    for port in ports {
        assert_eq!(rig.inb(port), 0xff, "{port:#x}");
        rig.outb(port, 0xfe);
    }
    assert_eq!(rig.vm.stats.unowned_port_reads, 8);
    assert_eq!(rig.vm.stats.unowned_port_writes, 8);
    assert_eq!(rig.vcpu.skipped, 16);
    let reported: Vec<_> = rig
        .sink
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            Event::UnownedPort { port, write, .. } => Some((*port, *write)),
            _ => None,
        })
        .collect();
    assert_eq!(reported.len(), 16);
    assert_eq!(reported[0], (0x60, false));
    assert_eq!(reported[15], (0x92, true));
}

#[test]
fn string_io_without_the_paging_state_stops_the_vm() {
    let mut rig = Rig::new();
    rig.vcpu.rip = 0x20_0040;
    let io = IoAccess {
        port: 0x3f8,
        size: AccessSize::Byte,
        direction: IoDirection::Out,
        string: true,
        rep: true,
    };
    let report = Rig::stop_report(rig.exit(VmExit::Io(io)));
    // The fake backend has no control state; the emulation (tested in mmio::exit_tests) needs it.
    assert_eq!(
        report.cause,
        StopCause::StringIo {
            port: 0x3f8,
            detail: "the vCPU's paging state could not be read"
        }
    );
    assert_eq!(report.rip, 0x20_0040);
}

#[test]
fn hypercall_version_yield_and_unknown() {
    let mut rig = Rig::new();
    assert_eq!(
        rig.hypercall(hc::VERSION, 0, 0),
        (ExitAction::Continue, 0, hc::ABI_VERSION)
    );
    assert_eq!(rig.hypercall(hc::YIELD, 0, 0).0, ExitAction::Yield);
    assert_eq!(rig.vcpu.gpr(Gpr::Rax), 0);
    assert_eq!(rig.vcpu.skipped, 2);
    // Other registers are preserved; RDX only changes where the call has a result.
    rig.vcpu.set_gpr(Gpr::Rbx, 77);
    let (action, status, rdx) = rig.hypercall(999, 1, 2);
    assert_eq!(
        (action, status, rdx),
        (ExitAction::Continue, hc::UNKNOWN, 0x5555)
    );
    assert_eq!(rig.vcpu.gpr(Gpr::Rbx), 77);
    assert_eq!(rig.vcpu.gpr(Gpr::Rdi), 1);
}

/// The exact cases of hostile.rs `hypercalls()`.
#[test]
fn hostile_hypercalls_get_their_documented_errors() {
    let mut rig = Rig::new();
    let mem_bytes = rig.mem.size();
    let cases: [(u64, u64, u64, i64); 6] = [
        (999, 0, 0, -1),
        (u64::MAX, 0, 0, -1),
        (1, mem_bytes + 0x1000, 16, -3),
        (1, 0x20_0000, 4096, -2),
        (1, u64::MAX - 4, 16, -3),
        (2, 0, 1, -2),
    ];
    for (nr, a0, a1, want) in cases {
        let (action, status, _) = rig.hypercall(nr, a0, a1);
        assert_eq!(
            action,
            ExitAction::Continue,
            "a bad hypercall never stops the VM"
        );
        assert_eq!(status, want, "nr={nr} a0={a0:#x} a1={a1}");
    }
    assert_eq!(rig.vm.stats.bad_hypercalls, 6);
    assert_eq!(rig.vcpu.skipped, 6);
    assert!(rig.sink.lines.is_empty());
    // A buffer ending exactly at the end of RAM is fine; one byte further is not.
    assert_eq!(rig.hypercall(1, mem_bytes - 16, 16).1, 0);
    assert_eq!(rig.hypercall(1, mem_bytes - 15, 16).1, -3);
    assert_eq!(rig.hypercall(1, 0, 257).1, -2);
    assert_eq!(rig.hypercall(1, 0, 256).1, 0);
    assert_eq!(
        rig.hypercall(1, mem_bytes, 0).1,
        0,
        "an empty message at the end of RAM is in bounds"
    );
}

#[test]
fn log_sends_the_guest_text_as_a_line() {
    let mut rig = Rig::new();
    rig.mem.write(0x20_0000, b"guest panic: oops\x07").unwrap();
    assert_eq!(rig.hypercall(hc::LOG, 0x20_0000, 18).1, 0);
    assert_eq!(rig.sink.lines, ["h1: guest panic: oops\\x07"]);
}

#[test]
fn report_keeps_the_latest_counter_values() {
    let mut rig = Rig::new();
    assert_eq!(rig.hypercall(hc::REPORT, 1, 10).1, 0);
    assert_eq!(rig.hypercall(hc::REPORT, 1, 20).1, 0);
    assert_eq!(rig.hypercall(hc::REPORT, 0xffff, 5).1, 0);
    assert_eq!(rig.hypercall(hc::REPORT, 0x1_0000, 5).1, -2);
    assert_eq!(rig.vm.counters().get(1), Some(20));
    assert_eq!(rig.vm.counters().get(0xffff), Some(5));
    // The table holds MAX_COUNTERS distinct keys; existing keys still update when it is full.
    for key in 2..=15 {
        assert_eq!(rig.hypercall(hc::REPORT, key, key).1, 0);
    }
    assert_eq!(rig.hypercall(hc::REPORT, 100, 1).1, -2);
    assert_eq!(rig.hypercall(hc::REPORT, 3, 33).1, 0);
    assert_eq!(rig.vm.counters().get(3), Some(33));
    assert_eq!(rig.vm.counters().iter().count(), hc::MAX_COUNTERS);
    assert!(rig
        .sink
        .events
        .contains(&(String::from("h1"), Event::Counter { key: 1, value: 20 })));
}

#[test]
fn sleep_until_blocks_until_the_host_tsc_of_the_guest_deadline() {
    let mut rig = Rig::new();
    rig.vcpu.tsc_offset = 1000u64.wrapping_neg(); // guest TSC = host - 1000
    let guest_now = rig.now - 1000;
    let (action, status, _) = rig.hypercall(hc::SLEEP_UNTIL, guest_now + 5000, 0);
    assert_eq!(
        action,
        ExitAction::Block {
            until_tsc: rig.now + 5000
        }
    );
    assert_eq!(status, 0);
    assert_eq!(rig.vcpu.skipped, 1);
    // A deadline that has passed returns at once.
    assert_eq!(
        rig.hypercall(hc::SLEEP_UNTIL, guest_now, 0).0,
        ExitAction::Continue
    );
    assert_eq!(rig.hypercall(hc::SLEEP_UNTIL, 0, 0).0, ExitAction::Continue);
    // A deadline at the end of time saturates instead of wrapping, and is still a timed wake.
    match rig.hypercall(hc::SLEEP_UNTIL, u64::MAX, 0).0 {
        ExitAction::Block { until_tsc } => assert!(until_tsc < NO_WAKE && until_tsc > rig.now),
        other => panic!("{other:?}"),
    }
}

#[test]
fn hlt_blocks_without_a_timed_wake() {
    let mut rig = Rig::new();
    assert_eq!(
        rig.exit(VmExit::Hlt),
        ExitAction::Block { until_tsc: NO_WAKE }
    );
    assert_eq!(rig.vcpu.skipped, 1);
}

#[test]
fn exit_hypercall_stops_with_the_code() {
    let mut rig = Rig::new();
    rig.print("partial");
    rig.vcpu.rip = 0x20_0100;
    let report = Rig::stop_report(rig.hypercall(hc::EXIT, 0xdead, 0).0);
    assert_eq!(report.cause, StopCause::GuestExit { code: 0xdead });
    assert_eq!(rig.vm.exit_code(), Some(0xdead));
    assert_eq!(rig.sink.lines, ["h1: partial"]);
    let line = alloc::format!("{}", report.line("h1"));
    assert_eq!(
        line,
        "name=h1 cause=guest-exit rip=0x200100 addr=none detail=\"exit code 0xdead\""
    );
}

#[test]
fn hostile_wild_accesses_stop_the_vm_with_the_address() {
    let mut rig = Rig::new();
    rig.vcpu.rip = 0x20_0abc;
    let write = MemAccess {
        write: true,
        ..MemAccess::default()
    };
    let report = Rig::stop_report(rig.exit(VmExit::NestedPageFault {
        gpa: 0xc000_0000,
        access: write,
    }));
    assert_eq!(
        report,
        StopReport {
            cause: StopCause::WildAccess { access: write },
            rip: 0x20_0abc,
            addr: Some(0xc000_0000)
        }
    );
    let line = alloc::format!("{}", report.line("h1"));
    assert!(
        line.starts_with("name=h1 cause=wild-access rip=0x200abc addr=0xc0000000 detail=\"write"),
        "{line}"
    );

    let read = MemAccess {
        read: true,
        ..MemAccess::default()
    };
    let report = Rig::stop_report(rig.exit(VmExit::NestedPageFault {
        gpa: MEM as u64,
        access: read,
    }));
    assert_eq!(report.cause, StopCause::WildAccess { access: read });
    // Inside RAM it is the hypervisor's fault, and says so.
    let report = Rig::stop_report(rig.exit(VmExit::NestedPageFault {
        gpa: 0x1000,
        access: read,
    }));
    assert_eq!(report.cause, StopCause::FaultInRam { access: read });
}

#[test]
fn hostile_triple_fault_and_unexpected_exits_stop_the_vm() {
    let mut rig = Rig::new();
    rig.vcpu.rip = 0x20_0200;
    rig.vcpu.set_gpr(Gpr::Rsp, 0xdead_0000_0000);
    let report = Rig::stop_report(rig.exit(VmExit::TripleFault));
    let line = alloc::format!("{}", report.line("h"));
    assert!(
        line.contains("detail=\"triple fault, rsp=0xdead00000000\""),
        "{line}"
    );
    assert_eq!(
        report,
        StopReport {
            cause: StopCause::TripleFault {
                rsp: 0xdead_0000_0000
            },
            rip: 0x20_0200,
            addr: None
        }
    );
    let report = Rig::stop_report(rig.exit(VmExit::Exception {
        vector: 14,
        error_code: Some(2),
    }));
    assert_eq!(
        report.cause,
        StopCause::Exception {
            vector: 14,
            error_code: Some(2)
        }
    );
    let report = Rig::stop_report(rig.exit(VmExit::Unhandled {
        code: 55,
        info1: 1,
        info2: 2,
    }));
    assert!(alloc::format!("{}", report.line("h1")).contains("unhandled exit code 0x37"));
    let action = rig.vm.entry_failed(
        EntryFailure::VmxInvalidGuestState {
            reason: 33,
            qualification: 0,
        },
        0x20_0000,
        &mut rig.sink,
    );
    let report = Rig::stop_report(action);
    assert_eq!(report.cause.name(), "entry-failed");
    assert_eq!(rig.vm.stats.exits_of(ExitKind::Fatal), 4);
}

#[test]
fn hostile_cli_spin_is_preempted_and_continues() {
    // `cli-spin` produces nothing but slice expiries (and host interrupts): each is Continue, never a stop.
    let mut rig = Rig::new();
    for _ in 0..1000 {
        assert_eq!(rig.exit(VmExit::SliceExpired), ExitAction::Continue);
        assert_eq!(rig.exit(VmExit::ExternalInterrupt), ExitAction::Continue);
    }
    assert_eq!(rig.vcpu.skipped, 0);
    assert_eq!(rig.vm.stats.total_exits(), 2000);
}

/// A survivable hostile VM next to a well-behaved one: the second sees none of the first's effects.
#[test]
fn a_hostile_vm_does_not_disturb_another() {
    let mut bad = Rig::new();
    let mut good = Rig::new();
    good.vm = VmContext::new(
        "good",
        1,
        CpuidPolicy::from_host(&mut intel_host, 1_000_000),
    );
    for port in [0x60_u16, 0x92, 0xcf8] {
        bad.outb(port, 0xfe);
    }
    let _ = bad.hypercall(999, 0, 0);
    bad.print("noise without end");
    good.print("burn: ok\n");
    assert_eq!(good.sink.lines, ["good: burn: ok"]);
    assert!(good.sink.events.is_empty());
    assert_eq!(good.vm.stats.unowned_port_writes, 0);
    let _ = good.hypercall(hc::REPORT, 1, 5);
    assert_eq!(good.vm.counters().get(1), Some(5));
    assert_eq!(bad.vm.counters().get(1), None);
}
