//! The exit trail: the last [`TRAIL_LEN`] exits of each CPU, kept for a stop dump (`report::stop_dump`).
//!
//! Design: one ring per CPU, written only by that CPU's run loop on every exit ([`record`]) with plain stores:
//! no lock, no locked instruction, no fence instruction (on x86 the atomics below are ordinary `mov`s; the fences
//! only keep the compiler from reordering). The exit itself is kept packed ([`crate::virt::packed`]). A reader on
//! another CPU (the stop dump of a VM that faulted there) may race with the writer, so every cell carries a
//! sequence word (a seqlock): the writer stores `2n + 1` (odd: being written) before the words of its `n`-th exit
//! and `2n + 2` after them. A reader takes a cell only when it reads `2n + 2` both before and after its words;
//! anything else is reported as [`Read::Changed`], never shown as if it were one exit.
//!
//! Invariants: only CPU `c` calls [`record`] for ring `c` (the run loop passes its own CPU; `written` is then a
//! plain counter, loaded and stored without a read-modify-write); a cell's words belong to exit `n` exactly while its
//! sequence word is `2n + 2`. CPUs from [`TRAIL_CPUS`] on keep no trail.

use core::sync::atomic::{fence, AtomicU64, Ordering};

use virt::VmExit;

use crate::virt::packed::{self, Unpacked};

/// Exits remembered per CPU.
pub const TRAIL_LEN: usize = 16;
/// CPUs with a trail.
pub const TRAIL_CPUS: usize = 16;

/// One remembered exit (beside the exit itself): the state the guest left in, before the handler changed anything.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// Host TSC at the exit.
    pub tsc: u64,
    /// The run loop's slot of the vCPU.
    pub slot: usize,
    pub rip: u64,
    pub rsp: u64,
    pub rax: u64,
    /// SVM: EXITINTINFO of the exit (an event whose delivery the exit interrupted); VMX: IDT-vectoring information.
    pub int_info: u64,
}

/// Words of a cell after its sequence word: tsc, slot, rip, rsp, rax, int_info, then the packed exit.
const WORDS: usize = 6 + packed::WORDS;

struct Cell {
    seq: AtomicU64,
    words: [AtomicU64; WORDS],
}

struct Ring {
    /// Exits recorded so far (exit `n` is in cell `n % TRAIL_LEN`).
    written: AtomicU64,
    cells: [Cell; TRAIL_LEN],
}

static RINGS: [Ring; TRAIL_CPUS] = [const {
    Ring {
        written: AtomicU64::new(0),
        cells: [const {
            Cell {
                seq: AtomicU64::new(0),
                words: [const { AtomicU64::new(0) }; WORDS],
            }
        }; TRAIL_LEN],
    }
}; TRAIL_CPUS];

/// Remembers `exit` with `e` as CPU `cpu`'s latest exit. Call only on CPU `cpu` (module invariant).
#[inline(always)]
pub fn record(cpu: usize, e: &Entry, exit: Option<VmExit>) {
    let Some(ring) = RINGS.get(cpu) else {
        return;
    };
    let n = ring.written.load(Ordering::Relaxed);
    // `n % TRAIL_LEN` < TRAIL_LEN, so the index always holds; the cast cannot truncate a value below 16.
    #[allow(clippy::cast_possible_truncation)]
    let cell = &ring.cells[(n % TRAIL_LEN as u64) as usize];
    cell.seq.store(2 * n + 1, Ordering::Relaxed);
    // Orders the odd sequence word before every word below (a reader that sees a new word then sees it odd).
    fence(Ordering::Release);
    let exit = packed::pack(exit);
    let head = [
        e.tsc,
        u64::try_from(e.slot).unwrap_or(u64::MAX),
        e.rip,
        e.rsp,
        e.rax,
        e.int_info,
    ];
    for (w, v) in cell.words.iter().zip(head.iter().chain(exit.iter())) {
        w.store(*v, Ordering::Relaxed);
    }
    cell.seq.store(2 * n + 2, Ordering::Release);
    ring.written.store(n + 1, Ordering::Release);
}

/// One cell as a reader found it.
#[derive(Clone, Copy, Debug)]
pub enum Read {
    /// One exit, intact.
    Exit { entry: Entry, exit: Unpacked },
    /// Exit number `n` was being written or was overwritten while it was read (its CPU is still running).
    Changed { n: u64 },
}

/// CPU `cpu`'s remembered exits, oldest first (at most [`TRAIL_LEN`]; none for a CPU without a trail).
pub fn read(cpu: usize) -> impl Iterator<Item = Read> {
    let ring = RINGS.get(cpu);
    let written = ring.map_or(0, |r| r.written.load(Ordering::Acquire));
    let first = written.saturating_sub(TRAIL_LEN as u64);
    (first..written).filter_map(move |n| ring.map(|r| read_cell(r, n)))
}

fn read_cell(ring: &Ring, n: u64) -> Read {
    // As in `record`: the index is below TRAIL_LEN.
    #[allow(clippy::cast_possible_truncation)]
    let cell = &ring.cells[(n % TRAIL_LEN as u64) as usize];
    let want = 2 * n + 2;
    if cell.seq.load(Ordering::Acquire) != want {
        return Read::Changed { n };
    }
    let mut w = [0u64; WORDS];
    for (v, a) in w.iter_mut().zip(cell.words.iter()) {
        *v = a.load(Ordering::Relaxed);
    }
    // Orders the word loads before the second look at the sequence word.
    fence(Ordering::Acquire);
    if cell.seq.load(Ordering::Relaxed) != want {
        return Read::Changed { n };
    }
    let mut exit = [0u64; packed::WORDS];
    exit.copy_from_slice(&w[6..]);
    Read::Exit {
        entry: Entry {
            tsc: w[0],
            slot: usize::try_from(w[1]).unwrap_or(usize::MAX),
            rip: w[2],
            rsp: w[3],
            rax: w[4],
            int_info: w[5],
        },
        exit: packed::unpack(exit),
    }
}
