//! Host-test doubles: a scripted [`Vcpu`] and a recording [`ConsoleSink`].
//!
//! The fake vCPU does not execute instructions; a test sets the registers an instruction would have had, then
//! "runs" to get the next scripted exit, exactly as the kernel's run loop drives a real backend.

use alloc::collections::VecDeque;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::exit::{EntryFailure, VmExit};
use crate::sink::{ConsoleSink, Event};
use crate::vcpu::{ControlState, Gpr, Vcpu};

/// A scripted vCPU.
#[derive(Debug, Default)]
pub struct FakeVcpu {
    pub regs: [u64; 16],
    pub rip: u64,
    /// Length of the instruction that caused each exit.
    pub insn_len: u64,
    pub skipped: u32,
    pub injected: Vec<(u8, Option<u32>)>,
    /// Guest TSC = host TSC + this (wrapping).
    pub tsc_offset: u64,
    pub script: VecDeque<Result<VmExit, EntryFailure>>,
    pub deadlines: Vec<u64>,
    /// Paging and mode state; `None` makes `control_state` report it unavailable.
    pub control: Option<ControlState>,
    /// RIP values written through `set_rip`.
    pub rip_writes: u32,
}

impl FakeVcpu {
    pub fn new() -> Self {
        Self {
            insn_len: 3,
            ..Self::default()
        }
    }
}

impl Vcpu for FakeVcpu {
    fn run(&mut self, deadline_tsc: u64) -> Result<VmExit, EntryFailure> {
        self.deadlines.push(deadline_tsc);
        self.script.pop_front().unwrap_or(Ok(VmExit::SliceExpired))
    }

    fn gpr(&self, reg: Gpr) -> u64 {
        self.regs[reg as usize]
    }

    fn set_gpr(&mut self, reg: Gpr, value: u64) {
        self.regs[reg as usize] = value;
    }

    fn rip(&self) -> u64 {
        self.rip
    }

    fn set_rip(&mut self, rip: u64) {
        self.rip_writes += 1;
        self.rip = rip;
    }

    fn control_state(&self) -> Option<ControlState> {
        self.control
    }

    fn skip_instruction(&mut self) {
        self.skipped += 1;
        self.rip += self.insn_len;
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        self.injected.push((vector, error_code));
    }

    fn guest_tsc(&self, host_tsc: u64) -> u64 {
        host_tsc.wrapping_add(self.tsc_offset)
    }
}

/// A sink that records everything.
#[derive(Debug, Default)]
pub struct RecordingSink {
    /// `<vm>: <line>` as the kernel would log it.
    pub lines: Vec<String>,
    pub events: Vec<(String, Event)>,
}

impl ConsoleSink for RecordingSink {
    fn guest_line(&mut self, vm: &str, line: &str) {
        let mut text = vm.to_string();
        text.push_str(": ");
        text.push_str(line);
        self.lines.push(text);
    }

    fn event(&mut self, vm: &str, event: Event) {
        self.events.push((vm.to_string(), event));
    }
}
