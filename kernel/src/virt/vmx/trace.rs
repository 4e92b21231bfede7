//! A per-vCPU trace of its last VM entries, kept in a small fixed ring so that a late VM exit can be explained
//! after the fact without logging anything on the hot path.
//!
//! Each entry records what decides when a slice ends: the TSC just before the entry (`entry_tsc`, read where the
//! preemption-timer value is computed), the deadline asked for, the timer value armed, the value the CPU saved at
//! the exit ("save VMX-preemption timer value"), the TSC right after the exit, the exit reason, and the guest's
//! RIP, and for a late exit its RFLAGS and interruptibility state (a `cli` spin shows IF = 0; STI/MOV-SS blocking
//! shows in bits 0-1). Recording is one RDTSC and a few stores; the two VMREADs happen only for late exits.
//!
//! The first time an exit comes more than [`LATE_NS`] after its deadline, the ring is frozen [`AFTER`] entries
//! later (so it holds the entries around that exit), and [`Ring::report`] queues it for the console (deferred, no
//! waiting for the UART, so the run's own figures do not include the printing) with a verdict: "entered after its deadline" (the timer was armed with 0: the host was late before the entry, not the
//! timer), or "timer late" (the exit came long after the armed value ran out: the timer or the CPU's event
//! delivery was late).
//!
//! Invariant: nothing here allocates or logs on the recording path; `report` runs outside any slice.

use core::fmt::Write;

use super::exit;
use crate::arch::x86_64::tsc;
use crate::console;

/// Entries kept.
pub const SLOTS: usize = 32;
/// Entries recorded after the first late exit before the ring is frozen.
pub const AFTER: usize = 8;
/// Entries printed before the first late exit.
pub const BEFORE: u64 = 8;
/// An exit this long after its deadline (timer latency plus one exit, with a wide margin even for an emulator's
/// 4-20 us exits) is "late".
pub const LATE_NS: u64 = 25_000;

/// One VM entry and its exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// Sequence number (1 = this vCPU's first entry).
    pub seq: u64,
    /// Host TSC when the timer value was computed, just before the entry.
    pub entry_tsc: u64,
    /// Host TSC the slice should end at.
    pub deadline: u64,
    /// Preemption-timer value armed.
    pub armed: u32,
    /// Value saved at the exit (`None` without the save control).
    pub saved: Option<u32>,
    /// Host TSC right after the exit.
    pub exit_tsc: u64,
    /// Exit-reason field.
    pub reason: u32,
    pub rip: u64,
    /// Read for late exits only (two VMREADs saved on every other one).
    pub rflags: Option<u64>,
    pub interruptibility: Option<u32>,
}

impl Entry {
    /// TSC ticks from the deadline to the exit (0 if on time).
    pub fn late_ticks(&self) -> u64 {
        self.exit_tsc.saturating_sub(self.deadline)
    }
}

/// The ring, and a frozen copy around the first late exit.
#[derive(Clone, Debug)]
pub struct Ring {
    entries: [Entry; SLOTS],
    next: usize,
    seq: u64,
    late_ticks: u64,
    /// Sequence number of the first late exit.
    first_late: Option<u64>,
    frozen: Option<[Entry; SLOTS]>,
    /// Late exits seen, and the worst lateness.
    lates: u64,
    worst_ticks: u64,
}

impl Default for Ring {
    fn default() -> Self {
        Self::new()
    }
}

impl Ring {
    /// An empty ring; lateness is judged at the TSC rate known now.
    pub fn new() -> Self {
        let hz = tsc::hz().max(1);
        let late_ticks =
            u64::try_from(u128::from(LATE_NS) * u128::from(hz) / 1_000_000_000).unwrap_or(u64::MAX);
        Self {
            entries: [Entry::default(); SLOTS],
            next: 0,
            seq: 0,
            late_ticks,
            first_late: None,
            frozen: None,
            lates: 0,
            worst_ticks: 0,
        }
    }

    /// Whether an exit at `exit_tsc` for `deadline` counts as late.
    pub fn is_late(&self, exit_tsc: u64, deadline: u64) -> bool {
        exit_tsc.saturating_sub(deadline) > self.late_ticks
    }

    /// Records one entry (its `seq` is assigned here).
    pub fn record(&mut self, mut e: Entry) {
        self.seq += 1;
        e.seq = self.seq;
        self.entries[self.next] = e;
        self.next = (self.next + 1) % SLOTS;
        let late = e.late_ticks();
        if late > self.late_ticks {
            self.lates += 1;
            self.worst_ticks = self.worst_ticks.max(late);
            if self.first_late.is_none() {
                self.first_late = Some(e.seq);
            }
        }
        if self.frozen.is_none()
            && self
                .first_late
                .is_some_and(|f| self.seq >= f + AFTER as u64)
        {
            self.frozen = Some(self.ordered());
        }
    }

    /// The ring's entries, oldest first.
    fn ordered(&self) -> [Entry; SLOTS] {
        let mut out = [Entry::default(); SLOTS];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.entries[(self.next + i) % SLOTS];
        }
        out
    }

    /// Late exits seen so far.
    pub fn lates(&self) -> u64 {
        self.lates
    }

    /// Queues the entries around the first late exit of vCPU `who` for the console (nothing if there was none):
    /// one summary line with the verdict, then one line per entry ([`BEFORE`] before it to [`AFTER`] after).
    pub fn report(&self, who: &str) {
        let Some(first) = self.first_late else {
            return;
        };
        let entries = self.frozen.unwrap_or_else(|| self.ordered());
        let Some(late) = entries.iter().find(|e| e.seq == first) else {
            return;
        };
        let verdict = if late.entry_tsc >= late.deadline || late.armed == 0 {
            "entered after its deadline (timer armed 0): the host was late before the entry, not the timer"
        } else {
            "timer late: the exit came long after the armed value ran out"
        };
        console::log_deferred(
            log::Level::Warn,
            "vmx",
            format_args!(
                "trace {who}: {} late exits (worst {} us); first at entry {}: {} us late, {verdict}",
                self.lates,
                tsc::ticks_to_us(self.worst_ticks),
                first,
                tsc::ticks_to_us(late.late_ticks()),
            ),
        );
        for e in entries
            .iter()
            .filter(|e| e.seq != 0 && e.seq + BEFORE >= first)
        {
            let mut line = heapless::String::<200>::new();
            let _ = write!(
                line,
                "{}{} entry={} deadline{:+} armed={} saved={:?} exit{:+} reason={} rip={:#x} rflags={:x?} intr={:x?}",
                if e.seq == first { "*" } else { " " },
                e.seq,
                e.entry_tsc,
                signed(e.deadline, e.entry_tsc),
                e.armed,
                e.saved,
                signed(e.exit_tsc, e.deadline),
                exit::reason_name(u16::try_from(e.reason & 0xFFFF).unwrap_or(u16::MAX)),
                e.rip,
                e.rflags,
                e.interruptibility,
            );
            console::log_deferred(log::Level::Warn, "vmx", format_args!("trace {who}: {line}"));
        }
    }
}

/// `a - b` as a signed tick count (saturated).
fn signed(a: u64, b: u64) -> i64 {
    if a >= b {
        i64::try_from(a - b).unwrap_or(i64::MAX)
    } else {
        i64::try_from(b - a).map_or(i64::MIN, |d| -d)
    }
}
