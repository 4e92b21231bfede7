//! Exit handling: one function that turns a [`VmExit`] into guest-visible effects and an [`ExitAction`].
//!
//! Design: [`VmContext`] is the per-VM state the handlers need (name, CPUID policy, COM1, MMIO windows, counters,
//! statistics); the kernel keeps one per VM behind its lock and calls [`VmContext::handle_exit`] (or
//! [`VmContext::handle_exit_rw`], with writable RAM for `INS`) after every exit of any of the VM's vCPUs, passing
//! the vCPU, the VM's RAM, the log sink and the host TSC now (time is passed in; this layer reads no clock).
//! Handlers only read and write registers through [`Vcpu`], guest memory through [`GuestMemory`] and report
//! through [`ConsoleSink`]. A nested-paging fault on a registered MMIO window is decoded ([`crate::mmio`]) into
//! [`ExitAction::Mmio`]; the run loop gives it to the device model and finishes it with
//! [`VmContext::complete_mmio`]. String port I/O is emulated here too ([`crate::mmio::string_io`]).
//!
//! Invariants:
//! - A handled instruction (CPUID, RDMSR/WRMSR that succeeded, IN/OUT, a completed INS/OUTS, HLT,
//!   VMCALL/VMMCALL) is skipped exactly once; a refused MSR access is not skipped and gets #GP(0), as on hardware;
//!   an MMIO instruction moves RIP only in `complete_mmio`; a `REP INS/OUTS` batch with elements left is not
//!   skipped (the guest re-executes it).
//! - Nothing a guest does makes this code panic: every guest value is bounds-checked, every arithmetic on guest
//!   values is checked or saturating.
//! - A bad hypercall never stops the VM; only `EXIT`, a triple fault, an access to memory that is neither RAM nor
//!   a device, an MMIO or string I/O instruction that cannot be fetched or emulated, an unexpected exception or
//!   exit, or an entry failure do, each with a report.

use alloc::string::String;

use crate::action::{ExitAction, StopCause, StopReport, NO_WAKE};
use crate::cpuid::CpuidPolicy;
use crate::exit::{AccessSize, EntryFailure, IoAccess, IoDirection, MemAccess, VmExit};
use crate::hypercall::{self as hc, Counters};
use crate::memory::GuestMemory;
use crate::mmio::decode::{self, DecodeError, Source};
use crate::mmio::string_io::{self, Outcome, Ports, Ram};
use crate::mmio::{self, walk, MmioAccess, MmioKind, MmioWindowError, MmioWindows};
use crate::msr::{self, MsrAccess, MsrOutcome};
use crate::sink::{self, ConsoleSink, Event};
use crate::stats::{count_and_should_report, ExitKind, VmStats};
use crate::uart::{Uart16550, COM1_BASE};
use crate::vcpu::{Gpr, Vcpu};

/// #GP.
const VECTOR_GP: u8 = 13;

/// The per-VM state the exit handlers work on.
#[derive(Clone, Debug)]
pub struct VmContext {
    name: String,
    vcpu_count: u32,
    cpuid: CpuidPolicy,
    uart: Uart16550,
    counters: Counters,
    exit_code: Option<u64>,
    /// Guest RAM size, once the VM layer gave it (MMIO windows must lie above it).
    ram_size: Option<u64>,
    windows: MmioWindows,
    /// Exit and misbehaviour counts.
    pub stats: VmStats,
}

impl VmContext {
    /// The context of a VM named `name` with `vcpu_count` vCPUs and the given CPUID policy.
    pub fn new(name: &str, vcpu_count: u32, cpuid: CpuidPolicy) -> Self {
        Self {
            name: String::from(name),
            vcpu_count,
            cpuid,
            uart: Uart16550::new(),
            counters: Counters::default(),
            exit_code: None,
            ram_size: None,
            windows: MmioWindows::default(),
            stats: VmStats::default(),
        }
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Latest counter values the guest reported.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The code the guest passed to `EXIT`, once it has.
    pub fn exit_code(&self) -> Option<u64> {
        self.exit_code
    }

    /// Bytes the guest transmitted on COM1.
    pub fn console_bytes(&self) -> u64 {
        self.uart.tx_bytes
    }

    /// Records the VM's RAM size (guest-physical `[0, bytes)`), against which MMIO windows are checked.
    pub fn set_ram_size(&mut self, bytes: u64) {
        self.ram_size = Some(bytes);
    }

    /// Registers a device window `[base, base + len)`: page aligned, above RAM, disjoint from the other windows.
    /// Nested-paging faults inside it are decoded into [`ExitAction::Mmio`].
    ///
    /// # Errors
    /// [`MmioWindowError`] naming the rule broken (also if [`VmContext::set_ram_size`] was not called).
    pub fn add_mmio_window(&mut self, base: u64, len: u64) -> Result<(), MmioWindowError> {
        let ram = self.ram_size.ok_or(MmioWindowError::RamSizeUnknown)?;
        self.windows.add(base, len, ram)
    }

    /// Finishes the instruction behind `access` after the device model handled it: a read's value (its low
    /// `access.size` bytes) goes to the destination register with x86 semantics (8/16-bit destinations merge,
    /// 32-bit zero-extends into the 64-bit register, `MOVZX`/`MOVSX` widen), then RIP moves past the instruction.
    /// `read_value` is ignored for writes.
    pub fn complete_mmio<V: Vcpu + ?Sized>(
        &mut self,
        vcpu: &mut V,
        access: &MmioAccess,
        read_value: u64,
    ) {
        if let Some(dest) = access.dest {
            let old = vcpu.gpr(dest.reg);
            vcpu.set_gpr(dest.reg, dest.merge(old, access.size, read_value));
        }
        vcpu.set_rip(vcpu.rip().wrapping_add(u64::from(access.len)) & access.ip_mask);
    }

    /// Handles one exit of vCPU `vcpu_id`; `now_tsc` is the host TSC at the exit. Guest RAM is read-only here, so
    /// an `INS` (string input to memory) stops the VM; [`VmContext::handle_exit_rw`] handles it too.
    pub fn handle_exit<V: Vcpu + ?Sized>(
        &mut self,
        exit: VmExit,
        vcpu: &mut V,
        vcpu_id: u32,
        mem: &dyn GuestMemory,
        sink: &mut dyn ConsoleSink,
        now_tsc: u64,
    ) -> ExitAction {
        self.dispatch(exit, vcpu, vcpu_id, Ram::ReadOnly(mem), sink, now_tsc)
    }

    /// [`VmContext::handle_exit`] with writable guest RAM, which `INS` needs.
    pub fn handle_exit_rw<V: Vcpu + ?Sized>(
        &mut self,
        exit: VmExit,
        vcpu: &mut V,
        vcpu_id: u32,
        mem: &mut dyn GuestMemory,
        sink: &mut dyn ConsoleSink,
        now_tsc: u64,
    ) -> ExitAction {
        self.dispatch(exit, vcpu, vcpu_id, Ram::Writable(mem), sink, now_tsc)
    }

    fn dispatch<V: Vcpu + ?Sized>(
        &mut self,
        exit: VmExit,
        vcpu: &mut V,
        vcpu_id: u32,
        mut ram: Ram<'_>,
        sink: &mut dyn ConsoleSink,
        now_tsc: u64,
    ) -> ExitAction {
        let mem = ram.get();
        let action = match exit {
            VmExit::Cpuid => {
                self.stats.count_exit(ExitKind::Cpuid);
                self.cpuid(vcpu, vcpu_id)
            }
            VmExit::Rdmsr => {
                self.stats.count_exit(ExitKind::Msr);
                self.msr(vcpu, false, sink, now_tsc)
            }
            VmExit::Wrmsr => {
                self.stats.count_exit(ExitKind::Msr);
                self.msr(vcpu, true, sink, now_tsc)
            }
            VmExit::Io(access) => {
                self.stats.count_exit(ExitKind::Io);
                self.port_io(vcpu, access, &mut ram, sink)
            }
            VmExit::NestedPageFault { gpa, access } => {
                self.stats.count_exit(ExitKind::NestedPageFault);
                // A fault inside RAM is the hypervisor's mapping bug; outside RAM it is a device window or the
                // guest's wild access.
                if gpa >= mem.size() {
                    if let Some(window) = self.windows.find(gpa) {
                        return self.mmio(vcpu, mem, gpa, access, window);
                    }
                }
                let cause = if gpa < mem.size() {
                    StopCause::FaultInRam { access }
                } else {
                    StopCause::WildAccess { access }
                };
                ExitAction::Stop(StopReport {
                    cause,
                    rip: vcpu.rip(),
                    addr: Some(gpa),
                })
            }
            VmExit::Hlt => {
                self.stats.count_exit(ExitKind::Hlt);
                vcpu.skip_instruction();
                // No virtual interrupt source exists in ABI v1, so nothing but a reset could wake it.
                ExitAction::Block { until_tsc: NO_WAKE }
            }
            VmExit::Hypercall => {
                self.stats.count_exit(ExitKind::Hypercall);
                self.hypercall(vcpu, mem, sink, now_tsc)
            }
            VmExit::SliceExpired => {
                self.stats.count_exit(ExitKind::SliceExpired);
                ExitAction::Continue
            }
            VmExit::ExternalInterrupt => {
                self.stats.count_exit(ExitKind::ExternalInterrupt);
                ExitAction::Continue
            }
            VmExit::TripleFault => self.fatal(
                StopCause::TripleFault {
                    rsp: vcpu.gpr(Gpr::Rsp),
                },
                vcpu.rip(),
            ),
            VmExit::Exception { vector, error_code } => {
                self.fatal(StopCause::Exception { vector, error_code }, vcpu.rip())
            }
            VmExit::Unhandled { code, info1, info2 } => {
                self.fatal(StopCause::Unhandled { code, info1, info2 }, vcpu.rip())
            }
        };
        if matches!(action, ExitAction::Stop(_)) {
            self.uart.flush(&self.name, sink);
        }
        action
    }

    /// Decodes the instruction that faulted on device window `window` at `gpa` into [`ExitAction::Mmio`], or
    /// stops the VM naming why it cannot.
    fn mmio<V: Vcpu + ?Sized>(
        &mut self,
        vcpu: &mut V,
        mem: &dyn GuestMemory,
        gpa: u64,
        access: MemAccess,
        window: (u64, u64),
    ) -> ExitAction {
        let rip = vcpu.rip();
        let stop = |cause| {
            ExitAction::Stop(StopReport {
                cause,
                rip,
                addr: Some(gpa),
            })
        };
        if access.execute {
            // Code fetched from a device window: there is no instruction to decode.
            return stop(StopCause::MmioFetchFault { linear: rip });
        }
        let Some(cs) = vcpu.control_state() else {
            return stop(StopCause::HostFailure {
                detail: "the vCPU's paging state could not be read for MMIO decode",
            });
        };
        let (mode, linear) = mmio::code_mode(&cs, rip);
        let mut bytes = [0u8; decode::MAX_LEN];
        let fetched = match walk::fetch(mem, &cs, linear, &mut bytes) {
            Ok(n) => n,
            Err(e) => return stop(StopCause::MmioFetchFault { linear: e.linear() }),
        };
        // `fetched` <= 15.
        let len = u8::try_from(fetched).unwrap_or(0);
        let decoded = match decode::decode(&bytes[..fetched], mode) {
            Ok(d) => d,
            Err(DecodeError::Truncated) if fetched < decode::MAX_LEN => {
                return stop(StopCause::MmioFetchFault {
                    linear: linear.wrapping_add(u64::from(len)),
                })
            }
            Err(_) => return stop(StopCause::MmioUnsupported { bytes, len }),
        };
        let write = matches!(decoded.op, decode::Op::Store(_));
        let (base, size) = window;
        let in_window = gpa
            .checked_add(u64::from(decoded.size.bytes()))
            .is_some_and(|end| end <= base + size);
        if write != access.write || !in_window {
            return stop(StopCause::MmioMismatch {
                bytes,
                len: decoded.len,
                write,
            });
        }
        let (kind, dest) = match decoded.op {
            decode::Op::Load(dest) => (MmioKind::Read, Some(dest)),
            decode::Op::Store(Source::Imm(v)) => (MmioKind::Write(v & decoded.size.mask()), None),
            decode::Op::Store(Source::Reg { reg, high_byte }) => {
                let v = vcpu.gpr(reg) >> if high_byte { 8 } else { 0 };
                (MmioKind::Write(v & decoded.size.mask()), None)
            }
        };
        ExitAction::Mmio(MmioAccess {
            gpa,
            size: decoded.size,
            kind,
            dest,
            len: decoded.len,
            ip_mask: mmio::ip_mask(mode),
        })
    }

    /// The action for a failed VM entry at guest `rip`.
    pub fn entry_failed(
        &mut self,
        failure: EntryFailure,
        rip: u64,
        sink: &mut dyn ConsoleSink,
    ) -> ExitAction {
        self.uart.flush(&self.name, sink);
        self.fatal(StopCause::EntryFailed(failure), rip)
    }

    fn fatal(&mut self, cause: StopCause, rip: u64) -> ExitAction {
        self.stats.count_exit(ExitKind::Fatal);
        ExitAction::Stop(StopReport {
            cause,
            rip,
            addr: None,
        })
    }

    fn cpuid<V: Vcpu + ?Sized>(&self, vcpu: &mut V, vcpu_id: u32) -> ExitAction {
        let leaf = low32(vcpu.gpr(Gpr::Rax));
        let subleaf = low32(vcpu.gpr(Gpr::Rcx));
        let r = self.cpuid.query(leaf, subleaf, vcpu_id, self.vcpu_count);
        // CPUID writes EAX..EDX and clears the upper halves of RAX..RDX (SDM Vol. 2A, CPUID).
        vcpu.set_gpr(Gpr::Rax, u64::from(r.eax));
        vcpu.set_gpr(Gpr::Rbx, u64::from(r.ebx));
        vcpu.set_gpr(Gpr::Rcx, u64::from(r.ecx));
        vcpu.set_gpr(Gpr::Rdx, u64::from(r.edx));
        vcpu.skip_instruction();
        ExitAction::Continue
    }

    fn msr<V: Vcpu + ?Sized>(
        &mut self,
        vcpu: &mut V,
        write: bool,
        sink: &mut dyn ConsoleSink,
        now: u64,
    ) -> ExitAction {
        let index = low32(vcpu.gpr(Gpr::Rcx));
        let access = if write {
            MsrAccess::Write((vcpu.gpr(Gpr::Rdx) << 32) | (vcpu.gpr(Gpr::Rax) & 0xffff_ffff))
        } else {
            MsrAccess::Read
        };
        match msr::emulate(index, access, vcpu.guest_tsc(now)) {
            MsrOutcome::Value(value) => {
                vcpu.set_gpr(Gpr::Rax, value & 0xffff_ffff);
                vcpu.set_gpr(Gpr::Rdx, value >> 32);
                vcpu.skip_instruction();
            }
            MsrOutcome::Written => vcpu.skip_instruction(),
            MsrOutcome::Refused => {
                if count_and_should_report(&mut self.stats.msr_refused) {
                    sink.event(
                        &self.name,
                        Event::MsrRefused {
                            index,
                            write,
                            rip: vcpu.rip(),
                        },
                    );
                }
                vcpu.inject_exception(VECTOR_GP, Some(0));
            }
        }
        ExitAction::Continue
    }

    fn port_io<V: Vcpu + ?Sized>(
        &mut self,
        vcpu: &mut V,
        access: IoAccess,
        ram: &mut Ram<'_>,
        sink: &mut dyn ConsoleSink,
    ) -> ExitAction {
        let rip = vcpu.rip();
        let mut ports = VmPorts {
            name: &self.name,
            uart: &mut self.uart,
            sink: &mut *sink,
            unowned_in: false,
            unowned_out: false,
        };
        let action = if access.string {
            match string_io::emulate(vcpu, ram, access, &mut ports) {
                Outcome::Done => {
                    vcpu.skip_instruction();
                    ExitAction::Continue
                }
                Outcome::Again => ExitAction::Continue,
                Outcome::Refused(detail) => ExitAction::Stop(StopReport {
                    cause: StopCause::StringIo {
                        port: access.port,
                        detail,
                    },
                    rip,
                    addr: None,
                }),
                Outcome::Fault { linear } => ExitAction::Stop(StopReport {
                    cause: StopCause::StringIoFault {
                        port: access.port,
                        linear,
                    },
                    rip,
                    addr: None,
                }),
            }
        } else {
            match access.direction {
                IoDirection::In => {
                    let value = ports.input(access.port, access.size);
                    let rax = vcpu.gpr(Gpr::Rax);
                    // IN to AL/AX keeps the rest of RAX; IN to EAX zero-extends into RAX (SDM Vol. 1 §3.4.1.1
                    // rules for 32-bit destinations).
                    let merged = if access.size.bytes() >= 4 {
                        value
                    } else {
                        (rax & !access.size.mask()) | value
                    };
                    vcpu.set_gpr(Gpr::Rax, merged);
                }
                IoDirection::Out => {
                    let value = vcpu.gpr(Gpr::Rax) & access.size.mask();
                    ports.output(access.port, access.size, value);
                }
            }
            vcpu.skip_instruction();
            ExitAction::Continue
        };
        let (unowned_in, unowned_out) = (ports.unowned_in, ports.unowned_out);
        if unowned_in && count_and_should_report(&mut self.stats.unowned_port_reads) {
            sink.event(
                &self.name,
                Event::UnownedPort {
                    port: access.port,
                    write: false,
                    rip,
                },
            );
        }
        if unowned_out && count_and_should_report(&mut self.stats.unowned_port_writes) {
            sink.event(
                &self.name,
                Event::UnownedPort {
                    port: access.port,
                    write: true,
                    rip,
                },
            );
        }
        action
    }

    fn hypercall<V: Vcpu + ?Sized>(
        &mut self,
        vcpu: &mut V,
        mem: &dyn GuestMemory,
        sink: &mut dyn ConsoleSink,
        now: u64,
    ) -> ExitAction {
        let nr = vcpu.gpr(Gpr::Rax);
        let (a0, a1) = (vcpu.gpr(Gpr::Rdi), vcpu.gpr(Gpr::Rsi));
        let rip = vcpu.rip();
        let mut action = ExitAction::Continue;
        let status = match nr {
            hc::VERSION => {
                vcpu.set_gpr(Gpr::Rdx, hc::ABI_VERSION);
                hc::OK
            }
            hc::LOG => self.log(a0, a1, mem, sink),
            hc::REPORT => match u16::try_from(a0) {
                Ok(key) if a0 >= hc::KEY_MIN => {
                    if self.counters.set(key, a1) {
                        sink.event(&self.name, Event::Counter { key, value: a1 });
                        hc::OK
                    } else {
                        hc::INVALID
                    }
                }
                _ => hc::INVALID,
            },
            hc::YIELD => {
                action = ExitAction::Yield;
                hc::OK
            }
            hc::SLEEP_UNTIL => {
                let guest_now = vcpu.guest_tsc(now);
                if guest_now < a0 {
                    // The guest TSC runs at the host rate, so the wait is the same number of host ticks.
                    action = ExitAction::Block {
                        until_tsc: now.saturating_add(a0 - guest_now).min(NO_WAKE - 1),
                    };
                }
                hc::OK
            }
            hc::EXIT => {
                self.exit_code = Some(a0);
                return ExitAction::Stop(StopReport {
                    cause: StopCause::GuestExit { code: a0 },
                    rip,
                    addr: None,
                });
            }
            _ => hc::UNKNOWN,
        };
        if status != hc::OK && count_and_should_report(&mut self.stats.bad_hypercalls) {
            sink.event(&self.name, Event::BadHypercall { nr, status, rip });
        }
        vcpu.set_gpr(Gpr::Rax, status.cast_unsigned());
        vcpu.skip_instruction();
        action
    }

    fn log(
        &mut self,
        addr: u64,
        len: u64,
        mem: &dyn GuestMemory,
        sink: &mut dyn ConsoleSink,
    ) -> i64 {
        if len > hc::LOG_MAX {
            return hc::INVALID;
        }
        let mut buf = [0u8; 256];
        // `len` <= 256 was checked above.
        let text = &mut buf[..usize::try_from(len).unwrap_or(0)];
        if mem.read(addr, text).is_err() {
            return hc::BAD_ADDRESS;
        }
        sink::send_text(sink, &self.name, text);
        hc::OK
    }
}

/// The VM's ports during one exit: COM1 at 0x3F8, every other port unowned (reads all ones, writes dropped).
struct VmPorts<'a> {
    name: &'a str,
    uart: &'a mut Uart16550,
    sink: &'a mut dyn ConsoleSink,
    unowned_in: bool,
    unowned_out: bool,
}

impl Ports for VmPorts<'_> {
    fn input(&mut self, port: u16, size: AccessSize) -> u64 {
        let mut value = 0u64;
        for i in 0..u16::from(size.bytes()) {
            let port = port.wrapping_add(i);
            let byte = if Uart16550::claims(port) {
                self.uart.read(port - COM1_BASE)
            } else {
                self.unowned_in = true;
                0xff
            };
            value |= u64::from(byte) << (8 * i);
        }
        value
    }

    fn output(&mut self, port: u16, size: AccessSize, value: u64) {
        let bytes = value.to_le_bytes();
        for i in 0..u16::from(size.bytes()) {
            let port = port.wrapping_add(i);
            if Uart16550::claims(port) {
                self.uart.write(
                    port - COM1_BASE,
                    bytes[usize::from(i)],
                    self.name,
                    self.sink,
                );
            } else {
                self.unowned_out = true;
            }
        }
    }
}

/// The low 32 bits of a register (ECX for an MSR index, EAX for a CPUID leaf).
fn low32(value: u64) -> u32 {
    u32::try_from(value & 0xffff_ffff).unwrap_or(u32::MAX)
}
