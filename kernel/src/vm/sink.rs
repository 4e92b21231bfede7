//! The kernel side of guest output: guest lines and guest-behaviour events to the serial console.
//!
//! Guest lines are written as whole console lines `<vm>: <line>` (already sanitised and bounded by
//! `virt::sink`); the hypervisor's notes on what a guest did are log-format lines at `warn` (refused MSRs,
//! unowned ports, failed hypercalls; rate-limited per VM by `virt::stats`) or `debug` (counter reports). All of
//! it goes through the console's deferred path: exit handling never waits for the UART (the run loop pumps it).

use virt::sink::{ConsoleSink, Event};

use crate::console::{self, log_deferred};
use log::Level;

/// Sink writing to the serial console.
#[derive(Debug, Default)]
pub struct LogSink;

impl ConsoleSink for LogSink {
    fn guest_line(&mut self, vm: &str, line: &str) {
        console::write_line_deferred(format_args!("{vm}: {line}"));
    }

    fn event(&mut self, vm: &str, event: Event) {
        match event {
            Event::MsrRefused { index, write, rip } => warn(format_args!(
                "vm {vm}: {} of MSR {index:#x} refused with #GP at rip={rip:#x}",
                if write { "WRMSR" } else { "RDMSR" }
            )),
            Event::UnownedPort { port, write, rip } => warn(format_args!(
                "vm {vm}: {} port {port:#x}, which no device owns ({}) at rip={rip:#x}",
                if write { "write to" } else { "read from" },
                if write { "dropped" } else { "read as all ones" }
            )),
            Event::BadHypercall { nr, status, rip } => warn(format_args!(
                "vm {vm}: hypercall {nr:#x} failed with status {status} at rip={rip:#x}"
            )),
            Event::Counter { key, value } => log_deferred(
                Level::Debug,
                "vm",
                format_args!("vm {vm}: counter {key} = {value}"),
            ),
        }
    }
}

fn warn(args: core::fmt::Arguments<'_>) {
    log_deferred(Level::Warn, "vm", args);
}
