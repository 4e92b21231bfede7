//! Per-VM counts of exits and of guest misbehaviour, and the rate limit on reporting it.
//!
//! Design: every refused or dropped access is counted (the kernel's periodic VM lines show the totals); only the
//! first [`REPORT_LIMIT`] of each kind are also sent to the sink as events, so a guest that hammers an unowned
//! port cannot flood the hypervisor log.

/// Events of one kind reported per VM before further ones are only counted.
pub const REPORT_LIMIT: u64 = 16;

/// Exit kinds counted per VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    Cpuid,
    Msr,
    Io,
    NestedPageFault,
    Hlt,
    Hypercall,
    SliceExpired,
    ExternalInterrupt,
    Fatal,
}

impl ExitKind {
    /// Number of kinds.
    pub const COUNT: usize = 9;
    /// Every kind, in index order.
    pub const ALL: [Self; Self::COUNT] = [
        Self::Cpuid,
        Self::Msr,
        Self::Io,
        Self::NestedPageFault,
        Self::Hlt,
        Self::Hypercall,
        Self::SliceExpired,
        Self::ExternalInterrupt,
        Self::Fatal,
    ];

    /// Short name for reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Cpuid => "cpuid",
            Self::Msr => "msr",
            Self::Io => "io",
            Self::NestedPageFault => "npf",
            Self::Hlt => "hlt",
            Self::Hypercall => "hypercall",
            Self::SliceExpired => "slice",
            Self::ExternalInterrupt => "irq",
            Self::Fatal => "fatal",
        }
    }
}

/// Counters of one VM.
#[derive(Clone, Debug, Default)]
pub struct VmStats {
    /// Exits handled, by [`ExitKind`] index.
    pub exits: [u64; ExitKind::COUNT],
    /// MSR accesses refused with #GP.
    pub msr_refused: u64,
    /// Reads of unowned ports (answered with all ones).
    pub unowned_port_reads: u64,
    /// Writes to unowned ports (dropped).
    pub unowned_port_writes: u64,
    /// Hypercalls that returned an error status.
    pub bad_hypercalls: u64,
}

impl VmStats {
    /// Total exits handled.
    pub fn total_exits(&self) -> u64 {
        self.exits.iter().sum()
    }

    /// Exits of one kind.
    pub fn exits_of(&self, kind: ExitKind) -> u64 {
        self.exits[kind as usize]
    }

    pub(crate) fn count_exit(&mut self, kind: ExitKind) {
        self.exits[kind as usize] += 1;
    }
}

/// Increments `counter` and says whether this occurrence is still within the report limit.
pub(crate) fn count_and_should_report(counter: &mut u64) -> bool {
    *counter += 1;
    *counter <= REPORT_LIMIT
}
