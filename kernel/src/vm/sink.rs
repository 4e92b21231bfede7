//! The kernel side of guest output: guest lines and guest-behaviour events to the serial console.
//!
//! Guest lines are written as whole console lines `<vm>: <line>` (already sanitised and bounded by
//! `virt::sink`); the hypervisor's notes on what a guest did are log-format lines at `warn` (refused MSRs,
//! unowned ports, failed hypercalls; rate-limited per VM by `virt::stats`) or `debug` (counter reports). All of
//! it goes through the console's deferred path: exit handling never waits for the UART (the run loop pumps it).
//!
//! Events are not even formatted in exit handling: [`LogSink::event`] records a small fixed-size [`Pending`]
//! (VM name, event, CPU, time) in a bounded ring, and the run loop formats them between slices
//! ([`format_pending`]: one per iteration beside the console pump, more in idle time, the rest when the loop ends). Formatting a line
//! (number formatting, timestamps, the copy into the console ring) cost up to ~100 us of Bochs time per event;
//! done inside the exit it made a probing VM's slice overrun the 50 us bound (Bochs ryzen, one CPU: 5-6
//! overruns of 52-96 us, each one right after a port-probe warning). Between slices the cost is host overhead,
//! outside every vCPU's slice. A full ring drops events and counts them; the count is logged with the next
//! formatted event. Lock: `PENDING` is held only to copy one record in or out, never while formatting.

use core::sync::atomic::{AtomicU64, Ordering};

use heapless::{Deque, String};
use log::Level;
use spin::Mutex;
use virt::sink::{ConsoleSink, Event};

use crate::arch::x86_64::{percpu, tsc};
use crate::console;

/// Events recorded and not yet formatted (all CPUs). More than the rate limit lets one VM report at once.
const PENDING_EVENTS: usize = 64;
/// Bytes of a VM name kept with an event (longer names are cut; names are short in practice).
const NAME_BYTES: usize = 48;

/// One event recorded in exit handling, formatted later.
#[derive(Clone, Debug)]
struct Pending {
    vm: String<NAME_BYTES>,
    event: Event,
    cpu: u32,
    micros: u64,
}

static PENDING: Mutex<Deque<Pending, PENDING_EVENTS>> = Mutex::new(Deque::new());
/// Events dropped because the ring was full, not yet reported.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Sink writing to the serial console.
#[derive(Debug, Default)]
pub struct LogSink;

impl ConsoleSink for LogSink {
    fn guest_line(&mut self, vm: &str, line: &str) {
        console::write_line_deferred(format_args!("{vm}: {line}"));
    }

    fn event(&mut self, vm: &str, event: Event) {
        if level(&event) > log::max_level() {
            return;
        }
        let mut name = String::new();
        for c in vm.chars() {
            if name.push(c).is_err() {
                break;
            }
        }
        let record = Pending {
            vm: name,
            event,
            cpu: percpu::current_id(),
            micros: tsc::uptime_us(),
        };
        let full = x86_64::instructions::interrupts::without_interrupts(|| {
            PENDING.lock().push_back(record).is_err()
        });
        if full {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Formats recorded events into the console ring: at most `max` of them (the run loop passes 1 between slices,
/// more while it has idle time, and `usize::MAX` when it stops). Returns true if events remain.
pub fn format_pending(max: usize) -> bool {
    for _ in 0..max {
        let next =
            x86_64::instructions::interrupts::without_interrupts(|| PENDING.lock().pop_front());
        let Some(p) = next else {
            return false;
        };
        write(&p);
    }
    x86_64::instructions::interrupts::without_interrupts(|| !PENDING.lock().is_empty())
}

fn level(event: &Event) -> Level {
    match event {
        Event::Counter { .. } => Level::Debug,
        _ => Level::Warn,
    }
}

/// One recorded event as a log line stamped with the time and CPU it happened on.
fn write(p: &Pending) {
    let vm = p.vm.as_str();
    let at = |args: core::fmt::Arguments<'_>| {
        console::log_deferred_at(level(&p.event), p.micros, p.cpu, "vm", args);
    };
    match p.event {
        Event::MsrRefused { index, write, rip } => at(format_args!(
            "vm {vm}: {} of MSR {index:#x} refused with #GP at rip={rip:#x}",
            if write { "WRMSR" } else { "RDMSR" }
        )),
        Event::UnownedPort { port, write, rip } => at(format_args!(
            "vm {vm}: {} port {port:#x}, which no device owns ({}) at rip={rip:#x}",
            if write { "write to" } else { "read from" },
            if write { "dropped" } else { "read as all ones" }
        )),
        Event::BadHypercall { nr, status, rip } => at(format_args!(
            "vm {vm}: hypercall {nr:#x} failed with status {status} at rip={rip:#x}"
        )),
        Event::Counter { key, value } => at(format_args!("vm {vm}: counter {key} = {value}")),
    }
    let dropped = DROPPED.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        console::log_deferred_at(
            Level::Warn,
            p.micros,
            p.cpu,
            "vm",
            format_args!("{dropped} guest events dropped (event ring full)"),
        );
    }
}
