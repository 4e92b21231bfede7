//! Hypercalls (docs/guest-abi.md): `VMCALL` on Intel, `VMMCALL` on AMD, chosen once from the CPUID vendor.
//!
//! RAX carries the call number in and the status out, RDI/RSI/RDX the arguments, RDX the result.

use core::sync::atomic::{AtomicBool, Ordering};

/// Hypercall numbers of ABI version 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Call {
    Version = 0,
    Log = 1,
    Report = 2,
    Yield = 3,
    SleepUntil = 4,
    Exit = 5,
}

/// Counter keys for `REPORT` (docs/guest-abi.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Counter {
    Progress = 1,
    ReceivedNs = 2,
    ElapsedNs = 3,
    RtPeriods = 4,
    RtMisses = 5,
    RtMinReceivedNs = 6,
    ExitRttTicks = 7,
    IoIops = 8,
    IoOk = 9,
    IoErr = 10,
    IoVerifyFail = 11,
    IoSeconds = 12,
    IoLatAvgNs = 13,
}

/// A hypercall's error status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallError {
    /// -1: unknown call number.
    Unknown,
    /// -2: invalid argument.
    Invalid,
    /// -3: a buffer outside guest memory.
    BadAddress,
    /// Any other negative status (a newer hypervisor).
    Other(i64),
}

impl HypercallError {
    fn from_status(status: i64) -> Result<(), Self> {
        match status {
            0.. => Ok(()),
            -1 => Err(Self::Unknown),
            -2 => Err(Self::Invalid),
            -3 => Err(Self::BadAddress),
            other => Err(Self::Other(other)),
        }
    }
}

static AMD: AtomicBool = AtomicBool::new(false);

/// Chooses the hypercall instruction from the CPU vendor (CPUID leaf 0).
pub(crate) fn init() {
    let leaf0 = core::arch::x86_64::__cpuid(0);
    // "AuthenticAMD": EBX = "Auth", EDX = "enti", ECX = "cAMD".
    let amd =
        leaf0.ebx == u32::from_le_bytes(*b"Auth") && leaf0.ecx == u32::from_le_bytes(*b"cAMD");
    AMD.store(amd, Ordering::Relaxed);
}

/// Issues hypercall `nr` with raw arguments; returns (status, value). Public so `hostile` can send bogus calls.
pub fn raw(nr: u64, a0: u64, a1: u64, a2: u64) -> (i64, u64) {
    let status: u64;
    let value: u64;
    if AMD.load(Ordering::Relaxed) {
        // SAFETY: VMMCALL exits to the hypervisor, which follows the register ABI above; nothing else is clobbered.
        unsafe {
            core::arch::asm!("vmmcall", inout("rax") nr => status, in("rdi") a0, in("rsi") a1,
                inout("rdx") a2 => value, options(nostack));
        }
    } else {
        // SAFETY: as above, with VMCALL on Intel.
        unsafe {
            core::arch::asm!("vmcall", inout("rax") nr => status, in("rdi") a0, in("rsi") a1,
                inout("rdx") a2 => value, options(nostack));
        }
    }
    (status.cast_signed(), value)
}

fn call(nr: Call, a0: u64, a1: u64, a2: u64) -> Result<u64, HypercallError> {
    let (status, value) = raw(nr as u64, a0, a1, a2);
    HypercallError::from_status(status).map(|()| value)
}

/// The hypervisor's guest ABI version.
pub fn version() -> Result<u64, HypercallError> {
    call(Call::Version, 0, 0, 0)
}

/// Logs a message (truncated to the ABI's 256-byte limit).
pub fn log(message: &str) {
    let bytes = &message.as_bytes()[..message.len().min(256)];
    // Logging is best effort: a guest has nowhere else to report a failed log.
    let _ = call(Call::Log, bytes.as_ptr() as u64, bytes.len() as u64, 0);
}

/// Reports the latest value of a counter.
pub fn report(counter: Counter, value: u64) {
    // Best effort, as `log`: the keys used here are all valid.
    let _ = call(Call::Report, counter as u64, value, 0);
}

/// Gives up the rest of the current slice.
pub fn yield_now() {
    let _ = call(Call::Yield, 0, 0, 0);
}

/// Blocks until the guest TSC reaches `deadline`.
pub fn sleep_until(deadline: u64) {
    let _ = call(Call::SleepUntil, deadline, 0, 0);
}

/// Guest TSC ticks of `samples` `VERSION` hypercalls, each measured alone: (min, median). A hypercall is a
/// complete VM-exit round trip (exit, the hypervisor's dispatch, entry), so this is the exit cost a guest sees.
pub fn exit_round_trip(samples: &mut [u64]) -> (u64, u64) {
    for slot in samples.iter_mut() {
        let start = crate::rdtsc();
        let _ = raw(Call::Version as u64, 0, 0, 0);
        *slot = crate::rdtsc().wrapping_sub(start);
    }
    samples.sort_unstable();
    (
        samples.first().copied().unwrap_or(0),
        samples.get(samples.len() / 2).copied().unwrap_or(0),
    )
}

/// Stops the VM with `code`.
pub fn exit(code: u64) -> ! {
    let _ = call(Call::Exit, code, 0, 0);
    // A hypervisor that returned from EXIT is broken; stop this vCPU as well as a guest can.
    loop {
        // SAFETY: HLT only waits; with interrupts disabled the vCPU stays here.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}
