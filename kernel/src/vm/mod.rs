//! The VM runtime: VMs and vCPUs from the boot modules, the per-CPU run loop, and per-VM accounting.
//!
//! At boot ([`start`]) the kernel reads the VM configuration module (`vms.conf`, format in docs/vm-config.md),
//! and for every VM: allocates and zeroes its RAM ([`ram`]), loads its image module and the guest ABI's boot
//! structures (`virt::loader`), maps the RAM into the VM's own nested page table ([`backend`]) and admits each
//! vCPU through the CPU scheduler (`sched::cpu`); refusals are logged with the scheduler's numbers and the other
//! VMs still start. Then every online CPU enters [`runloop::run_cpu`]: ask the scheduler for a decision, enter
//! the guest until the slice's deadline, charge the time actually used, hand the exit to `virt`'s handlers, and
//! act on the returned `ExitAction`. The BSP prints one `CV:VM` line per VM every second ([`report`]) and, with
//! `run_ms=N` on the command line, stops everything after N ms and prints the summary (`CV:VMSUM`).
//!
//! VMs can also be created while the runtime runs (the management channel's `CreateVmConfig`,
//! [`setup::create_vm`]). The VM and vCPU tables are therefore [`Table`]s of fixed capacity ([`MAX_VMS`],
//! [`MAX_SLOTS`]) that the run loops read without locks: entries are written once and published by a
//! release-store of the count (a VM's slots before the VM), never moved or removed (a destroyed VM keeps its id).
//! Each run loop re-takes its pinned vCPUs when the VM count changes, creates their backend vCPUs on its own CPU
//! and only then makes them runnable in the scheduler. The boot modules stay in [`Runtime::modules`] for this.
//!
//! Design: policy lives in `sched` (time passed in as ns since the runtime's epoch), guest-facing behaviour in
//! `virt` (host-tested); this module is glue and owns no policy. vCPUs are pinned to the CPU the scheduler placed
//! them on (a VMX vCPU's VMCS must stay on its CPU), so each CPU alone wakes its sleeping vCPUs and no
//! cross-CPU kick is needed.
//!
//! Locking: the scheduler lock is never held while a guest runs or while a VM's lock is held. Lock order:
//! a slot's vCPU lock, then its VM's context lock (exit handling); the scheduler lock alone; the VM state lock
//! alone. The console lock is innermost (taken by logging anywhere). The I/O service lock (`io::service`: engine,
//! virtio-blk devices, their guest-memory views), then the NVMe controller lock inside it: taken by the run loop
//! holding at most the slot's vCPU lock (an MMIO exit's device dispatch; the context lock is taken for
//! `complete_mmio` only after the service lock is released), or no lock at all (`io::service::serve` in the I/O
//! server's slices and idle time, the detach in
//! `stop_vm` after the VM state lock is released); never while a guest runs, never together with the scheduler
//! lock. [`devices`] is the glue between the run loop and that service.

pub mod backend;
pub mod devices;
pub mod ram;
pub mod report;
pub mod runloop;
pub mod setup;
pub mod sink;

use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use sched::cpu::{Scheduler, VcpuId};
use spin::{Mutex, Once};
use virt::{StopReport, VmContext};

use self::backend::{BackendVcpu, Kind, VmBackend};
use self::ram::GuestRam;
use crate::arch::x86_64::{cpu, percpu};

pub use setup::start;

/// Scheduler overrun bound O (ns): how far past its slice a vCPU may run (timer latency plus one VM exit and the
/// decision). Emulated CPUs take 4-20 us per exit; the measured maximum is printed in `CV:VMSUM`.
pub const OVERRUN_BOUND_NS: u64 = 50_000;
/// Share of each CPU kept for time the run loop does not charge to any vCPU or server (decisions, waking sleepers,
/// console output, reports; the list is in `runloop`'s module doc), ppm. I/O work is not in it: it is charged to
/// the I/O server (`io::server`).
pub const RESERVE_PPM: u64 = 20_000;
/// Accounting report interval.
pub const REPORT_INTERVAL_NS: u64 = 1_000_000_000;
/// Longest an idle CPU sleeps before it looks at the runtime again (so the end of a run reaches every CPU).
pub const IDLE_CHECK_NS: u64 = 100_000_000;

/// Most VMs the runtime holds (boot and created over the management channel; `vms.conf` allows 64 sections).
pub const MAX_VMS: usize = 64;
/// Most vCPUs the runtime holds over all VMs.
pub const MAX_SLOTS: usize = 256;

static RUNTIME: Once<Runtime> = Once::new();

/// An append-only table of fixed capacity that the run loops read without locks: entries `0..len()` are
/// published (written once, then `len` raised with release ordering; readers load it with acquire) and never
/// change or move afterwards. Appends are serialised by the runtime's creation lock ([`Runtime::create`]).
/// Indexing an entry that is not published panics, as indexing past a `Vec`'s end does.
#[derive(Debug)]
pub struct Table<T> {
    cells: Vec<Once<T>>,
    len: AtomicUsize,
}

impl<T> Table<T> {
    /// An empty table for `capacity` entries.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            cells: (0..capacity).map(|_| Once::new()).collect(),
            len: AtomicUsize::new(0),
        }
    }

    /// Published entries.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Entries the table can ever hold.
    pub fn capacity(&self) -> usize {
        self.cells.len()
    }

    /// Entry `i` if it is published.
    pub fn get(&self, i: usize) -> Option<&T> {
        if i < self.len() {
            self.cells.get(i).and_then(Once::get)
        } else {
            None
        }
    }

    /// The published entries in order.
    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.cells[..self.len()].iter().filter_map(Once::get)
    }

    /// Writes `values` after the published entries and publishes them together; gives them back when they do not
    /// fit. The caller serialises appends (one writer at a time).
    fn append(&self, values: Vec<T>) -> Result<(), Vec<T>> {
        let first = self.len();
        let n = values.len();
        if n > self.capacity() - first {
            return Err(values);
        }
        for (cell, v) in self.cells[first..].iter().zip(values) {
            cell.call_once(|| v);
        }
        self.len.store(first + n, Ordering::Release);
        Ok(())
    }
}

impl<T> core::ops::Index<usize> for Table<T> {
    type Output = T;

    fn index(&self, i: usize) -> &T {
        match self.get(i) {
            Some(v) => v,
            None => panic!(
                "runtime table index {i} is not published ({} are)",
                self.len()
            ),
        }
    }
}

/// Why a VM is not running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    Running,
    Stopped(StopReport),
}

/// One VM.
#[derive(Debug)]
pub struct Vm {
    pub name: String,
    pub ctx: Mutex<VmContext>,
    pub ram: GuestRam,
    pub backend: VmBackend,
    /// ELF entry point.
    pub entry: u64,
    /// Guest TSC = host TSC + this (the guest's TSC starts near 0).
    pub tsc_offset: u64,
    pub state: Mutex<VmState>,
    /// This VM's vCPUs in [`Runtime::slots`].
    pub slots: Range<usize>,
    /// Boot module its image came from (reported by the management channel).
    pub image: String,
    /// Paused by the management channel: the run loops do not enter its vCPUs (each is blocked in the scheduler
    /// at its next decision and stays blocked until resumed; see `runloop`).
    pub paused: AtomicBool,
}

impl Vm {
    /// True once the VM has stopped.
    pub fn stopped(&self) -> bool {
        matches!(*self.state.lock(), VmState::Stopped(_))
    }

    /// True while the management channel holds the VM paused.
    pub fn paused(&self) -> bool {
        self.paused.load(core::sync::atomic::Ordering::Acquire)
    }
}

/// One vCPU: where it runs and its run state.
#[derive(Debug)]
pub struct Slot {
    /// Index into [`Runtime::vms`].
    pub vm: usize,
    /// vCPU index within the VM.
    pub index: u32,
    pub id: VcpuId,
    /// Physical CPU it is pinned to.
    pub cpu: u32,
    /// Created on first run, on its CPU.
    pub vcpu: Mutex<Option<BackendVcpu>>,
    /// Blocked (halted or sleeping).
    pub blocked: AtomicBool,
    /// Host TSC to wake at (`virt::NO_WAKE`: halted for good).
    pub wake_at: AtomicU64,
    /// Slices this vCPU ran (each ends in a deschedule the guest can see as a gap).
    pub slices: AtomicU64,
}

/// A boot module: its name (see [`setup`]) and contents, reserved for the kernel's lifetime.
#[derive(Debug)]
pub struct BootModule {
    pub name: String,
    pub bytes: &'static [u8],
}

/// Per-CPU run-loop figures.
#[derive(Debug, Default)]
pub struct CpuStats {
    /// TSC ticks inside `Vcpu::run` (guest time plus the hardware world switch).
    pub guest_ticks: AtomicU64,
    /// TSC ticks halted with nothing to run.
    pub idle_ticks: AtomicU64,
    /// Slices run.
    pub slices: AtomicU64,
    /// Exits handled.
    pub exits: AtomicU64,
    /// Largest `ran - slice` seen, ns.
    pub max_overrun_ns: AtomicU64,
    /// Slices that ran longer than `slice + OVERRUN_BOUND_NS`.
    pub overruns: AtomicU64,
    /// The CPU left its run loop.
    pub finished: AtomicBool,
}

/// Everything the run loops share.
#[derive(Debug)]
pub struct Runtime {
    pub kind: Kind,
    pub tsc_hz: u64,
    /// TSC at the scheduler's time 0.
    pub epoch: u64,
    pub sched: Mutex<Scheduler>,
    /// VMs by id (boot order, then creation order); published entries never move.
    pub vms: Table<Vm>,
    /// vCPUs; a VM's are contiguous ([`Vm::slots`]) and published before the VM itself, so every slot of a
    /// published VM is published. A run loop takes the slots pinned to its CPU when the VM count changes.
    pub slots: Table<Slot>,
    /// The boot modules (images for VMs created later, by name).
    pub modules: Vec<BootModule>,
    /// Serialises VM creation (build and append); never held by the run loops.
    pub create_lock: Mutex<()>,
    /// CPUs running the loop (ids `0..cpus`).
    pub cpus: usize,
    pub cpu_stats: Vec<CpuStats>,
    /// Stop every run loop (end of a `run_ms` run).
    pub done: AtomicBool,
    /// `run_ms` from the command line.
    pub run_ms: Option<u64>,
}

impl Runtime {
    /// Nanoseconds since the epoch for a TSC value.
    pub fn ns(&self, tsc: u64) -> u64 {
        ticks_to_ns(tsc.saturating_sub(self.epoch), self.tsc_hz)
    }

    /// TSC value `ns` after `tsc` (saturating).
    pub fn after(&self, tsc: u64, ns: u64) -> u64 {
        tsc.saturating_add(ns_to_ticks(ns, self.tsc_hz))
    }

    /// Slot indices of the vCPUs pinned to `cpu` among the published VMs.
    pub fn slots_on(&self, cpu: u32) -> Vec<usize> {
        self.vms
            .iter()
            .flat_map(|vm| vm.slots.clone())
            .filter(|&s| self.slots.get(s).is_some_and(|slot| slot.cpu == cpu))
            .collect()
    }
}

/// TSC ticks to ns at `hz`.
pub fn ticks_to_ns(ticks: u64, hz: u64) -> u64 {
    u64::try_from(u128::from(ticks) * 1_000_000_000 / u128::from(hz.max(1))).unwrap_or(u64::MAX)
}

/// ns to TSC ticks at `hz`.
pub fn ns_to_ticks(ns: u64, hz: u64) -> u64 {
    u64::try_from(u128::from(ns) * u128::from(hz) / 1_000_000_000).unwrap_or(u64::MAX)
}

/// Where every AP goes after bring-up: idle until the runtime starts, run its loop, idle again.
pub fn ap_main() -> ! {
    let id = percpu::current_id();
    loop {
        if let Some(rt) = RUNTIME.get() {
            if usize::try_from(id).is_ok_and(|i| i < rt.cpus) {
                runloop::run_cpu(rt, id);
            }
            cpu::idle_forever();
        }
        x86_64::instructions::interrupts::enable_and_hlt();
    }
}
