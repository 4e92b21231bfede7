//! What the run loop does after an exit: the value every exit handler returns.
//!
//! Design: handlers never switch, block or stop anything themselves; they return an [`ExitAction`] and the run
//! loop (kernel/src/vm) acts on it, so a forgotten reschedule is a compiler warning (`#[must_use]`) and the
//! handlers stay host-testable. A stopped VM carries a [`StopReport`]: one line naming the cause, the guest RIP
//! and, where there is one, the address involved.

use core::fmt;

use crate::exit::{EntryFailure, MemAccess};
use crate::mmio::MmioAccess;

/// Host TSC value meaning "no timed wake-up" in [`ExitAction::Block`] (a halted vCPU with no wake event).
pub const NO_WAKE: u64 = u64::MAX;

/// What the run loop must do next with the vCPU whose exit was handled.
#[must_use = "the run loop must act on the exit handler's decision"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest if the slice has time left (otherwise ask the scheduler).
    Continue,
    /// The vCPU is blocked until the host TSC reaches `until_tsc` ([`NO_WAKE`]: no timed wake-up).
    Block { until_tsc: u64 },
    /// The vCPU gives up the rest of its slice but stays runnable.
    Yield,
    /// The whole VM stops; the report says why.
    Stop(StopReport),
    /// A decoded access to a device window: the run loop hands it to the window's device model, then calls
    /// [`crate::VmContext::complete_mmio`] with the value read (0 for a write), which finishes the instruction.
    Mmio(MmioAccess),
}

/// Why a VM was stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// The guest asked to stop (`EXIT` hypercall) with this code.
    GuestExit { code: u64 },
    /// Triple fault (VMX exit reason 2, SVM `SHUTDOWN`), with the guest's RSP at the stop: a fault the guest's own
    /// handlers could not take usually means its stack pointer was unusable, and the report should show it.
    TripleFault { rsp: u64 },
    /// An access to guest-physical memory that is neither RAM nor a device.
    WildAccess { access: MemAccess },
    /// A nested-paging fault inside guest RAM: the hypervisor's mapping is wrong, not the guest.
    FaultInRam { access: MemAccess },
    /// An intercepted exception the layer does not expect.
    Exception { vector: u8, error_code: Option<u32> },
    /// String port I/O (`INS`/`OUTS`) in a form that is not emulated; `detail` says which.
    StringIo { port: u16, detail: &'static str },
    /// String port I/O whose memory operand (or the instruction fetch) faulted at `linear` in the guest's paging.
    StringIoFault { port: u16, linear: u64 },
    /// An exit reason the layer does not handle.
    Unhandled { code: u64, info1: u64, info2: u64 },
    /// VM entry was refused by the hardware.
    EntryFailed(EntryFailure),
    /// The hypervisor could not provide what the vCPU needs (e.g. no memory for its control structures).
    HostFailure { detail: &'static str },
    /// An access to a device window by an instruction the MMIO emulator does not decode (the first `len`
    /// bytes fetched at RIP; `len` may be short of the instruction if the fetch stopped at an unmapped page).
    MmioUnsupported { bytes: [u8; 15], len: u8 },
    /// An access to a device window whose instruction could not be fetched: the guest's page tables do not map
    /// RIP (`linear`) to RAM.
    MmioFetchFault { linear: u64 },
    /// The decoded instruction does not match the fault: a store where the hardware reported a read (or the
    /// reverse; the code changed under the exit), or an access that runs past the end of the window.
    MmioMismatch {
        bytes: [u8; 15],
        len: u8,
        write: bool,
    },
    /// A decoded access to a device window that no device model serves.
    NoDeviceModel,
}

impl StopCause {
    /// Short machine-readable name of the cause (`cause=` in the report).
    pub const fn name(&self) -> &'static str {
        match self {
            Self::GuestExit { .. } => "guest-exit",
            Self::TripleFault { .. } => "triple-fault",
            Self::WildAccess { .. } => "wild-access",
            Self::FaultInRam { .. } => "fault-in-ram",
            Self::Exception { .. } => "exception",
            Self::StringIo { .. } => "string-io",
            Self::StringIoFault { .. } => "string-io-fault",
            Self::Unhandled { .. } => "unhandled-exit",
            Self::EntryFailed(_) => "entry-failed",
            Self::HostFailure { .. } => "host-failure",
            Self::MmioUnsupported { .. } => "mmio-unsupported",
            Self::MmioFetchFault { .. } => "mmio-fetch-fault",
            Self::MmioMismatch { .. } => "mmio-mismatch",
            Self::NoDeviceModel => "no-device-model",
        }
    }
}

/// The one-line report of a stopped VM (without its name, which the run loop knows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopReport {
    pub cause: StopCause,
    /// Guest RIP when it stopped.
    pub rip: u64,
    /// The address involved (faulting guest-physical address), if any.
    pub addr: Option<u64>,
}

impl StopReport {
    /// The report as one line, `name=<vm> cause=<cause> rip=0x.. addr=0x.. detail="..."`, the body of the kernel's
    /// `CV:VMSTOP` marker.
    pub fn line<'a>(&'a self, vm: &'a str) -> impl fmt::Display + 'a {
        ReportLine { report: self, vm }
    }
}

struct ReportLine<'a> {
    report: &'a StopReport,
    vm: &'a str,
}

impl fmt::Display for ReportLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.report;
        write!(
            f,
            "name={} cause={} rip={:#x}",
            self.vm,
            r.cause.name(),
            r.rip
        )?;
        match r.addr {
            Some(addr) => write!(f, " addr={addr:#x}")?,
            None => f.write_str(" addr=none")?,
        }
        f.write_str(" detail=\"")?;
        match r.cause {
            StopCause::GuestExit { code } => write!(f, "exit code {code:#x}")?,
            StopCause::TripleFault { rsp } => write!(f, "triple fault, rsp={rsp:#x}")?,
            StopCause::WildAccess { access } => write!(
                f,
                "{} of guest-physical memory that is neither RAM nor a device",
                access_name(access)
            )?,
            StopCause::FaultInRam { access } => write!(
                f,
                "{} inside guest RAM faulted in nested paging (hypervisor mapping bug)",
                access_name(access)
            )?,
            StopCause::Exception {
                vector,
                error_code: Some(e),
            } => write!(f, "exception {vector} error {e:#x}")?,
            StopCause::Exception {
                vector,
                error_code: None,
            } => write!(f, "exception {vector}")?,
            StopCause::StringIo { port, detail } => {
                write!(f, "string port I/O at {port:#x}: {detail}")?
            }
            StopCause::StringIoFault { port, linear } => write!(
                f,
                "string port I/O at {port:#x}: guest memory at linear {linear:#x} faulted"
            )?,
            StopCause::Unhandled { code, info1, info2 } => write!(
                f,
                "unhandled exit code {code:#x} info1={info1:#x} info2={info2:#x}"
            )?,
            StopCause::EntryFailed(EntryFailure::VmxInstructionError(n)) => {
                write!(f, "VM entry failed: VMX instruction error {n}")?
            }
            StopCause::EntryFailed(EntryFailure::VmxInvalidGuestState {
                reason,
                qualification,
            }) => write!(
                f,
                "VM entry failed: exit reason {reason} qualification {qualification:#x}"
            )?,
            StopCause::EntryFailed(EntryFailure::SvmInvalidState { detail }) => {
                write!(f, "VMRUN failed: invalid VMCB ({detail})")?
            }
            StopCause::HostFailure { detail } => write!(f, "hypervisor failure: {detail}")?,
            StopCause::MmioUnsupported { bytes, len } => {
                f.write_str("unsupported MMIO instruction")?;
                for b in bytes.iter().take(usize::from(len)) {
                    write!(f, " {b:02x}")?;
                }
            }
            StopCause::MmioFetchFault { linear } => write!(
                f,
                "MMIO instruction fetch at linear {linear:#x} faulted in the guest page tables"
            )?,
            StopCause::MmioMismatch { bytes, len, write } => {
                f.write_str("MMIO instruction")?;
                for b in bytes.iter().take(usize::from(len)) {
                    write!(f, " {b:02x}")?;
                }
                write!(
                    f,
                    " ({}) does not match the fault or leaves the device window",
                    if write { "store" } else { "load" }
                )?;
            }
            StopCause::NoDeviceModel => f.write_str("MMIO access with no device model")?,
        }
        f.write_str("\"")
    }
}

/// "write", "read" or "execute" (the strongest of the access bits).
fn access_name(access: MemAccess) -> &'static str {
    if access.write {
        "write"
    } else if access.execute {
        "execute"
    } else {
        "read"
    }
}
