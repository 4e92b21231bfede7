//! A [`VmExit`] packed into four `u64` words, so a lock-free record (the run loop's exit trail,
//! `vm::report::trail`) can keep it in atomic words and give it back intact.
//!
//! Design: word 0 holds a kind tag in bits 7:0 and the small operands above it; words 1-3 hold the 64-bit operands
//! (a nested-page-fault GPA, an exception error code, the raw code and infos of an unhandled exit). `None` (no
//! decoded exit: the entry failed) is tag 0. [`unpack`] is the exact inverse of [`pack`] for every value `pack`
//! produces; words it does not recognise come back as [`Unpacked::Unknown`] rather than as a made-up exit.
//! Both backends' boot self-tests check the round trip on every exit they take ([`check_round_trip`]).
//!
//! Layout of word 0 (beside the tag): Io: port 31:16, size in bytes 15:8, IN 32, string 33, REP 34;
//! NestedPageFault: read 8, write 9, execute 10; Exception: vector 15:8, error code present 16 (the code in word 1).

use virt::{AccessSize, IoAccess, IoDirection, MemAccess, VmExit};

/// Words of one packed exit.
pub const WORDS: usize = 4;

const NONE: u64 = 0;
const CPUID: u64 = 1;
const RDMSR: u64 = 2;
const WRMSR: u64 = 3;
const IO: u64 = 4;
const NPF: u64 = 5;
const HLT: u64 = 6;
const HYPERCALL: u64 = 7;
const SLICE_EXPIRED: u64 = 8;
const EXTERNAL_INTERRUPT: u64 = 9;
const TRIPLE_FAULT: u64 = 10;
const EXCEPTION: u64 = 11;
const UNHANDLED: u64 = 12;

/// What a packed record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unpacked {
    /// A decoded exit, or `None` for a failed entry.
    Exit(Option<VmExit>),
    /// Words no [`pack`] call produced (shown raw by reports).
    Unknown([u64; WORDS]),
}

/// Packs `exit` (see the module doc for the layout). Inlined: it runs on every exit, and a call would spill the
/// caller's registers around it.
#[inline(always)]
pub fn pack(exit: Option<VmExit>) -> [u64; WORDS] {
    let Some(e) = exit else {
        return [NONE, 0, 0, 0];
    };
    match e {
        VmExit::Cpuid => [CPUID, 0, 0, 0],
        VmExit::Rdmsr => [RDMSR, 0, 0, 0],
        VmExit::Wrmsr => [WRMSR, 0, 0, 0],
        VmExit::Io(io) => [
            IO | (u64::from(io.port) << 16)
                | (u64::from(io.size.bytes()) << 8)
                | (u64::from(io.direction == IoDirection::In) << 32)
                | (u64::from(io.string) << 33)
                | (u64::from(io.rep) << 34),
            0,
            0,
            0,
        ],
        VmExit::NestedPageFault { gpa, access } => [
            NPF | (u64::from(access.read) << 8)
                | (u64::from(access.write) << 9)
                | (u64::from(access.execute) << 10),
            gpa,
            0,
            0,
        ],
        VmExit::Hlt => [HLT, 0, 0, 0],
        VmExit::Hypercall => [HYPERCALL, 0, 0, 0],
        VmExit::SliceExpired => [SLICE_EXPIRED, 0, 0, 0],
        VmExit::ExternalInterrupt => [EXTERNAL_INTERRUPT, 0, 0, 0],
        VmExit::TripleFault => [TRIPLE_FAULT, 0, 0, 0],
        VmExit::Exception { vector, error_code } => [
            EXCEPTION | (u64::from(vector) << 8) | (u64::from(error_code.is_some()) << 16),
            error_code.map_or(0, u64::from),
            0,
            0,
        ],
        VmExit::Unhandled { code, info1, info2 } => [UNHANDLED, code, info1, info2],
    }
}

/// The inverse of [`pack`].
pub fn unpack(w: [u64; WORDS]) -> Unpacked {
    let bit = |n: u32| w[0] & (1 << n) != 0;
    let exit = match w[0] & 0xff {
        NONE => None,
        CPUID => Some(VmExit::Cpuid),
        RDMSR => Some(VmExit::Rdmsr),
        WRMSR => Some(VmExit::Wrmsr),
        IO => {
            let Some(size) = u8::try_from((w[0] >> 8) & 0xff)
                .ok()
                .and_then(AccessSize::from_bytes)
            else {
                return Unpacked::Unknown(w);
            };
            Some(VmExit::Io(IoAccess {
                port: u16::try_from((w[0] >> 16) & 0xffff).unwrap_or(0),
                size,
                direction: if bit(32) {
                    IoDirection::In
                } else {
                    IoDirection::Out
                },
                string: bit(33),
                rep: bit(34),
            }))
        }
        NPF => Some(VmExit::NestedPageFault {
            gpa: w[1],
            access: MemAccess {
                read: bit(8),
                write: bit(9),
                execute: bit(10),
            },
        }),
        HLT => Some(VmExit::Hlt),
        HYPERCALL => Some(VmExit::Hypercall),
        SLICE_EXPIRED => Some(VmExit::SliceExpired),
        EXTERNAL_INTERRUPT => Some(VmExit::ExternalInterrupt),
        TRIPLE_FAULT => Some(VmExit::TripleFault),
        EXCEPTION => {
            let (Ok(vector), Ok(code)) = (u8::try_from((w[0] >> 8) & 0xff), u32::try_from(w[1]))
            else {
                return Unpacked::Unknown(w);
            };
            Some(VmExit::Exception {
                vector,
                error_code: bit(16).then_some(code),
            })
        }
        UNHANDLED => Some(VmExit::Unhandled {
            code: w[1],
            info1: w[2],
            info2: w[3],
        }),
        _ => return Unpacked::Unknown(w),
    };
    Unpacked::Exit(exit)
}

/// Checks that `exit` survives [`pack`] and [`unpack`] unchanged (the backends' self-tests check every exit they
/// take); the error says what it packed and unpacked as, in the self-tests' detail string.
#[allow(clippy::result_large_err)] // the self-tests' own detail type, only on the boot self-test path
pub fn check_round_trip(exit: Option<VmExit>) -> Result<(), heapless::String<160>> {
    let packed = pack(exit);
    let back = unpack(packed);
    if back == Unpacked::Exit(exit) {
        return Ok(());
    }
    let mut why = heapless::String::new();
    // A detail longer than the string is cut; the self-test still fails.
    let _ = core::fmt::Write::write_fmt(
        &mut why,
        format_args!("exit {exit:?} packs as {packed:x?}, which unpacks as {back:?}"),
    );
    Err(why)
}

/// One exit of every kind and shape (operands at their extremes), for the self-tests' round-trip check.
pub fn samples() -> [Option<VmExit>; 16] {
    let io = |size, direction, string, rep| {
        Some(VmExit::Io(IoAccess {
            port: 0xffff,
            size,
            direction,
            string,
            rep,
        }))
    };
    [
        None,
        Some(VmExit::Cpuid),
        Some(VmExit::Rdmsr),
        Some(VmExit::Wrmsr),
        io(AccessSize::Byte, IoDirection::In, true, true),
        io(AccessSize::Qword, IoDirection::Out, false, false),
        io(AccessSize::Word, IoDirection::In, false, true),
        Some(VmExit::NestedPageFault {
            gpa: u64::MAX,
            access: MemAccess {
                read: false,
                write: true,
                execute: true,
            },
        }),
        Some(VmExit::Hlt),
        Some(VmExit::Hypercall),
        Some(VmExit::SliceExpired),
        Some(VmExit::ExternalInterrupt),
        Some(VmExit::TripleFault),
        Some(VmExit::Exception {
            vector: 255,
            error_code: Some(u32::MAX),
        }),
        Some(VmExit::Exception {
            vector: 6,
            error_code: None,
        }),
        Some(VmExit::Unhandled {
            code: u64::MAX,
            info1: 1,
            info2: u64::MAX - 1,
        }),
    ]
}
